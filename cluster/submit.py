"""`invgan submit` and `invgan jobs`: run any `invgan` command as a Ray job on a cluster (Ray's Jobs SDK).

The job's entry point is the front door itself, `python -m invgan <command> ...`, run on the head in a
copy of this project (`working_dir`, uploaded without .venv, runs/, databases and caches). The job
inherits the cluster's environment (MLflow server, run folder root, token). `submit` streams the
job's logs and exits with the job's status.

Which cluster: --address (the dashboard URL, http://HEAD:8265), else $RAY_API_SERVER_ADDRESS, else the
local cluster of `invgan cluster up --local`. Token authentication: the local cluster's token is used
automatically; for another cluster put its token (`ray get-auth-token` on the head) in ~/.ray/auth_token
or $RAY_AUTH_TOKEN.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import sys
import time
from pathlib import Path

from cluster.local import load_state
from jobs.common import PROJECT_ROOT

# Never uploaded: environments, results, stores, caches (gitignore-style, relative to the project).
UPLOAD_EXCLUDES = [
    ".venv/",
    "venv/",
    "runs/",
    "mlruns/",
    "mlartifacts/",
    "*.db",
    "*.db.lock",
    "__pycache__/",
    "*.pyc",
    ".git/",
    ".pytest_cache/",
    ".mypy_cache/",
    ".ruff_cache/",
    "*.egg-info/",
    "scratch/",
    "benchmarks/results/",
    "docs/figures/*.pdf",
]
TERMINAL = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 130}


def resolve_address(address: str | None) -> str:
    """The job server's URL, and (for the local cluster) the token settings in this process's environment."""
    state = load_state()
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS")
    if address is None:
        if state is None:
            raise SystemExit(
                "no cluster to submit to: start one with `invgan cluster up --local`, or pass "
                "--address http://HEAD:8265 (the Ray dashboard of a running cluster)"
            )
        address = state.dashboard_url
    if not address.startswith(("http://", "https://")):
        address = f"http://{address}"
    if state is not None and address.rstrip("/") == state.dashboard_url:
        os.environ.update(state.env())  # before Ray reads its token settings
    elif "RAY_AUTH_MODE" not in os.environ and (
        os.environ.get("RAY_AUTH_TOKEN")
        or os.environ.get("RAY_AUTH_TOKEN_PATH")
        or (Path.home() / ".ray" / "auth_token").exists()
    ):
        os.environ["RAY_AUTH_MODE"] = "token"
    return address


def client(address: str | None):
    url = resolve_address(address)  # first: it sets the token settings Ray reads when it is imported
    from ray.job_submission import JobSubmissionClient

    # packaging and websocket chatter: the SDK modules set their own loggers to INFO, so quiet each of them
    for name in list(logging.root.manager.loggerDict):
        if name == "ray" or name.startswith(("ray.dashboard", "ray._private.runtime_env")):
            logging.getLogger(name).setLevel(logging.ERROR)

    try:
        return JobSubmissionClient(url)
    except (ConnectionError, RuntimeError) as err:
        raise SystemExit(
            f"cannot reach the Ray job server at {url}: {str(err).splitlines()[0]}\n"
            "(is the cluster up? `invgan cluster up --local`, or the head's dashboard port, default 8265)"
        ) from None


def upload_size(root: Path = PROJECT_ROOT, excludes: list[str] = UPLOAD_EXCLUDES) -> tuple[int, int]:
    """(files, bytes) that `working_dir` uploads, counted with Ray's own rules (.gitignore and excludes)."""
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    total = {"files": 0, "bytes": 0}

    def count(path: Path) -> None:
        if path.is_file():
            total["files"] += 1
            total["bytes"] += path.stat().st_size

    _dir_travel(root, [_get_excludes(root, excludes)], count, include_gitignore=True)
    return total["files"], total["bytes"]


def submit(
    command: list[str],
    *,
    address: str | None = None,
    wait: bool = True,
    env: dict[str, str] | None = None,
    num_cpus: float = 0,
    quiet: bool = False,
) -> int:
    """Submit `invgan <command>` as a Ray job; with `wait`, stream its logs and return its exit code
    (0 succeeded, 1 failed, 130 stopped); without, print the job id and return 0."""
    if not command:
        raise SystemExit("nothing to submit: give an invgan command after --, e.g. invgan submit -- eval --config ...")
    c = client(address)
    files, size = upload_size()
    runtime_env: dict[str, object] = {"working_dir": str(PROJECT_ROOT), "excludes": UPLOAD_EXCLUDES}
    if env:
        runtime_env["env_vars"] = env
    entrypoint = "python -m invgan " + shlex.join(command)
    job_id = c.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, entrypoint_num_cpus=num_cpus)
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    say(f"submitted {job_id} to {c.get_address()}: {entrypoint}  (uploaded {files} files, {size / 2**20:.1f} MiB)")
    if not wait:
        print(job_id)
        say(f"follow it with: invgan jobs logs {job_id} --follow    stop it with: invgan jobs stop {job_id}")
        return 0
    try:
        asyncio.run(_stream(c, job_id))
    except KeyboardInterrupt:
        say(f"\nstopping {job_id} ...")
        c.stop_job(job_id)
        status = _wait_terminal(c, job_id, 60)
        say(f"job {job_id}: {status}")
        return TERMINAL.get(status, 130)
    status = _wait_terminal(c, job_id, 60)
    info = c.get_job_info(job_id)
    say(f"job {job_id}: {status}" + (f" ({info.message})" if status != "SUCCEEDED" and info.message else ""))
    return TERMINAL.get(status, 1)


async def _stream(c, job_id: str) -> None:
    async for chunk in c.tail_job_logs(job_id):
        sys.stdout.write(chunk)
        sys.stdout.flush()


def _status(value) -> str:
    return str(getattr(value, "value", value)).rsplit(".", 1)[-1]


def _wait_terminal(c, job_id: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    status = _status(c.get_job_status(job_id))
    while status not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.5)
        status = _status(c.get_job_status(job_id))
    return status


def list_jobs(address: str | None = None) -> list[dict]:
    c = client(address)
    jobs = sorted(c.list_jobs(), key=lambda j: j.start_time or 0)
    return [
        {
            "job_id": j.submission_id or j.job_id,
            "status": _status(j.status),
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime((j.start_time or 0) / 1000)),
            "seconds": round(((j.end_time or time.time() * 1000) - (j.start_time or 0)) / 1000),
            "entrypoint": j.entrypoint,
        }
        for j in jobs
    ]


def logs(job_id: str, address: str | None = None, follow: bool = False) -> None:
    c = client(address)
    if follow:
        asyncio.run(_stream(c, job_id))
    else:
        sys.stdout.write(c.get_job_logs(job_id))


def stop(job_id: str, address: str | None = None) -> str:
    c = client(address)
    c.stop_job(job_id)
    return _wait_terminal(c, job_id, 30)
