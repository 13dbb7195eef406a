"""configs/repro/paper_numbers.yaml, typed: what `invgan report` builds, one entry per section of docs/results.md.

    <key>:                  # the section's anchor, and its figure's name (docs/figures/<key>.png)
      kind: eval            # which job's run it reads: eval (when omitted), curves, red, distortion,
                            # red_theory or recovery; each kind is a model below with its own fields
      config: table2.yaml   # that job's config, relative to configs/repro/
      title: ...            # the heading; source: the paper's table or figure; notes: why ours differ
      paper: ...            # the paper's numbers, in the shape of the table

A field a kind does not have is refused (a misspelt `colums:` would otherwise drop the table's columns
unnoticed), and `load_paper_numbers` names the table and the field of every problem in one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import Field, TypeAdapter, ValidationError, field_validator, model_validator

from jobs.common import PROJECT_ROOT, check_folder_name
from jobs.config import _Strict, describe_error

REPRO_DIR = PROJECT_ROOT / "configs" / "repro"
PAPER_NUMBERS = REPRO_DIR / "paper_numbers.yaml"
RESULTS_DIR = PROJECT_ROOT / "results"  # the tracked run folders docs/results.md is generated from

Metric = Literal["accuracy", "auc", "mse"]
Attacks = Annotated[list[str], Field(min_length=1)]
Numbers = dict[str, dict[str, float]]  # a row of the table (defense, method, clipping) -> its column -> number


class BaseTable(_Strict):
    """What every section has: a heading, where the paper's numbers come from, and why ours differ."""

    title: str
    source: str = Field(description="the paper, and which of its tables or figures")
    notes: str = Field("", description="printed under the table")
    headline: bool = Field(False, description="also write this section into the README's headline block")


class Setting(_Strict):
    """One setting of a paper's protocol: the paper's value, and where the paper says so."""

    paper: Any
    source: str = Field("", description="where the paper says so, e.g. 'eq. 6' or 'Sec. 4'")


class ConfigTable(BaseTable):
    """A section read from the run folder of one config."""

    config: Path = Field(description="the job's config, relative to configs/repro/ (an absolute path stays as it is)")
    protocol: dict[str, Setting] = Field(
        {},
        description="the paper's protocol, setting by setting: a dotted path into the config (with the defaults "
        "it leaves out), e.g. defenses.invgan.params.optimizer, or into a weights manifest, e.g. "
        "weights.inverter.training.steps -> the paper's value (or {paper: value, source: where}); the report "
        "lists every setting where ours differs as a Deviation",
    )

    @field_validator("protocol", mode="before")
    @classmethod
    def _plain_values(cls, protocol: Any) -> Any:
        if not isinstance(protocol, dict):
            return protocol
        return {k: v if isinstance(v, dict) and "paper" in v else {"paper": v} for k, v in protocol.items()}


class Comparison(_Strict):
    """The paired verdict of one defense against another on the same examples (`paired_comparison`)."""

    cheap: str = Field(description="the defense set against the reference, e.g. InvGAN at 1/10 of its iterations")
    reference: str


class Versus(_Strict):
    """Every cell set against the same cell (defense, column) of another config's run, on the same examples
    (`versus_lines`): an ablation that changes one setting, e.g. the projection optimiser."""

    config: Path = Field(description="the other run's config, as `config`")
    label: str = Field(description="what the other run is, e.g. 'gradient descent'")


class EvalTable(ConfigTable):
    """An `invgan eval` run (InvGAN Tables 2, 3, 5): defenses x the paper's columns."""

    kind: Literal["eval"] = "eval"
    metric: Metric = "accuracy"
    columns: dict[str, Attacks] = Field(
        description="the paper's column -> our attack(s); several: an example counts as correct only if it "
        "survives every one of them"
    )
    column_metrics: dict[str, Metric] = Field({}, description="a column whose metric is not the table's")
    paper: Numbers = Field({}, description="defense -> column -> the paper's number")
    compare: Comparison | None = None
    versus: Versus | None = None
    also: list[Path] = Field([], description="more configs (as `config`) whose runs on the same examples add attacks")
    convergence: str | None = Field(None, description="a first-success attack: its accuracy after k steps")

    @model_validator(mode="after")
    def _known_columns(self) -> EvalTable:
        for name, used in (
            ("column_metrics", set(self.column_metrics)),
            ("paper", {c for r in self.paper.values() for c in r}),
        ):
            unknown = sorted(used - set(self.columns))
            if unknown:
                raise ValueError(f"{name}: {unknown} are not columns of the table ({', '.join(self.columns)})")
        return self

    def metric_of(self, column: str) -> Metric:
        return self.column_metrics.get(column, self.metric)


