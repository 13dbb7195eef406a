"""Model files: exact round trips, a manifest that records what it should, and loud failures."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch

from invgan_core.checkpoint import CheckpointError, load_model, read_manifest, save_model
from invgan_core.models import build_model, default_arch

SHAPE = (1, 8, 8)  # small models: every test here runs in milliseconds


def trained_like(kind: str):
    """A model whose batch-norm running statistics have moved off their defaults."""
    torch.manual_seed(0)
    arch = default_arch(kind, SHAPE)
    model = build_model(kind, arch).train()
    with torch.no_grad():
        for _ in range(3):
            model(3 * torch.randn(8, arch["latent_dim"]) if kind == "generator" else torch.rand(8, *SHAPE))
    return model.eval(), arch


def model_input(kind: str, model) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(6, model.latent_dim) if kind == "generator" else torch.rand(6, *SHAPE)


@pytest.fixture
def saved(tmp_path):
    model, arch = trained_like("generator")
    manifest = save_model(tmp_path / "G", model, kind="generator", arch=arch, dataset="digits")
    return tmp_path / "G", model, manifest


@pytest.mark.parametrize("kind", ["generator", "discriminator", "inverter", "classifier"])
def test_round_trip_gives_identical_outputs(tmp_path, kind):
    model, arch = trained_like(kind)
    save_model(tmp_path / kind, model, kind=kind, arch=arch)
    loaded, _ = load_model(tmp_path / kind, kind=kind)
    assert not loaded.training
    x = model_input(kind, model)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name  # includes the batch-norm buffers


@pytest.mark.parametrize("suffix", ["", ".safetensors", ".json"])
def test_stem_may_name_either_file(saved, suffix):
    stem, model, _ = saved
    loaded, _ = load_model(str(stem) + suffix)
    z = model_input("generator", model)
    with torch.no_grad():
        assert torch.equal(loaded(z), model(z))


def test_manifest_records_hash_tensors_kind_arch_and_extras(tmp_path):
    model, arch = trained_like("generator")
    extras = {"dataset": "digits", "split": "train", "metrics": {"fid": 1.5}, "command": "invgan train gan"}
    returned = save_model(tmp_path / "G", model, kind="generator", arch=arch, **extras)
    on_disk = json.loads((tmp_path / "G.json").read_text())

    assert on_disk == returned == read_manifest(tmp_path / "G")
    assert on_disk["sha256"] == hashlib.sha256((tmp_path / "G.safetensors").read_bytes()).hexdigest()
    assert on_disk["tensors"] == {k: list(v.shape) for k, v in model.state_dict().items()}
    assert on_disk["kind"] == "generator" and on_disk["arch"] == arch
    assert on_disk["weights_file"] == "G.safetensors"
    for key, value in extras.items():
        assert on_disk[key] == value
    _, loaded_manifest = load_model(tmp_path / "G")
    assert loaded_manifest["metrics"] == {"fid": 1.5}


@pytest.mark.reliability(kind="bad_input")
@pytest.mark.parametrize("where", [0, 0.5, -1])
def test_flipped_byte_is_caught_by_the_hash(saved, where):
    stem, _, manifest = saved
    weights = stem.with_suffix(".safetensors")
    data = bytearray(weights.read_bytes())
    i = int(where * len(data)) if isinstance(where, float) else where
    data[i] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as err:
        load_model(stem)
    assert str(weights) in str(err.value)
    assert manifest["sha256"] in str(err.value)


@pytest.mark.reliability(kind="bad_input")
@pytest.mark.parametrize("keep", [0, 8, -1])
def test_truncated_weights_are_caught(saved, keep):
    stem, _, manifest = saved
    weights = stem.with_suffix(".safetensors")
    data = weights.read_bytes()
    weights.write_bytes(data[:keep])
    with pytest.raises(CheckpointError, match="altered or truncated") as err:
        load_model(stem)
    assert manifest["sha256"] in str(err.value)


@pytest.mark.reliability(kind="bad_input")
@pytest.mark.parametrize("edit", [{"latent_dim": 8}, {"width": 16}, {"image_shape": [1, 28, 28]}])
def test_edited_arch_with_matching_hash_is_caught(saved, edit):
    stem, _, manifest = saved
    manifest["arch"] = {**manifest["arch"], **edit}
    stem.with_suffix(".json").write_text(json.dumps(manifest))  # hash untouched: the weights are fine
    with pytest.raises(CheckpointError, match="tensors do not match"):
        load_model(stem)


@pytest.mark.parametrize("remove, named", [(".safetensors", "G.safetensors"), (".json", "G.json")])
def test_missing_file_is_named(saved, remove, named):
    stem, _, _ = saved
    stem.with_suffix(remove).unlink()
    with pytest.raises(CheckpointError, match="missing") as err:
        load_model(stem)
    assert named in str(err.value)


def test_wrong_kind_is_refused(saved):
    stem, _, _ = saved
    with pytest.raises(CheckpointError, match="inverter"):
        load_model(stem, kind="inverter")
    model, _ = load_model(stem, kind="generator")  # the right kind loads
    assert model.latent_dim == 16


def test_manifest_that_is_not_json_is_refused(saved):
    stem, _, _ = saved
    stem.with_suffix(".json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(stem)


def test_save_leaves_only_the_two_files(tmp_path):
    model, arch = trained_like("inverter")
    for _ in range(2):  # overwriting too
        save_model(tmp_path / "runs" / "I", model, kind="inverter", arch=arch)
    files = sorted(os.listdir(tmp_path / "runs"))  # listdir shows the hidden '.I.safetensors.*.tmp' too
    assert files == ["I.json", "I.safetensors"]
