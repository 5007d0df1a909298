"""Tests for emnist_cnn.io.nist_files and io.datasets: NIST formats, orientation, validation, cache, splits."""

import gzip
import json
import logging
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from emnist_cnn.io import datasets as data
from emnist_cnn.io.datasets import (
    DATASETS,
    Dataset,
    default_cache_dir,
    default_data_dir,
    find_dataset_files,
    load_dataset,
    read_idx_images,
    read_idx_labels,
    split_validation,
    subsample_stratified,
)
from emnist_cnn.errors import ConfigError, DataError

DIGIT_MAPPING = np.array([[i, 48 + i] for i in range(10)])
LETTER_MAPPING = np.array([[i, 64 + i, 96 + i] for i in range(1, 27)])


# --------------------------------------------------------------------------
# Builders for NIST's exact file formats


def l_shape() -> np.ndarray:
    """An upright "L": differs from its own transpose, so it pins orientation."""
    img = np.zeros((28, 28), np.uint8)
    img[4:23, 6:9] = 255  # vertical stroke on the left
    img[20:23, 6:20] = 200  # foot along the bottom
    return img


def upright_images(n: int, seed: int) -> np.ndarray:
    """n distinct upright images; image 0 is the L shape."""
    x = np.random.default_rng(seed).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    x[0] = l_shape()
    return x


def write_bytes(path: Path, payload: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        payload = gzip.compress(payload)
    path.write_bytes(payload)
    return path


def write_idx_images(path: Path, stored: np.ndarray, magic: int = 2051, dims=None) -> Path:
    dims = stored.shape if dims is None else dims
    header = struct.pack(">I", magic) + struct.pack(f">{len(dims)}I", *dims)
    return write_bytes(path, header + np.ascontiguousarray(stored, np.uint8).tobytes())


def write_idx_labels(path: Path, labels: np.ndarray, magic: int = 2049) -> Path:
    labels = np.asarray(labels, np.uint8)
    return write_bytes(path, struct.pack(">II", magic, labels.size) + labels.tobytes())


def emnist_stored(upright: np.ndarray) -> np.ndarray:
    """Store as EMNIST does: each 784-row is the upright image read column by column."""
    return np.stack([img.ravel(order="F") for img in upright]).reshape(-1, 28, 28)


def write_mapping(path: Path, mapping: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(" ".join(str(v) for v in row) + "\n" for row in mapping))
    return path


def make_split(n_train=60, n_test=20, mapping=DIGIT_MAPPING, seed=0):
    labels = mapping[:, 0]
    rng = np.random.default_rng(seed)
    return {
        "x_train": upright_images(n_train, seed),
        "y_train": labels[np.arange(n_train) % len(labels)],
        "x_test": upright_images(n_test, seed + 1),
        "y_test": labels[rng.permutation(np.arange(n_test) % len(labels))],
        "writers": 100 + np.arange(n_train) // 5,
        "mapping": mapping,
    }


def write_emnist_idx(root: Path, name: str, split: dict, mapping_file=True, sub="") -> dict:
    d = root / sub
    paths = {
        "train_images": write_idx_images(d / f"{name}-train-images-idx3-ubyte.gz", emnist_stored(split["x_train"])),
        "train_labels": write_idx_labels(d / f"{name}-train-labels-idx1-ubyte.gz", split["y_train"]),
        "test_images": write_idx_images(d / f"{name}-test-images-idx3-ubyte.gz", emnist_stored(split["x_test"])),
        "test_labels": write_idx_labels(d / f"{name}-test-labels-idx1-ubyte.gz", split["y_test"]),
    }
    if mapping_file:
        paths["mapping"] = write_mapping(d / f"{name}-mapping.txt", split["mapping"])
    return paths


def write_emnist_mat(root: Path, name: str, split: dict, sub="", drop=None) -> Path:
    """A .mat laid out like NIST's: dataset.{train,test}.{images,labels,writers}, dataset.mapping."""
    def part(x, y, writers):
        return {
            "images": emnist_stored(x).reshape(len(x), 784),
            "labels": np.asarray(y, np.uint8).reshape(-1, 1),
            "writers": np.asarray(writers, np.uint16).reshape(-1, 1),
        }

    dataset = {
        "train": part(split["x_train"], split["y_train"], split["writers"]),
        "test": part(split["x_test"], split["y_test"], np.zeros(len(split["y_test"]))),
        "mapping": np.asarray(split["mapping"], np.uint8),
    }
    if drop:
        *parents, key = drop
        target = dataset
        for p in parents:
            target = target[p]
        del target[key]
    path = root / sub / f"{name}.mat"
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, {"dataset": dataset})
    return path


