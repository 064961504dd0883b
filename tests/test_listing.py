"""Property tests for list requests (valv.core.listing): no server needed."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from valv.core.errors import InvalidArgument
from valv.core.listing import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    Filter,
    Order,
    PageTokens,
    check_page_size,
    parse_order_by,
)

KEY = bytes(range(32))
TOKENS = PageTokens(KEY)

contexts = st.tuples(st.text(max_size=80), st.text(max_size=80), st.text(max_size=40))
positions = st.binary(max_size=200)


def _issue(ctx: tuple[str, str, str], position: bytes, tokens: PageTokens = TOKENS) -> str:
    parent, filter_text, order_by = ctx
    return tokens.issue(parent=parent, filter_text=filter_text, order_by=order_by,
                        position=position)


def _resume(token: str, ctx: tuple[str, str, str], tokens: PageTokens = TOKENS) -> bytes:
    parent, filter_text, order_by = ctx
    return tokens.resume_position(token, parent=parent, filter_text=filter_text,
                                  order_by=order_by)


# ---- page tokens --------------------------------------------------------------------------


@given(contexts, positions)
def test_token_round_trip(ctx: tuple[str, str, str], position: bytes) -> None:
    token = _issue(ctx, position)
    assert _resume(token, ctx) == position
    # Tokens are printable and safe to put in a URL query unescaped.
    assert token and all(c.isalnum() or c in "-_" for c in token)


@given(contexts, positions, st.data())
def test_any_single_bit_flip_of_the_token_text_is_rejected(
        ctx: tuple[str, str, str], position: bytes, data: st.DataObject) -> None:
    token = _issue(ctx, position)
    i = data.draw(st.integers(0, len(token) - 1))
    bit = data.draw(st.integers(0, 7))
    tampered = token[:i] + chr(ord(token[i]) ^ (1 << bit)) + token[i + 1:]
    with pytest.raises(InvalidArgument):
        _resume(tampered, ctx)


def test_every_bit_flip_of_one_token_is_rejected() -> None:
    """Exhaustive on one token of each length class mod 4 (covers the padding bits)."""
    for position in (b"", b"\x01", b"\x01\x02", b"\x01\x02\x03"):
        ctx = ("projects/p/locations/global", "", "")
        token = _issue(ctx, position)
        for i in range(len(token)):
            for bit in range(8):
                tampered = token[:i] + chr(ord(token[i]) ^ (1 << bit)) + token[i + 1:]
                with pytest.raises(InvalidArgument):
                    _resume(tampered, ctx)


@given(contexts, positions, st.data())
def test_any_bit_flip_of_the_token_bytes_is_rejected(
        ctx: tuple[str, str, str], position: bytes, data: st.DataObject) -> None:
    token = _issue(ctx, position)
    raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] ^= 1 << data.draw(st.integers(0, 7))
    tampered = base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("=")
    with pytest.raises(InvalidArgument):
        _resume(tampered, ctx)


@given(contexts, positions, st.data())
def test_any_truncation_is_rejected(ctx: tuple[str, str, str], position: bytes,
                                    data: st.DataObject) -> None:
    token = _issue(ctx, position)
    cut = data.draw(st.integers(0, len(token) - 1))
    from_front = data.draw(st.booleans())
    with pytest.raises(InvalidArgument):
        _resume(token[cut + 1:] if from_front else token[:cut], ctx)


@given(contexts, positions, st.text(min_size=1, max_size=20), st.booleans())
@example(("p", "", ""), b"\x01\x02", "=", False)
@example(("p", "", ""), b"\x01\x02", "==", False)
@example(("p", "", ""), b"\x01\x02", " ", True)
@example(("p", "", ""), b"\x01\x02", "\n", False)
@example(("p", "", ""), b"", "A", False)
def test_any_extension_is_rejected(ctx: tuple[str, str, str], position: bytes, extra: str,
                                   in_front: bool) -> None:
    token = _issue(ctx, position)
    with pytest.raises(InvalidArgument):
        _resume(extra + token if in_front else token + extra, ctx)


@given(contexts, positions, st.data())
def test_inserting_any_character_is_rejected(ctx: tuple[str, str, str], position: bytes,
                                             data: st.DataObject) -> None:
    token = _issue(ctx, position)
    i = data.draw(st.integers(0, len(token)))
    char = data.draw(st.characters())
    with pytest.raises(InvalidArgument):
        _resume(token[:i] + char + token[i:], ctx)


@given(st.text(max_size=300), contexts)
@example("AAAA", ("p", "", ""))
@example("A" * 200, ("p", "", ""))
def test_random_strings_are_rejected(garbage: str, ctx: tuple[str, str, str]) -> None:
    with pytest.raises(InvalidArgument):
        _resume(garbage, ctx)


@given(st.binary(min_size=17, max_size=300), contexts)
def test_well_formed_base64_without_our_mac_is_rejected(raw: bytes,
                                                        ctx: tuple[str, str, str]) -> None:
    token = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    with pytest.raises(InvalidArgument):
        _resume(token, ctx)


@given(contexts, contexts, positions)
def test_token_is_bound_to_parent_filter_and_order(issued_for: tuple[str, str, str],
                                                   used_with: tuple[str, str, str],
                                                   position: bytes) -> None:
    token = _issue(issued_for, position)
    if used_with == issued_for:
        assert _resume(token, used_with) == position
    else:
        with pytest.raises(InvalidArgument) as caught:
            _resume(token, used_with)
        assert "different parent, filter or order_by" in caught.value.message


@pytest.mark.parametrize("changed", [0, 1, 2])
def test_each_bound_field_matters(changed: int) -> None:
    ctx = ["projects/p/locations/global", "name:a", "name desc"]
    token = _issue(tuple(ctx), b"pos")  # type: ignore[arg-type]
    ctx[changed] += "x"
    with pytest.raises(InvalidArgument):
        _resume(token, tuple(ctx))  # type: ignore[arg-type]


@given(contexts, positions)
def test_token_from_another_key_is_rejected(ctx: tuple[str, str, str], position: bytes) -> None:
    token = _issue(ctx, position, PageTokens(bytes(32)))
    with pytest.raises(InvalidArgument) as caught:
        _resume(token, ctx)
    assert "page_token" in caught.value.message


# ---- filters ------------------------------------------------------------------------------


@dataclass
class Item:
    name: str
    state: str = "ENABLED"
    purpose: str = "ENCRYPT_DECRYPT"
    labels: dict[str, str] = field(default_factory=dict)


FIELDS = {
    "name": lambda i: i.name,
    "state": lambda i: i.state,
    "purpose": lambda i: i.purpose,
    "labels": lambda i: i.labels,
}
ENUMS = {
    "state": frozenset({"ENABLED", "DISABLED", "DESTROYED", "DESTROY_SCHEDULED"}),
    "purpose": frozenset({"ENCRYPT_DECRYPT", "ASYMMETRIC_SIGN", "MAC"}),
}
ITEMS = [
    Item("projects/p/keyRings/r/cryptoKeys/alpha", labels={"env": "prod", "team": "a"}),
    Item("projects/p/keyRings/r/cryptoKeys/beta", state="DISABLED", labels={"env": "dev"}),
    Item("projects/p/keyRings/r/cryptoKeys/gamma", state="DESTROYED"),
    Item("projects/p/keyRings/r/cryptoKeys/delta", purpose="MAC", labels={"team": "b"}),
]


def _select(text: str) -> list[str]:
    flt = Filter(text, FIELDS, ENUMS)
    return [item.name.rsplit("/", 1)[1] for item in ITEMS if flt.matches(item)]


@pytest.mark.parametrize(("text", "expected"), [
    ("", ["alpha", "beta", "gamma", "delta"]),
    ("state=ENABLED", ["alpha", "delta"]),
    ("state = ENABLED", ["alpha", "delta"]),
    ("state!=ENABLED", ["beta", "gamma"]),
    ("NOT state=ENABLED", ["beta", "gamma"]),
    ("-state=ENABLED", ["beta", "gamma"]),
    ("purpose=ENCRYPT_DECRYPT", ["alpha", "beta", "gamma"]),
    ("purpose=MAC", ["delta"]),
    ("labels.env=prod", ["alpha"]),
    ("labels.env!=prod", ["beta", "gamma", "delta"]),
    ("labels.env:*", ["alpha", "beta"]),
    ("labels:team", ["alpha", "delta"]),
    ("labels.env:pro", ["alpha"]),
    ("name:alph", ["alpha"]),
    ("name:a", ["alpha", "beta", "gamma", "delta"]),
    ('name:"et"', ["beta"]),
    ("name:*", ["alpha", "beta", "gamma", "delta"]),
    ("state=ENABLED AND labels.env=prod", ["alpha"]),
    ("state=ENABLED labels.env=prod", ["alpha"]),
    ("state=DISABLED OR state=DESTROYED", ["beta", "gamma"]),
    # OR binds tighter than AND.
    ("purpose=ENCRYPT_DECRYPT AND state=DISABLED OR labels.env=prod", ["alpha", "beta"]),
    ("labels.env=prod OR labels.env=dev AND state!=ENABLED", ["beta"]),
    ("state=DESTROYED OR purpose=MAC AND name:a", ["gamma", "delta"]),
])
def test_filter_semantics(text: str, expected: list[str]) -> None:
    assert _select(text) == expected


@pytest.mark.parametrize(("text", "fragment"), [
    ("color=red", "'color'"),
    ("state=ENABLD", "ENABLED"),
    ("state!=bogus", "state"),
    ("purpose=encrypt_decrypt", "purpose"),
    ("(state=ENABLED)", "parentheses"),
    ("state=", "field=value"),
    ("state", "field=value"),
    ("=ENABLED", ""),
    ("AND state=ENABLED", "AND"),
    ("state=ENABLED AND", ""),
    ("state=ENABLED OR", ""),
    ("state=ENABLED AND AND state=DISABLED", "AND"),
    ("NOT", ""),
    ("labels=prod", "labels"),
    ('name:"unterminated', ""),
    ("state==ENABLED", ""),
    ("state ! ENABLED", ""),
])
def test_bad_filters_are_invalid_argument(text: str, fragment: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        Filter(text, FIELDS, ENUMS)
    assert fragment in caught.value.message


@given(st.text(max_size=200))
@example("labels.=x")
@example('name:"\\\n"')
@example("- -")
@example("NOT NOT state=ENABLED")
def test_filter_parser_only_ever_raises_invalid_argument(text: str) -> None:
    try:
        flt = Filter(text, FIELDS, ENUMS)
    except InvalidArgument:
        return
    for item in ITEMS:
        assert isinstance(flt.matches(item), bool)


_WORDS = st.sampled_from([
    "state", "purpose", "name", "labels", "labels.env", "labels.team", "=", "!=", ":", "AND",
    "OR", "NOT", "-state", "ENABLED", "DISABLED", "MAC", "prod", "*", '"a b"', "(", ")", "x",
])


@given(st.lists(_WORDS, max_size=12))
def test_filter_parser_on_token_soup_only_raises_invalid_argument(words: list[str]) -> None:
    text = " ".join(words)
    try:
        flt = Filter(text, FIELDS, ENUMS)
    except InvalidArgument:
        return
    for item in ITEMS:
        assert isinstance(flt.matches(item), bool)


@given(st.sampled_from(sorted(ENUMS["state"])), st.sampled_from(sorted(ENUMS["state"])))
def test_or_of_states_is_a_union(a: str, b: str) -> None:
    union = set(_select(f"state={a} OR state={b}"))
    assert union == set(_select(f"state={a}")) | set(_select(f"state={b}"))
    assert set(_select(f"state={a} AND state!={a}")) == set()


# ---- order_by and page_size -----------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("", Order("name", False)),
    ("name", Order("name", False)),
    ("name asc", Order("name", False)),
    ("name desc", Order("name", True)),
    ("  name   DESC ", Order("name", True)),
    ("create_time", Order("create_time", False)),
    ("create_time desc", Order("create_time", True)),
])
def test_order_by(text: str, expected: Order) -> None:
    assert parse_order_by(text) == expected


@pytest.mark.parametrize("text", [
    "state", "name down", "name desc extra", "name, create_time", "create_time,name", "desc",
    "Name", "-name",
])
def test_bad_order_by_is_invalid_argument(text: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_order_by(text)
    assert "order_by" in caught.value.message


@given(st.text(max_size=60))
def test_order_by_parser_only_ever_raises_invalid_argument(text: str) -> None:
    try:
        order = parse_order_by(text)
    except InvalidArgument:
        return
    assert order.field in ("name", "create_time")


@given(st.integers(min_value=-(2**31), max_value=2**31 - 1))
def test_page_size(page_size: int) -> None:
    if page_size < 0:
        with pytest.raises(InvalidArgument) as caught:
            check_page_size(page_size)
        assert "page_size" in caught.value.message
    elif page_size == 0:
        assert check_page_size(page_size) == DEFAULT_PAGE_SIZE == 1000
    else:
        assert check_page_size(page_size) == min(page_size, MAX_PAGE_SIZE)
        assert MAX_PAGE_SIZE == 1000