class CurvesTable(ConfigTable):
    """An `invgan curves` run (InvGAN Fig. 4): accuracy and seconds per effective iterations."""

    kind: Literal["curves"]
    cheap: str = Field("invgan", description="the fewest effective iterations at which it reaches ...")
    reference: str = Field("defensegan", description="... this defense's accuracy at its largest budget")


class RedPaperNumbers(_Strict):
    signal_accuracy: Numbers = Field({}, description="method -> the input's attack -> accuracy")
    attack_accuracy: Numbers = Field({}, description="method -> the input's attack -> attack-type accuracy")


class RedTable(ConfigTable):
    """An `invgan red` run (RED Table 1)."""

    kind: Literal["red"]
    paper: RedPaperNumbers = RedPaperNumbers()


class DistortionTable(ConfigTable):
    """Accuracy vs ℓ2 distortion of minimum-distortion attacks (Chen, Xie & Zhu Fig. 1), from an eval run."""

    kind: Literal["distortion"]
    attacks: Attacks = Field(description="the attacks plotted, one line each")
    table_eps: list[float] = Field([1.0, 2.0, 3.0], min_length=1, description="the ℓ2 budgets of the table")
    max_eps: float = Field(5.0, gt=0, description="the figure's largest ℓ2 budget")


class RedTheoryTable(BaseTable):
    """`invgan red-theory`'s numbers and figures (RED Fig. 1 and linear convergence)."""

    kind: Literal["red_theory"]
    folder: str = Field("red-theory", description="its folder under the runs folder")

    @field_validator("folder")
    @classmethod
    def _plain_folder(cls, folder: str) -> str:
        return check_folder_name(folder)


class RecoveryPaperNumbers(_Strict):
    table1: Numbers = Field({}, description="clipping -> 'ε = <threshold>' -> fraction of trials recovered")
    table2: dict[str, float] = Field({}, description="clipping -> mean pairwise distance of the recoveries")


class RecoveryTable(ConfigTable):
    """An `invgan recovery` run (Lipton & Tripathi Tables 1-2)."""

    kind: Literal["recovery"]
    paper: RecoveryPaperNumbers = RecoveryPaperNumbers()


Table = Union[EvalTable, CurvesTable, RedTable, DistortionTable, RedTheoryTable, RecoveryTable]
# `kind:` -> its model, each validating {key: table} so that a problem's location starts with the table's key
_KINDS: dict[str, TypeAdapter[Any]] = {
    "eval": TypeAdapter(dict[str, EvalTable]),
    "curves": TypeAdapter(dict[str, CurvesTable]),
    "red": TypeAdapter(dict[str, RedTable]),
    "distortion": TypeAdapter(dict[str, DistortionTable]),
    "red_theory": TypeAdapter(dict[str, RedTheoryTable]),
    "recovery": TypeAdapter(dict[str, RecoveryTable]),
}


def load_paper_numbers(path: Path) -> dict[str, Table]:
    """The sections of a paper-numbers file, in the file's order; ValueError naming the table and the field
    of every problem (`table3_mnist.columns: Field required; ...`)."""
    try:
        raw = yaml.safe_load(path.read_text())  # safe: a Python tag is refused here
    except yaml.YAMLError as err:
        raise ValueError(f"not valid YAML ({' '.join(str(err).split())[:300]})") from None
    if raw is None:
        raise ValueError("the file is empty; expected a mapping of tables (key: {kind: ..., title: ...})")
    if not isinstance(raw, dict):
        raise ValueError(
            f"expected a mapping of tables (key: {{kind: ..., title: ...}}), got a YAML {type(raw).__name__}"
        )
    tables: dict[str, Table] = {}
    problems = []
    for key, table in raw.items():
        if not isinstance(table, dict):
            problems.append(f"{key}: expected the table's fields (title: ..., ...), got a YAML {type(table).__name__}")
            continue
        kind = table.get("kind", "eval")
        if not isinstance(kind, str) or kind not in _KINDS:
            problems.append(f"{key}.kind: {kind!r} is not a kind of table; choose one of {', '.join(_KINDS)}")
            continue
        try:
            tables |= _KINDS[kind].validate_python({key: table})
        except ValidationError as err:
            problems.append(describe_error(err))
    if problems:
        raise ValueError("; ".join(problems))
    return tables


def tables_fed_by(config_name: str, path: Path = PAPER_NUMBERS) -> list[str]:
    """The sections of docs/results.md (as markdown links) whose runs include the job config named
    `config_name`: what an MLflow run's description says it feeds. Empty for a config no section reads."""
    if not path.exists():
        return []
    fed = []
    for key, spec in load_paper_numbers(path).items():
        configs = [spec.config, *getattr(spec, "also", [])] if isinstance(spec, ConfigTable) else []
        names = {
            (yaml.safe_load((REPRO_DIR / c).read_text()) or {}).get("name") for c in configs if (REPRO_DIR / c).exists()
        }
        if config_name in names:
            fed.append(f"[{spec.title}](docs/results.md#{key})")
    return fed
