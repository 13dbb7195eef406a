"""One row schema per job: the typed row a job's workers write, the Arrow schema of its Parquet shards and the
column list its readers and the report use, all derived from one dataclass. The writer (a worker's `run_shard`),
the runner that writes shards (jobs/sharded.py), the reader (`read_rows`) and the report (jobs/run_tables.py,
jobs/paper_report.py) import the schema from here, so none of them can drift from the others.

A worker builds its rows by name, never by position: `EVAL_ROWS.frame(example_id=ids, label=y, ...)` with one
array (or one scalar, repeated) per column; a missing or unknown column raises before anything is written.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, get_type_hints

import numpy as np
import pandas as pd
import pyarrow as pa

_ARROW = {int: pa.int64(), float: pa.float64(), bool: pa.bool_(), str: pa.string()}
_PANDAS = {int: "int64", float: "float64", bool: "bool", str: "object"}

WHERE_COLUMNS = ("node", "worker")  # appended by the runner to every sharded job's rows: where the shard ran


class SchemaError(ValueError):
    """Rows whose columns or types are not their job's schema: a bug in the writer, never written to disk."""


class Schema:
    """The columns (name → Python type, in order) of one job's rows, from its row dataclass."""

    def __init__(self, row: type, *, added_later: tuple[str, ...] = ()):
        hints = get_type_hints(row)
        self.row = row
        self.types: dict[str, type] = {f.name: hints[f.name] for f in dataclasses.fields(row)}
        self.columns: list[str] = list(self.types)
        # columns that rows written by older versions lack: a reader accepts their absence (see run_tables)
        self.added_later = frozenset(added_later)
        self.arrow = pa.schema([(name, _ARROW[t]) for name, t in self.types.items()])
        self.stored = self.arrow.append(pa.field(WHERE_COLUMNS[0], pa.string())).append(
            pa.field(WHERE_COLUMNS[1], pa.string())
        )

    def frame(self, n: int, **columns: Any) -> pd.DataFrame:
        """n rows from one value or one length-n array per column, named: the columns must be exactly the
        schema's (SchemaError naming the missing and the unknown ones otherwise)."""
        self._check_names(set(columns), "rows built")
        data = {}
        for name, t in self.types.items():
            value = columns[name]
            array = np.full(n, value, dtype=object) if np.isscalar(value) else np.asarray(value)
            if len(array) != n:
                raise SchemaError(f"{self.row.__name__}.{name}: {len(array)} values for {n} rows")
            data[name] = pd.Series(array, dtype=_PANDAS[t]) if t is not str else pd.Series(array.astype(str))
        return pd.DataFrame(data, columns=self.columns)

    def table(self, frame: pd.DataFrame) -> pa.Table:
        """The Arrow table of a shard's rows (the schema's columns, then node and worker), type-checked: what the
        runner writes. SchemaError if the frame's columns are not exactly the schema's."""
        self._check_names(set(frame.columns) - set(WHERE_COLUMNS), "rows to write")
        try:
            return pa.Table.from_pandas(frame[self.stored.names], schema=self.stored, preserve_index=False)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
            raise SchemaError(f"{self.row.__name__}: a column does not have its schema's type: {err}") from err

    def empty(self) -> pd.DataFrame:
        """No rows, with the stored columns (what a reader returns for a run folder with no shards yet)."""
        return self.stored.empty_table().to_pandas()

    def _check_names(self, names: set[str], what: str) -> None:
        missing, unknown = [c for c in self.columns if c not in names], sorted(names - set(self.columns))
        if missing or unknown:
            raise SchemaError(
                f"{what} do not match {self.row.__name__}: "
                + "; ".join(
                    part
                    for part in (
                        f"missing {', '.join(missing)}" if missing else "",
                        f"unknown {', '.join(unknown)}" if unknown else "",
                    )
                    if part
                )
            )


# ---------------------------------------------------------------- the jobs' rows


@dataclass(frozen=True)
class EvalRow:
    """`invgan eval` and `invgan curves`: one row per (example, attack, defense)."""

    example_id: int
    label: int
    attack: str  # "clean" for the unattacked input
    defense: str
    prediction: int  # the classifier's class of the purified input
    correct: bool
    detection_score: float  # NaN for a defense without a projection
    l2: float  # distortion of the attacked input (0 for clean)
    linf: float
    effective_iterations: int  # restart-steps the projection spent on this example
    seconds: float  # the defense's purification, per example
    attack_seconds: float  # the attack, per example, less the target's purification it counted
    attacked: bool
    queries: int  # the attack's model evaluations for this example (first-success attacks stop early)
    shard: int
    diverged: bool  # NaN/inf or a latent beyond DIVERGED_LATENT: counted, never scored


@dataclass(frozen=True)
class RedRow:
    """`invgan red`: one row per (example, attack type, method). The BSD-GAN row carries both BSD-GAN's signal
    class and BSD-GAN-AD's attack type; SBSC's carries SBSC and SBSAD."""

    example_id: int
    label: int
    attack_type: str  # "clean" or a dictionary attack's name
    signal_pred: int
    attack_pred: int  # index into the dictionary's attack types; -1 for the CNN
    method: str
    seconds: float  # per example
    final_loss: float  # NaN for the CNN
    shard: int


EVAL_ROWS = Schema(EvalRow, added_later=("attack_seconds", "diverged"))
RED_ROWS = Schema(RedRow)
