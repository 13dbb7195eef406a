"""What every job shares: the project's run directory, the MLflow store, the git commit."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
WEIGHTS_DIR = PROJECT_ROOT / "weights"


def runs_dir() -> Path:
    """Where run folders and the default MLflow store live: $INVGAN_RUNS or ./runs (absolute)."""
    return Path(os.environ.get("INVGAN_RUNS", "runs")).resolve()


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
    import fcntl

    import mlflow

    uri = tracking_uri or default_tracking_uri()
    mlflow.set_tracking_uri(uri)
    if not uri.startswith("sqlite:///"):
        if mlflow.get_experiment_by_name(experiment) is None:  # created here, not by set_experiment's INFO line
            mlflow.create_experiment(experiment)
        return mlflow.set_experiment(experiment)
    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with db.with_name(db.name + ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if mlflow.get_experiment_by_name(experiment) is None:
            mlflow.create_experiment(experiment, artifact_location=(db.parent / "mlartifacts" / experiment).as_uri())
        return mlflow.set_experiment(experiment)
