"""Model-based test of the key lifecycle: API calls, time travel and scheduler ticks.

A Hypothesis state machine drives an in-process KeyStore (a real SQLite file,
sealed, with a FakeClock) through random sequences of CreateCryptoKey,
UpdateCryptoKey, CreateCryptoKeyVersion, enable/disable, destroy, restore,
UpdateCryptoKeyPrimaryVersion, clock jumps (minutes to months), scheduler
ticks and two schedulers on two KeyStores racing over the same file.

It keeps a small model of every key (versions and their states, primary,
rotation settings, destroy times) and after every step checks that:

- ``fsck.check`` finds nothing: no orphaned or missing due index entry, no
  version without material, no material left for a DESTROYED version, no
  primary pointing at a missing version;
- the keystore agrees with the model, field by field;
- a tick applied exactly what was due: each key whose next_rotation_time was
  <= now rotated once (one new ENABLED version, made primary, next time moved
  to the first next + k*period after now, or cleared if the key has no
  period), each DESTROY_SCHEDULED version whose destroy_time was <= now became
  DESTROYED with its material gone, nothing else changed, and nothing due is
  left in the index.

A call the current state makes invalid is still made, and must fail with the
precise domain error (InvalidArgument / NotFound / FailedPrecondition /
AlreadyExists) and change nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from tests.keystore_fixtures import open_keystore
from valv.core import fsck, records
from valv.core.clock import FakeClock
from valv.core.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ValvError,
)
from valv.core.keystore import CryptoKeyUpdate, KeyStore, NewCryptoKey
from valv.core.model import VersionState
from valv.core.names import parse_crypto_key_version
from valv.core.scheduler import Scheduler, TickReport
from valv.core.storage.sealed import SealedStore

T = TypeVar("T")

DAY = timedelta(days=1)
SERVER_DEFAULT_ROTATION = 30 * DAY  # KeystoreSettings.default_rotation_period
SERVER_DEFAULT_DESTROY = 30 * DAY  # KeystoreSettings.default_destroy_scheduled_duration
LOCATION = "projects/p/locations/global"
RING = f"{LOCATION}/keyRings/r"
MISSING_KEY = f"{RING}/cryptoKeys/missing"

ENABLED = VersionState.ENABLED
DISABLED = VersionState.DISABLED
DESTROY_SCHEDULED = VersionState.DESTROY_SCHEDULED
DESTROYED = VersionState.DESTROYED

# ---- strategies ---------------------------------------------------------------

# None means "not set": the server default applies. One hour is invalid, and
# so is a period without a next_rotation_time.
rotation_periods = st.sampled_from([None, None, DAY, 7 * DAY, timedelta(hours=1)])
# next_rotation_time relative to now: sometimes already past, with microseconds.
next_offsets = st.timedeltas(min_value=-2 * DAY, max_value=45 * DAY)
# Mostly set: None (one time in five) lets the server pick next_rotation_time.
maybe_next_offsets = st.tuples(st.integers(0, 4), next_offsets).map(
    lambda pair: None if pair[0] == 0 else pair[1])
# None means the server default (30 days); 12 hours and 121 days are out of range.
destroy_durations = st.one_of(
    st.none(),
    st.sampled_from([DAY, 2 * DAY, 7 * DAY, 120 * DAY, timedelta(hours=12), 121 * DAY]),
    st.timedeltas(min_value=DAY, max_value=40 * DAY),
)
clock_steps = st.one_of(
    st.integers(1, 90).map(lambda m: timedelta(minutes=m)),
    st.integers(1, 48).map(lambda h: timedelta(hours=h)),
    st.integers(1, 10).map(lambda d: timedelta(days=d)),
    st.integers(25, 120).map(lambda d: timedelta(days=d, hours=d % 7)),
)
# Picks of one of the model's keys / one of a key's versions; 0 picks a name
# that does not exist, so NotFound is exercised too.
key_picks = st.integers(0, 15)
version_picks = st.integers(0, 15)

UPDATE_ACTIONS = ["period", "next", "both", "clear_both", "clear_period", "clear_next",
                  "bad_period"]


# ---- the model ----------------------------------------------------------------


@dataclass
class MVersion:
    state: VersionState
    create_time: datetime
    destroy_time: datetime | None = None
    destroy_event_time: datetime | None = None


@dataclass
class MKey:
    name: str
    rotation_period: timedelta | None
    next_rotation_time: datetime | None
    destroy_duration: timedelta
    versions: dict[int, MVersion] = field(default_factory=dict)
    primary: int = 0
    next_id: int = 1

    def add_version(self, now: datetime) -> int:
        version_id = self.next_id
        self.next_id += 1
        self.versions[version_id] = MVersion(ENABLED, now)
        return version_id


def first_after(start: datetime, period: timedelta, now: datetime) -> datetime:
    """The first start + k*period (k >= 1) strictly after ``now``, counted by hand."""
    when = start + period
    while when <= now:
        when += period
    return when


# ---- the machine ----------------------------------------------------------------


class LifecycleMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="valv-lifecycle-"))
        self.loop = asyncio.new_event_loop()
        self.stack = contextlib.AsyncExitStack()
        self.clock = FakeClock()
        db = self.tmp / "valv.db"
        try:
            # Two KeyStores (two connection pools, like two centrals) on one file.
            self.ks, self.store = self.run(self.stack.enter_async_context(
                open_keystore(db, self.clock)))
            self.ks2, _ = self.run(self.stack.enter_async_context(
                open_keystore(db, self.clock)))
            self.run(self.ks.create_key_ring(LOCATION, "r"))
        except BaseException:
            self.teardown()
            raise
        self.keys: list[MKey] = []
        self.created = 0

    def teardown(self) -> None:
        try:
            self.loop.run_until_complete(self.stack.aclose())
        finally:
            self.loop.close()
            shutil.rmtree(self.tmp, ignore_errors=True)

    # -- helpers ---------------------------------------------------------------------

    def run(self, awaitable: Awaitable[T]) -> T:
        return self.loop.run_until_complete(awaitable)  # type: ignore[arg-type]

    def fails(self, error: type[ValvError], call: Callable[[], Awaitable[Any]]) -> None:
        """The call fails with exactly the domain error ``error``."""
        with pytest.raises(ValvError) as info:
            self.run(call())
        assert type(info.value) is error, f"expected {error.__name__}, got {info.value!r}"
        event(f"refused: {error.__name__}")

    def pick_key(self, pick: int) -> MKey | None:
        """A key of the model, or None for a key that does not exist."""
        if pick == 0 or not self.keys:
            return None
        return self.keys[pick % len(self.keys)]

    @staticmethod
    def pick_version(key: MKey, pick: int) -> int:
        """An id of one of ``key``'s versions, or the next (not yet existing) id."""
        ids = sorted(key.versions)
        if pick == 0 or not ids:
            return key.next_id
        return ids[pick % len(ids)]

    def now(self) -> datetime:
        return self.clock.now()

    # -- rules: keys -------------------------------------------------------------------

    @initialize(period=st.sampled_from([None, DAY, 7 * DAY]),
                offset=maybe_next_offsets, skip_initial=st.booleans(),
                destroy=st.one_of(st.none(), st.sampled_from([DAY, 2 * DAY])))
    def first_key(self, period: timedelta | None, offset: timedelta | None,
                  skip_initial: bool, destroy: timedelta | None) -> None:
        if period is not None and offset is None:
            offset = period
        self.create_key(period, offset, skip_initial, destroy, duplicate=1)
        assert len(self.keys) == 1

    @rule(period=rotation_periods, offset=maybe_next_offsets,
          skip_initial=st.booleans(), destroy=destroy_durations,
          duplicate=st.integers(0, 7))
    def create_key(self, period: timedelta | None, offset: timedelta | None,
                   skip_initial: bool, destroy: timedelta | None, duplicate: int) -> None:
        now = self.now()
        if duplicate == 0 and self.keys:
            key_id = self.keys[0].name.rsplit("/", 1)[1]
        else:
            key_id = f"k{self.created}"
        spec = NewCryptoKey(purpose=1, rotation_period=period,
                            next_rotation_time=None if offset is None else now + offset,
                            destroy_scheduled_duration=destroy)

        def call() -> Awaitable[Any]:
            return self.ks.create_crypto_key(RING, key_id, spec,
                                             skip_initial_version_creation=skip_initial)

        if period is not None and (period < DAY or offset is None):
            # As Cloud KMS: a rotation_period needs a next_rotation_time with it.
            return self.fails(InvalidArgument, call)
        if destroy is not None and not DAY <= destroy <= 120 * DAY:
            return self.fails(InvalidArgument, call)
        if any(k.name.endswith(f"/{key_id}") for k in self.keys):
            return self.fails(AlreadyExists, call)
        created = self.run(call())
        self.created += 1
        effective = period or SERVER_DEFAULT_ROTATION
        model = MKey(name=f"{RING}/cryptoKeys/{key_id}", rotation_period=effective,
                     next_rotation_time=now + effective if offset is None else now + offset,
                     destroy_duration=destroy or SERVER_DEFAULT_DESTROY)
        if not skip_initial:
            model.primary = model.add_version(now)
        assert str(created.name) == model.name
        assert created.next_rotation_time == model.next_rotation_time
        assert (created.primary.name.version if created.primary else 0) == model.primary
        self.keys.append(model)

    @rule(pick=key_picks, action=st.sampled_from(UPDATE_ACTIONS),
          period=st.sampled_from([DAY, 7 * DAY, 30 * DAY]), offset=next_offsets)
    def update_rotation(self, pick: int, action: str, period: timedelta,
                        offset: timedelta) -> None:
        key = self.pick_key(pick)
        next_time = self.now() + offset
        paths, new_period, new_next = {
            "period": (["rotation_period"], period, None),
            "next": (["next_rotation_time"], None, next_time),
            "both": (["rotation_period", "next_rotation_time"], period, next_time),
            "clear_both": (["rotation_period", "next_rotation_time"], None, None),
            "clear_period": (["rotation_period"], None, None),
            "clear_next": (["next_rotation_time"], None, None),
            "bad_period": (["rotation_period"], timedelta(hours=23), None),
        }[action]
        update = CryptoKeyUpdate(paths=paths, rotation_period=new_period,
                                 next_rotation_time=new_next)
        name = key.name if key else MISSING_KEY

        def call() -> Awaitable[Any]:
            return self.ks.update_crypto_key(name, update)

        if action == "bad_period":  # arguments are checked before the key is read
            return self.fails(InvalidArgument, call)
        if key is None:
            return self.fails(NotFound, call)
        result_period = new_period if "rotation_period" in paths else key.rotation_period
        result_next = new_next if "next_rotation_time" in paths else key.next_rotation_time
        if result_period is not None and result_next is None:
            return self.fails(InvalidArgument, call)
        got = self.run(call())
        key.rotation_period, key.next_rotation_time = result_period, result_next
        assert got.rotation_period == result_period
        assert got.next_rotation_time == result_next

    # -- rules: versions ---------------------------------------------------------------

    @rule(pick=key_picks)
    def create_version(self, pick: int) -> None:
        key = self.pick_key(pick)
        if key is None:
            return self.fails(NotFound, lambda: self.ks.create_crypto_key_version(MISSING_KEY))
        got = self.run(self.ks.create_crypto_key_version(key.name))
        version_id = key.add_version(self.now())
        assert got.name.version == version_id and got.state == ENABLED

    def version_call(self, key_pick: int, version_pick: int,
                     allowed: tuple[VersionState, ...],
                     call: Callable[[str], Awaitable[Any]]) -> tuple[MKey, int, Any] | None:
        """Make ``call`` on a picked version; check the failure if it must fail.

        Returns (key, version id, result) when the call was valid and succeeded.
        """
        key = self.pick_key(key_pick)
        if key is None:
            self.fails(NotFound, lambda: call(f"{MISSING_KEY}/cryptoKeyVersions/1"))
            return None
        version_id = self.pick_version(key, version_pick)
        name = f"{key.name}/cryptoKeyVersions/{version_id}"
        version = key.versions.get(version_id)
        if version is None:
            self.fails(NotFound, lambda: call(name))
            return None
        if version.state not in allowed:
            self.fails(FailedPrecondition, lambda: call(name))
            return None
        return key, version_id, self.run(call(name))

    @rule(key_pick=key_picks, version_pick=version_picks, enable=st.booleans())
    def set_state(self, key_pick: int, version_pick: int, enable: bool) -> None:
        target = ENABLED if enable else DISABLED
        done = self.version_call(
            key_pick, version_pick, (ENABLED, DISABLED),
            lambda name: self.ks.update_crypto_key_version(name, ["state"], int(target)))
        if done is not None:
            key, version_id, got = done
            key.versions[version_id].state = target
            assert got.state == target

    @rule(key_pick=key_picks, version_pick=version_picks)
    def destroy(self, key_pick: int, version_pick: int) -> None:
        done = self.version_call(key_pick, version_pick, (ENABLED, DISABLED),
                                 self.ks.destroy_crypto_key_version)
        if done is not None:
            key, version_id, got = done
            version = key.versions[version_id]
            version.state = DESTROY_SCHEDULED
            version.destroy_time = self.now() + key.destroy_duration
            assert got.state == DESTROY_SCHEDULED and got.destroy_time == version.destroy_time

    @rule(key_pick=key_picks, version_pick=version_picks)
    def restore(self, key_pick: int, version_pick: int) -> None:
        done = self.version_call(key_pick, version_pick, (DESTROY_SCHEDULED,),
                                 self.ks.restore_crypto_key_version)
        if done is not None:
            key, version_id, got = done
            version = key.versions[version_id]
            version.state, version.destroy_time = DISABLED, None
            assert got.state == DISABLED and got.destroy_time is None

    @rule(key_pick=key_picks, version_pick=version_picks)
    def set_primary(self, key_pick: int, version_pick: int) -> None:
        def call(name: str) -> Awaitable[Any]:
            version = parse_crypto_key_version(name)
            return self.ks.update_primary_version(str(version.parent), str(version.version))

        done = self.version_call(key_pick, version_pick, (ENABLED,), call)
        if done is not None:
            key, version_id, got = done
            key.primary = version_id
            assert got.primary is not None and got.primary.name.version == version_id

    # -- rules: time and the scheduler ---------------------------------------------------

    @rule(step=clock_steps)
    def advance_clock(self, step: timedelta) -> None:
        self.clock.advance(step)

    @rule(kind=st.sampled_from(["rotate", "destroy"]), early=st.booleans(),
          second=st.booleans())
    def tick_at_next_due(self, kind: str, early: bool, second: bool) -> None:
        """Move the clock to exactly the next due time (or 1 us before it) and tick."""
        now = self.now()
        rotate = [k.next_rotation_time for k in self.keys]
        destroy = [v.destroy_time for k in self.keys for v in k.versions.values()]
        nudge = timedelta(microseconds=-1 if early else 0)
        for times in (rotate, destroy) if kind == "rotate" else (destroy, rotate):
            ahead = [t + nudge for t in times if t is not None and t + nudge > now]
            if ahead:
                self.clock.set(min(ahead))
                break
        self.tick(second, timedelta(0))

    def due_now(self) -> tuple[list[str], list[str]]:
        """Apply to the model what a tick must do now; the names rotated and destroyed."""
        now = self.now()
        rotated: list[str] = []
        destroyed: list[str] = []
        for key in self.keys:
            due = key.next_rotation_time
            if due == now:
                event("tick exactly at a next_rotation_time")
            if due is not None and due <= now:
                key.primary = key.add_version(now)
                key.next_rotation_time = (None if key.rotation_period is None
                                          else first_after(due, key.rotation_period, now))
                rotated.append(key.name)
            for version_id, version in key.versions.items():
                if version.state == DESTROY_SCHEDULED and version.destroy_time == now:
                    event("tick exactly at a destroy_time")
                if (version.state == DESTROY_SCHEDULED and version.destroy_time is not None
                        and version.destroy_time <= now):
                    version.state = DESTROYED
                    version.destroy_time, version.destroy_event_time = None, now
                    destroyed.append(f"{key.name}/cryptoKeyVersions/{version_id}")
        return rotated, destroyed

    def check_tick(self, reports: list[TickReport]) -> None:
        rotated, destroyed = self.due_now()
        got_rotated = [str(o.name) for r in reports for o in r.rotated]
        got_destroyed = [str(o.name) for r in reports for o in r.destroyed]
        # Sorted lists, not sets: an event applied twice would show up twice.
        assert sorted(got_rotated) == sorted(rotated)
        assert sorted(got_destroyed) == sorted(destroyed)
        event(f"tick rotated {min(len(rotated), 3)}+, destroyed {min(len(destroyed), 3)}+")
        assert all(r.failed == 0 for r in reports)
        by_name = {k.name: k for k in self.keys}
        for report in reports:
            for outcome in report.rotated:
                key = by_name[str(outcome.name)]
                assert outcome.version is not None
                assert outcome.version.name.version == key.primary
                assert outcome.next_rotation_time == key.next_rotation_time
        for kind in (records.ROTATE, records.DESTROY):
            assert self.run(self.ks.due_entries(kind, 10)) == [], f"{kind} left due"

    # A tick may come right after a clock jump (a scheduler that was idle) or
    # at the same instant as the last call.
    @rule(second=st.booleans(), step=st.one_of(st.just(timedelta(0)), clock_steps))
    def tick(self, second: bool, step: timedelta) -> None:
        self.clock.advance(step)
        report = self.run(Scheduler(self.ks2 if second else self.ks).tick())
        self.check_tick([report])
        assert report.skipped == 0  # nothing stale in a consistent index

    @rule(step=st.one_of(st.just(timedelta(0)), clock_steps))
    def two_schedulers_race(self, step: timedelta) -> None:
        self.clock.advance(step)

        async def race() -> list[TickReport]:
            return list(await asyncio.gather(Scheduler(self.ks).tick(),
                                             Scheduler(self.ks2).tick()))

        reports = self.run(race())
        self.check_tick(reports)
        if any(r.skipped for r in reports):
            event("race: one scheduler found an entry the other had applied")

    # -- invariants -----------------------------------------------------------------

    @invariant()
    def store_is_consistent(self) -> None:
        problems = self.run(fsck.check(self.store))
        assert problems == [], "\n".join(map(str, problems))

    @invariant()
    def store_matches_model(self) -> None:
        self.run(self._compare(self.ks, self.store))

    async def _compare(self, ks: KeyStore, store: SealedStore) -> None:
        listed = await ks.list_crypto_keys(RING, page_size=1000)
        assert sorted(str(k.name) for k in listed.items) == sorted(k.name for k in self.keys)
        for model in self.keys:
            key = await ks.get_crypto_key(model.name)
            assert key.rotation_period == model.rotation_period, model.name
            assert key.next_rotation_time == model.next_rotation_time, model.name
            assert key.destroy_scheduled_duration == model.destroy_duration, model.name
            assert (key.primary.name.version if key.primary else 0) == model.primary, model.name
            page = await ks.list_crypto_key_versions(model.name, page_size=1000)
            assert not page.next_page_token
            got = {v.name.version: (v.state, v.create_time, v.destroy_time,
                                    v.destroy_event_time) for v in page.items}
            want = {i: (v.state, v.create_time, v.destroy_time, v.destroy_event_time)
                    for i, v in model.versions.items()}
            assert got == want, model.name
            # Destroyed means the wrapped material is gone from storage.
            material_keys = {i: records.material_key(parse_crypto_key_version(
                f"{model.name}/cryptoKeyVersions/{i}")) for i in model.versions}
            present = await store.run(
                lambda tr, keys=material_keys: {i for i, k in keys.items()
                                                if tr.get(k) is not None},
                read_only=True)
            assert present == {i for i, v in model.versions.items() if v.state != DESTROYED}


LifecycleMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=50,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestLifecycle = LifecycleMachine.TestCase
