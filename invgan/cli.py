"""`invgan`: the front door. Parses arguments and calls one function per command; nothing else."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

from invgan.options import VERBOSE_ALONE, model_options, plain, shared_options
from jobs.train_config import TrainConfig, kind_defaults

if TYPE_CHECKING:
    from jobs.sharded import JobOptions

# every command prints its own MLflow link once; MLflow's per-run "View run" lines would repeat it per trial
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

app = typer.Typer(
    help="Evaluate GAN-inversion adversarial defenses (Defense-GAN, InvGAN, RED) at scale.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


# Every job command takes the same shared options (invgan/options.py: --out, --address, --tracking-uri, --no-mlflow,
# --quiet, -v; --set and --limit for the config-file commands), built into one JobOptions; each job's `main` goes
# through jobs.common.user_errors, so an error the user can fix ends in one line on stderr (the traceback with -v).

# help texts with a [default] that typer's rich markup would otherwise drop
WEIGHTS_HELP = plain("weights folder [weights/<dataset>]")
PLAN_FROM_HELP = plain("run folders (or folders of them) to fit --plan's cost model on [the runs folder]")
NUM_SAMPLES_HELP = plain("trials to run [search.num_samples of the config]")

# TrainConfig fields given by the shared options rather than by an option of their own (see jobs.train.main)
TRAIN_FIELDS_FROM_JOB_OPTIONS = ("out", "tracking_uri", "quiet")


@app.command()
@shared_options(
    omit=("address",),
    out=TrainConfig.model_fields["out"].description or "",
    no_mlflow="no MLflow run: write the model files and the training state only",
    verbose=VERBOSE_ALONE,
)
@model_options(TrainConfig, exclude=TRAIN_FIELDS_FROM_JOB_OPTIONS, notes=kind_defaults)
def train(*, settings: dict[str, Any], opts: JobOptions) -> None:
    """Train a model with Accelerate; rerunning the same command resumes from the last saved state.

    Examples:  invgan train classifier --dataset digits
               invgan train gan --dataset mnist5k --max-minutes 60
               invgan train inverter --dataset mnist5k
    """
    from jobs.train import main as train_main

    train_main(settings, opts)


@app.command("eval")
@shared_options()
def eval_(
    config: Path = typer.Option(Path("configs/default.yaml"), help="YAML config (see configs/)"),
    plan: bool = typer.Option(
        False, "--plan", help="print the predicted core-hours per cell and in total, and the wall time, then stop"
    ),
    plan_from: list[Path] = typer.Option([], "--plan-from", help=PLAN_FROM_HELP),
    *,
    overrides: list[str],
    limit: Optional[int],
    opts: JobOptions,
) -> None:
    """Evaluate every attack against every defense on Ray Data; record the results in MLflow.

    --plan runs nothing: it prints what the config will cost (core-seconds per cell, core-hours in all, wall
    time for 1, 2, 4, 8 workers), from a cost model fitted on earlier runs' rows (or the shipped defaults).

    Prints the accuracy table (defenses x attacks, like InvGAN Table 2), the detection AUC table
    (Table 3), the run folder and the MLflow run. Rerunning the same command resumes: finished
    shards are reused.

    Examples:  invgan eval
               invgan eval --config configs/mnist5k_table2.yaml --set attacks.pgd_linf.params.eps=0.2 --limit 500
               invgan eval --config configs/smoke.yaml --out /tmp/run1
    """
    if plan:
        from jobs.common import user_errors
        from jobs.plan import main as plan_main

        with user_errors("plan", verbose=opts.verbose):
            plan_main(config, overrides, limit=limit, plan_from=plan_from)
        return
    from jobs.evaluate import main as eval_main

    eval_main(config, overrides, opts, limit=limit)


@app.command()
@shared_options(
    overrides="curves.budgets=[0,50,200]", out="run folder [runs/<name>-curves-<config hash>]; rerun to resume"
)
def curves(
    config: Path = typer.Option(Path("configs/curves.yaml"), help="YAML config with a `curves:` section"),
    *,
    overrides: list[str],
    limit: Optional[int],
    opts: JobOptions,
) -> None:
    """Accuracy and wall time versus effective iterations (restarts x steps), InvGAN vs Defense-GAN (InvGAN Fig. 4)."""
    from jobs.curves import main as curves_main

    curves_main(config, overrides, opts, limit=limit)


@app.command()
@shared_options(overrides="steps=200", limit="evaluate only the first N test examples")
def red(
    config: Path = typer.Option(Path("configs/red_mnist5k.yaml"), help="YAML config (configs/red_*.yaml)"),
    *,
    overrides: list[str],
    limit: Optional[int],
    opts: JobOptions,
) -> None:
    """Reverse engineering of deceptions (RED Table 1): signal and attack-type accuracy of CNN, BSD-GAN(-AD)
    from a Defense-GAN or an inverter start, and SBSC/SBSAD, for every attack type of the dictionary.

    Example:  invgan red --config configs/red_smoke.yaml --out /tmp/red1
    """
    from jobs.red import main as red_main

    red_main(config, overrides, opts, limit=limit)


@app.command()
@shared_options(overrides="steps=2000")
def recovery(
    config: Path = typer.Option(Path("configs/repro/recovery_digits.yaml"), help="YAML config"),
    *,
    overrides: list[str],
    opts: JobOptions,
) -> None:
    """Latent recovery (Lipton & Tripathi Tables 1-2) on a uniform-prior generator: the fraction of latents
    recovered to ||z - z'||²/d < ε with no, standard and stochastic clipping, and the spread of the latents
    recovered from one real image.

    Example:  invgan recovery --set trials=200 --set steps=1000 --out /tmp/rec1
    """
    from jobs.recovery import main as recovery_main

    recovery_main(config, overrides, opts)


@app.command("red-theory")
def red_theory(
    out: Path = typer.Option(Path("runs/red-theory"), help="folder for the figures and numbers"),
    n: int = typer.Option(10, help="realizable instances per point"),
    steps: int = typer.Option(1000, help="Algorithm 1 iterations"),
    no_mlflow: bool = typer.Option(False, "--no-mlflow"),
    tracking_uri: Optional[str] = typer.Option(None),
) -> None:
    """RED theory checks on a one-layer GAN: output dimension m vs μ (Fig. 1), linear convergence."""
    from jobs.red import theory_main

    theory_main(out=out, n=n, steps=steps, log_mlflow=not no_mlflow, tracking_uri=tracking_uri)


@app.command()
@shared_options()
def verify(
    dataset: str = typer.Option("mnist5k", help="which shipped weights to check: weights/<dataset>/"),
    limit: Optional[int] = typer.Option(
        None, help="projections on the first N held-out images [100, the manifests' quick check]"
    ),
    data_dir: Optional[Path] = typer.Option(None, help="dataset folder, if not embedded"),
    weights: Optional[Path] = typer.Option(None, help=WEIGHTS_HELP),
    write: bool = typer.Option(
        False, help="after training: measure the whole held-out split and the quick check, record both in the manifests"
    ),
    *,
    verbose: bool,
) -> None:
    """Measure the shipped models on the held-out split and compare with their manifests.

    Classifier accuracy, Defense-GAN (10 restarts x 200 steps) and InvGAN (I(x) + 200 steps)
    projection accuracy, reconstruction MSE.
    """
    from jobs.verify import main as verify_main

    code = verify_main(dataset=dataset, limit=limit, data_dir=data_dir, weights=weights, write=write, verbose=verbose)
    raise typer.Exit(code)


@app.command()
@shared_options()
def report(
    out: Path = typer.Option(Path("docs"), help="folder for results.md and figures/"),
    runs: Optional[Path] = typer.Option(
        None, help="run folders to read [results/: the rows tracked in the repository]"
    ),
    readme: Optional[Path] = typer.Option(
        Path("README.md"), help="README whose headline block (between its markers) gets the headline table"
    ),
    *,
    verbose: bool,
) -> None:
    """Regenerate docs/results.md and docs/figures/ from the reproduction runs (configs/repro/).

    Each table of configs/repro/paper_numbers.yaml: our cells (n per cell) beside the paper's, the run id, its
    compute and the gradient-masking flags, all derived from the run's rows.

    A table whose run does not exist yet says which `invgan eval` command makes it (with `--out results/...`).
    tests/jobs/test_committed_results.py checks that the committed report is what results/ gives.
    """
    from jobs.common import user_errors
    from jobs.paper_report import build_report

    with user_errors("report", verbose=verbose):  # the report's own SystemExit (e.g. no runs) passes as it is
        written = build_report(out, runs=runs, readme=readme)
    typer.echo(f"wrote {written}")


@app.command()
@shared_options(
    overrides="search.seed=1",
    out="search folder [runs/tune/<name>-<hash>]; rerun the same command to resume",
    no_mlflow="no MLflow runs: write the trials table, best.yaml and summary only",
    quiet="no line per finished trial",
    verbose="show the traceback of an error and Ray Tune's own logs",
)
def tune(
    config: Path = typer.Option(
        Path("configs/tune/invgan_defense.yaml"),
        help="search config (configs/tune/): kind, base config, space, objective",
    ),
    num_samples: Optional[int] = typer.Option(None, help=NUM_SAMPLES_HELP),
    *,
    overrides: list[str],
    opts: JobOptions,
) -> None:
    """Search hyperparameters with Ray Tune, scored on the validation split (never the test split).

    Three kinds of search, named in the config: defense-time (InvGAN T, step size, optimizer; Defense-GAN R, L, step
    size), inverter training (λ1, λ2, λ3, η, lr; reported every N steps so ASHA stops bad trials early) and RED (λ
    multiplier, z step, iterations).

    Prints one line per finished trial, then the best point. Writes OUT/best.yaml (a ready-to-run config with the
    best values), OUT/summary.json and OUT/trials.parquet; MLflow gets one parent run per search and one child run
    per trial. Rerunning the same command after Ctrl-C or a kill continues the search: finished trials are not run
    again.

    Examples:

        invgan tune --config configs/tune/invgan_defense.yaml

        invgan tune --config configs/tune/inverter.yaml --num-samples 16 --address auto

        invgan tune --config configs/tune/red.yaml

        invgan tune --config configs/tune/smoke.yaml --out /tmp/tune1
    """
    from tuning.search import main as tune_main

    tune_main(
        config,
        overrides,
        out=opts.out,
        address=opts.address,
        num_samples=num_samples,
        tracking_uri=opts.tracking_uri,
        log_mlflow=opts.log_mlflow,
        progress=opts.progress,
        verbose=opts.verbose,
    )


@app.command()
@shared_options()
def fetch(
    uri: str = typer.Argument(..., help="a run folder (or search folder) at a URI, e.g. s3://bucket/runs/x"),
    dest: Path = typer.Argument(..., help="the local folder to copy it into (created; files already there stay)"),
    *,
    verbose: bool,
) -> None:
    """Copy a run folder from object storage to this machine: its rows, tables, summary and config record.

    Credentials and endpoint come from the standard variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
    AWS_ENDPOINT_URL for an S3-compatible store; GOOGLE_APPLICATION_CREDENTIALS for gs://).

        invgan fetch s3://my-bucket/runs/table2_mnist-0123456789ab runs/table2_mnist
    """
    from jobs import storage
    from jobs.common import user_errors

    with user_errors("fetch", verbose=verbose):
        copied = storage.fetch(uri, dest)
    print(f"{copied} file(s) copied from {uri} to {dest}")


@app.command()
def ui(port: int = typer.Option(5000), tracking_uri: Optional[str] = typer.Option(None)) -> None:
    """Open the MLflow UI on 127.0.0.1 for the project's run store; Ctrl-C or SIGTERM stops the server too."""
    from cluster.local import serve_ui
    from jobs.common import default_tracking_uri

    uri = tracking_uri or default_tracking_uri()
    typer.echo(f"MLflow UI for {uri} at http://127.0.0.1:{port} (Ctrl-C stops it)")
    raise typer.Exit(serve_ui(uri, port))


