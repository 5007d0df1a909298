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

import gzip
import hashlib
import json
import logging
import math
import os
import shutil
import struct
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import DATASETS  # noqa: F401  (re-exported: the names load_dataset accepts)
from .errors import ConfigError, DataError

log = logging.getLogger(__name__)

DEFAULT_DATASET = "emnist-digits"
FORMATS: tuple[str, ...] = ("idx", "mat")

IMAGE_SIDE = 28
IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
# Largest label value a mapping may name (EMNIST's are 0..61); bounds the label lookup table.
MAX_LABEL = 0xFFFF

# Bump when the cache layout or decoding changes, so old entries are not reused.
_CACHE_VERSION = 1
_ARRAY_NAMES = ("x_train", "y_train", "x_test", "y_test")
_IDX_PARTS = ("train_images", "train_labels", "test_images", "test_labels")
_DOWNLOAD_HINT = "`emnist-cnn download` fetches EMNIST splits"

# Used only when an EMNIST idx download lacks its mapping file: these two
# mappings are fixed by NIST and cannot differ between releases.
_DIGITS_MAPPING = np.array([[i, 48 + i] for i in range(10)], dtype=np.int64)
_LETTERS_MAPPING = np.array([[i, 64 + i, 96 + i] for i in range(1, 27)], dtype=np.int64)
_BUILTIN_MAPPINGS = {
    "emnist-digits": _DIGITS_MAPPING,
    "emnist-mnist": _DIGITS_MAPPING,
    "emnist-letters": _LETTERS_MAPPING,
    "mnist": _DIGITS_MAPPING,
}


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


def _idx_file_names(name: str) -> dict[str, str]:
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
    for part, base in _idx_file_names(name).items():
        path = _first_existing([d / f"{base}{ext}" for d in idx_dirs for ext in (".gz", "")])
        if path is None:
            missing.append(f"{base}.gz")
        paths[part] = path
    if all(paths[p] is not None for p in _IDX_PARTS):
        mapping = None
        if name != "mnist":
            mapping = _first_existing([d / f"{name}-mapping.txt" for d in idx_dirs])
        found["idx"] = {"format": "idx", **paths, "mapping": mapping}

    if name != "mnist":
        mat_name = f"{name}.mat"
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
    paths = [files[p] for p in _IDX_PARTS]
    if files.get("mapping") is not None:
        paths.append(files["mapping"])
    return paths


def _source_text(paths: list[Path]) -> str:
    parents = {p.parent for p in paths}
    if len(paths) > 1 and len(parents) == 1:
        return f"{paths[0].parent}/{{{','.join(p.name for p in paths)}}}"
    return ", ".join(str(p) for p in paths)


# --------------------------------------------------------------------------
# idx files


