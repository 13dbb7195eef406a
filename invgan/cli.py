"""`invgan`: the front door. Parses arguments and calls one function per command; nothing else."""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

# every command prints its own MLflow link once; MLflow's per-run "View run" lines would repeat it per trial
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

app = typer.Typer(
    help="Evaluate GAN-inversion adversarial defenses (Defense-GAN, InvGAN, RED) at scale.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


class Kind(str, Enum):
    gan = "gan"
    classifier = "classifier"
    inverter = "inverter"


class GanLoss(str, Enum):
    dcgan = "dcgan"
    wgan_gp = "wgan-gp"


@app.command()
def train(
    kind: Kind = typer.Argument(
        ..., help="gan (generator + critic), classifier, or inverter (needs a trained generator)"
    ),
    dataset: str = typer.Option("digits", help="digits | mnist5k | mnist | fashion-mnist | cifar10"),
    data_dir: Optional[Path] = typer.Option(None, help="folder with the dataset files (mnist, fashion-mnist, cifar10)"),
    steps: Optional[int] = typer.Option(
        None, help="optimizer steps [classifier: 100 epochs, gan 20000, inverter 5000]"
    ),
    batch_size: Optional[int] = typer.Option(None, help="global batch size, split across processes"),
    lr: Optional[float] = typer.Option(
        None, help="learning rate [classifier 0.1, gan 2e-4 (dcgan) / 1e-4 (wgan-gp), inverter 2e-4]"
    ),
    seed: int = typer.Option(0),
    augment_shift: Optional[int] = typer.Option(
        None, help="classifier: random translations of up to N pixels [image size // 14: 2 on MNIST, 0 on digits]"
    ),
    device: Optional[str] = typer.Option(None, help="cpu | cuda | mps; default: Accelerate picks (CUDA when present)"),
    out: Optional[Path] = typer.Option(None, help="folder for the model files [weights/<dataset>]"),
    work_dir: Optional[Path] = typer.Option(None, help="resumable training state [runs/train/<dataset>-<kind>]"),
    checkpoint_every: int = typer.Option(200, help="save resumable state every N steps"),
    max_minutes: Optional[float] = typer.Option(None, help="stop and save after this many minutes; rerun to continue"),
    gan_loss: GanLoss = typer.Option(
        GanLoss.dcgan, help="GAN objective (Defense-GAN used wgan-gp; dcgan is 5x cheaper per step)"
    ),
    prior: str = typer.Option(
        "normal", help="gan: latent prior, normal or uniform (the box [-1, 1]^d, for stochastic clipping)"
    ),
    n_critic: Optional[int] = typer.Option(None, help="critic steps per generator step [dcgan 1, wgan-gp 5]"),
    generator: Optional[Path] = typer.Option(None, help="inverter: generator file stem [<out>/generator]"),
    eta: Optional[float] = typer.Option(None, help="inverter: hinge margin η of L_semantic [0.03·sqrt(pixels)]"),
    lambda_adv: float = typer.Option(1.0, help="inverter: λ1"),
    lambda_semantic: float = typer.Option(100.0, help="inverter: λ2"),
    lambda_latent: float = typer.Option(1.0, help="inverter: λ3"),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow store [$MLFLOW_TRACKING_URI or sqlite in ./runs]"),
    quiet: bool = typer.Option(False, help="no progress bar"),
) -> None:
    """Train a model with Accelerate; rerunning the same command resumes from the last saved state.

    Examples:  invgan train classifier --dataset digits
               invgan train gan --dataset mnist5k --max-minutes 60
               invgan train inverter --dataset mnist5k
    """
    from jobs.train import TrainConfig, run

    cfg = TrainConfig(
        kind=kind.value,
        dataset=dataset,
        data_dir=data_dir,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        augment_shift=augment_shift,
        device=device,
        out=out,
        work_dir=work_dir,
        checkpoint_every=checkpoint_every,
        max_minutes=max_minutes,
        gan_loss=gan_loss.value,
        prior=prior,
        n_critic=n_critic,
        generator=generator,
        eta=eta,
        lambda_adv=lambda_adv,
        lambda_semantic=lambda_semantic,
        lambda_latent=lambda_latent,
        tracking_uri=tracking_uri,
        quiet=quiet,
    )
    result = run(cfg)
    if result.get("files"):
        typer.echo(f"{'finished' if result['finished'] else 'stopped'} at step {result['step']}: {result['metrics']}")
        typer.echo("model files: " + ", ".join(f + ".safetensors" for f in result["files"]))
        typer.echo(f"MLflow run {result['mlflow_run_id']} (open with: invgan ui)")


@app.command("eval")
def eval_(
    config: Path = typer.Option(Path("configs/default.yaml"), help="YAML config (see configs/)"),
    set_: list[str] = typer.Option(
        [], "--set", help="override a config value by dotted path, e.g. attacks.fgsm.params.eps=0.2"
    ),
    limit: Optional[int] = typer.Option(None, help="evaluate only the first N examples"),
    out: Optional[Path] = typer.Option(None, help="run folder [runs/<name>-<config hash>]; rerun to resume"),
    address: Optional[str] = typer.Option(
        None, help="Ray cluster address ('auto' to join a running one); default: local"
    ),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow store [$MLFLOW_TRACKING_URI or sqlite in ./runs]"),
    no_mlflow: bool = typer.Option(False, "--no-mlflow", help="write rows and summary only"),
    quiet: bool = typer.Option(False, help="no progress bar"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="show Ray's own logs and the workers' output"),
) -> None:
    """Evaluate every attack against every defense on Ray Data; record the results in MLflow.

    Prints the accuracy table (defenses x attacks, like InvGAN Table 2), the detection AUC table
    (Table 3), the run folder and the MLflow run. Rerunning the same command resumes: finished
    shards are reused.

    Examples:  invgan eval
               invgan eval --config configs/mnist5k_table2.yaml --set attacks.pgd_linf.params.eps=0.2 --limit 500
               invgan eval --config configs/smoke.yaml --out /tmp/run1
    """
    from jobs.evaluate import main as eval_main

    eval_main(
        config=config,
        overrides=set_,
        limit=limit,
        out=out,
        address=address,
        tracking_uri=tracking_uri,
        log_mlflow=not no_mlflow,
        progress=not quiet,
        verbose=verbose,
    )


@app.command()
def curves(
    config: Path = typer.Option(Path("configs/curves.yaml"), help="YAML config with a `curves:` section"),
    set_: list[str] = typer.Option(
        [], "--set", help="override a config value by dotted path, e.g. curves.budgets=[0,50,200]"
    ),
    limit: Optional[int] = typer.Option(None, help="evaluate only the first N examples"),
    out: Optional[Path] = typer.Option(None, help="run folder [runs/<name>-curves-<config hash>]; rerun to resume"),
    address: Optional[str] = typer.Option(None, help="Ray cluster address; default: local"),
    no_mlflow: bool = typer.Option(False, "--no-mlflow", help="write rows, table and plot only"),
    quiet: bool = typer.Option(False, help="no progress bar"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="show Ray's own logs and the workers' output"),
) -> None:
    """Accuracy and wall time versus effective iterations (restarts x steps), InvGAN vs Defense-GAN (InvGAN Fig. 4)."""
    from jobs.curves import main as curves_main

    curves_main(
        config=config,
        overrides=set_,
        limit=limit,
        out=out,
        address=address,
        log_mlflow=not no_mlflow,
        progress=not quiet,
        verbose=verbose,
    )


@app.command()
def red(
    config: Path = typer.Option(Path("configs/red_mnist5k.yaml"), help="YAML config (configs/red_*.yaml)"),
    set_: list[str] = typer.Option([], "--set", help="override a config value by dotted path, e.g. steps=200"),
    limit: Optional[int] = typer.Option(None, help="evaluate only the first N test examples"),
    out: Optional[Path] = typer.Option(None, help="run folder [runs/<name>-<config hash>]; rerun to resume"),
    address: Optional[str] = typer.Option(None, help="Ray cluster address; default: local"),
    no_mlflow: bool = typer.Option(False, "--no-mlflow", help="write rows and summary only"),
    quiet: bool = typer.Option(False, help="no progress bar"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="show Ray's own logs and the workers' output"),
) -> None:
    """Reverse engineering of deceptions (RED Table 1): signal and attack-type accuracy of CNN, BSD-GAN(-AD)
    from a Defense-GAN or an inverter start, and SBSC/SBSAD, for every attack type of the dictionary.

    Example:  invgan red --config configs/red_smoke.yaml --out /tmp/red1
    """
    from jobs.red import main as red_main

    red_main(
        config=config,
        overrides=set_,
        limit=limit,
        out=out,
        address=address,
        log_mlflow=not no_mlflow,
        progress=not quiet,
        verbose=verbose,
    )


@app.command()
def recovery(
    config: Path = typer.Option(Path("configs/repro/recovery_digits.yaml"), help="YAML config"),
    set_: list[str] = typer.Option([], "--set", help="override a config value by dotted path, e.g. steps=2000"),
    out: Optional[Path] = typer.Option(None, help="run folder [runs/<name>-<config hash>]"),
    no_mlflow: bool = typer.Option(False, "--no-mlflow", help="write rows and summary only"),
) -> None:
    """Latent recovery (Lipton & Tripathi Tables 1-2) on a uniform-prior generator: the fraction of latents
    recovered to ||z - z'||²/d < ε with no, standard and stochastic clipping, and the spread of the latents
    recovered from one real image.

    Example:  invgan recovery --set trials=200 --set steps=1000 --out /tmp/rec1
    """
    from jobs.recovery import main as recovery_main

    recovery_main(config=config, overrides=set_, out=out, log_mlflow=not no_mlflow)


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
def verify(
    dataset: str = typer.Option("mnist5k", help="which shipped weights to check: weights/<dataset>/"),
    limit: Optional[int] = typer.Option(
        None, help="projections on the first N held-out images [100, the manifests' quick check]"
    ),
    data_dir: Optional[Path] = typer.Option(None, help="dataset folder, if not embedded"),
    weights: Optional[Path] = typer.Option(None, help="weights folder [weights/<dataset>]"),
    write: bool = typer.Option(
        False, help="after training: measure the whole held-out split and the quick check, record both in the manifests"
    ),
) -> None:
    """Measure the shipped models on the held-out split and compare with their manifests.

    Classifier accuracy, Defense-GAN (10 restarts x 200 steps) and InvGAN (I(x) + 200 steps)
    projection accuracy, reconstruction MSE.
    """
    from jobs.verify import main as verify_main

    raise typer.Exit(verify_main(dataset=dataset, limit=limit, data_dir=data_dir, weights=weights, write=write))


@app.command()
def report(
    out: Path = typer.Option(Path("docs"), help="folder for results.md and figures/"),
    runs: Optional[Path] = typer.Option(None, help="run folders to read [$INVGAN_RUNS or ./runs]"),
    readme: Optional[Path] = typer.Option(
        Path("README.md"), help="README whose headline block (between its markers) gets the headline table"
    ),
) -> None:
    """Regenerate docs/results.md and docs/figures/ from the reproduction runs (configs/repro/).

    Each table of configs/repro/paper_numbers.yaml: our cells (n per cell) beside the paper's, the run id, its
    compute and the gradient-masking flags, all derived from the run's rows.

    A table whose run does not exist yet says which `invgan eval` command makes it.
    """
    from jobs.paper_report import build_report

    typer.echo(f"wrote {build_report(out, runs=runs, readme=readme)}")


@app.command()
def tune(
    config: Path = typer.Option(
        Path("configs/tune/invgan_defense.yaml"),
        help="search config (configs/tune/): kind, base config, space, objective",
    ),
    set_: list[str] = typer.Option(
        [], "--set", help="override a search-config value by dotted path, e.g. search.seed=1"
    ),
    num_samples: Optional[int] = typer.Option(None, help="trials to run [search.num_samples of the config]"),
    out: Optional[Path] = typer.Option(
        None, help="search folder (default: runs/tune/NAME-HASH); rerun the same command to resume"
    ),
    address: Optional[str] = typer.Option(
        None, help="Ray cluster address ('auto' to join a running one); default: local"
    ),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow store [$MLFLOW_TRACKING_URI or sqlite in ./runs]"),
    no_mlflow: bool = typer.Option(False, "--no-mlflow", help="write the trials table, best.yaml and summary only"),
    quiet: bool = typer.Option(False, help="no line per finished trial"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="show Ray Tune's own logs"),
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
        config=config,
        overrides=set_,
        out=out,
        address=address,
        num_samples=num_samples,
        tracking_uri=tracking_uri,
        log_mlflow=not no_mlflow,
        progress=not quiet,
        verbose=verbose,
    )


@app.command()
def ui(port: int = typer.Option(5000), tracking_uri: Optional[str] = typer.Option(None)) -> None:
    """Open the MLflow UI on 127.0.0.1 for the project's run store."""
    import subprocess
    import sys

    from jobs.common import default_tracking_uri

    uri = tracking_uri or default_tracking_uri()
    typer.echo(f"MLflow UI for {uri} at http://127.0.0.1:{port}")
    raise typer.Exit(
        subprocess.call(
            [
                sys.executable,
                "-m",
                "mlflow",
                "ui",
                "--backend-store-uri",
                uri,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ]
        )
    )


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
    host: str = typer.Option("127.0.0.1", help="address every service binds (dashboard, MLflow, Ray's ports)"),
    mlflow: bool = typer.Option(True, help="start the cluster's MLflow tracking server"),
) -> None:
    """Start a head and N worker nodes (real `ray start` processes) and an MLflow server; jobs submitted
    with `invgan submit` then run on them and log to that server. Stop everything with `invgan cluster down`."""
    from cluster.local import state_dir, up

    if not local:
        raise typer.BadParameter(
            "only --local is built in; on real machines run `ray up ray_cluster.yaml`", param_hint="--local"
        )
    state = up(workers, head_cpus=head_cpus, worker_cpus=worker_cpus, host=host, mlflow=mlflow)
    typer.echo(f"Ray cluster up: head + {workers} worker node(s), {head_cpus + workers * worker_cpus} CPUs")
    typer.echo(f"  job server / dashboard: {state.dashboard_url}    (GCS {state.gcs_address})")
    if state.mlflow_uri:
        typer.echo(f"  MLflow server (and UI): {state.mlflow_uri}")
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
) -> None:
    """Run an invgan command (eval, red, curves, tune, train) as a job on a Ray cluster.

    The project (without .venv, runs/, databases, caches) is uploaded as the job's working directory and
    `python -m invgan <command>` runs on the head; its Ray work spreads over the cluster's nodes.

    Examples:  invgan submit -- eval --config configs/mnist5k_table2.yaml
               invgan submit --no-wait -- red --config configs/red_mnist5k.yaml
               invgan submit --address http://HEAD:8265 -- tune --config configs/tune/inverter.yaml
    """
    from cluster.submit import submit as submit_job

    pairs = dict(item.split("=", 1) for item in env if "=" in item)
    if len(pairs) != len(env):
        raise typer.BadParameter("expected NAME=VALUE", param_hint="--env")
    raise typer.Exit(submit_job(command or [], address=address, wait=wait, env=pairs or None))


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
