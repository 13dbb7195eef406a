"""Every defense and attack on CUDA, against the CPU: run wherever torch sees a GPU, skipped elsewhere (the static
check in test_device.py is what runs everywhere). The same code as `python -m benchmarks.gpu_check`."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_every_defense_and_attack_runs_on_cuda_and_agrees_with_the_cpu():
    from benchmarks import gpu_check

    result = gpu_check.check(torch.device("cuda"), n=16, throughput_n=64)
    assert result["min_agreement"] >= 0.9, result["agreement"]  # float rounding may flip a boundary example


def test_a_projection_stays_on_the_inputs_device():
    from invgan_core.checkpoint import load_model
    from invgan_core.inversion import project
    from jobs.common import WEIGHTS_DIR

    G = load_model(WEIGHTS_DIR / "digits" / "generator", kind="generator", map_location="cuda")[0]
    x = torch.rand(3, *G.image_shape, device="cuda")
    p = project(G.requires_grad_(False), x, ids=[1, 2, 3], steps=3, restarts=2, keep_trace=True)
    assert {p.z.device.type, p.x.device.type, p.loss.device.type, p.restart_losses.device.type} == {"cuda"}
