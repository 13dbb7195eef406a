"""`invgan submit` and `invgan jobs`: run any `invgan` command as a Ray job on a cluster (Ray's Jobs SDK).

The job's entry point is the front door itself, `python -m invgan <command> ...`, run on the head (or, with
--cpus/--gpus, on a node that has them) in a copy of this project (`working_dir`, uploaded without .venv,
runs/, databases and caches). The job inherits the cluster's environment (MLflow server, run folder root,
token). With --install-deps its runtime_env also names the project's dependencies (pyproject.toml), so a
node that has only Python and Ray installs them for the job. `submit` streams the job's logs and exits with
the job's status.

Which cluster: --address (the dashboard URL, http://HEAD:8265), else $RAY_API_SERVER_ADDRESS, else the
local cluster of `invgan cluster up --local`. Token authentication: the local cluster's token is used
automatically; for another cluster put its token (`ray get-auth-token` on the head) in ~/.ray/auth_token
or $RAY_AUTH_TOKEN.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import os
import re
import shlex
import sys
import time
from collections.abc import Iterable
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


# ---------------------------------------------------------------- what `working_dir` uploads

# Ray reads these in every folder of the upload; each applies to that folder and below (.gitignore unless
# RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1). The excludes apply from the project root.
IGNORE_FILES = (".gitignore", ".rayignore")
_ANY0, _ANY1 = "**", "**/"  # tokens: zero or more / one or more path segments (no glob token is either)


def ignore_rules(lines: Iterable[str]) -> list[tuple[list[str], bool]]:
    """Gitignore-style patterns as (tokens, excludes) rules, normalized as Ray's pathspec ("gitwildmatch") does:
    a pattern without an inner slash matches at any depth, a leading slash anchors it, a trailing slash matches
    only below it, `**` spans segments, `!` re-includes, and a plain name also matches everything below it."""
    rules = []
    for line in lines:
        pattern = line.strip()
        if not pattern or pattern.startswith("#") or pattern == "/":
            continue
        excludes = not pattern.startswith("!")
        pattern = pattern.removeprefix("!").removeprefix("\\")
        segs = pattern.split("/")
        if not segs[0]:
            del segs[0]
        elif (len(segs) == 1 or (len(segs) == 2 and not segs[1])) and segs[0] != "**":
            segs.insert(0, "**")
        if len(segs) > 1 and not segs[-1]:
            segs[-1] = "**"
        last = len(segs) - 1
        tokens = []
        for i, seg in enumerate(segs):
            if seg == "**":
                tokens.append(_ANY1 if i == last else _ANY0)
            else:
                tokens.append(re.sub(r"\\([*?\[])", r"[\1]", seg).replace("\\", ""))  # \x: a literal x
                if i == last and excludes and seg != "*":  # (pathspec's own quirk for a last `*`)
                    tokens.append(_ANY0)
        rules.append((tokens, excludes))
    return rules


def _matches(tokens: list[str], segs: list[str]) -> bool:
    if not tokens:
        return not segs
    head, rest = tokens[0], tokens[1:]
    if head in (_ANY0, _ANY1):
        first = 1 if head == _ANY1 else 0
        return any(_matches(rest, segs[k:]) for k in range(first, len(segs) + 1))
    return bool(segs) and fnmatch.fnmatchcase(segs[0], head) and _matches(rest, segs[1:])


def ignored(rules: list[tuple[list[str], bool]], relative: str) -> bool:
    """Whether a path (relative to the rules' folder, "/"-separated; "." is the folder) is ignored: the
    last rule that matches it decides."""
    segs, verdict = relative.split("/"), False
    for tokens, excludes in rules:
        if verdict != excludes and _matches(tokens, segs):
            verdict = excludes
    return verdict


def _prunes(rules: list[tuple[list[str], bool]], relative: str) -> bool:
    """Whether every path below this folder is ignored: a rule ends in `**` after matching it, and no rule
    after it re-includes anything (then nothing below needs a look; Ray looks and skips each one)."""
    segs = relative.split("/")
    for k, (tokens, excludes) in enumerate(rules):
        if excludes and tokens[-1] in (_ANY0, _ANY1) and _matches(tokens[:-1], segs):
            if all(later for _, later in rules[k + 1 :]):
                return True
    return False


def upload_files(root: Path = PROJECT_ROOT, excludes: list[str] = UPLOAD_EXCLUDES) -> list[Path]:
    """The files `working_dir` uploads, by Ray's rules: the excludes (from the root), and each folder's
    .gitignore and .rayignore (from that folder down); an ignored folder is not entered."""
    root = root.absolute()
    names = IGNORE_FILES if os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1" else (".rayignore",)
    found: list[Path] = []

    def visit(path: Path, specs: list[tuple[Path, list[tuple[list[str], bool]]]]) -> None:
        if path.is_dir():
            own = [path / name for name in names if (path / name).is_file()]
            specs = specs + [(path, ignore_rules(f.read_text(errors="replace").splitlines())) for f in own]
        relative = [(path.relative_to(base).as_posix(), rules) for base, rules in specs]
        if any(ignored(rules, rel) for rel, rules in relative):
            return
        if path.is_file():
            found.append(path)
        elif path.is_dir() and not any(_prunes(rules, rel) for rel, rules in relative):
            for sub in sorted(path.iterdir()):
                visit(sub, specs)

    visit(root, [(root, ignore_rules(excludes))])
    return found


def upload_size(root: Path = PROJECT_ROOT, excludes: list[str] = UPLOAD_EXCLUDES) -> tuple[int, int]:
    """(files, bytes) that `working_dir` uploads (see `upload_files`)."""
    files = upload_files(root, excludes)
    return len(files), sum(f.stat().st_size for f in files)


# ---------------------------------------------------------------- the job's runtime_env


def project_dependencies(pyproject: Path = PROJECT_ROOT / "pyproject.toml") -> list[str]:
    """The project's dependencies, as pyproject.toml's [project].dependencies lists them (Ray with its pinned
    range among them: on a node whose Ray is in that range pip only adds missing extras; a node with another Ray
    fails the job's set-up, as Ray's pip plugin refuses to change the Ray version a node runs)."""
    if sys.version_info < (3, 11):
        raise SystemExit("--install-deps reads pyproject.toml with tomllib: it needs Python 3.11 or newer")
    import tomllib

    with pyproject.open("rb") as f:
        return list(tomllib.load(f)["project"]["dependencies"])


def runtime_env(
    env: dict[str, str] | None = None, *, install_deps: bool = False, root: Path = PROJECT_ROOT
) -> dict[str, object]:
    """The job's runtime_env: the project as its working directory, `env` as its environment variables and,
    with `install_deps`, the project's dependencies for Ray's pip plugin. On every node that runs the job it
    makes a virtualenv from the node's Python (a copy of the whole venv when Ray runs from one) and pip-installs
    the list there: what the node has already is only checked, the rest is downloaded. Once per node and list;
    later jobs reuse it. docs/scale-out.md has the measured cost and the image a node needs without it."""
    renv: dict[str, object] = {"working_dir": str(root), "excludes": UPLOAD_EXCLUDES}
    if env:
        renv["env_vars"] = env
    if install_deps:
        renv["pip"] = {"packages": project_dependencies(root / "pyproject.toml"), "pip_check": False}
    return renv


def submit(
    command: list[str],
    *,
    address: str | None = None,
    wait: bool = True,
    env: dict[str, str] | None = None,
    num_cpus: float = 0,
    num_gpus: float = 0,
    install_deps: bool = False,
    quiet: bool = False,
) -> int:
    """Submit `invgan <command>` as a Ray job; with `wait`, stream its logs and return its exit code
    (0 succeeded, 1 failed, 130 stopped); without, print the job id and return 0. `num_cpus`/`num_gpus`
    are reserved for the entry point (the job's driver); with both 0 it runs on the head."""
    if not command:
        raise SystemExit("nothing to submit: give an invgan command after --, e.g. invgan submit -- eval --config ...")
    for name, value in (("--cpus", num_cpus), ("--gpus", num_gpus)):
        if not value >= 0:
            raise SystemExit(f"{name} must be 0 or more, got {value}")
    renv = runtime_env(env, install_deps=install_deps)
    c = client(address)
    files, size = upload_size()
    entrypoint = "python -m invgan " + shlex.join(command)
    job_id = c.submit_job(
        entrypoint=entrypoint, runtime_env=renv, entrypoint_num_cpus=num_cpus, entrypoint_num_gpus=num_gpus
    )
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    deps = "; the nodes install the project's dependencies first" if install_deps else ""
    say(
        f"submitted {job_id} to {c.get_address()}: {entrypoint}  (uploaded {files} files, {size / 2**20:.1f} MiB{deps})"
    )
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
