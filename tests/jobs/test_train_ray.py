"""`invgan train --workers N`: the Accelerate loop on N Ray Train workers (TorchTrainer, gloo on CPUs), against
the same loop in one process. Real Ray (a 3-CPU local instance), real training on digits, a real MLflow store."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from invgan.cli import app
from invgan_core.checkpoint import load_model
from jobs.sharded import JobOptions
from jobs.train import TrainConfig, main, run, run_on_ray

STEPS, HALF = 16, 8
GENERATOR = Path(__file__).resolve().parents[2] / "weights" / "digits" / "generator"


@pytest.fixture(scope="module")
def ray_instance():
    import ray

    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)  # 2 workers + 1 spare
    yield ray
    ray.shutdown()


def _settings(tmp: Path, **kw) -> dict:
    base = dict(kind="inverter", dataset="digits", generator=GENERATOR, batch_size=64, seed=3)
    base |= dict(work_dir=tmp / "work", device="cpu")
    return base | kw


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.state_dict().values() if p.is_floating_point()])


@pytest.fixture(scope="module")
def two_workers(ray_instance, tmp_path_factory):
    """2 Ray workers: the command's entry stopped half way (steps=HALF), then rerun to STEPS (a resume from the
    Ray Train checkpoint), against one process run straight to STEPS with the same seed and config."""
    tmp = tmp_path_factory.mktemp("ray_train")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    opts = JobOptions(out=tmp / "w2", tracking_uri=uri, progress=False)
    first = main(_settings(tmp, steps=HALF, checkpoint_every=HALF, workers=2), opts)
    cfg = TrainConfig(
        **_settings(tmp, steps=STEPS, checkpoint_every=HALF, workers=2), out=tmp / "w2", tracking_uri=uri, quiet=True
    )
    second = run_on_ray(cfg)
    single = run(
        TrainConfig(
            **_settings(tmp / "one", steps=STEPS, checkpoint_every=HALF), out=tmp / "w1", tracking_uri=uri, quiet=True
        )
    )
    return {"tmp": tmp, "uri": uri, "first": first, "second": second, "single": single}


def test_two_ray_workers_end_with_the_weights_of_one_process(two_workers):
    """DDP averages the two half-batch gradients (the latents are drawn for the whole batch and sliced), so the
    update is the 1-process update up to the order of float sums: all-reduce adds the halves' gradients in
    another order than one backward over the batch (~1e-7 relative per step in float32). Adam divides by
    sqrt(v), which keeps that relative size, and STEPS steps of lr 2e-4 move a weight by at most ~3e-3, so
    1e-5 absolute (5e-4 of the largest possible move) bounds the difference with a wide margin while any real
    divergence (another batch, other latents, a missed all-reduce: one step of lr alone is 2e-4) fails it."""
    second, single = two_workers["second"], two_workers["single"]
    assert second["step"] == single["step"] == STEPS and second["finished"]
    for ours, theirs in zip(second["models"][:2], single["models"][:2], strict=True):  # I and D
        a, b = _flat(ours), _flat(theirs)
        diff = (a - b).abs().max().item()
        print(f"max |2 workers - 1 process| = {diff:.3g} over {a.numel()} weights")
        assert diff <= 1e-5


def test_the_model_files_and_manifest_land_in_the_out_folder_on_the_driver(two_workers):
    tmp, second = two_workers["tmp"], two_workers["second"]
    assert second["files"] == [str(tmp / "w2" / "inverter")]
    assert (tmp / "w2" / "inverter.safetensors").exists() and (tmp / "w2" / "inverter.json").exists()
    inverter, manifest = load_model(tmp / "w2" / "inverter", kind="inverter")
    torch.testing.assert_close(_flat(inverter), _flat(second["models"][0]), rtol=0, atol=0)
    assert manifest["training"]["workers"] == 2 and manifest["training"]["steps_done"] == STEPS
    assert manifest["dataset"] == "digits" and manifest["metrics"] == second["metrics"]
    assert set(manifest["metrics"]) == {"test_reconstruction_mse", "sample_latent_error"}


def test_a_rerun_resumes_from_the_ray_checkpoint_in_the_same_mlflow_run(two_workers):
    from mlflow.tracking import MlflowClient

    first, second = two_workers["first"], two_workers["second"]
    assert first.summary["step"] == HALF and first.run_dir == two_workers["tmp"] / "work"
    assert second["mlflow_run_id"] == first.mlflow_run_id  # the run id travelled in the checkpoint
    assert [at for at, _ in second["history"]] == [STEPS]  # this attempt trained from HALF on only
    # Ray Train's checkpoints are in the work dir (the default --storage), each with the step it holds
    saved = sorted((two_workers["tmp"] / "work").glob("checkpoint_*/progress.json"))
    assert saved and max(json.loads(p.read_text())["step"] for p in saved) == STEPS
    client = MlflowClient(two_workers["uri"])
    runs = client.search_runs([client.get_experiment_by_name("train").experiment_id], "params.workers = '2'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # logged once, by the driver
    history = client.get_metric_history(first.mlflow_run_id, "train/latent")
    assert [m.step for m in history] == [HALF, STEPS]
    assert runs[0].data.metrics["test/sample_latent_error"] == pytest.approx(second["metrics"]["sample_latent_error"])


def test_a_rerun_with_a_different_config_is_refused_before_any_worker_starts(two_workers):
    tmp = two_workers["tmp"]
    opts = JobOptions(out=tmp / "w2", log_mlflow=False, progress=False)
    t0 = time.monotonic()
    with pytest.raises(SystemExit, match="different config") as err:
        main(_settings(tmp, steps=STEPS, checkpoint_every=HALF, workers=2, lr=1e-3), opts)
    assert "\n" not in str(err.value) and time.monotonic() - t0 < 10


def test_more_workers_than_cpus_fail_at_once_in_one_line(ray_instance, tmp_path):
    t0 = time.monotonic()
    with pytest.raises(SystemExit) as err:
        main(_settings(tmp_path, steps=4, workers=8), JobOptions(out=tmp_path / "w", log_mlflow=False, progress=False))
    message = str(err.value)
    assert "--workers 8 needs 8 CPUs" in message and "has 3" in message and "\n" not in message
    assert time.monotonic() - t0 < 10 and not (tmp_path / "work").exists()


def test_a_missing_generator_fails_on_the_driver_before_ray_starts(tmp_path):
    opts = JobOptions(out=tmp_path / "w", log_mlflow=False, progress=False)
    with pytest.raises(SystemExit, match="missing manifest") as err:
        main(_settings(tmp_path, steps=4, workers=2, generator=tmp_path / "none"), opts)
    assert "\n" not in str(err.value) and not (tmp_path / "work").exists()


def test_the_workers_mixed_precision_and_storage_options_reach_train(monkeypatch):
    out = CliRunner().invoke(app, ["train", "--help"], terminal_width=400, env={"COLUMNS": "400"})
    text = " ".join(out.output.split())
    assert "--workers" in text and "Ray Train workers" in text
    assert "--mixed-precision" in text and "--storage" in text
    refused = CliRunner().invoke(app, ["train", "inverter", "--workers", "0", "--no-mlflow"])
    assert refused.exit_code == 1 and "workers" in str(refused.exception)
    seen = {}
    monkeypatch.setattr("jobs.train.main", lambda settings, opts: seen.update(settings))
    args = ["train", "inverter", "--workers", "2", "--mixed-precision", "bf16", "--storage", "s3://b/p"]
    assert CliRunner().invoke(app, args).exit_code == 0
    assert seen["workers"] == 2 and seen["mixed_precision"] == "bf16" and seen["storage"] == "s3://b/p"
