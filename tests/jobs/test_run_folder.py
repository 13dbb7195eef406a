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
    does not exist makes every attempt raise."""

    def __init__(self, folder: str, fail: list[int]):
        self.folder, self.fail = Path(folder), fail

    def run_shard(self, shard: int, start: int, stop: int):
        import pandas as pd

        marker = self.folder / f"fault-shard-{shard}"
        if shard in self.fail and not marker.exists():
            marker.touch()  # FileNotFoundError when the folder does not exist: every attempt fails
            raise OSError(f"injected fault on the first attempt at shard {shard}")
        return pd.DataFrame({"example_id": list(range(start, stop)), "shard": shard})


def _flaky_job(run_dir: Path, folder: Path, fail: list[int]):
    from jobs.config import Resources
    from jobs.sharded import run_shards

    shards = [(k, 2 * k, 2 * k + 2) for k in range(4)]
    run_dir.mkdir()
    return run_shards(
        shards,
        run_dir,
        worker=_FlakyWorker,
        worker_kwargs={"folder": str(folder), "fail": fail},
        resources=Resources(num_workers=1, num_cpus_per_worker=1),
        expected=lambda a, b: b - a,
        schema=Schema(_Row),
        desc="flaky",
        progress=False,
    )


@pytest.mark.reliability(kind="fault")
def test_a_shard_that_fails_once_is_retried_and_every_row_is_there_once(tmp_path, ray_instance):
    from jobs.run_folder import read_rows

    stats = _flaky_job(tmp_path / "run", tmp_path, [1, 2])  # the first attempts at shards 1 and 2 raise
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


class _SlowWorker:
    """A worker whose shards outlast Ray Data's no-progress timeout (set to 1 s below)."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def run_shard(self, shard: int, start: int, stop: int):
        import pandas as pd

        time.sleep(self.seconds)
        return pd.DataFrame({"example_id": list(range(start, stop)), "shard": shard})


@pytest.mark.reliability(kind="fault")
def test_a_shard_slower_than_ray_datas_no_progress_timeout_is_waited_for(tmp_path, ray_instance):
    """Ray Data gives up on a dataset that moves no block for `execution_no_progress_timeout_s` (30 min by
    default); one shard of BPDA through Defense-GAN on a loaded machine takes longer. The runner turns that
    timeout off (lost workers are caught by its own retries): with the timeout at 1 s, 3-second shards finish."""
    import ray

    from jobs.config import Resources
    from jobs.run_folder import read_rows
    from jobs.sharded import run_shards

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
