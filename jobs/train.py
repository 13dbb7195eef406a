"""Training jobs (`invgan train gan|classifier|inverter`): Accelerate loops over invgan_core steps.

Every loop is step-based and deterministic per step: step s draws its batch from a permutation seeded
by (seed, epoch) and reseeds torch from (seed, step) (the GAN: (seed, step, process)), so a run resumed
from its last saved state ends with the same weights as an uninterrupted one. State (models, optimizers,
RNG) is saved with `accelerator.save_state` every `checkpoint_every` steps into `<work_dir>/state`, swapped
in atomically; rerunning the same command resumes from there.

With N processes each takes 1/N of every global batch and DDP averages the gradients. The classifier's
random shifts and the inverter's latents are drawn for the whole global batch on every process and sliced,
so N processes reproduce the 1-process run up to the order of float sums (the GAN draws its noise per
process and its generator's batch norm sees the process's slice: same schedule, not the same numbers).
The N processes: torchrun or `accelerate.debug_launcher` (`run` in each), or `--workers N`: Ray Train's
TorchTrainer runs `run` on N Ray workers (`run_on_ray`), rank 0 hands the weights back to the driver,
which writes the model files and the MLflow run; the resumable state is Ray Train's checkpoints in
`--storage`.

Run as `invgan train ...` (or `python -m invgan train ...`, e.g. under torchrun): `main`. TrainConfig, the
per-kind defaults and the options' help texts are in jobs/train_config.py (no torch: the CLI reads them at start).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from tqdm.auto import tqdm

from invgan_core import training
from invgan_core.checkpoint import atomic_write_json, load_model, save_model
from invgan_core.data import SPLIT_SEED, load_dataset
from invgan_core.models import build_model, default_arch, sample_prior
from jobs.common import UserError, git_commit, start_mlflow, user_errors, user_message
from jobs.ray_session import ray_session
from jobs.sharded import JobOptions, JobResult
from jobs.tracking import MAX_TAG_VALUE, log_weights, sigterm_interrupts, where_to_open
from jobs.train_config import DEFAULTS as DEFAULTS
from jobs.train_config import GAN_DEFAULTS as GAN_DEFAULTS
from jobs.train_config import Kind as Kind
from jobs.train_config import TrainConfig


def _make_accelerator(device: str | None, mixed_precision: str = "no"):
    from accelerate import Accelerator

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch on this machine")
    return Accelerator(cpu=device == "cpu", mixed_precision=mixed_precision)


class BatchSampler:
    """Global batch for step s from a per-epoch permutation seeded by (seed, epoch); this process's slice."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int, world: int):
        if batch_size % world:
            raise ValueError(f"batch_size {batch_size} must be divisible by the {world} processes")
        self.n, self.bs, self.seed, self.rank, self.world = n, min(batch_size, n), seed, rank, world
        self.per_epoch = n // self.bs

        share = self.bs // world
        self.mine = slice(rank * share, (rank + 1) * share)  # this process's part of a global batch

    def batch(self, step: int) -> torch.Tensor:
        """The global batch of step s (the same on every process)."""
        epoch, k = divmod(step, self.per_epoch)
        # CPU: the batch order, indices into the CPU training split (the batch is moved to the device after)
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
        return perm[k * self.bs : (k + 1) * self.bs]

    def __call__(self, step: int) -> torch.Tensor:
        return self.batch(step)[self.mine]


def _reseed(cfg: TrainConfig, step: int, rank: int) -> None:
    """Torch's RNG for step s: from (seed, step) on every process, so that draws for the whole global batch
    (the classifier's shifts, the inverter's latents) agree across processes; the GAN, which draws its noise
    per process, passes its process index as `rank` (0 for one process: the same seeds either way)."""
    torch.manual_seed((cfg.seed * 1_000_003 + step) * 64 + (rank if cfg.kind == "gan" else 0))


# The models of each kind, in _build's order: those trained (handed back by Ray workers) and those saved.
TRAINED = {
    "classifier": ["classifier"],
    "gan": ["generator", "discriminator"],
    "inverter": ["inverter", "discriminator"],
}
SAVED = {"classifier": ["classifier"], "gan": ["generator", "discriminator"], "inverter": ["inverter"]}


