"""Without a network nothing hangs: a dataset download that cannot connect, or whose server never
answers, fails within its timeout with the message of a missing dataset. (W&B without
credentials logs offline: test_cli.py::test_default_logging_is_wandb_offline_plus_csv_when_not_logged_in.
Ray is only started inside a loopback-only network namespace: see the Makefile.)"""

from __future__ import annotations

import socket
import time

import pytest

from lightning_meta.data import omniglot as om


def _point_downloads_at(monkeypatch: pytest.MonkeyPatch, port: int) -> None:
    base = f"http://127.0.0.1:{port}"
    monkeypatch.setattr(om, "ZIP_RESOURCES", {part: (f"{base}/{part}.zip", "0" * 32) for part in om.PARTS})
    monkeypatch.setattr(om, "SPLIT_URL", base + "/splits/{name}.txt")


def _fails_quickly_and_clearly(tmp_path, timeout: float) -> None:
    start = time.perf_counter()
    with pytest.raises(RuntimeError) as err:
        om.download_omniglot(tmp_path / "data", timeout=timeout)
    assert time.perf_counter() - start < timeout + 5
    message = str(err.value)
    assert "could not download Omniglot's images_background" in message
    assert "copy images_background.zip" in message and "--data.root" in message
    assert not any((tmp_path / "data" / "omniglot").iterdir())  # no partial file left


def test_a_closed_port_fails_at_once(tmp_path, monkeypatch):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    _point_downloads_at(monkeypatch, port)
    _fails_quickly_and_clearly(tmp_path, timeout=10)


def test_a_server_that_never_answers_fails_within_the_timeout(tmp_path, monkeypatch):
    with socket.socket() as silent:  # accepts connections (backlog), never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        _point_downloads_at(monkeypatch, silent.getsockname()[1])
        _fails_quickly_and_clearly(tmp_path, timeout=1.0)


def test_the_default_download_timeout_is_seconds():
    assert om.DOWNLOAD_TIMEOUT_S <= 30
