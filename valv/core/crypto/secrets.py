"""A small holder for secret bytes that never prints them.

:class:`SecretBytes` keeps key material in a private ``bytearray`` so it can
be overwritten in place with :meth:`SecretBytes.zeroize` or by leaving a
``with`` block. It is deliberately *not* wiped on garbage collection: a
``view()`` does not keep its owner alive, so wiping on collection would turn
``AESGCM(make_key().view())`` into a silent all-zero key. Owners that hold
secrets long-term (``RootKey``, ``RootKeyring``) wipe their private copies
when they are collected, since they never hand out views of them.

Limits, stated honestly: Python and the ``cryptography`` package make their
own copies of key bytes (``bytes(...)`` results, the key held inside an
``AESGCM`` object, HKDF outputs). Those copies are immutable and cannot be
zeroized. We bound their lifetime instead: they are short-lived locals, or
live in bounded caches with a TTL. ``SecretBytes`` is about keeping the
long-lived copy wipeable and keeping secrets out of logs, reprs and pickles.
"""

from __future__ import annotations

import hmac
from types import TracebackType
from typing import NoReturn

__all__ = ["SecretBytes"]

BytesLike = bytes | bytearray | memoryview


class SecretBytes:
    """Mutable, zeroizable secret bytes with a redacted repr.

    * ``bytes(s)`` returns a copy (immutable, not zeroizable: keep it local);
      it raises ``ValueError`` once the object has been zeroized.
    * ``s.view()`` returns a read-only ``memoryview`` over the live buffer,
      with no copy. It reflects a later :meth:`zeroize` (reads then see zeros),
      so do not keep it past the owner's lifetime.
    * Equality with another ``SecretBytes`` or a bytes-like object is
      constant-time (``hmac.compare_digest``). Instances are unhashable, so
      they cannot end up as dict keys or set members by accident.
    * Pickling is refused.
    """

    __slots__ = ("__weakref__", "_buf", "_zeroized")

    def __init__(self, data: BytesLike | SecretBytes) -> None:
        if isinstance(data, SecretBytes):
            self._buf = bytearray(data._checked())
        elif isinstance(data, bytes | bytearray | memoryview):
            self._buf = bytearray(data)
        else:
            raise TypeError(f"SecretBytes needs bytes-like data, not {type(data).__name__}")
        self._zeroized = False

    # -- access ---------------------------------------------------------------

    def _checked(self) -> bytearray:
        if self._zeroized:
            raise ValueError("this SecretBytes has been zeroized and can no longer be used")
        return self._buf

    def view(self) -> memoryview:
        """A read-only view of the live buffer (no copy)."""
        return memoryview(self._checked()).toreadonly()

    def __bytes__(self) -> bytes:
        # Copy first, then check the flag. zeroize() sets the flag *before* it
        # overwrites the buffer, so a copy that could contain zeros is always
        # followed by a failed check: we never hand out a zeroed key as real.
        copy = bytes(self._buf)
        if self._zeroized:
            raise ValueError("this SecretBytes has been zeroized and can no longer be used")
        return copy

    def __len__(self) -> int:
        return len(self._buf)

    @property
    def zeroized(self) -> bool:
        """True once :meth:`zeroize` has run."""
        return self._zeroized

    # -- wiping ---------------------------------------------------------------

    def zeroize(self) -> None:
        """Overwrite the buffer with zeros in place. Idempotent."""
        self._zeroized = True
        n = len(self._buf)
        if n:
            self._buf[:] = bytes(n)

    def __enter__(self) -> SecretBytes:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.zeroize()

    # -- comparisons and printing ---------------------------------------------

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SecretBytes):
            return hmac.compare_digest(self._checked(), other._checked())
        if isinstance(other, bytes | bytearray | memoryview):
            return hmac.compare_digest(self._checked(), other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        if self._zeroized:
            return "SecretBytes(<zeroized>)"
        return f"SecretBytes(<{len(self._buf)} bytes redacted>)"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("SecretBytes cannot be pickled")