def _build(cfg: TrainConfig, image_shape, num_classes: int):
    """Models and optimizers for one kind, as lists in a fixed order (the order of save/load_state)."""
    assert cfg.lr is not None and cfg.generator is not None, "filled by TrainConfig's validator"
    if cfg.kind == "classifier":
        f = build_model("classifier", default_arch("classifier", image_shape, num_classes))
        return [f], [torch.optim.SGD(f.parameters(), lr=cfg.lr, momentum=0.5)]
    if cfg.kind == "gan":
        G = build_model("generator", {**default_arch("generator", image_shape), "prior": cfg.prior})
        D = build_model("discriminator", default_arch("discriminator", image_shape))
        betas = (0.5, 0.9) if cfg.gan_loss == "wgan-gp" else (0.5, 0.999)
        return [G, D], [
            torch.optim.Adam(G.parameters(), cfg.lr, betas=betas),
            torch.optim.Adam(D.parameters(), cfg.lr, betas=betas),
        ]
    G, _ = load_model(cfg.generator, kind="generator")
    I = build_model("inverter", {**default_arch("inverter", image_shape), "latent_dim": G.latent_dim, "prior": G.prior})
    D = build_model("discriminator", default_arch("discriminator", image_shape))
    opts = [
        torch.optim.Adam(I.parameters(), cfg.lr, betas=(0.5, 0.999)),
        torch.optim.Adam(D.parameters(), cfg.lr, betas=(0.5, 0.999)),
    ]
    return [I, D, G], opts


def _evaluate(cfg: TrainConfig, models, test, device) -> dict[str, float]:
    """Held-out figures recorded in the manifest."""
    if cfg.kind == "classifier":
        models[0].eval()
        acc = training.accuracy(models[0], test.images, test.labels)
        models[0].train()
        return {"test_accuracy": acc, "test_examples": len(test)}
    if cfg.kind == "inverter":
        I, _, G = models
        I.eval()
        with torch.no_grad():
            x = test.images[:1000].to(device)
            mse = ((G(I(x)) - x) ** 2).flatten(1).mean(1).mean().item()
            z = sample_prior(G.prior, 1000, G.latent_dim, torch.Generator().manual_seed(12345)).to(device)
            latent_err = (I(G(z)) - z).norm(dim=1).mean().item()
        I.train()
        return {"test_reconstruction_mse": mse, "sample_latent_error": latent_err}
    return {}


class _StoppingRule:
    """`--patience` for the inverter: every `eval_every` steps, the latent error ||I(G(z)) - z|| on 1,000 prior
    draws and the T = 0 accuracy (the classifier on G(I(x))) on validation images (never the test split). A
    check improves if, since the last improving check, the latent error has fallen by more than 1 % or the
    accuracy risen by more than 0.005 (so slow steady progress adds up); after `patience` checks without,
    training stops. The best check's inverter is the one saved.
    Its state (the curve, the best weights) lives in the work dir, so a resumed run continues the same rule."""

    LATENT_REL, ACCURACY_ABS, PROBES = 0.01, 0.005, 1000

    def __init__(self, cfg: TrainConfig, device):
        assert cfg.work_dir is not None and cfg.classifier is not None and cfg.patience is not None
        self.patience, self.path = cfg.patience, cfg.work_dir / "stopping"
        self.classifier = load_model(cfg.classifier, kind="classifier")[0].to(device).eval()
        val = load_dataset(cfg.dataset, "validation", cfg.data_dir)
        self.x, self.y = val.images[: self.PROBES].to(device), val.labels[: self.PROBES].to(device)
        self.state: dict[str, Any] = {"curve": [], "best_step": None, "since": 0}
        if (self.path / "state.json").exists():
            self.state = json.loads((self.path / "state.json").read_text())

    def check(self, step: int, I, G) -> bool:
        """Measure, record, keep the best weights; True once `patience` checks in a row did not improve."""
        I.eval()
        with torch.no_grad():
            z = sample_prior(G.prior, self.PROBES, G.latent_dim, torch.Generator().manual_seed(12345)).to(self.x.device)
            latent = (I(G(z)) - z).norm(dim=1).mean().item()
            accuracy = (self.classifier(G(I(self.x))).argmax(1) == self.y).float().mean().item()
        I.train()
        curve = self.state["curve"]
        # against the last improving check (the weights kept), so slow steady progress adds up to an improvement
        ref = next((c for c in curve if c["step"] == self.state["best_step"]), None)
        ref_latent, ref_accuracy = (
            (float("inf"), -1.0) if ref is None else (ref["sample_latent_error"], ref["t0_accuracy"])
        )
        improved = latent < ref_latent * (1 - self.LATENT_REL) or accuracy > ref_accuracy + self.ACCURACY_ABS
        curve.append({"step": step, "sample_latent_error": latent, "t0_accuracy": accuracy})
        if improved:
            self.state["best_step"], self.state["since"] = step, 0
            self.path.mkdir(parents=True, exist_ok=True)
            tmp = self.path / "best.safetensors.tmp"
            tmp.write_bytes(save_tensors({k: v.detach().cpu().contiguous() for k, v in I.state_dict().items()}))
            tmp.replace(self.path / "best.safetensors")
        else:
            self.state["since"] += 1
        atomic_write_json(self.path / "state.json", self.state)
        return self.ended

    @property
    def ended(self) -> bool:
        """`patience` checks in a row did not improve: training is over (also for a rerun of the same run)."""
        return self.state["since"] >= self.patience

    def restore_best(self, I) -> None:
        """Load the best check's weights into I (nothing when no check ran)."""
        if self.state["best_step"] is not None:
            I.load_state_dict(load_tensors((self.path / "best.safetensors").read_bytes()))

    def record(self, stopped_at: int) -> dict[str, Any]:
        """The manifest's account of the rule: its settings, the curve, the best and the last step."""
        return {
            "rule": (
                f"stop after {self.patience} checks without the latent error falling by > {self.LATENT_REL:.0%} "
                f"or the T = 0 accuracy rising by > {self.ACCURACY_ABS} since the last improving check "
                f"(validation, {len(self.x)} images); keep that check's weights"
            ),
            "best_step": self.state["best_step"],
            "stopped_at": stopped_at,
            "curve": self.state["curve"],
        }