# ---------------------------------------------------------------- cluster: `invgan cluster`, `submit`, `jobs`

cluster_app = typer.Typer(
    help="Start and stop a Ray cluster of separate node processes on this machine "
    "(for real machines: `ray up ray_cluster.yaml`).",
    no_args_is_help=True,
)
jobs_app = typer.Typer(help="List, follow and stop the jobs of a Ray cluster.", no_args_is_help=True)
app.add_typer(cluster_app, name="cluster")
app.add_typer(jobs_app, name="jobs")
ADDRESS_HELP = "the cluster's job server, http://HEAD:8265 [$RAY_API_SERVER_ADDRESS, else the local cluster]"


@cluster_app.command("up")
def cluster_up(
    local: bool = typer.Option(False, "--local", help="required: start the nodes as processes on this machine"),
    workers: int = typer.Option(2, min=0, help="worker nodes besides the head"),
    head_cpus: int = typer.Option(1, min=1, help="CPUs the head offers to tasks (the job's driver needs none)"),
    worker_cpus: int = typer.Option(1, min=1, help="CPUs each worker node offers"),
    host: str = typer.Option(
        "127.0.0.1",
        help="this machine's address that every service binds and every node is given (dashboard, MLflow, Ray's "
        "ports); not a wildcard such as 0.0.0.0. Beyond 127.0.0.1 MLflow requires a login (needs mlflow[auth])",
    ),
    mlflow: bool = typer.Option(True, help="start the cluster's MLflow tracking server"),
    artifacts: Optional[str] = typer.Option(
        None,
        help="where the MLflow server keeps artifacts, e.g. s3://bucket/mlflow (credentials from the AWS_* "
        "variables; needs boto3: invgan[s3]) [runs/cluster/mlartifacts]",
    ),
) -> None:
    """Start a head and N worker nodes (real `ray start` processes) and an MLflow server; jobs submitted
    with `invgan submit` then run on them and log to that server. Stop everything with `invgan cluster down`."""
    from cluster.local import MLFLOW_USER, state_dir, up

    if not local:
        raise typer.BadParameter(
            "only --local is built in; on real machines run `ray up ray_cluster.yaml`", param_hint="--local"
        )
    state = up(workers, head_cpus=head_cpus, worker_cpus=worker_cpus, host=host, mlflow=mlflow, artifacts=artifacts)
    typer.echo(f"Ray cluster up: head + {workers} worker node(s), {head_cpus + workers * worker_cpus} CPUs")
    typer.echo(f"  job server / dashboard: {state.dashboard_url}    (GCS {state.gcs_address})")
    if state.mlflow_uri:
        login = f"    (login: user {MLFLOW_USER}, password in {state.mlflow_auth})" if state.mlflow_auth else ""
        typer.echo(f"  MLflow server (and UI): {state.mlflow_uri}{login}")
    typer.echo(f"  auth token: {state.token_path}    state, logs, run folders: {state_dir()}")
    typer.echo("submit a job:  invgan submit -- eval --config configs/smoke.yaml")


