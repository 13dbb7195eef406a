"""Invariance (issue #12): per-example results do not depend on how the work is cut — shard sizes 1, 7 and
16 on 1 or 2 workers give the same predictions (distortions, detection scores and RED losses agree to float32
summation order: 1e-2 relative, as batched kernels add in another order and steps amplify it),
every defense's latents agree to 1e-4 whatever the batch, and re-running a finished config is a no-op that
reports the existing run.

The eval config runs all four defense kinds. ClippedProjection needs a uniform-prior generator, so the
weights folder pairs the shipped digits uniform-prior generator with the shipped digits classifier and
inverter (an inverter trained for the normal-prior generator: its accuracy is not the point here, its
determinism is).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from jobs.config import EvalConfig
from jobs.evaluate import evaluate
from jobs.red import RedConfig, run_red
from jobs.sharded import JobOptions

pytestmark = pytest.mark.reliability(kind="invariance")
ROOT = Path(__file__).resolve().parents[2]
KEY = ["example_id", "attack", "defense"]
RED_KEY = ["example_id", "attack_type", "method"]
CUTS = [(1, 2), (7, 1), (16, 2)]  # (shard_size, workers)


def _weights(folder: Path) -> Path:
    folder.mkdir()
    for target, source in [("generator", "generator-uniform"), ("classifier", "classifier"), ("inverter", "inverter")]:
        for ext in (".json", ".safetensors"):
            shutil.copy(ROOT / "weights" / "digits" / f"{source}{ext}", folder / f"{target}{ext}")
    return folder


def eval_config(weights: Path, tmp: Path, shard_size: int, workers: int) -> EvalConfig:
    pgd = {"kind": "pgd_linf", "params": {"eps": 0.3, "steps": 2, "abs_stepsize": 0.1}}
    return EvalConfig.model_validate(
        {
            "name": "invariance",
            "dataset": "digits",
            "weights": str(weights),
            "limit": 16,
            "shard_size": shard_size,
            "defenses": {
                "none": {"kind": "none"},
                "defensegan": {"kind": "defensegan", "params": {"restarts": 2, "steps": 5}},
                "invgan": {"kind": "invgan", "params": {"steps": 5}},
                "clipped": {"kind": "clipped", "params": {"steps": 5}},
            },
            "attacks": {
                "pgd": {"kind": "pgd_linf", "params": {"eps": 0.3, "steps": 2, "abs_stepsize": 0.1}},  # random
                "bpda": {"kind": "bpda", "target": "each", "limit": 9, "base": pgd},
                "rp": {"kind": "rp", "target": "invgan", "limit": 5, "base": pgd},
            },
            "resources": {"num_workers": workers, "num_cpus_per_worker": 1},
            "mlflow": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}"},
        }
    )


def red_config(tmp: Path, shard_size: int, workers: int) -> RedConfig:
    raw = yaml.safe_load((ROOT / "configs" / "red_smoke.yaml").read_text())
    raw |= {
        "limit": 10,
        "shard_size": shard_size,
        "steps": 25,
        "init_restarts": 2,
        "init_steps": 15,
        "sbsc_per_class": 4,
        "resources": {"num_workers": workers, "num_cpus_per_worker": 1},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}"},
    }
    raw["dictionary"] = {
        "per_class": 3,
        "attacks": {
            "linf": {"kind": "pgd_linf", "params": {"eps": 0.3, "abs_stepsize": 0.05, "steps": 10}},
            "l2": {"kind": "pgd_l2", "params": {"eps": 2.0, "abs_stepsize": 0.3, "steps": 10}},
        },
    }
    return RedConfig.model_validate(raw)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One eval and one RED run per cut, on one Ray instance."""
    import ray

    tmp = tmp_path_factory.mktemp("invariance")
    weights = _weights(tmp / "weights")
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)  # 2 actors + 1 CPU for Ray Data
    try:
        out = {"tmp": tmp, "weights": weights}
        for size, workers in CUTS:
            log = size == 16  # the last cut also records MLflow runs, for the rerun check
            cfg = eval_config(weights, tmp, size, workers)
            out[("eval", size)] = (
                cfg,
                evaluate(cfg, JobOptions(out=tmp / f"eval-{size}", progress=False, log_mlflow=log)),
            )
            rcfg = red_config(tmp, size, workers)
            out[("red", size)] = (
                rcfg,
                run_red(rcfg, JobOptions(out=tmp / f"red-{size}", progress=False, log_mlflow=log)),
            )
        yield out
    finally:
        ray.shutdown()


def _assert_same(a: pd.DataFrame, b: pd.DataFrame, key: list[str], exact: list[str], close: list[str]) -> None:
    a, b = (r.sort_values(key).reset_index(drop=True) for r in (a, b))
    assert a[key].equals(b[key])
    for col in exact:
        assert (a[col] == b[col]).all(), a.loc[a[col] != b[col], key + [col]]
    for col in close:
        pd.testing.assert_series_equal(a[col], b[col], rtol=1e-2, atol=1e-4, check_names=False, check_dtype=False)