# on_checkpoint(step, models, metrics): called on the main process right after every saved state;
# `models` as in run()'s result (inverter: [I, D, G]), `metrics` the last step's losses.
CheckpointHook = Callable[[int, list, dict], None]
# after_save(step, metrics): called on every process right after every saved state (Ray Train's report,
# which every worker must call alike); `metrics` the process's last step's losses.
SaveHook = Callable[[int, dict], None]


def run(
    cfg: TrainConfig,
    accelerator=None,
    *,
    on_checkpoint: CheckpointHook | None = None,
    after_save: SaveHook | None = None,
    log_mlflow: bool = True,
) -> dict:
    """Train one model kind to `cfg.steps`, resuming from `cfg.work_dir` when state is there.

    Returns step, finished, mlflow_run_id and, on the main process, files, metrics, the models, history
    (the (step, losses) logged every 50 steps) and train_examples. `on_checkpoint` lets a caller (a Tune
    trial) report after every saved state, `after_save` every process (a Ray Train worker); `log_mlflow=False`
    leaves MLflow to that caller (a Tune trial's driver logs its child run; so does run_on_ray's).
    """
    import mlflow

    accelerator = accelerator or _make_accelerator(cfg.device, cfg.mixed_precision)
    main = accelerator.is_main_process
    log = main and log_mlflow
    train = load_dataset(cfg.dataset, "train", cfg.data_dir)
    test = load_dataset(cfg.dataset, cfg.eval_split, cfg.data_dir)
    assert cfg.batch_size is not None, "filled by TrainConfig's validator"
    if cfg.steps is None:  # classifier: 100 epochs (the RED appendix: 50 epochs, but of 60,000 images)
        cfg.steps = 100 * max(len(train) // cfg.batch_size, 1)
    if cfg.eta is None:  # an ℓ2 margin of 0.03 per-pixel RMS: 0.84 on 28x28, 0.24 on 8x8
        cfg.eta = round(0.03 * float(np.sqrt(np.prod(train.image_shape))), 4)
    if cfg.augment_shift is None:  # 2 px on 28x28 MNIST; none on 8x8 digits (2 px is a quarter of the image)
        cfg.augment_shift = train.image_shape[-1] // 14
    torch.manual_seed(cfg.seed)  # initial weights depend on the seed only
    models, opts = _build(cfg, train.image_shape, train.num_classes)
    trainable = models[:2] if cfg.kind != "classifier" else models
    prepared = accelerator.prepare(*trainable, *opts)
    prepared = prepared if isinstance(prepared, (list, tuple)) else [prepared]
    loop = _Loop(cfg, accelerator, list(prepared[: len(trainable)]), list(prepared[len(trainable) :]), models, train)

    # the stopping rule's classifier and validation images load before any run starts (a missing file stops here)
    rule = _StoppingRule(cfg, accelerator.device) if cfg.patience is not None and main else None
    start, run_id = _resume(cfg, accelerator)
    if log:
        run_id = _start_run(cfg, run_id)
    t0, step = time.monotonic(), start
    history: list[tuple[int, dict]] = []
    bar = _progress(cfg, start, main)
    # a rerun after the stopping rule ended training trains no further
    done = _agree(accelerator, rule is not None and rule.ended)
    with _run_status(log):  # `kill` / `ray job stop`: the MLflow run ends KILLED, not RUNNING
        while step < cfg.steps and not done:
            _reseed(cfg, step, accelerator.process_index)
            metrics = loop.step(step)
            step += 1
            bar.update(1)
            timed_out = False
            if step % 50 == 0 or step == cfg.steps:
                if log:
                    mlflow.log_metrics({f"train/{k}": v for k, v in metrics.items()}, step=step)
                if main:
                    bar.set_postfix({k: f"{v:.3g}" for k, v in metrics.items()})
                    history.append((step, metrics))
                out_of_time = cfg.max_minutes is not None and time.monotonic() - t0 > 60 * cfg.max_minutes
                timed_out = _agree(accelerator, out_of_time)
            if cfg.patience is not None and step % cfg.eval_every == 0:
                stop = False
                if rule is not None:
                    I = accelerator.unwrap_model(loop.wrapped[0])
                    stop = rule.check(step, I, models[2])
                    if log:
                        mlflow.log_metrics({f"validation/{k}": v for k, v in rule.state["curve"][-1].items()}, step)
                done = _agree(accelerator, stop)
                timed_out = timed_out or done
            if step % cfg.checkpoint_every == 0 or step == cfg.steps or timed_out:
                _save_state(accelerator, cfg, step, run_id)
                if on_checkpoint is not None and main:
                    unwrapped = [accelerator.unwrap_model(m) for m in loop.wrapped] + models[len(loop.wrapped) :]
                    on_checkpoint(step, unwrapped, metrics)
                if after_save is not None:
                    after_save(step, metrics)
            if timed_out:
                break
        bar.close()
        accelerator.wait_for_everyone()
        result: dict[str, Any] = {
            "step": step,
            "finished": step >= cfg.steps or done,  # done: the stopping rule ended training
            "mlflow_run_id": run_id,
            "work_dir": str(cfg.work_dir),
        }
        result["models"] = [accelerator.unwrap_model(m) for m in loop.wrapped] + models[len(loop.wrapped) :]
        if main:
            stopping = None
            if rule is not None:
                rule.restore_best(result["models"][0])
                stopping = rule.record(step)
                result["stopping"] = stopping
            metrics = _evaluate(cfg, result["models"], test, accelerator.device)
            if log:
                mlflow.log_metrics({f"test/{k}": v for k, v in metrics.items()}, step=step)
            result["files"] = _save_models(cfg, result["models"], len(train), metrics, step, stopping)
            if log:  # the weights as logged models of the run, each with its manifest
                assert run_id is not None, "set by _start_run"
                client = mlflow.MlflowClient()
                result["logged_models"] = [log_weights(client, run_id, Path(s)) for s in result["files"]]
            result["metrics"] = metrics
            result["history"] = history
            result["train_examples"] = len(train)
        return result


@contextlib.contextmanager
def _run_status(log: bool) -> Iterator[None]:
    """SIGTERM as Ctrl-C while training; the MLflow run (when `log`) ends FINISHED, KILLED on Ctrl-C / SIGTERM, or
    FAILED with the error as a tag."""
    import mlflow

    status = "FAILED"
    try:
        with sigterm_interrupts():
            yield
        status = "FINISHED"
    except BaseException as err:
        status = "KILLED" if isinstance(err, (KeyboardInterrupt, SystemExit)) else "FAILED"
        if log:
            mlflow.set_tag("error", f"{type(err).__name__}: {err}"[:MAX_TAG_VALUE])
        raise
    finally:
        if log:
            mlflow.end_run(status=status)


def _start_run(cfg: TrainConfig, run_id: str | None) -> str:
    """Start (run_id None: with the config as params) or continue the run's MLflow run; returns its id."""
    import mlflow

    start_mlflow(cfg.tracking_uri, cfg.experiment)
    active = mlflow.start_run(run_id=run_id, run_name=None if run_id else f"{cfg.dataset}-{cfg.kind}")
    if run_id is None:
        mlflow.log_params({k: str(v) for k, v in cfg.model_dump().items()})
        mlflow.set_tags({"git_commit": git_commit(), "dataset": cfg.dataset, "kind": cfg.kind})
    return active.info.run_id


def main(settings: dict[str, Any], opts: JobOptions) -> JobResult:
    """The `invgan train` command: validate, train or resume, print where the model files and the run are.

    `settings` are TrainConfig fields; `opts` (the options every job command shares) gives the others: `out` (for
    train the folder of the model files, TrainConfig.out), `tracking_uri`, `progress` (TrainConfig.quiet negated),
    `log_mlflow` and `verbose`; `address` is the Ray cluster of `--workers N` (None: $RAY_ADDRESS inside a
    submitted job, else a local instance); with one worker training runs in this process (or in torchrun's). An
    error the user can fix (an invalid option, an unknown dataset, a missing generator) ends in one line. Returns
    the work dir (the resumable state of one worker; Ray Train's checkpoints too unless --storage is elsewhere) as
    run folder; the summary holds finished and step, and on the main process metrics and files (the model file
    stems)."""
    with user_errors("train", verbose=opts.verbose):
        cfg = TrainConfig(**settings, out=opts.out, tracking_uri=opts.tracking_uri, quiet=not opts.progress)
    assert cfg.work_dir is not None, "filled by TrainConfig's validator"
    with user_errors(f"train {cfg.kind}", cfg.work_dir, verbose=opts.verbose):
        if cfg.workers > 1:
            result = run_on_ray(cfg, address=opts.address, log_mlflow=opts.log_mlflow, verbose=opts.verbose)
        else:
            result = run(cfg, log_mlflow=opts.log_mlflow)
    summary = {key: result.get(key) for key in ("finished", "step", "metrics", "files")}
    if result.get("files"):  # the main process wrote the models
        more = "" if result["finished"] else " (rerun the same command to continue)"
        print(f"{'finished' if result['finished'] else 'stopped'} at step {result['step']}{more}: {result['metrics']}")
        print("model files: " + ", ".join(f + ".safetensors" for f in result["files"]))
        print(f"run folder: {cfg.work_dir}")
        if result["mlflow_run_id"]:
            print(f"MLflow run {result['mlflow_run_id']}; open with: {where_to_open(cfg.tracking_uri)}")
    return JobResult(cfg.work_dir, summary, result["mlflow_run_id"])


# ---------------------------------------------------------------- --workers N: Ray Train


def run_on_ray(cfg: TrainConfig, *, address: str | None = None, log_mlflow: bool = True, verbose: bool = False) -> dict:
    """`run` on `cfg.workers` Ray Train workers (TorchTrainer: gloo on CPUs, NCCL on GPUs); this process drives.

    Uses the Ray instance this process is connected to, else joins `address` (or $RAY_ADDRESS, set inside a
    submitted job), else starts a local instance with this machine's CPUs. Refuses at once (UserError) a
    missing generator and more workers than the cluster has CPUs (GPUs). The workers resume from the latest
    Ray Train checkpoint in <storage>/<work dir's name> (default: the work dir itself) and report one after
    every saved state: rank 0's Accelerate state and progress.json, as the work dir's `state` holds them for
    one process. Rank 0 returns the trained weights; this process writes the model files into `cfg.out` and
    keeps the MLflow run (params, the losses logged every 50 steps, the test metrics, the weights as logged
    models): no worker needs the driver's disk or its MLflow store. Returns what `run` returns on its main
    process; `models` are rebuilt from the weights rank 0 returned (inverter: [I, D, G])."""
    import mlflow
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if "LOCAL_RANK" in os.environ:
        raise UserError("--workers N starts its own processes on Ray; under torchrun leave --workers at 1")
    if cfg.device == "mps":
        raise UserError("--device mps trains in one process; --workers N runs on CPUs or CUDA GPUs")
    cfg = _absolute_paths(cfg)
    assert cfg.work_dir is not None and cfg.generator is not None, "filled by TrainConfig's validator"
    # the inverter's G, here before any worker starts: a missing or damaged file ends at once
    G = load_model(cfg.generator, kind="generator")[0] if cfg.kind == "inverter" else None
    with ray_session(address, num_cpus=os.cpu_count() or 1, verbose=verbose):
        use_gpu = _use_gpus(cfg)
        storage, name = _storage(cfg)
        where = f"{storage}/{name}"
        progress = _last_progress(storage, name)
        if progress is not None and not _same_config(progress.get("config"), cfg):
            raise UserError(f"{where} holds a run with a different config; use another --work-dir or --storage")
        run_id = progress.get("mlflow_run_id") if progress else None
        if not cfg.quiet:
            device = "GPU" if use_gpu else "CPU"
            start = f"resuming from step {progress['step']}" if progress else "training"
            print(f"{start} on {cfg.workers} Ray Train workers ({device}), state in {where}")
        if log_mlflow:
            run_id = _start_run(cfg, run_id)
        with _run_status(log_mlflow):
            trainer = TorchTrainer(
                _ray_worker,  # type: ignore[arg-type]  # typed as returning None; rank 0's value is the Result's
                train_loop_config={"cfg": cfg.model_dump(mode="json"), "use_gpu": use_gpu, "mlflow_run_id": run_id},
                torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
                scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu),
                run_config=RunConfig(
                    storage_path=storage, name=name, checkpoint_config=CheckpointConfig(num_to_keep=2)
                ),
            )
            out = _fit(trainer, where)
            step, metrics = out["step"], out["metrics"]
            models = _rebuild(out["models"]) + ([G] if G is not None else [])
            if log_mlflow:
                for at, losses in out["history"]:
                    mlflow.log_metrics({f"train/{k}": v for k, v in losses.items()}, step=at)
                mlflow.log_metrics({f"test/{k}": v for k, v in metrics.items()}, step=step)
            files = _save_models(cfg, models, out["train_examples"], metrics, step)
            result: dict[str, Any] = {
                "step": step,
                "finished": out["finished"],
                "mlflow_run_id": run_id,
                "work_dir": str(cfg.work_dir),
                "models": models,
                "files": files,
                "metrics": metrics,
                "history": out["history"],
                "train_examples": out["train_examples"],
            }
            if log_mlflow:
                assert run_id is not None, "set by _start_run"
                client = mlflow.MlflowClient()
                result["logged_models"] = [log_weights(client, run_id, Path(f)) for f in files]
            return result


