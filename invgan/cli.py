"""`invgan`: the front door. Parses arguments and calls one function per command; nothing else."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer

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
    kind: Kind = typer.Argument(..., help="gan (generator + critic), classifier, or inverter (needs a trained generator)"),
    dataset: str = typer.Option("digits", help="digits | mnist5k | mnist | fashion-mnist | cifar10"),
    data_dir: Optional[Path] = typer.Option(None, help="folder with the dataset files (mnist, fashion-mnist, cifar10)"),
    steps: Optional[int] = typer.Option(None, help="optimizer steps [classifier: 100 epochs, gan 20000, inverter 5000]"),
    batch_size: Optional[int] = typer.Option(None, help="global batch size, split across processes"),
    lr: Optional[float] = typer.Option(None, help="learning rate [classifier 0.1, gan 2e-4 (dcgan) / 1e-4 (wgan-gp), inverter 2e-4]"),
    seed: int = typer.Option(0),
    augment_shift: Optional[int] = typer.Option(None, help="classifier: random translations of up to N pixels [image size // 14: 2 on MNIST, 0 on digits]"),
    device: Optional[str] = typer.Option(None, help="cpu | cuda | mps; default: Accelerate picks (CUDA when present)"),
    out: Optional[Path] = typer.Option(None, help="folder for the model files [weights/<dataset>]"),
    work_dir: Optional[Path] = typer.Option(None, help="resumable training state [runs/train/<dataset>-<kind>]"),
    checkpoint_every: int = typer.Option(200, help="save resumable state every N steps"),
    max_minutes: Optional[float] = typer.Option(None, help="stop and save after this many minutes; rerun to continue"),
    gan_loss: GanLoss = typer.Option(GanLoss.dcgan, help="GAN objective (Defense-GAN used wgan-gp; dcgan is 5x cheaper per step)"),
    prior: str = typer.Option("normal", help="gan: latent prior, normal or uniform (the box [-1, 1]^d, for stochastic clipping)"),
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

    cfg = TrainConfig(kind=kind.value, dataset=dataset, data_dir=data_dir, steps=steps, batch_size=batch_size, lr=lr,
                      seed=seed, augment_shift=augment_shift, device=device, out=out, work_dir=work_dir, checkpoint_every=checkpoint_every,
                      max_minutes=max_minutes, gan_loss=gan_loss.value, prior=prior, n_critic=n_critic, generator=generator, eta=eta,
                      lambda_adv=lambda_adv, lambda_semantic=lambda_semantic, lambda_latent=lambda_latent,
                      tracking_uri=tracking_uri, quiet=quiet)
    result = run(cfg)
    if result.get("files"):
        typer.echo(f"{'finished' if result['finished'] else 'stopped'} at step {result['step']}: {result['metrics']}")
        typer.echo("model files: " + ", ".join(f + ".safetensors" for f in result["files"]))
        typer.echo(f"MLflow run {result['mlflow_run_id']} (open with: invgan ui)")


@app.command("eval")
def eval_(
    config: Path = typer.Option(Path("configs/default.yaml"), help="YAML config (see configs/)"),
    set_: list[str] = typer.Option([], "--set", help="override a config value by dotted path, e.g. attacks.fgsm.params.eps=0.2"),
    limit: Optional[int] = typer.Option(None, help="evaluate only the first N examples"),
    out: Optional[Path] = typer.Option(None, help="run folder [runs/<name>-<config hash>]; rerun to resume"),
    address: Optional[str] = typer.Option(None, help="Ray cluster address ('auto' to join a running one); default: local"),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow store [$MLFLOW_TRACKING_URI or sqlite in ./runs]"),
    no_mlflow: bool = typer.Option(False, "--no-mlflow", help="write rows and summary only"),
    quiet: bool = typer.Option(False, help="no progress bar"),
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

    eval_main(config=config, overrides=set_, limit=limit, out=out, address=address, tracking_uri=tracking_uri,
              log_mlflow=not no_mlflow, progress=not quiet)


@app.command()
def curves(
    config: Path = typer.Option(Path("configs/curves.yaml"), help="YAML config with a `curves:` section"),
    set_: list[str] = typer.Option([], "--set", help="override a config value by dotted path, e.g. curves.budgets=[0,50,200]"),
    limit: Optional[int] = typer.Option(None, help="evaluate only the first N examples"),
    out: Optional[Path] = typer.Option(None, help="run folder [runs/<name>-curves-<config hash>]; rerun to resume"),
    address: Optional[str] = typer.Option(None, help="Ray cluster address; default: local"),
    no_mlflow: bool = typer.Option(False, "--no-mlflow", help="write rows, table and plot only"),
    quiet: bool = typer.Option(False, help="no progress bar"),
) -> None:
    """Accuracy and wall time versus effective iterations (restarts x steps), InvGAN vs Defense-GAN (InvGAN Fig. 4)."""
    from jobs.curves import main as curves_main

    curves_main(config=config, overrides=set_, limit=limit, out=out, address=address, log_mlflow=not no_mlflow,
                progress=not quiet)


@app.command()
def red(
    config: Path = typer.Option(Path("configs/red_mnist5k.yaml"), help="YAML config (configs/red_*.yaml)"),
    set_: list[str] = typer.Option([], "--set", help="override a config value by dotted path, e.g. steps=200"),
    limit: Optional[int] = typer.Option(None, help="evaluate only the first N test examples"),
    out: Optional[Path] = typer.Option(None, help="run folder [runs/<name>-<config hash>]; rerun to resume"),
    address: Optional[str] = typer.Option(None, help="Ray cluster address; default: local"),
    no_mlflow: bool = typer.Option(False, "--no-mlflow", help="write rows and summary only"),
    quiet: bool = typer.Option(False, help="no progress bar"),
) -> None:
    """Reverse engineering of deceptions (RED Table 1): signal and attack-type accuracy of CNN, BSD-GAN(-AD)
    from a Defense-GAN or an inverter start, and SBSC/SBSAD, for every attack type of the dictionary.

    Example:  invgan red --config configs/red_smoke.yaml --out /tmp/red1
    """
    from jobs.red import main as red_main

    red_main(config=config, overrides=set_, limit=limit, out=out, address=address, log_mlflow=not no_mlflow,
             progress=not quiet)


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
    limit: Optional[int] = typer.Option(None, help="projections on the first N held-out images [100, the manifests' quick check]"),
    data_dir: Optional[Path] = typer.Option(None, help="dataset folder, if not embedded"),
    weights: Optional[Path] = typer.Option(None, help="weights folder [weights/<dataset>]"),
    write: bool = typer.Option(False, help="after training: measure the whole held-out split and the quick check, record both in the manifests"),
) -> None:
    """Measure the shipped models on the held-out split and compare with their manifests.

    Classifier accuracy, Defense-GAN (10 restarts x 200 steps) and InvGAN (I(x) + 200 steps)
    projection accuracy, reconstruction MSE.
    """
    from jobs.verify import main as verify_main

    raise typer.Exit(verify_main(dataset=dataset, limit=limit, data_dir=data_dir, weights=weights, write=write))


@app.command()
def ui(port: int = typer.Option(5000), tracking_uri: Optional[str] = typer.Option(None)) -> None:
    """Open the MLflow UI on 127.0.0.1 for the project's run store."""
    import subprocess
    import sys

    from jobs.common import default_tracking_uri

    uri = tracking_uri or default_tracking_uri()
    typer.echo(f"MLflow UI for {uri} at http://127.0.0.1:{port}")
    raise typer.Exit(subprocess.call([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                                      "--host", "127.0.0.1", "--port", str(port)]))


if __name__ == "__main__":
    app()
