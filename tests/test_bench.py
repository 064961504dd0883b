"""`valv bench` runs end to end (a smoke test; speed goals live in the benchmark itself)."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_reports_both_rates_and_their_ratio() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "valv", "bench", "--calls", "40", "--concurrency", "1,4",
         "--json"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [row["concurrency"] for row in rows] == [1, 4]
    for row in rows:
        assert row["baseline_rps"] > 0 and row["valv_rps"] > 0
        assert abs(row["ratio"] - row["valv_rps"] / row["baseline_rps"]) < 0.002


def test_bench_refuses_nonsense() -> None:
    result = subprocess.run([sys.executable, "-m", "valv", "bench", "--calls", "0"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "positive" in result.stderr
