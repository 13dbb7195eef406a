"""What a submitted job carries and what the local cluster exposes, checked without starting a cluster: the files
`working_dir` uploads (Ray's rules, counted by our own matcher), the runtime_env with the project's dependencies,
the entry point's CPUs and GPUs, and the MLflow server's login beyond 127.0.0.1."""

from __future__ import annotations

import ast
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import cluster.local as local
import cluster.submit as sub
from invgan.cli import app

PROJECT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


# ---------------------------------------------------------------- what `working_dir` uploads

TREE = {
    ".gitignore": "# build output\n*.log\n!keep.log\nbuild/\n!build/keep.txt\n/top.txt\nnotes\n",
    "a.py": "print(1)\n",
    "x.log": "ignored by *.log\n",
    "keep.log": "re-included by !keep.log\n",
    "top.txt": "ignored: /top.txt is anchored to the root\n",
    "local.txt": "kept: sub/.gitignore applies only below sub/\n",
    "build/out.bin": "ignored: build/ at any depth\n",
    "build/keep.txt": "re-included by !build/keep.txt (Ray's matcher; git itself would not)\n",
    "notes/n.md": "ignored: a plain name matches a folder too\n",
    "data.db": "ignored by the excludes (*.db)\n",
    ".venv/lib/site.py": "ignored by the excludes (.venv/)\n",
    "runs/r1/rows.parquet": "ignored by the excludes (runs/)\n",
    "docs/figures/f.pdf": "ignored by the excludes (docs/figures/*.pdf)\n",
    "docs/figures/f.png": "kept\n",
    "sub/.gitignore": "local.txt\n",
    "sub/.rayignore": "secret*\n",
    "sub/top.txt": "kept: /top.txt matches only at the root\n",
    "sub/local.txt": "ignored by sub/.gitignore\n",
    "sub/secret.key": "ignored by sub/.rayignore\n",
    "sub/build/y.o": "ignored: build/ at any depth\n",
    "sub/deep/z.py": "kept\n",
    "sub/__pycache__/m.cpython-311.pyc": "ignored by the excludes\n",
}
UPLOADED = {
    ".gitignore",
    "a.py",
    "keep.log",
    "local.txt",
    "build/keep.txt",
    "docs/figures/f.png",
    "sub/.gitignore",
    "sub/.rayignore",
    "sub/top.txt",
    "sub/deep/z.py",
}


