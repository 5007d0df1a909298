"""NIST's file formats: gzip idx images and labels, mapping text, MATLAB .mat structs.

EMNIST stores every image transposed (a 784-pixel row is the upright image
read column by column); `emnist_upright` turns them upright. MNIST's idx
files are upright already. Every malformed file is a one-line DataError naming it.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from ..config import IMAGE_SIDE
from ..errors import DataError

__all__ = ["IDX_IMAGES_MAGIC", "IDX_LABELS_MAGIC", "MAX_LABEL", "BUILTIN_MAPPINGS", "DOWNLOAD_HINT",
           "read_idx_images", "read_idx_labels", "read_mapping_txt", "decode_idx", "decode_mat"]

log = logging.getLogger(__name__)

IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
# Largest label value a mapping may name (EMNIST's are 0..61); bounds the label lookup table.
MAX_LABEL = 0xFFFF
DOWNLOAD_HINT = "`emnist-cnn download` fetches EMNIST splits"

# Used only when an EMNIST idx download lacks its mapping file: these two
# mappings are fixed by NIST and cannot differ between releases.
_DIGITS_MAPPING = np.array([[i, 48 + i] for i in range(10)], dtype=np.int64)
_LETTERS_MAPPING = np.array([[i, 64 + i, 96 + i] for i in range(1, 27)], dtype=np.int64)
BUILTIN_MAPPINGS = {
    "emnist-digits": _DIGITS_MAPPING,
    "emnist-mnist": _DIGITS_MAPPING,
    "emnist-letters": _LETTERS_MAPPING,
    "mnist": _DIGITS_MAPPING,
}


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


# --------------------------------------------------------------------------
# Decoders


def decode_idx(name: str, files: dict[str, Any]) -> dict[str, Any]:
    mapping_path = files.get("mapping")
    if mapping_path is not None:
        mapping, map_where = read_mapping_txt(mapping_path), str(mapping_path)
    elif name in BUILTIN_MAPPINGS:
        mapping, map_where = BUILTIN_MAPPINGS[name], f"built-in {name} mapping"
        if name != "mnist":
            log.info("%s-mapping.txt not found; using the built-in %s mapping", name, name)
    else:
        expected = Path(files["train_labels"]).parent / f"{name}-mapping.txt"
        raise DataError(f"{expected}: mapping file missing (needed for {name}; {DOWNLOAD_HINT})")
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


def decode_mat(name: str, files: dict[str, Any]) -> dict[str, Any]:
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
