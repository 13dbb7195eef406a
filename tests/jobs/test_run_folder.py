"""The run folder's rules, without Ray: one writer per run folder."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from jobs.config import load_config
from jobs.run_folder import prepare_run_dir
from jobs.schemas import Schema

SMOKE = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"


@pytest.mark.reliability(kind="fault")
def test_a_second_process_writing_the_same_run_folder_is_refused(tmp_path):
    cfg = load_config(SMOKE)
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(SMOKE.parents[1])!r})
        from pathlib import Path
        from jobs.config import load_config
        from jobs.run_folder import prepare_run_dir
        prepare_run_dir(load_config({str(SMOKE)!r}), Path({str(run_dir)!r}))
        print("locked", flush=True)
        time.sleep(60)
    """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit, match=rf"is being written by pid {holder.pid} .*choose another --out"):
            prepare_run_dir(cfg, run_dir)
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    prepare_run_dir(cfg, run_dir)  # the lock died with its process
    prepare_run_dir(cfg, run_dir)  # and this process may prepare its own folder again


@pytest.mark.reliability(kind="fault")
def test_two_evaluations_log_to_one_fresh_sqlite_store_at_once(tmp_path):
    """Two real `invgan eval` processes, one new SQLite store: both finish, each with its own FINISHED run
    (no 'database is locked', no migration race)."""
    import json
    import os

    from mlflow.tracking import MlflowClient

    env = os.environ | {"INVGAN_RUNS": str(tmp_path / "runs"), "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "invgan",
                "eval",
                "--config",
                str(SMOKE),
                "--set",
                f"name={n}",
                "--set",
                "shard_size=8",
                "--set",
                "resources.num_workers=1",
            ],
            cwd=SMOKE.parents[1],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for n in ("left", "right")
    ]
    outputs = [p.communicate(timeout=400)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    ids = {
        json.loads(next((tmp_path / "runs").glob(f"{n}-*/mlflow_run.json")).read_text())["run_id"]
        for n in ("left", "right")
    }
    assert len(ids) == 2 and all(client.get_run(i).info.status == "FINISHED" for i in ids)


def _eval(tmp_path, out: str, fault: str) -> subprocess.CompletedProcess:
    import os

    env = os.environ | {"INVGAN_RUNS": str(tmp_path / "runs"), "OMP_NUM_THREADS": "1", "INVGAN_INJECT_FAULT": fault}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "invgan",
            "eval",
            "--config",
            str(SMOKE),
            "--no-mlflow",
            "--out",
            str(tmp_path / out),
            "--set",
            "resources.num_workers=1",
        ],
        cwd=SMOKE.parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )


@pytest.mark.reliability(kind="fault")
def test_a_shard_that_fails_once_is_retried_and_every_row_is_there_once(tmp_path):
    import json

    from jobs.run_folder import read_rows
    from jobs.schemas import EVAL_ROWS

    proc = _eval(tmp_path, "run", f"{tmp_path}:1,2")  # the first attempts at shards 1 and 2 raise
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (
        "shard 1 failed (OSError: injected fault" in proc.stdout + proc.stderr
        or "shard 2 failed (OSError: injected fault" in proc.stdout + proc.stderr
    )
    rows = read_rows(tmp_path / "run", EVAL_ROWS)
    assert len(rows) == 16 * 2 * 3 and not rows.duplicated(["example_id", "attack", "defense"]).any()
    shards = json.loads((tmp_path / "run" / "summary.json").read_text())["shards"]
    assert set(shards["failed_attempts"]) == {"1", "2"} and shards["retried"] >= 2
    assert all("injected fault" in m for m in shards["failed_attempts"].values())


@pytest.mark.reliability(kind="fault")
def test_a_shard_that_fails_every_time_stops_the_job_naming_it(tmp_path):
    proc = _eval(tmp_path, "run", f"{tmp_path / 'no-such-folder'}:0")  # the marker cannot be written: always fails
    assert proc.returncode != 0
    assert "shard 0 failed twice (FileNotFoundError" in proc.stdout + proc.stderr
    assert "finished shards are kept" in proc.stdout + proc.stderr


@dataclass(frozen=True)
class _Row:
    example_id: int
    shard: int


class _SlowWorker:
    """A worker whose shards outlast Ray Data's no-progress timeout (set to 1 s below)."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def run_shard(self, shard: int, start: int, stop: int):
        import pandas as pd

        time.sleep(self.seconds)
        return pd.DataFrame({"example_id": list(range(start, stop)), "shard": shard})


@pytest.mark.reliability(kind="fault")
def test_a_shard_slower_than_ray_datas_no_progress_timeout_is_waited_for(tmp_path):
    """Ray Data gives up on a dataset that moves no block for `execution_no_progress_timeout_s` (30 min by
    default); one shard of BPDA through Defense-GAN on a loaded machine takes longer. The runner turns that
    timeout off (lost workers are caught by its own retries): with the timeout at 1 s, 3-second shards finish."""
    import ray

    from jobs.config import Resources
    from jobs.run_folder import read_rows
    from jobs.sharded import run_shards

    ray.init(num_cpus=2, include_dashboard=False)
    try:
        ray.data.DataContext.get_current().execution_no_progress_timeout_s = 1
        run_shards(
            [(0, 0, 2), (1, 2, 4)],
            tmp_path,
            worker=_SlowWorker,
            worker_kwargs={"seconds": 3.0},
            resources=Resources(num_workers=1, num_cpus_per_worker=1),
            expected=lambda a, b: b - a,
            schema=Schema(_Row),
            desc="slow",
            progress=False,
        )
        assert sorted(read_rows(tmp_path, Schema(_Row))["example_id"]) == [0, 1, 2, 3]
    finally:
        ray.shutdown()
