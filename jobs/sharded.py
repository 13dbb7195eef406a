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

Where Ray runs is decided here and nowhere else: `address` (or $RAY_ADDRESS, set inside a submitted
Ray job) joins that cluster; otherwise a local instance sized for the job is started and stopped.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import socket
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pandas as pd

from invgan_core.checkpoint import atomic_write_bytes
from jobs.common import runs_dir

WHERE_COLUMNS = ["node", "worker"]  # appended to every job's rows: where the shard ran
# The first pass waits this long for the whole actor pool before it hands out shards (so the first actor up
# does not take every shard while the others load their models), then fails with a message that names the
# missing resources; `INVGAN_WAIT_FOR_WORKERS_S` changes it (an autoscaling cluster may need longer).
WAIT_FOR_WORKERS_S = int(os.environ.get("INVGAN_WAIT_FOR_WORKERS_S", "600"))
DEFAULT_WORKER_NICENESS = "0"  # Ray's default (15) lets any other busy process starve the workers


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


# ---------------------------------------------------------------- run folder and shards


def run_folder(cfg, out: Path | None) -> Path:
    """--out, or <runs>/<name>-<config hash> (any job config)."""
    return Path(out) if out else runs_dir() / f"{cfg.name}-{cfg.config_hash()[:12]}"


def plan_shards(n_examples: int, shard_size: int) -> list[tuple[int, int, int]]:
    """(shard, start, stop) covering positions 0..n-1 in order."""
    return [
        (k, k * shard_size, min(n_examples, (k + 1) * shard_size)) for k in range(math.ceil(n_examples / shard_size))
    ]


def shard_path(run_dir: Path, shard: int) -> Path:
    return run_dir / "rows" / f"shard-{shard:05d}.parquet"


def missing_shards(run_dir: Path, shards: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """The shards still to compute: no file, or a file that is not a readable Parquet file (damaged on disk
    after it was written: moved to <run>/damaged/ with a warning, then computed again)."""
    return [s for s in shards if not _readable_shard(shard_path(run_dir, s[0]))]


def _readable_shard(path: Path) -> bool:
    import pyarrow.parquet as pq

    if not path.exists():
        return False
    try:
        pq.read_metadata(path)  # the footer: a truncated or overwritten file fails here
        return True
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a damaged file
        damaged = path.parent.parent / "damaged"  # beside rows/, so it is not read or uploaded as rows
        damaged.mkdir(exist_ok=True)
        target = damaged / f"{path.name}.{time.strftime('%Y%m%dT%H%M%S')}"
        path.replace(target)
        print(
            f"warning: {path} is damaged ({type(err).__name__}: {str(err).splitlines()[0][:120]}); "
            f"moved to {target} and computing the shard again",
            file=sys.stderr,
            flush=True,
        )
        return False


def write_shard(path: Path, frame: pd.DataFrame) -> None:
    """Parquet bytes written atomically (temp file, fsync, rename): a shard file is complete or absent."""
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    atomic_write_bytes(path, buffer.getvalue())


def read_rows(run_dir: Path, columns: list[str]) -> pd.DataFrame:
    files = sorted((run_dir / "rows").glob("shard-*.parquet"))
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True) if files else pd.DataFrame(columns=columns)


def weights_hashes(cfg) -> dict[str, str]:
    """sha256 of every model file the job uses, from the (verified) manifests."""
    root = cfg.weights_dir()
    return {
        k: json.loads((root / f"{k}.json").read_text())["sha256"]
        for k in ("generator", "classifier", "inverter")
        if (root / f"{k}.json").exists()
    }


_LOCKS: dict[Path, object] = {}  # run folder -> the open lock file this process holds until it exits


