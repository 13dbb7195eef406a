"""A real multi-node Ray cluster on this machine: `invgan cluster up --local`, `invgan submit`, a lost node, and
run folders in an object store (a real S3 server, SeaweedFS).

One cluster (head + 1 worker node, 1 CPU each, an MLflow server) serves the module; the tests run in
file order and the last one kills the worker node, so it must stay last. Teardown always runs `down`
and checks that every process the cluster started is gone.

The jobs that write to the bucket (`--out s3://...`) run as on machines with their own disks: each node has
its own Ray folder (its copy of the job's working_dir), the driver stages the run folder in a folder of its
own, workers get what they need (the substitutes, the RED dictionary) through the object store, and the
shared runs folder stays empty.
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
from jobs import storage
from jobs.config import load_config
from jobs.run_folder import read_rows
from jobs.schemas import EVAL_ROWS, RED_ROWS
from tests.s3server import s3_server

PROJECT = Path(__file__).resolve().parents[2]
IGNORED = ["seconds", "attack_seconds", "node", "worker"]  # where and how long, not what


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with s3_server(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3):
    runs = tmp_path_factory.mktemp("runs")
    saved = dict(os.environ)
    os.environ.update(s3.env())  # the nodes reach the bucket by the standard AWS_* variables, as on a real cluster
    os.environ["INVGAN_RUNS"] = str(runs)
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    state = up(workers=1, head_cpus=1, worker_cpus=1, artifacts=s3.uri("mlflow"))  # MLflow's artifacts in the bucket
    started = cluster_pids(state)
    try:
        yield state, env
    finally:
        stopped = down()
        os.environ.clear()
        os.environ.update(saved)
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


def _background(env, *args) -> subprocess.Popen:
    """`invgan <args>` started, not waited for."""
    return subprocess.Popen(
        [sys.executable, "-m", "invgan", *args],
        env=env,
        cwd=PROJECT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(condition, job: subprocess.Popen, timeout: float) -> None:
    """Until `condition()` holds; fails if `job` ends first or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert job.poll() is None, job.communicate()
        if time.monotonic() > deadline:
            pytest.fail(f"not reached within {timeout:.0f} s")
        time.sleep(0.3)


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


# a substitute black box small enough for the suite: 20 seeds, 2 rounds of Jacobian augmentation, 3 epochs each
SUBSTITUTE = "attacks.sub={kind: substitute, params: {seeds: 20, rounds: 2, epochs: 3}}"


