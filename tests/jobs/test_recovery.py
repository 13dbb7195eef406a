"""`invgan recovery` (Lipton & Tripathi Tables 1-2): tables from rows with known answers, rows independent of
the batch, one-line config errors, and the command end to end with a real SQLite MLflow store."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from jobs.recovery import RecoveryConfig, mean_pairwise, recovery_rows, recovery_tables

ROOT = Path(__file__).resolve().parents[2]


def test_table_1_counts_trials_under_each_threshold_and_table_2_measures_the_spread():
    rows = pd.DataFrame(
        {"table": 1, "trial": range(4), "constraint": ["clip"] * 4, "sq_err": [0.0, 5e-4, 5e-3, 0.5], "mse": 0.0}
    )
    z = [np.zeros(4), np.array([3.0, 4.0, 0.0, 0.0])]  # one pair, 5 apart: 5 / d = 1.25
    rows2 = pd.DataFrame({"table": 2, "trial": 7, "recovery": [0, 1], "constraint": "clip", "z": z})
    tables = recovery_tables(pd.concat([rows, rows2], ignore_index=True), [1e-4, 1e-3, 1e-2, 1e-1], d=4)
    assert tables["table1"].loc["clip"].tolist() == [0.25, 0.5, 0.75, 0.75, 4]  # monotone in ε, n last
    assert tables["table2"].loc["clip"].item() == pytest.approx(1.25)
    assert mean_pairwise(np.stack(z)) == pytest.approx(1.25)
    # random box vectors in d = 4: E||z_i - z_j|| / d is near sqrt(4 * 2/3) / 4 = 0.41
    assert 0.3 < tables["table2"].loc["baseline (random box vectors)"].item() < 0.45


@pytest.fixture(scope="module")
def generator():
    from invgan_core.checkpoint import load_model

    return load_model(ROOT / "weights" / "digits" / "generator-uniform", kind="generator")[0].requires_grad_(False)


def test_a_trial_s_rows_do_not_depend_on_how_many_trials_run_with_it(generator):
    small = RecoveryConfig(name="r", trials=3, steps=30, images=0)
    big = small.model_copy(update={"trials": 6})
    a = recovery_rows(small, generator, torch.empty(0), [])
    b = recovery_rows(big, generator, torch.empty(0), [])
    b = b[b.trial < 3].reset_index(drop=True)
    np.testing.assert_allclose(a.sq_err, b.sq_err, rtol=1e-4, atol=1e-7)
    assert (a.groupby("constraint").size() == 3).all()


def test_stochastic_clipping_keeps_latents_in_the_box_and_recovers_with_enough_steps(generator):
    """With a real budget most latents come back (stochastic clipping at least as well as none at the loosest
    ε); a few steps do not (the test could fail)."""
    cfg = RecoveryConfig(name="r", trials=64, steps=600, images=0, constraints=["none", "stochastic_clip"])
    t = recovery_tables(recovery_rows(cfg, generator, torch.empty(0), []), [1e-2, 1e-1], d=16)["table1"]
    short = RecoveryConfig(name="r", trials=64, steps=3, images=0, constraints=["stochastic_clip"])
    t_short = recovery_tables(recovery_rows(short, generator, torch.empty(0), []), [1e-2, 1e-1], d=16)["table1"]
    assert t.loc["stochastic_clip", "ε = 0.1"] >= 0.6 and t_short.loc["stochastic_clip", "ε = 0.01"] <= 0.1


def test_the_command_writes_rows_summary_and_an_mlflow_run(tmp_path):
    db = tmp_path / "mlflow.db"
    cmd = [sys.executable, "-m", "invgan.cli", "recovery", "--out", str(tmp_path / "run")]
    cmd += ["--set", "trials=8", "--set", "steps=20", "--set", "images=1", "--set", "recoveries=3"]
    cmd += ["--set", f"mlflow.tracking_uri=sqlite:///{db}"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Table 1" in done.stdout and "baseline (random box vectors)" in done.stdout
    rows = pd.read_parquet(tmp_path / "run" / "rows.parquet")
    assert len(rows) == 3 * 8 + 3 * 3  # Table 1: trials x constraints; Table 2: recoveries x constraints
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["latent_dim"] == 16 and set(summary["table2"]) >= {"none", "clip", "stochastic_clip"}
    from mlflow.tracking import MlflowClient

    run_id = json.loads((tmp_path / "run" / "mlflow_run.json").read_text())["run_id"]
    run = MlflowClient(f"sqlite:///{db}").get_run(run_id)
    assert run.info.status == "FINISHED" and "recovered/stochastic_clip/0.1" in run.data.metrics

    bad = subprocess.run([*cmd[:6], "--set", "steps=0"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "steps:" in bad.stderr and "Traceback" not in bad.stderr
