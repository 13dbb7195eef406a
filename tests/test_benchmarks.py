"""The benchmark suite's quick mode: every projection and RED figure is produced with a finite value.

Targets are not asserted (timings on a shared machine are not test material): only that the suite
runs, reports each figure in the table and the JSON, and turns a failing figure into an error row.
"""

from __future__ import annotations

import json
import math
import sys
import types

import pytest

from benchmarks import run


def test_quick_run_produces_every_projection_and_red_figure(tmp_path, capsys):
    from benchmarks import fig_adaptive, fig_projection, fig_red

    out = tmp_path / "results.json"
    assert (
        run.main(["--quick", "--only", "fig_adaptive,fig_projection,fig_red", "--threads", "1", "--out", str(out)]) == 0
    )
    result = json.loads(out.read_text())
    names = [f["name"] for f in result["figures"]]
    assert names == [fn.__name__ for fn in fig_adaptive.FIGURES + fig_projection.FIGURES + fig_red.FIGURES]
    for fig in result["figures"]:
        assert math.isfinite(fig["value"]) and fig["target"][:1] in "≥≤" and fig["met"] in (True, False, None)
        assert isinstance(fig["details"], dict) and len(fig["loadavg_before"]) == 3
    machine = result["machine"]
    assert machine["cpu_count"] >= 1 and machine["torch"] and len(machine["loadavg_after"]) == 3
    table = capsys.readouterr().out
    assert all(f"| {name} |" in table for name in names)


def test_a_failing_figure_is_an_error_row_not_a_crash(tmp_path, monkeypatch, capsys):
    def broken(quick: bool) -> dict:
        raise RuntimeError("boom")

    def fine(quick: bool) -> dict:
        return {"name": "fine", "value": 2.0, "target": "≥ 1", "met": True, "unit": "×", "details": {}}

    def nan(quick: bool) -> dict:
        return {"name": "nan", "value": float("nan"), "target": "≥ 1", "met": False, "unit": "×", "details": {}}

    module = types.ModuleType("benchmarks.fig_fake")
    module.FIGURES = [broken, fine, nan]
    monkeypatch.setitem(sys.modules, "benchmarks.fig_fake", module)
    monkeypatch.setattr(run, "discover", lambda only=None: ["fig_fake"])
    out = tmp_path / "r.json"
    assert run.main(["--quick", "--out", str(out)]) == 1
    rows = {f["name"]: f for f in json.loads(out.read_text())["figures"]}
    assert "boom" in rows["broken"]["error"] and rows["fine"]["value"] == 2.0 and "non-finite" in rows["nan"]["error"]
    assert "| broken | ERROR: RuntimeError: boom |" in capsys.readouterr().out


def test_only_refuses_an_unknown_module():
    with pytest.raises(SystemExit, match="no figure module fig_nope"):
        run.discover(["fig_nope"])


def test_the_gpu_check_runs_every_defense_and_attack_kind_on_the_cpu_path(tmp_path, capsys):
    """`benchmarks/gpu_check.py --device cpu`: the script a GPU machine runs, on the CPU against itself. It must
    cover every registered kind, agree with itself exactly, and write its JSON."""
    from benchmarks import gpu_check
    from jobs.specs import ATTACKS, BLACK_BOXES, DEFENSES, WRAPPERS

    out = tmp_path / "gpu.json"
    assert gpu_check.main(["--device", "cpu", "--quick", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    kinds = {spec["kind"] for spec, _ in gpu_check.ATTACKS.values()}
    assert kinds == set(ATTACKS) | set(WRAPPERS) | set(BLACK_BOXES)  # a new attack kind must join the check
    assert {spec["kind"] for spec in gpu_check.DEFENSES.values()} == set(DEFENSES)
    assert set(result["agreement"]) == {"clean", *gpu_check.ATTACKS} and result["min_agreement"] == 1.0
    assert result["projection_images_per_second"]["cpu"] > 0 and "predictions on cpu" in capsys.readouterr().out
