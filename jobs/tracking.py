"""One MLflow run over a job's whole life (eval, curves, RED): the driver's only link to MLflow while work runs.

The run is created (status RUNNING, params and tags at once) before any shard is computed, so the MLflow
UI shows the job while it runs; progress metrics (`progress/shards_done`, `progress/examples_per_second`,
step = shards done) arrive with every shard; the run ends FINISHED, FAILED (the error in the tag
`error`) or KILLED (Ctrl-C, `ray job stop`, SIGTERM). The run id is recorded in the run folder at once, so a
rerun after a crash or a kill continues the same run instead of starting a second one.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import tempfile
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import pandas as pd

from invgan_core.files import atomic_write_json
from jobs.common import default_tracking_uri, start_mlflow
from jobs.run_tables import log_config_params

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

RUN_RECORD = "mlflow_run.json"  # in the run folder: {"run_id", "tracking_uri"}
MAX_TAG_VALUE = 8000


def recorded_run_id(run_dir: Path) -> str | None:
    """The MLflow run id recorded for this run folder (mlflow_run.json, or summary.json of older runs)."""
    for name in (RUN_RECORD, "summary.json"):
        path = run_dir / name
        if path.exists():
            run_id = json.loads(path.read_text()).get("run_id" if name == RUN_RECORD else "mlflow_run_id")
            if run_id:
                return run_id
    return None


def previous_run_id(run_dir: Path, tracking_uri: str) -> str | None:
    """The MLflow run a previous pass over this run folder logged to, if that run is in this store
    (a rerun continues it; a run recorded in another store, e.g. another --tracking-uri, is not)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    run_id = recorded_run_id(run_dir)
    if not run_id:
        return None
    try:
        MlflowClient(tracking_uri).get_run(run_id)
        return run_id
    except MlflowException:
        return None


@dataclass
class JobRun:
    client: MlflowClient
    run_id: str
    tracking_uri: str
    experiment: str
    started: float

    def progress(self, bar) -> None:
        """Called by the runner after every shard (`bar` is its Progress)."""
        from mlflow.entities import Metric

        now, step = int(time.time() * 1000), bar.done_shards
        rate = bar.done_examples / max(time.monotonic() - bar.started, 1e-9)
        self.client.log_batch(
            self.run_id,
            metrics=[
                Metric("progress/shards_done", bar.done_shards, now, step),
                Metric("progress/shards_total", bar.total_shards, now, step),
                Metric("progress/examples_per_second", rate, now, step),
            ],
        )


def where_to_open(tracking_uri: str | None) -> str:
    """How a user opens a run: the server's own UI for an http store, `invgan ui` for a local SQLite file."""
    uri = tracking_uri or default_tracking_uri()
    return uri if uri.startswith("http") else "invgan ui"


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Turn SIGTERM (what `ray job stop` and `kill` send) into KeyboardInterrupt while the job runs, so its
    MLflow run ends KILLED instead of staying RUNNING forever."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"stopped by signal {signum} (SIGTERM)")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def job_run(cfg, run_dir: Path, *, enabled: bool, tags: dict):
    """`tracked_run` for a job config (eval, curves, red, recovery): its MLflow store (or the default), its
    family as the experiment, <name>-<hash> as the run's name and its config as the parameters."""
    return tracked_run(
        enabled=enabled,
        tracking_uri=cfg.mlflow.tracking_uri or default_tracking_uri(),
        experiment=cfg.family,
        run_name=f"{cfg.name}-{cfg.config_hash()[:8]}",
        run_dir=run_dir,
        config_dict=cfg.model_dump(mode="json", exclude=set(cfg.NOT_RESULTS)),
        tags=tags | {k: json.dumps(v) for k, v in cfg.model_dump(mode="json", include=set(cfg.NOT_RESULTS)).items()},
    )


