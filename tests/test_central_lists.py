"""List methods through Google's official client against a real central.

page_size, page tokens, total_size, filter and order_by for ListKeyRings,
ListCryptoKeys and ListCryptoKeyVersions.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from google.api_core import exceptions as gexc
from google.cloud import kms_v1

from tests.helpers import CALL

Client = kms_v1.KeyManagementServiceClient
ENCRYPT_DECRYPT = kms_v1.CryptoKey.CryptoKeyPurpose.ENCRYPT_DECRYPT
State = kms_v1.CryptoKeyVersion.CryptoKeyVersionState

ORDERS = ["", "name", "name asc", "name desc", "create_time", "create_time asc",
          "create_time desc"]
BIG = 1005  # more than the maximum page size


@dataclass(frozen=True)
class Page:
    names: list[str]
    token: str
    total: int


# The List method and the response field that holds its items, per resource kind.
_LISTS: dict[str, tuple[str, str]] = {
    "rings": ("list_key_rings", "key_rings"),
    "keys": ("list_crypto_keys", "crypto_keys"),
    "versions": ("list_crypto_key_versions", "crypto_key_versions"),
}


def _page(kms: Client, kind: str, parent: str, **request: Any) -> Page:
    method, field = _LISTS[kind]
    pager = getattr(kms, method)(request={"parent": parent, **request}, **CALL)
    # A pager answers attribute reads from its first response, without fetching more.
    return Page([item.name for item in getattr(pager, field)], pager.next_page_token,
                pager.total_size)


def _walk(kms: Client, kind: str, parent: str, page_size: int, **request: Any
          ) -> tuple[list[str], list[Page]]:
    """Follow next_page_token to the end; every item in order, and every page."""
    pages: list[Page] = []
    token = ""
    while True:
        page = _page(kms, kind, parent, page_size=page_size, page_token=token, **request)
        pages.append(page)
        assert len(pages) <= 10_000
        if not page.token:
            break
        token = page.token
    return [n for p in pages for n in p.names], pages


def _tail(name: str) -> str:
    return name.rsplit("/", 1)[1]


def _micros(resource: Any) -> int:
    ts = type(resource).pb(resource).create_time
    return int(ts.seconds * 1_000_000 + ts.nanos // 1000)


def _tamper(token: str) -> str:
    i = len(token) // 2
    return token[:i] + ("A" if token[i] != "A" else "B") + token[i + 1:]


# ---- fixtures: data created once per module ---------------------------------------------------


@pytest.fixture(scope="module")
def big_location(kms: Client) -> str:
    """A location holding BIG key rings r0000…r1004."""
    location = f"projects/big-{uuid.uuid4().hex[:8]}/locations/global"
    for i in range(BIG):
        kms.create_key_ring(
            request={"parent": location, "key_ring_id": f"r{i:04d}", "key_ring": {}}, **CALL)
    return location


@dataclass(frozen=True)
class Catalog:
    ring: str
    # key name -> (create_time in microseconds, labels, primary state name or None)
    keys: dict[str, tuple[int, dict[str, str], str | None]]

    def names(self, where: Callable[[str, dict[str, str], str | None], bool] | None = None
              ) -> list[str]:
        """Matching key names in name order."""
        return sorted(n for n, (_, labels, state) in self.keys.items()
                      if where is None or where(n, labels, state))

    def by_create_time(self) -> list[str]:
        # Ties (same microsecond) break by id, as the server's index does.
        return sorted(self.keys, key=lambda n: (self.keys[n][0], _tail(n)))


# Created in this order, which is deliberately not name order. ASCII byte order:
# '-' < digits < uppercase < '_' < lowercase.
_CATALOG = [
    ("k07", {"env": "prod", "team": "blue"}, "ENABLED"),
    ("a-1", {"env": "dev"}, "ENABLED"),
    ("zeta", {}, "DISABLED"),
    ("b", {"env": "prod"}, "DISABLED"),
    ("k10", {"team": "red"}, "ENABLED"),
    ("k2", {"env": "staging", "team": "blue"}, "ENABLED"),
    ("M", {"env": "prod"}, "ENABLED"),
    ("m", {}, None),  # no primary
    ("_u", {"env": "dev", "team": "red"}, "DISABLED"),
    ("-d", {}, "ENABLED"),
    ("k1", {"env": "prod", "team": "red"}, "ENABLED"),
    ("alpha", {"team": "blue"}, "ENABLED"),
]


@pytest.fixture(scope="module")
def catalog(kms: Client) -> Catalog:
    ring = kms.create_key_ring(request={
        "parent": f"projects/cat-{uuid.uuid4().hex[:8]}/locations/global",
        "key_ring_id": "catalog", "key_ring": {}}, **CALL).name
    keys: dict[str, tuple[int, dict[str, str], str | None]] = {}
    for key_id, labels, state in _CATALOG:
        key = kms.create_crypto_key(request={
            "parent": ring, "crypto_key_id": key_id,
            "skip_initial_version_creation": state is None,
            "crypto_key": {"purpose": ENCRYPT_DECRYPT, "labels": labels}}, **CALL)
        if state == "DISABLED":
            kms.update_crypto_key_version(request={
                "crypto_key_version": {"name": key.primary.name, "state": State.DISABLED},
                "update_mask": {"paths": ["state"]}}, **CALL)
        keys[key.name] = (_micros(key), labels, state)
    return Catalog(ring, keys)


@pytest.fixture(scope="module")
def versioned_key(kms: Client) -> tuple[str, dict[str, str]]:
    """A key with versions 1…12 in assorted states; returns (key, version name -> state)."""
    ring = kms.create_key_ring(request={
        "parent": f"projects/ver-{uuid.uuid4().hex[:8]}/locations/global",
        "key_ring_id": "r", "key_ring": {}}, **CALL).name
    key = kms.create_crypto_key(request={"parent": ring, "crypto_key_id": "k",
                                         "crypto_key": {"purpose": ENCRYPT_DECRYPT}},
                                **CALL).name
    for _ in range(11):
        kms.create_crypto_key_version(request={"parent": key, "crypto_key_version": {}}, **CALL)
    states = {f"{key}/cryptoKeyVersions/{n}": "ENABLED" for n in range(1, 13)}
    for n in (2, 5, 11):
        name = f"{key}/cryptoKeyVersions/{n}"
        kms.update_crypto_key_version(request={
            "crypto_key_version": {"name": name, "state": State.DISABLED},
            "update_mask": {"paths": ["state"]}}, **CALL)
        states[name] = "DISABLED"
    for n in (3, 10):
        name = f"{key}/cryptoKeyVersions/{n}"
        kms.destroy_crypto_key_version(request={"name": name}, **CALL)
        states[name] = "DESTROY_SCHEDULED"
    return key, states


# ---- page size ---------------------------------------------------------------------------------


def test_default_page_size_is_1000(kms: Client, big_location: str) -> None:
    first = _page(kms, "rings", big_location)
    assert len(first.names) == 1000
    assert first.total == BIG
    assert first.token
    second = _page(kms, "rings", big_location, page_token=first.token)
    assert len(second.names) == BIG - 1000
    assert second.token == ""
    assert second.total == BIG
    expected = [f"{big_location}/keyRings/r{i:04d}" for i in range(BIG)]
    assert first.names + second.names == expected


@pytest.mark.parametrize("page_size", [1000, 1001, 5000, 2**31 - 1])
def test_page_size_is_capped_at_1000(kms: Client, big_location: str, page_size: int) -> None:
    page = _page(kms, "rings", big_location, page_size=page_size)
    assert len(page.names) == 1000
    assert page.token
    assert page.total == BIG


def test_create_time_desc_over_more_than_one_scan_chunk(kms: Client, big_location: str) -> None:
    everything, pages = _walk(kms, "rings", big_location, 300, order_by="create_time desc")
    assert [len(p.names) for p in pages] == [300, 300, 300, 105]
    assert everything == [f"{big_location}/keyRings/r{i:04d}" for i in reversed(range(BIG))]


def test_google_pager_yields_everything(kms: Client, big_location: str,
                                        catalog: Catalog) -> None:
    rings = [r.name for r in kms.list_key_rings(request={"parent": big_location}, **CALL)]
    assert len(rings) == BIG == len(set(rings))
    keys = list(kms.list_crypto_keys(request={"parent": catalog.ring, "page_size": 2}, **CALL))
    assert [k.name for k in keys] == catalog.names()
    pages = list(kms.list_crypto_keys(request={"parent": catalog.ring, "page_size": 5},
                                      **CALL).pages)
    assert [len(p.crypto_keys) for p in pages] == [5, 5, 2]


@pytest.mark.parametrize("kind", ["rings", "keys", "versions"])
def test_negative_page_size(kms: Client, catalog: Catalog, versioned_key: Any,
                            kind: str) -> None:
    parent = {"rings": catalog.ring.rsplit("/keyRings/", 1)[0], "keys": catalog.ring,
              "versions": versioned_key[0]}[kind]
    with pytest.raises(gexc.InvalidArgument) as caught:
        _page(kms, kind, parent, page_size=-1)
    assert "page_size" in caught.value.message


# ---- paging and ordering -------------------------------------------------------------------------


def _expected_keys(catalog: Catalog, order_by: str) -> list[str]:
    if order_by.startswith("create_time"):
        ordered = catalog.by_create_time()
    else:
        ordered = catalog.names()
    return ordered[::-1] if order_by.endswith("desc") else ordered


@pytest.mark.parametrize("order_by", ORDERS)
@pytest.mark.parametrize("page_size", [1, 2, 3, 7])
def test_paging_yields_every_key_once_in_order(kms: Client, catalog: Catalog, page_size: int,
                                               order_by: str) -> None:
    everything, pages = _walk(kms, "keys", catalog.ring, page_size, order_by=order_by)
    assert everything == _expected_keys(catalog, order_by)
    assert len(pages) == math.ceil(len(catalog.keys) / page_size)
    for page in pages:
        assert 1 <= len(page.names) <= page_size
        assert page.total == len(catalog.keys)


def test_orders_really_differ(catalog: Catalog) -> None:
    """Guard for the test data: the orders checked above are four different lists."""
    orders = {tuple(_expected_keys(catalog, o)) for o in ORDERS}
    assert len(orders) == 4
    assert [_tail(n) for n in catalog.names()][:4] == ["-d", "M", "_u", "a-1"]


def test_create_time_order_matches_create_times(kms: Client, catalog: Catalog) -> None:
    keys = list(kms.list_crypto_keys(request={"parent": catalog.ring,
                                              "order_by": "create_time"}, **CALL))
    stamps = [(kms_v1.CryptoKey.pb(k).create_time.seconds, kms_v1.CryptoKey.pb(k).create_time.nanos)
              for k in keys]
    assert stamps == sorted(stamps)
    assert [k.name for k in keys] == catalog.by_create_time()


@pytest.mark.parametrize("order_by", ORDERS)
def test_key_ring_orders(kms: Client, location: str, order_by: str) -> None:
    created = {}
    for ring_id in ["m", "B", "z", "a", "_x", "0"]:
        created[ring_id] = _micros(kms.create_key_ring(
            request={"parent": location, "key_ring_id": ring_id, "key_ring": {}}, **CALL))
    expected = (sorted(created, key=lambda r: (created[r], r))
                if order_by.startswith("create_time") else sorted(created))
    if order_by.endswith("desc"):
        expected = expected[::-1]
    everything, pages = _walk(kms, "rings", location, 4, order_by=order_by)
    assert [_tail(n) for n in everything] == expected
    assert [len(p.names) for p in pages] == [4, 2]


@pytest.mark.parametrize("order_by", ORDERS)
@pytest.mark.parametrize("page_size", [1, 2, 3, 7])
def test_version_paging_and_order(kms: Client, versioned_key: Any, page_size: int,
                                  order_by: str) -> None:
    key, _ = versioned_key
    everything, pages = _walk(kms, "versions", key, page_size, order_by=order_by)
    # Versions are ordered by their numeric id (which is also creation order), not as
    # strings: .../2 comes before .../10.
    expected = [f"{key}/cryptoKeyVersions/{n}" for n in range(1, 13)]
    assert everything == (expected[::-1] if order_by.endswith("desc") else expected)
    assert all(len(p.names) <= page_size and p.total == 12 for p in pages)
    assert len(pages) == math.ceil(12 / page_size)


@pytest.mark.parametrize("order_by", ["state", "name, create_time", "name descending",
                                      "create_time desc name", "-name", "NAME", "labels"])
@pytest.mark.parametrize("kind", ["rings", "keys", "versions"])
def test_bad_order_by(kms: Client, catalog: Catalog, versioned_key: Any, kind: str,
                      order_by: str) -> None:
    parent = {"rings": catalog.ring.rsplit("/keyRings/", 1)[0], "keys": catalog.ring,
              "versions": versioned_key[0]}[kind]
    with pytest.raises(gexc.InvalidArgument) as caught:
        _page(kms, kind, parent, order_by=order_by)
    assert "order_by" in caught.value.message


# ---- filters ---------------------------------------------------------------------------------

KEY_FILTERS: list[tuple[str, Callable[[str, dict[str, str], str | None], bool]]] = [
    ("purpose=ENCRYPT_DECRYPT", lambda n, lab, s: True),
    ("purpose=MAC", lambda n, lab, s: False),
    ("purpose!=ENCRYPT_DECRYPT", lambda n, lab, s: False),
    ("labels.env=prod", lambda n, lab, s: lab.get("env") == "prod"),
    ("labels.env:*", lambda n, lab, s: "env" in lab),
    ("labels:team", lambda n, lab, s: "team" in lab),
    ("labels.env!=prod", lambda n, lab, s: lab.get("env") != "prod"),
    ("NOT labels.env:*", lambda n, lab, s: "env" not in lab),
    ("name:k1", lambda n, lab, s: "k1" in n),
    ('name:"/cryptoKeys/k"', lambda n, lab, s: "/cryptoKeys/k" in n),
    ("primary.state=ENABLED", lambda n, lab, s: s == "ENABLED"),
    ("primary.state=DISABLED", lambda n, lab, s: s == "DISABLED"),
    ("labels.env=prod AND primary.state=ENABLED",
     lambda n, lab, s: lab.get("env") == "prod" and s == "ENABLED"),
    ("labels.env=prod primary.state=DISABLED",
     lambda n, lab, s: lab.get("env") == "prod" and s == "DISABLED"),
    ("labels.env=prod OR labels.env=dev", lambda n, lab, s: lab.get("env") in ("prod", "dev")),
    ("labels.team=blue OR labels.env=dev AND primary.state=DISABLED",
     lambda n, lab, s: (lab.get("team") == "blue" or lab.get("env") == "dev")
     and s == "DISABLED"),
    # name:TEXT is a substring test on the full resource name.
    ("labels.team:* AND -labels.team=red AND name:Keys/k",
     lambda n, lab, s: "team" in lab and lab["team"] != "red" and "Keys/k" in n),
    ("name:keyRings", lambda n, lab, s: True),
]


@pytest.mark.parametrize(("filter_text", "where"), KEY_FILTERS, ids=[f for f, _ in KEY_FILTERS])
def test_key_filters(kms: Client, catalog: Catalog, filter_text: str,
                     where: Callable[[str, dict[str, str], str | None], bool]) -> None:
    expected = catalog.names(where)
    page = _page(kms, "keys", catalog.ring, filter=filter_text)
    assert page.names == expected
    assert page.total == len(expected)
    # The same through small pages: only matches, each once, total_size constant.
    everything, pages = _walk(kms, "keys", catalog.ring, 2, filter=filter_text)
    assert everything == expected
    assert all(p.total == len(expected) and len(p.names) <= 2 for p in pages)


def test_filters_are_not_vacuous(catalog: Catalog) -> None:
    """Guard for the test data: most filters above select a proper, non-empty subset."""
    sizes = [len(catalog.names(where)) for _, where in KEY_FILTERS]
    proper = [s for s in sizes if 0 < s < len(catalog.keys)]
    assert len(proper) >= len(KEY_FILTERS) - 4  # the all/none cases are deliberate


VERSION_FILTERS: list[tuple[str, set[str]]] = [
    ("state=ENABLED", {"ENABLED"}),
    ("state!=ENABLED", {"DISABLED", "DESTROY_SCHEDULED"}),
    ("state=DISABLED", {"DISABLED"}),
    ("state=DESTROY_SCHEDULED", {"DESTROY_SCHEDULED"}),
    ("state=DESTROYED", set()),
    ("state=DISABLED OR state=DESTROY_SCHEDULED", {"DISABLED", "DESTROY_SCHEDULED"}),
    ("NOT state=DISABLED AND state!=ENABLED", {"DESTROY_SCHEDULED"}),
    ("protection_level=SOFTWARE AND state=ENABLED", {"ENABLED"}),
]


@pytest.mark.parametrize(("filter_text", "wanted"), VERSION_FILTERS,
                         ids=[f for f, _ in VERSION_FILTERS])
@pytest.mark.parametrize("order_by", ["", "create_time desc"])
def test_version_filters(kms: Client, versioned_key: Any, filter_text: str, wanted: set[str],
                         order_by: str) -> None:
    key, states = versioned_key
    expected = [n for n in (f"{key}/cryptoKeyVersions/{i}" for i in range(1, 13))
                if states[n] in wanted]
    if order_by:
        expected.reverse()
    everything, pages = _walk(kms, "versions", key, 3, filter=filter_text, order_by=order_by)
    assert everything == expected
    assert all(p.total == len(expected) for p in pages)


def test_disabled_versions_filter_returns_state(kms: Client, versioned_key: Any) -> None:
    key, _ = versioned_key
    versions = list(kms.list_crypto_key_versions(
        request={"parent": key, "filter": "state=DISABLED"}, **CALL))
    assert [_tail(v.name) for v in versions] == ["2", "5", "11"]
    assert all(v.state == State.DISABLED for v in versions)


def test_key_ring_name_filter(kms: Client, location: str) -> None:
    for ring_id in ("prod-a", "prod-b", "dev-a"):
        kms.create_key_ring(request={"parent": location, "key_ring_id": ring_id,
                                     "key_ring": {}}, **CALL)
    page = _page(kms, "rings", location, filter="name:prod")
    assert [_tail(n) for n in page.names] == ["prod-a", "prod-b"]
    assert page.total == 2
    # OR binds tighter than AND: prod AND (prod-b OR dev). (Terms must not match the
    # random project id in the full name: "-b" would, for a project "p-b...".)
    page = _page(kms, "rings", location, filter="name:prod AND name:prod-b OR name:dev")
    assert [_tail(n) for n in page.names] == ["prod-b"]
    assert _page(kms, "rings", location).total == 3


@pytest.mark.parametrize(("kind", "filter_text", "fragment"), [
    ("keys", "color=red", "'color'"),
    ("keys", "state=ENABLED", "'state'"),  # keys filter on primary.state
    ("keys", "purpose=SIGN", "SIGN"),
    ("keys", "primary.state=ON", "ON"),
    ("keys", "labels=prod", "labels"),
    ("keys", "(labels.env=prod)", "parentheses"),
    ("keys", "labels.env=prod AND", "filter"),
    ("keys", "labels.env", "filter"),
    ("versions", "state=enabled", "enabled"),
    ("versions", "state=BOGUS", "BOGUS"),
    ("versions", "purpose=ENCRYPT_DECRYPT", "'purpose'"),
    ("versions", "state=ENABLED OR OR state=DISABLED", "OR"),
    ("rings", "labels.env=prod", "labels.env"),
    ("rings", "create_time=1", "create_time"),
])
def test_bad_filters(kms: Client, catalog: Catalog, versioned_key: Any, kind: str,
                     filter_text: str, fragment: str) -> None:
    parent = {"rings": catalog.ring.rsplit("/keyRings/", 1)[0], "keys": catalog.ring,
              "versions": versioned_key[0]}[kind]
    with pytest.raises(gexc.InvalidArgument) as caught:
        _page(kms, kind, parent, filter=filter_text)
    assert fragment in caught.value.message


# ---- page tokens --------------------------------------------------------------------------------


def test_page_size_may_change_between_pages(kms: Client, catalog: Catalog) -> None:
    first = _page(kms, "keys", catalog.ring, page_size=2)
    rest = _page(kms, "keys", catalog.ring, page_size=100, page_token=first.token)
    assert first.names + rest.names == catalog.names()
    assert rest.token == ""


def test_bad_page_tokens(kms: Client, catalog: Catalog) -> None:
    token = _page(kms, "keys", catalog.ring, page_size=2).token
    assert token
    bad = [_tamper(token), token[:-1], token[: len(token) // 2], token + "A", token + "=",
           " " + token, "garbage", "AAAA", "!!!", "a" * 5000, "0", "\u00e9"]
    for candidate in bad:
        with pytest.raises(gexc.InvalidArgument) as caught:
            _page(kms, "keys", catalog.ring, page_size=2, page_token=candidate)
        assert "page_token" in caught.value.message, candidate
    # The genuine token still works afterwards.
    assert _page(kms, "keys", catalog.ring, page_size=2, page_token=token).names == (
        catalog.names()[2:4])


def test_token_is_bound_to_its_request(kms: Client, catalog: Catalog, versioned_key: Any,
                                       big_location: str, location: str) -> None:
    token = _page(kms, "keys", catalog.ring, page_size=2, filter="labels.team:*",
                  order_by="name").token
    assert token
    other_ring = kms.create_key_ring(request={"parent": location, "key_ring_id": "other",
                                              "key_ring": {}}, **CALL).name
    misuses: list[tuple[str, str, dict[str, Any]]] = [
        ("keys", catalog.ring, {"filter": "labels.team:blue", "order_by": "name"}),
        ("keys", catalog.ring, {"filter": "", "order_by": "name"}),
        ("keys", catalog.ring, {"filter": "labels.team:*", "order_by": "name desc"}),
        ("keys", catalog.ring, {"filter": "labels.team:*", "order_by": "create_time"}),
        ("keys", catalog.ring, {"filter": "labels.team:*"}),
        ("keys", other_ring, {"filter": "labels.team:*", "order_by": "name"}),
        ("versions", versioned_key[0], {}),
        ("rings", big_location, {}),
        ("rings", catalog.ring.rsplit("/keyRings/", 1)[0], {"order_by": "name"}),
    ]
    for kind, parent, request in misuses:
        with pytest.raises(gexc.InvalidArgument) as caught:
            _page(kms, kind, parent, page_size=2, page_token=token, **request)
        assert "page_token" in caught.value.message, (kind, parent, request)
    # A key ring list token is no good for a crypto key list either.
    ring_token = _page(kms, "rings", big_location, page_size=1).token
    with pytest.raises(gexc.InvalidArgument):
        _page(kms, "keys", catalog.ring, page_token=ring_token)
    # Used as issued, the token continues where it left off.
    again = _page(kms, "keys", catalog.ring, page_size=2, page_token=token,
                  filter="labels.team:*", order_by="name")
    expected = catalog.names(lambda n, lab, s: "team" in lab)
    assert again.names == expected[2:4]


# ---- parents ---------------------------------------------------------------------------------


def test_empty_lists(kms: Client, key_ring: str, crypto_key: str) -> None:
    ring = kms.create_key_ring(request={"parent": key_ring.rsplit("/keyRings/", 1)[0],
                                        "key_ring_id": "empty", "key_ring": {}}, **CALL).name
    assert _page(kms, "keys", ring) == Page([], "", 0)
    assert _page(kms, "keys", ring, filter="labels.env=prod", page_size=1) == Page([], "", 0)
    empty_key = kms.create_crypto_key(request={
        "parent": ring, "crypto_key_id": "k", "skip_initial_version_creation": True,
        "crypto_key": {"purpose": ENCRYPT_DECRYPT}}, **CALL).name
    assert _page(kms, "versions", empty_key) == Page([], "", 0)
    assert _page(kms, "versions", crypto_key).names == [f"{crypto_key}/cryptoKeyVersions/1"]


def test_missing_parents_are_not_found(kms: Client, key_ring: str, project: str) -> None:
    with pytest.raises(gexc.NotFound) as caught:
        _page(kms, "keys", key_ring + "-missing")
    assert key_ring + "-missing" in caught.value.message
    with pytest.raises(gexc.NotFound):
        _page(kms, "versions", f"{key_ring}/cryptoKeys/missing")
    with pytest.raises(gexc.NotFound):
        _page(kms, "rings", f"projects/{project}/locations/mars")
    # A configured location with no key rings yet is simply empty.
    assert _page(kms, "rings", f"projects/{project}-new/locations/global") == Page([], "", 0)


@pytest.mark.parametrize(("kind", "suffix"), [
    ("rings", ""), ("rings", "/keyRings/ring"), ("keys", "/keyRings"),
    ("keys", "/keyRings/ring/cryptoKeys/k"), ("versions", "/keyRings/ring"),
    ("versions", "/keyRings/ring/cryptoKeys/k/cryptoKeyVersions/1"),
])
def test_malformed_parents_are_invalid(kms: Client, location: str, kind: str,
                                       suffix: str) -> None:
    parent = location.rsplit("/locations/", 1)[0] if kind == "rings" and not suffix else (
        location + suffix)
    with pytest.raises(gexc.InvalidArgument) as caught:
        _page(kms, kind, parent)
    assert "parent" in caught.value.message
