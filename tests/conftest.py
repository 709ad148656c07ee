"""Test tiers and shared fixtures.

Tiers, by pytest marker:

- (no marker): fast unit and contract tests; run by `make test` and CI.
- `slow`: end-to-end runs through the real CLI or real data, seconds to a minute each; also run
  by `make test` and CI (deselect with `-m "not slow"` while iterating).
- `distributed`: several processes (DDP over gloo on CPU), started as subprocesses with a
  timeout; run by `make test` and CI.
- `gpu`: needs a CUDA device; skipped, with the reason printed, where none is present.

Real datasets are read from `LIGHTNING_META_DATA` (default: `../shared/data` beside the repo);
decoded caches go to `LIGHTNING_META_CACHE` (default: `.cache/tests` in the repo, ignored by git).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("LIGHTNING_META_DATA", str((REPO.parent / "shared" / "data").resolve()))
os.environ.setdefault("LIGHTNING_META_CACHE", str(REPO / ".cache" / "tests"))
os.environ.setdefault("WANDB_MODE", "disabled")
torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is present on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The folder holding `omniglot/`; tests that need it fail (not skip) when it is absent."""
    root = Path(os.environ["LIGHTNING_META_DATA"])
    assert (root / "omniglot").is_dir(), f"real data not found under {root}: set LIGHTNING_META_DATA"
    return root


@pytest.fixture
def float64():
    """Float64 as the default dtype for the test (gradient checks), restored after it."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


class DDPRun(NamedTuple):
    """One case of `tests/ddp_gradients.py`: what one process saved on all the step's tasks, on
    half of them, and what rank 0 of 2 gloo processes saved, each on its half."""

    single: dict
    half: dict
    ddp: dict


@pytest.fixture(scope="session")
def ddp_launches(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two launches for the whole session (one process, then 2 gloo processes), each running every
    `ddp_case` the selected tests are parametrised with: a launch costs seconds of start-up, a
    case a fraction of one. The folder holding `single/` and `ddp/`."""
    from tests.helpers import launch_ddp_cases

    cases: set[str] = set()
    for item in request.session.items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and "ddp_case" in callspec.params:
            cases.add(callspec.params["ddp_case"])
    out = tmp_path_factory.mktemp("ddp")
    launch_ddp_cases(sorted(cases), 1, out / "single", half=True)
    launch_ddp_cases(sorted(cases), 2, out / "ddp")
    return out


@pytest.fixture
def ddp_run(ddp_case: str, ddp_launches: Path) -> DDPRun:
    """The saved results of the test's `ddp_case` (parametrise the test with it), checked to come
    from the number of processes they claim."""
    single = torch.load(ddp_launches / "single" / f"{ddp_case}.pt")
    half = torch.load(ddp_launches / "single" / f"{ddp_case}.half.pt")
    ddp = torch.load(ddp_launches / "ddp" / f"{ddp_case}.pt")
    assert single["world_size"] == half["world_size"] == 1 and ddp["world_size"] == 2
    return DDPRun(single, half, ddp)
