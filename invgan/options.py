"""The command line's options, each declared once, and the commands built from them.

A command function names what it takes; the decorators put the options in its signature, where typer reads them:

    @app.command()
    @shared_options(overrides="steps=200")
    def red(config: Path = typer.Option(...), *, overrides: list[str], limit: int | None, opts: JobOptions): ...

A parameter without a default asks for shared options by its name:
- `opts: JobOptions` gets --out, --address, --tracking-uri, --no-mlflow, --quiet, -v/--verbose (JOB_OPTIONS),
  passed as one jobs.sharded.JobOptions; `overrides` gets --set, `limit` gets --limit, and `verbose` alone gets -v.
- `settings: dict` gets one option per field of a pydantic model (`model_options`): the field's name as
  --kebab-case, its type (a Literal: its choices), its default and its description as help; a required field is
  an argument.

Nothing heavy is imported here: `invgan --help` reads every command's options.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Optional, TypeVar

import typer

F = TypeVar("F", bound=Callable[..., Any])
KW = inspect.Parameter.KEYWORD_ONLY


@dataclass(frozen=True)
class Opt:
    """One option: its flags, type, default and help (rich markup is not applied to it)."""

    flags: tuple[str, ...]
    annotation: Any
    default: Any
    help: str

    def parameter(self, name: str, help: str | None = None) -> inspect.Parameter:
        info = typer.Option(self.default, *self.flags, help=plain(help or self.help))
        return inspect.Parameter(name, KW, default=info, annotation=self.annotation)


# The fields of jobs.sharded.JobOptions as options (--no-mlflow and --quiet negate log_mlflow and progress).
JOB_OPTIONS: dict[str, Opt] = {
    "out": Opt(
        ("--out",),
        Optional[str],
        None,
        "run folder, a path or a URI such as s3://bucket/runs/x [$INVGAN_RUNS/<name>-<config hash>]; rerun to resume",
    ),
    "address": Opt(
        ("--address",), Optional[str], None, "Ray cluster address ('auto' to join a running one); default: local"
    ),
    "tracking_uri": Opt(
        ("--tracking-uri",), Optional[str], None, "MLflow store [$MLFLOW_TRACKING_URI or sqlite in ./runs]"
    ),
    "no_mlflow": Opt(("--no-mlflow",), bool, False, "no MLflow run: write the run folder only"),
    "quiet": Opt(("--quiet",), bool, False, "no progress bar"),
    "verbose": Opt(
        ("--verbose", "-v"), bool, False, "show the traceback of an error, Ray's own logs and the workers' output"
    ),
}
VERBOSE_ALONE = "show the traceback of an error"  # -v of a command without the other job options (no Ray)
# The options of the commands that read a config file.
CONFIG_OPTIONS: dict[str, Opt] = {
    "overrides": Opt(("--set",), list[str], [], "override a config value by dotted path (repeatable), e.g. {example}"),
    "limit": Opt(("--limit",), Optional[int], None, "evaluate only the first N examples"),
}


def plain(text: str) -> str:
    """Help text shown as written: typer's rich markup would take '[runs/<name>]' for a tag and drop it."""
    try:
        from rich.markup import escape
    except ImportError:  # typer without rich prints help as it is
        return text
    return escape(text)


def job_options(values: dict[str, Any]):
    """The JobOptions of the shared options' values (those a command omits keep JobOptions' defaults)."""
    from jobs.sharded import JobOptions

    return JobOptions(
        out=values.get("out"),
        address=values.get("address"),
        tracking_uri=values.get("tracking_uri"),
        log_mlflow=not values.get("no_mlflow", False),
        progress=not values.get("quiet", False),
        verbose=values.get("verbose", False),
    )


