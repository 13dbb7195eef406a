"""Bad inputs a new user can give (issue #12): each ends in one line naming the file or field and what was
expected, a non-zero exit, no Ray work and no run folder.

The commands run in-process through the real front door (typer's CliRunner): configs, `--set` overrides,
weights folders and datasets are the real ones (digits, mnist5k, shipped weights); where a real loader
cannot produce the bad input (NaN pixels), a dataset is registered that wraps the real one.
"""

from __future__ import annotations

import inspect
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from pydantic import ValidationError
from typer.testing import CliRunner

from invgan.cli import app
from invgan_core import data as data_mod
from jobs.config import ATTACKS, BLACK_BOXES, BUDGETS, NOT_BUDGETS, WRAPPERS, load_config

pytestmark = pytest.mark.reliability(kind="bad_input")
ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "configs" / "smoke.yaml"
RED_SMOKE = ROOT / "configs" / "red_smoke.yaml"
runner = CliRunner()


def _run(tmp_path: Path, command: str, config: Path, *args: str):
    """The command through the front door; returns (exit code, its one-line message)."""
    import ray

    out_dir = tmp_path / "run"
    result = runner.invoke(app, [command, "--config", str(config), "--no-mlflow", "--out", str(out_dir), *args])
    message = str(result.exception) if isinstance(result.exception, SystemExit) else result.output
    assert result.exit_code not in (0, None), result.output
    assert "Traceback" not in result.output, result.output
    assert not out_dir.exists(), "a run folder was left behind"
    assert not ray.is_initialized(), "Ray was started for a bad input"
    return result.exit_code, message.strip()


def _one_line(message: str, *needles: str) -> None:
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message


# ---------------------------------------------------------------- config files and --set


@pytest.mark.parametrize(
    "text, needles",
    [
        ("", ["is empty", "expected a mapping"]),
        ("# only a comment\n", ["is empty"]),
        ("- name\n- smoke\n", ["expected a mapping", "list"]),
        ("name: !!python/object/apply:os.system [echo pwned]\n", ["not valid YAML"]),
    ],
    ids=["empty", "comments-only", "a-list", "python-tag"],
)
def test_a_config_file_that_is_not_a_mapping(tmp_path, text, needles):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    _, message = _run(tmp_path, "eval", path)
    _one_line(message, str(path), *needles)


@pytest.mark.parametrize(
    "config, override, needles",
    [
        (ROOT / "configs" / "curves.yaml", "curves.budgets.0=5", ["'budgets' is a list", "--set curves.budgets=[...]"]),
        (SMOKE, "defenses.invgan.params.steps.0=5", ["'steps' is not a section"]),
        (SMOKE, "name=[unclosed", ["--set 'name=[unclosed'", "not valid YAML"]),
        (SMOKE, "attacks.fgsm.params.eps=!!python/name:os.system", ["not valid YAML"]),
        (SMOKE, "=3", ["empty name in the path"]),
        (SMOKE, "noequals", ["expected dotted.path=value"]),
        (SMOKE, "limit=0", ["limit", "greater than 0"]),
        (SMOKE, "name=../../outside", ["name", "plain folder name"]),
        (SMOKE, "name=/tmp/absolute", ["name", "plain folder name"]),
        (SMOKE, "name=.hidden", ["name", "plain folder name"]),
        (SMOKE, "attacks.fgsm.params.eps=-0.1", ["attacks.fgsm", "eps=-0.1", ">= 0"]),
        (SMOKE, "attacks.bpda.base.params.steps=0", ["attacks.bpda", "steps=0", "whole number >= 1"]),
    ],
    ids=[
        "set-into-list",
        "set-into-scalar",
        "set-bad-yaml",
        "set-python-tag",
        "set-empty-path",
        "set-no-equals",
        "limit-0",
        "name-dotdot",
        "name-absolute",
        "name-hidden",
        "eps-negative",
        "wrapped-steps-0",
    ],
)
def test_a_bad_override_names_the_field(tmp_path, config, override, needles):
    _, message = _run(tmp_path, "eval", config, "--set", override)
    _one_line(message, *needles)


def test_limit_zero_on_the_command_line(tmp_path):
    _, message = _run(tmp_path, "eval", SMOKE, "--limit", "0")
    _one_line(message, "limit", "greater than 0")


def test_red_config_errors_are_one_line_too(tmp_path):
    _, message = _run(tmp_path, "red", RED_SMOKE, "--set", "dictionary.attacks.linf.params.eps=-1")
    _one_line(message, "dictionary.attacks.linf", "eps=-1")


# ---------------------------------------------------------------- attack budgets, table-driven over the registry

BAD_VALUES = {
    "a whole number >= 1": [0, -3, 2.5],
    "a finite number > 0": [0, -0.1, math.nan, math.inf],
    "a finite number >= 0": [-0.1, math.nan, math.inf],
    "a number in [0, 1]": [-0.1, 1.5],
}
REGISTRY = {**ATTACKS, **WRAPPERS, **BLACK_BOXES}


