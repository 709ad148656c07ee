"""Checkpoints are written atomically: a write killed half-way leaves the previous file whole."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lightning_meta.checkpoint_io import AtomicCheckpointIO
from lightning_meta.cli import run_cli

REPO = Path(__file__).resolve().parents[1]

WRITER = """
import sys, torch
from lightning_meta.checkpoint_io import AtomicCheckpointIO
io, path, i = AtomicCheckpointIO(), sys.argv[1], 0
while True:  # ~40 MB per write, each tagged with its number
    io.save_checkpoint({"i": i, "w": torch.full((10_000_000,), float(i))}, path)
    i += 1
"""


def test_the_cli_writes_checkpoints_atomically(tmp_path):
    cli = run_cli(["--config", str(REPO / "configs/sinusoid/maml.yaml"), "--trainer.logger=false"], run=False)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_a_failed_write_leaves_the_previous_checkpoint_and_no_temporary_file(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"i": 1}, path)

    def crash(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"i": 2}, path)
    assert torch.load(path)["i"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_a_writer_sigkilled_mid_write_leaves_a_checkpoint_that_loads(tmp_path):
    path = tmp_path / "last.ckpt"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for delay in (0.05, 0.2, 0.45):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], env=env)
        try:
            deadline = time.monotonic() + 60
            while not path.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert path.exists(), "the writer wrote nothing"
            time.sleep(delay)  # kill it at some point of a later write
        finally:
            os.kill(writer.pid, signal.SIGKILL)
            writer.wait()
        saved = torch.load(path)
        assert torch.equal(saved["w"], torch.full((10_000_000,), float(saved["i"])))