def _ray_worker(config: dict) -> dict | None:
    """One Ray Train worker: `run` on this node's copy of the latest checkpoint, reporting after every saved
    state (rank 0 with its state as the checkpoint). Rank 0 returns the trained models' weights (state dicts
    as safetensors bytes, Ray Train refusing tensors in a return value; with their kinds and architectures),
    step, finished, metrics, history and train_examples."""
    import ray.train
    from ray.train import Checkpoint

    cfg = TrainConfig.model_validate(config["cfg"])
    local = Path(tempfile.mkdtemp(prefix="invgan-train-"))
    try:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            checkpoint.to_directory(str(local / "work" / "state"))
        # folders on this node: the driver's work dir and model folder may be on another machine
        cfg = cfg.model_copy(update={"work_dir": local / "work", "out": local / "out", "quiet": True})
        rank0 = ray.train.get_context().get_world_rank() == 0

        def after_save(step: int, metrics: dict) -> None:
            if not rank0:  # every worker reports at the same steps: a report is a barrier
                ray.train.report({"step": step, **metrics})
                return
            state = local / "work" / "state"
            progress = json.loads((state / "progress.json").read_text())
            atomic_write_json(state / "progress.json", progress | {"mlflow_run_id": config["mlflow_run_id"]})
            ray.train.report({"step": step, **metrics}, checkpoint=Checkpoint.from_directory(str(state)))

        try:
            accelerator = _make_accelerator("cuda" if config["use_gpu"] else "cpu", cfg.mixed_precision)
            result = run(cfg, accelerator, after_save=after_save, log_mlflow=False)
        except SystemExit as err:  # a refusal meant for the command line: the driver shows it as one line
            raise UserError(str(err)) from None
        if not accelerator.is_main_process:
            return None
        trained = zip(TRAINED[cfg.kind], result["models"], strict=False)
        weights = [
            (kind, m.arch, save_tensors({k: v.detach().cpu().contiguous() for k, v in m.state_dict().items()}))
            for kind, m in trained
        ]
        keys = ("step", "finished", "metrics", "history", "train_examples")
        return {"models": weights, **{key: result[key] for key in keys}}
    finally:
        shutil.rmtree(local, ignore_errors=True)


