"""What every job shares: the project's run directory, the MLflow store, the git commit, and the one error path
(`user_errors`) every command goes through."""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import yaml
from pydantic import ValidationError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
WEIGHTS_DIR = PROJECT_ROOT / "weights"


SUBMITTED_JOB = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job server in the driver of a submitted job


def runs_root() -> str:
    """Where run folders go: $INVGAN_RUNS (a path or a URI) or ./runs. A submitted job's ./runs would be Ray's
    copy of the project on the head, deleted with it: there it must be set (UserError)."""
    if "INVGAN_RUNS" not in os.environ and SUBMITTED_JOB in os.environ:
        raise UserError(
            "this job runs on the cluster, where ./runs is Ray's copy of the project on the head, deleted with it: "
            "pass --out (a folder every run of it can reach, or s3://bucket/...) or set INVGAN_RUNS on the cluster "
            "(invgan submit --env INVGAN_RUNS=s3://bucket/runs)"
        )
    return os.environ.get("INVGAN_RUNS", "runs")


def runs_dir() -> Path:
    """Where run folders and the default MLflow store live: $INVGAN_RUNS or ./runs (absolute). When $INVGAN_RUNS
    is a URI (s3://...: the run folders go there, jobs/storage.py), the local files (an SQLite MLflow store,
    the local cluster's state) stay in ./runs."""
    root = runs_root()
    return local_path("runs" if is_uri(root) else root)


def is_uri(location: str | Path | None) -> bool:
    """A location another machine can reach by name (s3://, gs://, ...); file:// and plain paths are local."""
    return isinstance(location, str) and "://" in location and not location.startswith("file://")


def local_path(location: str | Path) -> Path:
    """A local location as an absolute path (file:///x -> /x)."""
    return Path(str(location).removeprefix("file://")).resolve()


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI if set, else an SQLite store at an absolute path (the file store is deprecated)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    path = runs_dir() / "mlflow.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def weights_stem(dataset: str, kind: str, root: Path | None = None) -> Path:
    """weights/<dataset>/<kind>: the shipped model files (<stem>.safetensors + <stem>.json)."""
    return (root or WEIGHTS_DIR) / dataset / kind