def _spec(kind: str, params: dict) -> dict:
    """An attack entry of the smoke config for any kind: wrappers go through the invgan defense."""
    if kind in WRAPPERS:
        return {"kind": kind, "target": "invgan", "params": params}
    return {"kind": kind, "params": params}


def _budget_cases():
    for kind, cls in REGISTRY.items():
        for name in inspect.signature(cls).parameters:
            if name in BUDGETS:
                for bad in BAD_VALUES[BUDGETS[name]]:
                    yield pytest.param(kind, name, bad, id=f"{kind}-{name}={bad}")


@pytest.mark.parametrize("kind, name, bad", list(_budget_cases()))
def test_every_attack_kind_refuses_an_out_of_range_budget_at_validation(kind, name, bad):
    with pytest.raises(ValidationError) as err:
        load_config(SMOKE, [f"attacks.a={yaml.safe_dump(_spec(kind, {name: bad}), default_flow_style=True).strip()}"])
    text = str(err.value)
    assert "attacks.a" in text and f"attack kind {kind!r}" in text and f"{name}=" in text, text


def test_every_parameter_of_every_attack_kind_has_a_budget_rule():
    """A new attack kind (or a new parameter) without a rule fails here, so the table above covers it."""
    unknown = {
        f"{kind}.{name}"
        for kind, cls in REGISTRY.items()
        for name in inspect.signature(cls).parameters
        if name not in BUDGETS and name not in NOT_BUDGETS
    }
    assert not unknown, f"add these to jobs.config.BUDGETS or NOT_BUDGETS: {sorted(unknown)}"


@pytest.mark.parametrize("kind", list(REGISTRY))
def test_every_attack_kind_accepts_its_defaults_and_its_budget_boundaries(kind):
    defaults = {
        n: p.default
        for n, p in inspect.signature(REGISTRY[kind]).parameters.items()
        if n in BUDGETS and p.default is not inspect.Parameter.empty and p.default is not None
    }
    cfg = load_config(SMOKE, [f"attacks.a={yaml.safe_dump(_spec(kind, defaults), default_flow_style=True).strip()}"])
    assert cfg.attacks["a"].kind == kind
    if "eps" in defaults:  # ε = 0 is a (useless) legal budget: the boundary is not refused
        load_config(SMOKE, [f"attacks.a={yaml.safe_dump(_spec(kind, {'eps': 0.0}), default_flow_style=True).strip()}"])


# ---------------------------------------------------------------- images and weights


def _wrapped(transform):
    def load(split, data_dir=None):
        ds = data_mod.load_digits(split, data_dir)
        return data_mod.Dataset("digits", split, ds.ids, transform(ds.images.clone()), ds.labels, ds.info)

    return load


def _poke(value):
    def transform(images):
        images[3, 0, 2, 2] = value  # one pixel of the 4th example (id of the 4th test image)
        return images

    return transform


@pytest.mark.parametrize(
    "transform, needles",
    [
        (_poke(float("nan")), ["1 image(s) hold NaN or infinite values", "expected float32 NCHW pixels in [0, 1]"]),
        (_poke(float("inf")), ["NaN or infinite values"]),
        (_poke(-float("inf")), ["NaN or infinite values"]),
        (_poke(1.5), ["1 image(s) hold values outside [0, 1]"]),
        (lambda im: im * 255, ["values outside [0, 1]"]),  # pixels in 0..255: a common mistake
        (_poke(-0.2), ["values outside [0, 1]"]),
        (lambda im: im.repeat(1, 3, 1, 1), ["images are 3x8x8", "the models take 1x8x8"]),
        (lambda im: im[:, :, :7, :7].contiguous(), ["images are 1x7x7", "the models take 1x8x8"]),
    ],
    ids=["nan", "inf", "-inf", "above-1", "0-255", "below-0", "3-channels", "7x7"],
)
@pytest.mark.parametrize("command", ["eval", "red"])
def test_images_a_job_cannot_score_are_refused_before_any_work(tmp_path, monkeypatch, transform, needles, command):
    monkeypatch.setitem(data_mod.REGISTRY, "digits-bad", _wrapped(transform))
    config = SMOKE if command == "eval" else RED_SMOKE
    _, message = _run(tmp_path, command, config, "--set", "dataset=digits-bad")
    _one_line(message, "dataset 'digits-bad' (test split)", *needles)


@pytest.mark.parametrize(
    "override, needles",
    [
        ("dataset=mnist5k", ["images are 1x28x28", "the models take 1x8x8"]),
        ("dataset=synthetic-gan", ["images are 1x1x100"]),
    ],
    ids=["mnist5k-on-digits-weights", "synthetic-on-digits-weights"],
)
def test_a_dataset_of_another_image_size_than_the_weights(tmp_path, override, needles):
    _, message = _run(tmp_path, "eval", SMOKE, "--set", override)
    _one_line(message, *needles)


def _idx(path: Path, array: np.ndarray) -> None:
    dims = b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(bytes([0, 0, 0x08, array.ndim]) + dims + array.astype(np.uint8).tobytes())


