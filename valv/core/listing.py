"""List requests: filters, ordering and page tokens.

Filters are the subset of AIP-160 that Cloud KMS documents for its List
methods: terms ``field = value``, ``field != value`` and ``field : value``
("has"), optionally negated with ``NOT`` or ``-``, joined by ``OR`` (binds
tighter) and ``AND`` (or plain whitespace). Parentheses are not supported.

Page tokens are opaque to callers and tamper-evident: the position to resume
from plus the request's parent, filter and order, authenticated with an HMAC
whose key is derived from the root master key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from valv.core.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 1000
MAX_PAGE_SIZE = 1000

# A field getter returns, for one item, a string, a label map, or None.
FieldValue = str | Mapping[str, str] | None
FieldGetter = Callable[[Any], FieldValue]


# ---- filters ----------------------------------------------------------------

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<op>!=|=|:)
      | (?P<quoted>"(?:[^"\\]|\\.)*")
      | (?P<word>[^\s=!:"()]+)
      | (?P<paren>[()])
    )""",
    re.VERBOSE,
)


@dataclass(frozen=True, slots=True)
class _Term:
    field: str
    op: str
    value: str
    negated: bool


def _tokenize(text: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        match = _TOKEN.match(text, pos)
        if match is None:
            raise InvalidArgument(f"filter {text!r} could not be parsed near position {pos}")
        kind = match.lastgroup or ""
        value = match.group(kind)
        if kind == "paren":
            raise InvalidArgument(f"filter {text!r}: parentheses are not supported")
        if kind == "quoted":
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        tokens.append((kind, value))
        pos = match.end()
    return tokens


class Filter:
    """A parsed filter, checked against the fields an item type has."""

    def __init__(self, text: str, fields: Mapping[str, FieldGetter],
                 enum_values: Mapping[str, frozenset[str]]) -> None:
        self.text = text
        self._fields = fields
        # groups: AND over groups, OR within a group.
        self._groups: list[list[_Term]] = []
        tokens = _tokenize(text)
        i = 0
        group: list[_Term] = []
        expect_term = True
        while i < len(tokens):
            kind, value = tokens[i]
            if kind == "word" and value in ("AND", "OR"):
                if expect_term:
                    raise InvalidArgument(f"filter {text!r}: {value} must join two terms")
                if value == "AND":
                    self._groups.append(group)
                    group = []
                expect_term = True
                i += 1
                continue
            if not expect_term:  # juxtaposition means AND
                self._groups.append(group)
                group = []
            negated = False
            if kind == "word" and value == "NOT":
                negated = True
                i += 1
            elif kind == "word" and value.startswith("-") and len(value) > 1:
                negated = True
                tokens[i] = (kind, value[1:])
            if i + 3 > len(tokens):
                raise InvalidArgument(f"filter {text!r}: expected a term of the form field=value")
            field_kind, field_name = tokens[i]
            op_kind, op = tokens[i + 1]
            value_kind, term_value = tokens[i + 2]
            if field_kind != "word" or op_kind != "op" or value_kind not in ("word", "quoted"):
                raise InvalidArgument(f"filter {text!r}: expected a term of the form field=value")
            group.append(self._term(field_name, op, term_value, negated, enum_values))
            expect_term = False
            i += 3
        if expect_term and (tokens or group):
            raise InvalidArgument(f"filter {text!r} ends where a term was expected")
        if group:
            self._groups.append(group)

    def _term(self, field: str, op: str, value: str, negated: bool,
              enum_values: Mapping[str, frozenset[str]]) -> _Term:
        base = field.split(".", 1)[0] if field.startswith("labels.") else field
        if base not in self._fields:
            known = ", ".join(sorted(f + (".KEY" if f == "labels" else "")
                                     for f in self._fields))
            raise InvalidArgument(
                f"filter field {field!r} is not supported; filterable fields are: {known}"
            )
        if field == "labels" and op != ":":
            raise InvalidArgument("filter on labels must be labels.KEY=VALUE or labels:KEY")
        allowed = enum_values.get(field)
        if allowed is not None and op != ":" and value not in allowed:
            raise InvalidArgument(
                f"filter value {value!r} is not valid for {field}; use one of: "
                + ", ".join(sorted(allowed))
            )
        return _Term(field, op, value, negated)

    def matches(self, item: Any) -> bool:
        return all(any(self._eval(term, item) for term in group) for group in self._groups)

    def _eval(self, term: _Term, item: Any) -> bool:
        if term.field.startswith("labels."):
            labels = self._fields["labels"](item)
            assert isinstance(labels, Mapping)
            label = labels.get(term.field[len("labels."):])
            if term.op == ":":
                result = label is not None and (term.value == "*" or term.value in label)
            else:
                result = label == term.value
                if term.op == "!=":
                    result = not result
        elif term.field == "labels":
            labels = self._fields["labels"](item)
            assert isinstance(labels, Mapping)
            result = term.value in labels
        else:
            actual = self._fields[term.field](item)
            actual_text = "" if actual is None else str(actual)
            if term.op == ":":
                if term.value == "*":
                    result = actual is not None
                else:
                    result = term.value in actual_text
            elif term.op == "=":
                result = actual_text == term.value
            else:
                result = actual_text != term.value
        return result != term.negated


# ---- order_by ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Order:
    field: str  # "name" or "create_time"
    descending: bool


def parse_order_by(text: str) -> Order:
    words = text.replace(",", " , ").split()
    if not words:
        return Order("name", False)
    if "," in words:
        raise InvalidArgument(
            f"order_by {text!r}: ordering by more than one field is not supported"
        )
    if words[0] not in ("name", "create_time") or len(words) > 2:
        raise InvalidArgument(
            f"order_by {text!r} is not supported; use 'name' or 'create_time', "
            "optionally followed by 'asc' or 'desc'"
        )
    direction = words[1].lower() if len(words) == 2 else "asc"
    if direction not in ("asc", "desc"):
        raise InvalidArgument(f"order_by {text!r}: direction must be 'asc' or 'desc'")
    return Order(words[0], direction == "desc")


def check_page_size(page_size: int) -> int:
    if page_size < 0:
        raise InvalidArgument(f"page_size must not be negative (got {page_size})")
    if page_size == 0:
        return DEFAULT_PAGE_SIZE
    return min(page_size, MAX_PAGE_SIZE)


# ---- page tokens -------------------------------------------------------------

_TOKEN_MAC_BYTES = 16
# Tokens are unpadded urlsafe base64; anything else (padding, whitespace, other
# characters, non-canonical trailing bits) is rejected, so a token has one spelling.
_TOKEN_TEXT = re.compile(r"[A-Za-z0-9_-]+")


class PageTokens:
    """Issues and checks page tokens bound to one list request's shape."""

    def __init__(self, mac_key: bytes) -> None:
        self._mac_key = bytes(mac_key)

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self._mac_key, body, hashlib.sha256).digest()[:_TOKEN_MAC_BYTES]

    @staticmethod
    def _context(parent: str, filter_text: str, order_by: str) -> str:
        return hashlib.sha256(
            json.dumps([parent, filter_text, order_by]).encode()
        ).hexdigest()[:32]

    def issue(self, *, parent: str, filter_text: str, order_by: str, position: bytes) -> str:
        body = json.dumps(
            {"c": self._context(parent, filter_text, order_by), "p": position.hex()},
            separators=(",", ":"),
        ).encode()
        return base64.urlsafe_b64encode(body + self._mac(body)).decode().rstrip("=")

    def resume_position(self, token: str, *, parent: str, filter_text: str,
                        order_by: str) -> bytes:
        """The position a token resumes after; InvalidArgument if it is not ours."""
        bad = InvalidArgument(
            "page_token is invalid: pass a next_page_token from a previous response "
            "of the same List call, unchanged"
        )
        if not isinstance(token, str) or _TOKEN_TEXT.fullmatch(token) is None:
            raise bad
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (ValueError, TypeError):
            raise bad from None
        if base64.urlsafe_b64encode(raw).decode().rstrip("=") != token:
            raise bad
        if len(raw) <= _TOKEN_MAC_BYTES:
            raise bad
        body, mac = raw[:-_TOKEN_MAC_BYTES], raw[-_TOKEN_MAC_BYTES:]
        if not hmac.compare_digest(mac, self._mac(body)):
            raise bad
        data = json.loads(body)
        if data.get("c") != self._context(parent, filter_text, order_by):
            raise InvalidArgument(
                "page_token was issued for a different parent, filter or order_by; "
                "repeat the request with the same values, or start again without a page_token"
            )
        return bytes.fromhex(data["p"])