def test_submitted_eval_with_a_substitute_writes_every_row_once_to_the_bucket_and_matches_in_process(
    cluster, s3, tmp_path
):
    state, env = cluster
    uri = s3.uri("runs/cluster-smoke")
    overrides = ["shard_size=2", "name=cluster-smoke", SUBSTITUTE]
    sets = [a for o in overrides for a in ("--set", o)]
    stage = ["--env", f"INVGAN_STAGE={tmp_path / 'head-stage'}"]  # the driver's own folder
    proc = _invgan(env, "submit", *stage, "--", "eval", "--config", "configs/smoke.yaml", "--out", uri, *sets)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "SUCCEEDED" in proc.stderr and "Accuracy" in proc.stdout and f"run folder: {uri}" in proc.stdout
    assert " INFO " not in proc.stdout, "Ray's INFO log stream leaked into the job's output"
    assert not list(Path(state.runs_dir).glob("cluster-smoke-*")), "the run folder went to the shared folder"

    run_dir = tmp_path / "fetched"
    storage.fetch(uri, run_dir)  # `invgan fetch`: the run folder, brought home from the bucket
    rows = read_rows(run_dir, EVAL_ROWS)
    assert rows["node"].nunique() == 2, f"every shard ran on one node: {rows['node'].unique()}"
    assert not rows.duplicated(["example_id", "attack", "defense"]).any()
    assert set(rows["attack"]) == {"clean", "fgsm", "bpda", "sub"}

    # the same shards computed in this process, with the substitute from the bucket, give the same rows (the
    # cluster changes where, not what)
    import torch

    from jobs.evaluate import EvalWorker

    threads = torch.get_num_threads()
    cfg = load_config("configs/smoke.yaml", overrides)
    worker = EvalWorker(cfg.model_dump(mode="json"), str(run_dir))
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
    artifacts = storage.Stage.of(s3.uri("mlflow")).remote_files()  # the server put the run's artifacts there
    assert any(record["run_id"] in key for key in artifacts), sorted(artifacts)[:20]


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
def test_a_killed_red_driver_resumes_from_the_bucket_computing_only_the_missing_shards(cluster, s3, tmp_path):
    """`invgan red` submitted with its run folder in the bucket: its driver is killed (SIGKILL) once some shards
    are there; the same command submitted again computes only the missing shards, from another driver folder,
    and every row is in the bucket once."""
    _, env = cluster
    uri = s3.uri("runs/cluster-red")
    shards = storage.Stage.of(uri)
    command = ["--", "red", "--config", "configs/red_smoke.yaml", "--out", uri, "--no-mlflow"]
    command += ["--set", "shard_size=1", "--set", "limit=12"]  # 12 shards of a few seconds each
    first = _background(env, "submit", "--env", f"INVGAN_STAGE={tmp_path / 'a'}", *command)
    try:
        _wait_for(lambda: len([k for k in shards.remote_files() if k.startswith("rows/")]) >= 2, first, 300)
        for pid in _job_drivers("red --config configs/red_smoke.yaml"):
            os.kill(pid, signal.SIGKILL)
        first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    before = {k for k in shards.remote_files() if k.startswith("rows/")}
    assert 2 <= len(before) < 12, f"the driver was killed too late: {sorted(before)}"

    again = _invgan(env, "submit", "--env", f"INVGAN_STAGE={tmp_path / 'b'}", *command, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"shards: {12 - len(before)} computed, {len(before)} reused" in again.stdout
    run_dir = tmp_path / "fetched"
    storage.fetch(uri, run_dir)
    rows = read_rows(run_dir, RED_ROWS)
    assert rows["example_id"].nunique() == 12
    assert not rows.duplicated(["example_id", "attack_type", "method"]).any()


def _job_drivers(command: str) -> list[int]:
    """The pids of the submitted job's driver: the `python -m invgan <command> ...` process (and the shell Ray's
    job supervisor may have started it through)."""
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        line = " ".join(p.info["cmdline"] or [])
        if "-m invgan " + command in line and "submit" not in line:
            found.append(p.info["pid"])
    assert found, f"no driver process running {command!r}"
    return found


def test_a_submitted_search_runs_trials_on_both_nodes_and_keeps_everything_in_the_bucket(cluster, s3, tmp_path):
    """`invgan tune` submitted with its folder in the bucket: trials run on the head and on the worker node (each
    trial's start log names its Ray node), every trial's rows and the search's outputs are in the bucket, and the
    shared runs folder gets nothing."""
    state, env = cluster
    uri = s3.uri("tune/cluster")
    proc = _invgan(
        env,
        "submit",
        "--env",
        f"INVGAN_STAGE={tmp_path / 'stage'}",
        "--",
        "tune",
        "--config",
        "configs/tune/smoke.yaml",
        "--out",
        uri,
        "--no-mlflow",
        "--set",
        "scheduler.kind=none",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = storage.Stage.of(uri).remote_files()
    assert {"search.json", "trials.parquet", "best.yaml", "summary.json"} <= set(files)
    trials = [k.rsplit("/", 1)[0] for k in files if k.endswith("/rows.parquet") and k.count("/") == 2]  # tune/<trial>/
    assert len(trials) == 4, sorted(files)
    run_dir = tmp_path / "fetched"
    storage.fetch(uri, run_dir)
    nodes = {line.split(" node ")[1] for t in trials for line in (run_dir / t / "starts.log").read_text().splitlines()}
    assert len(nodes) == 2, f"every trial ran on one node: {nodes}"
    assert not (Path(state.runs_dir) / "tune").exists()


@pytest.mark.skipif(
    not os.environ.get("RUN_SLOW"),
    reason="70 s; make test runs Ray Train on 2 workers in tests/jobs/test_train_ray.py (agreement with 1 process)",
)
def test_submitted_training_on_two_ray_train_workers_writes_the_weights_on_the_driver(cluster, s3, tmp_path):
    """`invgan submit -- train inverter --workers 2`: two Ray Train workers (one per node), checkpoints in the
    bucket, the model files and manifest written by the driver."""
    _, env = cluster
    out = tmp_path / "weights"
    proc = _invgan(
        env,
        "submit",
        "--",
        "train",
        "inverter",
        "--dataset",
        "digits",
        "--generator",
        str(PROJECT / "weights" / "digits" / "generator"),
        "--steps",
        "8",
        "--workers",
        "2",
        "--storage",
        s3.uri("train"),
        "--out",
        str(out),
        "--quiet",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "inverter.safetensors").exists() and (out / "inverter.json").exists()
    assert json.loads((out / "inverter.json").read_text())["training"]["workers"] == 2
    assert any("checkpoint" in k for k in storage.Stage.of(s3.uri("train")).remote_files())  # resumable state


@pytest.mark.reliability(kind="fault")
def test_a_lost_worker_node_costs_a_retry_not_a_row(cluster):
    """Kill the worker node (raylet and its actors, SIGKILL) while the job runs: the runner reruns the
    shards that were lost on the head node, and every row is there exactly once."""
    state, env = cluster
    overrides = ["shard_size=2", "limit=40", "name=cluster-lost", "attacks.bpda.base.params.steps=20"]
    sets = [a for o in overrides for a in ("--set", o)]

    def shards() -> list[Path]:
        return list(Path(state.runs_dir).glob("cluster-lost-*/rows/*.parquet"))

    job = _background(env, "submit", "--", "eval", "--config", "configs/smoke.yaml", "--no-mlflow", *sets)
    try:
        _wait_for(lambda: len(shards()) >= 3, job, 240)  # the worker node has finished a shard
        done = shards()
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