def test_eval_rows_are_the_same_for_shard_sizes_1_7_16_and_1_or_2_workers(runs):
    rows = {size: runs[("eval", size)][1].rows for size, _ in CUTS}
    first = rows[1]
    assert set(first.defense) == {"none", "defensegan", "invgan", "clipped"}
    assert len(first) == 16 * 4 * 2 + 9 * 4 + 5 * 4 and not first.duplicated(KEY).any()
    assert first.shard.nunique() == 16 and rows[7].shard.nunique() == 3 and rows[16].shard.nunique() == 1
    for size in (7, 16):
        _assert_same(
            first,
            rows[size],
            KEY,
            ["label", "prediction", "correct", "diverged", "queries"],
            ["detection_score", "l2", "linf"],
        )


def test_red_rows_are_the_same_for_shard_sizes_1_7_16_and_1_or_2_workers(runs):
    rows = {size: runs[("red", size)][1].rows for size, _ in CUTS}
    assert len(rows[1]) == 10 * 3 * 4 and not rows[1].duplicated(RED_KEY).any()
    assert rows[1].shard.nunique() == 10 and rows[7].shard.nunique() == 2 and rows[16].shard.nunique() == 1
    for size in (7, 16):
        _assert_same(rows[1], rows[size], RED_KEY, ["label", "signal_pred", "attack_pred"], ["final_loss"])


@pytest.mark.parametrize("kind", ["defensegan", "invgan", "clipped"])
def test_latents_agree_to_1e_4_whatever_the_batch(runs, kind):
    """Each defense's projection of the same 16 images in batches of 1, of 7 and of 16."""
    from invgan_core.data import load_dataset
    from jobs.models import build_defense, load_models

    cfg = runs[("eval", 16)][0]
    models = load_models(cfg)
    defense = build_defense(
        cfg.defenses[kind], models["generator"], models.get("inverter"), models["classifier"], cfg.seed
    )
    data = load_dataset("digits", "test").subset(16)
    ids = torch.as_tensor(data.ids)
    z = {}
    for size in (1, 7, 16):
        parts = [defense.purify(data.images[i : i + size], ids[i : i + size]) for i in range(0, 16, size)]
        z[size] = torch.cat([p.z for p in parts])
        if size == 1:
            predictions = torch.cat([models["classifier"](p.x).argmax(1) for p in parts])
    for size in (7, 16):
        assert (z[size] - z[1]).abs().max() <= 1e-4, (kind, size, (z[size] - z[1]).abs().max())
    whole = defense.purify(data.images, ids)
    assert torch.equal(models["classifier"](whole.x).argmax(1), predictions)


def test_rerunning_a_finished_eval_is_a_no_op_that_reports_the_existing_run(runs, capsys):
    from mlflow.tracking import MlflowClient

    from jobs.evaluate import main as eval_main

    cfg, first = runs[("eval", 16)]
    run_dir = first.run_dir
    stamps = {p.name: p.stat().st_mtime_ns for p in (run_dir / "rows").glob("*.parquet")}
    config = runs["tmp"] / "finished.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    eval_main(config, [], JobOptions(out=run_dir, progress=False))
    printed = capsys.readouterr().out
    assert "shards: 0 computed, 1 reused" in printed and f"MLflow run {first.mlflow_run_id}" in printed
    assert {p.name: p.stat().st_mtime_ns for p in (run_dir / "rows").glob("*.parquet")} == stamps
    client = MlflowClient(cfg.mlflow.tracking_uri)
    experiment = client.get_experiment_by_name(cfg.family)
    assert len(client.search_runs([experiment.experiment_id])) == 1  # no second run was created
    assert json.loads((run_dir / "summary.json").read_text())["accuracy"] == first.summary["accuracy"]


def test_rerunning_a_finished_red_run_is_a_no_op_that_reports_the_existing_run(runs):
    cfg, res = runs[("red", 16)]
    rows, run_dir, run_id = res.rows, res.run_dir, res.mlflow_run_id
    stamps = {
        p.name: p.stat().st_mtime_ns
        for p in [*(run_dir / "rows").glob("*.parquet"), run_dir / "dictionary.safetensors"]
    }
    res2 = run_red(cfg, JobOptions(out=run_dir, progress=False))
    rows2, run_dir2, run_id2 = res2.rows, res2.run_dir, res2.mlflow_run_id
    assert run_dir2 == run_dir and run_id2 == run_id
    assert {
        p.name: p.stat().st_mtime_ns
        for p in [*(run_dir / "rows").glob("*.parquet"), run_dir / "dictionary.safetensors"]
    } == stamps
    pd.testing.assert_frame_equal(
        rows2.sort_values(RED_KEY).reset_index(drop=True), rows.sort_values(RED_KEY).reset_index(drop=True)
    )
