"""`invgan tune` end to end on a real Ray instance (one per module, 2 CPUs) and a real MLflow store:
a tiny defense-time search and a tiny inverter search."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

from invgan_core.data import load_dataset
from tuning.config import load_search
from tuning.search import run_search

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "configs" / "tune" / "smoke.yaml"


@pytest.fixture(scope="module")
def ray_instance():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _uri(tmp: Path) -> str:
    return f"sqlite:///{(tmp / 'mlflow.db').resolve()}"


@pytest.fixture(scope="module")
def defense_search(ray_instance, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tune_defense")
    search = load_search(SMOKE, [f"mlflow.tracking_uri={_uri(tmp)}"])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = run_search(search, out=tmp / "out")
    return search, result, printed.getvalue(), tmp


def _children(uri: str, parent_id: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    parent = client.get_run(parent_id)
    return client, parent, client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")


def test_defense_search_logs_one_child_run_per_trial_with_its_params(defense_search):
    search, result, _, tmp = defense_search
    assert len(result.trials) == 4 and result.summary["trials"] == 4
    client, parent, children = _children(_uri(tmp), result.mlflow_parent_run_id)
    assert parent.info.status == "FINISHED" and len(children) == 4
    table = result.trials.set_index("trial_id")
    for child in children:
        trial = child.data.tags["trial_id"]
        steps, lr = table.loc[trial, "defenses.invgan.params.steps"], table.loc[trial, "defenses.invgan.params.lr"]
        assert child.data.params["defenses.invgan.params.steps"] == str(steps)
        assert float(child.data.params["defenses.invgan.params.lr"]) == pytest.approx(lr)
        history = client.get_metric_history(child.info.run_id, "objective")
        assert [m.step for m in history] == [8, 16, 24, 32][: table.loc[trial, "reports"]]  # one per shard
        assert child.data.tags["best_trial"] == str(trial == result.best_trial).lower()
        assert f"runs/{parent.info.run_id})" in child.data.tags["mlflow.note.content"]  # links its search
    assert parent.data.metrics["best_objective"] == result.best_metric
    assert "figures/objective_vs_params.png" in {f.path for f in client.list_artifacts(parent.info.run_id, "figures")}


def test_defense_search_outputs(defense_search):
    search, result, printed, tmp = defense_search
    out = tmp / "out"
    summary = json.loads((out / "summary.json").read_text())
    assert {"best_config", "best_metric", "metric", "mode", "trials", "mlflow_parent_run_id"} <= set(summary)
    assert summary["mode"] == "max" and summary["best_config"] == result.best_config
    table = pd.read_parquet(out / "trials.parquet")
    assert len(table) == 4 and {
        "trial_id",
        "defenses.invgan.params.steps",
        "defenses.invgan.params.lr",
        "objective",
        "seconds",
        "status",
    } <= set(table.columns)
    complete = table[table.status == "complete"]
    assert result.best_metric == complete.objective.max()
    # the first trial is the base config's own point, the one to beat
    assert summary["baseline"]["config"] == {"defenses.invgan.params.steps": 20, "defenses.invgan.params.lr": 0.05}
    lines = [ln for ln in printed.splitlines() if re.match(r"\[\d/4\] trial ", ln)]
    assert len(lines) == 4 and all("best so far" in ln and "steps=" in ln for ln in lines)
    assert "Trial status" not in printed and "Configuration for experiment" not in printed


def test_best_yaml_reproduces_the_best_trial_through_invgan_eval(defense_search, tmp_path):
    from jobs.config import load_config
    from jobs.evaluate import evaluate
    from jobs.sharded import JobOptions

    search, result, _, tmp = defense_search
    out = tmp / "out"
    raw = yaml.safe_load((out / "best.yaml").read_text())
    assert raw["defenses"]["invgan"]["params"] == {
        "steps": result.best_config["defenses.invgan.params.steps"],
        "lr": result.best_config["defenses.invgan.params.lr"],
    }
    sets = re.findall(r"--set (\S+)", result.summary["reproduce"])
    assert "split=validation" in sets
    cfg = load_config(out / "best.yaml", [*sets, "resources.num_workers=1"], mlflow={"tracking_uri": _uri(tmp_path)})
    res = evaluate(cfg, JobOptions(out=tmp_path / "eval", progress=False))
    assert res.summary["accuracy"]["invgan"]["fgsm"] == result.best_metric  # exactly: same seed, same ids


def test_no_test_id_reaches_a_trial(defense_search):
    _, result, _, tmp = defense_search
    val, test = set(load_dataset("digits", "validation").ids), set(load_dataset("digits", "test").ids)
    files = [Path(f) / "rows.parquet" for f in result.trials.folder if (Path(f) / "rows.parquet").exists()]
    assert len(files) == (result.trials.status == "complete").sum() >= 1
    assert all(Path(f).parent == tmp / "out" / "tune" for f in result.trials.folder)  # Tune's trial folders
    seen = set(pd.concat([pd.read_parquet(f) for f in files]).example_id)
    assert seen and seen <= val and not seen & test


def test_inverter_search_saves_a_loadable_inverter_naming_its_lambdas(ray_instance, tmp_path):
    from invgan_core.checkpoint import load_model

    raw = {
        "name": "inv_smoke",
        "kind": "inverter",
        "base": str(ROOT / "configs" / "smoke.yaml"),
        "space": {
            "lambda_semantic": {"loguniform": {"low": 10.0, "high": 300.0}},
            "eta": {"uniform": {"low": 0.1, "high": 0.5}},
        },
        "objective": {"metric": "t0_accuracy"},
        "inverter": {"steps": 200, "report_every": 100, "batch_size": 32},
        "search": {"num_samples": 2, "max_concurrent_trials": 2, "include_base": False, "seed": 1},
        "scheduler": {"kind": "none"},
        "validation": {"limit": 64},
        "mlflow": {"tracking_uri": _uri(tmp_path)},
    }
    path = tmp_path / "inv.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = run_search(load_search(path), out=tmp_path / "out", progress=False)
    assert (result.trials.status == "complete").sum() == 2
    model, manifest = load_model(tmp_path / "out" / "best-weights" / "inverter", kind="inverter")
    assert manifest["training"]["lambda_semantic"] == pytest.approx(result.best_config["lambda_semantic"])
    assert manifest["training"]["eta"] == pytest.approx(result.best_config["eta"])
    assert manifest["training"]["eval_split"] == "validation" and manifest["training"]["steps_done"] == 200
    best = yaml.safe_load((tmp_path / "out" / "best.yaml").read_text())
    assert Path(best["weights"]) == tmp_path / "out" / "best-weights"
    client, _, children = _children(_uri(tmp_path), result.mlflow_parent_run_id)
    for child in children:
        assert [m.step for m in client.get_metric_history(child.info.run_id, "t0_accuracy")] == [100, 200]
        assert client.get_metric_history(child.info.run_id, "latent_error")
    # the best inverter is the parent run's logged model, with its manifest
    parent = client.get_run(result.mlflow_parent_run_id)
    logged = client.get_logged_model(parent.data.tags["best_inverter.model_id"])
    assert logged.source_run_id == parent.info.run_id and logged.tags["sha256"] == manifest["sha256"]


def test_red_search_measures_attacked_validation_images_with_a_dictionary_from_the_rest(ray_instance, tmp_path):
    from invgan_core.red import load_dictionary

    raw = {
        "name": "red_smoke_search",
        "kind": "red",
        "base": str(ROOT / "configs" / "red_smoke.yaml"),
        "base_set": {"methods": ["cnn", "bsd_gan"], "init_restarts": 2, "init_steps": 10},
        "space": {
            "lam_multiplier": {"uniform": {"low": 0.1, "high": 0.7}},
            "steps": {"randint": {"low": 10, "high": 30}},
        },
        "objective": {"metric": "attack_accuracy", "method": "bsd_gan"},
        "search": {"num_samples": 2, "max_concurrent_trials": 2},
        "scheduler": {"kind": "none"},
        "validation": {"limit": 16, "shard_size": 8},
        "mlflow": {"tracking_uri": _uri(tmp_path)},
    }
    path = tmp_path / "red.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = run_search(load_search(path), out=tmp_path / "out", progress=False)
    assert (result.trials.status == "complete").sum() == 2 and 0 <= result.best_metric <= 1
    val, fit = load_dataset("digits", "validation"), load_dataset("digits", "fit")
    dic = load_dictionary(tmp_path / "out" / "dictionary")[0]
    assert len(dic.source_index) == 2 * 5 * 10 and int(dic.source_index.max()) < len(fit)  # drawn from `fit`
    rows = pd.concat(pd.read_parquet(Path(f) / "rows.parquet") for f in result.trials.folder)
    assert set(rows.example_id) <= set(val.ids[:16])
    best = yaml.safe_load((tmp_path / "out" / "best.yaml").read_text())
    assert best["lam_multiplier"] == pytest.approx(result.best_config["lam_multiplier"])