def _read_bytes(path: Path) -> bytes:
    """Whole file content, gunzipped if the name ends in .gz."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise DataError(f"{path}: truncated or corrupt gzip file ({exc})") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read file ({exc})") from exc


def _idx_header(path: Path, data: bytes, magic: int, ndim: int) -> tuple[int, ...]:
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DataError(f"{path}: truncated idx file ({len(data)} bytes, header alone needs {header_len})")
    (found,) = struct.unpack(">I", data[:4])
    if found != magic:
        kind = "images" if magic == IDX_IMAGES_MAGIC else "labels"
        raise DataError(f"{path}: wrong magic number {found} (expected {magic} for an idx {kind} file)")
    dims = struct.unpack(f">{ndim}I", data[4:header_len])
    payload = len(data) - header_len
    expected = math.prod(dims)  # exact: three 32-bit dimensions can overflow int64
    if payload < expected:
        raise DataError(f"{path}: truncated payload: header {dims} needs {expected} bytes, only {payload} present")
    if payload > expected:
        raise DataError(f"{path}: {payload - expected} unexpected bytes after the {dims} payload")
    return dims


def read_idx_images(path: str | os.PathLike[str]) -> np.ndarray:
    """Images of an idx3 file (gzipped or not) as stored: uint8 (N, 28, 28), not reoriented."""
    path = Path(path)
    data = _read_bytes(path)
    n, rows, cols = _idx_header(path, data, IDX_IMAGES_MAGIC, 3)
    if (rows, cols) != (IMAGE_SIDE, IMAGE_SIDE):
        raise DataError(f"{path}: images are {rows}x{cols}, expected {IMAGE_SIDE}x{IMAGE_SIDE}")
    return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(n, rows, cols)


def read_idx_labels(path: str | os.PathLike[str]) -> np.ndarray:
    """Labels of an idx1 file (gzipped or not) as int64 (N,), values as stored."""
    path = Path(path)
    data = _read_bytes(path)
    _idx_header(path, data, IDX_LABELS_MAGIC, 1)
    return np.frombuffer(data, dtype=np.uint8, offset=8).astype(np.int64)


def read_mapping_txt(path: str | os.PathLike[str]) -> np.ndarray:
    """NIST mapping file (lines "label ascii [ascii2]") as an int64 (C, 2|3) array."""
    path = Path(path)
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read mapping file ({exc})") from exc
    rows: list[list[int]] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            values = [int(v) for v in line.split()]
        except ValueError:
            values = []
        if len(values) not in (2, 3) or (rows and len(values) != len(rows[0])):
            raise DataError(f"{path}: line {lineno}: expected 'label ascii [ascii2]', got {line.strip()[:80]!r}")
        if not all(0 <= v <= 0x10FFFF for v in values):
            raise DataError(f"{path}: line {lineno}: values must be in 0..{0x10FFFF}, got {line.strip()[:80]!r}")
        rows.append(values)
    if not rows:
        raise DataError(f"{path}: empty mapping file")
    return np.array(rows, dtype=np.int64)


# --------------------------------------------------------------------------
# Shared decoding steps


def _emnist_upright(x: np.ndarray) -> np.ndarray:
    # EMNIST rows are the upright image read column by column (Fortran order);
    # swapping the two pixel axes of the C-order reshape undoes that.
    return np.ascontiguousarray(x.reshape(-1, IMAGE_SIDE, IMAGE_SIDE).transpose(0, 2, 1))


def _classes_and_lut(mapping: np.ndarray, where: str) -> tuple[tuple[str, ...], np.ndarray]:
    """Classes (chr of the first code, in label order) and a label -> 0..C-1 lookup table."""
    mapping = np.asarray(mapping)
    if mapping.ndim != 2 or mapping.shape[1] not in (2, 3) or mapping.shape[0] == 0:
        raise DataError(f"{where}: mapping has shape {mapping.shape}, expected (C, 2) or (C, 3)")
    if mapping.dtype == np.bool_ or not (np.issubdtype(mapping.dtype, np.integer)
                                         or np.issubdtype(mapping.dtype, np.floating)):
        raise DataError(f"{where}: mapping holds {mapping.dtype} values, expected integers")
    if not np.all(np.isfinite(mapping)) or not np.array_equal(mapping, np.round(mapping)):
        raise DataError(f"{where}: mapping holds non-integer values")
    # Bounded before the int64 cast (a float 1e300 has no int64 value) and before the lookup
    # table below is allocated with one entry per label value.
    if mapping.min() < 0 or mapping.max() > 0x10FFFF:
        raise DataError(f"{where}: mapping holds values outside 0..{0x10FFFF} (labels and character codes)")
    mapping = mapping.astype(np.int64)
    mapping = mapping[np.argsort(mapping[:, 0], kind="stable")]
    labels, codes = mapping[:, 0], mapping[:, 1]
    if labels.max() > MAX_LABEL:
        raise DataError(f"{where}: mapping labels must be at most {MAX_LABEL}, got {int(labels.max())}")
    if np.unique(labels).size != labels.size:
        raise DataError(f"{where}: mapping labels must be distinct and non-negative")
    if codes.min() < 0 or codes.max() > 0x10FFFF:
        raise DataError(f"{where}: mapping holds invalid character codes")
    lut = np.full(int(labels.max()) + 1, -1, dtype=np.int64)
    lut[labels] = np.arange(labels.size)
    return tuple(chr(int(c)) for c in codes), lut


def _map_labels(y: np.ndarray, lut: np.ndarray, where: str, mapping_where: str = "the mapping") -> np.ndarray:
    y = np.asarray(y).astype(np.int64, copy=False).ravel()
    if y.size == 0:
        return y
    bad = (y < 0) | (y >= lut.size)
    bad[~bad] = lut[y[~bad]] < 0
    if bad.any():
        valid = np.flatnonzero(lut >= 0)
        raise DataError(
            f"{where}: {int(bad.sum())} labels outside the mapping's range "
            f"(e.g. {int(y[bad][0])}; {mapping_where} has labels {valid.min()}..{valid.max()})"
        )
    return lut[y]


def _check_counts(x: np.ndarray, y: np.ndarray, x_where: str, y_where: str) -> None:
    if len(x) != len(y):
        raise DataError(f"{x_where}: {len(x)} images but {y_where} has {len(y)} labels")


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
# Decoders


def _decode_idx(name: str, files: dict[str, Any]) -> dict[str, Any]:
    mapping_path = files.get("mapping")
    if mapping_path is not None:
        mapping, map_where = read_mapping_txt(mapping_path), str(mapping_path)
    elif name in _BUILTIN_MAPPINGS:
        mapping, map_where = _BUILTIN_MAPPINGS[name], f"built-in {name} mapping"
        if name != "mnist":
            log.info("%s-mapping.txt not found; using the built-in %s mapping", name, name)
    else:
        expected = Path(files["train_labels"]).parent / f"{name}-mapping.txt"
        raise DataError(f"{expected}: mapping file missing (needed for {name}; {_DOWNLOAD_HINT})")
    classes, lut = _classes_and_lut(mapping, map_where)

    out: dict[str, Any] = {"classes": classes, "writers_train": None}
    for split in ("train", "test"):
        img_path, lab_path = files[f"{split}_images"], files[f"{split}_labels"]
        x = read_idx_images(img_path)
        y = read_idx_labels(lab_path)
        _check_counts(x, y, str(img_path), str(lab_path))
        out[f"x_{split}"] = x.copy() if name == "mnist" else _emnist_upright(x)
        out[f"y_{split}"] = _map_labels(y, lut, str(lab_path), map_where)
    return out


def _mat_field(struct_arr: Any, key: str, path: Path, where: str) -> Any:
    try:
        return struct_arr[key]
    except (KeyError, ValueError, IndexError, TypeError) as exc:
        raise DataError(f"{path}: missing struct field {where}.{key}") from exc


def _mat_struct(value: Any, path: Path, where: str) -> Any:
    # loadmat wraps every struct in a (1, 1) object/record array.
    try:
        inner = value[0, 0]
    except (IndexError, TypeError, ValueError) as exc:
        raise DataError(f"{path}: {where} is not a 1x1 struct") from exc
    if getattr(getattr(inner, "dtype", None), "names", None) is None:
        raise DataError(f"{path}: {where} is not a struct")
    return inner


def _decode_mat(name: str, files: dict[str, Any]) -> dict[str, Any]:
    from scipy.io import loadmat  # scipy is slow to import; only .mat users pay

    path = Path(files["mat"])
    try:
        mat = loadmat(path)
    except MemoryError as exc:
        # A damaged header (or a MATLAB v4 one) can declare arrays far larger than the file.
        size = path.stat().st_size if path.exists() else 0
        raise DataError(f"{path}: not a readable MATLAB .mat file: it declares arrays too large for this "
                        f"machine's memory ({size} bytes on disk; corrupt, or too little memory)") from exc
    except Exception as exc:  # noqa: BLE001 - scipy raises many types on corrupt input
        raise DataError(f"{path}: not a readable MATLAB .mat file ({type(exc).__name__}: {exc})") from exc
    if "dataset" not in mat:
        raise DataError(f"{path}: no 'dataset' variable (not a NIST EMNIST .mat file)")
    ds = _mat_struct(mat["dataset"], path, "dataset")
    classes, lut = _classes_and_lut(_mat_field(ds, "mapping", path, "dataset"), f"{path}: dataset.mapping")

    out: dict[str, Any] = {"classes": classes, "writers_train": None}
    for split in ("train", "test"):
        part = _mat_struct(_mat_field(ds, split, path, "dataset"), path, f"dataset.{split}")
        x = np.asarray(_mat_field(part, "images", path, f"dataset.{split}"))
        y = np.asarray(_mat_field(part, "labels", path, f"dataset.{split}"))
        where = f"{path}: dataset.{split}"
        if x.ndim != 2 or x.shape[1] != IMAGE_SIDE * IMAGE_SIDE:
            raise DataError(f"{where}.images has shape {x.shape}, expected (N, {IMAGE_SIDE * IMAGE_SIDE})")
        if x.dtype != np.uint8:
            if x.size and (not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating)
                           or not np.all(np.isfinite(x)) or x.min() < 0 or x.max() > 255):
                raise DataError(f"{where}.images has dtype {x.dtype} with values outside 0..255")
            x = x.astype(np.uint8)
        if y.ndim > 2 or (y.ndim == 2 and y.shape[1] != 1):
            raise DataError(f"{where}.labels has shape {y.shape}, expected (N, 1)")
        y = y.ravel()
        if not np.issubdtype(y.dtype, np.integer) and (
            not np.issubdtype(y.dtype, np.number) or not np.array_equal(y, np.round(y))
        ):
            raise DataError(f"{where}.labels holds non-integer values")
        _check_counts(x, y, f"{where}.images", f"{where}.labels")
        out[f"x_{split}"] = _emnist_upright(x)
        out[f"y_{split}"] = _map_labels(y, lut, f"{where}.labels", "dataset.mapping")
        if split == "train":
            try:
                writers = np.asarray(part["writers"]).ravel()
            except (KeyError, ValueError, IndexError, TypeError):
                log.warning("%s: no dataset.train.writers; validation splits will be by class", path)
                continue
            if writers.size != len(y):
                raise DataError(f"{where}.writers has {writers.size} entries for {len(y)} images")
            if writers.size and (writers.dtype == np.bool_ or not np.issubdtype(writers.dtype, np.number)
                                 or not np.all(np.isfinite(writers)) or np.abs(writers).max() >= 2**53):
                raise DataError(f"{where}.writers holds {writers.dtype} values, expected integer writer ids")
            out["writers_train"] = writers.astype(np.int64)
    return out


def _decode(name: str, files: dict[str, Any]) -> Dataset:
    start = time.perf_counter()
    arrays = _decode_idx(name, files) if files["format"] == "idx" else _decode_mat(name, files)
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
        return f"{data_dir}: data directory does not exist; {_DOWNLOAD_HINT}"
    if name == "mnist":
        looked = ", ".join(f"{b}[.gz]" for b in _idx_file_names(name).values())
        return f"{data_dir}: no complete mnist data: looked for {looked}; missing: {', '.join(missing)}"
    wanted = []
    if fmt in (None, "idx"):
        wanted.append(
            f"the idx files {', '.join(f'{b}.gz' for b in _idx_file_names(name).values())} "
            f"(+ {name}-mapping.txt), in it or its gzip/"
        )
    if fmt in (None, "mat"):
        wanted.append(f"{name}.mat, in it or its matlab/")
    missing = [m for m in missing if fmt is None or m.endswith(".mat") == (fmt == "mat")]
    return (
        f"{data_dir}: no complete {name} data: looked for {' or '.join(wanted)}; "
        f"missing: {', '.join(missing)}; {_DOWNLOAD_HINT}"
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