def test_an_empty_dataset_is_refused(tmp_path):
    """Real, valid IDX files holding zero test images (mnist layout)."""
    folder = tmp_path / "mnist"
    folder.mkdir()
    _idx(folder / "t10k-images-idx3-ubyte", np.zeros((0, 28, 28)))
    _idx(folder / "t10k-labels-idx1-ubyte", np.zeros((0,)))
    _, message = _run(
        tmp_path,
        "eval",
        SMOKE,
        "--set",
        "dataset=mnist",
        "--set",
        f"data_dir={folder}",
        "--set",
        "weights=weights/mnist5k",
    )
    _one_line(message, "dataset 'mnist' (test split)", "no examples")


def test_a_weights_folder_mixing_image_shapes_is_refused(tmp_path):
    weights = tmp_path / "weights"
    weights.mkdir()
    for kind, source in [("generator", "digits"), ("inverter", "digits"), ("classifier", "mnist5k")]:
        for ext in (".json", ".safetensors"):
            shutil.copy(ROOT / "weights" / source / f"{kind}{ext}", weights / f"{kind}{ext}")
    for command, config in [("eval", SMOKE), ("red", RED_SMOKE)]:
        _, message = _run(tmp_path, command, config, "--set", f"weights={weights}")
        _one_line(message, str(weights), "different image shapes", "generator 1x8x8", "classifier 1x28x28")


def test_check_images_accepts_the_shipped_datasets():
    """The checks refuse only what they should: every real test split the shipped weights serve passes."""
    for name, shape in [("digits", (1, 8, 8)), ("mnist5k", (1, 28, 28))]:
        ds = data_mod.load_dataset(name, "test")
        data_mod.check_images(ds, shape)
        assert ds.images.min() >= 0 and ds.images.max() <= 1 and torch.isfinite(ds.images).all()


# ---------------------------------------------------------------- every command, one error path (a real process)

PYTHON_TAG = 'name: !!python/object/apply:os.system ["echo hi"]\n'


@pytest.mark.parametrize(
    "args, needles",
    [
        (["train", "classifier", "--dataset", "nosuch", "--no-mlflow"], ["unknown dataset 'nosuch'", "mnist5k"]),
        (["train", "gan", "--steps", "0"], ["invalid train config", "steps"]),
        (["train", "inverter", "--dataset", "digits", "--generator", "{tmp}/none"], ["missing manifest"]),
        (["tune", "--config", "{tag}"], ["invalid search config", "not valid YAML"]),
        (["tune", "--config", "{tmp}/nope.yaml"], ["nope.yaml", "does not exist"]),
        (["verify", "--dataset", "nosuch"], ["no models in", "shipped weights"]),
        (["eval", "--config", "{tag}", "--no-mlflow"], ["not valid YAML"]),
        (["eval", "--config", str(SMOKE), "--set", "weights={tmp}/none", "--no-mlflow"], ["missing manifest"]),
        (["red", "--config", "{tag}", "--no-mlflow"], ["not valid YAML"]),
        (["curves", "--config", "{tag}", "--no-mlflow"], ["not valid YAML"]),
        (["recovery", "--config", "{tmp}/nope.yaml", "--no-mlflow"], ["nope.yaml", "does not exist"]),
        (["report", "--runs", "{tmp}", "--out", "{tmp}/docs", "--readme", "{tmp}/README.md"], ["{tmp}"]),
    ],
    ids=[
        "train-unknown-dataset",
        "train-steps-0",
        "train-no-generator",
        "tune-python-tag",
        "tune-no-config",
        "verify-unknown-dataset",
        "eval-python-tag",
        "eval-no-weights",
        "red-python-tag",
        "curves-python-tag",
        "recovery-no-config",
        "report-no-runs",
    ],
)
def test_a_user_error_of_any_command_is_one_line_on_stderr(tmp_path, request, args, needles):
    """As a new user sees it: `python -m invgan ...` exits 1 with one line on stderr, no traceback. Three commands
    run as real processes (7 s each, mostly imports); the others through the same front door in this process,
    where the line is the SystemExit's message (Python prints it on stderr and exits 1)."""
    tag = tmp_path / "X.yaml"
    tag.write_text(PYTHON_TAG)
    args = [a.format(tmp=tmp_path, tag=tag) for a in args]
    env = {"INVGAN_RUNS": str(tmp_path / "runs"), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"}
    if args[0] in ("eval", "red", "curves", "recovery", "tune"):
        args += ["--out", str(tmp_path / "run")]
    if request.node.callspec.id in AS_PROCESSES:
        proc = subprocess.run(
            [sys.executable, "-m", "invgan", *args],
            cwd=ROOT,
            env=os.environ | env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        code, output, lines = proc.returncode, proc.stdout + proc.stderr, proc.stderr.strip().splitlines()
    else:
        result = runner.invoke(app, args, env=env)
        message = str(result.exception) if isinstance(result.exception, SystemExit) else result.output
        code, output, lines = result.exit_code, result.output + message, message.strip().splitlines()
    assert code == 1, output
    assert "Traceback" not in output, output
    assert len(lines) == 1, output
    _one_line(lines[0], *(n.format(tmp=tmp_path) for n in needles))
    assert not (tmp_path / "run").exists()


AS_PROCESSES = {"train-unknown-dataset", "tune-python-tag", "eval-no-weights"}
