"""The evaluation config: YAML validated by pydantic, `--set` overrides by dotted path, a stable hash.

Attacks and defenses are named entries with a `kind` from a registry and keyword parameters that are
checked by building the object before any Ray work starts, so a typo fails with the field's name.
Attacks name their target (InvGAN Sec. 4.2 and Chen et al.):
- `classifier`: computed against the bare classifier, fed to every defense (FGSM, PGD, CW);
- `each`: end to end against each defense in turn, one row per defense attacked (BPDA, unrolled, NES);
- a defense name: computed through that defense, fed to every defense (RP through `invgan`).
A black box (`substitute`) takes any of the three as its oracle: it is trained on the oracle's labels.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional, TypeVar, overload

import yaml
from pydantic import Field, field_validator, model_validator

from jobs.common import PROJECT_ROOT, check_folder_name
from jobs.common import describe_error as describe_error  # where every job's config error is told
from jobs.masking import CHECK_PREFIX, expand_checks
from jobs.specs import (  # the names a job config is built from; jobs import them from here
    ATTACKS as ATTACKS,
)
from jobs.specs import (
    BLACK_BOXES as BLACK_BOXES,
)
from jobs.specs import (
    BUDGETS as BUDGETS,
)
from jobs.specs import (
    DEFENSES as DEFENSES,
)
from jobs.specs import (
    NOT_BUDGETS as NOT_BUDGETS,
)
from jobs.specs import (
    RESERVED as RESERVED,
)
from jobs.specs import (
    WRAPPERS as WRAPPERS,
)
from jobs.specs import (
    AttackSpec as AttackSpec,
)
from jobs.specs import (
    DefenseSpec as DefenseSpec,
)
from jobs.specs import (
    MlflowSpec as MlflowSpec,
)
from jobs.specs import (
    Precision as Precision,
)
from jobs.specs import (
    Resources as Resources,
)
from jobs.specs import (
    _Strict as _Strict,
)
from jobs.specs import (
    attacked_positions as attacked_positions,
)
from jobs.specs import (
    examples_in_shard as examples_in_shard,
)


class CurvesSpec(_Strict):
    """Runtime versus iterations (InvGAN Sec. 4.3, Fig. 4): each projection defense at each budget of
    effective iterations (restarts x steps). InvGAN: 1 restart, T = budget; Defense-GAN: `restarts`
    restarts of budget / restarts steps."""

    budgets: list[int] = [0, 10, 25, 50, 100, 200, 500]
    defenses: list[Literal["invgan", "defensegan"]] = ["invgan", "defensegan"]
    restarts: int = Field(10, gt=0, description="Defense-GAN restarts at every budget")
    lr: float = Field(0.05, gt=0)
    optimizer: Literal["adam", "sgd", "momentum"] = "adam"

    @field_validator("budgets")
    @classmethod
    def _sorted(cls, budgets: list[int]) -> list[int]:
        if not budgets or min(budgets) < 0:
            raise ValueError("budgets: give non-negative effective iteration counts, e.g. [0, 10, 100]")
        return sorted(set(budgets))


class MaskingChecks(_Strict):
    """Gradient-masking checks (jobs/masking.py). The rows of the config's own attacks give checks (a)
    single step stronger than iterative and (c) black box stronger than white box; for (b) and (d) every
    white-box iterative attack is run again on `examples` examples (spread over the split, among its own)
    with ε × `eps_factor` and with `steps_factor` × the steps, as attacks named check/<attack>/..., kept
    out of the headline tables."""

    examples: int = Field(20, gt=0, description="examples the extra check attacks run on")
    eps_factor: float = Field(3.0, gt=1, description="the ε sweep's wide end (ℓ∞ capped at 1: the whole box)")
    steps_factor: int = Field(4, gt=1, description="more steps: must not lower accuracy if the attack converged")
    tol: float = Field(0.02, ge=0, lt=1, description="accuracy difference that raises a flag")
    floor: float = Field(0.1, ge=0, lt=1, description="accuracy the wide-ε attack must get below")


class JobConfig(_Strict):
    """What every sharded job's config shares: weights folder, hash, MLflow experiment family."""

    family_prefix: ClassVar[str] = "eval"  # experiment: <prefix>-<dataset> unless mlflow.experiment is given
    # Sections that do not change a row: not in the hash, so a rerun with other values continues the same run
    # folder, and MLflow records them as tags (a param cannot change). `precision` only decides how many
    # examples are added after the configured ones.
    NOT_RESULTS: ClassVar[tuple[str, ...]] = ("resources", "mlflow", "precision")
    # every job config declares these fields (eval, RED, curves); named here for the methods below
    weights: Path
    dataset: str
    mlflow: MlflowSpec

    @field_validator("name", check_fields=False)
    @classmethod
    def _plain_name(cls, name: str) -> str:
        """The run folder is <runs>/<name>-<hash>: a name must not lead it out of <runs> ('..', '/', absolute)."""
        return check_folder_name(name)

    def weights_dir(self) -> Path:
        return self.weights if self.weights.is_absolute() else PROJECT_ROOT / self.weights

    def config_hash(self) -> str:
        """sha256 of the canonical JSON of everything that changes results (not resources or MLflow)."""
        payload = self.model_dump(mode="json", exclude=set(self.NOT_RESULTS))
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    @property
    def family(self) -> str:
        return self.mlflow.experiment or f"{self.family_prefix}-{self.dataset}"


