"""Aggregation and MLflow reporting: known answers on hand-built rows, a real SQLite MLflow store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from invgan_core.detection import detection_auc
from jobs.run_tables import (
    flatten_config,
    image_grid,
    log_results,
    markdown_table,
    roc_figure,
    summarize,
    table_frame,
    write_summary,
)
from jobs.tracking import tracked_run


def _row(example_id: int, attack: str, defense: str, correct: bool, score: float = np.nan, l2: float = 1.0) -> dict:
    clean = attack == "clean"
    return dict(
        example_id=example_id,
        label=example_id % 10,
        attack=attack,
        defense=defense,
        prediction=example_id % 10 if correct else (example_id + 1) % 10,
        correct=bool(correct),
        detection_score=float(score),
        l2=0.0 if clean else l2,
        linf=0.0 if clean else l2 / 10,
        effective_iterations=0 if defense == "none" else 100,
        seconds=0.5,
        attacked=not clean,
        queries=0,
        shard=example_id // 2,
    )


def _frame(records: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(records).astype(
        {
            "example_id": "int64",
            "label": "int64",
            "prediction": "int64",
            "effective_iterations": "int64",
            "queries": "int64",
            "shard": "int64",
        }
    )


def _table_rows() -> pd.DataFrame:
    """invgan: each attack alone leaves 3/4 correct, but a different example fails each -> worst case 1/4.
    none: no detection scores; bpda runs only on examples 0-1 (a `limit`), so its worst case has n=2."""
    records = []
    invgan = {"clean": [1, 1, 1, 1], "fgsm": [0, 1, 1, 1], "pgd": [1, 0, 1, 1], "cw": [1, 1, 0, 1]}
    for attack, correct in invgan.items():
        attacked = attack != "clean"
        for i, c in enumerate(correct):  # attacked scores 10+i, clean scores i: perfectly separated
            records.append(_row(i, attack, "invgan", c, score=10.0 + i if attacked else float(i), l2=2.0))
    none = {"clean": [1, 1, 1, 0], "fgsm": [0, 0, 1, 0], "bpda": [1, 1]}
    for attack, correct in none.items():
        records += [_row(i, attack, "none", c, l2=4.0) for i, c in enumerate(correct)]
    return _frame(records)


def test_summarize_gives_known_accuracies_counts_and_worst_case():
    s = summarize(_table_rows())
    assert s["accuracy"]["invgan"] == {"clean": 1.0, "fgsm": 0.75, "pgd": 0.75, "cw": 0.75, "worst_case": 0.25}
    assert s["n"]["invgan"] == {"clean": 4, "fgsm": 4, "pgd": 4, "cw": 4, "worst_case": 4}
    assert list(s["accuracy"]["invgan"]) == ["clean", "fgsm", "pgd", "cw", "worst_case"]  # config order
    # none: worst case only over examples 0, 1 (the ones bpda ran on): both fail fgsm
    assert s["accuracy"]["none"] == {"clean": 0.75, "fgsm": 0.25, "bpda": 1.0, "worst_case": 0.0}
    assert s["n"]["none"] == {"clean": 4, "fgsm": 4, "bpda": 2, "worst_case": 2}
    assert s["mean_l2"] == {"fgsm": pytest.approx(3.0), "pgd": 2.0, "cw": 2.0, "bpda": 4.0}
    assert s["mean_linf"]["fgsm"] == pytest.approx(0.3)
    assert "clean" not in s["mean_l2"]
    assert s["seconds_per_example"]["invgan"]["pgd"] == 0.5
    # perfectly separated scores -> 1.0; defense "none" has no scores -> no AUC cells at all
    assert s["auc"] == {"invgan": {"fgsm": 1.0, "pgd": 1.0, "cw": 1.0}}


def test_rows_read_back_from_parquet_with_categorical_names_summarize_the_same(tmp_path: Path):
    rows = _table_rows()
    categorical = rows.astype({"attack": "category", "defense": "category"})
    pq.write_table(pa.Table.from_pandas(categorical), tmp_path / "r.parquet")
    back = pd.read_parquet(tmp_path / "r.parquet")
    assert isinstance(back["attack"].dtype, pd.CategoricalDtype)
    assert summarize(back) == summarize(rows)


def test_auc_negatives_are_the_clean_rows_of_the_attacked_examples_only():
    clean_scores = [0.1, 0.2, 5.0, 6.0]  # examples 2, 3 look "attacked" even when clean
    records = [_row(i, "clean", "invgan", True, score=s) for i, s in enumerate(clean_scores)]
    records += [_row(i, "bpda", "invgan", False, score=s) for i, s in [(0, 1.0), (1, 2.0)]]  # limit = 2
    records += [_row(i, "fgsm", "invgan", False, score=0.15 + 5 * (i >= 2)) for i in range(4)]
    s = summarize(_frame(records))
    assert s["auc"]["invgan"]["bpda"] == 1.0
    assert detection_auc(clean_scores, [1.0, 2.0]) == 0.5  # what pooling all clean rows would give
    # fgsm (all 4 examples): 0.15 and 5.15 (twice each) vs {0.1, 0.2, 5.0, 6.0} -> 8 of 16 pairs ranked right
    assert s["auc"]["invgan"]["fgsm"] == 0.5


def test_invalid_rows_are_refused_with_a_helpful_message():
    rows = _table_rows()
    with pytest.raises(ValueError, match=r"2 duplicate \(example_id, attack, defense\)"):
        summarize(pd.concat([rows, rows.iloc[:2]]))
    with pytest.raises(ValueError, match="lack column.*correct, .*shard"):
        summarize(rows.drop(columns=["correct", "shard"]))
    bad = rows.copy()
    bad.loc[0, "attacked"] = True  # a clean row flagged as attacked
    with pytest.raises(ValueError, match="1 row.*attacked"):
        summarize(bad)


def test_markdown_table_shows_every_defense_attack_and_count():
    s = summarize(_table_rows())
    text = markdown_table(s)
    lines = text.splitlines()
    assert len(lines) == 2 + 2  # header, rule, one line per defense
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["defense", "clean", "fgsm", "pgd", "cw", "bpda", "worst_case"]
    assert len({len(line) for line in lines}) == 1  # padded: columns line up as plain text
    for needle in ["invgan", "none", "0.25 (n=4)", "1.00 (n=2)", "0.00 (n=2)", "0.75 (n=4)"]:
        assert needle in text
    assert "| -" in lines[3]  # none has no pgd/cw cell
    auc = markdown_table(s, "auc")
    assert "1.0000 (n=4)" in auc and "none" not in auc and "clean" not in auc


def test_figures_have_one_panel_per_defense_and_one_row_per_image_set():
    rows = _table_rows()
    fig = roc_figure(rows)
    assert len(fig.axes) == 1  # only invgan has detection scores
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["fgsm (AUC=1.000, n=4)", "pgd (AUC=1.000, n=4)", "cw (AUC=1.000, n=4)"]
    rng = np.random.default_rng(0)
    x = rng.random((10, 1, 8, 8), dtype=np.float32)
    grid = image_grid(x, {"fgsm": x, "pgd": x}, {"invgan": x}, labels=np.arange(10), columns=6)
    assert len(grid.axes) == 4 * 6
    assert grid.axes[6].get_ylabel() == "attacked: fgsm" and grid.axes[0].get_title() == "y=0"
    with pytest.raises(ValueError, match="shape"):
        image_grid(x[:, 0], x, x)


def test_flatten_config_makes_dotted_string_params_within_mlflow_limits():
    flat = flatten_config({"attacks": {"pgd": {"params": {"eps": 0.3}, "base": None}}, "note": "x" * 7000, "d": {}})
    assert flat == {"attacks.pgd.params.eps": "0.3", "attacks.pgd.base": "None", "note": "x" * 6000, "d": "{}"}


def _artifact_json(client, run_id: str, path: str, dst: Path) -> dict:
    dst.mkdir()
    return json.loads(Path(client.download_artifacts(run_id, path, str(dst))).read_text())


def _log(tmp_path, rows_dir, summary, uri, config, figures):
    """One pass of a job as jobs/evaluate.py makes it: a tracked run, then its results."""
    with tracked_run(
        enabled=True,
        tracking_uri=uri,
        experiment="eval-digits",
        run_name="smoke-abc123",
        run_dir=tmp_path / "run",
        config_dict=config,
        tags={"dataset": "digits", "git_commit": "deadbeef"},
    ) as tracker:
        log_results(
            tracker.client,
            tracker.run_id,
            summary=summary,
            rows_dir=rows_dir,
            run_name="smoke-abc123",
            figures=figures,
            tags={"dataset": "digits"},
        )
    return tracker.run_id


def test_log_results_records_metrics_params_tables_figures_rows_and_resumes(tmp_path: Path):
    from mlflow.tracking import MlflowClient

    rows = _table_rows()
    rows_dir = tmp_path / "rows"
    rows_dir.mkdir()
    pq.write_table(pa.Table.from_pandas(rows, preserve_index=False), rows_dir / "shard-00000.parquet")
    summary = summarize(rows)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    config = {"name": "smoke", "attacks": {f"a{i}": {"kind": "fgsm", "params": {"eps": i}} for i in range(120)}}
    x = np.zeros((3, 1, 8, 8))
    figures = {"roc": roc_figure(rows), "images": image_grid(x, x, x)}
    run_id = _log(tmp_path, rows_dir, summary, uri, config, figures)

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.run_name == "smoke-abc123" and run.info.status == "FINISHED"
    assert run.data.metrics["accuracy/invgan/worst_case"] == 0.25
    assert run.data.metrics["accuracy/none/bpda"] == 1.0
    assert run.data.metrics["n/none/bpda"] == 2 and run.data.metrics["auc/invgan/pgd"] == 1.0
    assert "auc/none/fgsm" not in run.data.metrics and "wall_seconds" in run.data.metrics
    assert run.data.params["attacks.a7.params.eps"] == "7" and len(run.data.params) == 241  # > 100: chunked
    assert run.data.tags["dataset"] == "digits" and run.data.tags["git_commit"] == "deadbeef"
    assert markdown_table(summary) in run.data.tags["mlflow.note.content"]
    files = {f.path for folder in (None, "tables", "figures", "rows") for f in client.list_artifacts(run_id, folder)}
    assert {
        "tables/accuracy.json",
        "tables/auc.json",
        "figures/roc.png",
        "figures/images.png",
        "rows/shard-00000.parquet",
    } <= files
    table = _artifact_json(client, run_id, "tables/accuracy.json", tmp_path / "dl")
    assert table["columns"][:2] == ["defense", "clean"] and len(table["data"]) == 2
    assert json.loads((tmp_path / "run" / "mlflow_run.json").read_text())["run_id"] == run_id

    # resume: the run recorded in the run folder continues, tables replaced (not appended), a later shard added
    pq.write_table(pa.Table.from_pandas(rows, preserve_index=False), rows_dir / "shard-00001.parquet")
    assert _log(tmp_path, rows_dir, summary, uri, config, figures) == run_id
    assert len(client.search_runs([run.info.experiment_id])) == 1
    table = _artifact_json(client, run_id, "tables/accuracy.json", tmp_path / "dl2")
    assert len(table["data"]) == 2
    assert "rows/shard-00001.parquet" in {f.path for f in client.list_artifacts(run_id, "rows")}

    write_summary(tmp_path / "summary.json", summary, {"mlflow_run_id": run_id})
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["mlflow_run_id"] == run_id and written["accuracy"] == summary["accuracy"]
    assert written["auc"] == summary["auc"] and written["n"]["none"]["worst_case"] == 2
    assert table_frame(summary, "n").set_index("defense").at["none", "bpda"] == 2


@pytest.mark.parametrize("fate", ["error", "interrupt", "sigterm", "ray_sigterm"])
def test_run_is_running_during_the_job_and_ends_with_its_fate(tmp_path: Path, fate: str):
    """RUNNING while the job works; FAILED with the error, KILLED on Ctrl-C or on `ray job stop`'s SIGTERM;
    the rerun continues the same run, clears the old error and ends FINISHED."""
    import os
    import signal
    import time

    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    kwargs = dict(
        enabled=True,
        tracking_uri=uri,
        experiment="e",
        run_name="r",
        run_dir=tmp_path / "run",
        config_dict={"name": "r"},
        tags={},
    )
    expected = {
        "error": (ValueError, "FAILED"),
        "interrupt": (KeyboardInterrupt, "KILLED"),
        "sigterm": (KeyboardInterrupt, "KILLED"),
        "ray_sigterm": (SystemExit, "KILLED"),
    }[fate]
    handler = signal.getsignal(signal.SIGTERM)  # SIG_DFL, or Ray's if a test before this one ran ray.init
    with pytest.raises(expected[0]):
        with tracked_run(**kwargs) as tracker:
            assert client.get_run(tracker.run_id).info.status == "RUNNING"
            if fate == "error":
                raise ValueError("shard 3: boom")
            if fate == "interrupt":
                raise KeyboardInterrupt
            if fate == "ray_sigterm":  # what the SIGTERM handler ray.init installs does
                raise SystemExit(signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)  # what `ray job stop` sends the job's driver
            time.sleep(5)  # not reached: the handler raises
    run = client.get_run(tracker.run_id)
    assert run.info.status == expected[1]
    assert ("boom" in run.data.tags["error"]) if fate == "error" else run.data.tags["error"].startswith("interrupted")
    assert signal.getsignal(signal.SIGTERM) == handler  # the job's handler only while it runs

    with tracked_run(**kwargs) as again:
        pass
    run = client.get_run(again.run_id)
    assert again.run_id == tracker.run_id and run.info.status == "FINISHED" and "error" not in run.data.tags