def write_mnist_idx(root: Path, split: dict, ext=".gz") -> None:
    write_idx_images(root / f"train-images-idx3-ubyte{ext}", split["x_train"])
    write_idx_labels(root / f"train-labels-idx1-ubyte{ext}", split["y_train"])
    write_idx_images(root / f"t10k-images-idx3-ubyte{ext}", split["x_test"])
    write_idx_labels(root / f"t10k-labels-idx1-ubyte{ext}", split["y_test"])


@pytest.fixture(autouse=True)
def cache_root(tmp_path, monkeypatch) -> Path:
    """Keep the decoded cache (and the default data dir) out of the user's home."""
    root = tmp_path / "decoded-cache"
    monkeypatch.setenv("EMNIST_CNN_CACHE", str(root))
    monkeypatch.setenv("EMNIST_CNN_DATA", str(tmp_path / "no-default-data"))
    return root


@pytest.fixture
def split() -> dict:
    return make_split()


def assert_dataset_matches(ds: Dataset, split: dict, offset: int = 0) -> None:
    assert ds.x_train.dtype == np.uint8 and ds.x_train.shape == (len(split["y_train"]), 28, 28)
    assert ds.y_train.dtype == np.int64 and ds.y_test.dtype == np.int64
    np.testing.assert_array_equal(ds.x_train, split["x_train"])
    np.testing.assert_array_equal(ds.x_test, split["x_test"])
    np.testing.assert_array_equal(ds.y_train, split["y_train"] - offset)
    np.testing.assert_array_equal(ds.y_test, split["y_test"] - offset)


# --------------------------------------------------------------------------
# Formats and orientation


def test_synthetic_mat_has_nist_struct_indexing(tmp_path, split):
    path = write_emnist_mat(tmp_path, "emnist-digits", split)
    m = scipy.io.loadmat(path)
    ds = m["dataset"][0, 0]
    tr = ds["train"][0, 0]
    assert tr["images"].shape == (60, 784) and tr["images"].dtype == np.uint8
    assert tr["labels"].shape == (60, 1) and tr["writers"].shape == (60, 1)
    assert ds["test"][0, 0]["images"].shape == (20, 784)
    assert ds["mapping"].shape == (10, 2)


def test_emnist_storage_is_transposed_and_loader_undoes_it(tmp_path, split):
    # The stored row is the upright image read column by column (NIST's layout).
    stored_row = emnist_stored(split["x_train"][:1]).reshape(784)
    np.testing.assert_array_equal(stored_row.reshape(28, 28, order="F"), l_shape())
    assert not np.array_equal(stored_row.reshape(28, 28), l_shape())

    write_emnist_idx(tmp_path / "idx", "emnist-digits", split)
    write_emnist_mat(tmp_path / "mat", "emnist-digits", split)
    for sub in ("idx", "mat"):
        ds = load_dataset(data_dir=tmp_path / sub, cache=False)
        np.testing.assert_array_equal(ds.x_train[0], l_shape())
        # The L's vertical stroke stays on the left, its foot at the bottom.
        assert ds.x_train[0, 4:20, 7].min() == 255 and ds.x_train[0, 7, 10:20].max() == 0


