"""`invgan cluster up --local / down`: a Ray head, N worker nodes and an MLflow server as processes here.

Every node is a real `ray start` (its own raylet, object store and ports; the head also runs the GCS,
the dashboard and the job server), so a local cluster behaves like machines joined over a network:
jobs are submitted to it with `invgan submit`, shards spread over its nodes, and losing a node is a
real fault. It is the way to try the cluster path, and what the tests run.

    up:   token ─▶ MLflow server (SQLite, artifacts served, on --host) ─▶ head ─▶ workers ─▶ state file
    down: every process `up` started (each node's process group and descendants, and anything still
          running from the cluster's temp dir) gets SIGTERM, then SIGKILL; nothing else is touched.

Token authentication: `up` writes a random token to <state dir>/auth_token (mode 0600) and starts every
node with RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH pointing at it; `invgan submit`/`jobs` send it.
Jobs on the cluster inherit the nodes' environment: MLFLOW_TRACKING_URI (the cluster's server),
INVGAN_RUNS (run folders under <state dir>/runs) and RAY_worker_niceness (0 unless set).

--host is the one address every service binds and every node and job is given, so it must be an address of
this machine (127.0.0.1, the default, or one other machines reach), never a wildcard such as 0.0.0.0. Beyond
127.0.0.1 the MLflow server requires a login (MLflow's basic-auth app, which needs `pip install 'mlflow[auth]'`;
without it `up` refuses): an admin user with a random password in <state dir>/mlflow_auth.ini (mode 0600),
which the nodes pass to the server (MLFLOW_TRACKING_USERNAME/PASSWORD in their environment).
"""

from __future__ import annotations

import configparser
import importlib.util
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from invgan_core.files import atomic_write_json
from jobs.common import runs_dir

STATE_FILE = "cluster.json"
MLFLOW_AUTH_FILE = "mlflow_auth.ini"
MLFLOW_USER = "invgan"


def state_dir() -> Path:
    """Where the local cluster keeps its state, token, logs, MLflow store and run folders: <runs>/cluster."""
    return runs_dir() / "cluster"


@dataclass
class ClusterState:
    gcs_address: str  # host:port of the head's GCS (what `ray start --address` and ray.init take)
    dashboard_url: str  # http://host:port: the dashboard and the job server (what `invgan submit` takes)
    token_path: str
    temp_dir: str
    runs_dir: str
    mlflow_uri: str | None = None
    mlflow_auth: str | None = None  # the MLflow server's basic-auth config (user, password), when it has one
    nodes: list[dict] = field(default_factory=list)  # {"role", "pgid", "num_cpus", "log"}
    mlflow_pgid: int | None = None
    started: float = field(default_factory=time.time)

    def env(self) -> dict[str, str]:
        """What a client needs in its environment to talk to this cluster."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": self.token_path}

    def mlflow_env(self) -> dict[str, str]:
        """What an MLflow client needs to log in to this cluster's server (nothing when it has no login)."""
        if self.mlflow_auth is None:
            return {}
        user, password = read_mlflow_login(Path(self.mlflow_auth))
        return {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password}


def load_state(folder: Path | None = None) -> ClusterState | None:
    path = (folder or state_dir()) / STATE_FILE
    return ClusterState(**json.loads(path.read_text())) if path.exists() else None


def _save_state(state: ClusterState, folder: Path) -> None:
    atomic_write_json(folder / STATE_FILE, asdict(state))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _ray_bin() -> str:
    """The `ray` next to this interpreter (the project's venv), else the one on PATH."""
    here = Path(sys.executable).with_name("ray")
    return str(here) if here.exists() else (shutil.which("ray") or "ray")


def _node_ports(host: str) -> list[str]:
    """Distinct ports for one node's services (several nodes share this machine's port space)."""
    names = [
        "--node-manager-port",
        "--object-manager-port",
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--runtime-env-agent-port",
        "--metrics-export-port",
    ]
    return [arg for name in names for arg in (name, str(free_port(host)))]


