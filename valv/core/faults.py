"""Test-only fault injection: kill the process at a named point.

Set ``VALV_FAULT_POINT=<name>`` in a test's environment and the process
SIGKILLs itself when it reaches that point, as a crash or ``kill -9`` would,
so tests can show that a crash at the worst moment leaves storage
consistent. Unset (always, in production) this costs one comparison.

Points:
- ``rotate.mid-transaction``: a rotation has written the new version and its
  key material but not yet the key's new primary and schedule.
- ``destroy.mid-transaction``: a destruction has erased the key material but
  not yet marked the version DESTROYED.
- ``rmk-rotate.mid-batch``: ``valv rmk rotate`` has rewritten part of a batch
  (after at least one batch committed) and not yet committed it.
"""

from __future__ import annotations

import os
import signal

_ACTIVE = os.environ.get("VALV_FAULT_POINT") or None


def fault_point(name: str) -> None:
    if _ACTIVE is not None and _ACTIVE == name:
        os.kill(os.getpid(), signal.SIGKILL)