def _fit(trainer, where: str) -> dict:
    """trainer.fit()'s rank-0 return value; a worker's error the user can fix (a missing dataset or generator,
    a different config, storage the workers cannot reach) raised as itself, for one line on the command line."""
    from ray.train import TrainingFailedError

    try:
        result = trainer.fit()
    except TrainingFailedError as err:
        failures = getattr(err, "worker_failures", None) or {}
        for rank in sorted(failures):
            cause = failures[rank]
            if isinstance(cause, Exception) and user_message("train", cause) is not None:
                raise cause from None
            if "Unable to set up cluster storage" in str(cause):
                raise UserError(
                    f"the Ray workers cannot reach the state folder {where}: on several nodes give --storage a "
                    "folder every node shares (NFS) or a URI such as s3://bucket/path"
                ) from None
        raise
    if not isinstance(result.return_value, dict):
        raise RuntimeError(f"Ray Train's rank 0 returned {type(result.return_value).__name__}, not the weights")
    return result.return_value


def _rebuild(weights: list) -> list:
    """The models of rank 0's weights: (kind, architecture, state dict as safetensors bytes) each."""
    models = []
    for kind, arch, state in weights:
        model = build_model(kind, arch)
        model.load_state_dict(load_tensors(state))
        models.append(model)
    return models


