"""The Tune trainables: one function per search kind, each running the job's own code in-process.

- defense: `jobs.evaluate.EvalWorker` over shards of the validation split, one report per shard
  (the objective so far), rows checkpointed so a restored trial continues after its last shard;
- inverter: `jobs.train.run` (the Accelerate loop) with an `on_checkpoint` hook that reports the latent
  error ||z - I(G(z))|| and the T = 0 validation accuracy after every saved state, which is also the
  trial's Tune checkpoint;
- red: `jobs.red.RedWorker` (Algorithm 1) on attacked validation images, the dictionary built from the
  rest of the training split.

No trial reads the test split: each sets $INVGAN_FORBIDDEN_SPLITS=test, so `load_dataset` refuses it.
Only the driver writes to MLflow (tuning/tracking.py); trials report metrics to Tune.

No trial reads or writes the search's folder on the driver's disk: a trial may run on a node with its own disk.
What a trial needs from the driver (the RED dictionary) travels through the object store with the trainable's
parameters (`tune.with_parameters`) and is written into a local temporary folder. What it leaves (rows.parquet,
starts.log, an inverter's weights/) goes into its Tune working directory, which Tune uploads to the trial's
folder in the storage path (<out>/tune/<trial dir>/, a path or a URI: `SyncConfig(sync_artifacts=True)`) with
every checkpointed report, the last one included; the driver reads it back from there (`Result.path`).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch
from pyarrow import fs as pafs

from invgan_core.checkpoint import load_model
from invgan_core.data import FORBIDDEN_SPLITS_ENV, load_dataset
from invgan_core.defenses import InvGAN
from invgan_core.files import atomic_write_bytes
from invgan_core.models import sample_prior
from jobs import run_tables
from jobs.evaluate import EvalWorker
from jobs.red import RedConfig, RedWorker, build_or_load_dictionary, red_tables
from jobs.run_folder import plan_shards
from jobs.sharded import write_files
from jobs.train import TrainConfig, run
from tuning.config import TuneSearch, set_path

TRIAL_ROWS = "rows.parquet"  # in <out>/tune/<trial dir>/: every row of a complete trial
STARTS_LOG = "starts.log"  # one line per time the trial's function started (fresh or restored)
INVERTER_RESULT = "train_result.json"  # an inverter trial's files and test metrics (not Tune's result.json)
DICTIONARY_FILES = ("dictionary.*",)  # what a RED trial needs from the search's folder, shipped as bytes


# ---------------------------------------------------------------- job configs of a trial


def eval_config_dict(search: TuneSearch, params: dict, *, for_trial: bool) -> dict:
    """The eval (or RED) config of one point of the space: the base with the point's values set.

    For a trial: split 'validation' (eval configs), the validation limit and shard size, one worker with the
    trial's CPUs. Otherwise (best.yaml): the base's split, limit and resources, for the final evaluation."""
    raw = search.base_raw()
    for path, value in params.items():
        set_path(raw, path, value)
    raw["name"] = f"{search.name}-best" if not for_trial else f"{search.name}-trial"
    if for_trial:
        raw["split"] = "validation"
        if search.kind == "red":  # its dictionaries from the rest of the training split
            raw["train_split"] = "fit"
        if search.validation.limit:
            raw["limit"] = search.validation.limit
        if search.validation.shard_size:
            raw["shard_size"] = search.validation.shard_size
        cpus = search.resources.cpus
        raw["resources"] = {
            "num_workers": 1,
            "num_cpus_per_worker": cpus,
            "num_gpus_per_worker": search.resources.gpus,
            "torch_threads": max(1, int(cpus)),
        }
    return search.job_model().model_validate(raw).model_dump(mode="json")


def _enter_trial(search: TuneSearch) -> tuple[str, Path]:
    """Guard the test split, size torch's threads, record the start; returns (trial id, the trial's Tune working
    directory: a local folder whose files Tune uploads to the trial's folder in the storage path)."""
    import ray
    from ray import tune

    os.environ[FORBIDDEN_SPLITS_ENV] = "test"
    torch.set_num_threads(max(1, int(search.resources.cpus)))
    context = tune.get_context()
    store = context.get_storage()
    folder = Path(store.trial_working_directory)
    folder.mkdir(parents=True, exist_ok=True)
    restored = tune.get_checkpoint() is not None
    log = folder / STARTS_LOG
    if not log.exists():  # a new working directory (a rerun, another node): continue the stored log
        earlier = _read_stored(store.storage_filesystem, f"{store.trial_fs_path}/{STARTS_LOG}")
        if earlier is not None:
            log.write_bytes(earlier)
    with log.open("a") as handle:
        node = ray.get_runtime_context().get_node_id()[:12]
        started = "restored" if restored else "fresh"
        handle.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {started} pid {os.getpid()} node {node}\n")
    store.persist_artifacts(force=True)  # the start is on record even if the trial dies before its first report
    return context.get_trial_id(), folder


