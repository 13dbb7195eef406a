"""A real multi-node Ray cluster on this machine: `invgan cluster up --local`, `invgan submit`, a lost node.

One cluster (head + 1 worker node, 1 CPU each, an MLflow server) serves the module; the tests run in
file order and the last one kills the worker node, so it must stay last. Teardown always runs `down`
and checks that every process the cluster started is gone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from cluster.local import _processes, cluster_pids, down, up
from jobs.config import load_config
from jobs.run_folder import read_rows
from jobs.schemas import EVAL_ROWS

PROJECT = Path(__file__).resolve().parents[2]
IGNORED = ["seconds", "attack_seconds", "node", "worker"]  # where and how long, not what


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    env = os.environ | {"INVGAN_RUNS": str(runs)}
    env.pop("RAY_ADDRESS", None)
    old = os.environ.get("INVGAN_RUNS")
    os.environ["INVGAN_RUNS"] = str(runs)
    state = up(workers=1, head_cpus=1, worker_cpus=1)
    started = cluster_pids(state)
    try:
        yield state, env
    finally:
        stopped = down()
        if old is None:
            os.environ.pop("INVGAN_RUNS", None)
        else:
            os.environ["INVGAN_RUNS"] = old
        time.sleep(1)
        alive = [pid for pid in started if _alive(pid)]
        assert not alive, f"processes of the local cluster still alive after down: {alive}"
        assert stopped and not Path(state.temp_dir).exists()


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _invgan(env, *args, timeout=420) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "invgan", *args], env=env, cwd=PROJECT, capture_output=True, text=True, timeout=timeout
    )


def _plain(frame: pd.DataFrame) -> pd.DataFrame:
    """numpy floats (NaN for missing) and strings, whatever backend (Arrow from Ray Data, numpy here) held them."""
    return pd.DataFrame(
        {
            c: frame[c].to_numpy(dtype=float, na_value=float("nan"))
            if pd.api.types.is_numeric_dtype(frame[c]) or pd.api.types.is_bool_dtype(frame[c])
            else frame[c].astype(str).to_numpy()
            for c in frame
        }
    )


def _run_dir(state, name: str) -> Path:
    (found,) = Path(state.runs_dir).glob(f"{name}-*")
    return found


def test_submitted_eval_spreads_over_both_nodes_and_matches_the_in_process_rows(cluster):
    state, env = cluster
    overrides = ["shard_size=2", "name=cluster-smoke"]
    sets = [a for o in overrides for a in ("--set", o)]
    proc = _invgan(env, "submit", "--", "eval", "--config", "configs/smoke.yaml", *sets)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "SUCCEEDED" in proc.stderr and "Accuracy" in proc.stdout
    assert " INFO " not in proc.stdout, "Ray's INFO log stream leaked into the job's output"

    run_dir = _run_dir(state, "cluster-smoke")
    rows = read_rows(run_dir, EVAL_ROWS)
    assert rows["node"].nunique() == 2, f"every shard ran on one node: {rows['node'].unique()}"
    assert not rows.duplicated(["example_id", "attack", "defense"]).any()

    # the same shards computed in this process give the same rows (the cluster changes where, not what)
    import torch

    from jobs.evaluate import EvalWorker

    threads = torch.get_num_threads()
    cfg = load_config("configs/smoke.yaml", overrides)
    worker = EvalWorker(cfg.model_dump(mode="json"))
    local = pd.concat([worker.run_shard(k, a, min(a + 2, 16)) for k, a in enumerate(range(0, 16, 2))])
    torch.set_num_threads(threads)
    key = ["shard", "example_id", "attack", "defense"]
    remote = rows.drop(columns=IGNORED).sort_values(key).reset_index(drop=True)
    local = local.drop(columns=[c for c in IGNORED if c in local]).sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(_plain(remote[local.columns]), _plain(local))

    # recorded in the cluster's MLflow server, FINISHED, with the results and progress of all 8 shards
    from mlflow.tracking import MlflowClient

    record = json.loads((run_dir / "mlflow_run.json").read_text())
    assert record["tracking_uri"] == state.mlflow_uri
    run = MlflowClient(state.mlflow_uri).get_run(record["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["progress/shards_done"] == 8 and "accuracy/none/clean" in run.data.metrics
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["shards"]["computed"] == 8 and summary["shards"]["lost_workers"] == []


def test_jobs_list_and_logs_show_the_submitted_job(cluster):
    _, env = cluster
    listed = _invgan(env, "jobs", "list", timeout=60)
    assert listed.returncode == 0 and "SUCCEEDED" in listed.stdout
    assert "eval --config configs/smoke.yaml" in listed.stdout
    job_id = next(w for w in listed.stdout.split() if w.startswith("raysubmit"))
    logs = _invgan(env, "jobs", "logs", job_id, timeout=60)
    assert logs.returncode == 0 and "shards: 8 computed" in logs.stdout


def test_more_workers_than_the_cluster_holds_fail_with_what_to_change(cluster):
    _, env = cluster
    proc = _invgan(
        env,
        "submit",
        "--env",
        "INVGAN_WAIT_FOR_WORKERS_S=5",
        "--",
        "eval",
        "--config",
        "configs/smoke.yaml",
        "--no-mlflow",
        "--set",
        "resources.num_workers=3",
        "--set",
        "name=too-big",
        timeout=180,
    )
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "3 worker(s) of 1 CPU(s) did not all start within 5 s" in proc.stdout + proc.stderr
    assert "Lower resources.num_workers" in proc.stdout + proc.stderr


@pytest.mark.reliability(kind="fault")
def test_a_lost_worker_node_costs_a_retry_not_a_row(cluster):
    """Kill the worker node (raylet and its actors, SIGKILL) while the job runs: the runner reruns the
    shards that were lost on the head node, and every row is there exactly once."""
    state, env = cluster
    overrides = ["shard_size=2", "limit=40", "name=cluster-lost", "attacks.bpda.base.params.steps=20"]
    sets = [a for o in overrides for a in ("--set", o)]
    job = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "invgan",
            "submit",
            "--",
            "eval",
            "--config",
            "configs/smoke.yaml",
            "--no-mlflow",
            *sets,
        ],
        env=env,
        cwd=PROJECT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:  # wait until the worker node has finished a shard
            done = list(Path(state.runs_dir).glob("cluster-lost-*/rows/*.parquet"))
            if len(done) >= 3:
                break
            assert job.poll() is None, job.communicate()
            time.sleep(0.2)
        else:
            pytest.fail("no shard finished within 240 s")
        assert len(done) < 20, "the job finished before the node could be killed: make its shards slower"
        worker = next(n for n in state.nodes if n["role"] == "worker")
        victims = _processes({worker["pgid"]}, os.path.join(state.temp_dir, "w0"))
        for p in victims:
            os.kill(p.pid, signal.SIGKILL)
        out, err = job.communicate(timeout=400)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, out[-3000:] + err[-3000:]
    run_dir = _run_dir(state, "cluster-lost")
    rows = read_rows(run_dir, EVAL_ROWS)
    assert len(rows) == 40 * 2 * 3 and not rows.duplicated(["example_id", "attack", "defense"]).any()
    assert rows["example_id"].nunique() == 40
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["shards"]["lost_workers"], f"no lost worker recorded: {summary['shards']}"
    assert summary["shards"]["retried"] >= 1 and summary["shards"]["computed"] == 20
    assert "lost a worker" in out + err
