"""Model files: safetensors weights + a JSON manifest; verified on load, never unpickled.

`<stem>.safetensors` holds the tensors; `<stem>.json` holds what is needed to rebuild and trust them:
kind, architecture, dataset and split, training config, metrics, the command that produced them, and
the sha256 of the weights file. Loading checks the hash before reading a byte of tensor data, then the
shapes against the architecture. Both files are written atomically (temp file + rename).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from invgan_core.files import atomic_write_json
from invgan_core.files import make_readable as make_readable  # the files module's, re-exported
from invgan_core.models import build_model

MANIFEST_VERSION = 1


class CheckpointError(RuntimeError):
    """A model file is missing, altered, truncated or does not match its manifest."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _paths(stem: str | Path) -> tuple[Path, Path]:
    stem = Path(stem)
    if stem.suffix in (".safetensors", ".json"):
        stem = stem.with_suffix("")
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def save_model(stem: str | Path, model: nn.Module, *, kind: str, arch: dict, **manifest: Any) -> dict:
    """Save `model` as `<stem>.safetensors` + `<stem>.json`; returns the manifest written.

    Extra keyword arguments (dataset, split, training, metrics, command, ...) go into the manifest.
    """
    weights_path, manifest_path = _paths(stem)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=weights_path.parent, prefix=f".{weights_path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"kind": kind})
        digest = sha256_file(Path(tmp))
        make_readable(tmp)
        os.replace(tmp, weights_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    full = {
        "format_version": MANIFEST_VERSION,
        "kind": kind,
        "arch": arch,
        "weights_file": weights_path.name,
        "sha256": digest,
        "tensors": {k: list(v.shape) for k, v in state.items()},
        **manifest,
    }
    atomic_write_json(manifest_path, full)
    return full


def read_manifest(stem: str | Path) -> dict:
    _, manifest_path = _paths(stem)
    if not manifest_path.exists():
        raise CheckpointError(f"missing manifest {manifest_path}")
    try:
        return json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{manifest_path}: not valid JSON ({err})") from err


def load_model(
    stem: str | Path, *, kind: str | None = None, map_location: str | torch.device = "cpu", eval_mode: bool = True
) -> tuple[nn.Module, dict]:
    """Rebuild and load a saved model after verifying its hash and shapes; returns (model, manifest)."""
    weights_path, manifest_path = _paths(stem)
    manifest = read_manifest(stem)
    if kind is not None and manifest.get("kind") != kind:
        raise CheckpointError(f"{manifest_path}: holds a {manifest.get('kind')!r}, expected a {kind!r}")
    if not weights_path.exists():
        raise CheckpointError(f"missing weights file {weights_path} (named by {manifest_path})")
    actual = sha256_file(weights_path)
    if actual != manifest.get("sha256"):
        raise CheckpointError(
            f"{weights_path}: sha256 {actual} does not match {manifest.get('sha256')} recorded in "
            f"{manifest_path}; the file was altered or truncated"
        )
    model = build_model(manifest["kind"], manifest["arch"])
    try:
        state = load_file(str(weights_path))
    except Exception as err:  # safetensors raises its own error types
        raise CheckpointError(f"{weights_path}: unreadable safetensors file ({err})") from err
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        diff = sorted(set(expected.items()) ^ set(got.items()))[:6]
        raise CheckpointError(f"{weights_path}: tensors do not match the architecture in {manifest_path}: {diff}")
    model.load_state_dict(state)
    model.to(map_location)
    if eval_mode:
        model.eval()
    return model, manifest
