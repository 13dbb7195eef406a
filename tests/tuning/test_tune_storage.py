"""`invgan tune` with its folder at a URI (a real S3 server, SeaweedFS) and trials that never touch the driver's disk.

Tune's storage path is the URI: each trial leaves its files (rows.parquet, starts.log) in its Tune working directory,
which Tune uploads to <uri>/tune/<trial dir>/; the driver's own files (search.json, trials.parquet, best.yaml,
summary.json) are written in a local stand-in and pushed to the URI. A rerun from another machine (an empty stage
folder) restores the search from the URI without running a trial again. RED's dictionary reaches a trial as bytes
(the object store), never as a path of the driver's folder.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pandas as pd
import pytest
from pyarrow import fs as pafs

from invgan_core.data import load_dataset
from jobs import storage
from tests.s3server import s3_server
from tuning.config import load_search
from tuning.search import run_search

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "configs" / "tune" / "smoke.yaml"
SMALL = ["search.num_samples=2", "scheduler.kind=none", "validation.limit=16", "validation.shard_size=8"]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """The S3 server, its credentials and endpoint in os.environ before Ray starts (so its workers have them too),
    and the stage folders of URI run folders in a temporary folder."""
    with s3_server(tmp_path_factory.mktemp("s3")) as server:
        saved = dict(os.environ)
        os.environ.update(server.env())
        os.environ["INVGAN_STAGE"] = str(tmp_path_factory.mktemp("stage"))
        try:
            yield server
        finally:
            os.environ.clear()
            os.environ.update(saved)
            storage._STAGES.clear()


@pytest.fixture(scope="module")
def ray_instance(s3):
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": s3.env()})
    yield ray
    ray.shutdown()


def _files(s3, uri: str) -> dict[str, bytes]:
    """{path under `uri`: bytes} of every object there."""
    fs, root = s3.filesystem(), uri.removeprefix("s3://").rstrip("/")
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    out = {}
    for info in infos:
        if info.type == pafs.FileType.File:
            with fs.open_input_stream(info.path) as src:
                out[info.path[len(root) + 1 :]] = src.read()
    return out


@pytest.fixture(scope="module")
def uri_search(ray_instance, s3):
    search = load_search(SMOKE, SMALL)
    uri = s3.uri("tune/smoke")
    result = run_search(search, out=uri, progress=False, log_mlflow=False)
    return search, uri, result


def test_every_trial_leaves_its_rows_in_the_bucket_and_nothing_on_the_drivers_disk(uri_search, s3):
    search, uri, result = uri_search
    table = result.trials
    assert len(table) == 2 and (table.status == "complete").all()
    files = _files(s3, uri)
    val = load_dataset("digits", "validation")
    for folder in table.folder:  # each trial's folder in the bucket: <uri>/tune/<trial dir>
        assert folder.startswith(f"{uri}/tune/")
        rel = folder[len(uri) + 1 :]
        rows = pd.read_parquet(io.BytesIO(files[f"{rel}/rows.parquet"]))
        assert set(rows.example_id) == set(val.ids[:16])  # all 16 validation images, both shards
        assert files[f"{rel}/starts.log"].decode().count("fresh") == 1
    # the driver's files: in the bucket, and in the local stand-in that holds no trial file
    assert {"search.json", "trials.parquet", "best.yaml", "summary.json"} <= set(files)
    assert ".lock" not in files  # the lease was released
    summary = json.loads(files["summary.json"])
    assert summary["best_trial"] == result.best_trial and summary["folder"] == uri
    assert pd.read_parquet(io.BytesIO(files["trials.parquet"])).trial_id.tolist() == table.trial_id.tolist()
    local = result.out
    assert local == storage.stand_in(uri) and local.is_relative_to(Path(os.environ["INVGAN_STAGE"]))
    assert (local / "summary.json").read_bytes() == files["summary.json"]
    assert not (local / "trials").exists() and not (local / "tune").exists()
    assert not any(p.name in ("rows.parquet", "starts.log") for p in local.rglob("*"))


def test_a_rerun_from_another_machine_restores_the_search_from_the_bucket(uri_search, s3, tmp_path, monkeypatch):
    search, uri, first = uri_search
    monkeypatch.setenv("INVGAN_STAGE", str(tmp_path / "elsewhere"))  # another machine: an empty stage folder
    monkeypatch.setattr(storage, "_STAGES", {})
    before = _files(s3, uri)
    again = run_search(search, out=uri, progress=False, log_mlflow=False)
    assert again.out.is_relative_to(tmp_path / "elsewhere") and (again.out / "search.json").exists()
    assert again.trials.trial_id.tolist() == first.trials.trial_id.tolist()
    assert again.best_metric == first.best_metric
    after = _files(s3, uri)
    for folder in first.trials.folder:  # no trial ran again
        rel = folder[len(uri) + 1 :]
        assert after[f"{rel}/starts.log"] == before[f"{rel}/starts.log"]
        assert after[f"{rel}/rows.parquet"] == before[f"{rel}/rows.parquet"]


def test_a_red_trial_loads_the_dictionary_from_the_shipped_bytes_not_the_drivers_folder(tmp_path, monkeypatch):
    """red_trial in-process with Tune's session faked: the driver's folder is gone before the trial starts, the
    dictionary reaches it only as bytes, and its rows land in its working directory (what Tune uploads)."""
    import shutil
    import types

    import torch
    from ray import tune

    from invgan_core.data import FORBIDDEN_SPLITS_ENV
    from jobs.sharded import shipped_files
    from tuning.search import _tuner
    from tuning.trials import DICTIONARY_FILES, TRIAL_ROWS, red_dictionary, red_trial

    raw = {
        "name": "red_ship",
        "kind": "red",
        "base": str(ROOT / "configs" / "red_smoke.yaml"),
        "base_set": {
            "methods": ["cnn", "bsd_gan"],
            "init_restarts": 1,
            "init_steps": 5,
            "dictionary.per_class": 2,
            "dictionary.attacks.linf.params.steps": 10,
            "dictionary.attacks.l2.params.steps": 10,
        },
        "space": {
            "lam_multiplier": {"uniform": {"low": 0.1, "high": 0.7}},
            "steps": {"randint": {"low": 5, "high": 10}},
        },
        "objective": {"metric": "attack_accuracy", "method": "bsd_gan"},
        "validation": {"limit": 8, "shard_size": 8},
    }
    (tmp_path / "red.yaml").write_text(json.dumps(raw))
    search = load_search(tmp_path / "red.yaml")
    driver = tmp_path / "driver"
    red_dictionary(search, driver)
    shipped = shipped_files(driver, DICTIONARY_FILES)
    assert set(shipped) == {"dictionary.json", "dictionary.safetensors"}

    # what the Tuner hands every trial: the search and the dictionary's bytes, no path of the driver's
    class Tuner:
        can_restore = staticmethod(lambda path: False)

        def __init__(self, trainable, **kwargs):
            self.trainable = trainable

    monkeypatch.setattr(tune, "with_parameters", lambda fn, **kw: (fn, kw))
    monkeypatch.setattr(tune, "with_resources", lambda trainable, resources: trainable)
    monkeypatch.setattr(tune, "Tuner", Tuner)
    tuner, _ = _tuner(search, driver, str(tmp_path / "storage"), callback=tune.Callback())
    fn, params = tuner.trainable
    assert fn is red_trial and set(params) == {"search", "shipped"} and params["shipped"] == shipped
    shutil.rmtree(driver)

    work = tmp_path / "work"
    store = types.SimpleNamespace(
        trial_working_directory=str(work),
        storage_filesystem=pafs.LocalFileSystem(),
        trial_fs_path=str(tmp_path),
        persist_artifacts=lambda force=False: None,
    )
    context = types.SimpleNamespace(get_storage=lambda: store, get_trial_id=lambda: "t0001")
    reports = []

    def report(metrics, checkpoint=None):
        with checkpoint.as_directory() as d:
            reports.append((metrics, pd.read_parquet(Path(d) / TRIAL_ROWS)))

    monkeypatch.setattr(tune, "get_context", lambda: context)
    monkeypatch.setattr(tune, "get_checkpoint", lambda: None)
    monkeypatch.setattr(tune, "report", report)
    monkeypatch.setenv(FORBIDDEN_SPLITS_ENV, "")  # the trial sets it: restored after the test
    threads = torch.get_num_threads()
    try:
        red_trial({"lam_multiplier": 0.35, "steps": 5}, **params)
    finally:
        torch.set_num_threads(threads)
    assert len(reports) == 1 and reports[0][0]["complete"] == 1 and 0 <= reports[0][0]["objective"] <= 1
    rows = pd.read_parquet(work / TRIAL_ROWS)
    assert rows.equals(reports[0][1]) and set(rows.example_id) == set(load_dataset("digits", "validation").ids[:8])
    assert (work / "starts.log").read_text().count("fresh") == 1 and not driver.exists()
