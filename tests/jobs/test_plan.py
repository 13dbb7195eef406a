"""`invgan eval --plan`: the cost model's units against the code that spends them, its fit against the rows it
was fitted on, the wall-time schedule, and the command."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from invgan.cli import app
from jobs import plan
from jobs.config import load_config
from tests.jobs.test_evaluate import ROOT, SMOKE


@pytest.fixture(scope="module")
def smoke_rows():
    """The smoke config's rows, every shard computed in this process (2 s)."""
    import pandas as pd

    from jobs.evaluate import EvalWorker

    cfg = load_config(SMOKE)
    worker = EvalWorker(cfg.model_dump(mode="json"))
    n = len(worker.data)
    rows = [worker.run_shard(k, a, min(a + cfg.shard_size, n)) for k, a in enumerate(range(0, n, cfg.shard_size))]
    return cfg, pd.concat(rows, ignore_index=True)


@pytest.mark.parametrize(
    "params",
    [
        {"restarts": 10, "steps": 30},
        {"restarts": 10, "steps": 30, "prune_every": 4},
        {"restarts": 3, "steps": 7, "prune_every": 2},
    ],
)
def test_projection_row_steps_are_the_restart_steps_a_projection_spends(params):
    from invgan_core.inversion import project
    from invgan_core.models import build_model, default_arch

    G = build_model("generator", default_arch("generator", (1, 8, 8))).eval()
    p = project(G, torch.rand(2, 1, 8, 8), ids=[0, 1], **params)
    assert plan.projection_row_steps("defensegan", params) == p.effective_iterations
    assert plan.projection_row_steps("invgan", {"steps": 200}) == 201  # + the encoder pass
    assert plan.projection_row_steps("none", {}) == 0


def test_the_fitted_model_predicts_the_run_it_was_fitted_on(smoke_rows):
    """In sample, the plan's accounting must add up to the rows' own: every fed attack counted once, every row's
    projection once, the end-to-end attack at its measured share of its budget."""
    cfg, rows = smoke_rows
    model = plan.fit([(cfg, rows)])
    assert model.source.startswith("fitted from 1 earlier run")
    assert {"bpda/none", "bpda/invgan"} <= set(model.spent) and 0 < model.spent["bpda/invgan"] <= 1.2
    cells, shards, driver = plan.plan(cfg, 16, model)
    predicted, measured = sum(c.seconds for c in cells), plan.measured_core_seconds(cfg, rows)
    assert predicted == pytest.approx(measured, rel=0.1)
    assert sum(shards) == pytest.approx(predicted) and driver == 0
    assert {c.examples for c in cells if c.attack == "clean"} == {16}


def test_unseen_pairs_are_priced_at_their_whole_budget_and_flagged():
    cfg = load_config(ROOT / "configs" / "default.yaml")
    model = plan.CostModel({"mnist5k": 1e-4}, {"mnist5k": 1e-4})
    cells = {(c.attack, c.defense): c for c in plan.plan(cfg, 60, model)[0]}
    bpda = cells[("bpda", "defensegan")]
    assert bpda.bound and bpda.examples == 10
    # 10 steps x (10 x 200 row-steps) per example, plus the row's own projection
    assert bpda.seconds == pytest.approx(10 * (10 * 2000 * 1e-4 + 2000 * 1e-4))
    assert not cells[("fgsm", "defensegan")].bound


def test_bpda_with_eot_is_priced_as_k_copies_through_the_projection():
    cfg = load_config(ROOT / "configs" / "default.yaml", ["attacks.bpda.params={eot: 4}"])
    model = plan.CostModel({"mnist5k": 1e-4}, {"mnist5k": 1e-4})
    bpda = {(c.attack, c.defense): c for c in plan.plan(cfg, 60, model)[0]}[("bpda", "defensegan")]
    # 10 steps x 4 copies x (10 x 200 row-steps) per example, plus the row's own projection
    assert bpda.seconds == pytest.approx(10 * (4 * 10 * 2000 * 1e-4 + 2000 * 1e-4))


def test_wall_time_puts_each_shard_on_the_first_free_worker():
    assert plan.wall_seconds([3, 1, 1, 1], 2, 1, 0) == 3 + plan.START_SECONDS
    assert plan.wall_seconds([1, 1, 1, 3], 2, 1, 0) == 4 + plan.START_SECONDS  # in order: the long one comes last
    assert plan.wall_seconds([4, 4], 1, 2, 10) == 4 + plan.START_SECONDS + 10  # 2 CPUs per worker


def test_plan_command_prints_the_cells_and_fits_on_given_run_folders(smoke_rows, tmp_path):
    cfg, rows = smoke_rows
    run = tmp_path / "earlier" / "smoke-abc"
    (run / "rows").mkdir(parents=True)
    rows.to_parquet(run / "rows" / "shard-00000.parquet")
    (run / "config.json").write_text(json.dumps({"config": cfg.model_dump(mode="json")}))
    out = CliRunner().invoke(app, ["eval", "--plan", "--config", str(SMOKE), "--plan-from", str(tmp_path / "earlier")])
    assert out.exit_code == 0, out.output
    assert "Plan for smoke: digits, 16 examples in 4 shards of 4" in out.output
    assert "fitted from 1 earlier run(s)" in out.output and "| bpda | 16 |" in out.output
    assert "core-hours" in out.output and "wall time by workers" in out.output
    assert not (tmp_path / "runs").exists()  # nothing ran
    bad = CliRunner().invoke(app, ["eval", "--plan", "--config", str(SMOKE), "--set", "shard_size=0"])
    assert bad.exit_code == 1 and "shard_size" in bad.output


def test_with_precision_the_plan_says_how_many_examples_each_attack_needs(smoke_rows):
    from jobs.stats import cell_widths, needed

    _, rows = smoke_rows
    cfg = load_config(
        SMOKE, ["limit=200", "attacks.bpda.limit=16"], precision={"half_width": 0.1, "budget_core_hours": 1.0}
    )
    text = plan.report(cfg, 200, plan.fit([(load_config(SMOKE), rows)]), rows)
    w = cell_widths(rows)  # the smoke rows' own accuracies decide bpda's need; the split (200) caps it
    mine = w[w["attack"] == "bpda"]
    need = min(200, max(16, *(needed(int(k), int(m), 0.1) for k, m in zip(mine["k"], mine["n"], strict=True))))
    assert f"  bpda: {need} examples (at the earlier rows' accuracy; the config runs 16)" in text
    assert "  fgsm: 200 examples" in text  # already on the whole split
    assert "all cells at the target:" in text and "within the budget" in text
