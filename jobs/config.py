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

import functools
import hashlib
import inspect
import json
import math
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional, TypeVar, overload

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from invgan_core import adaptive, attacks, defenses
from jobs.common import PROJECT_ROOT, check_folder_name

ATTACKS = {
    "fgsm": attacks.FGSM,
    "pgd_linf": attacks.LinfPGD,
    "pgd_l2": attacks.L2PGD,
    "pgd_l1": attacks.L1PGD,
    "cw": attacks.CarliniWagnerL2,
    "sign_cw": adaptive.SignCW,
}
WRAPPERS = {
    "bpda": adaptive.BPDA,
    "rp": adaptive.Reparameterization,
    "unrolled": adaptive.Unrolled,
    "nes": adaptive.NES,
}
# black boxes trained against an oracle (the classifier, a defense, or `each` defense): the evaluation trains
# them once on the driver, before the shards (see jobs/evaluate.py: prepare_substitutes)
BLACK_BOXES = {"substitute": adaptive.Substitute}
DEFENSES: dict[str, type[defenses.Defense]] = {
    "none": defenses.NoDefense,
    "defensegan": defenses.DefenseGAN,
    "invgan": defenses.InvGAN,
    "clipped": defenses.ClippedProjection,
}
RESERVED = {"clean", "worst_case"}  # attack names the results use themselves


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AttackSpec(_Strict):
    kind: str
    target: str = "classifier"
    limit: Optional[int] = Field(
        None, gt=0, description="only N examples (costly attacks), spread evenly over the split: see attacked_positions"
    )
    params: dict[str, Any] = {}
    base: Optional["AttackSpec"] = None  # the loop of a wrapper (bpda, rp, unrolled, nes)

    @model_validator(mode="after")
    def _buildable(self) -> "AttackSpec":
        self.build()
        return self

    def build(self, seed: int | None = None):
        """The attack object; raises ValueError naming the kind and the bad parameter. `seed` (the run's)
        goes to attacks that draw random numbers, unless the config sets their own."""
        if self.kind in WRAPPERS:
            inner = self.base.build(seed) if self.base else None
            return _construct(WRAPPERS[self.kind], self.params | ({"attack": inner} if inner else {}), self.kind, seed)
        known = {**ATTACKS, **BLACK_BOXES}
        if self.kind not in known:
            raise ValueError(f"unknown attack kind {self.kind!r}; choose one of {', '.join([*known, *WRAPPERS])}")
        if self.base is not None:
            raise ValueError(f"attack kind {self.kind!r} takes no `base`")
        return _construct(known[self.kind], self.params, self.kind, seed)


_GOLDEN = 2654435769  # round(2^32 / φ): Fibonacci hashing's multiplier


@functools.lru_cache(maxsize=256)
def attacked_positions(limit: int | None, n: int) -> tuple[int, ...]:
    """The positions (0..n-1, sorted) of the n examples that an attack with `limit` runs on: all without one;
    else the first `limit` distinct values of ⌊n·frac(j/φ)⌋, j = 0, 1, 2, ... (the golden-ratio sequence, in
    integers). They are spread evenly over the split for every limit (each stretch of the split gets its share
    ±1-2), so the costly examples fall into every shard and workers finish together; and nested, so a smaller
    limit's examples are among a larger one's (the masking checks pair attacks on common examples). They depend
    on n alone: never on shard size, workers or order."""
    if limit is None or limit >= n:
        return tuple(range(n))
    seen: dict[int, None] = {}
    j = 0
    while len(seen) < limit:  # the sequence fills every bin within ~3n terms (three-gap theorem)
        seen.setdefault((j * _GOLDEN % (1 << 32)) * n >> 32, None)
        j += 1
    return tuple(sorted(seen))


def examples_in_shard(spec: AttackSpec, start: int, stop: int, n: int) -> list[int]:
    """Offsets (0..stop-start-1) of the shard's examples the attack runs on, of a split of n examples."""
    return [p - start for p in attacked_positions(spec.limit, n) if start <= p < stop]


class DefenseSpec(_Strict):
    kind: str
    params: dict[str, Any] = {}
    inverter: Optional[Path] = Field(
        None,
        description="kind invgan: an inverter other than the weights folder's, as a stem (folder/inverter, "
        "relative to the project root), for ablations such as InvGAN Table 5; hash-verified like every model",
    )

    def inverter_stem(self) -> Path | None:
        if self.inverter is None:
            return None
        return self.inverter if self.inverter.is_absolute() else PROJECT_ROOT / self.inverter

    @model_validator(mode="after")
    def _known(self) -> "DefenseSpec":
        if self.kind not in DEFENSES:
            raise ValueError(f"unknown defense kind {self.kind!r}; choose one of {', '.join(DEFENSES)}")
        allowed = set(inspect.signature(DEFENSES[self.kind]).parameters) - {"G", "inverter", "classifier", "seed"}
        if self.inverter is not None and self.kind != "invgan":
            raise ValueError(f"defense kind {self.kind!r} has no inverter; `inverter` is for kind 'invgan'")
        unknown = set(self.params) - allowed
        if unknown:
            raise ValueError(f"defense kind {self.kind!r}: unknown params {sorted(unknown)}; allowed {sorted(allowed)}")
        try:  # the same checks the defense's constructor makes, before any model is loaded or Ray started
            DEFENSES[self.kind].check_params(self.params)
        except ValueError as err:
            raise ValueError(f"defense kind {self.kind!r}: {err}") from None
        return self


