"""`invgan red` end to end on digits: Ray Data, Parquet rows, RED Table 1 tables, MLflow."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from jobs.red import RedConfig, red_tables, run_red
from jobs.schemas import RED_ROWS, WHERE_COLUMNS
from jobs.sharded import JobOptions

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def red_run(tmp_path_factory):
    import ray

    tmp = tmp_path_factory.mktemp("red")
    raw = yaml.safe_load((ROOT / "configs" / "red_smoke.yaml").read_text())
    raw.update(limit=8, shard_size=4, mlflow={"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}"})
    cfg = RedConfig.model_validate(raw)
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    try:
        yield cfg, run_red(cfg, JobOptions(out=tmp / "run", progress=False)), tmp
    finally:
        ray.shutdown()


def _unpack(res):
    """rows, the tables of the summary (as DataFrames), run folder, MLflow run id."""
    tables = {k: pd.DataFrame(v) for k, v in res.summary.items()}
    return res.rows, tables, res.run_dir, res.mlflow_run_id


def test_rows_have_the_schema_and_one_row_per_example_input_method(red_run):
    cfg, res, _ = red_run
    rows, tables, run_dir, run_id = _unpack(res)
    assert list(rows.columns) == RED_ROWS.columns + list(WHERE_COLUMNS)  # + node and worker: where each shard ran
    assert rows.node.str.len().min() > 0 and rows.worker.str.contains(":").all()
    assert not rows.duplicated(["example_id", "attack_type", "method"]).any()
    assert len(rows) == 8 * 3 * len(cfg.methods)  # clean + 2 attack types
    assert set(rows.attack_type) == {"clean", "linf", "l2"}
    assert (rows[rows.method == "cnn"].attack_pred == -1).all()
    assert rows[rows.method != "cnn"].attack_pred.isin([0, 1]).all()
    assert (run_dir / "dictionary.safetensors").exists()


def test_tables_are_derived_from_the_rows(red_run):
    cfg, res, _ = red_run
    rows, tables, run_dir, run_id = _unpack(res)
    again = red_tables(rows, ["linf", "l2"])
    bsd = rows[(rows.method == "bsd_gan") & (rows.attack_type == "linf")]
    assert tables["attack_accuracy"].loc["bsd_gan", "linf"] == pytest.approx((bsd.attack_pred == 0).mean())
    cnn_clean = rows[(rows.method == "cnn") & (rows.attack_type == "clean")]
    assert tables["signal_accuracy"].loc["cnn", "clean"] == pytest.approx(
        (cnn_clean.signal_pred == cnn_clean.label).mean()
    )
    pd.testing.assert_frame_equal(  # the summary holds the tables as JSON: labels compared as values
        again["signal_accuracy"],
        tables["signal_accuracy"],
        check_names=False,
        check_index_type=False,
        check_column_type=False,
        check_dtype=False,
    )
    # the CNN is fooled by the attacks that built the dictionary; it is right on clean digits
    assert tables["signal_accuracy"].loc["cnn", "linf"] < tables["signal_accuracy"].loc["cnn", "clean"]


def test_mlflow_run_holds_tables_and_the_confusion_matrix(red_run):
    from mlflow.tracking import MlflowClient

    cfg, res, tmp = red_run
    rows, tables, run_dir, run_id = _unpack(res)
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.data.metrics["attack_accuracy/bsd_gan/linf"] == pytest.approx(
        tables["attack_accuracy"].loc["bsd_gan", "linf"]
    )
    paths = {a.path for a in client.list_artifacts(run_id, "figures")} | {
        a.path for a in client.list_artifacts(run_id, "tables")
    }
    assert {"figures/attack_confusion.png", "tables/signal_accuracy.json", "tables/attack_accuracy.json"} <= paths
    assert "Attack-type accuracy" in run.data.tags["mlflow.note.content"]


def test_rerun_reuses_the_dictionary_and_the_shards(red_run):
    cfg, res, _ = red_run
    rows, tables, run_dir, run_id = _unpack(res)
    stamp = (run_dir / "dictionary.safetensors").stat().st_mtime_ns
    rows2 = run_red(cfg, JobOptions(out=run_dir, progress=False, log_mlflow=False)).rows
    assert (run_dir / "dictionary.safetensors").stat().st_mtime_ns == stamp
    assert (
        rows2.sort_values(["example_id", "attack_type", "method"])
        .reset_index(drop=True)
        .equals(rows.sort_values(["example_id", "attack_type", "method"]).reset_index(drop=True))
    )


def test_theory_figures_show_mu_growing_with_m_and_linear_convergence():
    from jobs.red import theory_figures

    result = theory_figures(ms=(30, 300), n=3, steps=300)
    numbers = result["numbers"]
    assert numbers["mean_mu/leaky_relu"][1] > numbers["mean_mu/leaky_relu"][0] > 0  # RED Fig. 1's trend
    assert 0 < numbers["rate_m100"] < 1  # a contraction per step: linear convergence
    assert numbers["attack_type_recovered"] == 1.0
    assert set(result["figures"]) == {"mu_vs_m", "convergence"}


def test_rerun_with_mlflow_continues_the_same_run(red_run):
    from mlflow.tracking import MlflowClient

    cfg, res, tmp = red_run
    rows, tables, run_dir, run_id = _unpack(res)
    again = run_red(cfg, JobOptions(out=run_dir, progress=False)).mlflow_run_id
    assert again == run_id
    run = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}").get_run(run_id)
    assert run.data.params["steps"] == str(cfg.steps) and run.data.params["dictionary.per_class"] == "5"
