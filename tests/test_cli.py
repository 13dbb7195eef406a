"""The front door: help text a newcomer can act on, errors that name the problem."""

from __future__ import annotations

from typer.testing import CliRunner

from invgan.cli import app

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
