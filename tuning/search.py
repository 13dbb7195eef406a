"""`invgan tune`: run (or resume) a Ray Tune search and write what it found.

    search config ─pydantic─▶ TuneSearch (every path and bound checked) ─▶ <out>/search.json
        ─▶ MLflow parent run ─▶ Tuner(trainable of tuning/trials.py, random or Optuna TPE, ASHA or none)
        ─▶ one child run and one printed line per trial (tuning/tracking.py)
        ─▶ <out>/trials.parquet, <out>/best.yaml, <out>/summary.json (atomic), the parent's figure and tags

Rerunning the same command continues the search from Tune's experiment state in <out>/tune: finished
trials are kept, unfinished ones continue from their last Tune checkpoint.

<out> is a local path or a URI (s3://bucket/tune/x). Tune's storage path is <out> itself, so each trial's
folder <out>/tune/<trial dir>/ (its checkpoints, and the files the trial leaves: rows.parquet, starts.log, an
inverter's weights/) is written by Tune from whatever node the trial runs on; the driver reads those files back
through the results' filesystem (`Result.path`), never from a local path it assumes. The driver's own files
(search.json, child_runs.json, mlflow_run.json, the RED dictionary, trials.parquet, best.yaml, summary.json,
best-weights/) live in a local folder: <out> itself, or for a URI its stand-in (jobs/storage.py), held with a
lease and pushed to the URI as they are written and at the end.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pandas as pd
import yaml
from pyarrow import fs as pafs

from invgan_core.data import load_dataset
from invgan_core.files import atomic_write_bytes, atomic_write_json
from jobs import storage
from jobs.common import default_tracking_uri, describe_error, git_commit, runs_root, user_errors
from jobs.models import load_models
from jobs.ray_session import quiet_ray_logging, ray_session
from jobs.run_tables import replace_table
from jobs.sharded import shipped_files
from jobs.tracking import RUN_RECORD, log_weights, tracked_run, where_to_open
from tuning.config import TuneSearch, load_search
from tuning.space import Grid, LogUniform
from tuning.tracking import SearchCallback
from tuning.trials import DICTIONARY_FILES, TRIALS, eval_config_dict, red_dictionary

EXPERIMENT = "tune"  # Tune's experiment folder inside <out>


@dataclass
class SearchResult:
    out: Path  # the local folder of the driver's files (a URI's stand-in)
    best_trial: str | None
    best_config: dict
    best_metric: float | None
    trials: pd.DataFrame
    summary: dict
    mlflow_parent_run_id: str | None
    location: str = ""  # the search's folder as given: a path or a URI (Tune's storage path)


def default_out(search: TuneSearch) -> str | Path:
    """<runs>/tune/<name>-<hash>, <runs> being $INVGAN_RUNS (a path or a URI) or ./runs."""
    return storage.join(runs_root(), f"tune/{search.name}-{search.search_hash()[:12]}")


def local_folder(location: str | Path) -> Path:
    """The local folder of the driver's files for the search's folder `location` (a URI's stand-in)."""
    return storage.stand_in(str(location)) if storage.is_uri(location) else storage.local_path(location)


def open_folder(location: str | Path) -> tuple[Path, str]:
    """(local folder of the driver's files, Tune's storage path) of the search's folder `location`.

    A local path: both are that folder. A URI: the local folder is its stand-in, taken with the URI's lease (one
    driver at a time) and made a copy of the driver's files the URI holds (Tune's experiment folder is not
    copied: Tune reads it at the URI); Tune's storage path is the URI."""
    folder = local_folder(location)
    stage = storage.stage_of(folder) if storage.is_uri(location) else None
    if stage is None:
        folder.mkdir(parents=True, exist_ok=True)
        return folder, str(folder)
    stage.take_lease()
    try:
        stage.pull(skip=(EXPERIMENT,))  # Tune reads its experiment folder at the URI itself
    except BaseException:
        stage.release_lease()
        raise
    return folder, stage.uri


def absolute_tracking_uri(uri: str | None) -> str:
    """Trials run in their own working folders: a relative SQLite path must become absolute first."""
    uri = uri or default_tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{Path(uri[len('sqlite:///') :]).resolve()}"
    return uri


def total_trials(search: TuneSearch) -> int:
    grid = math.prod(len(d.grid) for d in search.space.values() if isinstance(d, Grid))
    return search.search.num_samples * grid


def _record(search: TuneSearch, out: Path) -> None:
    """<out>/search.json names the search; a rerun into the same folder must be the same search."""
    path = out / "search.json"
    if path.exists():
        recorded = json.loads(path.read_text()).get("search_hash")
        if recorded != search.search_hash():
            raise SystemExit(
                f"{storage.where(out)} holds another search ({recorded[:12]}); "
                "choose another --out or delete the folder"
            )
    else:
        atomic_write_json(path, {"search_hash": search.search_hash(), "search": search.model_dump(mode="json")})


def _tuner(search: TuneSearch, out: Path, storage_path: str, callback):
    """The Tuner of a new search, or the restored one of <storage_path>/tune. Nothing a trial gets names the driver's
    folder `out`: the RED dictionary's bytes travel with the trainable's parameters (the object store)."""
    from ray import tune

    params: dict = {"search": search.model_dump(mode="json")}
    if search.kind == "red":
        params["shipped"] = shipped_files(out, DICTIONARY_FILES)
    trainable = tune.with_resources(
        tune.with_parameters(TRIALS[search.kind], **params),
        {"cpu": search.resources.cpus, "gpu": search.resources.gpus},
    )
    exp_dir = f"{storage_path.rstrip('/')}/{EXPERIMENT}"
    if tune.Tuner.can_restore(exp_dir):
        return tune.Tuner.restore(exp_dir, trainable=trainable, resume_unfinished=True, resume_errored=True), True
    reports = _reports_per_trial(search)
    scheduler = None
    if search.scheduler.kind == "asha":
        from ray.tune.schedulers import ASHAScheduler

        # max_t above the last report: ASHA never stops a trial that is about to finish (and save its model)
        scheduler = ASHAScheduler(
            time_attr="training_iteration",
            max_t=reports + 1,
            grace_period=min(search.scheduler.grace_period, reports),
            reduction_factor=search.scheduler.reduction_factor,
        )
    random = search.search.algorithm == "random"  # its generator limits concurrency itself
    tune_config = tune.TuneConfig(
        metric="objective",
        mode=search.mode,
        search_alg=_search_alg(search),
        scheduler=scheduler,
        num_samples=search.search.num_samples,
        max_concurrent_trials=None if random else search.search.max_concurrent_trials,
    )
    run_config = tune.RunConfig(
        name=EXPERIMENT,
        storage_path=storage_path,
        # a trial's working directory (rows.parquet, starts.log, weights/) uploaded to its folder in the storage
        # path with every checkpointed report: from a node with its own disk too
        sync_config=tune.SyncConfig(sync_artifacts=True),
        verbose=0,
        callbacks=[callback],
        failure_config=tune.FailureConfig(max_failures=0),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
    )
    return tune.Tuner(
        trainable, param_space=search.param_space(), tune_config=tune_config, run_config=run_config
    ), False


def _search_alg(search: TuneSearch):
    if search.search.algorithm == "random":
        from ray.tune.search import BasicVariantGenerator

        return BasicVariantGenerator(
            random_state=search.search.seed,
            max_concurrent=search.search.max_concurrent_trials,
            points_to_evaluate=_points(search),
        )
    try:
        import optuna  # a project dependency; an install without it gets this message
    except ImportError:
        raise SystemExit(
            "search.algorithm 'optuna' needs the optuna package: pip install optuna (or use search.algorithm: random)"
        ) from None
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # its per-trial INFO lines would interleave with ours
    return OptunaSearch(seed=search.search.seed, points_to_evaluate=_points(search))


def _points(search: TuneSearch) -> list[dict] | None:
    point = search.base_point() if search.search.include_base else None
    if point is None or any(isinstance(d, Grid) for d in search.space.values()):
        return None
    return [point]


def _reports_per_trial(search: TuneSearch) -> int:
    if search.kind == "inverter":
        return math.ceil(search.inverter.steps / search.inverter.report_every)

    cfg = eval_config_dict(search, {}, for_trial=True)
    n = len(load_dataset(cfg["dataset"], "validation", cfg.get("data_dir")).subset(cfg.get("limit")))
    return math.ceil(n / cfg["shard_size"])


# ---------------------------------------------------------------- results


def trial_id_of(result) -> str:
    """A Tune result's trial id (from its metrics, else from its folder's name: <trainable>_<id>_<n>_...)."""
    if (result.metrics or {}).get("trial_id"):
        return str(result.metrics["trial_id"])
    found = re.search(r"_([0-9a-f]+_\d{5})(?:_|$)", PurePosixPath(result.path).name)
    return found.group(1) if found else PurePosixPath(result.path).name


def trial_folders(grid) -> dict[str, tuple]:
    """{trial id: (filesystem, path)} of each trial's folder in the storage path, as Tune's results name it
    (a local folder, or one at the URI): where the trial's rows.parquet, starts.log and weights/ are."""
    return {trial_id_of(r): (r.filesystem, r.path) for r in grid}


def read_trial_file(folder: tuple, rel: str) -> bytes:
    """A file of a trial's folder (`trial_folders`), through its filesystem; FileNotFoundError if absent."""

    filesystem, path = folder
    target = f"{str(path).rstrip('/')}/{rel}"
    if filesystem.get_file_info(target).type != pafs.FileType.File:
        raise FileNotFoundError(f"{target}: not in the trial's folder")
    with filesystem.open_input_stream(target) as src:
        return src.read()


def trials_table(grid, search: TuneSearch, location: str | None = None) -> pd.DataFrame:
    """One row per trial: trial_id, each searched parameter, objective (the last reported: a stopped trial's is
    on fewer examples or steps), value, seconds, reports, step (examples or training steps done), status, folder
    (the trial's folder: <location>/tune/<trial dir>, a path or a URI)."""
    rows = []
    for result in grid:
        m = result.metrics or {}
        status = "error" if result.error else ("complete" if m.get("complete") else "stopped")
        name = PurePosixPath(result.path).name
        rows.append(
            {
                "trial_id": trial_id_of(result),
                **{p: result.config.get(p) for p in search.space},
                "objective": m.get("objective"),
                "value": m.get("value", m.get("objective")),
                "seconds_per_example": m.get("seconds_per_example"),
                "seconds": m.get("time_total_s"),
                "reports": m.get("training_iteration", 0),
                "step": m.get("step"),
                "status": status,
                "folder": f"{location.rstrip('/')}/{EXPERIMENT}/{name}" if location else str(result.path),
            }
        )
    frame = pd.DataFrame(rows)
    return frame.sort_values("trial_id", ignore_index=True) if len(frame) else frame


def pick_best(table: pd.DataFrame, search: TuneSearch) -> tuple[pd.Series | None, pd.Series | None]:
    """(best, cheapest within the tolerance) among complete trials; ties go to the cheaper trial."""
    done = table[(table.status == "complete") & table.objective.notna()]
    if done.empty:
        return None, None
    cost = "seconds_per_example" if done["seconds_per_example"].notna().all() else "seconds"
    sign = -1 if search.mode == "max" else 1
    ranked = done.assign(_key=sign * done.objective).sort_values(["_key", cost, "trial_id"])
    best = ranked.iloc[0]
    near = done[sign * (done.objective - best.objective) <= search.objective.tolerance]
    return best, near.sort_values([cost, "trial_id"]).iloc[0]


def objective_figure(table: pd.DataFrame, search: TuneSearch):
    """The objective against each searched parameter (one panel each); the best trial ringed."""
    from matplotlib.figure import Figure

    params = list(search.space)
    fig = Figure(figsize=(3.6 * len(params), 3.2))
    axes = fig.subplots(1, len(params), squeeze=False)[0]
    done = table[table.objective.notna()]
    best, _ = pick_best(table, search)
    for ax, p in zip(axes, params, strict=True):
        values = done[p]
        numeric = pd.api.types.is_numeric_dtype(values)
        xs = values if numeric else values.astype(str)
        for status, marker in (("complete", "o"), ("stopped", "x")):
            sel = done.status == status
            ax.scatter(xs[sel], done.objective[sel], marker=marker, label=status)
        if best is not None:
            ax.scatter(
                [best[p] if numeric else str(best[p])],
                [best.objective],
                s=160,
                facecolors="none",
                edgecolors="red",
                label="best",
            )
        if isinstance(search.space[p], LogUniform):
            ax.set_xscale("log")
        ax.set_xlabel(p.rsplit(".", 1)[-1] if p.count(".") < 3 else p.split(".", 1)[1])
        ax.set_ylabel(search.objective.label())
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{search.name}: {search.objective.label()} per trial (x: stopped early)")
    fig.tight_layout()
    return fig


def write_outputs(
    search: TuneSearch,
    out: Path,
    table: pd.DataFrame,
    parent_run_id: str | None,
    folders: dict[str, tuple] | None = None,
    location: str | None = None,
) -> dict:
    """trials.parquet, best.yaml (and the best inverter's weights folder, read from its trial's folder in
    `folders`, see `trial_folders`), summary.json, all atomic, in the local folder `out`; `location`: the
    search's folder as given (a URI for a staged `out`)."""
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    atomic_write_bytes(out / "trials.parquet", buffer.getvalue())
    best, cheapest = pick_best(table, search)
    summary = {
        "name": search.name,
        "kind": search.kind,
        "metric": search.objective.label(),
        "mode": search.mode,
        "trials": len(table),
        "complete": int((table.status == "complete").sum()) if len(table) else 0,
        "stopped_early": int((table.status == "stopped").sum()) if len(table) else 0,
        "errors": int((table.status == "error").sum()) if len(table) else 0,
        "best_trial": None,
        "best_config": None,
        "best_metric": None,
        "mlflow_parent_run_id": parent_run_id,
        "folder": location or str(out),
    }
    if best is not None:
        params = {p: _plain(best[p]) for p in search.space}
        summary |= {
            "best_trial": best.trial_id,
            "best_config": params,
            "best_metric": float(best.objective),
            "best_yaml": str(out / "best.yaml"),
        }
        if cheapest is not None and cheapest.trial_id != best.trial_id:
            summary["cheapest_within_tolerance"] = {
                "trial": cheapest.trial_id,
                "config": {p: _plain(cheapest[p]) for p in search.space},
                "metric": float(cheapest.objective),
                "tolerance": search.objective.tolerance,
                "seconds_per_example": _plain(cheapest.seconds_per_example),
            }
        base = _baseline(table, search)
        if base is not None:
            gain = float(best.objective - base.objective) if base.status == "complete" else None
            summary["baseline"] = {
                "trial": base.trial_id,
                "config": {p: _plain(base[p]) for p in search.space},
                "metric": _plain(base.objective),
                "status": base.status,
                "gain": gain,
            }
        text, reproduce = best_yaml(search, out, params, best, folders or {})
        atomic_write_bytes(out / "best.yaml", text.encode())
        summary["reproduce"] = reproduce
    atomic_write_json(out / "summary.json", summary)
    return summary


def _baseline(table: pd.DataFrame, search: TuneSearch):
    """The trial of the base config's own point (search.include_base), if one ran."""
    point = search.base_point() if search.search.include_base else None
    if point is None or not len(table):
        return None
    match = table
    for p, v in point.items():
        match = match[match[p].map(lambda x, v=v: x == v or (isinstance(x, float) and math.isclose(x, v)))]
    return match.iloc[0] if len(match) else None


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def best_yaml(search: TuneSearch, out: Path, params: dict, best, folders: dict[str, tuple]) -> tuple[str, str | None]:
    """A ready-to-run config with the best values (the base's split: the final, held-out evaluation) and the
    command that reproduces the trial's measurement on the validation split. An inverter search's best inverter
    is read from its trial's folder (`folders`: the Tune results' filesystems) into <out>/best-weights."""
    trial_params = {} if search.kind == "inverter" else params
    cfg = eval_config_dict(search, trial_params, for_trial=False)
    trial = eval_config_dict(search, trial_params, for_trial=True)
    if search.kind == "inverter":  # the best trial's inverter, beside the base's generator and classifier
        weights = out / "best-weights"
        weights.mkdir(exist_ok=True)
        src = search.base_config().weights_dir()
        for kind in ("generator", "classifier"):
            for ext in (".json", ".safetensors"):
                shutil.copyfile(src / f"{kind}{ext}", weights / f"{kind}{ext}")
        for ext in (".json", ".safetensors"):
            trained = read_trial_file(folders[best.trial_id], f"weights/inverter{ext}")
            atomic_write_bytes(weights / f"inverter{ext}", trained)
        cfg["weights"] = trial["weights"] = str(weights)
    command = "invgan red" if search.kind == "red" else "invgan eval"
    sets = (
        ["split=validation"]
        + [f"limit={trial['limit']}"] * bool(trial.get("limit"))
        + [f"shard_size={trial['shard_size']}"]
    )
    # RED's job reads the test split only (RedConfig has no split field yet): no command repeats a RED trial
    reproduce = (
        None
        if search.kind == "red"
        else f"{command} --config {out / 'best.yaml'} " + " ".join(f"--set {s}" for s in sets)
    )
    header = (
        f"# Best of search {search.name!r} ({search.kind}): {search.objective.label()} = {best.objective:.6g} "
        f"on the validation split, trial {best.trial_id}.\n# Searched: "
        + ", ".join(f"{k}={v}" for k, v in params.items())
        + f"\n# Final evaluation (held-out split): {command} --config {out / 'best.yaml'}\n"
        + (f"# The trial's measurement again:      {reproduce}\n" if reproduce else "")
    )
    cfg = {k: v for k, v in cfg.items() if v is not None}
    return header + yaml.safe_dump(cfg, sort_keys=False), reproduce


def log_parent(client, run_id: str, search: TuneSearch, out: Path, table: pd.DataFrame, summary: dict) -> None:
    """The search's results on its parent run; the best child run tagged."""
    if summary.get("best_metric") is not None:
        client.log_metric(run_id, "best_objective", summary["best_metric"])
        client.set_tag(run_id, "best_trial", summary["best_trial"])
        client.set_tag(run_id, "best_config", json.dumps(summary["best_config"])[:5000])
        children = json.loads((out / "child_runs.json").read_text()) if (out / "child_runs.json").exists() else {}
        for trial_id, child in children.items():
            client.set_tag(child, "best_trial", str(trial_id == summary["best_trial"]).lower())
    for key in ("trials", "complete", "stopped_early", "errors"):
        client.log_metric(run_id, f"trials_{key}" if key != "trials" else "trials_total", summary[key])
    if len(table):
        replace_table(client, run_id, table.astype({p: str for p in search.space}), "tables/trials.json")
        client.log_figure(run_id, objective_figure(table, search), "figures/objective_vs_params.png")
    client.log_artifact(run_id, str(out / "summary.json"))
    if (out / "best.yaml").exists():
        client.log_artifact(run_id, str(out / "best.yaml"))
    best_inverter = out / "best-weights" / "inverter"
    if search.kind == "inverter" and best_inverter.with_suffix(".json").exists():
        sha = json.loads(best_inverter.with_suffix(".json").read_text())["sha256"]
        if client.get_run(run_id).data.tags.get("best_inverter.sha256") != sha:  # a resumed search logs it once
            model_id = log_weights(client, run_id, best_inverter, name=f"{search.name}-best-inverter")
            client.set_tag(run_id, "best_inverter.sha256", sha)
            client.set_tag(run_id, "best_inverter.model_id", model_id)


# ---------------------------------------------------------------- the search


def run_search(
    search: TuneSearch,
    *,
    out: str | Path | None = None,
    address: str | None = None,
    progress: bool = True,
    log_mlflow: bool = True,
    verbose: bool = False,
) -> SearchResult:
    """Run (or resume) the search; returns the trials table and the summary written to <out> (a path or a URI:
    then its local stand-in, pushed to the URI)."""
    folder, location = open_folder(out or default_out(search))
    try:
        return _run_search(search, folder, location, address, progress, log_mlflow, verbose)
    finally:
        storage.finish(folder)  # a URI: every driver file pushed, its lease released (a local folder: nothing)


def _run_search(
    search: TuneSearch,
    out: Path,
    location: str,
    address: str | None,
    progress: bool,
    log_mlflow: bool,
    verbose: bool,
) -> SearchResult:
    _record(search, out)
    storage.push(out / "search.json")
    load_models(search.base_config())  # missing or altered weights fail before any trial
    if search.kind == "red":
        red_dictionary(search, out)
        storage.push(*sorted(out.glob("dictionary.*")))
    # experiment state saved at every step: a kill loses no finished trial
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no banner, no status tables; our lines instead
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")  # ... which is cheap here
    quiet_ray_logging(verbose)
    if not verbose:  # on resume, about trials an interruption caught before their first report
        logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    uri = absolute_tracking_uri(search.mlflow.tracking_uri)
    tags = {
        "kind": f"tune-{search.kind}",
        "search_hash": search.search_hash(),
        "git_commit": git_commit(),
        "metric": search.objective.label(),
        "mode": search.mode,
        "mlflow.note.content": f"Search {search.name}: {search.objective.label()} ({search.mode}) over "
        + ", ".join(search.space)
        + ". Each child run is one trial.",
    }
    with tracked_run(
        enabled=log_mlflow,
        tracking_uri=uri,
        experiment=search.experiment,
        run_name=search.name,
        run_dir=out,
        config_dict=search.model_dump(mode="json"),
        tags=tags,
    ) as parent:
        storage.push(out / RUN_RECORD)  # a URI's copy: a resume from another machine continues the same runs
        exp_id = parent.client.get_run(parent.run_id).info.experiment_id if parent else None
        callback = SearchCallback(
            out=location,
            tracking_uri=uri if parent else None,
            experiment_id=exp_id,
            parent_run_id=parent.run_id if parent else None,
            metric="objective",
            mode=search.mode,
            label=search.objective.label(),
            total=total_trials(search),
            show=progress,
        )
        cpus = math.ceil(search.search.max_concurrent_trials * search.resources.cpus)
        with ray_session(address, num_cpus=cpus, verbose=verbose):
            tuner, resumed = _tuner(search, out, location, callback)
            if progress:
                print(
                    f"{'resuming' if resumed else 'starting'} search {search.name!r}: {total_trials(search)} "
                    f"trial(s) of {search.kind}, {search.objective.label()} ({search.mode}), "
                    f"{search.search.max_concurrent_trials} at a time; folder {location}",
                    flush=True,
                )
            grid = tuner.fit()
        if len(grid) < total_trials(search) or grid.num_terminated + grid.num_errors < len(grid):
            raise KeyboardInterrupt  # Tune stopped on Ctrl-C and saved its state: mark the parent run KILLED
        table = trials_table(grid, search, location)
        summary = write_outputs(search, out, table, parent.run_id if parent else None, trial_folders(grid), location)
        outputs = ["trials.parquet", "summary.json", "best.yaml"]
        storage.push(*[out / name for name in outputs], *sorted((out / "best-weights").glob("*")))
        if parent is not None:
            log_parent(parent.client, parent.run_id, search, out, table, summary)
    return SearchResult(
        out,
        summary["best_trial"],
        summary["best_config"] or {},
        summary["best_metric"],
        table,
        summary,
        summary["mlflow_parent_run_id"],
        location,
    )


def main(
    config: Path,
    overrides: list[str],
    out: str | Path | None,
    address: str | None,
    num_samples: int | None,
    tracking_uri: str | None,
    log_mlflow: bool,
    progress: bool,
    verbose: bool = False,
) -> None:
    """The `invgan tune` command: validate, run or resume, print the best point and where everything is. An error
    the user can fix ends in one line (`user_errors`; the traceback with `verbose`), Ctrl-C too (rerun to resume)."""
    extra = [f"search.num_samples={num_samples}"] * (num_samples is not None) + [
        f"mlflow.tracking_uri={tracking_uri}"
    ] * bool(tracking_uri)
    with user_errors("search", verbose=verbose):  # a missing file, a base config that is not valid YAML
        try:
            search = load_search(config, [*overrides, *extra])
        except ValueError as err:  # the loader's own: the file, a --set, a field (pydantic's ValidationError)
            raise SystemExit(f"invalid search config: {describe_error(err)}") from None
    location = out or default_out(search)
    with user_errors("search", storage.where(local_folder(location)), verbose=verbose):
        res = run_search(
            search, out=location, address=address, progress=progress, log_mlflow=log_mlflow, verbose=verbose
        )
    where = res.location
    s = res.summary
    print(
        f"\n{s['trials']} trial(s): {s['complete']} complete, {s['stopped_early']} stopped early, {s['errors']} failed"
    )
    if res.best_trial is None:
        print("no trial completed: nothing to recommend (see the trial errors above)")
    else:
        print(
            f"best: {s['metric']} = {res.best_metric:.4g} (trial {res.best_trial}) with "
            + ", ".join(f"{k}={v}" for k, v in res.best_config.items())
        )
        if s.get("baseline") and s["baseline"]["gain"] is not None:
            b = s["baseline"]
            print(
                f"the base config's point ({', '.join(f'{k}={v}' for k, v in b['config'].items())}): "
                f"{b['metric']:.4g}; the best gains {b['gain']:+.4g}"
            )
        if "cheapest_within_tolerance" in s:
            c = s["cheapest_within_tolerance"]
            print(
                f"cheapest within {c['tolerance']}: {c['metric']:.4g} (trial {c['trial']}) with "
                + ", ".join(f"{k}={v}" for k, v in c["config"].items())
            )
        print(
            f"best config: {s['best_yaml']}"
            + (f" (a copy at {where}/best.yaml)" if storage.is_uri(where) else "")
            + (f"\n  reproduce the trial: {s['reproduce']}" if s.get("reproduce") else "")
        )
    print(f"trials table: {where}/trials.parquet; summary: {where}/summary.json; trials' files: {where}/{EXPERIMENT}/")
    if res.mlflow_parent_run_id:
        print(
            f"MLflow parent run {res.mlflow_parent_run_id} in experiment {search.experiment!r} "
            f"(one child run per trial); open with: {where_to_open(tracking_uri)}"
        )
