"""Load EMNIST / MNIST from NIST's .mat or gzip idx files into upright uint8 arrays.

Every :class:`Dataset` returned holds images as uint8 ``(N, 28, 28)`` in the
upright orientation (as a person would read the digit). EMNIST stores its
images transposed (a 784-pixel row is the upright image read column by
column), MNIST idx files do not; this module undoes the difference so that no
caller ever has to think about it.

Decoded arrays are cached as ``.npy`` files and memory-mapped on later loads,
so reopening EMNIST Digits takes a fraction of a second instead of a parse.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import DATASETS, DEFAULT_DATASET, IMAGE_SIDE
from ..errors import ConfigError, DataError
from .nist_files import (
    DOWNLOAD_HINT,
    decode_idx,
    decode_mat,
    read_idx_images,
    read_idx_labels,
    read_mapping_txt,
)

__all__ = ["IDX_PARTS", "find_file_names", "Dataset", "default_data_dir", "default_cache_dir", "find_dataset_files",
           "read_idx_images", "read_idx_labels", "read_mapping_txt", "load_dataset", "split_validation",
           "subsample_stratified"]

log = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("idx", "mat")

# Bump when the cache layout or decoding changes, so old entries are not reused.
_CACHE_VERSION = 1
_ARRAY_NAMES = ("x_train", "y_train", "x_test", "y_test")
# The four idx files of every dataset, by their keys in `find_file_names`.
IDX_PARTS = ("train_images", "train_labels", "test_images", "test_labels")


@dataclass(frozen=True, eq=False)
class Dataset:
    """Upright uint8 images with int64 labels 0..C-1 (arrays are read-only)."""

    name: str
    x_train: np.ndarray = field(repr=False)
    y_train: np.ndarray = field(repr=False)
    x_test: np.ndarray = field(repr=False)
    y_test: np.ndarray = field(repr=False)
    classes: tuple[str, ...]
    writers_train: np.ndarray | None = field(repr=False)
    fingerprint: str
    source: str

    @property
    def num_classes(self) -> int:
        """Number of classes (length of ``classes``)."""
        return len(self.classes)


# --------------------------------------------------------------------------
# Locations


def _env_path(var: str) -> Path | None:
    value = os.environ.get(var, "").strip()
    return Path(value).expanduser() if value else None


def _xdg_cache_home() -> Path:
    xdg = _env_path("XDG_CACHE_HOME")
    # The XDG spec says to ignore relative values.
    return xdg if xdg is not None and xdg.is_absolute() else Path.home() / ".cache"


def default_data_dir() -> Path:
    """$EMNIST_CNN_DATA, else $XDG_CACHE_HOME/emnist-cnn/data, else ~/.cache/emnist-cnn/data."""
    return _env_path("EMNIST_CNN_DATA") or _xdg_cache_home() / "emnist-cnn" / "data"


def default_cache_dir() -> Path:
    """$EMNIST_CNN_CACHE, else $XDG_CACHE_HOME/emnist-cnn/decoded, else ~/.cache/emnist-cnn/decoded."""
    return _env_path("EMNIST_CNN_CACHE") or _xdg_cache_home() / "emnist-cnn" / "decoded"


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")


def _check_fmt(name: str, fmt: str | None) -> None:
    if fmt is None:
        return
    if fmt not in FORMATS:
        raise ConfigError(f"unknown data format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if name == "mnist" and fmt != "idx":
        raise ConfigError("dataset 'mnist' exists only in idx format (fmt='idx')")


def find_file_names(name: str) -> dict[str, str]:
    """A dataset's file names as NIST and MNIST publish them: its four idx files (without .gz), and for an EMNIST
    split its mapping and .mat file."""
    if name == "mnist":
        return {
            "train_images": "train-images-idx3-ubyte",
            "train_labels": "train-labels-idx1-ubyte",
            "test_images": "t10k-images-idx3-ubyte",
            "test_labels": "t10k-labels-idx1-ubyte",
        }
    return {
        "train_images": f"{name}-train-images-idx3-ubyte",
        "train_labels": f"{name}-train-labels-idx1-ubyte",
        "test_images": f"{name}-test-images-idx3-ubyte",
        "test_labels": f"{name}-test-labels-idx1-ubyte",
        "mapping": f"{name}-mapping.txt",
        "mat": f"{name}.mat",
    }


def _first_existing(candidates: list[Path]) -> Path | None:
    for path in candidates:
        if path.is_file():
            return path
    return None


def _locate(name: str, data_dir: Path) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """All complete formats present for ``name``, plus the file names looked for but missing."""
    found: dict[str, dict[str, Any]] = {}
    missing: list[str] = []

    # idx: NIST's zip puts these under gzip/; the .gz form is preferred but an
    # unpacked file is accepted too.
    idx_dirs = [data_dir] if name == "mnist" else [data_dir, data_dir / "gzip"]
    paths: dict[str, Any] = {}
    names = find_file_names(name)
    for part in IDX_PARTS:
        base = names[part]
        path = _first_existing([d / f"{base}{ext}" for d in idx_dirs for ext in (".gz", "")])
        if path is None:
            missing.append(f"{base}.gz")
        paths[part] = path
    if all(paths[p] is not None for p in IDX_PARTS):
        mapping = None
        if name != "mnist":
            mapping = _first_existing([d / names["mapping"] for d in idx_dirs])
        found["idx"] = {"format": "idx", **paths, "mapping": mapping}

    if name != "mnist":
        mat_name = names["mat"]
        mat = _first_existing([data_dir / mat_name, data_dir / "matlab" / mat_name])
        if mat is None:
            missing.append(mat_name)
        else:
            found["mat"] = {"format": "mat", "mat": mat}
    return found, missing


def find_dataset_files(name: str, data_dir: str | os.PathLike[str], fmt: str | None = None) -> dict[str, Any] | None:
    """Paths of the preferred complete format present (idx before mat), or None.

    The dict has ``format`` ("idx" or "mat") and either ``mat`` or
    ``train_images``, ``train_labels``, ``test_images``, ``test_labels`` and
    ``mapping`` (a Path, or None when absent).
    """
    _check_name(name)
    _check_fmt(name, fmt)
    found, _ = _locate(name, Path(data_dir))
    for candidate in FORMATS if fmt is None else (fmt,):
        if candidate in found:
            return found[candidate]
    return None


def _source_paths(files: dict[str, Any]) -> list[Path]:
    if files["format"] == "mat":
        return [files["mat"]]
    paths = [files[p] for p in IDX_PARTS]
    if files.get("mapping") is not None:
        paths.append(files["mapping"])
    return paths


def _source_text(paths: list[Path]) -> str:
    parents = {p.parent for p in paths}
    if len(paths) > 1 and len(parents) == 1:
        return f"{paths[0].parent}/{{{','.join(p.name for p in paths)}}}"
    return ", ".join(str(p) for p in paths)


def _fingerprint(arrays: list[np.ndarray]) -> str:
    h = hashlib.sha256()
    for arr in arrays:
        h.update(f"{arr.dtype.str}{arr.shape};".encode())
        h.update(np.ascontiguousarray(arr).data)
    return h.hexdigest()


def _readonly(arr: np.ndarray) -> np.ndarray:
    arr.flags.writeable = False
    return arr


# --------------------------------------------------------------------------
# Decoding


def _decode(name: str, files: dict[str, Any]) -> Dataset:
    start = time.perf_counter()
    arrays = decode_idx(name, files) if files["format"] == "idx" else decode_mat(name, files)
    for key in _ARRAY_NAMES:
        arrays[key] = _readonly(np.ascontiguousarray(arrays[key]))
    writers = arrays["writers_train"]
    if writers is not None:
        writers = _readonly(np.ascontiguousarray(writers))
    dataset = Dataset(
        name=name,
        x_train=arrays["x_train"],
        y_train=arrays["y_train"],
        x_test=arrays["x_test"],
        y_test=arrays["y_test"],
        classes=arrays["classes"],
        writers_train=writers,
        fingerprint=_fingerprint([arrays[k] for k in _ARRAY_NAMES]),
        source=_source_text(_source_paths(files)),
    )
    log.info(
        "decoded %s from %s (%d train, %d test, %d classes) in %.1f s",
        name, dataset.source, len(dataset.y_train), len(dataset.y_test),
        dataset.num_classes, time.perf_counter() - start,
    )
    return dataset


# --------------------------------------------------------------------------
# Decoded cache


def _cache_key(name: str, files: dict[str, Any]) -> str:
    entries = []
    for path in _source_paths(files):
        st = Path(path).stat()
        entries.append([str(Path(path).resolve()), st.st_size, st.st_mtime_ns])
    blob = json.dumps([_CACHE_VERSION, name, files["format"], entries])
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _cache_entry(name: str, files: dict[str, Any]) -> Path:
    return default_cache_dir() / f"{name}-{files['format']}-{_cache_key(name, files)}"


def _read_cache(entry: Path, name: str) -> Dataset | None:
    """The cached dataset in ``entry``, None if absent; a corrupt entry is removed."""
    if not entry.is_dir():
        return None
    try:
        meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
        if meta.get("version") != _CACHE_VERSION or meta.get("name") != name:
            raise ValueError("meta.json does not match this version or dataset")
        arrays = {k: np.load(entry / f"{k}.npy", mmap_mode="r", allow_pickle=False) for k in _ARRAY_NAMES}
        writers = None
        if meta.get("has_writers"):
            writers = np.load(entry / "writers_train.npy", mmap_mode="r", allow_pickle=False)
        # Cheap structural checks; re-hashing the arrays would cost the time the cache saves.
        for split in ("train", "test"):
            x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
            if x.dtype != np.uint8 or x.shape != (meta[f"n_{split}"], IMAGE_SIDE, IMAGE_SIDE):
                raise ValueError(f"x_{split}.npy has {x.dtype} {x.shape}")
            if y.dtype != np.int64 or y.shape != (meta[f"n_{split}"],):
                raise ValueError(f"y_{split}.npy has {y.dtype} {y.shape}")
        if writers is not None and writers.shape != arrays["y_train"].shape:
            raise ValueError(f"writers_train.npy has shape {writers.shape}")
        return Dataset(
            name=name,
            x_train=arrays["x_train"],
            y_train=arrays["y_train"],
            x_test=arrays["x_test"],
            y_test=arrays["y_test"],
            classes=tuple(str(c) for c in meta["classes"]),
            writers_train=writers,
            fingerprint=str(meta["fingerprint"]),
            source=f"{meta['source']} (decoded cache {entry})",
        )
    except (OSError, ValueError, KeyError, TypeError, EOFError) as exc:
        log.warning("ignoring corrupt data cache %s (%s); rebuilding it", entry, exc)
        shutil.rmtree(entry, ignore_errors=True)
        return None


def _write_cache(entry: Path, dataset: Dataset) -> None:
    """Store ``dataset`` in ``entry`` atomically; on any OS error, warn and go on uncached."""
    tmp: Path | None = None
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        # Write everything in a sibling temp folder and rename it into place, so
        # a concurrent or interrupted writer never leaves a half-written entry.
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
        for key in _ARRAY_NAMES:
            np.save(tmp / f"{key}.npy", getattr(dataset, key), allow_pickle=False)
        if dataset.writers_train is not None:
            np.save(tmp / "writers_train.npy", dataset.writers_train, allow_pickle=False)
        meta = {
            "version": _CACHE_VERSION,
            "name": dataset.name,
            "classes": list(dataset.classes),
            "fingerprint": dataset.fingerprint,
            "source": dataset.source,
            "has_writers": dataset.writers_train is not None,
            "n_train": int(len(dataset.y_train)),
            "n_test": int(len(dataset.y_test)),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        try:
            os.rename(tmp, entry)
            tmp = None
        except OSError:
            if not entry.is_dir():
                raise
            log.debug("data cache %s was written concurrently; keeping that one", entry)
        else:
            log.info("cached decoded %s in %s", dataset.name, entry)
    except OSError as exc:
        log.warning("cannot write data cache under %s (%s); continuing uncached", entry.parent, exc)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------
# Public loading


def _missing_message(name: str, data_dir: Path, fmt: str | None, missing: list[str]) -> str:
    if not data_dir.is_dir():
        return f"{data_dir}: data directory does not exist; {DOWNLOAD_HINT}"
    if name == "mnist":
        looked = ", ".join(f"{b}[.gz]" for b in find_file_names(name).values())
        return f"{data_dir}: no complete mnist data: looked for {looked}; missing: {', '.join(missing)}"
    wanted = []
    if fmt in (None, "idx"):
        wanted.append(
            f"the idx files {', '.join(f'{find_file_names(name)[p]}.gz' for p in IDX_PARTS)} "
            f"(+ {name}-mapping.txt), in it or its gzip/"
        )
    if fmt in (None, "mat"):
        wanted.append(f"{name}.mat, in it or its matlab/")
    missing = [m for m in missing if fmt is None or m.endswith(".mat") == (fmt == "mat")]
    return (
        f"{data_dir}: no complete {name} data: looked for {' or '.join(wanted)}; "
        f"missing: {', '.join(missing)}; {DOWNLOAD_HINT}"
    )


def load_dataset(
    name: str = DEFAULT_DATASET,
    data_dir: str | os.PathLike[str] | None = None,
    fmt: str | None = None,
    cache: bool = True,
) -> Dataset:
    """Load ``name`` from ``data_dir`` (default :func:`default_data_dir`) as an upright :class:`Dataset`.

    ``fmt`` None uses a valid decoded cache if one exists, else idx, else mat;
    "idx" or "mat" forces that source format. ``cache`` False neither reads nor
    writes the decoded cache.
    """
    _check_name(name)
    _check_fmt(name, fmt)
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    found, missing = _locate(name, data_dir)
    candidates = [found[f] for f in (FORMATS if fmt is None else (fmt,)) if f in found]
    if not candidates:
        raise DataError(_missing_message(name, data_dir, fmt, missing))

    if not cache:
        return _decode(name, candidates[0])

    entries = []
    for files in candidates:
        try:
            entry = _cache_entry(name, files)
        except OSError as exc:
            raise DataError(f"{_source_paths(files)[0]}: cannot stat source file ({exc})") from exc
        entries.append(entry)
        start = time.perf_counter()
        dataset = _read_cache(entry, name)
        if dataset is not None:
            log.info("loaded %s from %s in %.2f s", name, dataset.source, time.perf_counter() - start)
            return dataset
    dataset = _decode(name, candidates[0])
    _write_cache(entries[0], dataset)
    return dataset


# --------------------------------------------------------------------------
# Splits


def split_validation(dataset: Dataset, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted int64 (train_idx, val_idx) into ``dataset.x_train``; by writer when known, else stratified by class."""
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"validation fraction must be in [0, 1), got {fraction}")
    n = len(dataset.y_train)
    if fraction == 0.0 or n == 0:
        return np.arange(n, dtype=np.int64), np.empty(0, dtype=np.int64)
    rng = np.random.default_rng(seed)

    writers = dataset.writers_train
    if writers is not None:
        writers = np.asarray(writers)
        ids, counts = np.unique(writers, return_counts=True)
        order = rng.permutation(ids.size)
        # cum[k - 1] = images of the first k shuffled writers. Take the k that
        # comes closest to the target, keeping at least one writer on each side.
        cum = np.cumsum(counts[order])
        if ids.size < 2:
            log.warning("only one writer in %s; validation split is empty", dataset.name)
            k = 0
        else:
            k = int(np.argmin(np.abs(cum[:-1] - fraction * n))) + 1
        val_mask = np.isin(writers, ids[order[:k]])
    else:
        y = np.asarray(dataset.y_train)
        val_mask = np.zeros(n, dtype=bool)
        for c in np.unique(y):
            members = np.flatnonzero(y == c)
            take = int(round(fraction * members.size))
            val_mask[rng.permutation(members)[:take]] = True
    return np.flatnonzero(~val_mask).astype(np.int64), np.flatnonzero(val_mask).astype(np.int64)


def subsample_stratified(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted int64 indices of a class-stratified random subset of size ``n`` (all if n >= len)."""
    labels = np.asarray(labels).ravel()
    total = labels.size
    if n < 0:
        raise ConfigError(f"subsample size must be >= 0, got {n}")
    if n >= total:
        return np.arange(total, dtype=np.int64)
    rng = np.random.default_rng(seed)
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    # Largest-remainder allocation: per-class shares proportional to class
    # size that add up to exactly n.
    quota = counts * (n / total)
    take = np.floor(quota).astype(np.int64)
    short = n - int(take.sum())
    if short:
        take[np.argsort(-(quota - take), kind="stable")[:short]] += 1
    chosen = [rng.permutation(np.flatnonzero(inverse == i))[: take[i]] for i in range(classes.size)]
    return np.sort(np.concatenate(chosen)).astype(np.int64)
