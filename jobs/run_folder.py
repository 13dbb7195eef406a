"""A job's run folder: where its shards, config record, lock, summary and progress log live.

    <runs>/<name>-<config hash>/          (or --out)
        config.json      the config and the weights' sha256 it ran with: a resume with another config stops
        .lock            one writer per folder (flock, released when the process exits)
        rows/shard-NNNNN.parquet   one file per shard, written atomically: complete or absent
        damaged/         shards found unreadable, moved aside and computed again
        summary.json, progress.log, mlflow_run.json

A rerun computes only the shards whose file is missing or unreadable. `--out` (or $INVGAN_RUNS) may be a URI
(s3://bucket/runs/x): the folder is then staged locally and each file pushed as it completes (jobs/storage.py).
"""

from __future__ import annotations

import fcntl
import io
import json
import math
import os
import socket
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from invgan_core.files import atomic_write_bytes, atomic_write_json
from jobs import storage
from jobs.common import runs_root
from jobs.schemas import Schema


def run_folder(cfg, out: str | Path | None) -> Path:
    """--out, or <runs>/<name>-<config hash> (any job config), as a local folder: a URI's local stand-in."""
    location = out or storage.join(runs_root(), f"{cfg.name}-{cfg.config_hash()[:12]}")
    return storage.stand_in(str(location)) if storage.is_uri(location) else storage.local_path(location)


def plan_shards(n_examples: int, shard_size: int) -> list[tuple[int, int, int]]:
    """(shard, start, stop) covering positions 0..n-1 in order."""
    return [
        (k, k * shard_size, min(n_examples, (k + 1) * shard_size)) for k in range(math.ceil(n_examples / shard_size))
    ]


def shard_path(run_dir: Path, shard: int) -> Path:
    return run_dir / "rows" / f"shard-{shard:05d}.parquet"


def missing_shards(run_dir: Path, shards: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """The shards still to compute: no file, or a file that is not a readable Parquet file (damaged on disk
    after it was written: moved to <run>/damaged/ with a warning, then computed again)."""
    return [s for s in shards if not _readable_shard(shard_path(run_dir, s[0]))]


def _readable_shard(path: Path) -> bool:
    if not path.exists():
        return False
    try:
        pq.read_metadata(path)  # the footer: a truncated or overwritten file fails here
        return True
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a damaged file
        damaged = path.parent.parent / "damaged"  # beside rows/, so it is not read or uploaded as rows
        damaged.mkdir(exist_ok=True)
        target = damaged / f"{path.name}.{time.strftime('%Y%m%dT%H%M%S')}"
        path.replace(target)
        stage = storage.stage_of(path)
        if stage is not None:  # the URI's copy is the damaged one: move it aside there too
            stage.move(path.relative_to(stage.local).as_posix(), target.relative_to(stage.local).as_posix())
        print(
            f"warning: {path} is damaged ({type(err).__name__}: {str(err).splitlines()[0][:120]}); "
            f"moved to {target} and computing the shard again",
            file=sys.stderr,
            flush=True,
        )
        return False


def write_shard(path: Path, frame: pd.DataFrame, schema: Schema | None = None) -> None:
    """Parquet bytes written atomically (temp file, fsync, rename): a shard file is complete or absent. With a
    schema, the rows are checked against it first (SchemaError: nothing is written)."""
    buffer = io.BytesIO()
    if schema is None:
        frame.to_parquet(buffer, index=False)
    else:
        pq.write_table(schema.table(frame), buffer)
    atomic_write_bytes(path, buffer.getvalue())
    storage.push(path)


def read_rows(run_dir: Path, schema: Schema) -> pd.DataFrame:
    """Every shard's rows of a run folder, those of its added rounds too (`rounds/*/rows/`, jobs/precision.py);
    no rows: an empty frame with the schema's stored columns."""
    files = sorted((run_dir / "rows").glob("shard-*.parquet")) + sorted(run_dir.glob("rounds/*/rows/shard-*.parquet"))
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True) if files else schema.empty()


def weights_hashes(cfg) -> dict[str, str]:
    """sha256 of every model file the job uses, from the (verified) manifests."""
    root = cfg.weights_dir()
    return {
        k: json.loads((root / f"{k}.json").read_text())["sha256"]
        for k in ("generator", "classifier", "inverter")
        if (root / f"{k}.json").exists()
    }


_LOCKS: dict[Path, object] = {}  # run folder -> the open lock file this process holds until it exits


def lock_run_dir(run_dir: Path) -> None:
    """One writer per run folder: a second process asked to write it at once stops with a clear message
    instead of interleaving shards. The lock (flock on <run>/.lock) is released when the process exits,
    however it exits; the same process may prepare the folder again (a rerun in a notebook or a test)."""
    run_dir = run_dir.resolve()
    if run_dir in _LOCKS:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = (run_dir / ".lock").open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise SystemExit(
            f"{storage.where(run_dir)} is being written by {holder}: wait for it to finish, or choose another --out"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
    handle.flush()
    _LOCKS[run_dir] = handle


def prepare_run_dir(cfg, run_dir: Path) -> None:
    """Create the run folder, or check that the one found holds the same config and the same weights
    (so a resume never mixes rows of two configs, or of weights retrained in place)."""
    lock_run_dir(run_dir)
    stage = storage.stage_of(run_dir)
    if stage is None:
        _check_config(cfg, run_dir)
        return
    stage.take_lease()  # a URI: one writer there too, and the local folder made a copy of what it holds
    try:
        stage.pull()
        _check_config(cfg, run_dir)
    except BaseException:
        stage.release_lease()
        raise


def _check_config(cfg, run_dir: Path) -> None:
    recorded = run_dir / "config.json"
    current = {
        "config_hash": cfg.config_hash(),
        "weights_sha256": weights_hashes(cfg),
        "config": cfg.model_dump(mode="json"),
    }
    if recorded.exists():
        previous = json.loads(recorded.read_text())
        if previous.get("config_hash") != current["config_hash"]:
            raise SystemExit(
                f"{storage.where(run_dir)} holds results of a different config "
                f"({previous.get('config_hash', '?')[:12]}); choose another --out or delete the folder"
            )
        if previous.get("weights_sha256", current["weights_sha256"]) != current["weights_sha256"]:
            raise SystemExit(
                f"{storage.where(run_dir)} holds results of other weights than {cfg.weights_dir()} now has;"
                " choose another --out or delete the folder"
            )
    else:
        atomic_write_json(recorded, current)
        storage.push(recorded)