def _absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """The config with its paths absolute: Ray Train's workers run in a folder of their own."""
    paths = {k: getattr(cfg, k) for k in ("data_dir", "generator", "out", "work_dir")}
    return cfg.model_copy(update={k: Path(v).expanduser().absolute() for k, v in paths.items() if v is not None})


def _use_gpus(cfg: TrainConfig) -> bool:
    """Whether the workers take a GPU each (--device cuda, or no --device and a GPU per worker in the cluster);
    UserError when the cluster has fewer CPUs (GPUs) than workers, which would otherwise wait for them forever."""
    import ray

    total = ray.cluster_resources()
    use_gpu = cfg.device == "cuda" or (cfg.device is None and total.get("GPU", 0) >= cfg.workers)
    need = "GPU" if use_gpu else "CPU"
    if total.get(need, 0) < cfg.workers:
        raise UserError(
            f"--workers {cfg.workers} needs {cfg.workers} {need}s (one per worker) but the Ray cluster has "
            f"{total.get(need, 0):g}: lower --workers or add nodes"
        )
    return use_gpu


def _storage(cfg: TrainConfig) -> tuple[str, str]:
    """RunConfig's storage_path and name: the run's checkpoints go to <storage>/<work dir's name>."""
    assert cfg.work_dir is not None, "filled by TrainConfig's validator"
    if cfg.storage is None:
        return str(cfg.work_dir.parent), cfg.work_dir.name
    if "://" in cfg.storage:
        return cfg.storage.rstrip("/"), cfg.work_dir.name
    return str(Path(cfg.storage).expanduser().absolute()), cfg.work_dir.name


