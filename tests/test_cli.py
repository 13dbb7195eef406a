"""The front door: help text a newcomer can act on, errors that name the problem."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from invgan.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def test_help_lists_the_subcommands():
    out = runner.invoke(app, ["--help"])
    assert out.exit_code == 0
    for command in ("train", "eval", "verify", "ui"):
        assert command in out.output


def test_train_help_explains_kinds_and_resume():
    out = runner.invoke(app, ["train", "--help"])
    assert out.exit_code == 0
    assert "resumes" in out.output and "inverter" in out.output


def test_unknown_kind_is_rejected_with_the_choices():
    out = runner.invoke(app, ["train", "vae"])
    assert out.exit_code != 0
    assert "gan" in out.output and "classifier" in out.output


def test_eval_reports_a_bad_config_value_by_name(tmp_path):
    out = runner.invoke(
        app,
        [
            "eval",
            "--config",
            "configs/smoke.yaml",
            "--set",
            "attacks.fgsm.params.eps=-1x",
            "--set",
            "shard_size=0",
            "--out",
            str(tmp_path / "run"),
        ],
    )
    assert out.exit_code != 0
    assert "shard_size" in out.output
    assert not (tmp_path / "run").exists()  # nothing started


def test_eval_names_a_missing_config_file(tmp_path):
    out = runner.invoke(app, ["eval", "--config", str(tmp_path / "nope.yaml")])
    assert out.exit_code != 0 and "nope.yaml" in out.output


def test_missing_weights_or_data_end_in_one_line_without_a_run_folder(tmp_path):
    """Checked on the driver before any Ray work: no traceback, no run folder left behind."""
    for command, sets, message in [
        ("eval", ["weights=" + str(tmp_path / "nowhere")], "missing manifest"),
        ("eval", ["dataset=mnist"], "needs a data folder"),
        ("red", ["weights=" + str(tmp_path / "nowhere")], "missing manifest"),
    ]:
        config = "configs/smoke.yaml" if command == "eval" else "configs/red_smoke.yaml"
        args = [command, "--config", config, "--no-mlflow", "--out", str(tmp_path / "run")]
        out = runner.invoke(app, args + [a for s in sets for a in ("--set", s)])
        assert out.exit_code == 1, out.output
        assert message in str(out.exception) or message in out.output
        assert "Traceback" not in out.output and not (tmp_path / "run").exists()


# ---------------------------------------------------------------- options from the models, declared once

JOB_COMMANDS = ["eval", "red", "curves", "recovery", "tune", "train"]


def _params(command: str) -> dict:
    from typer.main import get_command

    return {p.name: p for p in get_command(app).commands[command].params}  # type: ignore[attr-defined]


def test_every_train_config_field_is_an_option_with_the_models_default_and_help():
    """A field added to TrainConfig becomes an option by itself; its default and help live in the model only."""
    from jobs.train_config import TrainConfig

    params = _params("train")
    for name, field in TrainConfig.model_fields.items():
        assert name in params, f"TrainConfig.{name} has no option of `invgan train`"
        assert field.description, f"TrainConfig.{name} has no description for its help"
        if field.is_required():
            assert params[name].required, name
        else:
            assert params[name].default == field.default, (
                f"--{name.replace('_', '-')}: default differs from the model's"
            )
    wrong = runner.invoke(app, ["train", "gan", "--prior", "cauchy"])  # a Literal field: its choices, checked
    assert wrong.exit_code == 2 and "'normal'" in wrong.output and "'uniform'" in wrong.output


def test_train_help_shows_the_per_kind_defaults_of_the_dicts():
    from jobs.train_config import DEFAULTS, GAN_DEFAULTS

    out = runner.invoke(app, ["train", "--help"], terminal_width=400, env={"COLUMNS": "400"})
    assert out.exit_code == 0
    text = " ".join(out.output.split())
    assert f"inverter {DEFAULTS['inverter']['steps']}" in text and f"gan {DEFAULTS['gan']['steps']}" in text
    assert f"{GAN_DEFAULTS['wgan-gp']['n_critic']} (wgan-gp)" in text
    assert "[weights/<dataset>]" in text  # a bracket in a description is shown, not taken for markup


@pytest.mark.parametrize("command", JOB_COMMANDS)
def test_every_job_command_has_the_shared_options(command):
    params = _params(command)
    shared = {"out", "tracking_uri", "no_mlflow", "quiet", "verbose"} | ({"address"} if command != "train" else set())
    assert shared <= set(params), shared - set(params)
    assert "address" not in params or command != "train"
    if command not in ("train",):
        assert "--set" in params["overrides"].opts and "-v" in params["verbose"].opts
    if command in ("eval", "red", "curves"):
        assert "limit" in params


def test_the_shared_options_defaults_are_the_default_job_options():
    from invgan.options import JOB_OPTIONS, job_options
    from jobs.sharded import JobOptions

    assert job_options({name: o.default for name, o in JOB_OPTIONS.items()}) == JobOptions()


def _fake(monkeypatch, module: str, **attrs):
    """Stand in for a job module (its main records how the command called it)."""
    fake = types.ModuleType(module)
    calls: list = []
    fake.__dict__.update({k: v(calls) for k, v in attrs.items()})
    monkeypatch.setitem(sys.modules, module, fake)
    return calls


def _recorder(calls):
    def main(*args, **kwargs):
        calls.append((args, kwargs))

    return main


@pytest.mark.parametrize("command, module", [("eval", "jobs.evaluate"), ("red", "jobs.red"), ("curves", "jobs.curves")])
def test_a_job_command_passes_its_options_to_the_jobs_main(monkeypatch, tmp_path, command, module):
    from jobs.sharded import JobOptions

    calls = _fake(monkeypatch, module, main=_recorder)
    args = ["--config", "c.yaml", "--set", "a=1", "--set", "b=2", "--limit", "3", "--out", str(tmp_path)]
    args += ["--address", "auto", "--tracking-uri", "sqlite:///x.db", "--no-mlflow", "--quiet", "-v"]
    out = runner.invoke(app, [command, *args])
    assert out.exit_code == 0, out.output
    opts = JobOptions(str(tmp_path), "auto", "sqlite:///x.db", log_mlflow=False, progress=False, verbose=True)
    assert calls == [((Path("c.yaml"), ["a=1", "b=2"], opts), {"limit": 3})]


def test_recovery_and_train_get_job_options_too(monkeypatch):
    from jobs.sharded import JobOptions

    calls = _fake(monkeypatch, "jobs.recovery", main=_recorder)
    assert runner.invoke(app, ["recovery", "--tracking-uri", "u", "-v"]).exit_code == 0
    assert calls == [((Path("configs/repro/recovery_digits.yaml"), [], JobOptions(tracking_uri="u", verbose=True)), {})]
    calls = _fake(monkeypatch, "jobs.train", main=_recorder)
    assert runner.invoke(app, ["train", "gan", "--prior", "uniform", "--out", "w", "--quiet"]).exit_code == 0
    (settings, opts), _ = calls[0]
    assert settings["kind"] == "gan" and settings["prior"] == "uniform" and settings["steps"] is None
    assert "out" not in settings and opts == JobOptions(out="w", progress=False)


# ---------------------------------------------------------------- one error path


def _one_line_exit(out, *needles: str) -> str:
    """A user error: exit code 1, one line (the SystemExit's message, printed on stderr), no traceback."""
    assert out.exit_code == 1, out.output
    assert isinstance(out.exception, SystemExit), repr(out.exception)
    message = str(out.exception)
    assert "\n" not in message and "Traceback" not in out.output, message
    for needle in needles:
        assert needle in message, message
    return message


def test_train_with_an_unknown_dataset_or_a_bad_option_ends_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("INVGAN_RUNS", str(tmp_path / "runs"))
    base = ["train", "classifier", "--no-mlflow", "--out", str(tmp_path / "w"), "--device", "cpu"]
    _one_line_exit(runner.invoke(app, [*base, "--dataset", "nosuch"]), "unknown dataset 'nosuch'", "digits")
    _one_line_exit(runner.invoke(app, [*base, "--steps", "0"]), "steps", "greater than 0")
    _one_line_exit(
        runner.invoke(app, ["train", "inverter", "--dataset", "digits", "--generator", str(tmp_path / "none")]),
        "missing manifest",
    )
    assert not (tmp_path / "w").exists()


def test_verbose_shows_the_traceback(monkeypatch, tmp_path):
    monkeypatch.setenv("INVGAN_RUNS", str(tmp_path / "runs"))
    out = runner.invoke(app, ["train", "classifier", "--dataset", "nosuch", "--no-mlflow", "--device", "cpu", "-v"])
    from invgan_core.data import DataError

    assert out.exit_code == 1 and isinstance(out.exception, DataError)


@pytest.mark.parametrize(
    "text, needles",
    [
        ('name: !!python/object/apply:os.system ["echo hi"]\n', ["not valid YAML", "X.yaml"]),
        ("- a\n- b\n", ["expected a mapping", "list"]),
    ],
    ids=["python-tag", "a-list"],
)
def test_tune_with_a_config_that_is_not_a_mapping_ends_in_one_line(tmp_path, text, needles):
    import ray

    path = tmp_path / "X.yaml"
    path.write_text(text)
    out = runner.invoke(app, ["tune", "--config", str(path), "--out", str(tmp_path / "out"), "--set", "a.b=1"])
    _one_line_exit(out, "invalid search config", *needles)
    assert not ray.is_initialized() and not (tmp_path / "out").exists()


def test_tune_with_a_missing_config_or_a_python_tag_in_its_base_ends_in_one_line(tmp_path):
    _one_line_exit(runner.invoke(app, ["tune", "--config", str(tmp_path / "nope.yaml")]), "nope.yaml", "does not exist")
    base = tmp_path / "base.yaml"
    base.write_text("name: !!python/name:os.system\n")
    search = yaml.safe_load((ROOT / "configs" / "tune" / "smoke.yaml").read_text()) | {"base": str(base)}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(search))
    _one_line_exit(runner.invoke(app, ["tune", "--config", str(tmp_path / "s.yaml")]), str(base), "not valid YAML")


def test_verify_without_models_ends_in_one_line(tmp_path):
    _one_line_exit(runner.invoke(app, ["verify", "--dataset", "nosuch"]), "weights/nosuch", "digits", "mnist5k")
    _one_line_exit(runner.invoke(app, ["verify", "--weights", str(tmp_path)]), str(tmp_path), "--weights")


def test_the_reports_own_exit_passes_unchanged(monkeypatch, tmp_path):
    """`invgan report` with no runs: the report's own one-line SystemExit reaches the user as it is."""

    def build_report(calls):
        def build(out, *, runs=None, readme=None):
            raise SystemExit(f"no runs in {runs}: run the configs of configs/repro/ first")

        return build

    _fake(monkeypatch, "jobs.paper_report", build_report=build_report)
    out = runner.invoke(app, ["report", "--runs", str(tmp_path), "--out", str(tmp_path / "docs")])
    assert _one_line_exit(out) == f"no runs in {tmp_path}: run the configs of configs/repro/ first"