def test_the_upload_counts_exactly_the_files_the_gitignores_and_excludes_leave(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", raising=False)
    _write(tmp_path, TREE)
    entered: list[str] = []
    iterdir = Path.iterdir

    def recording(self):
        entered.append(self.relative_to(tmp_path).as_posix())
        return iterdir(self)

    monkeypatch.setattr(Path, "iterdir", recording)
    files = sub.upload_files(tmp_path, sub.UPLOAD_EXCLUDES)
    assert {f.relative_to(tmp_path).as_posix() for f in files} == UPLOADED
    # a folder whose every file is excluded is not even listed (Ray lists it and skips each file); one with a
    # re-included file is
    assert not {".venv", "runs", "sub/__pycache__"} & set(entered) and "build" in entered
    assert sub.upload_size(tmp_path, sub.UPLOAD_EXCLUDES) == (
        len(UPLOADED),
        sum((tmp_path / name).stat().st_size for name in UPLOADED),
    )


def test_ray_runtime_env_ignore_gitignore_drops_the_gitignores_but_not_the_rayignores(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "1")
    _write(tmp_path, TREE)
    names = {f.relative_to(tmp_path).as_posix() for f in sub.upload_files(tmp_path, sub.UPLOAD_EXCLUDES)}
    assert {"x.log", "top.txt", "build/out.bin", "sub/local.txt", "notes/n.md"} <= names
    assert "sub/secret.key" not in names and "data.db" not in names


PATTERNS = ["foo", "foo/", "/foo", "foo/bar", "*.py", "!keep.py", "a/**/b", "**/b", "a/**", "**", "x/*", "*/x"]
PATTERNS += ["!foo", "!foo/", "b?r", "[ab]ar", "[!a]ar", "\\#x", "a/*/c", "#c", " foo ", "*", "f*o", "docs/f/*.pdf"]
PATHS = [".", "foo", "foo/x", "x/foo", "x/foo/y", "foo/bar", "foo/bar/z", "a.py", "d/keep.py", "a/b", "a/x/y/b"]
PATHS += ["a/b/c", "b", "bar", "car", "x/y", "y/x", "#x", "a/q/c", "a/q/r/c", "fxo", "docs/f/g.pdf", "docs/f/h/g.pdf"]


@pytest.mark.reliability(kind="property")
def test_the_ignore_rules_match_what_rays_own_matcher_matches():
    """Every pattern alone, and runs of four (negations after what they re-include), against Ray's vendored
    pathspec ("gitwildmatch", what Ray's upload uses): the same verdict on every path."""
    pathspec = pytest.importorskip("ray._private.thirdparty.pathspec")
    sets = [[p] for p in PATTERNS] + [PATTERNS[i : i + 4] for i in range(len(PATTERNS) - 3)]
    for lines in sets:
        spec, rules = pathspec.PathSpec.from_lines("gitwildmatch", lines), sub.ignore_rules(lines)
        for path in PATHS:
            assert sub.ignored(rules, path) == spec.match_file(path), (lines, path)


def test_the_project_upload_leaves_out_environments_results_and_caches_without_private_ray_apis():
    names = {f.relative_to(PROJECT).as_posix() for f in sub.upload_files(PROJECT, sub.UPLOAD_EXCLUDES)}
    assert {"pyproject.toml", "cluster/submit.py", "configs/smoke.yaml"} <= names
    for top in (".venv/", "runs/", ".git/", ".mypy_cache/", ".pytest_cache/"):
        assert not any(n.startswith(top) for n in names), top
    assert not any(n.endswith((".pyc", ".db")) or "__pycache__" in n for n in names)
    tree = ast.parse((PROJECT / "cluster" / "submit.py").read_text())
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [m for m in imported if m.startswith("ray._private")], imported


# ---------------------------------------------------------------- the runtime_env and the entry point's resources


def test_the_runtime_env_carries_the_dependencies_of_pyproject_only_when_asked(tmp_path):
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "x"\ndependencies = [\n  "torch>=2.4",  # a comment\n'
        '  "ray[default,data,tune]>=2.60,<2.61",\n  "numpy>=1.26",\n]\n'
    )
    plain = sub.runtime_env({"A": "1"}, root=tmp_path)
    assert plain == {"working_dir": str(tmp_path), "excludes": sub.UPLOAD_EXCLUDES, "env_vars": {"A": "1"}}
    renv = sub.runtime_env(None, install_deps=True, root=tmp_path)
    assert "env_vars" not in renv
    assert renv["pip"] == {
        "packages": ["torch>=2.4", "ray[default,data,tune]>=2.60,<2.61", "numpy>=1.26"],
        "pip_check": False,
    }


def test_the_project_runtime_env_names_every_dependency_of_pyproject_toml():
    tomllib = pytest.importorskip("tomllib")
    declared = tomllib.loads((PROJECT / "pyproject.toml").read_text())["project"]["dependencies"]
    renv = sub.runtime_env(install_deps=True)
    assert renv["working_dir"] == str(PROJECT)
    assert renv["pip"]["packages"] == declared  # type: ignore[index]
    assert any(d.startswith("torch") for d in declared) and any(d.startswith("ray[") for d in declared)


class _FakeClient:
    def __init__(self):
        self.calls: list[dict] = []

    def submit_job(self, **kwargs):
        self.calls.append(kwargs)
        return "raysubmit_test"

    def get_address(self):
        return "http://fake:8265"


def test_submit_reserves_the_entry_points_cpus_and_gpus_and_sends_the_runtime_env(monkeypatch, capsys):
    fake = _FakeClient()
    monkeypatch.setattr(sub, "client", lambda address: fake)
    monkeypatch.setattr(sub, "upload_size", lambda: (3, 2**20))
    assert sub.submit(["eval", "--config", "a b.yaml"], wait=False, num_cpus=2, num_gpus=0.5, install_deps=True) == 0
    (call,) = fake.calls
    assert call["entrypoint"] == "python -m invgan eval --config 'a b.yaml'"
    assert call["entrypoint_num_cpus"] == 2 and call["entrypoint_num_gpus"] == 0.5
    assert call["runtime_env"]["pip"]["packages"] == sub.project_dependencies()
    assert capsys.readouterr().out.strip() == "raysubmit_test"
    sub.submit(["eval"], wait=False)
    assert fake.calls[1]["entrypoint_num_cpus"] == 0 and fake.calls[1]["entrypoint_num_gpus"] == 0
    assert "pip" not in fake.calls[1]["runtime_env"]


@pytest.mark.reliability(kind="bad_input")
@pytest.mark.parametrize("cpus, gpus", [(-1, 0), (0, -0.5), (float("nan"), 0)])
def test_submit_refuses_negative_resources_before_reaching_the_cluster(monkeypatch, cpus, gpus):
    monkeypatch.setattr(sub, "client", lambda address: pytest.fail("reached the cluster"))
    with pytest.raises(SystemExit, match="must be 0 or more"):
        sub.submit(["eval"], wait=False, num_cpus=cpus, num_gpus=gpus)


def test_the_submit_command_passes_cpus_gpus_and_install_deps(monkeypatch):
    seen: dict = {}

    def fake_submit(command, **kwargs):
        seen.update(kwargs, command=command)
        return 0

    monkeypatch.setattr(sub, "submit", fake_submit)
    out = runner.invoke(app, ["submit", "--cpus", "2", "--gpus", "0.5", "--install-deps", "--no-wait", "--", "eval"])
    assert out.exit_code == 0, out.output
    assert seen["command"] == ["eval"] and seen["num_cpus"] == 2 and seen["num_gpus"] == 0.5
    assert seen["install_deps"] is True and seen["wait"] is False
    runner.invoke(app, ["submit", "--", "eval"])
    assert seen["num_cpus"] == 0 and seen["num_gpus"] == 0 and seen["install_deps"] is False


@pytest.mark.reliability(kind="bad_input")
def test_the_submit_command_rejects_negative_cpus_and_documents_the_options(monkeypatch):
    monkeypatch.setattr(sub, "submit", lambda *a, **k: pytest.fail("submitted"))
    out = runner.invoke(app, ["submit", "--cpus", "-1", "--", "eval"])
    assert out.exit_code == 2 and "--cpus" in out.output
    out = runner.invoke(app, ["submit", "--gpus", "-1", "--", "eval"])
    assert out.exit_code == 2 and "--gpus" in out.output
    help_text = " ".join(runner.invoke(app, ["submit", "--help"], env={"COLUMNS": "200"}).output.split())
    for words in ("--cpus", "--gpus", "--install-deps", "entry point", "dependencies"):
        assert words in help_text


# ---------------------------------------------------------------- the local cluster's MLflow server


@pytest.mark.reliability(kind="security")
@pytest.mark.parametrize("host", ["0.0.0.0", "::", ""])
def test_a_wildcard_host_is_refused_before_anything_starts(tmp_path, host):
    with pytest.raises(SystemExit, match="wildcard"):
        local.up(0, host=host, folder=tmp_path / "c")
    assert not (tmp_path / "c").exists()


@pytest.mark.reliability(kind="security")
def test_mlflow_beyond_loopback_without_the_auth_app_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(local, "has_basic_auth", lambda: False)
    with pytest.raises(SystemExit, match=r"requires a login .*mlflow\[auth\]"):
        local.up(0, host="192.0.2.10", folder=tmp_path / "c")
    assert not (tmp_path / "c").exists()
    local.check_host("192.0.2.10", mlflow=False)  # no MLflow server: nothing to protect
    local.check_host("127.0.0.1", mlflow=True)  # loopback: no login needed
    local.check_host("localhost", mlflow=True)


@pytest.mark.reliability(kind="security")
def test_mlflow_beyond_loopback_runs_the_basic_auth_app_with_a_private_login(tmp_path):
    cmd, extra = local.mlflow_server_command(tmp_path, "127.0.0.1", 5000)
    assert "--app-name" not in cmd and extra == {}
    cmd, extra = local.mlflow_server_command(tmp_path, "192.0.2.10", 5000)
    assert cmd[cmd.index("--app-name") + 1] == "basic-auth" and cmd[cmd.index("--host") + 1] == "192.0.2.10"
    assert cmd[cmd.index("--allowed-hosts") + 1] == "192.0.2.10,192.0.2.10:5000"
    config = Path(extra["MLFLOW_AUTH_CONFIG_PATH"])
    assert stat.S_IMODE(config.stat().st_mode) == 0o600 and len(extra["MLFLOW_FLASK_SERVER_SECRET_KEY"]) == 64
    text = config.read_text()
    assert "default_permission = NO_PERMISSIONS" in text and f"sqlite:///{tmp_path}/mlflow_auth.db" in text
    user, password = local.read_mlflow_login(config)
    assert user == local.MLFLOW_USER and len(password) >= 24
    # a second start on the same folder keeps the login (the user store remembers the first password)
    _, again = local.mlflow_server_command(tmp_path, "192.0.2.10", 5001)
    assert again == extra and local.read_mlflow_login(config) == (user, password)


@pytest.mark.reliability(kind="security")
def test_the_nodes_get_the_mlflow_address_on_the_host_and_its_login(tmp_path, monkeypatch):
    """`up` on a non-loopback host: the MLflow URI the nodes (and so the jobs) get is on that host, with the
    login; nothing is started (the MLflow server, `ray start` and the waits are stand-ins)."""
    started: list[dict] = []
    monkeypatch.setattr(local, "has_basic_auth", lambda: True)
    monkeypatch.setattr(local, "free_port", lambda host="": 40000 + len(started))
    monkeypatch.setattr(local, "_wait_http", lambda *a, **k: None)

    def fake_mlflow(folder, host, env, artifacts=None):
        local.mlflow_server_command(folder, host, 5000)
        return f"http://{host}:5000", 11

    def fake_start(cmd, env, log, timeout=120):
        started.append({"cmd": cmd, "env": env})
        return 12 + len(started)

    monkeypatch.setattr(local, "start_mlflow_server", fake_mlflow)
    monkeypatch.setattr(local, "_start", fake_start)
    state = local.up(1, host="192.0.2.10", folder=tmp_path / "c")
    try:
        user, password = local.read_mlflow_login(tmp_path / "c" / local.MLFLOW_AUTH_FILE)
        assert len(started) == 2 and state.mlflow_auth == str((tmp_path / "c" / local.MLFLOW_AUTH_FILE).resolve())
        for node in started:
            assert node["env"]["MLFLOW_TRACKING_URI"] == "http://192.0.2.10:5000"
            assert node["env"]["MLFLOW_TRACKING_USERNAME"] == user
            assert node["env"]["MLFLOW_TRACKING_PASSWORD"] == password
            assert node["cmd"][node["cmd"].index("--node-ip-address") + 1] == "192.0.2.10"
        assert local.load_state(tmp_path / "c").mlflow_env() == {  # type: ignore[union-attr]
            "MLFLOW_TRACKING_USERNAME": user,
            "MLFLOW_TRACKING_PASSWORD": password,
        }
        assert password not in (tmp_path / "c" / local.STATE_FILE).read_text()
    finally:
        shutil.rmtree(state.temp_dir, ignore_errors=True)


@pytest.mark.reliability(kind="fault")
def test_waiting_for_a_server_that_exited_fails_at_once(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    proc.wait()
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"exited \(code 3\) before it answered"):
        local._wait_http("http://127.0.0.1:9/health", 60, "the MLflow server", tmp_path / "log", proc)
    assert time.monotonic() - started < 10
