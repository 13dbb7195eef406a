"""Numerical divergence (issue #12): a step size that blows up a projection or an attack gives rows flagged
`diverged`, counted in summary.json and the tables, left out of accuracy with a warning — never scored.

The end-to-end case is a real config whose InvGAN projection runs plain SGD at lr = 1e6 on the shipped
digits models: its latents run away (|z| ~ 1e4, the prior's scale is 1), while the `none` defense's rows
of the same examples stay scored.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from invgan_core.defenses import Purified
from jobs import run_tables
from jobs.evaluate import diverged_rows
from jobs.schemas import EVAL_ROWS

pytestmark = pytest.mark.reliability(kind="fault")
ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "configs" / "smoke.yaml"


def _purified(x, z):
    return Purified(x=x, z=z, loss=torch.zeros(len(x)), effective_iterations=1)


def test_nan_or_infinity_anywhere_flags_the_row_and_only_that_row():
    x = torch.rand(5, 1, 8, 8)
    z = torch.randn(5, 16)
    logits = torch.randn(5, 10)
    assert not diverged_rows(x, _purified(x, z), logits).any()
    x_adv, proj, z_bad, lg = x.clone(), x.clone(), z.clone(), logits.clone()
    x_adv[0, 0, 1, 1] = float("nan")  # the attack blew up
    proj[1, 0, 0, 0] = float("inf")  # the projection blew up
    z_bad[2, 3] = float("-inf")  # its latent
    z_bad[3, 0] = 1e4  # a runaway latent, finite in float32
    lg[4, 2] = float("nan")  # the classifier's logits
    assert diverged_rows(x_adv, _purified(proj, z_bad), lg).tolist() == [True] * 5
    assert diverged_rows(x_adv, _purified(x, None), logits).tolist() == [True, False, False, False, False]


def _rows(diverged: dict[tuple[str, str, int], bool]) -> pd.DataFrame:
    rows = []
    for ex in range(4):
        for attack in ("clean", "fgsm"):
            for defense in ("none", "invgan"):
                d = diverged.get((defense, attack, ex), False)
                rows.append(
                    dict(
                        example_id=ex,
                        label=1,
                        attack=attack,
                        defense=defense,
                        prediction=1 if ex < 3 else 0,
                        correct=ex < 3,
                        detection_score=0.1 * ex + (attack != "clean"),
                        l2=0.0,
                        linf=0.0,
                        effective_iterations=1,
                        seconds=0.5 * (defense == "invgan"),
                        attack_seconds=0.0,
                        attacked=attack != "clean",
                        queries=0,
                        shard=0,
                        diverged=d,
                    )
                )
    return pd.DataFrame(rows)[EVAL_ROWS.columns]


def test_summary_counts_diverged_rows_and_scores_only_the_others(capsys):
    rows = _rows(
        {("invgan", "fgsm", 0): True, ("invgan", "fgsm", 3): True, **{("invgan", "clean", e): True for e in range(4)}}
    )
    summary = run_tables.summarize(rows)
    assert summary["diverged"] == {"invgan": {"clean": 4, "fgsm": 2}}
    assert summary["n"]["invgan"]["fgsm"] == 2 and summary["accuracy"]["invgan"]["fgsm"] == 1.0  # examples 1, 2
    assert summary["n"]["invgan"]["clean"] == 0 and "clean" not in summary["accuracy"]["invgan"]
    assert "worst_case" not in summary["accuracy"]["invgan"]  # no example has every cell scored
    assert summary["n"]["none"] == {"clean": 4, "fgsm": 4, "worst_case": 4}
    assert summary["seconds_per_example"]["invgan"] == {"clean": 0.5, "fgsm": 0.5}  # the compute was spent
    assert "6 row(s) diverged" in capsys.readouterr().err
    table = run_tables.markdown_table(summary, "accuracy")
    assert "1.00 (n=2, 2 diverged)" in table and "- (4 diverged)" in table and "0.75 (n=4)" in table


def test_rows_from_before_the_column_count_as_not_diverged():
    rows = _rows({}).drop(columns="diverged")
    summary = run_tables.summarize(rows)
    assert summary["diverged"] == {} and summary["n"]["invgan"]["fgsm"] == 4


def test_a_blown_up_projection_is_flagged_counted_and_excluded_end_to_end(tmp_path):
    """The real command on a real config whose projection diverges: exit 0, rows flagged, tables say so."""
    out = tmp_path / "run"
    env = os.environ | {"INVGAN_RUNS": str(tmp_path / "runs"), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "invgan",
        "eval",
        "--config",
        str(SMOKE),
        "--out",
        str(out),
        "--no-mlflow",
        "--quiet",
        "--limit",
        "6",
        "--set",
        "shard_size=6",
        "--set",
        "resources.num_workers=1",
        "--set",
        "defenses.invgan.params={steps: 3, lr: 1.0e+6, optimizer: sgd}",
        "--set",
        "attacks={fgsm: {kind: fgsm, params: {eps: 0.3}}}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = pd.read_parquet(next((out / "rows").glob("shard-*.parquet")))
    assert rows.loc[rows.defense == "invgan", "diverged"].all()
    assert not rows.loc[rows.defense == "none", "diverged"].any()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["diverged"] == {"invgan": {"clean": 6, "fgsm": 6}}
    assert "invgan" not in summary["accuracy"] and summary["n"]["invgan"] == {"clean": 0, "fgsm": 0}
    assert summary["n"]["none"]["clean"] == 6
    assert "12 row(s) diverged" in proc.stderr and "invgan/fgsm: 6" in proc.stderr
    assert "- (6 diverged)" in proc.stdout  # the printed table