def _same_config(saved: dict | None, cfg: TrainConfig) -> bool:
    """Whether a saved state's config key fits `cfg`, on the driver: the fields run() fills from the dataset
    (eta, augment_shift) are left out when `cfg` leaves them to it; each worker's run() checks the whole key."""
    key = _config_key(cfg)
    return saved is not None and all(saved.get(k) == v for k, v in key.items() if v is not None or k not in FILLED)


def _last_progress(storage: str, name: str) -> dict | None:
    """progress.json (step, MLflow run id, config key) of the latest checkpoint in <storage>/<name>, if any."""
    from ray.train import Result

    try:
        checkpoint = Result.from_path(f"{storage}/{name}").checkpoint
    except RuntimeError:  # no Ray Train run there yet
        return None
    if checkpoint is None:
        return None
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/progress.json") as stream:
        return json.loads(stream.read())


class _Loop:
    """One optimisation step of each kind, on the prepared (possibly DDP-wrapped) models."""

    def __init__(self, cfg: TrainConfig, accelerator, wrapped, opts, models, train):
        assert cfg.batch_size is not None and cfg.eta is not None, "filled by TrainConfig's validator and run()"
        self.cfg, self.acc, self.wrapped, self.opts = cfg, accelerator, wrapped, opts
        self.device = accelerator.device
        self.images, self.labels = train.images, train.labels
        self.sampler = BatchSampler(
            len(train), cfg.batch_size, cfg.seed, accelerator.process_index, accelerator.num_processes
        )
        self.share = cfg.batch_size // accelerator.num_processes
        self.mine = slice(accelerator.process_index * self.share, (accelerator.process_index + 1) * self.share)
        self.weights = training.InverterWeights(cfg.lambda_adv, cfg.lambda_semantic, cfg.lambda_latent, cfg.eta)
        if cfg.kind == "inverter":
            self.G = models[2].to(self.device).eval().requires_grad_(False)
        for model in wrapped:
            model.train()

    def step(self, step: int) -> dict[str, float]:
        cfg, back = self.cfg, self.acc.backward
        if cfg.kind == "classifier":
            assert cfg.augment_shift is not None, "filled by run()"
            if cfg.augment_shift:  # shifts drawn for the global batch (the same on every process), then sliced
                idx = self.sampler.batch(step)
                x = training.random_shift(self.images[idx].to(self.device), cfg.augment_shift)[self.sampler.mine]
                idx = idx[self.sampler.mine]
            else:
                idx = self.sampler(step)
                x = self.images[idx].to(self.device)
            y = self.labels[idx].to(self.device)
            return {"loss": training.classifier_step(self.wrapped[0], self.opts[0], x, y, backward=back)}
        if cfg.kind == "gan":
            G, D = self.wrapped
            sample = self.acc.unwrap_model(G).sample_latent
            assert cfg.n_critic is not None, "filled by TrainConfig's validator"
            for k in range(cfg.n_critic):
                real = self.images[self.sampler(step * cfg.n_critic + k)].to(self.device)
                d_loss = training.critic_step(
                    G, D, self.opts[1], real, sample(len(real)), cfg.gan_loss, gp_weight=cfg.gp_weight, backward=back
                )
            g_loss = training.generator_step(G, D, self.opts[0], sample(self.share), cfg.gan_loss, backward=back)
            return {"d_loss": d_loss, "g_loss": g_loss}
        I, D = self.wrapped
        z = self.G.sample_latent(cfg.batch_size)[self.mine]  # the global batch's latents (all processes), a slice
        return training.inverter_step(self.G, I, D, self.opts[0], self.opts[1], z, self.weights, backward=back)