class EvalConfig(JobConfig):
    name: str
    dataset: str = "mnist5k"
    data_dir: Optional[Path] = None
    split: Literal["train", "test", "validation"] = "test"  # validation: carved from train, what `invgan tune` uses
    limit: Optional[int] = Field(None, gt=0, description="first N examples of the split")
    weights: Path = Path("weights/mnist5k")
    seed: int = 0
    shard_size: int = Field(16, gt=0, description="examples per shard: the unit of work, resume and progress")
    detection_space: Literal["feature", "image"] = "feature"
    defenses: dict[str, DefenseSpec]
    attacks: dict[str, AttackSpec]
    resources: Resources = Resources()
    mlflow: MlflowSpec = MlflowSpec()
    curves: Optional[CurvesSpec] = None  # used by `invgan curves`
    masking_checks: Optional[MaskingChecks] = None  # off by default: the extra attacks cost time
    precision: Optional[Precision] = None  # add examples until every accuracy cell's interval is this narrow

    @model_validator(mode="after")
    def _consistent(self) -> "EvalConfig":
        if not self.defenses:
            raise ValueError("defenses: name at least one defense (e.g. none: {kind: none})")
        bad = RESERVED & set(self.attacks)
        if bad:
            raise ValueError(f"attacks: {sorted(bad)} are reserved result names; rename the attack")
        self._derive_masking_checks()
        for name, spec in self.attacks.items():
            if spec.target not in ("classifier", "each", *self.defenses):
                raise ValueError(
                    f"attacks.{name}.target: {spec.target!r} is not 'classifier', 'each' or a defense "
                    f"({', '.join(self.defenses)})"
                )
            end_to_end = spec.kind in WRAPPERS
            if spec.kind not in BLACK_BOXES and end_to_end == (spec.target == "classifier"):
                raise ValueError(
                    f"attacks.{name}.target: {spec.kind!r} "
                    + (
                        "goes through a defense: use 'each' or a defense name"
                        if end_to_end
                        else "follows the classifier's gradient: its target must be 'classifier' "
                        "(wrap it, e.g. kind: bpda with base: {kind: " + spec.kind + "}, to attack a defense)"
                    )
                )
            targets = list(self.defenses) if spec.target == "each" else [spec.target]
            if spec.kind == "rp" and any(self.defenses[t].kind != "invgan" for t in targets if t in self.defenses):
                raise ValueError(f"attacks.{name}: rp needs a defense with an inverter (kind invgan) as its target")
            if spec.kind == "unrolled" and any(self.defenses[t].kind == "none" for t in targets if t in self.defenses):
                raise ValueError(
                    f"attacks.{name}: unrolled differentiates through projection steps, so its target "
                    "needs a generator (defensegan, invgan or clipped), not kind none; name such a "
                    "defense as its target instead of 'each'"
                )
        return self

    def _derive_masking_checks(self) -> None:
        """Replace the check/ attacks by the ones `masking_checks` derives (a dumped config validates again
        to the same attacks); a check/ name the settings do not derive is refused."""
        own = {n: s for n, s in self.attacks.items() if not n.startswith(CHECK_PREFIX)}
        derived = {}
        if self.masking_checks is not None:
            m = self.masking_checks
            derived = expand_checks(
                {n: s.model_dump(mode="json", exclude_none=True) for n, s in own.items()},
                examples=m.examples,
                eps_factor=m.eps_factor,
                steps_factor=m.steps_factor,
            )
        stray = sorted(set(self.attacks) - set(own) - set(derived))
        if stray:
            raise ValueError(
                f"attacks: {stray} start with {CHECK_PREFIX!r}, which is reserved for the attacks "
                "masking_checks derives; rename them"
            )
        self.attacks = own | {n: AttackSpec.model_validate(s) for n, s in derived.items()}


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`a.b.c=value` sets raw['a']['b']['c'] (YAML-parsed value), creating dicts on the way."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected dotted.path=value, e.g. attacks.fgsm.params.eps=0.2")
        path, value = item.split("=", 1)
        node = raw
        *parents, leaf = path.strip().split(".")
        if not all([*parents, leaf]):
            raise ValueError(
                f"--set {item!r}: empty name in the path; expected dotted.path=value, e.g. attacks.fgsm.params.eps=0.2"
            )
        for depth, key in enumerate(parents):
            node = node.setdefault(key, {})
            if isinstance(node, list):  # no indexing: a list is set whole
                raise ValueError(
                    f"--set {item!r}: {key!r} is a list; set the whole list, e.g. "
                    f"--set {'.'.join(parents[: depth + 1])}=[...]"
                )
            if not isinstance(node, dict):
                raise ValueError(f"--set {item!r}: {key!r} is not a section")
        try:
            node[leaf] = yaml.safe_load(value)  # safe: a Python tag is refused here too
        except yaml.YAMLError as err:
            raise ValueError(
                f"--set {item!r}: the value is not valid YAML ({' '.join(str(err).split())[:200]})"
            ) from None
    return raw