def _read_stored(filesystem, path: str) -> bytes | None:
    """A file of the storage path (local or a URI's filesystem), None if absent."""

    if filesystem.get_file_info(path).type != pafs.FileType.File:
        return None
    with filesystem.open_input_stream(path) as src:
        return src.read()


def _write_parquet(path: Path, frame: pd.DataFrame) -> None:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    atomic_write_bytes(path, buffer.getvalue())


def _report_with_rows(metrics: dict, rows: pd.DataFrame) -> None:
    """tune.report with the rows so far as the trial's checkpoint."""
    from ray import tune

    with tempfile.TemporaryDirectory() as tmp:
        rows.to_parquet(Path(tmp) / TRIAL_ROWS, index=False)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


def _rows_from_checkpoint() -> pd.DataFrame | None:
    from ray import tune

    ckpt = tune.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        return pd.read_parquet(Path(d) / TRIAL_ROWS)


def _run_shards(worker, shard_size: int, folder: Path, objective: Callable[[pd.DataFrame], dict]) -> None:
    """A trial's shards in-process (no Ray Data inside a trial), reporting `objective(rows so far)` after each
    with the rows as checkpoint; shards already in a restored checkpoint are not run again. The last shard
    also writes the trial's rows to `folder`."""
    shards = plan_shards(len(worker.data), shard_size)
    rows = _rows_from_checkpoint()
    done = set() if rows is None else set(rows["shard"])
    rows = rows if rows is not None else pd.DataFrame()
    for shard, start, stop in shards:
        if shard in done:
            continue
        rows = pd.concat([rows, worker.run_shard(shard, start, stop)], ignore_index=True)
        complete = shard == shards[-1][0]
        if complete:
            _write_parquet(folder / TRIAL_ROWS, rows)
        _report_with_rows({**objective(rows), "examples": stop, "step": stop, "complete": int(complete)}, rows)


# ---------------------------------------------------------------- defense-time


def defense_objective(search: TuneSearch, rows: pd.DataFrame) -> dict:
    """The objective from eval rows, through the same summary `invgan eval` writes."""
    obj = search.objective
    summary = run_tables.summarize(rows)
    table = summary["accuracy"] if obj.metric == "accuracy" else summary["auc"]
    value = float(table.get(obj.defense, {}).get(obj.attack, float("nan")))
    seconds = float(summary["seconds_per_example"][obj.defense]["clean"])
    return {
        "objective": value / max(seconds, 1e-9) if obj.per_second else value,
        "value": value,
        "seconds_per_example": seconds,
    }


def defense_trial(config: dict, *, search: dict) -> None:
    """Evaluate one point of a defense-time space on the validation split, one report per shard."""
    search_ = TuneSearch.model_validate(search)
    trial_id, folder = _enter_trial(search_)
    cfg = eval_config_dict(search_, config, for_trial=True)
    worker = EvalWorker(cfg)
    _run_shards(worker, cfg["shard_size"], folder, lambda rows: defense_objective(search_, rows))


# ---------------------------------------------------------------- inverter training


def inverter_trial(config: dict, *, search: dict) -> None:
    """Train an inverter with one point's λ1, λ2, λ3, η, lr; report latent error and T = 0 val accuracy
    after every saved state (ASHA's rungs), the state being the trial's Tune checkpoint.

    The Accelerate state lives in a local temporary folder (only its checkpoints reach the storage path); the
    trained weights go to weights/ of the trial's working directory. The last report waits until they are
    written, so they are uploaded with its checkpoint, before the driver learns the trial is complete."""
    with tempfile.TemporaryDirectory(prefix="invgan-trial-") as tmp:
        _inverter_trial(config, TuneSearch.model_validate(search), Path(tmp) / "train")


