"""Bad settings stop `valv central` at once with one clear line, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize(("flags", "fragment"), [
    (["--default-rotation-period", "99999999999d"], "too long"),
    (["--default-rotation-period", "12h"], "between 24h and 100 years"),
    (["--key-cache-ttl", "2m"], "60s maximum"),
    (["--key-cache-ttl", "soon"], "not a duration"),
    (["--min-destroy-duration", "200d"], "120-day maximum"),
    (["--scheduler-interval", "-1"], "not a duration"),
])
def test_bad_settings_exit_2_with_one_line(tmp_path: Path, flags: list[str],
                                           fragment: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "valv", "central", "--addr", "127.0.0.1:0",
         "--data-dir", str(tmp_path), *flags], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1