def test_idx_round_trip(tmp_path, split):
    write_emnist_idx(tmp_path, "emnist-digits", split)
    ds = load_dataset("emnist-digits", tmp_path, cache=False)
    assert_dataset_matches(ds, split)
    assert ds.name == "emnist-digits"
    assert ds.classes == tuple("0123456789") and ds.num_classes == 10
    assert ds.writers_train is None
    assert "emnist-digits-train-images-idx3-ubyte.gz" in ds.source
    assert len(ds.fingerprint) == 64
    assert not ds.x_train.flags.writeable


def test_mat_round_trip_with_writers(tmp_path, split):
    path = write_emnist_mat(tmp_path, "emnist-digits", split)
    ds = load_dataset("emnist-digits", tmp_path, fmt="mat", cache=False)
    assert_dataset_matches(ds, split)
    assert ds.classes == tuple("0123456789")
    np.testing.assert_array_equal(ds.writers_train, split["writers"])
    assert ds.writers_train.dtype == np.int64
    assert str(path) in ds.source


def test_idx_and_mat_give_the_same_fingerprint(tmp_path, split):
    write_emnist_idx(tmp_path, "emnist-digits", split)
    write_emnist_mat(tmp_path, "emnist-digits", split)
    a = load_dataset(data_dir=tmp_path, fmt="idx", cache=False)
    b = load_dataset(data_dir=tmp_path, fmt="mat", cache=False)
    assert a.fingerprint == b.fingerprint
    other = make_split(seed=5)
    write_emnist_mat(tmp_path / "o", "emnist-digits", other)
    assert load_dataset(data_dir=tmp_path / "o", cache=False).fingerprint != a.fingerprint


@pytest.mark.parametrize("ext", [".gz", ""])
def test_mnist_idx_stays_upright(tmp_path, split, ext):
    write_mnist_idx(tmp_path, split, ext)
    ds = load_dataset("mnist", tmp_path, cache=False)
    assert_dataset_matches(ds, split)
    np.testing.assert_array_equal(ds.x_train[0], l_shape())
    assert ds.classes == tuple("0123456789")


def test_nist_zip_subfolders(tmp_path, split):
    write_emnist_idx(tmp_path, "emnist-mnist", split, sub="gzip")
    write_emnist_mat(tmp_path, "emnist-mnist", split, sub="matlab")
    assert find_dataset_files("emnist-mnist", tmp_path)["train_images"].parent.name == "gzip"
    assert find_dataset_files("emnist-mnist", tmp_path, fmt="mat")["mat"].parent.name == "matlab"
    for fmt in ("idx", "mat"):
        assert_dataset_matches(load_dataset("emnist-mnist", tmp_path, fmt=fmt, cache=False), split)


def test_letters_labels_shift_to_zero(tmp_path):
    split = make_split(n_train=52, n_test=26, mapping=LETTER_MAPPING)
    assert split["y_train"].min() == 1 and split["y_train"].max() == 26
    write_emnist_idx(tmp_path / "idx", "emnist-letters", split)
    write_emnist_mat(tmp_path / "mat", "emnist-letters", split)
    write_emnist_idx(tmp_path / "nomap", "emnist-letters", split, mapping_file=False)
    for sub in ("idx", "mat", "nomap"):
        ds = load_dataset("emnist-letters", tmp_path / sub, cache=False)
        assert_dataset_matches(ds, split, offset=1)
        assert ds.classes == tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
        assert ds.y_train.min() == 0 and ds.y_train.max() == 25


def test_classes_follow_mapping_label_order(tmp_path):
    # Mapping rows out of label order and with gaps-free labels 0..4.
    mapping = np.array([[3, 98], [0, 48], [4, 122], [1, 49], [2, 65]])
    split = make_split(n_train=20, n_test=10, mapping=mapping)
    write_emnist_idx(tmp_path, "emnist-balanced", split)
    ds = load_dataset("emnist-balanced", tmp_path, cache=False)
    assert ds.classes == ("0", "1", "A", "b", "z")
    np.testing.assert_array_equal(ds.y_train, split["y_train"])


