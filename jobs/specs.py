"""What a job config names: attacks and defenses by `kind` from a registry with keyword parameters (checked by
building the object, so a typo or an impossible budget fails with the field's name before any work), the
examples an attack with a `limit` takes, and the resources and MLflow store of a job. jobs/config.py builds
the job configs from these; jobs/masking.py derives its check attacks from them.
"""

from __future__ import annotations

import functools
import inspect
import math
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from invgan_core import adaptive, attacks, defenses
from jobs.common import PROJECT_ROOT

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
    fused: bool = Field(
        True,
        description="a shard's attacks and defenses run side by side, their projection steps through the generator "
        "as one batch (same predictions; false: one after the other, each its own batch)",
    )


class Precision(_Strict):
    """Precision-targeted evaluation: after the configured examples, add examples (in each attack's spread order)
    to every attack whose accuracy cells' 95 % Wilson intervals are still wider than `half_width`, until all are
    narrower, the split is used up, or the run has spent `budget_core_hours` (rows' seconds)."""

    half_width: float = Field(gt=0, lt=0.5, description="target half-width of every accuracy cell's 95 % interval")
    budget_core_hours: float = Field(gt=0, description="stop adding examples once the run has spent this much")
    max_rounds: int = Field(8, gt=0, description="rounds of added examples at most")


class MlflowSpec(_Strict):
    experiment: Optional[str] = None  # default: the config family, e.g. 'eval-mnist5k'
    tracking_uri: Optional[str] = None


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
    "eot": _COUNT,
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
