"""Where Ray runs, decided here and nowhere else: `address` (or $RAY_ADDRESS, set inside a submitted Ray job)
joins that cluster; otherwise a local instance sized for the job is started and stopped."""

from __future__ import annotations

import logging
import os
import socket
from contextlib import contextmanager
from typing import Any, Iterator

from jobs.common import UserError

DEFAULT_WORKER_NICENESS = "0"  # Ray's default (15) lets any other busy process starve the workers


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
    else:
        check_reachable(address)
    ray.init(**kwargs)
    try:
        yield
    finally:
        # A submitted job's driver stays connected until it exits: the job owns the connection (Ray
        # closes it when the job ends), and later stages of the same command reuse it.
        if not in_job:
            ray.shutdown()


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Refuse at once an address where no Ray cluster listens (ray.init would retry its GCS for minutes, printing
    only time-outs): UserError naming the address. 'auto' and addresses without a port are left to Ray."""
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        raise UserError(
            f"no Ray cluster at {address}: nothing answers on {host}:{port} ({err.strerror or err}); start one "
            "(`invgan cluster up --local`, or `ray up ray_cluster.yaml`) or give the head's address (HEAD_IP:6379)"
        ) from None