def test_builtin_mapping_only_for_digits_and_letters(tmp_path, split):
    write_emnist_idx(tmp_path / "d", "emnist-digits", split, mapping_file=False)
    assert load_dataset("emnist-digits", tmp_path / "d", cache=False).classes == tuple("0123456789")
    write_emnist_idx(tmp_path / "b", "emnist-balanced", split, mapping_file=False)
    with pytest.raises(DataError, match="emnist-balanced-mapping.txt"):
        load_dataset("emnist-balanced", tmp_path / "b", cache=False)


def test_read_idx_functions_return_stored_data(tmp_path, split):
    p = write_idx_images(tmp_path / "x.gz", split["x_train"])
    q = write_idx_labels(tmp_path / "y", split["y_train"])
    np.testing.assert_array_equal(read_idx_images(p), split["x_train"])
    labels = read_idx_labels(q)
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels, split["y_train"])


# --------------------------------------------------------------------------
# Format choice


def test_fmt_none_picks_what_is_present(tmp_path, split):
    assert find_dataset_files("emnist-digits", tmp_path) is None
    write_emnist_mat(tmp_path, "emnist-digits", split)
    assert find_dataset_files("emnist-digits", tmp_path)["format"] == "mat"
    assert find_dataset_files("emnist-digits", tmp_path, fmt="idx") is None
    assert load_dataset(data_dir=tmp_path, cache=False).writers_train is not None  # came from mat
    with pytest.raises(DataError, match="emnist-digits-train-images-idx3-ubyte.gz"):
        load_dataset(data_dir=tmp_path, fmt="idx", cache=False)

    write_emnist_idx(tmp_path, "emnist-digits", split)
    assert find_dataset_files("emnist-digits", tmp_path)["format"] == "idx"
    assert load_dataset(data_dir=tmp_path, cache=False).writers_train is None  # idx preferred
    assert load_dataset(data_dir=tmp_path, fmt="mat", cache=False).writers_train is not None


def test_fmt_none_prefers_an_existing_decoded_cache(tmp_path, split):
    write_emnist_mat(tmp_path, "emnist-digits", split)
    load_dataset(data_dir=tmp_path)  # caches the mat decode
    write_emnist_idx(tmp_path, "emnist-digits", split)
    ds = load_dataset(data_dir=tmp_path)
    assert isinstance(ds.x_train, np.memmap) and ".mat" in ds.source
    assert ds.writers_train is not None


def test_unknown_name_or_format(tmp_path):
    assert "emnist-digits" in DATASETS and "mnist" in DATASETS and len(DATASETS) == 7
    with pytest.raises(ConfigError, match="unknown dataset"):
        load_dataset("emnist-digitz", tmp_path)
    with pytest.raises(ConfigError, match="unknown data format"):
        load_dataset("emnist-digits", tmp_path, fmt="csv")
    with pytest.raises(ConfigError):
        load_dataset("mnist", tmp_path, fmt="mat")


