"""`benchmarks/omniglot_table.py --report-only`: the table and plot are built from the per-benchmark
JSON files that separate runs saved, and a missing one is named with the command that makes it."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "omniglot_table.py"


def record(benchmark: str, accs: dict[str, float], lake: dict | None, per_example: bool = False) -> dict:
    saved = {
        "benchmark": benchmark,
        "minutes": 8,
        "test_episodes": 1000,
        "val_tasks": 50,
        "seed": 0,
        "threads": 1,
        "torch": "2.13.0+cpu",
        "methods": {
            name: {"acc": acc, "ci": 0.25, "steps": 100 + i, "curve": [[0.0, 20.0], [240.0, acc - 1], [480.0, acc]]}
            for i, (name, acc) in enumerate(accs.items())
        },
        "lake": lake,
    }
    if per_example:  # the same weights scored per example (results saved before that have none)
        for method in saved["methods"].values():
            method["per_example"] = {"acc": method["acc"] - 2, "ci": 0.3}
        if lake:
            lake["per_example"] = {"error": lake["error"] + 3, "ci": 3.7}
    return saved


def report(out: Path, *benchmarks: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--report-only", "--out", str(out), "--benchmarks", *benchmarks],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_report_joins_the_benchmarks_run_separately(tmp_path: Path) -> None:
    five = record(
        "5w1s",
        {"ProtoNet": 97.14, "Relation Nets": 93.46},
        {"method": "ProtoNet", "selected_by": "validation accuracy", "error": 11.24, "ci": 3.5, "steps": 700},
        per_example=True,
    )
    twenty = record("20w1s", {"ProtoNet": 88.61, "Relation Nets": 71.04}, None)
    twenty["minutes"] = 6
    (tmp_path / "omniglot_5w1s.json").write_text(json.dumps(five))
    (tmp_path / "omniglot_20w1s.json").write_text(json.dumps(twenty))

    done = report(tmp_path, "5w1s", "20w1s")
    assert done.returncode == 0, done.stderr
    table = (tmp_path / "omniglot_table.md").read_text()
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}
    # Each benchmark: transductive (steps), per example (— where the run predates it), published;
    # then the protocol of the published numbers.
    assert rows["ProtoNet"] == (
        "| ProtoNet | 97.1 ± 0.2 (100) | 95.1 ± 0.3 | 98.8 (Snell et al.) | 88.6 ± 0.2 (100) | — | "
        "96.0 (Snell et al.) | per example (running statistics) |"
    )
    assert rows["Relation Nets"].endswith("| 71.0 ± 0.2 (101) | — | 97.6 (Sung et al.) | transductive |")
    assert "| method | 5w1s transductive (steps) | 5w1s per example | 5w1s published | 20w1s transductive" in table
    assert "| Siamese" not in table  # only methods present in every benchmark's JSON
    assert "5w1s: 8 min, 1000 test episodes; 20w1s: 6 min, 1000 test episodes" in table
    assert "ProtoNet (best at 5w1s by validation accuracy) trained 8 min" in table
    assert "**11.2% error** (± 3.5" in table
    assert "700 steps" in table
    assert "per example, the same weights: **14.2% error** (± 3.7)" in table
    assert (tmp_path / "omniglot_val_accuracy.png").stat().st_size > 1000


def test_a_run_saved_without_its_selection_criterion_says_it_picked_by_test(tmp_path: Path) -> None:
    # JSON written before the Lake method was chosen on validation: it was chosen on test.
    old = record("5w1s", {"ProtoNet": 97.14}, {"method": "ProtoNet", "error": 11.24, "ci": 3.5, "steps": 700})
    (tmp_path / "omniglot_5w1s.json").write_text(json.dumps(old))
    done = report(tmp_path, "5w1s")
    assert done.returncode == 0, done.stderr
    assert "ProtoNet (best at 5w1s by test accuracy)" in (tmp_path / "omniglot_table.md").read_text()


def test_the_lake_method_is_picked_on_validation_not_test_accuracy(monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # the script imports bench_trainer beside it
    omniglot_table = importlib.import_module("omniglot_table")
    methods = record("5w1s", {"ProtoNet": 97.0, "Relation Nets": 95.0, "Matching Nets": 90.0}, None)["methods"]
    # Relation Nets ends highest on validation though ProtoNet scores higher on test.
    methods["Relation Nets"]["curve"][-1][1] = 97.5
    methods["Matching Nets"]["curve"][1][1] = 99.0  # an earlier point does not count: the final model is run
    assert omniglot_table.pick_for_lake(methods) == "Relation Nets"


@pytest.mark.parametrize("present", [[], ["5w1s"]])
def test_report_names_the_missing_run(tmp_path: Path, present: list[str]) -> None:
    for benchmark in present:
        (tmp_path / f"omniglot_{benchmark}.json").write_text(json.dumps(record(benchmark, {"ProtoNet": 90.0}, None)))
    done = report(tmp_path, "5w1s", "20w1s")
    assert done.returncode != 0
    assert "omniglot_20w1s.json does not exist" in done.stderr
    assert ("omniglot_5w1s.json does not exist" in done.stderr) == (present == [])
    assert f"--benchmarks {'5w1s 20w1s' if not present else '20w1s'}`" in done.stderr
    assert not (tmp_path / "omniglot_table.md").exists()