class Resources(_Strict):
    num_workers: int = Field(2, gt=0, description="evaluation actors")
    num_cpus_per_worker: float = Field(1, gt=0)
    num_gpus_per_worker: float = Field(0, ge=0)
    torch_threads: Optional[int] = Field(None, gt=0, description="default: the worker's CPUs")


class MlflowSpec(_Strict):
    experiment: Optional[str] = None  # default: the config family, e.g. 'eval-mnist5k'
    tracking_uri: Optional[str] = None


class CurvesSpec(_Strict):
    """Runtime versus iterations (InvGAN Sec. 4.3, Fig. 4): each projection defense at each budget of
    effective iterations (restarts x steps). InvGAN: 1 restart, T = budget; Defense-GAN: `restarts`
    restarts of budget / restarts steps."""

    budgets: list[int] = [0, 10, 25, 50, 100, 200, 500]
    defenses: list[Literal["invgan", "defensegan"]] = ["invgan", "defensegan"]
    restarts: int = Field(10, gt=0, description="Defense-GAN restarts at every budget")
    lr: float = Field(0.05, gt=0)

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
        payload = self.model_dump(mode="json", exclude={"resources", "mlflow"})
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
        from jobs.masking import CHECK_PREFIX, expand_checks

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


# Attack budgets, checked by parameter name for every kind of ATTACKS and WRAPPERS before the attack is built
# (tests/reliability checks that every parameter of every registered kind is in one of these two tables).
_COUNT, _POSITIVE, _NON_NEGATIVE = "a whole number >= 1", "a finite number > 0", "a finite number >= 0"
BUDGETS = {
    "eps": _NON_NEGATIVE,
    "confidence": _NON_NEGATIVE,
    "steps": _COUNT,
    "binary_search_steps": _COUNT,
    "samples": _COUNT,
    "unroll_steps": _COUNT,
    "warm_steps": _COUNT,
    "restarts": _COUNT,
    "seeds": _COUNT,
    "rounds": _COUNT,
    "epochs": _COUNT,
    "rel_stepsize": _POSITIVE,
    "abs_stepsize": _POSITIVE,
    "lr": _POSITIVE,
    "eta": _POSITIVE,
    "unroll_lr": _POSITIVE,
    "sigma": _POSITIVE,
    "initial_const": _POSITIVE,
    "lam": _NON_NEGATIVE,
    "quantile": "a number in [0, 1]",
}
NOT_BUDGETS = {"seed", "attack", "loss", "random_start", "abort_early", "warm_start", "substitute", "seed_images"}


def check_budget(kind: str, params: dict) -> None:
    """Refuse an attack budget no attack can run (ε < 0, steps <= 0, σ <= 0, ...): ValueError naming it."""
    for key, value in params.items():
        rule = BUDGETS.get(key)
        if rule is None or (key == "abs_stepsize" and value is None):
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = (
            number
            and math.isfinite(value)
            and {
                _COUNT: isinstance(value, int) and value >= 1,
                _POSITIVE: value > 0,
                _NON_NEGATIVE: value >= 0,
            }.get(rule, 0 <= value <= 1)
        )
        if not ok:
            raise ValueError(f"attack kind {kind!r}: {key}={value!r}: give {rule}")


def _construct(cls, params: dict, kind: str, seed: int | None = None):
    check_budget(kind, params)
    if seed is not None and "seed" in inspect.signature(cls).parameters:
        params = {"seed": seed} | params
    try:
        return cls(**params)
    except TypeError as err:
        raise ValueError(f"attack kind {kind!r}: {err}") from err


def describe_error(err: Exception) -> str:
    """A config error as one line per problem, each naming its field: `defenses.invgan: steps=-5: ...`
    (pydantic's own text spreads one problem over three lines with a link)."""
    from pydantic import ValidationError

    if not isinstance(err, ValidationError):
        return str(err)
    problems = []
    for e in err.errors():
        where = ".".join(str(part) for part in e["loc"]) or "config"
        message = e["msg"].removeprefix("Value error, ")
        problems.append(f"{where}: {message}")
    return "; ".join(problems)


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