@cluster_app.command("down")
def cluster_down() -> None:
    """Stop exactly the processes `invgan cluster up` started; logs, the MLflow store and results stay."""
    from cluster.local import down, state_dir

    pids = down()
    typer.echo(
        f"stopped {len(pids)} process(es) of the local cluster" if pids else f"no local cluster in {state_dir()}"
    )


@cluster_app.command("status")
def cluster_status() -> None:
    """Show the local cluster's addresses and its live processes."""
    from cluster.local import cluster_pids, load_state, state_dir

    state = load_state()
    if state is None:
        typer.echo(f"no local cluster in {state_dir()}")
        raise typer.Exit(1)
    typer.echo(
        f"job server {state.dashboard_url}, MLflow {state.mlflow_uri}, {len(state.nodes)} node(s), "
        f"{len(cluster_pids(state))} live process(es)"
    )


@app.command(context_settings={"allow_interspersed_args": False})
def submit(
    command: list[str] = typer.Argument(None, help="the invgan command to run, after --, e.g. -- eval --config ..."),
    address: Optional[str] = typer.Option(None, help=ADDRESS_HELP),
    wait: bool = typer.Option(True, help="stream the job's logs and exit with its status [--no-wait: print its id]"),
    env: list[str] = typer.Option(
        [], "--env", help="NAME=VALUE for the job's environment, e.g. MLFLOW_TRACKING_URI=http://..."
    ),
    cpus: float = typer.Option(
        0,
        "--cpus",
        min=0,
        help="CPUs reserved for the job's entry point (its driver; the workers ask for their own). "
        "0: it runs on the head; more: on any node with that many free",
    ),
    gpus: float = typer.Option(
        0,
        "--gpus",
        min=0,
        help="GPUs reserved for the job's entry point (the workers' GPUs are resources.num_gpus_per_worker)",
    ),
    install_deps: bool = typer.Option(
        False,
        "--install-deps",
        help="the nodes pip-install the project's dependencies (pyproject.toml) for the job, into a virtualenv "
        "made from their Python environment; without it they must have them already (docs/scale-out.md)",
    ),
) -> None:
    """Run an invgan command (eval, red, curves, tune, train) as a job on a Ray cluster.

    The project (without .venv, runs/, databases, caches) is uploaded as the job's working directory and
    `python -m invgan <command>` runs on the head; its Ray work spreads over the cluster's nodes.

    Examples:  invgan submit -- eval --config configs/mnist5k_table2.yaml
               invgan submit --no-wait -- red --config configs/red_mnist5k.yaml
               invgan submit --address http://HEAD:8265 -- tune --config configs/tune/inverter.yaml
               invgan submit --install-deps --cpus 1 -- eval --config configs/smoke.yaml
    """
    from cluster.submit import submit as submit_job

    pairs = dict(item.split("=", 1) for item in env if "=" in item)
    if len(pairs) != len(env):
        raise typer.BadParameter("expected NAME=VALUE", param_hint="--env")
    raise typer.Exit(
        submit_job(
            command or [],
            address=address,
            wait=wait,
            env=pairs or None,
            num_cpus=cpus,
            num_gpus=gpus,
            install_deps=install_deps,
        )
    )


@jobs_app.command("list")
def jobs_list(address: Optional[str] = typer.Option(None, help=ADDRESS_HELP)) -> None:
    """The cluster's jobs, oldest first."""
    from cluster.submit import list_jobs

    for j in list_jobs(address):
        typer.echo(f"{j['job_id']:<28} {j['status']:<10} {j['started']}  {j['seconds']:>6} s  {j['entrypoint']}")


@jobs_app.command("logs")
def jobs_logs(
    job_id: str,
    address: Optional[str] = typer.Option(None, help=ADDRESS_HELP),
    follow: bool = typer.Option(False, "--follow", "-f", help="keep streaming until the job ends"),
) -> None:
    """A job's output so far (or streamed with --follow)."""
    from cluster.submit import logs

    logs(job_id, address, follow)


@jobs_app.command("stop")
def jobs_stop(job_id: str, address: Optional[str] = typer.Option(None, help=ADDRESS_HELP)) -> None:
    """Stop a running job; prints its final status."""
    from cluster.submit import stop

    typer.echo(f"{job_id}: {stop(job_id, address)}")


if __name__ == "__main__":
    app()
