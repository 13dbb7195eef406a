"""The search config (`invgan tune --config configs/tune/*.yaml`): YAML validated by pydantic before any trial.

A search names a *kind* and a *base* job config, then a *space* of dotted paths into that config:

    kind: defense                      # defense | inverter | red
    base: configs/smoke.yaml           # the eval (defense, inverter) or RED config the trials start from
    space:
      defenses.invgan.params.steps: {randint: {low: 0, high: 50}}
      defenses.invgan.params.lr: {loguniform: {low: 0.005, high: 0.2}}
    objective: {metric: accuracy, defense: invgan, attack: fgsm}

Every path is checked against the base config (it must exist, or be a parameter of the defense it
names), and the base is validated with each bound and choice of every dimension substituted, so a
bad space fails here with the field named instead of in trial 7 of 16. Trials always measure on the
validation split (`val`, carved from the training split), never on the test split.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import math
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from invgan_core.data import load_dataset
from invgan_core.inversion import OPTIMIZERS
from jobs.common import PROJECT_ROOT, check_folder_name
from jobs.config import DEFENSES, EvalConfig, apply_overrides
from jobs.red import RedConfig
from jobs.train import DEFAULTS, TrainConfig
from tuning.space import Dimension, Grid

Kind = Literal["defense", "inverter", "red"]
# what each kind's objective can be; the mode follows from the metric
METRICS = {
    "defense": ("accuracy", "auc"),  # of `defense` under `attack` (clean, an attack of the base, worst_case)
    "inverter": ("t0_accuracy", "latent_error"),  # InvGAN T = 0 on val; mean ||z - I(G(z))||
    "red": ("attack_accuracy", "signal_accuracy"),  # of `method`, mean over the dictionary's attack types
}
MINIMIZED = {"latent_error"}
# inverter trials: the TrainConfig fields a space may search
INVERTER_FIELDS = ("lambda_adv", "lambda_semantic", "lambda_latent", "eta", "lr", "batch_size")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------- the rest of the search


class Objective(_Strict):
    """What a trial is scored by, measured on the validation split.

    defense: `accuracy` or `auc` of `defense` under `attack` ('clean', an attack of the base config,
    or 'worst_case'); `per_second: true` divides by the defense's seconds of projection per example
    (cost-aware). inverter: `t0_accuracy` (InvGAN with T = 0, the encoder alone) or `latent_error`.
    red: `attack_accuracy` or `signal_accuracy` of `method`, averaged over the attack types.
    """

    metric: str = "accuracy"
    defense: Optional[str] = None
    attack: str = "clean"
    per_second: bool = False
    method: str = "bsd_gan"
    tolerance: float = Field(
        default=0.005, ge=0, description="'cheapest within' this much of the best (0.005 = half a point)"
    )

    @property
    def mode(self) -> Literal["min", "max"]:
        return "min" if self.metric in MINIMIZED else "max"

    def label(self) -> str:
        if self.metric in ("accuracy", "auc"):
            return f"{self.metric}{'/s' if self.per_second else ''} {self.defense}/{self.attack}"
        if self.metric in METRICS["red"]:
            return f"{self.metric} {self.method}"
        return self.metric


class SearchAlgorithm(_Strict):
    algorithm: Literal["random", "optuna"] = "random"  # optuna: TPE through Tune's OptunaSearch
    num_samples: int = Field(default=4, gt=0, description="trials (random: draws per grid point)")
    max_concurrent_trials: int = Field(default=2, gt=0)
    seed: int = 0
    include_base: bool = Field(
        default=True, description="first trial: the base config's own values (the point to beat)"
    )


class Scheduler(_Strict):
    kind: Literal["asha", "none"] = "asha"
    grace_period: int = Field(default=1, gt=0, description="reports before ASHA may stop a trial")
    reduction_factor: float = Field(default=2, gt=1)


class TrialResources(_Strict):
    cpus: float = Field(default=1, gt=0, description="CPUs per trial; torch uses that many threads")
    gpus: float = Field(default=0, ge=0)


class Validation(_Strict):
    limit: Optional[int] = Field(default=None, gt=0, description="first N examples of the validation split [all]")
    shard_size: Optional[int] = Field(default=None, gt=0, description="examples per report [the base's shard_size]")


class InverterTraining(_Strict):
    """Fixed TrainConfig fields of every inverter trial (the space adds the searched ones)."""

    steps: int = Field(default=2000, gt=0)
    report_every: int = Field(default=200, gt=0, description="steps between reports (and Tune checkpoints)")
    batch_size: Optional[int] = Field(default=None, gt=0)
    seed: int = 0
    fixed: dict[str, Any] = {}  # any other TrainConfig field, e.g. {lambda_latent: 1.0}


class MlflowSpec(_Strict):
    experiment: Optional[str] = None  # default: tune-<kind>-<dataset>
    tracking_uri: Optional[str] = None


class TuneSearch(_Strict):
    name: str
    kind: Kind
    base: Path
    base_set: dict[str, Any] = {}  # dotted-path overrides of the base, applied before the space
    space: dict[str, Dimension] = Field(min_length=1)
    objective: Objective = Objective()
    search: SearchAlgorithm = SearchAlgorithm()
    scheduler: Scheduler = Scheduler()
    resources: TrialResources = TrialResources()
    validation: Validation = Validation()
    inverter: InverterTraining = InverterTraining()
    mlflow: MlflowSpec = MlflowSpec()

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        return check_folder_name(name)  # it names runs/tune/<name>: no '/', '..' or absolute path

    @field_validator("base")
    @classmethod
    def _exists(cls, base: Path) -> Path:
        path = base if base.is_absolute() or base.exists() else PROJECT_ROOT / base
        if not path.exists():
            raise ValueError(f"base config {base} does not exist")
        return path.resolve()

    @model_validator(mode="after")
    def _consistent(self) -> "TuneSearch":
        obj = self.objective
        if obj.metric not in METRICS[self.kind]:
            raise ValueError(
                f"objective.metric: {obj.metric!r} is not a {self.kind} objective; choose one of "
                f"{', '.join(METRICS[self.kind])}"
            )
        if self.search.algorithm == "optuna":
            grids = [p for p, d in self.space.items() if isinstance(d, Grid)]
            if grids:
                raise ValueError(f"space.{grids[0]}: grid needs search.algorithm 'random' (Optuna draws every value)")
        base = self.base_config()
        _check_objective(self, base)
        for path, dim in self.space.items():
            _check_path(self, base, path, dim)
        return self

    # -- helpers used by the trials and the driver

    def base_raw(self) -> dict:
        raw = _read_mapping(self.base, "base config")
        for path, value in copy.deepcopy(self.base_set).items():  # the trials' set_path must not reach base_set
            set_path(raw, path, value)
        return raw

    def base_config(self):
        """The validated base job config (EvalConfig, or RedConfig for kind red)."""
        try:
            return self.job_model().model_validate(self.base_raw())
        except (ValidationError, ValueError) as err:
            raise ValueError(f"base ({self.base}): {err}") from None

    def job_model(self):
        if self.kind == "red":
            return RedConfig
        return EvalConfig

    @property
    def mode(self) -> str:
        return self.objective.mode

    @property
    def experiment(self) -> str:
        return self.mlflow.experiment or f"tune-{self.kind}-{self.base_config().dataset}"

    def search_hash(self) -> str:
        """sha256 of everything that defines the trials (a rerun with another hash is refused)."""
        payload = self.model_dump(mode="json", exclude={"mlflow"}) | {"base_raw": self.base_raw()}
        payload["search"].pop("max_concurrent_trials")
        payload.pop("resources")
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()

    def base_point(self) -> dict | None:
        """The base config's value of every searched path (defense parameters: the constructor's default),
        or None when one has none."""
        point = {}
        for path in self.space:
            if self.kind == "inverter":
                default = DEFAULTS["inverter"].get(path, TrainConfig.model_fields[path].default)
                value = self.inverter.fixed.get(path, default)
                if path == "eta" and value is None:  # jobs.train's default: 0.03 per-pixel RMS
                    base = self.base_config()
                    shape = load_dataset(base.dataset, "validation", base.data_dir).image_shape
                    value = round(0.03 * math.sqrt(math.prod(shape)), 4)
            else:
                node: Any = self.base_raw()
                found = True
                for key in path.split("."):
                    found = isinstance(node, dict) and key in node
                    node = node[key] if found else None
                    if not found:
                        break
                value = node if found else None
                keys = path.split(".")
                if not found and len(keys) == 4 and keys[0] == "defenses" and keys[2] == "params":
                    kind = self.base_config().defenses[keys[1]].kind
                    value = inspect.signature(DEFENSES[kind]).parameters[keys[3]].default
                elif not found:
                    value = self.job_model().model_fields[path].default if "." not in path else None
            if value is None:
                return None
            point[path] = value
        return point

    def param_space(self) -> dict:
        return {path: dim.to_tune() for path, dim in self.space.items()}


def _check_objective(search: TuneSearch, base) -> None:
    obj = search.objective
    if search.kind == "defense":
        if obj.defense not in base.defenses:
            raise ValueError(
                f"objective.defense: {obj.defense!r} is not a defense of the base config ({', '.join(base.defenses)})"
            )
        if obj.attack not in ("clean", "worst_case", *base.attacks):
            raise ValueError(
                f"objective.attack: {obj.attack!r} is not 'clean', 'worst_case' or an attack of the "
                f"base config ({', '.join(base.attacks)})"
            )
    if search.kind == "red" and obj.method not in base.methods:
        raise ValueError(
            f"objective.method: {obj.method!r} is not a method of the base config ({', '.join(base.methods)})"
        )


def _check_path(search: TuneSearch, base, path: str, dim) -> None:
    """The path exists in the base config (or is a parameter of the defense it names) and every bound or
    choice gives a valid config; raises ValueError starting with `space.<path>`."""
    where = f"space.{path}"
    if search.kind == "inverter":
        if path not in INVERTER_FIELDS:
            raise ValueError(f"{where}: unknown parameter path; an inverter search tunes {', '.join(INVERTER_FIELDS)}")

        for value in dim.corners():
            try:
                TrainConfig(kind="inverter", **{path: value})
            except ValidationError as err:
                raise ValueError(f"{where}: value {value!r}: {err.errors()[0]['msg']}") from None
            if path.startswith("lambda_") and value < 0:
                raise ValueError(f"{where}: value {value!r}: a loss weight must be non-negative")
        return
    keys = path.split(".")
    node, model = search.base_raw(), type(base)
    for depth, key in enumerate(keys[:-1]):
        if not isinstance(node, dict) or key not in node:
            known = ", ".join(node) if isinstance(node, dict) else "none"
            raise ValueError(
                f"{where}: unknown parameter path: {'.'.join(keys[: depth + 1])!r} is not in the base "
                f"config (there: {known})"
            )
        node = node[key]
    leaf = keys[-1]
    if len(keys) == 1 and leaf not in model.model_fields:
        raise ValueError(f"{where}: unknown parameter path: {model.__name__} has no field {leaf!r}")
    if len(keys) > 1 and keys[-2] != "params" and (not isinstance(node, dict) or leaf not in node):
        raise ValueError(f"{where}: unknown parameter path: {leaf!r} is not in the base config")
    if len(keys) == 4 and keys[0] == "defenses" and keys[2] == "params":
        _check_defense_param(where, base.defenses[keys[1]].kind, leaf, dim.corners())
    for value in dim.corners():
        raw = set_path(search.base_raw(), path, value)
        try:
            search.job_model().model_validate(raw)
        except ValidationError as err:
            first = err.errors()[0]
            raise ValueError(f"{where}: value {value!r}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
        except ValueError as err:
            raise ValueError(f"{where}: value {value!r}: {err}") from None


def _check_defense_param(where: str, kind: str, name: str, values: list) -> None:
    """A defense's parameter takes the type of its default: counts (steps, restarts) non-negative
    integers, sizes (lr) positive numbers, names (optimizer) strings."""
    params = inspect.signature(DEFENSES[kind]).parameters
    if name not in params or name in ("G", "inverter", "classifier", "seed"):
        allowed = sorted(set(params) - {"G", "inverter", "classifier", "seed"})
        raise ValueError(
            f"{where}: unknown parameter path: defense kind {kind!r} has no parameter {name!r} "
            f"(allowed: {', '.join(allowed)})"
        )
    default = params[name].default
    for v in values:
        if isinstance(default, int) and not isinstance(default, bool):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{where}: value {v!r}: {name} is a count: give non-negative integers")
        elif isinstance(default, float):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{where}: value {v!r}: {name} must be a positive number")
        elif isinstance(default, str) and not isinstance(v, str):
            raise ValueError(f"{where}: value {v!r}: {name} is a name (e.g. {default!r})")
        elif name == "optimizer":
            if v not in OPTIMIZERS:
                raise ValueError(f"{where}: value {v!r}: unknown optimizer; choose one of {', '.join(OPTIMIZERS)}")


def set_path(raw: dict, path: str, value) -> dict:
    """raw['a']['b']['c'] = value for path 'a.b.c' (dicts created on the way); returns raw."""
    *parents, leaf = path.split(".")
    node = raw
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    return raw


def _read_mapping(path: Path, what: str) -> dict:
    """A YAML file's settings (empty: {}); not valid YAML (e.g. a Python tag, which safe_load refuses) or not a
    mapping raises ValueError naming the file, in one line."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{what} {path}: not valid YAML ({' '.join(str(err).split())[:300]})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{what} {path}: expected a mapping of settings, got a YAML {type(raw).__name__}")
    return raw


def load_search(path: str | Path, overrides: list[str] | None = None) -> TuneSearch:
    """Read and validate a search config; `overrides` are `--set a.b=value` on the search config itself."""
    path = Path(path)
    if not path.exists() and not path.is_absolute() and (PROJECT_ROOT / path).exists():
        path = PROJECT_ROOT / path
    if not path.is_file():
        configs = sorted((PROJECT_ROOT / "configs" / "tune").glob("*.yaml"))
        shipped = ", ".join(str(p.relative_to(PROJECT_ROOT)) for p in configs)
        problem = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"search config {path} {problem} (shipped: {shipped})")
    raw = apply_overrides(_read_mapping(path, "search config"), overrides or [])
    if isinstance(raw.get("base"), str) and not Path(raw["base"]).is_absolute():
        # a base path is relative to the project (configs/...), else to the search config's folder
        candidate = PROJECT_ROOT / raw["base"]
        raw["base"] = str(candidate if candidate.exists() else path.parent / raw["base"])
    return TuneSearch.model_validate(raw)