def _start(cmd: list[str], env: dict, log: Path, timeout: float = 120) -> int:
    """Run a `ray start` in its own session; its daemons keep its process group. Returns the pgid."""
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
    if code != 0:
        raise RuntimeError(f"`{' '.join(cmd[:3])} ...` failed (exit {code}); see {log}")
    return proc.pid  # start_new_session: the pgid is the pid of `ray start`


def _wait_http(url: str, timeout: float, what: str, log: Path, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited (code {proc.returncode}) before it answered at {url}; see {log}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:  # it answered (e.g. 401 without the token): it is up
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{what} did not answer at {url} within {timeout:.0f} s; see {log}")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def has_basic_auth() -> bool:
    """Whether MLflow's basic-auth app can run here (it needs Flask-WTF, the `mlflow[auth]` extra)."""
    return importlib.util.find_spec("flask_wtf") is not None


def check_host(host: str, mlflow: bool) -> None:
    """Refuse, before anything starts, a --host the nodes cannot be given or an MLflow server open to others
    without a login."""
    try:
        wildcard = ipaddress.ip_address(host).is_unspecified
    except ValueError:
        wildcard = not host.strip()
    if wildcard:
        raise SystemExit(
            f"--host {host!r} is a wildcard: give an address of this machine that every node reaches (127.0.0.1, "
            "or its address on the network of the other machines); the services bind it and the nodes and jobs "
            "are given it (Ray's node address, the MLflow server's URI)"
        )
    if mlflow and not is_loopback(host) and not has_basic_auth():
        raise SystemExit(
            f"the cluster's MLflow server would listen on {host}, beyond this machine, where it requires a login "
            "(MLflow's basic-auth app), which needs Flask-WTF: pip install 'mlflow[auth]'; or pass --no-mlflow, "
            "or --host 127.0.0.1"
        )


def read_mlflow_login(config: Path) -> tuple[str, str]:
    parser = configparser.ConfigParser()
    parser.read(config)
    return parser["mlflow"]["admin_username"], parser["mlflow"]["admin_password"]


def mlflow_auth_config(folder: Path) -> Path:
    """MLflow's basic-auth config for the cluster's server: one admin user (MLFLOW_USER) with a random password,
    no access without a login, users in <folder>/mlflow_auth.db, and the auth app's secret key. Written once
    (mode 0600) and kept: the user store remembers the first password, so a later `up` on the folder reuses it."""
    path = folder / MLFLOW_AUTH_FILE
    if not path.exists():
        text = (
            "[mlflow]\n"
            "default_permission = NO_PERMISSIONS\n"
            f"database_uri = sqlite:///{folder / 'mlflow_auth.db'}\n"
            f"admin_username = {MLFLOW_USER}\n"
            f"admin_password = {secrets.token_urlsafe(24)}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            "[invgan]\n"
            f"flask_server_secret_key = {secrets.token_hex(32)}\n"  # the auth app's CSRF key (from its env)
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
    return path


def mlflow_server_command(
    folder: Path, host: str, port: int, artifacts: str | None = None
) -> tuple[list[str], dict[str, str]]:
    """The MLflow server's command line and what its environment adds: on 127.0.0.1 an open server; on any
    other address the basic-auth app (every request needs the login of `mlflow_auth_config`) and that address
    as the one Host it answers to. `artifacts`: where the server keeps artifacts [<folder>/mlartifacts], e.g.
    s3://bucket/mlflow (the server writes there with boto3, from the AWS_* variables of its environment; the
    jobs only talk to the server)."""
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{folder / 'mlflow.db'}",
        "--serve-artifacts",
        "--artifacts-destination",
        artifacts or str(folder / "mlartifacts"),
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    if is_loopback(host):
        return cmd, {}
    cmd += ["--app-name", "basic-auth", "--allowed-hosts", f"{host},{host}:{port}"]
    config = mlflow_auth_config(folder)
    parser = configparser.ConfigParser()
    parser.read(config)
    return cmd, {
        "MLFLOW_AUTH_CONFIG_PATH": str(config),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": parser["invgan"]["flask_server_secret_key"],
    }


def start_mlflow_server(folder: Path, host: str, env: dict, artifacts: str | None = None) -> tuple[str, int]:
    """An MLflow tracking server on an SQLite store, serving artifacts itself (--serve-artifacts), so
    every node's driver reaches one store over HTTP (with a login beyond 127.0.0.1). Returns (uri, pgid)."""
    port = free_port(host)
    log = folder / "mlflow-server.log"
    if artifacts and artifacts.startswith("s3://") and importlib.util.find_spec("boto3") is None:
        raise SystemExit(f"--artifacts {artifacts}: MLflow needs boto3 for S3: pip install 'invgan[s3]'")
    cmd, extra = mlflow_server_command(folder, host, port, artifacts)
    if extra:  # the login is the config file's: MLFLOW_AUTH_ADMIN_* in this environment would override it
        env = {k: v for k, v in env.items() if not k.startswith("MLFLOW_AUTH_")} | extra
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://{host}:{port}"
    try:
        _wait_http(f"{uri}/health", 120, "the MLflow server", log, proc)
    except RuntimeError:
        _terminate(_processes({proc.pid}, None))
        raise
    return uri, proc.pid


def up(
    workers: int = 2,
    *,
    head_cpus: int = 1,
    worker_cpus: int = 1,
    host: str = "127.0.0.1",
    mlflow: bool = True,
    object_store_mb: int = 512,
    folder: Path | None = None,
    artifacts: str | None = None,
) -> ClusterState:
    """Start the MLflow server, a head node and `workers` worker nodes; write and return the cluster state."""
    check_host(host, mlflow)
    folder = (folder or state_dir()).resolve()
    existing = load_state(folder)
    if existing is not None and _processes({n["pgid"] for n in existing.nodes}, None):
        raise SystemExit(
            f"a local cluster is already running ({existing.dashboard_url}, state in {folder}); "
            "stop it with `invgan cluster down` first"
        )
    folder.mkdir(parents=True, exist_ok=True)
    token = folder / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    temp_dir = tempfile.mkdtemp(prefix="invgan-ray-")  # short: Ray's socket paths must fit in 107 bytes
    state = ClusterState(
        gcs_address=f"{host}:{free_port(host)}",
        dashboard_url="",
        token_path=str(token),
        temp_dir=temp_dir,
        runs_dir=str(folder / "runs"),
    )
    env = (
        os.environ
        | state.env()
        | {
            "RAY_worker_niceness": os.environ.get("RAY_worker_niceness", "0"),
            "RAY_USAGE_STATS_ENABLED": "0",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # jobs' `python`
            "INVGAN_RUNS": state.runs_dir,
        }
    )
    env.pop("RAY_ADDRESS", None)
    try:
        if mlflow:
            state.mlflow_uri, state.mlflow_pgid = start_mlflow_server(folder, host, env, artifacts)
            if not is_loopback(host):
                state.mlflow_auth = str(folder / MLFLOW_AUTH_FILE)
            env["MLFLOW_TRACKING_URI"] = state.mlflow_uri
            env |= state.mlflow_env()
        dashboard_port = free_port(host)
        state.dashboard_url = f"http://{host}:{dashboard_port}"
        common = [
            "--node-ip-address",
            host,
            "--disable-usage-stats",
            "--object-store-memory",
            str(object_store_mb * 2**20),
        ]
        head = [
            _ray_bin(),
            "start",
            "--head",
            "--port",
            state.gcs_address.rsplit(":", 1)[1],
            "--num-cpus",
            str(head_cpus),
            "--dashboard-host",
            host,
            "--dashboard-port",
            str(dashboard_port),
            "--ray-client-server-port",
            str(free_port(host)),
            "--temp-dir",
            temp_dir,
            *common,
            *_node_ports(host),
        ]
        log = folder / "head.log"
        state.nodes.append({"role": "head", "pgid": _start(head, env, log), "num_cpus": head_cpus, "log": str(log)})
        _save_state(state, folder)  # from here on `down` can clean up whatever follows
        for k in range(workers):
            # Each node gets its own temp dir: nodes sharing one would share runtime_resources/, and one
            # node's runtime-env agent would delete the job's unpacked working_dir under another's driver.
            node_temp = Path(temp_dir) / f"w{k}"
            node_temp.mkdir()
            cmd = [
                _ray_bin(),
                "start",
                "--address",
                state.gcs_address,
                "--num-cpus",
                str(worker_cpus),
                "--temp-dir",
                str(node_temp),
                *common,
                *_node_ports(host),
            ]
            log = folder / f"worker-{k}.log"
            state.nodes.append(
                {"role": "worker", "pgid": _start(cmd, env, log), "num_cpus": worker_cpus, "log": str(log)}
            )
            _save_state(state, folder)
        _wait_http(f"{state.dashboard_url}/api/version", 60, "the Ray dashboard", folder / "head.log")
    except BaseException:
        _save_state(state, folder)
        down(folder)
        raise
    _save_state(state, folder)
    return state


def _processes(pgids: set[int], temp_dir: str | None) -> list:
    """The live processes of these process groups, their descendants (Ray workers start their own
    sessions) and any process whose command line names the cluster's temp dir."""
    import psutil

    found = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if os.getpgid(p.pid) in pgids or (temp_dir and any(temp_dir in part for part in p.info["cmdline"] or [])):
                found[p.pid] = p
        except (ProcessLookupError, psutil.Error):
            continue
    for p in list(found.values()):
        try:
            found |= {c.pid: c for c in p.children(recursive=True)}
        except psutil.Error:
            continue
    found.pop(os.getpid(), None)
    return list(found.values())


def _terminate(procs: list, grace: float = 5) -> list[int]:
    import psutil

    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)
    return [p.pid for p in procs]


def cluster_pids(state: ClusterState) -> list[int]:
    """Process ids of everything the cluster runs now (the tests compare them before and after `down`)."""
    pgids = {n["pgid"] for n in state.nodes} | ({state.mlflow_pgid} if state.mlflow_pgid else set())
    return sorted(p.pid for p in _processes(pgids, state.temp_dir))


def down(folder: Path | None = None) -> list[int]:
    """Stop exactly the processes `up` started (and their children); returns their pids. Logs, the
    MLflow store and run folders stay in the state folder."""
    folder = (folder or state_dir()).resolve()
    state = load_state(folder)
    if state is None:
        return []
    pgids = {n["pgid"] for n in state.nodes} | ({state.mlflow_pgid} if state.mlflow_pgid else set())
    # workers first, then the head, then MLflow: a raylet that loses its GCS first logs needless errors
    stopped = []
    for group in [{n["pgid"] for n in state.nodes if n["role"] == "worker"}, {n["pgid"] for n in state.nodes}, pgids]:
        stopped += _terminate(_processes(group, None))
    stopped += _terminate(_processes(pgids, state.temp_dir))
    shutil.rmtree(state.temp_dir, ignore_errors=True)
    (folder / STATE_FILE).unlink(missing_ok=True)
    return sorted(set(stopped))


def serve_ui(tracking_uri: str, port: int, host: str = "127.0.0.1") -> int:
    """Run the MLflow UI in the foreground until Ctrl-C or SIGTERM, then stop it with everything it started (its
    web workers are in its own process group): the port is free again when this returns its exit code."""
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        tracking_uri,
        "--host",
        host,
        "--port",
        str(port),
    ]
    proc = subprocess.Popen(cmd, start_new_session=True)

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        _terminate(_processes({proc.pid}, None))
