"""The sharded-job runner that eval, curves and RED share: Ray session, run folder, shards, progress.

    plan_shards ─▶ missing shards ─▶ ray.data map_batches(ShardActor(worker)) on the actors of a local
    instance or of a cluster ─▶ the driver checks and writes each shard's rows (atomic Parquet) as they
    arrive ─▶ progress bar / one log line per shard ─▶ a rerun skips finished shards

A job supplies a *worker*: a class built once per actor from keyword arguments, with
`run_shard(shard, start, stop) -> DataFrame`. The runner adds where each shard ran (`node`,
`worker`) to its rows.

Faults: Ray Data would restart a dead actor itself, but its restart depends on constructor
arguments held in the object store (Ray logs an error line about exactly that, ray#53727). The runner
instead starts actors without restarts and, when an actor or a node is lost, runs the shards still
missing again on the actors that remain (`max_attempts` passes); finished shards are on disk and
never recomputed, so every row exists exactly once. An exception raised by the worker's own code
stops the job at once, naming the shard: it would fail again.

A job is a `ShardedJob` (its worker, row schema, expected rows per shard, driver-side preparation and
summary) run by `run_sharded_job(cfg, job, opts) -> JobResult`: run folder, MLflow run, shards, summary.json.
`job_main` is every job command's entry: config errors and user errors in one line, the job, its tables,
where the results are. The run folder lives in jobs/run_folder.py, the Ray session in jobs/ray_session.py,
the progress bar in jobs/progress.py, the row schemas in jobs/schemas.py.
"""

from __future__ import annotations

import atexit
import math
import os
import re
import shutil
import socket
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd
from pydantic import ValidationError

from invgan_core.files import atomic_write_json
from jobs import storage
from jobs.common import UserError, describe_error, git_commit, user_errors
from jobs.progress import Progress
from jobs.ray_session import ray_session
from jobs.run_folder import missing_shards, plan_shards, prepare_run_dir, read_rows, run_folder, shard_path, write_shard
from jobs.run_folder import weights_hashes as weights_hashes
from jobs.schemas import Schema
from jobs.tracking import RUN_RECORD, JobRun, job_run, recorded_run_id, where_to_open

# The first pass waits this long for the whole actor pool before it hands out shards (so the first actor up
# does not take every shard while the others load their models), then fails with a message that names the
# missing resources; `INVGAN_WAIT_FOR_WORKERS_S` changes it (an autoscaling cluster may need longer).
WAIT_FOR_WORKERS_S = int(os.environ.get("INVGAN_WAIT_FOR_WORKERS_S", "600"))


# ---------------------------------------------------------------- what every job returns


@dataclass
class JobResult:
    """What every job (eval, red, curves, recovery, train) returns: where its results are, the rows they derive
    from (empty for train), a JSON-able summary, the MLflow run and how many shards were computed or reused."""

    run_dir: Path
    summary: dict
    mlflow_run_id: str | None = None
    rows: pd.DataFrame = field(default_factory=pd.DataFrame)
    computed_shards: int = 0
    skipped_shards: int = 0
    retried_shards: int = 0


@dataclass(frozen=True)
class JobOptions:
    """The options every job command shares (declared once in the CLI): where results go, which Ray cluster and
    MLflow store to use, and how much to print."""

    out: str | Path | None = None  # run folder, a path or a URI [<runs>/<name>-<config hash>]; rerun to resume
    address: str | None = None  # Ray cluster ('auto' joins a running one); None starts a local instance
    tracking_uri: str | None = None  # MLflow store [$MLFLOW_TRACKING_URI or SQLite in the runs folder]
    log_mlflow: bool = True
    progress: bool = True
    verbose: bool = False


def _node_where() -> tuple[str, str]:
    import ray

    return ray.get_runtime_context().get_node_id(), f"{socket.gethostname()}:{os.getpid()}"


class ShardActor:
    """One Ray Data actor: builds the job's worker once, then runs one shard per call and tags its rows
    with the node and process that computed them. A worker exception names the shard."""

    def __init__(self, worker: type, kwargs: dict, shipped=None):
        self.node, self.where = _node_where()
        if shipped is not None:  # the files the job ships (object store), in a folder of this node: its run_dir
            kwargs = kwargs | {"run_dir": str(_materialize(shipped))}
        # A worker that cannot start (a UserError: GPUs given but no CUDA in this node's torch) fails the first
        # shard it is handed, naming it, instead of an actor death that would look like a lost node.
        self.worker: Any = None
        self.failed: UserError | None = None
        try:
            self.worker = worker(**kwargs)
        except UserError as err:
            self.failed = err

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        frames = []
        for r in batch.itertuples():
            try:
                if self.failed is not None:
                    raise self.failed
                frame = self.worker.run_shard(int(r.shard), int(r.start), int(r.stop))
            except Exception as err:
                raise RuntimeError(
                    f"shard {r.shard} (examples {r.start}..{r.stop - 1}) failed on node "
                    f"{self.node[:12]}: {type(err).__name__}: {err}"
                ) from err
            frames.append(frame.assign(node=self.node, worker=self.where))
        return pd.concat(frames, ignore_index=True)


