"""Faults while work runs (issue #12): the RED driver killed mid-run, a disk that fills up, a run folder that
is read-only. Each ends either complete with every row exactly once or in one clear line naming the path,
with nothing half-written; a rerun resumes.

(The eval driver kill is tests/jobs/test_evaluate.py, the tune one tests/tuning/test_resume.py, a failing
shard and concurrent writers tests/jobs/test_sharded.py, a lost worker node tests/cluster/.)
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from jobs.run_folder import read_rows
from jobs.schemas import EVAL_ROWS, RED_ROWS

pytestmark = pytest.mark.reliability(kind="fault")
ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "configs" / "smoke.yaml"
RED_SMOKE = ROOT / "configs" / "red_smoke.yaml"
RED_KEY = ["example_id", "attack_type", "method"]
# RED on 6 digits in 3 shards of 2, one worker, short solves and a small dictionary
RED_TINY = [
    "--limit",
    "6",
    "--set",
    "shard_size=2",
    "--set",
    "resources.num_workers=1",
    "--set",
    "steps=25",
    "--set",
    "init_restarts=2",
    "--set",
    "init_steps=15",
    "--set",
    "sbsc_per_class=4",
    "--set",
    "dictionary.per_class=3",
    "--set",
    "dictionary.attacks.linf.params.steps=10",
    "--set",
    "dictionary.attacks.l2.params.steps=10",
]


def _env(tmp_path: Path) -> dict:
    return os.environ | {"INVGAN_RUNS": str(tmp_path / "runs"), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _comparable(rows: pd.DataFrame, key: list[str]) -> pd.DataFrame:
    """Rows without what differs between two runs of the same config (timing, where a shard ran)."""
    drop = [c for c in ("seconds", "attack_seconds", "node", "worker") if c in rows]
    return rows.drop(columns=drop).sort_values(key).reset_index(drop=True)


@pytest.mark.skipif(
    not os.environ.get("RUN_SLOW"),
    reason="60 s; make test kills and resubmits a RED driver on the cluster (tests/cluster/test_local_cluster.py)",
)
def test_a_killed_red_driver_resumes_computing_only_the_missing_shards(tmp_path):
    """SIGKILL `invgan red` (driver and its Ray processes) after its first shard; the rerun keeps the finished
    shard files untouched, computes the others, and the rows equal those of an uninterrupted run."""
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "invgan",
        "red",
        "--config",
        str(RED_SMOKE),
        "--out",
        str(run),
        "--no-mlflow",
        "--quiet",
        *RED_TINY,
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    rows_dir, deadline = run / "rows", time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None and not list(rows_dir.glob("shard-*.parquet")):
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    output = proc.communicate()[0].decode(errors="replace")
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in rows_dir.glob("shard-*.parquet")}
    assert 1 <= len(before) < 3, output[-2000:]
    assert not (run / "summary.json").exists()

    again = subprocess.run(cmd, cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=400)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    after = {p.name: p for p in rows_dir.glob("shard-*.parquet")}
    assert len(after) == 3
    for name, (mtime, content) in before.items():  # finished shards were not recomputed
        assert after[name].stat().st_mtime_ns == mtime and after[name].read_bytes() == content
    assert not list(run.rglob("*.tmp"))

    # the uninterrupted computation: the job's own worker over all 6 examples at once, in this process
    from jobs.config import load_config
    from jobs.red import RedConfig, RedWorker

    overrides = [RED_TINY[i + 1] for i in range(2, len(RED_TINY), 2)]
    cfg = load_config(RED_SMOKE, overrides, model=RedConfig, limit=6)
    uninterrupted = RedWorker(cfg.model_dump(mode="json"), str(run)).run_shard(0, 0, 6)
    resumed = read_rows(run, RED_ROWS)
    assert len(resumed) == 6 * 3 * 4 and not resumed.duplicated(RED_KEY).any()
    resumed, uninterrupted = _comparable(resumed, RED_KEY), _comparable(uninterrupted, RED_KEY)
    pd.testing.assert_frame_equal(
        resumed.drop(columns=["shard", "final_loss"]),
        uninterrupted.drop(columns=["shard", "final_loss"]),
        check_dtype=False,
    )
    np.testing.assert_allclose(
        resumed.final_loss.to_numpy(float, na_value=np.nan),  # NaN: the CNN has no loss
        uninterrupted.final_loss.to_numpy(float, na_value=np.nan),
        rtol=1e-3,
        equal_nan=True,
    )
    assert json.loads((run / "summary.json").read_text())["shards"]["retried"] == 0


# ---------------------------------------------------------------- read-only run folder


@contextmanager
def read_only(folder: Path, populate=None):
    """`folder`, filled by `populate(folder)`, then made read-only: chmod for a normal user; root ignores
    permission bits, so as root a tmpfs is mounted there and remounted read-only."""
    folder.mkdir(parents=True)
    if os.geteuid() != 0:
        if populate:
            populate(folder)
        for p in [folder, *folder.rglob("*")]:
            p.chmod(0o555 if p.is_dir() else 0o444)
        try:
            yield folder
        finally:
            for p in [folder, *folder.rglob("*")]:
                p.chmod(0o755 if p.is_dir() else 0o644)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("running as root without permission to mount: cannot make a read-only folder")
    try:
        if populate:
            populate(folder)
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True, capture_output=True)
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def _eval_cli(tmp_path: Path, out: Path):
    from typer.testing import CliRunner

    from invgan.cli import app

    return CliRunner().invoke(app, ["eval", "--config", str(SMOKE), "--no-mlflow", "--out", str(out)])


def test_a_run_folder_that_cannot_be_created_is_named_in_one_line(tmp_path):
    import ray

    ray_before = ray.is_initialized()  # off, unless another test of this module left its instance up
    with read_only(tmp_path / "locked") as parent:
        out = _eval_cli(tmp_path, parent / "run")
        assert out.exit_code == 1, out.output
        message = str(out.exception)
        assert "\n" not in message and str(parent / "run") in message, message
        assert "Read-only file system" in message or "Permission denied" in message, message
        assert "Traceback" not in out.output and not (parent / "run").exists()
        assert ray.is_initialized() == ray_before  # no Ray started


def test_a_read_only_run_folder_is_named_and_left_as_it_was(tmp_path):
    """Resuming into a run folder that became read-only: one line naming the file it could not write."""
    from jobs import run_folder
    from jobs.config import load_config
    from jobs.run_folder import prepare_run_dir

    def prepared(folder: Path) -> None:
        prepare_run_dir(load_config(SMOKE), folder / "run")  # config.json, .lock: as a first run leaves them
        run_folder._LOCKS.pop((folder / "run").resolve()).close()  # that run's process has exited: its lock is gone

    with read_only(tmp_path / "runs", populate=prepared) as parent:
        run = parent / "run"
        before = sorted((p.name, p.stat().st_size) for p in run.iterdir())
        out = _eval_cli(tmp_path, run)
        assert out.exit_code == 1, out.output
        message = str(out.exception)
        assert "\n" not in message and str(run) in message and "cannot write" in message, message
        assert sorted((p.name, p.stat().st_size) for p in run.iterdir()) == before


# ---------------------------------------------------------------- disk full


@pytest.fixture(scope="module")
def ray_instance():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # 1 actor + 1 CPU for Ray Data
    yield ray
    ray.shutdown()


def test_a_full_disk_stops_the_job_naming_the_path_with_nothing_half_written(ray_instance, tmp_path, monkeypatch):
    """The second shard's write fails with ENOSPC after its bytes went to the temp file (as a full disk fails
    at fsync): one line naming the run folder; the finished shard is intact, no temp file or summary is left;
    a rerun (space freed) computes only the missing shards."""
    from invgan_core import files
    from jobs import run_folder
    from jobs.evaluate import main as eval_main
    from jobs.sharded import JobOptions

    real_write, calls = files.atomic_write_bytes, []

    def full_disk_on_second_write(path, data):
        calls.append(path)
        if len(calls) < 2:
            return real_write(path, data)

        def no_space(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        with monkeypatch.context() as m:
            m.setattr(os, "fsync", no_space)
            return real_write(path, data)

    monkeypatch.setattr(run_folder, "atomic_write_bytes", full_disk_on_second_write)
    run = tmp_path / "run"
    kwargs = dict(
        config=SMOKE,
        overrides=["shard_size=4", "resources.num_workers=1", "attacks.bpda.base.params.steps=2"],
        limit=12,
        opts=JobOptions(out=run, log_mlflow=False, progress=False),
    )
    with pytest.raises(SystemExit) as stop:
        eval_main(**kwargs)
    message = str(stop.value)
    assert "\n" not in message and "No space left on device" in message and str(run) in message, message
    assert len(calls) == 2 and len(list((run / "rows").glob("shard-*.parquet"))) == 1
    assert not list(run.rglob("*.tmp")) and not (run / "summary.json").exists()
    done = next((run / "rows").glob("shard-*.parquet"))
    stamp = done.stat().st_mtime_ns

    monkeypatch.setattr(run_folder, "atomic_write_bytes", real_write)  # space freed
    eval_main(**kwargs)
    rows = read_rows(run, EVAL_ROWS)
    assert len(rows) == 12 * 2 * 3 and not rows.duplicated(["example_id", "attack", "defense"]).any()
    assert done.stat().st_mtime_ns == stamp
    assert json.loads((run / "summary.json").read_text())["shards"]["computed"] == 2  # only the missing ones
