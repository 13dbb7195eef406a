"""Security (issue #12): nothing is unpickled from a file the project reads, every server it starts binds
127.0.0.1 unless told otherwise, and a config cannot put its run folder outside the runs folder.
"""

from __future__ import annotations

import ast
import inspect
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.reliability(kind="security")
ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ["invgan", "invgan_core", "jobs", "tuning", "cluster", "benchmarks"]
# The one unpickler allowed: CIFAR-10's batches are pickles by format, read by a restricted Unpickler whose
# find_class admits only numpy arrays, bytes and dtypes (tests/core/test_data.py feeds it malicious payloads).
ALLOWED_UNPICKLERS = {("invgan_core/data.py", "_CifarUnpickler")}
PICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def unsafe_loads(source: str, path: str = "<source>") -> list[str]:
    """Every way this source could unpickle or unsafely deserialise a file: one entry per finding."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef):
            for base in node.bases:
                if _dotted(base).split(".")[-1] == "Unpickler" and (path, node.name) not in ALLOWED_UNPICKLERS:
                    found.append(f"{path}:{node.lineno}: class {node.name} subclasses an Unpickler")
            continue
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        head, _, leaf = name.rpartition(".")
        where = f"{path}:{node.lineno}: {name}(...)"
        if head.split(".")[-1:] and head.split(".")[-1] in PICKLERS and leaf in {"load", "loads", "Unpickler", "open"}:
            found.append(where)
        elif leaf == "load" and head.endswith("torch"):
            weights_only = _keyword(node, "weights_only")
            if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                found.append(where + " without weights_only=True")
        elif leaf == "load" and head in {"np", "numpy"}:
            allow = _keyword(node, "allow_pickle")
            if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                found.append(where + " with allow_pickle")
        elif head == "yaml" and leaf in {
            "load",
            "load_all",
            "unsafe_load",
            "unsafe_load_all",
            "full_load",
            "full_load_all",
        }:
            loader = _dotted(_keyword(node, "Loader") or ast.Constant(None))
            if leaf.startswith(("unsafe", "full")) or loader.split(".")[-1] not in {"SafeLoader", "CSafeLoader"}:
                found.append(where + " (use yaml.safe_load)")
        elif leaf == "read_pickle" or name in {"eval", "exec"}:
            found.append(where)
    return found


def test_the_scanner_finds_every_unsafe_pattern_and_passes_the_safe_ones():
    unsafe = """
import pickle, torch, numpy as np, yaml, pandas as pd
pickle.load(f); pickle.loads(b); torch.load(p); torch.load(p, weights_only=False); np.load(p, allow_pickle=True)
yaml.load(t); yaml.load(t, Loader=yaml.Loader); yaml.unsafe_load(t); yaml.full_load(t); pd.read_pickle(p)
eval(text); exec(text)
class Mine(pickle.Unpickler): pass
"""
    assert len(unsafe_loads(unsafe)) == 13, unsafe_loads(unsafe)
    safe = """