def start_mlflow(tracking_uri: str | None, experiment: str):
    """Point MLflow at the store and select the experiment, holding a file lock for an SQLite store.

    Two processes creating a fresh SQLite store at once race in MLflow's schema migration
    ('duplicate column name'); the lock serialises that first initialisation. An experiment created
    in an SQLite store keeps its artifacts beside the database (<store dir>/mlartifacts), not in
    ./mlruns of whatever folder the command ran from.
    """
    import mlflow

    uri = tracking_uri or default_tracking_uri()
    mlflow.set_tracking_uri(uri)
    if not uri.startswith("sqlite:///"):
        if mlflow.get_experiment_by_name(experiment) is None:  # created here, not by set_experiment's INFO line
            mlflow.create_experiment(experiment)
        return mlflow.set_experiment(experiment)
    db = Path(uri[len("sqlite:///") :])
    db.parent.mkdir(parents=True, exist_ok=True)
    with db.with_name(db.name + ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if mlflow.get_experiment_by_name(experiment) is None:
            mlflow.create_experiment(experiment, artifact_location=(db.parent / "mlartifacts" / experiment).as_uri())
        return mlflow.set_experiment(experiment)


def check_folder_name(name: str) -> str:
    """`name` as one plain folder name, as run folders (runs/<name>-<hash>) need: a name that holds a path
    separator, is absolute, '.' or '..', or starts with '.', could put results outside their parent folder."""
    text = str(name)
    if not text.strip() or "/" in text or "\\" in text or "\0" in text or text.startswith(".") or text != text.strip():
        raise ValueError(
            f"{text!r}: give a plain folder name (letters, digits, '-', '_'; no '/', no "
            "leading '.', no surrounding spaces): it names the run folder, which --out places elsewhere"
        )
    return text


WRITE_ERRNOS = {"ENOSPC", "EROFS", "EACCES", "EPERM", "EDQUOT", "EFBIG"}


class UserError(ValueError):
    """A problem the user can fix (an unknown dataset name, a missing weights folder), raised on purpose with a
    message that says what to change. `user_errors` shows it as one line, without a traceback; a ValueError that
    is not a UserError is a bug and keeps its traceback. A ValueError subclass, so that a pydantic validator
    raising it still yields a ValidationError naming the field."""


def write_error(err: OSError, folder: str | Path | None) -> str | None:
    """A disk-full, read-only or permission error while writing `folder` as one line naming the path (None
    for other OSErrors, e.g. a connection error: those are not about the folder). Shards, training state and
    summary.json are written atomically, so whatever was finished is complete and a rerun resumes from it."""
    if not any(err.errno == getattr(errno, name, None) for name in WRITE_ERRNOS):
        return None
    path = err.filename or folder
    if folder is None:
        return f"cannot write {path}: {err.strerror or err}: free space or fix the permissions, then rerun"
    return (
        f"cannot write {path}: {err.strerror or err} (run folder {folder}); what was finished is kept, "
        "nothing is half-written: free space or fix the permissions, then rerun to resume"
    )


def _core_errors() -> tuple[type[Exception], ...]:
    """invgan_core's CheckpointError and DataError, of the modules already loaded: an error of one can only come
    from a loaded module, and importing them here would load torch for every command (and `invgan --help`)."""
    names = {"invgan_core.checkpoint": "CheckpointError", "invgan_core.data": "DataError"}
    return tuple(getattr(sys.modules[m], name) for m, name in names.items() if m in sys.modules)


def describe_error(err: Exception) -> str:
    """A config error as one line per problem, each naming its field: `defenses.invgan: steps=-5: ...`
    (pydantic's own text spreads one problem over three lines with a link)."""
    if not isinstance(err, ValidationError):
        return str(err)
    problems = []
    for e in err.errors():
        where = ".".join(str(part) for part in e["loc"]) or "config"
        problems.append(f"{where}: {e['msg'].removeprefix('Value error, ')}")
    return "; ".join(problems)


def user_message(what: str, err: BaseException, run_dir: str | Path | None = None) -> str | None:
    """The one line `user_errors` shows for `err`, or None when `err` is not the user's to fix (a bug)."""
    if isinstance(err, KeyboardInterrupt):
        kept = f"; what was finished is kept in {run_dir}: rerun the same command to resume" if run_dir else ""
        return f"{what}: interrupted{kept}"
    if isinstance(err, ValidationError):
        return f"invalid {what} config: {describe_error(err)}"
    if isinstance(err, yaml.YAMLError):  # e.g. a Python tag, which safe_load refuses
        return f"invalid {what} config: not valid YAML ({' '.join(str(err).split())[:300]})"
    if isinstance(err, (UserError, *_core_errors())):
        return f"{what}: {err}"
    if isinstance(err, FileNotFoundError) and err.errno is None:  # raised on purpose: "config X does not exist"
        return f"{what}: {err}"
    if isinstance(err, OSError):
        return write_error(err, run_dir)
    return None


@contextmanager
def user_errors(what: str, run_dir: str | Path | None = None, *, verbose: bool) -> Iterator[None]:
    """Every command's one error path: an error the user can fix ends in one line (SystemExit: the line on
    stderr, exit code 1) instead of a traceback; anything else (a bug) keeps its traceback.

    The user's errors: an invalid config or option (pydantic ValidationError, named by field), a config that is
    not valid YAML, a config file that does not exist (a FileNotFoundError raised with a message, not by the OS),
    weights or data that cannot be used (CheckpointError, DataError), a `UserError`, a run folder that cannot be
    written (disk full, read-only, forbidden: `write_error`) and Ctrl-C / SIGTERM (what was finished is kept).
    `what` starts the line (e.g. "evaluation", "train", "search"); `run_dir` is the folder the command writes,
    named by the last two. `verbose` (-v) re-raises the original error with its traceback."""
    try:
        yield
    except (Exception, KeyboardInterrupt) as err:
        message = user_message(what, err, run_dir)
        if message is None or verbose:
            raise
        raise SystemExit(" ".join(line.strip() for line in message.splitlines())) from None  # one line
