"""Helpers of the sweep tests: a model that crashes on cue, a W&B offline-run reader, a Ray head.

`CrashingMAML` is imported by Ray trial processes by its class path (`tests.tune_helpers`), so
it lives in a module, not in a test file.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lightning_meta.algorithms import MAML

REPO = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).with_name("ray")

# A sweep budget that takes seconds per trial: 20 meta-steps, a validation every 5 on 8 tasks.
TINY = (
    "--trainer.max_steps=20",
    "--trainer.val_check_interval=5",
    "--trainer.log_every_n_steps=5",
    "--data.init_args.val_tasks=8",
    "--data.init_args.test_tasks=8",
    "--data.init_args.eval_tasks_per_batch=8",
    "--model.init_args.eval_inner_steps=3",
)


class CrashingMAML(MAML):
    """MAML that raises at a given training step, to test that a crashing trial stays contained.

    Args:
        crash_at_step: the global step at which `training_step` raises (None: never).
        crash_times: crash on the first this many attempts only (None: on every attempt); the
            attempts are counted in `attempts_file`.
        attempts_file: with ".<crash_times>" appended, a file that gets one line per attempt
            (start of training): the global step it started from.
        step_sleep: seconds to sleep in every training step (a slow trial, to be caught running).
    """

    def __init__(
        self,
        *args: Any,
        crash_at_step: int | None = None,
        crash_times: int | None = None,
        attempts_file: str | None = None,
        step_sleep: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.crash_at_step, self.crash_times, self.attempts_file = crash_at_step, crash_times, attempts_file
        self.step_sleep = step_sleep

    def _attempts_path(self) -> Path | None:
        return Path(f"{self.attempts_file}.{self.crash_times}") if self.attempts_file else None

    def _attempts(self) -> int:
        path = self._attempts_path()
        return len(path.read_text().splitlines()) if path and path.is_file() else 0

    def on_train_start(self) -> None:
        super().on_train_start()
        if path := self._attempts_path():
            with path.open("a") as f:
                f.write(f"{self.global_step}\n")

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        crashes = self.crash_times is None or self._attempts() <= self.crash_times
        if self.crash_at_step is not None and self.global_step >= self.crash_at_step and crashes:
            raise RuntimeError(f"CrashingMAML: deliberate crash at step {self.global_step}")
        time.sleep(self.step_sleep)
        return super().training_step(batch, batch_idx)


def short_tmp(prefix: str = "lmrt") -> Path:
    """A short temp folder: Ray's socket paths under it must fit in ~107 characters."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session_pids(sid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.getsid(int(entry)) == sid:
                    pids.append(int(entry))
    return pids


@contextlib.contextmanager
def ray_head(num_cpus: int = 2, dashboard: bool = True) -> Iterator[tuple[str, dict[str, str]]]:
    """A Ray head on 127.0.0.1 (`ray start --head --block`), stopped by its own process ids.

    The head runs in its own session with its own short temp dir; stopping it signals that
    session only (never `ray stop`, which would stop every Ray on the machine), then removes the
    temp dir. It runs with token authentication and a token of its own in that temp dir, so the
    test neither depends on nor writes `~/.ray/auth_token` (`ray start --head` turns token mode
    on only when that file already exists, and clients told to use tokens fail without one).
    Yields the address (`127.0.0.1:port`) and the environment variables a client needs.
    """
    temp = short_tmp("lmhd")
    port = free_port()
    log = temp / "head.log"
    token = temp / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    command = [str(RAY), "start", "--head", "--block", f"--port={port}", f"--num-cpus={num_cpus}"]
    command += [f"--temp-dir={temp}", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    command += [f"--include-dashboard={str(dashboard).lower()}", "--dashboard-host=127.0.0.1"]
    command += [f"--dashboard-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}"]
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", **auth)
    env.pop("RAY_AUTH_TOKEN", None)
    with log.open("w") as out:
        head = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.time() + 120
        while "Ray runtime started" not in log.read_text():
            assert head.poll() is None, f"ray start --head exited:\n{log.read_text()[-3000:]}"
            assert time.time() < deadline, f"ray start --head did not come up:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        yield f"127.0.0.1:{port}", auth
    finally:
        # Every process of the head's session at once (ray start waits on its children one by one).
        for sig, pause in ((signal.SIGTERM, 5), (signal.SIGKILL, 1)):
            for pid in _session_pids(head.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.time() + pause
            while _session_pids(head.pid) and time.time() < deadline:
                time.sleep(0.2)
        head.wait(timeout=10)
        shutil.rmtree(temp, ignore_errors=True)


def wandb_records(run_dir: Path) -> dict[str, Any]:
    """The run info and history of a W&B offline run folder, read from its `.wandb` log.

    The file is a LevelDB-style log (a 7-byte header, then 32 KiB blocks of records: crc32,
    length, type) of `wandb_internal_pb2.Record` protobufs; wandb 0.31 ships no reader of its own.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B log"
    block, pos, pending = 32768, 7, b""
    out: dict[str, Any] = {"history": [], "run": None, "exit": False, "config": {}}
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (2, 3):  # first / middle fragment
            pending = chunk if kind == 2 else pending + chunk
            continue
        if kind == 4:
            chunk, pending = pending + chunk, b""
        elif kind != 1:
            break
        record = pb.Record()
        record.ParseFromString(chunk)
        which = record.WhichOneof("record_type")
        if which == "history":
            items = record.history.item
            out["history"].append({item.key or "/".join(item.nested_key): item.value_json for item in items})
        elif which == "run":
            out["run"] = record.run
        elif which == "config":
            out["config"].update({item.key: item.value_json for item in record.config.update})
        elif which == "exit":
            out["exit"] = True
    return out
