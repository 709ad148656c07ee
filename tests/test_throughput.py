"""`benchmarks/throughput.py` end to end at its smallest settings: every implementation's step
runs (the peers' own MAML idioms included, from the `bench` extra that `make` installs) and the
table has a row for each. A smoke run, not a measurement: timings are not checked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"


@pytest.mark.slow
def test_every_implementation_runs_and_gets_a_row():
    for peer in ("higher", "torchopt"):
        pytest.importorskip(peer, reason="the bench extra is not installed (pip install -e '.[bench]')")
    impls = ["lightning-meta", "bare loop", "bare vmap", "higher", "torchopt"]
    smallest = ["--tasks", "1", "--steps", "1", "--warmup", "0", "--repeats", "1", "--queries", "1"]
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--settings", "FOMAML, 1 step", "--impls", *impls, *smallest],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "skipping" not in done.stdout and "failed" not in done.stdout, done.stdout
    rows = [line for line in done.stdout.splitlines() if line.startswith("5w1s")]
    assert [impl for impl in impls if any(f" {impl} " in row for row in rows)] == impls, done.stdout
    (peer_row,) = [row for row in rows if " torchopt " in row]
    assert peer_row.split()[-2].endswith("x")  # its 'vs fastest' ratio against the bare loop and higher