def _inverter_trial(config: dict, search_: TuneSearch, work_dir: Path) -> None:
    from ray import tune

    trial_id, folder = _enter_trial(search_)
    base, inv = search_.base_config(), search_.inverter
    batch: dict[str, Any] = {"batch_size": inv.batch_size} if inv.batch_size else {}
    cfg = TrainConfig(
        kind="inverter",
        dataset=base.dataset,
        data_dir=base.data_dir,
        steps=inv.steps,
        checkpoint_every=inv.report_every,
        seed=inv.seed,
        generator=base.weights_dir() / "generator",
        out=folder / "weights",
        work_dir=work_dir,
        eval_split="validation",
        quiet=True,
        device="cpu" if search_.resources.gpus == 0 else None,
        **batch,
        **inv.fixed,
        **config,
    )
    assert cfg.steps is not None, "steps is given above"
    steps = cfg.steps
    _restore_train_state(work_dir)
    f, _ = load_model(base.weights_dir() / "classifier", kind="classifier")
    f.requires_grad_(False)
    val = load_dataset(base.dataset, "validation", base.data_dir).subset(search_.validation.limit)
    last: dict[str, Any] = {}  # the final report's metrics, reported once the weights are written

    def report(metrics: dict) -> None:
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(work_dir / "state")))

    def on_checkpoint(step: int, models: list, losses: dict) -> None:
        I, _, G = models
        I.eval()
        with torch.no_grad():  # the same latents at every report and in every trial
            z_fixed = sample_prior(G.prior, 256, G.latent_dim, torch.Generator().manual_seed(12345))
            latent_error = (I(G(z_fixed)) - z_fixed).norm(dim=1).mean().item()
            pred = InvGAN(G, I, f, steps=0, seed=base.seed).predict(val.images, torch.as_tensor(val.ids))
            t0 = (pred == val.labels).float().mean().item()
        I.train()
        measured = {"t0_accuracy": t0, "latent_error": latent_error}
        metrics = {
            "objective": measured[search_.objective.metric],
            **measured,
            "step": step,
            "complete": int(step >= steps),
            **{f"train/{k}": float(v) for k, v in losses.items()},
        }
        if step >= steps:
            last.update(metrics)
        else:
            report(metrics)

    result = run(cfg, on_checkpoint=on_checkpoint, log_mlflow=False)
    (folder / INVERTER_RESULT).write_text(
        json.dumps(
            {
                "files": [str(Path(p).relative_to(folder)) for p in result.get("files") or []],
                "metrics": result.get("metrics"),
                "step": result["step"],
            }
        )
    )
    if last:
        report(last)


def _restore_train_state(work_dir: Path) -> None:
    """A restored trial continues from its Tune checkpoint (the Accelerate state of its last report);
    a fresh one starts from nothing, whatever an earlier attempt left in its folder."""
    from ray import tune

    ckpt = tune.get_checkpoint()
    shutil.rmtree(work_dir, ignore_errors=True)
    if ckpt is not None:
        ckpt.to_directory(str(work_dir / "state"))


# ---------------------------------------------------------------- RED


def red_dictionary(search: TuneSearch, out: Path) -> Path:
    """The attack dictionary of the search (built once, on the driver, from the 'fit' split)."""
    cfg = RedConfig.model_validate(eval_config_dict(search, {}, for_trial=True))
    build_or_load_dictionary(cfg, out)
    return out / "dictionary"


def red_objective(search: TuneSearch, rows: pd.DataFrame, attack_names: list[str]) -> dict:
    tables = red_tables(rows, attack_names)
    method, metric = search.objective.method, search.objective.metric
    table = tables[metric].reindex(columns=attack_names)  # attacked inputs only
    value = float(table.loc[method].mean()) if method in table.index else float("nan")
    seconds = float(rows.loc[rows.method == method, "seconds"].mean())
    return {"objective": value, "value": value, "seconds_per_example": seconds}


def red_trial(config: dict, *, search: dict, shipped: dict[str, bytes]) -> None:
    """Algorithm 1 with one point's λ multiplier / z step / iterations on attacked validation images. `shipped`:
    the search's dictionary files ({"dictionary.json": bytes, "dictionary.safetensors": bytes}), which travel
    through the object store and are written into a local temporary folder for RedWorker to load."""
    search_ = TuneSearch.model_validate(search)
    trial_id, folder = _enter_trial(search_)
    cfg = eval_config_dict(search_, config, for_trial=True)
    with tempfile.TemporaryDirectory(prefix="invgan-shipped-") as tmp:
        worker = RedWorker(cfg, str(write_files(shipped, Path(tmp))))  # it loads <run_dir>/dictionary.*
    names = worker.dic.attack_names
    _run_shards(worker, cfg["shard_size"], folder, lambda rows: red_objective(search_, rows, names))


TRIALS: dict[str, Callable[..., None]] = {"defense": defense_trial, "inverter": inverter_trial, "red": red_trial}
