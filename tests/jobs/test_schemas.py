"""One row schema per job: the workers' rows, the files the runner writes and the report's checks all follow it.
In-process (no Ray): the workers run one small shard each."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from jobs.config import load_config
from jobs.run_folder import read_rows, shard_path, write_shard
from jobs.run_tables import validate_rows
from jobs.schemas import EVAL_ROWS, RED_ROWS, WHERE_COLUMNS, Schema, SchemaError

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class _Row:
    example_id: int
    name: str
    score: float
    ok: bool


def test_rows_are_built_by_name_and_a_missing_or_unknown_column_is_named():
    schema = Schema(_Row)
    frame = schema.frame(3, example_id=[4, 5, 6], name="fgsm", score=[0.5, 1.0, 2.0], ok=[True, False, True])
    assert list(frame.columns) == ["example_id", "name", "score", "ok"]
    assert [str(frame[c].dtype) for c in ("example_id", "score", "ok")] == ["int64", "float64", "bool"]
    assert pd.api.types.is_string_dtype(frame["name"])
    assert frame["name"].tolist() == ["fgsm"] * 3  # a scalar is repeated
    with pytest.raises(SchemaError, match="missing ok; unknown okay"):
        schema.frame(1, example_id=[1], name="a", score=[0.0], okay=[True])
    with pytest.raises(SchemaError, match="_Row.score: 2 values for 3 rows"):
        schema.frame(3, example_id=[1, 2, 3], name="a", score=[0.0, 1.0], ok=True)


def test_the_runner_writes_nothing_that_is_not_the_schema(tmp_path):
    schema = Schema(_Row)
    good = schema.frame(2, example_id=[1, 2], name="a", score=[0.0, 1.0], ok=True).assign(node="n", worker="h:1")
    write_shard(shard_path(tmp_path, 0), good, schema)
    assert pq.read_schema(shard_path(tmp_path, 0)).remove_metadata() == schema.stored
    assert read_rows(tmp_path, schema).equals(good)
    with pytest.raises(SchemaError, match="unknown extra"):
        write_shard(shard_path(tmp_path, 1), good.assign(extra=1), schema)
    with pytest.raises(SchemaError, match="missing score"):
        write_shard(shard_path(tmp_path, 1), good.drop(columns="score"), schema)
    with pytest.raises(SchemaError, match="type"):
        write_shard(shard_path(tmp_path, 1), good.assign(example_id=["one", "two"]), schema)
    assert not shard_path(tmp_path, 1).exists()
    assert list(read_rows(tmp_path / "empty", schema).columns) == schema.columns + list(WHERE_COLUMNS)


def test_the_eval_workers_rows_are_the_eval_schema_and_pass_the_reports_checks():
    from jobs.evaluate import EvalWorker

    cfg = load_config(ROOT / "configs" / "smoke.yaml", ["limit=2"])
    rows = EvalWorker(cfg.model_dump(mode="json")).run_shard(0, 0, 2)
    assert list(rows.columns) == EVAL_ROWS.columns
    EVAL_ROWS.table(rows.assign(node="n", worker="h:1"))  # every column has its schema's type
    validate_rows(rows)  # the report reads what the worker wrote
    with pytest.raises(ValueError, match="rows lack column"):
        validate_rows(rows.drop(columns="queries"))
    validate_rows(rows.drop(columns=list(EVAL_ROWS.added_later)))  # rows of runs from before those columns


def test_the_red_workers_rows_are_the_red_schema(tmp_path):
    from jobs.red import RedConfig, RedWorker, build_or_load_dictionary

    cfg = load_config(
        ROOT / "configs" / "red_smoke.yaml",
        ["steps=5", "init_restarts=1", "init_steps=2", "dictionary.per_class=2", "sbsc_per_class=2"],
        model=RedConfig,
        limit=2,
    )
    build_or_load_dictionary(cfg, tmp_path)
    rows = RedWorker(cfg.model_dump(mode="json"), str(tmp_path)).run_shard(0, 0, 2)
    assert list(rows.columns) == RED_ROWS.columns
    RED_ROWS.table(rows.assign(node="n", worker="h:1"))
    assert len(rows) == 2 * 3 * len(cfg.methods)


def test_every_schema_column_is_documented_and_typed():
    for schema in (EVAL_ROWS, RED_ROWS):
        assert set(schema.types.values()) <= {int, float, bool, str}
        assert schema.added_later <= set(schema.columns)
        assert not set(WHERE_COLUMNS) & set(schema.columns)


def test_rows_built_by_position_are_gone():
    """Every writer builds its rows through its schema: no job module lists its columns by hand."""
    for module in ("evaluate", "red", "curves", "run_tables", "paper_report"):
        text = (ROOT / "jobs" / f"{module}.py").read_text()
        assert "_COLUMNS = [" not in text and "COLUMNS = {" not in text, module
        assert "pd.DataFrame(rows, columns=" not in text, module


def test_a_frame_of_the_eval_schema_round_trips_through_a_shard(tmp_path):
    rows = EVAL_ROWS.frame(
        2,
        **{
            c: (["a", "b"] if t is str else [True, False] if t is bool else [1, 2] if t is int else [0.5, 1.5])
            for c, t in EVAL_ROWS.types.items()
        },
    ).assign(node="n", worker="h:1")
    write_shard(shard_path(tmp_path, 0), rows, EVAL_ROWS)
    pd.testing.assert_frame_equal(read_rows(tmp_path, EVAL_ROWS), rows)
