"""What `invgan train` takes: TrainConfig (every field with its default and the help text of its option) and the
per-kind defaults. Only pydantic here, no torch: `invgan` builds the train command's options from this model at
start-up (invgan/cli.py), and `invgan --help` must stay fast. The training loops are in jobs/train.py."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from jobs.common import runs_dir, weights_stem

Kind = Literal["gan", "classifier", "inverter"]

# Defaults per kind, each with its reason (None: computed by jobs.train.run, see the field's description).
DEFAULTS: dict[str, dict[str, float | int | None]] = {
    # RED appendix: SGD lr 0.1, momentum 0.5, batch 128; steps: 100 epochs of the training split.
    "classifier": dict(lr=0.1, batch_size=128, steps=None),
    # GAN: see GAN_DEFAULTS for the per-loss learning rate and critic steps.
    "gan": dict(batch_size=64, steps=20000),
    # InvGAN: Adam(β1 0.5, β2 0.999); the paper runs 100K iterations, a few thousand suffice for MNIST here.
    "inverter": dict(lr=2e-4, batch_size=64, steps=5000),
}


GAN_DEFAULTS: dict[str, dict[str, float | int | None]] = {
    # DCGAN (Radford et al.): Adam 2e-4, β1 0.5, one D step per G step. The default here: 5x cheaper
    # per step than WGAN-GP on a CPU, and what the shipped generators were trained with.
    "dcgan": dict(lr=2e-4, n_critic=1),
    # WGAN-GP as Defense-GAN trained its generators: Adam 1e-4, betas (0.5, 0.9), 5 critic steps.
    "wgan-gp": dict(lr=1e-4, n_critic=5),
}


def kind_defaults(field: str) -> str | None:
    """A field's defaults per kind (DEFAULTS, GAN_DEFAULTS per loss) as help text, e.g. for lr
    '[classifier 0.1, gan 0.0002 (dcgan) / 0.0001 (wgan-gp), inverter 0.0002]'; None if no kind sets it."""
    parts = []
    for kind, defaults in DEFAULTS.items():
        per_loss = {loss: d[field] for loss, d in GAN_DEFAULTS.items() if d.get(field) is not None}
        if kind == "gan" and per_loss:  # the validator applies GAN_DEFAULTS over DEFAULTS
            parts.append("gan " + " / ".join(f"{v:g} ({loss})" for loss, v in per_loss.items()))
        elif defaults.get(field) is not None:
            parts.append(f"{kind} {defaults[field]:g}")
    return f"[{', '.join(parts)}]" if parts else None


class TrainConfig(BaseModel):
    """One training run. Each field is an option of `invgan train` (field `batch_size`: `--batch-size`), with
    the field's default and its description as the help."""

    model_config = ConfigDict(extra="forbid")

    kind: Kind = Field(description="gan (generator + critic), classifier, or inverter (needs a trained generator)")
    dataset: str = Field("digits", description="digits | mnist5k | mnist | fashion-mnist | cifar10")
    data_dir: Optional[Path] = Field(None, description="folder with the dataset files (mnist, fashion-mnist, cifar10)")
    steps: Optional[int] = Field(
        None, gt=0, description="optimizer steps (gan: generator steps; classifier: 100 epochs of the training split)"
    )
    batch_size: Optional[int] = Field(None, gt=0, description="global batch size, split across processes")
    lr: Optional[float] = Field(None, gt=0, description="learning rate")
    seed: int = Field(0, description="seed of the initial weights, the batches and the noise")
    augment_shift: Optional[int] = Field(
        None,
        ge=0,
        description="classifier: random translations of up to N pixels [image size // 14: 2 on MNIST, 0 on digits]",
    )
    device: Optional[Literal["cpu", "cuda", "mps"]] = Field(
        None,
        description="device to train on [Accelerate picks: CUDA when present; with --workers N: a GPU per worker "
        "when the Ray cluster has N]",
    )
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(
        "no", description="Accelerate's mixed precision: fp16 or bf16 autocast, float32 weights (a GPU's gain)"
    )
    workers: int = Field(
        1,
        gt=0,
        description="data-parallel processes: N > 1 runs the same loop on N Ray Train workers (a local Ray "
        "instance, or the cluster of a submitted job), each taking 1/N of every global batch",
    )
    storage: Optional[str] = Field(
        None,
        description="--workers N: where Ray Train keeps the resumable state, a folder or a URI (s3://bucket/path) "
        "every node can reach; in <storage>/<work dir's name> [the work dir]",
    )
    out: Optional[Path] = Field(None, description="folder for the model files [weights/<dataset>]")
    work_dir: Optional[Path] = Field(
        None, description="resumable training state, the run folder [runs/train/<dataset>-<kind>]"
    )
    checkpoint_every: int = Field(200, gt=0, description="save resumable state every N steps")
    max_minutes: Optional[float] = Field(
        None, gt=0, description="stop and save after this many minutes; rerun to continue"
    )
    # GAN
    gan_loss: Literal["dcgan", "wgan-gp"] = Field(
        "dcgan", description="gan: objective (Defense-GAN used wgan-gp; dcgan is 5x cheaper per step)"
    )
    prior: Literal["normal", "uniform"] = Field(
        "normal", description="gan: latent prior; uniform is the box [-1, 1]^d that stochastic clipping needs"
    )
    n_critic: Optional[int] = Field(None, gt=0, description="gan: critic steps per generator step")
    gp_weight: float = Field(10.0, description="gan: weight of the gradient penalty (wgan-gp)")
    # inverter (InvGAN objective)
    generator: Optional[Path] = Field(None, description="inverter: generator file stem [<out>/generator]")
    eta: Optional[float] = Field(None, ge=0, description="inverter: hinge margin η of L_semantic [0.03·sqrt(pixels)]")
    lambda_adv: float = Field(1.0, description="inverter: λ1, weight of the adversarial loss")
    lambda_semantic: float = Field(100.0, description="inverter: λ2, weight of L_semantic")
    lambda_latent: float = Field(1.0, description="inverter: λ3, weight of the latent loss")
    patience: Optional[int] = Field(
        None,
        gt=0,
        description="inverter: stop once neither the latent error nor the T = 0 accuracy on validation images has "
        "improved for N checks (then --steps is the cap) and save the best check's weights; the learning curve "
        "goes into the manifest [off: train --steps]",
    )
    eval_every: int = Field(500, gt=0, description="inverter: steps between the checks of --patience")
    classifier: Optional[Path] = Field(
        None,
        description="inverter: classifier of the T = 0 accuracy checked by --patience [the generator's folder's]",
    )
    eval_split: Literal["test", "validation"] = Field(
        "test",
        description="held-out split of the manifest's figures (searches use validation, carved from train)",
    )
    # records
    tracking_uri: Optional[str] = Field(None, description="MLflow store [$MLFLOW_TRACKING_URI or sqlite in ./runs]")
    experiment: str = Field("train", description="MLflow experiment")
    quiet: bool = Field(False, description="no progress bar")

    @model_validator(mode="after")
    def _fill_defaults(self) -> "TrainConfig":
        defaults = DEFAULTS[self.kind] | (GAN_DEFAULTS[self.gan_loss] if self.kind == "gan" else {})
        for key, value in defaults.items():
            if getattr(self, key) is None and value is not None:
                setattr(self, key, value)
        if self.out is None:
            self.out = weights_stem(self.dataset, "x").parent
        if self.work_dir is None:
            self.work_dir = runs_dir() / "train" / f"{self.dataset}-{self.kind}"
        if self.generator is None:
            self.generator = self.out / "generator"
        if self.patience is not None:
            if self.kind != "inverter":
                raise ValueError(f"patience: the stopping rule checks an inverter; {self.kind} trains --steps")
            if self.classifier is None:
                self.classifier = self.generator.parent / "classifier"
        return self