def _agree(accelerator, flag: bool) -> bool:
    """The main process's decision, shared with every process (so all stop at the same step)."""
    if accelerator.num_processes == 1:
        return flag
    from accelerate.utils import broadcast_object_list

    return bool(broadcast_object_list([flag])[0])


def _resume(cfg: TrainConfig, accelerator) -> tuple[int, str | None]:
    """(step, MLflow run id) of the last saved state, after loading it; (0, None) on a fresh start.

    The step is recorded inside the state folder, so weights and step are always from the same save;
    `state.old` is the previous save, used when a kill fell between the two renames of a swap."""
    assert cfg.work_dir is not None, "filled by TrainConfig's validator"
    for folder in (cfg.work_dir / "state", cfg.work_dir / "state.old"):
        if (folder / "progress.json").exists():
            break
    else:
        return 0, None
    progress = json.loads((folder / "progress.json").read_text())
    if progress.get("config") != _config_key(cfg):
        raise SystemExit(f"{cfg.work_dir} holds a run with a different config; use another --work-dir or delete it")
    accelerator.load_state(str(folder))
    if accelerator.is_main_process:
        print(f"resuming from step {progress['step']} saved in {folder}")
    return progress["step"], progress.get("mlflow_run_id")


FILLED = ("eta", "augment_shift")  # None in a config: filled by run() from the dataset


def _config_key(cfg: TrainConfig) -> dict:
    """The config fields that must match for a resume to be valid (not steps, output or logging)."""
    skip = {
        "steps",
        "out",
        "work_dir",
        "checkpoint_every",
        "max_minutes",
        "tracking_uri",
        "quiet",
        "device",
        "eval_split",
        # how, not what: the same run on other hardware (N workers: the same numbers up to float sums)
        "mixed_precision",
        "workers",
        "storage",
    }
    return json.loads(cfg.model_dump_json(exclude=skip))


def _save_state(accelerator, cfg: TrainConfig, step: int, run_id: str | None) -> None:
    """save_state (and the step) into state.tmp, then swap it in with two renames: a kill at any point
    leaves `state` or `state.old` complete, each holding the step its weights belong to."""
    assert cfg.work_dir is not None, "filled by TrainConfig's validator"
    tmp, final, old = cfg.work_dir / "state.tmp", cfg.work_dir / "state", cfg.work_dir / "state.old"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        progress = {"step": step, "mlflow_run_id": run_id, "config": _config_key(cfg)}
        atomic_write_json(tmp / "progress.json", progress)
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _progress(cfg: TrainConfig, start: int, main: bool):
    return tqdm(
        total=cfg.steps,
        initial=start,
        desc=f"train {cfg.kind} [{cfg.dataset}]",
        disable=not main or cfg.quiet,
        unit="step",
        dynamic_ncols=True,
    )


def _save_models(
    cfg: TrainConfig, models, train_examples: int, metrics: dict, step: int, stopping: dict | None = None
) -> list[str]:
    assert cfg.out is not None, "filled by TrainConfig's validator"
    names = SAVED[cfg.kind]
    common = {
        "dataset": cfg.dataset,
        "split": "train",
        "split_seed": SPLIT_SEED,
        "train_examples": train_examples,
        "training": {**json.loads(cfg.model_dump_json(exclude={"quiet"})), "steps_done": step},
        "command": (
            " ".join(shlex.quote(a) for a in ["invgan", "train", cfg.kind, *sys.argv[3:]])
            if "invgan" in sys.argv[0]
            else shlex.join(sys.argv)
        ),
        "git_commit": git_commit(),
        "metrics": metrics,
    }
    if stopping is not None:  # the stopping rule, its learning curve and the step whose weights these are
        common["stopping"] = stopping
    written = []
    for name, model in zip(names, models, strict=False):  # inverter: only I of [I, D, G] is saved
        save_model(cfg.out / name, model, kind=name, arch=model.arch, **common)
        written.append(str(cfg.out / name))
    return written