def test_default_dirs(monkeypatch, tmp_path):
    monkeypatch.setenv("EMNIST_CNN_DATA", str(tmp_path / "d"))
    monkeypatch.setenv("EMNIST_CNN_CACHE", str(tmp_path / "c"))
    assert default_data_dir() == tmp_path / "d" and default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("EMNIST_CNN_DATA")
    monkeypatch.delenv("EMNIST_CNN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert default_data_dir() == tmp_path / "x" / "emnist-cnn" / "data"
    assert default_cache_dir() == tmp_path / "x" / "emnist-cnn" / "decoded"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert default_data_dir() == tmp_path / "h" / ".cache" / "emnist-cnn" / "data"


def test_default_data_dir_is_used(tmp_path, split, monkeypatch):
    monkeypatch.setenv("EMNIST_CNN_DATA", str(tmp_path / "dd"))
    write_emnist_idx(tmp_path / "dd", "emnist-digits", split)
    assert_dataset_matches(load_dataset(cache=False), split)


# --------------------------------------------------------------------------
# Bad data: always DataError, one line, naming the file


def check_error(exc_info, needle: str) -> None:
    message = str(exc_info.value)
    assert needle in message, message
    assert "\n" not in message and "Traceback" not in message


def idx_case(tmp_path, split, target: str, writer) -> tuple[Path, str]:
    paths = write_emnist_idx(tmp_path, "emnist-digits", split)
    writer(paths[target])
    return tmp_path, paths[target].name


BAD_IDX = {
    "count mismatch": ("train_labels", lambda p: write_idx_labels(p, np.zeros(59))),
    "label out of range": ("test_labels", lambda p: write_idx_labels(p, np.full(20, 10))),
    "wrong image magic": ("train_images", lambda p: write_idx_images(p, np.zeros((60, 28, 28)), magic=2049)),
    "wrong label magic": ("test_labels", lambda p: write_idx_labels(p, np.zeros(20), magic=2051)),
    "wrong dims": ("train_images", lambda p: write_idx_images(p, np.zeros((60, 32, 32)))),
    "truncated payload": (
        "train_images", lambda p: write_idx_images(p, np.zeros((59, 28, 28)), dims=(60, 28, 28))),
    "trailing bytes": ("test_labels", lambda p: write_bytes(p, struct.pack(">II", 2049, 20) + bytes(21))),
    "truncated gzip": ("train_images", lambda p: p.write_bytes(p.read_bytes()[:-100])),
    "corrupt gzip": (
        "test_images", lambda p: p.write_bytes(p.read_bytes()[:40] + bytes(200) + p.read_bytes()[240:])),
    "not gzip": ("train_labels", lambda p: p.write_bytes(b"this is not gzip data at all")),
    "empty file": ("test_images", lambda p: p.write_bytes(gzip.compress(b"\x00\x00"))),
}


@pytest.mark.parametrize("case", sorted(BAD_IDX))
def test_bad_idx_files_raise_data_error(tmp_path, split, case):
    target, writer = BAD_IDX[case]
    root, fname = idx_case(tmp_path, split, target, writer)
    with pytest.raises(DataError) as exc_info:
        load_dataset("emnist-digits", root, cache=False)
    check_error(exc_info, fname)


def test_bad_mapping_file(tmp_path, split):
    paths = write_emnist_idx(tmp_path, "emnist-digits", split)
    paths["mapping"].write_text("0 48\nzero 49\n")
    with pytest.raises(DataError) as exc_info:
        load_dataset(data_dir=tmp_path, cache=False)
    check_error(exc_info, "emnist-digits-mapping.txt")


@pytest.mark.parametrize(
    "drop", [("train",), ("test", "images"), ("train", "labels"), ("mapping",)], ids="/".join
)
def test_mat_missing_struct_fields(tmp_path, split, drop):
    write_emnist_mat(tmp_path, "emnist-digits", split, drop=drop)
    with pytest.raises(DataError) as exc_info:
        load_dataset(data_dir=tmp_path, cache=False)
    check_error(exc_info, "emnist-digits.mat")
    assert drop[-1] in str(exc_info.value)


def test_mat_without_writers_still_loads(tmp_path, split):
    write_emnist_mat(tmp_path, "emnist-digits", split, drop=("train", "writers"))
    ds = load_dataset(data_dir=tmp_path, cache=False)
    assert ds.writers_train is None
    assert_dataset_matches(ds, split)


def test_mat_bad_content(tmp_path, split):
    path = tmp_path / "emnist-digits.mat"
    path.write_bytes(b"definitely not a MATLAB file" * 10)
    with pytest.raises(DataError) as exc_info:
        load_dataset(data_dir=tmp_path, cache=False)
    check_error(exc_info, "emnist-digits.mat")

    good = write_emnist_mat(tmp_path, "emnist-digits", split)
    good.write_bytes(good.read_bytes()[:2000])  # truncated
    with pytest.raises(DataError) as exc_info:
        load_dataset(data_dir=tmp_path, cache=False)
    check_error(exc_info, "emnist-digits.mat")

    scipy.io.savemat(path, {"something_else": np.zeros(3)})
    with pytest.raises(DataError, match="dataset") as exc_info:
        load_dataset(data_dir=tmp_path, cache=False)
    check_error(exc_info, "emnist-digits.mat")


@pytest.mark.parametrize("change", ["shape", "count", "labels"])
def test_mat_inconsistent_arrays(tmp_path, split, change):
    path = write_emnist_mat(tmp_path, "emnist-digits", split)
    m = scipy.io.loadmat(path)
    tr = m["dataset"][0, 0]["train"][0, 0]
    d = {k: tr[k] for k in ("images", "labels", "writers")}
    if change == "shape":
        d["images"] = d["images"][:, :700]
    elif change == "count":
        d["labels"] = d["labels"][:-1]
    else:
        d["labels"] = np.full_like(d["labels"], 12)
    ds = m["dataset"][0, 0]
    scipy.io.savemat(path, {"dataset": {"train": d, "test": {k: ds["test"][0, 0][k] for k in ("images", "labels")},
                                        "mapping": ds["mapping"]}})
    with pytest.raises(DataError) as exc_info:
        load_dataset(data_dir=tmp_path, cache=False)
    check_error(exc_info, "emnist-digits.mat")


def test_missing_files_message(tmp_path, split):
    paths = write_emnist_idx(tmp_path, "emnist-digits", split)
    paths["test_images"].unlink()
    with pytest.raises(DataError) as exc_info:
        load_dataset(data_dir=tmp_path)
    check_error(exc_info, str(tmp_path))
    message = str(exc_info.value)
    assert "emnist-digits-test-images-idx3-ubyte.gz" in message
    assert "emnist-digits.mat" in message and "emnist-cnn download" in message

    with pytest.raises(DataError) as exc_info:
        load_dataset("mnist", tmp_path)
    check_error(exc_info, "t10k-images-idx3-ubyte")

    with pytest.raises(DataError) as exc_info:
        load_dataset(data_dir=tmp_path / "nowhere")
    check_error(exc_info, "nowhere")


# --------------------------------------------------------------------------
# Decoded cache


def test_cache_reopens_memory_mapped_without_decoding(tmp_path, split, cache_root, monkeypatch):
    write_emnist_mat(tmp_path, "emnist-digits", split)
    first = load_dataset(data_dir=tmp_path)
    assert not isinstance(first.x_train, np.memmap)
    (entry,) = [p for p in cache_root.iterdir()]
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["fingerprint"] == first.fingerprint and meta["classes"] == list("0123456789")
    assert entry.name.startswith("emnist-digits-mat-")

    def no_decode(*args, **kwargs):
        raise AssertionError("decoded again instead of using the cache")

    monkeypatch.setattr(data, "_decode", no_decode)  # the proof that the cache is used (no clock needed)
    second = load_dataset(data_dir=tmp_path)
    assert isinstance(second.x_train, np.memmap) and isinstance(second.y_test, np.memmap)
    assert second.fingerprint == first.fingerprint and second.classes == first.classes
    for key in ("x_train", "y_train", "x_test", "y_test", "writers_train"):
        np.testing.assert_array_equal(getattr(second, key), getattr(first, key))
    assert "emnist-digits.mat" in second.source


def test_changed_source_invalidates_cache(tmp_path, split, cache_root):
    paths = write_emnist_idx(tmp_path, "emnist-digits", split)
    first = load_dataset(data_dir=tmp_path)
    changed = make_split(seed=9)
    write_idx_images(paths["train_images"], emnist_stored(changed["x_train"]))
    st = paths["train_images"].stat()
    os.utime(paths["train_images"], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    second = load_dataset(data_dir=tmp_path)
    np.testing.assert_array_equal(second.x_train, changed["x_train"])
    assert second.fingerprint != first.fingerprint
    assert len(list(cache_root.iterdir())) == 2


def test_corrupt_cache_entry_is_rebuilt(tmp_path, split, cache_root, caplog):
    write_emnist_idx(tmp_path, "emnist-digits", split)
    first = load_dataset(data_dir=tmp_path)
    (entry,) = list(cache_root.iterdir())
    npy = entry / "x_train.npy"
    npy.write_bytes(npy.read_bytes()[:1000])
    with caplog.at_level(logging.WARNING, logger="emnist_cnn.io.datasets"):
        second = load_dataset(data_dir=tmp_path)
    assert "corrupt data cache" in caplog.text
    np.testing.assert_array_equal(second.x_train, split["x_train"])
    assert second.fingerprint == first.fingerprint
    assert isinstance(load_dataset(data_dir=tmp_path).x_train, np.memmap)  # rebuilt entry works

    (entry / "meta.json").write_text("{not json")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="emnist_cnn.io.datasets"):
        third = load_dataset(data_dir=tmp_path)
    assert "corrupt data cache" in caplog.text and third.fingerprint == first.fingerprint


def test_unwritable_cache_root_still_loads(tmp_path, split, monkeypatch, caplog):
    write_emnist_idx(tmp_path / "d", "emnist-digits", split)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    # A path below a regular file cannot be created, even by root.
    monkeypatch.setenv("EMNIST_CNN_CACHE", str(blocker / "cache"))
    with caplog.at_level(logging.WARNING, logger="emnist_cnn.io.datasets"):
        ds = load_dataset(data_dir=tmp_path / "d")
    assert "continuing uncached" in caplog.text
    assert_dataset_matches(ds, split)


def test_cache_false_writes_nothing_and_data_dir_untouched(tmp_path, split, cache_root):
    write_emnist_idx(tmp_path / "d", "emnist-digits", split)
    before = sorted(p.name for p in (tmp_path / "d").rglob("*"))
    load_dataset(data_dir=tmp_path / "d", cache=False)
    assert not cache_root.exists()
    load_dataset(data_dir=tmp_path / "d")
    assert cache_root.exists()
    assert sorted(p.name for p in (tmp_path / "d").rglob("*")) == before
    assert not list(cache_root.glob(".*"))  # no temp folders left behind


# --------------------------------------------------------------------------
# Validation split and subsampling


def synthetic_dataset(writers: bool, n_writers=200, seed=0) -> Dataset:
    rng = np.random.default_rng(seed)
    counts = rng.integers(20, 60, size=n_writers)
    w = np.repeat(np.arange(1000, 1000 + n_writers), counts)
    n = w.size
    y = rng.integers(0, 10, size=n).astype(np.int64)
    x = np.zeros((n, 28, 28), np.uint8)
    return Dataset(
        name="synthetic", x_train=x, y_train=y, x_test=x[:5], y_test=y[:5],
        classes=tuple("0123456789"), writers_train=w if writers else None,
        fingerprint="0" * 64, source="memory",
    )


def test_split_by_writer():
    ds = synthetic_dataset(writers=True)
    n = len(ds.y_train)
    tr, va = split_validation(ds, 0.1, seed=3)
    assert tr.dtype == np.int64 and va.dtype == np.int64
    assert np.all(np.diff(tr) > 0) and np.all(np.diff(va) > 0)
    assert tr.size + va.size == n and np.intersect1d(tr, va).size == 0
    assert not set(ds.writers_train[tr]) & set(ds.writers_train[va])
    assert abs(va.size / n - 0.1) < 0.01
    tr2, va2 = split_validation(ds, 0.1, seed=3)
    np.testing.assert_array_equal(va, va2)
    np.testing.assert_array_equal(tr, tr2)
    assert not np.array_equal(split_validation(ds, 0.1, seed=4)[1], va)


def test_stratified_split_without_writers():
    ds = synthetic_dataset(writers=False)
    y = ds.y_train
    tr, va = split_validation(ds, 0.2, seed=0)
    assert tr.size + va.size == y.size and np.intersect1d(tr, va).size == 0
    for c in range(10):
        assert (y[va] == c).sum() == round(0.2 * (y == c).sum())
    np.testing.assert_array_equal(va, split_validation(ds, 0.2, seed=0)[1])


def test_split_fraction_zero_and_range():
    ds = synthetic_dataset(writers=True)
    tr, va = split_validation(ds, 0.0, seed=0)
    np.testing.assert_array_equal(tr, np.arange(len(ds.y_train)))
    assert va.size == 0 and va.dtype == np.int64
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ConfigError):
            split_validation(ds, bad, seed=0)


