"""The cluster's edge fails fast, in one line that says what is missing: no cluster at an address, a GPU no node
offers, a GPU worker whose torch sees no CUDA. One real Ray instance that declares one (fake) GPU."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import torch

from jobs.common import UserError
from jobs.config import Resources, load_config
from jobs.evaluate import evaluate
from jobs.models import worker_device
from jobs.ray_session import check_reachable
from jobs.sharded import JobOptions

SMOKE = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a torch without CUDA")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.reliability(kind="bad_input")
def test_an_address_where_no_cluster_listens_is_refused_at_once():
    address = f"127.0.0.1:{_free_port()}"
    started = time.monotonic()
    with pytest.raises(UserError, match=rf"no Ray cluster at {address}: nothing answers"):
        check_reachable(address)
    assert time.monotonic() - started < 10
    check_reachable("auto")  # left to Ray: it finds the local cluster's address itself


@NO_CUDA
def test_a_worker_given_gpus_without_cuda_says_so():
    assert worker_device(Resources(num_gpus_per_worker=0)) == torch.device("cpu")
    with pytest.raises(UserError, match="sees no CUDA device .*num_gpus_per_worker: 0"):
        worker_device(Resources(num_gpus_per_worker=1))


@pytest.fixture(scope="module")
def ray_with_one_gpu():
    import ray

    ray.init(num_cpus=3, num_gpus=1, include_dashboard=False, log_to_driver=False)  # a GPU resource, no device
    try:
        yield
    finally:
        ray.shutdown()


@pytest.mark.reliability(kind="bad_input")
def test_more_gpus_than_any_node_offers_stop_at_once_listing_the_cluster(ray_with_one_gpu, tmp_path):
    cfg = load_config(SMOKE, ["resources.num_gpus_per_worker=2"], limit=4)
    started = time.monotonic()
    with pytest.raises(UserError, match=r"no node of the cluster can hold a worker of 1 CPU and 2 GPU \(the nodes "):
        evaluate(cfg, JobOptions(out=tmp_path / "run", progress=False, log_mlflow=False))
    assert time.monotonic() - started < 30
    assert not list((tmp_path / "run").glob("rows/*.parquet"))


@NO_CUDA
@pytest.mark.reliability(kind="bad_input")
def test_a_gpu_worker_whose_torch_has_no_cuda_stops_the_job_in_one_line(ray_with_one_gpu, tmp_path):
    """Ray places the worker on the (declared) GPU; its torch sees none: the first shard fails with the reason,
    and the job stops without a retry (it would fail again)."""
    cfg = load_config(SMOKE, ["resources.num_gpus_per_worker=1", "resources.num_workers=1"], limit=4)
    with pytest.raises(UserError, match=r"eval smoke: a worker was given 1 GPU\(s\) but torch .* sees no CUDA"):
        evaluate(cfg, JobOptions(out=tmp_path / "run", progress=False, log_mlflow=False))


@pytest.mark.skipif(not os.environ.get("RUN_SLOW"), reason="an MLflow server start-up (20-60 s): set RUN_SLOW=1")
@pytest.mark.reliability(kind="fault")
def test_invgan_ui_stopped_with_sigterm_stops_its_mlflow_server(tmp_path):
    """The UI's server and its web workers stop with the command: the port is free again."""
    import signal
    import subprocess
    import sys

    port = _free_port()
    cmd = [sys.executable, "-m", "invgan", "ui", "--port", str(port), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]
    proc = subprocess.Popen(cmd, cwd=SMOKE.parents[1], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.5)
        else:
            pytest.fail("the MLflow UI did not start listening within 90 s")
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, "a process of the UI still holds the port"
    finally:
        if proc.poll() is None:
            proc.kill()
