"""Property tests for resource names (valv.core.names): no server needed."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from valv.core import names
from valv.core.errors import InvalidArgument

ids = st.from_regex(r"[a-zA-Z0-9_-]{1,63}", fullmatch=True)
version_ids = st.integers(min_value=1, max_value=2**32 - 1)

_ID = r"[a-zA-Z0-9_-]{1,63}"
_VER = r"[1-9][0-9]{0,9}"
# An independent statement of each name grammar, used as the oracle.
GRAMMAR: dict[str, tuple[Callable[..., Any], re.Pattern[str]]] = {
    "project": (names.parse_project, re.compile(rf"projects/{_ID}")),
    "location": (names.parse_location, re.compile(rf"projects/{_ID}/locations/{_ID}")),
    "key ring": (names.parse_key_ring,
                 re.compile(rf"projects/{_ID}/locations/{_ID}/keyRings/{_ID}")),
    "crypto key": (names.parse_crypto_key, re.compile(
        rf"projects/{_ID}/locations/{_ID}/keyRings/{_ID}/cryptoKeys/{_ID}")),
    "crypto key version": (names.parse_crypto_key_version, re.compile(
        rf"projects/{_ID}/locations/{_ID}/keyRings/{_ID}/cryptoKeys/{_ID}"
        rf"/cryptoKeyVersions/{_VER}")),
}
PARSERS = [parse for parse, _ in GRAMMAR.values()]


def _oracle_accepts(kind: str, text: str) -> bool:
    _, pattern = GRAMMAR[kind]
    if pattern.fullmatch(text) is None:
        return False
    if kind == "crypto key version":
        return int(text.rsplit("/", 1)[1]) <= 2**32 - 1
    return True


@st.composite
def any_name(draw: st.DrawFn) -> Any:
    p, loc, r, k = draw(ids), draw(ids), draw(ids), draw(ids)
    return draw(st.sampled_from([
        names.ProjectName(p),
        names.LocationName(p, loc),
        names.KeyRingName(p, loc, r),
        names.CryptoKeyName(p, loc, r, k),
        names.CryptoKeyVersionName(p, loc, r, k, draw(version_ids)),
    ]))


_PARSER_OF = {
    names.ProjectName: names.parse_project,
    names.LocationName: names.parse_location,
    names.KeyRingName: names.parse_key_ring,
    names.CryptoKeyName: names.parse_crypto_key,
    names.CryptoKeyVersionName: names.parse_crypto_key_version,
}


# ---- round trips ----------------------------------------------------------------------


@given(any_name())
def test_format_then_parse_is_identity(name: Any) -> None:
    text = str(name)
    parsed = _PARSER_OF[type(name)](text)
    assert parsed == name
    assert str(parsed) == text


@given(ids, ids, ids, ids, version_ids)
def test_builders_agree_with_parsers(p: str, loc: str, r: str, k: str, v: int) -> None:
    location = names.parse_location(f"projects/{p}/locations/{loc}")
    ring = location.key_ring(r)
    key = ring.crypto_key(k)
    version = key.version(v)
    assert str(ring) == f"projects/{p}/locations/{loc}/keyRings/{r}"
    assert str(key) == f"{ring}/cryptoKeys/{k}"
    assert str(version) == f"{key}/cryptoKeyVersions/{v}"
    assert names.parse_crypto_key_version(str(version)) == version
    assert version.parent == key and key.parent == ring and ring.parent == location
    assert names.parse_key_or_version(str(key)) == key
    assert names.parse_key_or_version(str(version)) == version


@given(ids)
def test_valid_ids(value: str) -> None:
    assert names.is_valid_id(value)
    assert names.check_id(value, "key_ring_id") == value


# ---- rejection --------------------------------------------------------------------------


@given(st.text())
@example("")
@example("projects/p/locations/l/keyRings/r/cryptoKeys/k/cryptoKeyVersions/0")
@example("projects/p/locations/l/keyRings/r/cryptoKeys/k/cryptoKeyVersions/01")
@example("projects/p/locations/l/keyRings/r/cryptoKeys/k/cryptoKeyVersions/4294967296")
@example("projects/p/locations/l/keyRings/r/cryptoKeys/k/cryptoKeyVersions/1\n")
@example("projects/p/locations/l/keyRings/r/cryptoKeys/k/cryptoKeyVersions/\u0661")
@example("projects/p/locations/l/keyRings/r/cryptoKeys/k/")
@example("projects/p/locations/l/keyrings/r")
def test_arbitrary_text_parses_iff_it_matches_the_grammar(text: str) -> None:
    for kind, (parse, _) in GRAMMAR.items():
        if _oracle_accepts(kind, text):
            assert str(parse(text)) == text
        else:
            with pytest.raises(InvalidArgument):
                parse(text)


_SEGMENT_EDITS = st.sampled_from([
    "", "a" * 64, "a/b", ".", "..", "a.b", "é", "k\u00e9y", "a b", "a\n", "\u0661", "%2F",
])


@given(any_name(), st.data())
def test_replacing_any_segment_with_a_bad_id_is_invalid(name: Any, data: st.DataObject) -> None:
    parts = str(name).split("/")
    index = data.draw(st.integers(0, len(parts) - 1))
    if index % 2 == 0:  # a collection word
        replacement = data.draw(st.sampled_from(
            ["project", "Projects", "location", "keyrings", "KeyRings", "cryptokeys",
             "cryptoKey", "versions", "cryptoKeyVersion", ""]))
    elif index == 9:  # the version id
        replacement = data.draw(st.sampled_from(
            ["0", "01", "00", "abc", "-1", "+1", "1.0", "1e3", "4294967296", "99999999999",
             " 1", "", "\u0661"]))
    else:
        replacement = data.draw(_SEGMENT_EDITS)
    parts[index] = replacement
    with pytest.raises(InvalidArgument):
        _PARSER_OF[type(name)]("/".join(parts))


@given(any_name(), st.sampled_from(["/", "/x", "/x/y", "/cryptoKeys/k"]))
def test_extra_segments_are_invalid(name: Any, suffix: str) -> None:
    with pytest.raises(InvalidArgument):
        _PARSER_OF[type(name)](str(name) + suffix)


@given(any_name())
def test_a_name_of_one_kind_is_not_a_name_of_another(name: Any) -> None:
    own = _PARSER_OF[type(name)]
    for parse in PARSERS:
        if parse is not own:
            with pytest.raises(InvalidArgument):
                parse(str(name))


@given(st.one_of(st.none(), st.integers(), st.binary(), st.lists(st.text(), max_size=2)))
def test_non_strings_are_invalid_argument(value: Any) -> None:
    for parse in [*PARSERS, names.parse_key_or_version]:
        with pytest.raises(InvalidArgument):
            parse(value)


@given(st.text())
def test_parse_key_or_version_only_raises_invalid_argument(text: str) -> None:
    try:
        parsed = names.parse_key_or_version(text)
    except InvalidArgument:
        return
    assert isinstance(parsed, names.CryptoKeyName | names.CryptoKeyVersionName)
    assert str(parsed) == text


@given(st.text())
def test_check_id_accepts_exactly_the_id_pattern(value: str) -> None:
    if re.fullmatch(r"[a-zA-Z0-9_-]{1,63}", value):
        assert names.check_id(value, "crypto_key_id") == value
    else:
        with pytest.raises(InvalidArgument) as caught:
            names.check_id(value, "crypto_key_id")
        assert "crypto_key_id" in caught.value.message


@pytest.mark.parametrize("bad", ["", "a" * 64, "a/b", "a.b", "é", "a b"])
def test_check_id_message_names_the_field_and_the_rule(bad: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        names.check_id(bad, "key_ring_id")
    assert "key_ring_id" in caught.value.message
    assert "[a-zA-Z0-9_-]" in caught.value.message


def test_boundary_ids_and_versions() -> None:
    assert names.is_valid_id("a" * 63) and not names.is_valid_id("a" * 64)
    base = "projects/p/locations/l/keyRings/r/cryptoKeys/k/cryptoKeyVersions/"
    assert names.parse_crypto_key_version(base + "4294967295").version == 2**32 - 1
    assert names.parse_crypto_key_version(base + "1").version == 1
    with pytest.raises(InvalidArgument):
        names.parse_crypto_key_version(base + "4294967296")


def test_error_message_names_the_field() -> None:
    with pytest.raises(InvalidArgument) as caught:
        names.parse_key_ring("projects/p/locations/l/rings/r", "parent")
    assert caught.value.message.startswith("parent ")
    assert "projects/{project}/locations/{location}/keyRings/{key_ring}" in caught.value.message
    with pytest.raises(InvalidArgument) as caught:
        names.parse_crypto_key("", "crypto_key.name")
    assert "crypto_key.name is required" in caught.value.message


_NEAR_SEGMENTS = st.one_of(
    st.sampled_from(["projects", "locations", "keyRings", "cryptoKeys", "cryptoKeyVersions",
                     "keyrings", "", "0", "01", "1", "4294967295", "4294967296", "a.b", "é"]),
    ids,
    version_ids.map(str),
)


@given(st.lists(_NEAR_SEGMENTS, min_size=1, max_size=11))
def test_near_miss_names_are_judged_like_the_grammar(segments: list[str]) -> None:
    text = "/".join(segments)
    for kind, (parse, _) in GRAMMAR.items():
        if _oracle_accepts(kind, text):
            assert str(parse(text)) == text
        else:
            with pytest.raises(InvalidArgument):
                parse(text)
