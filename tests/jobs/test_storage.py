"""Run folders at a URI (jobs/storage.py) against a real S3 server (SeaweedFS): each file appears there as it is
written, a resume from another machine's empty stage computes only what the bucket lacks, one writer holds the
lease, and a damaged shard is moved aside in the bucket too. No Ray: the runner's side is in tests/cluster/."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from jobs import storage
from jobs.common import UserError
from jobs.config import load_config
from jobs.run_folder import missing_shards, plan_shards, prepare_run_dir, read_rows, run_folder, shard_path, write_shard
from jobs.schemas import EVAL_ROWS
from tests.s3server import s3_server

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "configs" / "smoke.yaml"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with s3_server(tmp_path_factory.mktemp("s3")) as server:
        saved = dict(os.environ)
        os.environ.update(server.env())
        try:
            yield server
        finally:
            os.environ.clear()
            os.environ.update(saved)


def _rows(start: int, stop: int) -> pd.DataFrame:
    n = stop - start
    return EVAL_ROWS.frame(
        n,
        example_id=list(range(start, stop)),
        shard=start // 2,
        attack="clean",
        defense="none",
        label=[1] * n,
        prediction=[1] * n,
        correct=[True] * n,
        detection_score=[0.1] * n,
        l2=[0.0] * n,
        linf=[0.0] * n,
        effective_iterations=[0] * n,
        seconds=[0.0] * n,
        attack_seconds=[0.0] * n,
        attacked=[False] * n,
        queries=[0] * n,
        diverged=[False] * n,
    ).assign(node="n", worker="w")


def _stage_dir(monkeypatch, tmp_path, machine: str) -> None:
    """Another machine: its own empty stage folder, no lease of this process's."""
    monkeypatch.setenv("INVGAN_STAGE", str(tmp_path / machine))
    storage._STAGES.clear()


def test_shards_reach_the_bucket_as_written_and_a_resume_elsewhere_computes_only_the_rest(s3, tmp_path, monkeypatch):
    cfg = load_config(SMOKE)
    uri = s3.uri("runs/resume")
    _stage_dir(monkeypatch, tmp_path, "first")
    run_dir = run_folder(cfg, uri)
    assert storage.is_uri(uri) and run_dir.is_relative_to(tmp_path / "first") and storage.where(run_dir) == uri
    prepare_run_dir(cfg, run_dir)
    shards = plan_shards(8, 2)
    for k, a, b in shards[:2]:
        write_shard(shard_path(run_dir, k), _rows(a, b), EVAL_ROWS)
    remote = storage.stage_of(run_dir).remote_files()
    assert {"config.json", "rows/shard-00000.parquet", "rows/shard-00001.parquet", ".lock"} <= set(remote)
    storage.stage_of(run_dir).release_lease()

    _stage_dir(monkeypatch, tmp_path, "second")  # the driver killed; a new one on another machine
    again = run_folder(cfg, uri)
    assert again != run_dir and not again.exists()
    prepare_run_dir(cfg, again)
    assert [s[0] for s in missing_shards(again, shards)] == [2, 3]
    assert sorted(read_rows(again, EVAL_ROWS)["example_id"]) == [0, 1, 2, 3]
    storage.stage_of(again).release_lease()

    other = cfg.model_copy(update={"seed": cfg.seed + 1})  # another config must not resume into it
    _stage_dir(monkeypatch, tmp_path, "third")
    with pytest.raises(SystemExit, match=rf"{uri} holds results of a different config"):
        prepare_run_dir(other, run_folder(other, uri))


def test_a_stale_local_file_is_dropped_and_a_damaged_shard_is_moved_aside_in_the_bucket(s3, tmp_path, monkeypatch):
    cfg = load_config(SMOKE)
    uri = s3.uri("runs/damaged")
    _stage_dir(monkeypatch, tmp_path, "a")
    run_dir = run_folder(cfg, uri)
    prepare_run_dir(cfg, run_dir)
    write_shard(shard_path(run_dir, 0), _rows(0, 2), EVAL_ROWS)
    stage = storage.stage_of(run_dir)
    with stage.fs.open_output_stream(stage.key("rows/shard-00001.parquet")) as out:
        out.write(b"not parquet")  # damaged in the bucket
    (run_dir / "rows" / "shard-00007.parquet").write_bytes(b"left over")  # in the stage, not in the bucket
    stage.pull()
    assert not (run_dir / "rows" / "shard-00007.parquet").exists()
    assert [s[0] for s in missing_shards(run_dir, plan_shards(4, 2))] == [1]
    remote = stage.remote_files()
    assert "rows/shard-00001.parquet" not in remote and any(k.startswith("damaged/shard-00001") for k in remote)
    stage.release_lease()


def test_one_writer_holds_the_lease_until_its_process_is_gone(s3, tmp_path, monkeypatch):
    cfg = load_config(SMOKE)
    uri = s3.uri("runs/lease")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
                import sys, time
                sys.path.insert(0, {str(ROOT)!r})
                from jobs.config import load_config
                from jobs.run_folder import prepare_run_dir, run_folder
                cfg = load_config({str(SMOKE)!r})
                prepare_run_dir(cfg, run_folder(cfg, {uri!r}))
                print("locked", flush=True)
                time.sleep(120)
            """),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ | {"INVGAN_STAGE": str(tmp_path / "holder")},
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        _stage_dir(monkeypatch, tmp_path, "other")  # another stage: the local flock cannot see the holder
        with pytest.raises(UserError, match=rf"{uri} is being written by pid {holder.pid} on .*choose another --out"):
            prepare_run_dir(cfg, run_folder(cfg, uri))
    finally:
        holder.send_signal(signal.SIGKILL)  # killed: its lease stays in the bucket
        holder.wait()
    storage._STAGES.clear()
    prepare_run_dir(cfg, run_folder(cfg, uri))  # a dead holder on this machine: taken over at once
    storage.stage_of(run_folder(cfg, uri)).release_lease()
    assert ".lock" not in storage.Stage.of(uri).remote_files()


def test_invgan_fetch_copies_a_run_folder_home_and_names_an_empty_uri(s3, tmp_path):
    from typer.testing import CliRunner

    from invgan.cli import app

    stage = storage.Stage.of(s3.uri("runs/fetch"))
    for key in ("summary.json", "rows/shard-00000.parquet"):
        with stage.fs.open_output_stream(stage.key(key)) as out:
            out.write(b"{}")
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("mine")
    done = CliRunner().invoke(app, ["fetch", s3.uri("runs/fetch"), str(tmp_path / "home")])
    assert done.exit_code == 0 and "2 file(s) copied" in done.output
    assert (tmp_path / "home" / "rows" / "shard-00000.parquet").read_text() == "{}"
    assert (tmp_path / "home" / "notes.txt").read_text() == "mine"  # a fetch adds, never deletes
    empty = CliRunner().invoke(app, ["fetch", s3.uri("runs/nothing-here"), str(tmp_path / "none")])
    assert empty.exit_code == 1 and "no files there" in empty.output and "Traceback" not in empty.output