C = TypeVar("C", bound=JobConfig)


@overload
def load_config(path: str | Path, overrides: list[str] | None = None, *, model: type[C], **fields: Any) -> C: ...
@overload
def load_config(path: str | Path, overrides: list[str] | None = None, **fields: Any) -> EvalConfig: ...
def load_config(
    path: str | Path, overrides: list[str] | None = None, *, model: type[JobConfig] = EvalConfig, **fields: Any
) -> JobConfig:
    """Read a YAML config, apply `--set` overrides and keyword fields, validate as `model`."""
    path = Path(path)
    if not path.exists() and not path.is_absolute() and (PROJECT_ROOT / path).exists():
        path = PROJECT_ROOT / path  # `invgan eval` from outside the checkout still finds configs/
    if not path.exists():
        raise FileNotFoundError(
            f"config {path} does not exist (shipped configs: "
            f"{', '.join(p.name for p in (PROJECT_ROOT / 'configs').glob('*.yaml'))})"
        )
    try:
        raw = yaml.safe_load(path.read_text())  # safe: a Python tag (!!python/object) is refused here
    except yaml.YAMLError as err:
        raise ValueError(f"config {path}: not valid YAML ({' '.join(str(err).split())[:300]})") from None
    if raw is None:
        raise ValueError(
            f"config {path}: the file is empty; expected a mapping of settings (name: ..., "
            "defenses: ..., attacks: ...), e.g. configs/smoke.yaml"
        )
    if not isinstance(raw, dict):
        raise ValueError(
            f"config {path}: expected a mapping of settings (name: ..., defenses: ..., attacks: ...), "
            f"got a YAML {type(raw).__name__}"
        )
    raw = apply_overrides(raw, overrides or [])
    raw.update({k: v for k, v in fields.items() if v is not None})
    return model.model_validate(raw)