import torch, numpy as np, yaml
torch.load(p, weights_only=True); np.load(p); np.load(p, allow_pickle=False); yaml.safe_load(t)
yaml.load(t, Loader=yaml.SafeLoader); model.eval(); json.load(f); safetensors.torch.load_file(p)
"""
    assert unsafe_loads(safe) == []


def test_no_code_path_unpickles_a_file():
    findings = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            findings += unsafe_loads(path.read_text(), str(path.relative_to(ROOT)))
    assert findings == [], "\n".join(findings)
    allowed = {name for _, name in ALLOWED_UNPICKLERS}
    from invgan_core import data

    for name in allowed:  # the allowed unpickler really restricts what it builds
        assert "find_class" in vars(getattr(data, name))


def test_training_resume_reads_accelerate_state_through_torchs_weights_only_loader():
    """`invgan train` resumes with Accelerate's load_state: its `load` defaults to torch.load(weights_only=True)
    (a restricted unpickler), and only objects registered for checkpointing would take the unrestricted path."""
    from accelerate.utils import other

    assert 'kwargs["weights_only"] = True' in inspect.getsource(other.load)
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            assert "register_for_checkpointing" not in path.read_text(), path


# ---------------------------------------------------------------- servers bind 127.0.0.1


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(pid: int, port: int, timeout: float = 90) -> set[str]:
    """The addresses the process tree of `pid` listens on at `port` (waits until it listens)."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        found = set()
        for p in procs:
            try:
                found |= {
                    c.laddr.ip
                    for c in p.net_connections(kind="inet")
                    if c.status == psutil.CONN_LISTEN and c.laddr.port == port
                }
            except psutil.Error:
                pass
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError(f"nothing listened on port {port} within {timeout:.0f} s")


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def test_invgan_ui_starts_mlflow_on_loopback_only(tmp_path, monkeypatch):
    """The command line `invgan ui` runs (the same MLflow server binary whose real listening address the next
    test checks): --host 127.0.0.1, whatever the port or store."""
    from typer.testing import CliRunner

    from cluster import local
    from invgan.cli import app

    calls = []

    class Finished:  # the server as `serve_ui` sees it: started with `cmd`, then exited 0
        def __init__(self, cmd, *a, **k):
            calls.append(cmd)
            self.pid = os.getpid()

        def wait(self):
            return 0

    monkeypatch.setattr(local.subprocess, "Popen", Finished)
    monkeypatch.setattr(local, "_processes", lambda pgids, temp_dir: [])  # nothing of its own left to stop
    out = CliRunner().invoke(app, ["ui", "--port", "5123", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"])
    assert out.exit_code == 0, out.output
    (cmd,) = calls
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and "0.0.0.0" not in cmd
    assert "http://127.0.0.1:5123" in out.output


def test_the_local_clusters_mlflow_server_listens_on_loopback_only(tmp_path):
    from cluster import local

    uri, pgid = local.start_mlflow_server(tmp_path, "127.0.0.1", dict(os.environ))
    try:
        port = int(uri.rsplit(":", 1)[1])
        assert uri.startswith("http://127.0.0.1:") and _listening(pgid, port) == {"127.0.0.1"}
    finally:
        os.killpg(pgid, signal.SIGTERM)


def test_the_local_cluster_starts_every_ray_service_on_loopback_by_default(tmp_path, monkeypatch):
    """The command lines `invgan cluster up --local` runs (the processes themselves are tested in
    tests/cluster): every address flag names 127.0.0.1, never 0.0.0.0, and the CLI's default host is loopback."""
    from typer.testing import CliRunner

    from cluster import local
    from invgan.cli import app

    started, mlflow_hosts = [], []
    monkeypatch.setattr(local, "_start", lambda cmd, env, log: started.append(cmd) or 10**7 + len(started))
    monkeypatch.setattr(
        local,
        "start_mlflow_server",
        lambda folder, host, env, artifacts=None: mlflow_hosts.append(host) or (f"http://{host}:1", 10**7),
    )
    monkeypatch.setattr(local, "_wait_http", lambda *a, **k: None)
    monkeypatch.setattr(local, "_processes", lambda *a, **k: [])
    monkeypatch.setattr(local, "state_dir", lambda: tmp_path / "cluster")
    out = CliRunner().invoke(app, ["cluster", "up", "--local", "--workers", "1"])
    assert out.exit_code == 0, out.output
    assert mlflow_hosts == ["127.0.0.1"] and len(started) == 2  # head + 1 worker
    for cmd in started:
        hosts = {cmd[i + 1] for i, arg in enumerate(cmd) if arg in ("--node-ip-address", "--dashboard-host")}
        assert hosts == {"127.0.0.1"}, cmd
        assert "0.0.0.0" not in " ".join(cmd)
    assert "--dashboard-host" in started[0]
    state = local.load_state(tmp_path / "cluster")
    assert state.dashboard_url.startswith("http://127.0.0.1:") and state.gcs_address.startswith("127.0.0.1:")


def test_an_evaluations_own_ray_instance_starts_no_dashboard(monkeypatch):
    import ray

    from jobs.ray_session import ray_session

    seen = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with ray_session(None, num_cpus=1):
        pass
    assert seen["include_dashboard"] is False and seen["address"] is None


# ---------------------------------------------------------------- paths from configs


@pytest.mark.parametrize(
    "name", ["../escape", "a/../../b", "/etc/passwd", "..", ".", "sub/dir", "a\\b", " spaced", ".hidden", ""]
)
@pytest.mark.parametrize("model", ["eval", "red"])
def test_a_config_name_cannot_lead_the_run_folder_out_of_runs(name, model):
    from pydantic import ValidationError

    from jobs.config import EvalConfig, load_config
    from jobs.red import RedConfig

    config = ROOT / "configs" / ("smoke.yaml" if model == "eval" else "red_smoke.yaml")
    with pytest.raises(ValidationError, match=r"(?s)name.*plain folder name"):
        load_config(config, model=RedConfig if model == "red" else EvalConfig, name=name)


def test_valid_names_stay_inside_the_runs_folder(tmp_path, monkeypatch):
    from jobs.config import load_config
    from jobs.run_folder import run_folder

    monkeypatch.setenv("INVGAN_RUNS", str(tmp_path / "runs"))
    for name in ["smoke", "table-2_mnist5k", "a.b", "ünïcode"]:
        cfg = load_config(ROOT / "configs" / "smoke.yaml", name=name)
        folder = run_folder(cfg, None).resolve()
        assert folder.parent == (tmp_path / "runs").resolve() and folder.name.startswith(name)
