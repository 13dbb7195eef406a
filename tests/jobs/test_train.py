"""Training jobs: real Accelerate loops on real data, a real MLflow store, real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from invgan_core.checkpoint import load_model
from invgan_core.data import load_dataset
from invgan_core.training import accuracy
from jobs.sharded import JobOptions, JobResult
from jobs.train import TrainConfig, main, run

ROOT = Path(__file__).resolve().parents[2]


def _cfg(tmp_path: Path, **kw) -> TrainConfig:
    base = dict(
        kind="classifier",
        dataset="digits",
        out=tmp_path / "w",
        work_dir=tmp_path / "work",
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        quiet=True,
        device="cpu",
    )
    return TrainConfig.model_validate(base | kw)


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.state_dict().values() if p.is_floating_point()])


def test_digits_classifier_reaches_090_and_logs_to_mlflow(tmp_path, capsys):
    """Through the command's entry (jobs.train.main): a JobResult, the lines it prints, the MLflow run."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    settings = {"kind": "classifier", "dataset": "digits", "work_dir": tmp_path / "work", "device": "cpu"}
    result = main(settings, JobOptions(out=tmp_path / "w", tracking_uri=uri, progress=False))
    assert isinstance(result, JobResult) and result.run_dir == tmp_path / "work" and result.rows.empty
    summary = result.summary
    assert summary["finished"] and summary["metrics"]["test_accuracy"] >= 0.9
    assert summary["files"] == [str(tmp_path / "w" / "classifier")] and summary["step"] > 0
    printed = capsys.readouterr().out
    assert f"finished at step {summary['step']}" in printed and f"run folder: {tmp_path / 'work'}" in printed
    assert f"MLflow run {result.mlflow_run_id}" in printed
    # the saved file reproduces the recorded accuracy
    f, manifest = load_model(tmp_path / "w" / "classifier", kind="classifier")
    test = load_dataset("digits", "test")
    assert accuracy(f, test.images, test.labels) == pytest.approx(manifest["metrics"]["test_accuracy"])
    assert manifest["dataset"] == "digits" and manifest["training"]["lr"] == 0.1
    client = MlflowClient(uri)
    run_info = client.get_run(result.mlflow_run_id)
    assert run_info.data.metrics["test/test_accuracy"] == pytest.approx(summary["metrics"]["test_accuracy"])
    assert len(client.get_metric_history(result.mlflow_run_id, "train/loss")) >= 5
    # the weights are the run's logged model: the two files, the manifest's sha256 as a tag
    (logged,) = client.search_logged_models(experiment_ids=[run_info.info.experiment_id])
    assert logged.source_run_id == result.mlflow_run_id and logged.tags["sha256"] == manifest["sha256"]
    files = {a.path for a in client.list_logged_model_artifacts(logged.model_id)}
    assert files == {"classifier.safetensors", "classifier.json"}


def test_main_without_mlflow_and_a_stopped_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'never.db'}")
    settings = {"kind": "classifier", "steps": 10, "work_dir": tmp_path / "work", "device": "cpu"}
    result = main(settings, JobOptions(out=tmp_path / "w", log_mlflow=False, progress=False))
    assert result.mlflow_run_id is None and result.summary["finished"] and not (tmp_path / "never.db").exists()
    assert "MLflow run" not in capsys.readouterr().out


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    straight = run(_cfg(tmp_path / "a", steps=40, checkpoint_every=20))
    first = run(_cfg(tmp_path / "b", steps=20, checkpoint_every=20))  # "killed" after 20 steps
    resumed = run(_cfg(tmp_path / "b", steps=40, checkpoint_every=20))
    assert first["step"] == 20 and resumed["step"] == 40
    assert resumed["mlflow_run_id"] == first["mlflow_run_id"]  # one MLflow run, continued
    torch.testing.assert_close(_flat(resumed["models"][0]), _flat(straight["models"][0]), rtol=0, atol=0)


def test_resume_with_a_different_config_is_refused(tmp_path):
    run(_cfg(tmp_path, steps=10, checkpoint_every=10))
    with pytest.raises(SystemExit, match="different config"):
        run(_cfg(tmp_path, steps=20, lr=0.05))