def lock_run_dir(run_dir: Path) -> None:
    """One writer per run folder: a second process asked to write it at once stops with a clear message
    instead of interleaving shards. The lock (flock on <run>/.lock) is released when the process exits,
    however it exits; the same process may prepare the folder again (a rerun in a notebook or a test)."""
    import fcntl

    run_dir = run_dir.resolve()
    if run_dir in _LOCKS:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = (run_dir / ".lock").open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise SystemExit(
            f"{run_dir} is being written by {holder}: wait for it to finish, or choose another --out"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
    handle.flush()
    _LOCKS[run_dir] = handle


def prepare_run_dir(cfg, run_dir: Path) -> None:
    """Create the run folder, or check that the one found holds the same config and the same weights
    (so a resume never mixes rows of two configs, or of weights retrained in place)."""
    from invgan_core.checkpoint import atomic_write_json

    lock_run_dir(run_dir)
    recorded = run_dir / "config.json"
    current = {
        "config_hash": cfg.config_hash(),
        "weights_sha256": weights_hashes(cfg),
        "config": cfg.model_dump(mode="json"),
    }
    if recorded.exists():
        previous = json.loads(recorded.read_text())
        if previous.get("config_hash") != current["config_hash"]:
            raise SystemExit(
                f"{run_dir} holds results of a different config ({previous.get('config_hash', '?')[:12]});"
                " choose another --out or delete the folder"
            )
        if previous.get("weights_sha256", current["weights_sha256"]) != current["weights_sha256"]:
            raise SystemExit(
                f"{run_dir} holds results of other weights than {cfg.weights_dir()} now has;"
                " choose another --out or delete the folder"
            )
    else:
        atomic_write_json(recorded, current)


# ---------------------------------------------------------------- Ray


def quiet_ray_logging(verbose: bool) -> None:
    """Ray's, Ray Data's and MLflow's INFO chatter (execution plans, progress dumps, token and database
    notices) only with --verbose; our own progress bar or per-shard lines replace it."""
    import ray.data  # configures its logger on import: adjust it afterwards

    level = logging.INFO if verbose else logging.WARNING
    for name in ("ray", "ray.data", "ray.tune", "ray.train", "mlflow", "alembic"):
        logging.getLogger(name).setLevel(level)
    if not verbose:  # Ray's notice that it turned token authentication on for a local instance
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"
    ray.data.DataContext.get_current().enable_progress_bars = verbose


@contextmanager
def ray_session(address: str | None = None, *, num_cpus: int, verbose: bool = False) -> Iterator[None]:
    """Use the Ray instance this process is already connected to; else join `address` (or $RAY_ADDRESS,
    which Ray sets inside a submitted job); else start a local instance with `num_cpus` CPUs and
    workers at niceness $RAY_worker_niceness (default 0 here). Disconnects only from what it started."""
    import ray

    quiet_ray_logging(verbose)
    if ray.is_initialized():
        yield
        return
    in_job = not address and bool(os.environ.get("RAY_ADDRESS"))  # the driver of a submitted Ray job
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {
        "address": address,
        "log_to_driver": verbose,
        "logging_level": logging.INFO if verbose else logging.WARNING,
    }
    if not address:
        os.environ.setdefault("RAY_worker_niceness", DEFAULT_WORKER_NICENESS)  # read by the raylet it starts
        kwargs |= {"num_cpus": num_cpus, "include_dashboard": False}
    ray.init(**kwargs)
    try:
        yield
    finally:
        # A submitted job's driver stays connected until it exits: the job owns the connection (Ray
        # closes it when the job ends), and later stages of the same command reuse it.
        if not in_job:
            ray.shutdown()


def _node_where() -> tuple[str, str]:
    import ray

    return ray.get_runtime_context().get_node_id(), f"{socket.gethostname()}:{os.getpid()}"


def _inject_fault(shard: int) -> None:
    """For the fault tests only: $INVGAN_INJECT_FAULT = "<folder>:<shard>,<shard>" makes the first attempt
    at each listed shard raise (a marker file in <folder> records the attempt)."""
    spec = os.environ.get("INVGAN_INJECT_FAULT")
    if not spec:
        return
    folder, shards = spec.rsplit(":", 1)
    marker = Path(folder) / f"fault-shard-{shard}"
    if str(shard) in shards.split(",") and not marker.exists():
        marker.touch()
        raise OSError(f"injected fault on the first attempt at shard {shard} ($INVGAN_INJECT_FAULT)")


class ShardActor:
    """One Ray Data actor: builds the job's worker once, then runs one shard per call and tags its rows
    with the node and process that computed them. A worker exception names the shard."""

    def __init__(self, worker: type, kwargs: dict):
        self.worker = worker(**kwargs)
        self.node, self.where = _node_where()

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        frames = []
        for r in batch.itertuples():
            try:
                _inject_fault(int(r.shard))
                frame = self.worker.run_shard(int(r.shard), int(r.start), int(r.stop))
            except Exception as err:
                raise RuntimeError(
                    f"shard {r.shard} (examples {r.start}..{r.stop - 1}) failed on node "
                    f"{self.node[:12]}: {type(err).__name__}: {err}"
                ) from err
            frames.append(frame.assign(node=self.node, worker=self.where))
        return pd.concat(frames, ignore_index=True)


# ---------------------------------------------------------------- progress


@dataclass
class Progress:
    """One tqdm bar on a terminal (shards, examples/s, ETA); otherwise one line per finished shard.
    Either way each finished shard is appended to <run folder>/progress.log."""

    desc: str
    total_shards: int
    total_examples: int
    log_path: Path
    show: bool = True
    done_shards: int = 0
    done_examples: int = 0
    started: float = field(default_factory=time.monotonic)
    bar: Any = None  # a tqdm bar on a terminal

    def __post_init__(self):
        from tqdm.auto import tqdm

        self.tty = self.show and sys.stdout.isatty()
        if self.tty:
            self.bar = tqdm(total=self.total_shards, desc=self.desc, unit="shard", file=sys.stdout)

    def update(self, shard: int, examples: int, node: str) -> None:
        self.done_shards += 1
        self.done_examples += examples
        elapsed = time.monotonic() - self.started
        rate = self.done_examples / elapsed if elapsed > 0 else 0.0
        left = (self.total_examples - self.done_examples) / rate if rate > 0 else float("nan")
        line = (
            f"{time.strftime('%H:%M:%S')} {self.desc}: shard {shard} done ({examples} examples, node {node[:12]}); "
            f"{self.done_shards}/{self.total_shards} shards, {rate:.2f} examples/s, ETA {_duration(left)}"
        )
        with self.log_path.open("a") as log:
            log.write(line + "\n")
        if self.tty:
            self.bar.set_postfix_str(f"{rate:.2f} ex/s", refresh=False)
            self.bar.update(1)
        elif self.show:
            print(line, flush=True)

    def note(self, message: str) -> None:
        with self.log_path.open("a") as log:
            log.write(f"{time.strftime('%H:%M:%S')} {self.desc}: {message}\n")
        if self.show:
            (self.bar.write if self.tty else print)(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _duration(seconds: float) -> str:
    if seconds != seconds:
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{secs:02d}s"


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
    columns: list[str],
    desc: str,
    address: str | None = None,
    progress: bool = True,
    verbose: bool = False,
    on_shard: Callable[[Progress], None] | None = None,
    max_attempts: int = 3,
) -> ShardStats:
    """Compute the `todo` shards with `worker` actors and write each one's rows (plus `node`, `worker`)
    to the run folder as they arrive, after checking it holds the `expected(start, stop)` rows."""

    stats = ShardStats()
    bounds = {k: (a, b) for k, a, b in todo}
    bar = Progress(desc, len(todo), sum(b - a for _, a, b in todo), run_dir / "progress.log", show=progress)
    local_cpus = int(math.ceil(resources.num_workers * resources.num_cpus_per_worker)) + 1  # +1: Ray Data's tasks
    try:
        with ray_session(address, num_cpus=local_cpus, verbose=verbose):
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
                        resources,
                        bounds,
                        expected,
                        columns,
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
    left, run_dir, worker, worker_kwargs, resources, bounds, expected, columns, bar, stats, on_shard, *, elastic: bool
) -> None:
    import ray

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
            fn_constructor_kwargs={"worker": worker, "kwargs": worker_kwargs},
            batch_size=1,
            batch_format="pandas",
            compute=pool,
            num_cpus=resources.num_cpus_per_worker,
            num_gpus=resources.num_gpus_per_worker,
            max_restarts=0,
        )
    try:
        for batch in rows.iter_batches(batch_size=None, batch_format="pandas"):
            _write_batch(batch, run_dir, bounds, expected, columns, bar, stats, on_shard)
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


def _caused_by(err: BaseException | None, cls: type) -> bool:
    while err is not None:
        if isinstance(err, cls) or isinstance(getattr(err, "cause", None), cls):
            return True
        err = err.__cause__ or err.__context__
    return False


def _write_batch(batch, run_dir, bounds, expected, columns, bar, stats, on_shard) -> None:
    """Check and write each shard in a batch of rows as it arrives."""
    for shard, frame in batch.groupby("shard"):
        a, b = bounds[int(shard)]
        if len(frame) != expected(a, b):
            raise RuntimeError(f"shard {shard}: {len(frame)} rows, expected {expected(a, b)}")
        write_shard(shard_path(run_dir, int(shard)), frame[columns + WHERE_COLUMNS].reset_index(drop=True))
        stats.computed += 1
        bar.update(int(shard), b - a, str(frame["node"].iloc[0]))
        if on_shard is not None:
            on_shard(bar)
