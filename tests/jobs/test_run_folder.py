"""The run folder's rules: one writer per run folder, one row per example however its shards fail."""

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
def test_two_jobs_log_to_one_fresh_sqlite_store_at_once(tmp_path):
    """Two processes start their MLflow runs in one new SQLite store at once, as two `invgan eval` do (through
    `start_mlflow`): both finish, each with its own FINISHED run (no 'database is locked', no migration race)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(SMOKE.parents[1])!r})
        import mlflow
        from jobs.common import start_mlflow
        start_mlflow({uri!r}, "smoke")
        with mlflow.start_run() as run:
            mlflow.log_metric("accuracy", 0.5)
        print(run.info.run_id)
    """)
    procs = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    ids = {out.strip().splitlines()[-1] for out in outputs}
    client = MlflowClient(uri)
    assert len(ids) == 2 and all(client.get_run(i).info.status == "FINISHED" for i in ids)


@pytest.fixture(scope="module")
def ray_instance():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@dataclass(frozen=True)
class _Row:
    example_id: int
    shard: int


class _FlakyWorker:
    """The first attempt at each shard in `fail` raises (a marker file in `folder` records it); a `folder` that
    does not exist makes every attempt raise. Each shard takes `seconds`."""

    def __init__(self, folder: str, fail: list[int], seconds: float = 0.0):
        self.folder, self.fail, self.seconds = Path(folder), fail, seconds

    def run_shard(self, shard: int, start: int, stop: int):
        import pandas as pd

        time.sleep(self.seconds)
        marker = self.folder / f"fault-shard-{shard}"
        if shard in self.fail and not marker.exists():
            marker.touch()  # FileNotFoundError when the folder does not exist: every attempt fails
            raise OSError(f"injected fault on the first attempt at shard {shard}")
        return pd.DataFrame({"example_id": list(range(start, stop)), "shard": shard})


def _flaky_job(run_dir: Path, folder: Path, fail: list[int], seconds: float = 0.0):
    from jobs.config import Resources
    from jobs.sharded import run_shards

    shards = [(k, 2 * k, 2 * k + 2) for k in range(4)]
    run_dir.mkdir()
    return run_shards(
        shards,
        run_dir,
        worker=_FlakyWorker,
        worker_kwargs={"folder": str(folder), "fail": fail, "seconds": seconds},
        resources=Resources(num_workers=1, num_cpus_per_worker=1),
        expected=lambda a, b: b - a,
        schema=Schema(_Row),
        desc="flaky",
        progress=False,
    )


@pytest.mark.reliability(kind="fault")
def test_a_shard_that_fails_once_is_retried_and_every_row_is_there_once(tmp_path, ray_instance):
    """Shards 1 and 2 raise at their first attempt: each runs again, and every row is there once. The shards also
    outlast Ray Data's no-progress timeout (30 min by default, as one shard of BPDA through Defense-GAN on a loaded
    machine can; set to 1 s here): the runner turns it off (its own retries catch lost workers), so they finish."""
    import ray

    from jobs.run_folder import read_rows

    ray.data.DataContext.get_current().execution_no_progress_timeout_s = 1
    stats = _flaky_job(tmp_path / "run", tmp_path, [1, 2], seconds=2.0)
    rows = read_rows(tmp_path / "run", Schema(_Row))
    assert sorted(rows["example_id"]) == list(range(8))  # every row, once
    assert set(stats.failed) <= {1, 2} and stats.failed and stats.retried >= 1
    assert all("OSError: injected fault" in m for m in stats.failed.values())
    progress = (tmp_path / "run" / "progress.log").read_text()
    assert "failed (OSError: injected fault" in progress and "missing shard(s) again" in progress


@pytest.mark.reliability(kind="fault")
def test_a_shard_that_fails_every_time_stops_the_job_naming_it(tmp_path, ray_instance):
    with pytest.raises(RuntimeError, match=r"shard 0 failed twice \(FileNotFoundError.*finished shards are kept"):
        _flaky_job(tmp_path / "run", tmp_path / "no-such-folder", [0])


def test_a_submitted_job_without_a_runs_folder_is_refused_before_writing_into_rays_copy(monkeypatch, tmp_path):
    """In a submitted job (Ray's job server sets RAY_JOB_CONFIG_JSON_ENV_VAR) ./runs is Ray's working-directory
    copy on the head: without --out or $INVGAN_RUNS the job stops with what to set; with either it runs."""
    from jobs.common import UserError
    from jobs.run_folder import run_folder

    cfg = load_config(SMOKE)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    monkeypatch.delenv("INVGAN_RUNS", raising=False)
    with pytest.raises(UserError, match="pass --out .* or set INVGAN_RUNS"):
        run_folder(cfg, None)
    assert run_folder(cfg, str(tmp_path / "run")) == tmp_path / "run"
    monkeypatch.setenv("INVGAN_RUNS", str(tmp_path / "runs"))
    assert run_folder(cfg, None).parent == tmp_path / "runs"