def _materialize(shipped) -> Path:
    """Write the shipped files ({path relative to the run folder: bytes}, an object-store reference) into a new
    local folder (removed when the actor's process exits)."""
    import ray

    files = ray.get(shipped) if isinstance(shipped, ray.ObjectRef) else shipped
    folder = Path(tempfile.mkdtemp(prefix="invgan-shipped-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return write_files(files, folder)


def write_files(files: dict[str, bytes], folder: Path) -> Path:
    """Write {path relative to `folder`: bytes} (what `shipped_files` read) into `folder`; returns it."""
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return folder


def shipped_files(run_dir: Path, patterns: tuple[str, ...]) -> dict[str, bytes]:
    """{path relative to the run folder: bytes} of the files matching `patterns` (glob, under the run folder)."""
    paths = sorted({p for pattern in patterns for p in run_dir.glob(pattern) if p.is_file()})
    return {p.relative_to(run_dir).as_posix(): p.read_bytes() for p in paths}


# ---------------------------------------------------------------- the runner


@dataclass
class ShardStats:
    computed: int = 0
    retried: int = 0  # shards run again after a lost actor or node, or a shard's failed first attempt
    attempts: int = 0
    lost: list[str] = field(default_factory=list)  # what was lost, one entry per failed pass
    failed: dict[int, str] = field(default_factory=dict)  # shard -> the error of its failed first attempt


_SHARD_ERROR = re.compile(r"shard (\d+) \(examples [^)]*\) failed on node \w+: (.*)")


def _retry_once_or_raise(err: BaseException, stats: ShardStats, desc: str, run_dir: Path, max_attempts: int) -> str:
    """A shard whose worker raised gets one more attempt (a transient fault: memory, a file system); the
    second failure of the same shard, or an error that names no shard, stops the job with that error."""
    found = _SHARD_ERROR.search(str(err))
    if found is None or stats.attempts >= max_attempts:
        raise err
    shard, message = int(found.group(1)), found.group(2).splitlines()[0][:300]
    if message.startswith(f"{UserError.__name__}: "):  # the user's to fix: it would fail again
        raise UserError(f"{desc}: {message.removeprefix(f'{UserError.__name__}: ')}") from None
    if shard in stats.failed:
        raise RuntimeError(
            f"{desc}: shard {shard} failed twice ({message}); finished shards are kept in "
            f"{run_dir}: fix the cause and rerun to resume"
        ) from err
    stats.failed[shard] = message
    return f"shard {shard} failed ({message})"


def _is_lost_worker(err: BaseException | None) -> bool:
    """An actor or node died (retry the missing shards) as opposed to an error of the job's own code."""
    from ray import exceptions as rex

    lost = (
        rex.ActorDiedError,
        rex.ActorUnavailableError,
        rex.NodeDiedError,
        rex.WorkerCrashedError,
        rex.ObjectLostError,
        rex.OwnerDiedError,
        rex.RaySystemError,
    )
    while err is not None:
        if isinstance(err, lost):
            return True
        if isinstance(err, rex.RayTaskError) and isinstance(getattr(err, "cause", None), lost):
            return True
        err = err.__cause__ or err.__context__
    return False


def run_shards(
    todo: list[tuple[int, int, int]],
    run_dir: Path,
    *,
    worker: type,
    worker_kwargs: dict,
    resources,
    expected: Callable[[int, int], int],
    schema: Schema,
    desc: str,
    address: str | None = None,
    progress: bool = True,
    verbose: bool = False,
    on_shard: Callable[[Progress], None] | None = None,
    max_attempts: int = 3,
    shipped: dict[str, bytes] | None = None,
) -> ShardStats:
    """Compute the `todo` shards with `worker` actors and write each one's rows (plus `node`, `worker`)
    to the run folder as they arrive, after checking it holds the `expected(start, stop)` rows. `shipped` files
    travel to every worker through the object store and the worker gets the folder they are in as `run_dir`."""

    stats = ShardStats()
    bounds = {k: (a, b) for k, a, b in todo}
    bar = Progress(desc, len(todo), sum(b - a for _, a, b in todo), run_dir / "progress.log", show=progress)
    local_cpus = int(math.ceil(resources.num_workers * resources.num_cpus_per_worker)) + 1  # +1: Ray Data's tasks
    try:
        with ray_session(address, num_cpus=local_cpus, verbose=verbose):
            import ray

            ref = ray.put(shipped) if shipped is not None else None  # once, shared by every actor of every pass
            while True:
                left = missing_shards(run_dir, todo)
                if not left:
                    return stats
                stats.attempts += 1
                try:
                    _one_pass(
                        left,
                        run_dir,
                        worker,
                        worker_kwargs,
                        ref,
                        resources,
                        bounds,
                        expected,
                        schema,
                        bar,
                        stats,
                        on_shard,
                        elastic=stats.attempts > 1,
                    )
                except Exception as err:  # noqa: BLE001 - sorted into lost workers and real errors below
                    if not _is_lost_worker(err):
                        failure = _retry_once_or_raise(err, stats, desc, run_dir, max_attempts)
                        remaining = len(missing_shards(run_dir, todo))
                        stats.retried += remaining
                        bar.note(f"{failure}; running the {remaining} missing shard(s) again")
                        continue
                    remaining = len(missing_shards(run_dir, todo))
                    stats.lost.append(f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
                    if stats.attempts >= max_attempts:
                        raise RuntimeError(
                            f"{desc}: {remaining} shard(s) still missing after {stats.attempts} "
                            f"passes that lost workers ({'; '.join(stats.lost)}); finished shards "
                            f"are kept in {run_dir}: rerun to resume"
                        ) from err
                    stats.retried += remaining
                    bar.note(f"lost a worker ({stats.lost[-1]}); running the {remaining} missing shard(s) again")
    finally:
        bar.close()


def _one_pass(
    left,
    run_dir,
    worker,
    worker_kwargs,
    shipped,
    resources,
    bounds,
    expected,
    schema,
    bar,
    stats,
    on_shard,
    *,
    elastic: bool,
) -> None:
    import ray

    check_fits(resources)
    items = [{"shard": k, "start": a, "stop": b} for k, a, b in left]
    size = min(resources.num_workers, len(items))
    # after a loss, take whatever actors the remaining nodes can hold rather than wait for the lost ones
    pool = ray.data.ActorPoolStrategy(min_size=1, max_size=size) if elastic else ray.data.ActorPoolStrategy(size=size)
    context = ray.data.DataContext.get_current()  # set before the dataset: it copies the context
    context.wait_for_min_actors_s = -1 if elastic else WAIT_FOR_WORKERS_S
    # A shard is one unit of Ray Data work and may legitimately take longer than Ray's no-progress timeout
    # (30 min: BPDA through Defense-GAN on a loaded machine); lost workers are caught by our own retries.
    context.execution_no_progress_timeout_s = -1
    with warnings.catch_warnings():  # max_restarts has no named parameter yet (Ray 2.60 deprecates the kwargs)
        warnings.filterwarnings("ignore", message=".*ray_remote_args. is deprecated")
        rows = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            ShardActor,
            fn_constructor_kwargs={"worker": worker, "kwargs": worker_kwargs, "shipped": shipped},
            batch_size=1,
            batch_format="pandas",
            compute=pool,
            num_cpus=resources.num_cpus_per_worker,
            num_gpus=resources.num_gpus_per_worker,
            max_restarts=0,
        )
    try:
        for batch in rows.iter_batches(batch_size=None, batch_format="pandas"):
            _write_batch(batch, run_dir, bounds, expected, schema, bar, stats, on_shard)
    except Exception as err:  # noqa: BLE001 - Ray Data may wrap the timeout of the actor pool's start
        if not _caused_by(err, ray.exceptions.GetTimeoutError):
            raise
        raise RuntimeError(
            f"{size} worker(s) of {resources.num_cpus_per_worker:g} CPU(s)"
            + (f" and {resources.num_gpus_per_worker:g} GPU(s)" if resources.num_gpus_per_worker else "")
            + f" did not all start within {WAIT_FOR_WORKERS_S} s: the cluster has {ray.cluster_resources()}. "
            "Lower resources.num_workers (or the per-worker resources), add nodes, or set "
            "INVGAN_WAIT_FOR_WORKERS_S for a slower autoscaler"
        ) from err


def check_fits(resources) -> None:
    """Stop at once, naming what is missing and what the cluster has, when no live node can hold even one worker
    (a GPU asked of a cluster without one): Ray would wait for it forever. An autoscaling cluster that adds such
    nodes on demand sets $INVGAN_WAIT_FOR_WORKERS_S, and the runner waits that long instead."""
    import ray

    if "INVGAN_WAIT_FOR_WORKERS_S" in os.environ:
        return
    need = {"CPU": resources.num_cpus_per_worker, "GPU": resources.num_gpus_per_worker}
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if any(all(node.get(k, 0) >= v for k, v in need.items() if v > 0) for node in nodes):
        return
    wanted = " and ".join(f"{v:g} {k}" for k, v in need.items() if v > 0)
    offered = "; ".join(f"{n.get('CPU', 0):g} CPU, {n.get('GPU', 0):g} GPU" for n in nodes) or "no live node"
    raise UserError(
        f"no node of the cluster can hold a worker of {wanted} (the nodes offer: {offered}): lower "
        "resources.num_cpus_per_worker / num_gpus_per_worker, or add such a node (an autoscaling cluster: set "
        "INVGAN_WAIT_FOR_WORKERS_S to wait for one)"
    )


def _caused_by(err: BaseException | None, cls: type) -> bool:
    while err is not None:
        if isinstance(err, cls) or isinstance(getattr(err, "cause", None), cls):
            return True
        err = err.__cause__ or err.__context__
    return False


def _write_batch(batch, run_dir, bounds, expected, schema, bar, stats, on_shard) -> None:
    """Check and write each shard in a batch of rows as it arrives."""
    for shard, frame in batch.groupby("shard"):
        a, b = bounds[int(shard)]
        if len(frame) != expected(a, b):
            raise RuntimeError(f"shard {shard}: {len(frame)} rows, expected {expected(a, b)}")
        write_shard(shard_path(run_dir, int(shard)), frame.reset_index(drop=True), schema)
        stats.computed += 1
        bar.update(int(shard), b - a, str(frame["node"].iloc[0]))
        storage.push(run_dir / "progress.log")
        if on_shard is not None:
            on_shard(bar)


# ---------------------------------------------------------------- one sharded job, start to end


@dataclass
class MoreShards:
    """Shards a job adds after its own (`ShardedJob.more`): computed into `folder` (its own rows/ and progress
    log) by workers built from `worker_kwargs`, each holding `expected(start, stop)` rows."""

    folder: Path
    shards: list[tuple[int, int, int]]
    worker_kwargs: dict
    expected: Callable[[int, int], int]
    label: str


@dataclass
class ShardedJob:
    """What a sharded job (eval, red, curves) supplies to `run_sharded_job`."""

    kind: str  # "eval", "red", "curves": the MLflow tag `kind` and the progress bar's label
    worker: type  # built once per actor from worker_kwargs; run_shard(shard, start, stop) -> its rows
    worker_kwargs: dict
    schema: Schema  # the rows' columns: every shard is checked against it before it is written
    n_examples: int
    expected: Callable[[int, int], int]  # the rows a complete shard (start, stop) holds
    # From the rows (with the MLflow run, None without MLflow, and the shard counts): the summary, after logging
    # whatever the job logs; `run_sharded_job` writes it to summary.json.
    finish: Callable[[Path, pd.DataFrame, JobRun | None, dict], dict]
    prepare: Callable[[Path], None] | None = None  # driver work before the first shard (substitutes, dictionary)
    on_start: Callable[[JobRun], None] | None = None  # what to record in the MLflow run at once (the dataset)
    # Files of the run folder the workers need (glob patterns, e.g. the RED dictionary): they travel through the
    # object store, never through a shared disk, and the worker gets the folder they land in as `run_dir`.
    ships: tuple[str, ...] = ()
    tags: dict[str, str] = field(default_factory=dict)
    # From the run folder and the rows so far: more shards to compute before the summary (an eval's precision
    # rounds), asked again after each, until it returns None. Their rows join the job's (`read_rows`).
    more: Callable[[Path, pd.DataFrame], MoreShards | None] | None = None


def run_sharded_job(cfg, job: ShardedJob, opts: JobOptions) -> JobResult:
    """Run (or resume) a sharded job: its run folder (checked to hold the same config and weights), one MLflow run
    over its whole life, the missing shards on Ray workers, then the summary from every shard's rows.

    The job has checked its own inputs (weights, data) before: nothing here starts until they are known good."""
    run_dir = run_folder(cfg, opts.out)
    prepare_run_dir(cfg, run_dir)
    shards = plan_shards(job.n_examples, cfg.shard_size)
    todo = missing_shards(run_dir, shards)
    tags = {
        "kind": job.kind,
        "dataset": cfg.dataset,
        "git_commit": git_commit(),
        "config_hash": cfg.config_hash(),
        **{f"weights.{k}.sha256": h for k, h in weights_hashes(cfg).items()},
        **job.tags,
    }
    with job_run(cfg, run_dir, enabled=opts.log_mlflow, tags=tags) as tracker:
        storage.push(run_dir / RUN_RECORD)  # a resume elsewhere continues this MLflow run
        if tracker is not None and job.on_start is not None:
            job.on_start(tracker)
        stats = ShardStats()
        if todo:
            if job.prepare is not None:
                job.prepare(run_dir)
            stats = run_shards(
                todo,
                run_dir,
                worker=job.worker,
                worker_kwargs=job.worker_kwargs,
                resources=cfg.resources,
                expected=job.expected,
                schema=job.schema,
                desc=f"{job.kind} {cfg.name}",
                address=opts.address,
                progress=opts.progress,
                verbose=opts.verbose,
                on_shard=tracker.progress if tracker else None,
                shipped=shipped_files(run_dir, job.ships) if job.ships else None,
            )
        rows = read_rows(run_dir, job.schema)
        prepared = bool(todo)
        while job.more is not None and (added := job.more(run_dir, rows)) is not None:
            if not prepared and job.prepare is not None:
                job.prepare(run_dir)
                prepared = True
            more = run_shards(
                missing_shards(added.folder, added.shards),
                added.folder,
                worker=job.worker,
                worker_kwargs=added.worker_kwargs,
                resources=cfg.resources,
                expected=added.expected,
                schema=job.schema,
                desc=f"{job.kind} {cfg.name} {added.label}",
                address=opts.address,
                progress=opts.progress,
                verbose=opts.verbose,
                shipped=shipped_files(run_dir, job.ships) if job.ships else None,
            )
            stats.computed, stats.retried = stats.computed + more.computed, stats.retried + more.retried
            rows = read_rows(run_dir, job.schema)
        shards_info = {
            "total": len(shards),
            "computed": stats.computed,
            "reused": len(shards) - len(todo),
            "retried": stats.retried,
            "lost_workers": stats.lost,
            "failed_attempts": {str(k): v for k, v in stats.failed.items()},
        }
        summary = job.finish(run_dir, rows, tracker, shards_info)
        # a rerun without MLflow keeps the link to the run logged before
        run_id = tracker.run_id if tracker is not None else recorded_run_id(run_dir)
        extra = {"mlflow_run_id": run_id, "config_hash": cfg.config_hash(), "shards": shards_info}
        atomic_write_json(run_dir / "summary.json", summary | extra)
        storage.finish(run_dir)  # a URI run folder: its summary, tables and figures; its lease released
    return JobResult(run_dir, summary, run_id, rows, len(todo), len(shards) - len(todo), stats.retried)


def job_main(
    what: str,
    load: Callable[[], Any],
    run: Callable[[Any, JobOptions], JobResult],
    show: Callable[[Any, JobResult], None],
    opts: JobOptions,
) -> JobResult:
    """Every job command's entry (eval, red, curves, recovery): load and validate the config (`load`; a bad one
    ends in one line naming the field), run the job with the user's errors in one line (`user_errors`), print
    its tables (`show`), then where its results are."""
    cfg = _load_config(what, load)
    if opts.tracking_uri:
        cfg.mlflow.tracking_uri = opts.tracking_uri
    with user_errors(what, storage.where(run_folder(cfg, opts.out)), verbose=opts.verbose):
        result = run(cfg, opts)
    show(cfg, result)
    retried = f", {result.retried_shards} run again (see summary.json: shards)" if result.retried_shards else ""
    if result.computed_shards or result.skipped_shards:
        print(f"\nshards: {result.computed_shards} computed, {result.skipped_shards} reused{retried}")
    print(f"run folder: {storage.where(result.run_dir)}")
    if result.mlflow_run_id:
        print(
            f"MLflow run {result.mlflow_run_id} in experiment {cfg.family!r}; open with: "
            f"{where_to_open(cfg.mlflow.tracking_uri)}"
        )
    return result


def _load_config(what: str, load: Callable[[], Any]) -> Any:
    try:
        return load()
    except (ValidationError, ValueError, FileNotFoundError) as err:
        raise SystemExit(f"invalid {what} config: {describe_error(err)}") from None