def test_killed_process_resumes_from_its_last_saved_state(tmp_path):
    """SIGKILL the CLI mid-training; the rerun starts from the saved step and finishes."""
    env = os.environ | {"INVGAN_RUNS": str(tmp_path / "runs"), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "invgan",
        "train",
        "classifier",
        "--dataset",
        "digits",
        "--steps",
        "3000",
        "--checkpoint-every",
        "25",
        "--out",
        str(tmp_path / "w"),
        "--work-dir",
        str(tmp_path / "work"),
        "--quiet",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    progress = tmp_path / "work" / "state" / "progress.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (progress.exists() and json.loads(progress.read_text())["step"] >= 50):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = json.loads(progress.read_text())["step"]
    assert 50 <= saved < 3000
    cmd[cmd.index("3000")] = str(saved + 25)
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"resuming from step {saved}" in out.stdout
    assert f"finished at step {saved + 25}" in out.stdout


def _ddp_worker(tmp: str) -> None:
    """Runs inside each of 2 processes started by accelerate.debug_launcher."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # forked from a parent that used Accelerate already
    acc = Accelerator(cpu=True)
    cfg = _cfg(Path(tmp) / "ddp", steps=6, checkpoint_every=3, batch_size=64)
    result = run(cfg, accelerator=acc)
    torch.save(_flat(result["models"][0]), Path(tmp) / f"rank{acc.process_index}.pt")


def test_two_processes_end_with_identical_weights_equal_to_one_process(tmp_path):
    # a fresh interpreter forks the two workers: forking this pytest process, which may hold Ray's or
    # MLflow's threads from earlier tests, can deadlock the children
    script = (
        "from accelerate import debug_launcher; from tests.jobs.test_train import _ddp_worker; "
        f"debug_launcher(_ddp_worker, args=({str(tmp_path)!r},), num_processes=2)"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ | {"OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "rank1.pt").exists(), "the second process did not run as rank 1"
    w0, w1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    torch.testing.assert_close(w0, w1, rtol=0, atol=0)
    # DDP averages the two half-batch gradients: the same update as one process on the whole batch
    single = run(_cfg(tmp_path / "single", steps=6, checkpoint_every=3, batch_size=64))
    torch.testing.assert_close(w0, _flat(single["models"][0]), rtol=1e-4, atol=1e-5)


def test_bad_config_fails_before_any_work(tmp_path):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="batch_size"):
        _cfg(tmp_path, batch_size=0)
    with pytest.raises(ValidationError, match="gan_los"):
        _cfg(tmp_path, kind="gan", gan_loss="hinge")
    assert not (tmp_path / "work").exists()


def test_a_kill_between_the_two_renames_of_a_save_resumes_from_the_previous_state(tmp_path):
    run(_cfg(tmp_path, steps=20, checkpoint_every=10))
    work = tmp_path / "work"
    (work / "state").rename(work / "state.old")  # as if killed after `state -> state.old`, before `tmp -> state`
    resumed = run(_cfg(tmp_path, steps=30, checkpoint_every=10))
    straight = run(_cfg(tmp_path / "straight", steps=30, checkpoint_every=10))
    assert resumed["step"] == 30 and not (work / "state.old").exists()
    torch.testing.assert_close(_flat(resumed["models"][0]), _flat(straight["models"][0]), rtol=0, atol=0)


@pytest.mark.parametrize("raised, status", [(ValueError("bad batch"), "FAILED"), (KeyboardInterrupt(), "KILLED")])
def test_training_run_is_running_while_it_trains_and_ends_with_its_fate(tmp_path, raised, status):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    seen = {}

    def on_checkpoint(step, models, metrics):
        import mlflow

        seen["status"] = client.get_run(mlflow.active_run().info.run_id).info.status
        seen["run_id"] = mlflow.active_run().info.run_id
        raise raised

    with pytest.raises(type(raised)):
        run(_cfg(tmp_path, steps=4, checkpoint_every=2), on_checkpoint=on_checkpoint)
    assert seen["status"] == "RUNNING"
    ended = client.get_run(seen["run_id"])
    assert ended.info.status == status and type(raised).__name__ in ended.data.tags["error"]


def test_the_inverter_stopping_rule_stops_keeps_the_best_check_and_records_its_curve(tmp_path):
    """With a learning rate too small to change anything, no check after the first improves: training stops
    after `patience` more checks, the saved inverter is the best check's (its latent error recomputed from the
    saved file equals the curve's), and the manifest holds the rule, the curve and both steps. A rerun trains no
    further."""
    import json

    from invgan_core.checkpoint import load_model
    from invgan_core.models import sample_prior

    digits = ROOT / "weights" / "digits"
    kw = dict(
        kind="inverter",
        generator=digits / "generator",
        classifier=digits / "classifier",
        steps=200,
        lr=1e-12,
        patience=2,
        eval_every=10,
        checkpoint_every=10,
    )
    result = run(_cfg(tmp_path, **kw))
    assert result["step"] == 30 and result["finished"]  # checks at 10 (best), 20, 30: two without improving
    manifest = json.loads((tmp_path / "w" / "inverter.json").read_text())
    stopping = manifest["stopping"]
    assert stopping["best_step"] == 10 and stopping["stopped_at"] == 30
    assert [c["step"] for c in stopping["curve"]] == [10, 20, 30] and "2 checks" in stopping["rule"]
    I, _ = load_model(tmp_path / "w" / "inverter", kind="inverter")
    G, _ = load_model(digits / "generator", kind="generator")
    with torch.no_grad():
        z = sample_prior(G.prior, 1000, G.latent_dim, torch.Generator().manual_seed(12345))
        latent = (I(G(z)) - z).norm(dim=1).mean().item()
    assert latent == pytest.approx(stopping["curve"][0]["sample_latent_error"], rel=1e-5)
    again = run(_cfg(tmp_path, **kw))
    assert again["step"] == 30  # the rule had ended it


def test_the_stopping_rule_is_refused_for_other_kinds(tmp_path):
    with pytest.raises(ValueError, match="patience"):
        _cfg(tmp_path, kind="classifier", patience=3)
