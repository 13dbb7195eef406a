"""What every job shares: the project's run directory, the MLflow store, the git commit."""

from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

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


def check_job_inputs(cfg, data) -> None:
    """Before any Ray work: the models of the weights folder agree with each other (one image shape; the
    generator's and the inverter's latent size) and `data`'s images are ones they can score (shape, finite,
    in [0, 1], not empty: invgan_core.data.check_images). Raises CheckpointError or DataError, one line."""
    from invgan_core.checkpoint import CheckpointError, read_manifest
    from invgan_core.data import check_images

    root = cfg.weights_dir()
    arch = {
        k: read_manifest(root / k).get("arch", {})
        for k in ("generator", "classifier", "inverter")
        if (root / f"{k}.json").exists()
    }
    shapes = {k: tuple(a["image_shape"]) for k, a in arch.items() if "image_shape" in a}
    if len(set(shapes.values())) > 1:
        raise CheckpointError(
            f"{root}: its models were trained on different image shapes ("
            + ", ".join(f"{k} {'x'.join(map(str, s))}" for k, s in shapes.items())
            + "); a weights folder needs the generator, classifier and inverter of one dataset"
        )
    for name, spec in getattr(cfg, "defenses", {}).items():  # an ablation's own inverter (DefenseSpec.inverter)
        stem = spec.inverter_stem() if hasattr(spec, "inverter_stem") else None
        if stem is None:
            continue
        own = read_manifest(stem)
        if own.get("kind") != "inverter":
            raise CheckpointError(f"defenses.{name}.inverter: {stem} holds a {own.get('kind')!r}, not an inverter")
        own_latent, g_latent = own.get("arch", {}).get("latent_dim"), arch.get("generator", {}).get("latent_dim")
        if own_latent != g_latent:
            raise CheckpointError(
                f"defenses.{name}.inverter: {stem}'s latent size {own_latent} differs from the generator's "
                f"{g_latent}; train the inverter for this generator"
            )
    latents = {k: arch[k]["latent_dim"] for k in ("generator", "inverter") if "latent_dim" in arch.get(k, {})}
    if len(set(latents.values())) > 1:
        raise CheckpointError(
            f"{root}: the generator's latent size {latents['generator']} differs from the "
            f"inverter's {latents['inverter']}; train the inverter for this generator"
        )
    split = getattr(cfg, "split", data.split)
    check_images(
        data,
        shapes.get("classifier") or next(iter(shapes.values()), None),
        where=f"dataset {cfg.dataset!r} ({split} split)",
    )


WRITE_ERRNOS = {"ENOSPC", "EROFS", "EACCES", "EPERM", "EDQUOT", "EFBIG"}


def write_error(err: OSError, folder: Path) -> str | None:
    """A disk-full, read-only or permission error while writing `folder` as one line naming the path (None
    for other OSErrors, e.g. a connection error: those are not about the folder). Shards and summary.json
    are written atomically, so whatever was finished is complete and a rerun resumes from it."""
    import errno

    if not any(err.errno == getattr(errno, name, None) for name in WRITE_ERRNOS):
        return None
    path = err.filename or folder
    return (
        f"cannot write {path}: {err.strerror or err} (run folder {folder}); finished shards are kept, "
        "nothing is half-written: free space or fix the permissions, then rerun to resume"
    )


@contextmanager
def user_errors(config: Path, run_dir: Path, *, verbose: bool) -> Iterator[None]:
    """Around a sharded job's run (eval, red): what the user can fix ends in one line instead of a traceback.
    Weights or data the config names (checked before any Ray work), a run folder that cannot be written
    (`write_error`), Ctrl-C (finished shards are kept). `verbose` re-raises the first two with the traceback."""
    from invgan_core.checkpoint import CheckpointError
    from invgan_core.data import DataError

    try:
        yield
    except (CheckpointError, DataError) as err:
        if verbose:
            raise
        raise SystemExit(f"cannot run {config}: {err}") from None
    except OSError as err:  # disk full, read-only or forbidden run folder: one line naming the path
        message = write_error(err, run_dir)
        if message is None or verbose:
            raise
        raise SystemExit(message) from None
    except KeyboardInterrupt:
        raise SystemExit(
            f"interrupted; finished shards are kept in {run_dir}: rerun the same command to resume"
        ) from None