def test_subsample_stratified():
    y = np.repeat(np.arange(4), [100, 200, 300, 400])
    idx = subsample_stratified(y, 100, seed=1)
    assert idx.dtype == np.int64 and idx.size == 100 and np.all(np.diff(idx) > 0)
    np.testing.assert_array_equal(np.bincount(y[idx]), [10, 20, 30, 40])
    np.testing.assert_array_equal(idx, subsample_stratified(y, 100, seed=1))
    assert not np.array_equal(idx, subsample_stratified(y, 100, seed=2))
    assert subsample_stratified(y, 7, seed=0).size == 7  # exact size despite rounding
    np.testing.assert_array_equal(subsample_stratified(y, 5000, seed=0), np.arange(1000))
    np.testing.assert_array_equal(subsample_stratified(y, 1000, seed=0), np.arange(1000))
    assert subsample_stratified(y, 0, seed=0).size == 0


# --------------------------------------------------------------------------
# Real data in ../shared


def test_real_mnist_loads_upright(shared_dir):
    ds = load_dataset("mnist", shared_dir / "data" / "mnist")
    assert ds.x_train.shape == (10000, 28, 28) and ds.x_test.shape == (10000, 28, 28)
    assert ds.y_train.shape == (10000,) and ds.y_test.shape == (10000,)
    assert set(np.unique(ds.y_train)) == set(range(10)) == set(np.unique(ds.y_test))
    assert ds.classes == tuple("0123456789")

    x = ds.x_test.astype(np.float64)
    mean = x.mean(axis=0)
    rows, cols = np.indices((28, 28))
    com = ((mean * rows).sum() / mean.sum(), (mean * cols).sum() / mean.sum())
    assert abs(com[0] - 14) < 1 and abs(com[1] - 14) < 1

    def spread(profile):
        pos = np.arange(28)
        mu = (profile * pos).sum() / profile.sum()
        return np.sqrt((profile * (pos - mu) ** 2).sum() / profile.sum())

    # Upright "1"s are tall and thin; transposed they would be wide and flat.
    ones = x[ds.y_test == 1].mean(axis=0)
    assert spread(ones.sum(axis=1)) > 1.8 * spread(ones.sum(axis=0))
    # A "7" has its bar at the top, not down the left side.
    sevens = x[ds.y_test == 7].mean(axis=0)
    assert sevens[4:9].mean() > 1.5 * sevens[:, 4:9].mean()


def test_real_emnist_digits_label_files(shared_dir):
    emnist = shared_dir / "data" / "emnist"
    train = read_idx_labels(emnist / "emnist-digits-train-labels-idx1-ubyte.gz")
    test = read_idx_labels(emnist / "emnist-digits-test-labels-idx1-ubyte.gz")
    assert train.shape == (240000,) and test.shape == (40000,)
    np.testing.assert_array_equal(np.bincount(train), [24000] * 10)
    np.testing.assert_array_equal(np.bincount(test), [4000] * 10)
    # The images are not in ../shared: loading says what is missing and how to get it.
    with pytest.raises(DataError, match="emnist-cnn download"):
        load_dataset("emnist-digits", emnist)
