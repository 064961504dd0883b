"""valv.core.iam: the role table, policy validation, etags, storage and inheritance."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.keystore_fixtures import open_keystore
from valv.core import iam
from valv.core.clock import FakeClock
from valv.core.errors import Aborted, InvalidArgument, NotFound
from valv.core.iam import BindingInput, IamPolicies, PolicyCache
from valv.core.keystore import KeyStore, NewCryptoKey
from valv.core.model import Purpose
from valv.core.names import parse_crypto_key, parse_crypto_key_version, parse_key_ring

LOC = "projects/p/locations/global"
RING = f"{LOC}/keyRings/r"
KEY = f"{RING}/cryptoKeys/k"
OTHER_KEY = f"{RING}/cryptoKeys/other"
VERSION = f"{KEY}/cryptoKeyVersions/1"

ADMIN = "roles/cloudkms.admin"
ENC_DEC = "roles/cloudkms.cryptoKeyEncrypterDecrypter"


# ---- roles --------------------------------------------------------------------------


def test_admin_cannot_use_keys_separation_of_duties() -> None:
    admin = iam.ROLES[ADMIN]
    assert not {p for p in admin if p.startswith("cloudkms.cryptoKeyVersions.useTo")}
    assert iam.USE_TO_ENCRYPT not in admin and iam.USE_TO_DECRYPT not in admin
    # ...but manages them, including their policies.
    assert {iam.KEY_RINGS_CREATE, iam.CRYPTO_KEYS_CREATE, iam.VERSIONS_DESTROY,
            iam.VERSIONS_RESTORE, iam.CRYPTO_KEYS_SET_IAM_POLICY,
            iam.KEY_RINGS_SET_IAM_POLICY} <= admin


def test_use_roles() -> None:
    assert {iam.USE_TO_ENCRYPT, iam.USE_TO_DECRYPT} <= iam.ROLES[ENC_DEC]
    encrypter = iam.ROLES["roles/cloudkms.cryptoKeyEncrypter"]
    decrypter = iam.ROLES["roles/cloudkms.cryptoKeyDecrypter"]
    assert iam.USE_TO_ENCRYPT in encrypter and iam.USE_TO_DECRYPT not in encrypter
    assert iam.USE_TO_DECRYPT in decrypter and iam.USE_TO_ENCRYPT not in decrypter
    for role in (ENC_DEC, "roles/cloudkms.cryptoKeyEncrypter",
                 "roles/cloudkms.cryptoKeyDecrypter"):
        # Nothing but use (and seeing locations): no reading or managing keys.
        assert iam.ROLES[role] - {iam.USE_TO_ENCRYPT, iam.USE_TO_DECRYPT} == {
            iam.LOCATIONS_GET, iam.LOCATIONS_LIST}


def test_viewers_only_get_and_list() -> None:
    viewer = iam.ROLES["roles/cloudkms.viewer"]
    assert viewer and all(p.endswith((".get", ".list")) for p in viewer)
    assert {iam.KEY_RINGS_LIST, iam.CRYPTO_KEYS_GET, iam.VERSIONS_LIST} <= viewer
    basic_viewer = iam.ROLES["roles/viewer"]
    assert all(p.endswith((".get", ".list", ".getIamPolicy")) for p in basic_viewer)


def test_basic_roles() -> None:
    editor = iam.ROLES["roles/editor"]
    assert iam.CRYPTO_KEYS_CREATE in editor
    assert not {iam.USE_TO_ENCRYPT, iam.USE_TO_DECRYPT, iam.VERSIONS_DESTROY,
                iam.CRYPTO_KEYS_SET_IAM_POLICY} & editor
    assert iam.ROLES["roles/owner"] == iam.ALL_PERMISSIONS


def test_every_role_grants_only_known_permissions() -> None:
    for role, permissions in iam.ROLES.items():
        assert permissions <= iam.ALL_PERMISSIONS | {iam.SIDECAR_CONNECT}, role
        assert role.startswith("roles/")
    # Being a sidecar is granted on purpose only: no Cloud KMS role implies it.
    assert [r for r, p in iam.ROLES.items() if iam.SIDECAR_CONNECT in p] == [iam.SIDECAR_ROLE]
    assert all(p.startswith("cloudkms.") for p in iam.ALL_PERMISSIONS)
    assert len(iam.ALL_PERMISSIONS) > 30


# ---- validation ---------------------------------------------------------------------


def b(role: str, *members: str, condition: bool = False) -> BindingInput:
    return BindingInput(role, list(members), condition)


def test_unknown_role_is_named() -> None:
    with pytest.raises(InvalidArgument, match=r"role 'roles/cloudkms\.nope' is not supported"):
        iam.check_policy([b("roles/cloudkms.nope", "user:a@x.com")])
    with pytest.raises(InvalidArgument, match="projects/p/roles/custom"):
        iam.check_policy([b("projects/p/roles/custom", "user:a@x.com")])


def test_conditions_and_version_3_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="conditions are not supported"):
        iam.check_policy([b(ADMIN, "user:a@x.com", condition=True)])
    with pytest.raises(InvalidArgument, match="conditions are not supported"):
        iam.check_policy([b(ADMIN, "user:a@x.com")], version=3)
    with pytest.raises(InvalidArgument, match="version 2 is invalid"):
        iam.check_policy([], version=2)
    with pytest.raises(InvalidArgument, match="audit_configs"):
        iam.check_policy([], has_audit_configs=True)
    assert iam.check_policy([b(ADMIN, "user:a@x.com")], version=0)


@pytest.mark.parametrize("member", [
    "user:alice@example.com", "serviceAccount:sa@p.iam.gserviceaccount.com",
    "serviceAccount:system:serviceaccount:ns:name", "group:ops@example.com",
    "domain:example.com", "allAuthenticatedUsers"])
def test_valid_members(member: str) -> None:
    assert iam.check_member(member) == member


@pytest.mark.parametrize("member", [
    "", "alice@example.com", "user:", "user:has space", "robot:x", "domain:not a domain",
    "domain:nodot", "User:alice@example.com", "deleted:user:a@x.com?uid=1", "user:\x00"])
def test_invalid_members_are_named(member: str) -> None:
    with pytest.raises(InvalidArgument, match=r"member .* is invalid"):
        iam.check_member(member)


def test_all_users_is_refused_all_authenticated_users_is_not() -> None:
    with pytest.raises(InvalidArgument, match="allAuthenticatedUsers"):
        iam.check_policy([b(ENC_DEC, "allUsers")])


def test_bindings_are_merged_deduplicated_and_emptied_ones_dropped() -> None:
    bindings = iam.check_policy([
        b(ENC_DEC, "user:a@x.com", "user:b@x.com", "user:a@x.com"),
        b(ADMIN),
        b(ENC_DEC, "user:c@x.com", "user:b@x.com"),
        b("roles/viewer", "domain:Example.COM"),
    ])
    assert bindings == (
        iam.Binding(ENC_DEC, ("user:a@x.com", "user:b@x.com", "user:c@x.com")),
        iam.Binding("roles/viewer", ("domain:example.com",)),
    )


def test_policy_size_limits() -> None:
    with pytest.raises(InvalidArgument, match="at most 1500 members"):
        iam.check_policy([b(ENC_DEC, *(f"user:u{i}@x.com" for i in range(1501)))])
    with pytest.raises(InvalidArgument, match="larger than 64 KiB"):
        iam.check_policy([b(ENC_DEC, *(f"user:{'u' * 400}{i}@x.com" for i in range(200)))])


# ---- the root policy file -------------------------------------------------------------


def test_the_sidecar_role_is_for_the_root_policy_only(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="only be granted in the root policy"):
        iam.check_policy([b(iam.SIDECAR_ROLE, "serviceAccount:s@x.com")])
    for broad in ("allAuthenticatedUsers", "domain:x.com"):
        with pytest.raises(InvalidArgument, match="one by one"):
            iam.check_policy([b(iam.SIDECAR_ROLE, broad)], root=True)
    path = tmp_path / "root.json"
    path.write_text(json.dumps({"bindings": [
        {"role": iam.SIDECAR_ROLE, "members": ["serviceAccount:s@x.com"]}]}))
    policy = iam.load_root_policy(path)
    assert policy.bindings == (iam.Binding(iam.SIDECAR_ROLE, ("serviceAccount:s@x.com",)),)


def test_root_policy_file(tmp_path: Path) -> None:
    path = tmp_path / "root.json"
    path.write_text(json.dumps({"bindings": [{"role": ADMIN, "members": ["user:alice"]}]}))
    assert iam.load_root_policy(path).bindings == (iam.Binding(ADMIN, ("user:alice",)),)
    path.write_text(json.dumps({"version": 1, "etag": "", "bindings": []}))
    assert iam.load_root_policy(path).bindings == ()


@pytest.mark.parametrize(("content", "problem"), [
    ("{", "not valid JSON"),
    ("[]", "expected a JSON object"),
    ('{"bindings": {}}', "bindings must be a list"),
    ('{"bindings": [{"role": "roles/nope", "members": ["user:a"]}]}', "'roles/nope'"),
    ('{"bindings": [{"role": "roles/viewer", "members": ["bob"]}]}', "member 'bob'"),
    ('{"bindings": [{"role": "roles/viewer", "members": "user:a"}]}', "list of strings"),
    ('{"bindings": [{"role": "roles/viewer", "members": ["user:a"], "condition": {}}]}',
     "conditions are not supported"),
    ('{"binding": []}', "unknown field"),
    ('{"version": 3, "bindings": []}', "version 3"),
])
def test_bad_root_policy_file_is_explained(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "root.json"
    path.write_text(content)
    with pytest.raises(InvalidArgument) as info:
        iam.load_root_policy(path)
    assert str(path) in info.value.message
    assert problem in info.value.message


def test_missing_root_policy_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="cannot read it"):
        iam.load_root_policy(tmp_path / "absent.json")


# ---- resources and etags --------------------------------------------------------------


def test_policy_resources() -> None:
    assert iam.parse_policy_resource(RING) == parse_key_ring(RING)
    assert iam.parse_policy_resource(KEY) == parse_crypto_key(KEY)
    with pytest.raises(NotFound, match="ImportJob"):
        iam.parse_policy_resource(f"{RING}/importJobs/j")
    for name in ("", LOC, VERSION, "projects/p", f"{RING}/cryptoKeys", "garbage",
                 f"{LOC}/keyRings/bad!id"):
        with pytest.raises(InvalidArgument):
            iam.parse_policy_resource(name)


def test_policy_chain() -> None:
    ring, key = parse_key_ring(RING), parse_crypto_key(KEY)
    assert iam.policy_chain(parse_crypto_key_version(VERSION)) == (ring, key)
    assert iam.policy_chain(key) == (ring, key)
    assert iam.policy_chain(ring) == (ring,)
    assert iam.policy_chain(ring.parent) == ()


@given(st.integers(0, 2**40), st.integers(0, 2**40))
def test_etag_changes_with_every_write(gen1: int, gen2: int) -> None:
    key = parse_crypto_key(KEY)
    bindings = (iam.Binding(ENC_DEC, ("user:a@x.com",)),)
    same = iam.compute_etag(key, gen1, bindings) == iam.compute_etag(key, gen2, bindings)
    assert same == (gen1 == gen2)


def test_etag_depends_on_resource_and_bindings() -> None:
    key, other = parse_crypto_key(KEY), parse_crypto_key(OTHER_KEY)
    bindings = (iam.Binding(ENC_DEC, ("user:a@x.com",)),)
    assert iam.compute_etag(key, 1, bindings) != iam.compute_etag(other, 1, bindings)
    assert iam.compute_etag(key, 1, bindings) != iam.compute_etag(key, 1, ())
    assert iam.compute_etag(key, 1, bindings) == iam.compute_etag(key, 1, bindings)


# ---- members and evaluation -------------------------------------------------------------


def test_member_matching() -> None:
    policy = iam.CompiledPolicy(iam.check_policy([
        b(ENC_DEC, "domain:example.com"),
        b("roles/cloudkms.viewer", "allAuthenticatedUsers"),
        b(ADMIN, "group:admins@example.com"),
    ]))

    def has(member: str, permission: str) -> bool:
        return permission in policy.permissions_of(iam.member_keys(member))

    assert has("user:alice@Example.com", iam.USE_TO_ENCRYPT)
    assert has("serviceAccount:sa@example.com", iam.USE_TO_DECRYPT)
    assert not has("user:alice@example.com.evil", iam.USE_TO_ENCRYPT)
    assert not has("group:x@example.com", iam.USE_TO_ENCRYPT)  # domain: is users and SAs
    assert has("user:anyone@else.org", iam.CRYPTO_KEYS_GET)
    # Group members are not known: only the group identity itself matches.
    assert not has("user:alice@example.com", iam.KEY_RINGS_CREATE)
    assert has("group:admins@example.com", iam.KEY_RINGS_CREATE)


class TimerStub:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_policy_cache_ttl_and_races() -> None:
    timer = TimerStub()
    cache = PolicyCache(ttl_s=1.0, timer=timer)
    compiled = iam.CompiledPolicy(())
    cache.put(KEY, cache.begin_load(), compiled)
    assert cache.get(KEY) is compiled
    timer.now = 1.5
    assert cache.get(KEY) is None
    # A load that started before an invalidation is not cached.
    ticket = cache.begin_load()
    cache.invalidate(KEY)
    cache.put(KEY, ticket, compiled)
    assert cache.get(KEY) is None
    cache.put(KEY, cache.begin_load(), compiled)
    assert cache.get(KEY) is compiled
    cache.invalidate(KEY)
    assert cache.get(KEY) is None
    assert PolicyCache(ttl_s=0).get(KEY) is None


# ---- storage and inheritance, on a real store ----------------------------------------------


async def make_resources(ks: KeyStore) -> None:
    await ks.create_key_ring(LOC, "r")
    for key_id in ("k", "other"):
        await ks.create_crypto_key(RING, key_id, NewCryptoKey(purpose=Purpose.ENCRYPT_DECRYPT))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


async def test_set_get_and_etags(tmp_path: Path, clock: FakeClock) -> None:
    async with open_keystore(tmp_path / "v.db", clock) as (ks, _):
        await make_resources(ks)
        policies = IamPolicies(ks, clock, cache_ttl_s=0)
        empty = await policies.get_policy(KEY)
        assert empty.bindings == () and empty.etag
        assert (await policies.get_policy(KEY)).etag == empty.etag  # stable until written

        first = await policies.set_policy(KEY, [b(ENC_DEC, "user:a@x.com")], etag=empty.etag)
        assert first.bindings == (iam.Binding(ENC_DEC, ("user:a@x.com",)),)
        assert first.etag != empty.etag
        assert await policies.get_policy(KEY) == first

        with pytest.raises(Aborted, match="etag"):  # stale: written since
            await policies.set_policy(KEY, [], etag=empty.etag)
        # The same bindings written again still get a new etag.
        again = await policies.set_policy(KEY, [b(ENC_DEC, "user:a@x.com")], etag=first.etag)
        assert again.bindings == first.bindings and again.etag != first.etag
        # An empty etag writes unconditionally.
        cleared = await policies.set_policy(KEY, [], etag=b"")
        assert cleared.bindings == ()
        # The ring's policy is a different record.
        assert (await policies.get_policy(RING)).bindings == ()


async def test_update_mask(tmp_path: Path, clock: FakeClock) -> None:
    async with open_keystore(tmp_path / "v.db", clock) as (ks, _):
        await make_resources(ks)
        policies = IamPolicies(ks, clock, cache_ttl_s=0)
        written = await policies.set_policy(KEY, [b(ADMIN, "user:a@x.com")], etag=b"")
        # "bindings" only: a stale etag is ignored.
        ignored = await policies.set_policy(KEY, [b(ENC_DEC, "user:b@x.com")], etag=b"stale",
                                            update_mask=["bindings"])
        assert ignored.bindings == (iam.Binding(ENC_DEC, ("user:b@x.com",)),)
        # "etag" only: the bindings are kept, the etag is checked.
        with pytest.raises(Aborted):
            await policies.set_policy(KEY, [], etag=written.etag, update_mask=["etag"])
        kept = await policies.set_policy(KEY, [], etag=ignored.etag, update_mask=["etag"])
        assert kept.bindings == ignored.bindings
        with pytest.raises(InvalidArgument, match="audit_configs"):
            await policies.set_policy(KEY, [], etag=b"", update_mask=["audit_configs"])


async def test_missing_and_invalid_resources(tmp_path: Path, clock: FakeClock) -> None:
    async with open_keystore(tmp_path / "v.db", clock) as (ks, _):
        await make_resources(ks)
        policies = IamPolicies(ks, clock, cache_ttl_s=0)
        for name in (f"{RING}/cryptoKeys/missing", f"{LOC}/keyRings/missing"):
            with pytest.raises(NotFound, match="missing not found"):
                await policies.get_policy(name)
            with pytest.raises(NotFound):
                await policies.set_policy(name, [], etag=b"")
        with pytest.raises(InvalidArgument):
            await policies.set_policy(VERSION, [], etag=b"")
        with pytest.raises(InvalidArgument, match="not supported"):
            await policies.set_policy(KEY, [b("roles/nope", "user:a@x.com")], etag=b"")
        # Nothing was written by the refused calls.
        assert (await policies.get_policy(KEY)).bindings == ()


async def test_inheritance(tmp_path: Path, clock: FakeClock) -> None:
    root = iam.Policy(iam.check_policy([b("roles/cloudkms.viewer", "user:auditor@x.com")]))
    async with open_keystore(tmp_path / "v.db", clock) as (ks, _):
        await make_resources(ks)
        policies = IamPolicies(ks, clock, root=root, cache_ttl_s=0)
        ring, key = parse_key_ring(RING), parse_crypto_key(KEY)
        other, version = parse_crypto_key(OTHER_KEY), parse_crypto_key_version(VERSION)
        await policies.set_policy(RING, [b(ENC_DEC, "user:ring@x.com")], etag=b"")
        await policies.set_policy(KEY, [b(ADMIN, "user:key@x.com")], etag=b"")

        async def allowed(member: str, name: iam.AnyName, permission: str) -> bool:
            return await policies.allowed(member, name, permission)

        # Root -> everything.
        for name in (ring.parent, ring, key, version):
            assert await allowed("user:auditor@x.com", name, iam.CRYPTO_KEYS_GET)
        # Ring -> ring, its keys and their versions, not the location.
        for name in (ring, key, other, version):
            assert await allowed("user:ring@x.com", name, iam.USE_TO_ENCRYPT)
        assert not await allowed("user:ring@x.com", ring.parent, iam.USE_TO_ENCRYPT)
        # Key -> key and versions, not the ring or a sibling.
        assert await allowed("user:key@x.com", version, iam.VERSIONS_DESTROY)
        assert not await allowed("user:key@x.com", ring, iam.CRYPTO_KEYS_CREATE)
        assert not await allowed("user:key@x.com", other, iam.VERSIONS_DESTROY)
        # Separation of duties on the key itself.
        assert not await allowed("user:key@x.com", key, iam.USE_TO_ENCRYPT)
        # Permissions are the union over the path.
        assert await policies.permissions("user:key@x.com", key) == iam.ROLES[ADMIN]
        assert await policies.permissions("user:nobody@x.com", key) == frozenset()
        # A key that doesn't exist under the ring still inherits (no existence leak).
        missing = parse_crypto_key(f"{RING}/cryptoKeys/missing")
        assert await allowed("user:ring@x.com", missing, iam.USE_TO_DECRYPT)


async def test_cached_policy_is_replaced_when_set_here(tmp_path: Path,
                                                       clock: FakeClock) -> None:
    async with open_keystore(tmp_path / "v.db", clock) as (ks, _):
        await make_resources(ks)
        policies = IamPolicies(ks, clock, cache_ttl_s=3600)
        key = parse_crypto_key(KEY)
        assert not await policies.allowed("user:a@x.com", key, iam.USE_TO_ENCRYPT)
        await policies.set_policy(KEY, [b(ENC_DEC, "user:a@x.com")], etag=b"")
        assert await policies.allowed("user:a@x.com", key, iam.USE_TO_ENCRYPT)
        await policies.set_policy(RING, [b(ENC_DEC, "user:b@x.com")], etag=b"")
        assert await policies.allowed("user:b@x.com", key, iam.USE_TO_ENCRYPT)

        # Another instance on the same store sees this one's change only after
        # its TTL: the cache bounds staleness across processes.
        second = IamPolicies(ks, clock, cache_ttl_s=3600)
        assert await second.allowed("user:a@x.com", key, iam.USE_TO_ENCRYPT)
        await policies.set_policy(KEY, [], etag=b"")
        assert not await policies.allowed("user:a@x.com", key, iam.USE_TO_ENCRYPT)
        assert await second.allowed("user:a@x.com", key, iam.USE_TO_ENCRYPT)  # stale, cached
        uncached = IamPolicies(ks, clock, cache_ttl_s=0)
        assert not await uncached.allowed("user:a@x.com", key, iam.USE_TO_ENCRYPT)


async def test_a_cancelled_set_still_invalidates(tmp_path: Path, clock: FakeClock) -> None:
    async with open_keystore(tmp_path / "v.db", clock) as (ks, _):
        await make_resources(ks)
        policies = IamPolicies(ks, clock, cache_ttl_s=3600)
        key = parse_crypto_key(KEY)
        assert not await policies.allowed("user:a@x.com", key, iam.USE_TO_ENCRYPT)
        task = asyncio.ensure_future(
            policies.set_policy(KEY, [b(ENC_DEC, "user:a@x.com")], etag=b""))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The write finishes in its worker; once it has, the cache is dropped.
        for _ in range(200):
            if (await policies.get_policy(KEY)).bindings:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert await policies.allowed("user:a@x.com", key, iam.USE_TO_ENCRYPT)


# ---- property: evaluation is "any policy on the path grants a role holding it" ----------

MEMBERS = ["user:a@x.com", "user:b@y.org", "serviceAccount:s@x.com", "group:g@x.com",
           "domain:x.com", "allAuthenticatedUsers"]
CALLERS = ["user:a@x.com", "user:b@y.org", "serviceAccount:s@x.com", "group:g@x.com",
           "user:c@z.net"]
policies_st = st.lists(st.tuples(st.sampled_from(sorted(set(iam.ROLES) - iam.ROOT_ONLY_ROLES)),
                                 st.lists(st.sampled_from(MEMBERS), max_size=3)), max_size=4)


def reference_allowed(caller: str, permission: str,
                      levels: list[list[tuple[str, list[str]]]]) -> bool:
    def matches(member: str) -> bool:
        if member in (caller, "allAuthenticatedUsers"):
            return True
        kind, _, email = caller.partition(":")
        return (member.startswith("domain:") and kind in ("user", "serviceAccount")
                and email.endswith("@" + member.removeprefix("domain:")))

    return any(permission in iam.ROLES[role] and any(matches(m) for m in members)
               for level in levels for role, members in level)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(root=policies_st, ring=policies_st, key=policies_st, caller=st.sampled_from(CALLERS),
       permission=st.sampled_from(sorted(iam.ALL_PERMISSIONS)))
def test_evaluation_matches_the_definition(tmp_path: Path, root: list[tuple[str, list[str]]],
                                           ring: list[tuple[str, list[str]]],
                                           key: list[tuple[str, list[str]]], caller: str,
                                           permission: str) -> None:
    async def run() -> None:
        db = tmp_path / f"prop-{abs(hash((str(root), str(ring), str(key))))}.db"
        db.unlink(missing_ok=True)
        clock = FakeClock()
        async with open_keystore(db, clock) as (ks, _):
            await make_resources(ks)
            root_policy = iam.Policy(iam.check_policy([b(r, *m) for r, m in root]))
            policies = IamPolicies(ks, clock, root=root_policy, cache_ttl_s=0)
            await policies.set_policy(RING, [b(r, *m) for r, m in ring], etag=b"")
            await policies.set_policy(KEY, [b(r, *m) for r, m in key], etag=b"")
            version = parse_crypto_key_version(VERSION)
            expected_key = reference_allowed(caller, permission, [root, ring, key])
            assert await policies.allowed(caller, version, permission) == expected_key
            assert (permission in await policies.permissions(caller, version)) == expected_key
            expected_ring = reference_allowed(caller, permission, [root, ring])
            assert await policies.allowed(caller, parse_key_ring(RING),
                                          permission) == expected_ring

    asyncio.run(run())


def test_the_documented_role_table_matches_the_code() -> None:
    doc = (Path(__file__).resolve().parent.parent / "docs" / "security.md").read_text()
    rows = {}
    for line in doc.splitlines():
        if line.startswith("| `roles/"):
            role, permissions = (cell.strip() for cell in line.strip("|").split("|")[:2])
            rows[role.strip("`")] = permissions
    assert set(rows) == set(iam.ROLES)
    for role, cell in rows.items():
        if role.startswith("roles/cloudkms."):
            listed = {"cloudkms." + p.strip().strip("`") for p in cell.split(",")}
            assert listed == iam.ROLES[role], role


def test_domain_bindings_match_only_plain_email_identities() -> None:
    from valv.core.iam import member_keys

    assert "domain:corp.com" in member_keys("user:alice@corp.com")
    assert "domain:corp.com" in member_keys("serviceAccount:ci@corp.com")
    # A JWT subject or SPIFFE id that merely ends in "@corp.com" is not in the domain.
    for crafted in ("serviceAccount:repo:org/x:ref:refs/heads/x@corp.com",
                    "serviceAccount:spiffe://td/ns/a@corp.com",
                    "user:a@b@corp.com"):
        assert "domain:corp.com" not in member_keys(crafted)
