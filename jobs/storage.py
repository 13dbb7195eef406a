"""Run folders at a local path or at a URI (s3://, gs://, hdfs://, ...): pyarrow's filesystems, the layer Ray uses.

A run folder at a URI is *staged*. The driver works in a local folder (`$INVGAN_STAGE`, default
~/.cache/invgan/stage/<name>-<hash of the URI>) exactly as it does with a local run folder, and pushes each
file to the URI as soon as it is complete: a shard right after it is written (with the progress log), the
config record before the first shard, summary, tables and figures at the end. Opening the stage first makes
the local folder a copy of what the URI holds, so a resume, on this machine or another, computes only the
shards the URI lacks. Workers never read the run folder: what they need travels with the job (jobs/sharded.py).

What changes on object storage, compared with a local folder:
- *complete or absent* holds without a rename: an S3 or GCS object becomes visible only when its upload
  completes (one PUT, or a completed multipart upload), so a killed driver leaves no partial shard.
- *one writer* is a lease, not a flock: `<uri>/.lock` names its holder and an expiry that the holder renews
  every minute. Taking it is a read, then a write: two drivers started within the same second could both take
  it (pyarrow does not expose S3's conditional writes). A lease whose holder was killed blocks a new driver
  until it expires (LEASE_S), unless the holder ran on the same machine and its process is gone.
- a run folder's files under the URI are its record; a local stage is a cache, refreshed from the URI on open
  (a file there that the URI lacks is removed).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pyarrow import fs as pafs

from invgan_core.files import atomic_write_bytes
from jobs.common import UserError
from jobs.common import is_uri as is_uri  # a URI or a path: told apart in jobs.common (runs_dir needs it too)
from jobs.common import local_path as local_path

LEASE_S = 600.0  # a killed holder's lease blocks other machines this long
LOCAL_ONLY = {".lock"}  # the local flock file: never pushed, never removed by a pull


def join(location: str | Path, name: str) -> str | Path:
    return f"{str(location).rstrip('/')}/{name}" if is_uri(location) else local_path(location) / name


def stage_root() -> Path:
    return Path(os.environ.get("INVGAN_STAGE", Path.home() / ".cache" / "invgan" / "stage")).resolve()


@dataclass
class Stage:
    """A run folder at a URI and the local folder that stands in for it."""

    uri: str
    local: Path
    fs: pafs.FileSystem = field(repr=False)
    root: str = field(repr=False)  # the URI's path inside its filesystem
    _lease: threading.Event | None = field(default=None, repr=False)

    @classmethod
    def of(cls, uri: str) -> Stage:
        try:
            filesystem, root = pafs.FileSystem.from_uri(uri)
        except Exception as err:  # noqa: BLE001 - pyarrow raises ArrowInvalid/OSError for unknown schemes
            raise UserError(f"{uri}: not a location this machine can write ({err})") from None
        name = root.rstrip("/").rsplit("/", 1)[-1] or "run"
        local = stage_root() / f"{name}-{hashlib.sha256(uri.encode()).hexdigest()[:12]}"
        return cls(uri.rstrip("/"), local, filesystem, root.rstrip("/"))

    def key(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def remote_files(self, skip: tuple[str, ...] = ()) -> dict[str, int]:
        """{path relative to the run folder: size} of every file under the URI, but those in the top-level
        folders named in `skip` (never listed: e.g. Tune's experiment folder)."""
        out: dict[str, int] = {}
        todo = [self.root]
        while todo:
            for info in self.fs.get_file_info(pafs.FileSelector(todo.pop(), allow_not_found=True)):
                rel = info.path[len(self.root) + 1 :]
                if info.type == pafs.FileType.Directory and rel not in skip:
                    todo.append(info.path)
                elif info.type == pafs.FileType.File:
                    out[rel] = info.size
        return out

    def pull(self, prune: bool = True, skip: tuple[str, ...] = ()) -> int:
        """Make the local folder a copy of the URI's files (`prune`: remove local files the URI lacks; `skip`: top
        folders left alone); returns how many files were downloaded."""
        remote = {k: v for k, v in self.remote_files(skip).items() if k not in LOCAL_ONLY}
        self.local.mkdir(parents=True, exist_ok=True)
        for path in [p for p in self.local.rglob("*") if p.is_file()] if prune else []:
            rel = path.relative_to(self.local).as_posix()
            if rel not in remote and rel not in LOCAL_ONLY and rel.split("/", 1)[0] not in skip:
                path.unlink()
        fetched = 0
        for rel, size in remote.items():
            target = self.local / rel
            if target.exists() and target.stat().st_size == size:
                continue
            with self.fs.open_input_stream(self.key(rel)) as src:
                atomic_write_bytes(target, src.read())
            fetched += 1
        return fetched

    def push(self, *paths: Path) -> None:
        """Upload local files of the stage (each appears at the URI complete, or not at all)."""
        for path in paths:
            if path.exists():
                rel = path.relative_to(self.local).as_posix()
                with self.fs.open_output_stream(self.key(rel)) as out:
                    out.write(path.read_bytes())

    def push_all(self) -> None:
        self.push(*[p for p in sorted(self.local.rglob("*")) if p.is_file() and _pushable(p, self.local)])

    def move(self, rel: str, to: str) -> None:
        self.fs.move(self.key(rel), self.key(to))

    # ------------------------------------------------------------ the writer's lease

    def take_lease(self) -> None:
        """Hold `<uri>/.lock` while this process writes the run folder (renewed every LEASE_S / 10)."""
        if self._lease is not None:
            return
        me = {"host": socket.gethostname(), "pid": os.getpid()}
        held = self._read_json(".lock")
        if held and {k: held.get(k) for k in me} != me and held.get("expires", 0) > time.time() and _alive(held):
            raise UserError(
                f"{self.uri} is being written by pid {held.get('pid')} on {held.get('host')} (lease until "
                f"{time.strftime('%H:%M:%S', time.localtime(held['expires']))}): wait for it to finish, or choose "
                "another --out"
            )
        self._write_lease(me)
        self._lease = threading.Event()
        threading.Thread(target=self._renew, args=(me, self._lease), daemon=True, name="invgan-lease").start()
        atexit.register(self.release_lease)

    def release_lease(self) -> None:
        if self._lease is None:
            return
        self._lease.set()
        self._lease = None
        try:
            held = self._read_json(".lock")
            if held and held.get("pid") == os.getpid() and held.get("host") == socket.gethostname():
                self.fs.delete_file(self.key(".lock"))
        except OSError as err:  # the store is gone: the lease expires by itself
            print(f"warning: could not release the lease {self.uri}/.lock ({err})", file=sys.stderr)

    def _renew(self, me: dict, stop: threading.Event) -> None:
        while not stop.wait(LEASE_S / 10):
            try:
                self._write_lease(me)
            except OSError:  # a network blip: the next renewal tries again, well within the lease
                pass

    def _write_lease(self, me: dict) -> None:
        lease = me | {"since": time.time(), "expires": time.time() + LEASE_S}
        with self.fs.open_output_stream(self.key(".lock")) as out:
            out.write(json.dumps(lease).encode())

    def _read_json(self, rel: str) -> dict | None:
        try:
            with self.fs.open_input_stream(self.key(rel)) as src:
                return json.loads(src.read())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        except OSError as err:
            if "not found" in str(err).lower() or "NoSuchKey" in str(err):
                return None
            raise


def _pushable(path: Path, root: Path) -> bool:
    rel = path.relative_to(root).as_posix()
    return rel not in LOCAL_ONLY and not path.name.startswith(".") and not path.name.endswith(".tmp")


def _alive(held: dict) -> bool:
    """False when the holder ran on this machine and its process is gone (a killed driver: resume at once)."""
    if held.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(held.get("pid", 0)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True
    return True


_STAGES: dict[Path, Stage] = {}  # local stand-in -> its stage, for every URI run folder this process opened


def stand_in(uri: str) -> Path:
    """The local folder that stands for the run folder at `uri` (registered; nothing is read yet)."""
    stage = Stage.of(uri)
    _STAGES.setdefault(stage.local, stage)
    return stage.local


def stage_of(path: Path) -> Stage | None:
    """The stage a local path belongs to (None: a plain local run folder)."""
    path = Path(path).resolve()
    for local, stage in _STAGES.items():
        if path == local or local in path.parents:
            return stage
    return None


def where(run_dir: Path) -> str:
    """What to show the user: the URI of a staged run folder, else its path."""
    stage = stage_of(run_dir)
    return stage.uri if stage else str(run_dir)


def push(*paths: Path) -> None:
    """Upload files of staged run folders to their URI (nothing to do for a local run folder's files)."""
    for path in paths:
        stage = stage_of(path)
        if stage is not None:
            stage.push(path)


def finish(run_dir: Path) -> None:
    """A job's end: every file of a staged run folder to its URI, then its lease released."""
    stage = stage_of(run_dir)
    if stage is not None:
        stage.push_all()
        stage.release_lease()


def fetch(uri: str, dest: Path) -> int:
    """Copy a run folder at a URI to a local folder (`invgan fetch`); returns the files copied."""
    stage = Stage.of(uri)
    stage.local = Path(dest).resolve()
    if not stage.remote_files():
        raise UserError(f"{uri}: no files there (is the URI right, and are the credentials for it set?)")
    return stage.pull(prune=False)
