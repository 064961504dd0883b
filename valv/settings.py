"""Command-line flags that fall back to environment variables.

Every Valv setting can be given as a flag or as an env var with the same
meaning; the flag wins. ``--help`` shows both and the default.
"""

from __future__ import annotations

import argparse
import os
import re
from datetime import timedelta
from typing import Any


def env_flag(parser: argparse.ArgumentParser, flag: str, env: str, *, default: Any = None,
             help: str, **kwargs: Any) -> None:
    """Add ``flag``, whose default comes from ``env`` (if set) or ``default``."""
    shown = "" if default is None else f"; default: {default}"
    parser.add_argument(flag, default=os.environ.get(env, default),
                        help=f"{help} [env {env}{shown}]", **kwargs)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> timedelta | None:
    """'30d', '12h', '90m', '45s' or plain seconds; 'off'/'0' mean no duration."""
    if text.strip().lower() in ("off", "none", "0", "disabled"):
        return None
    match = _DURATION.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration; use e.g. 30d, 12h, 90m, 45s or 'off'"
        )
    try:
        return timedelta(seconds=float(match.group(1)) * _UNIT_SECONDS[match.group(2)])
    except OverflowError:
        raise argparse.ArgumentTypeError(f"{text!r} is too long a duration") from None


def parse_address(text: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' into (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host or int(port) > 65535:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an address; use HOST:PORT with a port in 0-65535")
    return host.strip("[]"), int(port)