def _rewrite(fn: Callable, expand: dict[str, list[inspect.Parameter]], collect: Callable[[dict], dict]) -> Callable:
    """`fn` with each parameter named in `expand` replaced by those parameters; a call passes them to `collect`
    (name -> value), whose result gives `fn` the replaced parameters' values."""
    sig = inspect.signature(fn)
    params: list[inspect.Parameter] = []
    for p in sig.parameters.values():
        params += expand[p.name] if p.name in expand else [p.replace(kind=KW)]
    added = {p.name for name in expand for p in expand[name]}

    @functools.wraps(fn)
    def wrapper(**kwargs: Any) -> Any:
        given = {k: kwargs.pop(k) for k in list(kwargs) if k in added}
        return fn(**kwargs, **collect(given))

    annotations = {k: v for k, v in getattr(fn, "__annotations__", {}).items() if k not in expand}
    wrapper.__annotations__ = annotations | {p.name: p.annotation for p in params if p.name in added}
    wrapper.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    return wrapper


def shared_options(*, omit: tuple[str, ...] = (), overrides: str = "attacks.fgsm.params.eps=0.2", **helps: str):
    """Give the command the shared options its function asks for with a parameter without a default: `opts`
    (JOB_OPTIONS, as one JobOptions, less those in `omit`), `overrides` (--set; the argument is the example of
    its help), `limit` (--limit), or `verbose` alone (-v). `helps` replaces an option's help for this command,
    e.g. out="search folder ..."."""
    unknown = set(helps) - set(JOB_OPTIONS) - set(CONFIG_OPTIONS) | set(omit) - set(JOB_OPTIONS)
    if unknown:
        raise TypeError(f"unknown shared options {sorted(unknown)}")

    def decorate(fn: F) -> F:
        # a parameter of its own (one with a default, e.g. verify's --limit) is left as it is
        names = {n for n, p in inspect.signature(fn).parameters.items() if p.default is inspect.Parameter.empty}
        expand: dict[str, list[inspect.Parameter]] = {}
        if "opts" in names:
            expand["opts"] = [o.parameter(k, helps.get(k)) for k, o in JOB_OPTIONS.items() if k not in omit]
        elif "verbose" in names:
            expand["verbose"] = [JOB_OPTIONS["verbose"].parameter("verbose", helps.get("verbose", VERBOSE_ALONE))]
        if "overrides" in names:
            o = CONFIG_OPTIONS["overrides"]
            expand["overrides"] = [o.parameter("overrides", o.help.format(example=overrides))]
        if "limit" in names:
            expand["limit"] = [CONFIG_OPTIONS["limit"].parameter("limit", helps.get("limit"))]

        def collect(given: dict[str, Any]) -> dict[str, Any]:
            out: dict[str, Any] = {k: given.pop(k) for k in ("overrides", "limit") if k in expand}
            if "opts" in expand:
                out["opts"] = job_options(given)
            elif "verbose" in expand:
                out["verbose"] = given["verbose"]
            return out

        return _rewrite(fn, expand, collect)  # type: ignore[return-value]

    return decorate


def model_options(
    model: Any, *, exclude: tuple[str, ...] = (), notes: Callable[[str], str | None] = lambda field: None
):
    """Give the command one option per field of the pydantic `model` (less `exclude`), passed to its function as
    `settings` (field name -> value): --kebab-case name, the field's type and default, its description as help
    (plus `notes(field)`, e.g. per-kind defaults); a required field is an argument."""

    def parameters() -> list[inspect.Parameter]:
        params = []
        for name, field in model.model_fields.items():
            if name in exclude:
                continue
            text = plain(" ".join(t for t in (field.description, notes(name)) if t))
            if field.is_required():
                info: Any = typer.Argument(..., help=text, show_default=False)
            else:
                info = typer.Option(field.default, help=text)
            params.append(inspect.Parameter(name, KW, default=info, annotation=field.annotation))
        return params

    def decorate(fn: F) -> F:
        return _rewrite(fn, {"settings": parameters()}, lambda given: {"settings": given})  # type: ignore[return-value]

    return decorate