@contextmanager
def tracked_run(
    *, enabled: bool, tracking_uri: str, experiment: str, run_name: str, run_dir: Path, config_dict: dict, tags: dict
) -> Iterator[JobRun | None]:
    """Yield a RUNNING MLflow run for the job (None when `enabled` is false) and end it with the job's fate."""
    if not enabled:
        yield None
        return
    from mlflow.tracking import MlflowClient

    exp = start_mlflow(tracking_uri, experiment)
    client = MlflowClient(tracking_uri)
    run_id = previous_run_id(run_dir, tracking_uri)
    if run_id:
        client.update_run(run_id, status="RUNNING")
        if "error" in client.get_run(run_id).data.tags:  # the error of an earlier, failed pass
            client.delete_tag(run_id, "error")
    else:
        run_id = client.create_run(exp.experiment_id, run_name=run_name).info.run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / RUN_RECORD, {"run_id": run_id, "tracking_uri": tracking_uri})
    log_config_params(client, run_id, config_dict)
    for key, value in tags.items():
        client.set_tag(run_id, key, str(value)[:MAX_TAG_VALUE])
    run = JobRun(client, run_id, tracking_uri, experiment, time.monotonic())
    try:
        with sigterm_interrupts():
            yield run
    except BaseException as err:
        # Ctrl-C, our SIGTERM handler, or Ray's (ray.init installs one that calls sys.exit(SIGTERM))
        if isinstance(err, KeyboardInterrupt) or (isinstance(err, SystemExit) and err.code == signal.SIGTERM):
            client.set_tag(run_id, "error", f"interrupted ({err or 'KeyboardInterrupt'})"[:MAX_TAG_VALUE])
            client.set_terminated(run_id, status="KILLED")
            raise
        client.set_tag(run_id, "error", f"{type(err).__name__}: {err}"[:MAX_TAG_VALUE])
        client.set_terminated(run_id, status="FAILED")
        raise
    client.log_metric(run_id, "wall_seconds", time.monotonic() - run.started)
    client.set_terminated(run_id, status="FINISHED")


def split_digest(data) -> str:
    """sha256 (first 16 hex digits) of a split's ids, labels and images: the same digest means the same split."""
    h = hashlib.sha256()
    for part in (data.ids, data.labels.numpy(), data.images.numpy()):
        h.update(part.tobytes())
    return h.hexdigest()[:16]


def log_dataset(run: JobRun, full, evaluated, *, context: str = "evaluation") -> None:
    """Record the examples a run evaluated as the run's MLflow dataset input: named <dataset>/<split>, with the
    whole split's digest (so two runs on the same split show the same digest) and one row per evaluated id."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.pandas_dataset import from_pandas
    from mlflow.entities import DatasetInput, InputTag

    frame = pd.DataFrame({"example_id": evaluated.ids, "label": evaluated.labels.numpy()})
    source = CodeDatasetSource({"loader": "invgan_core.data.load_dataset", "dataset": full.name, "split": full.split})
    with warnings.catch_warnings():  # MLflow's hint about integer columns: ids and labels are never missing
        warnings.simplefilter("ignore", UserWarning)
        dataset = from_pandas(frame, source=source, name=f"{full.name}/{full.split}", digest=split_digest(full))
        entity = dataset._to_mlflow_entity()
    run.client.log_inputs(run.run_id, datasets=[DatasetInput(entity, tags=[InputTag("mlflow.data.context", context)])])


def log_weights(client: MlflowClient, run_id: str, stem: Path, *, name: str | None = None) -> str:
    """A model file of the project (<stem>.safetensors + <stem>.json) as an MLflow logged model of `run_id`: the
    two files as its artifacts (never a pickle), its manifest's scalar fields as params, its sha256 and kind as
    tags. Returns the logged model's id."""
    manifest = json.loads(stem.with_suffix(".json").read_text())
    params = {k: str(v)[:MAX_TAG_VALUE] for k, v in manifest.items() if isinstance(v, (str, int, float, bool))}
    model = client.create_logged_model(
        client.get_run(run_id).info.experiment_id,
        name=name or stem.name,
        source_run_id=run_id,
        tags={"sha256": str(manifest.get("sha256")), "kind": str(manifest.get("kind"))},
        params=params,
        model_type=str(manifest.get("kind")),
    )
    with tempfile.TemporaryDirectory() as folder:
        for suffix in (".safetensors", ".json"):
            shutil.copyfile(stem.with_suffix(suffix), Path(folder) / f"{stem.name}{suffix}")
        client.log_model_artifacts(model.model_id, folder)
    client.finalize_logged_model(model.model_id, "READY")
    return model.model_id
