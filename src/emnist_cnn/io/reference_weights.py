"""The reference workflow's Keras 2 weight files: read, convert, check (engine.import_reference makes a run of them).

The reference (a 2017 notebook workflow on Keras 2.0.8 with the Theano backend)
saved its members with ``model.save_weights``. Despite the ``.pkl`` ending those
files are HDF5; this module reads them with h5py only (nothing is ever
unpickled) and loads them into our channels_last :func:`emnist_cnn.core.model.build_model`:

- Theano convolved with flipped kernels (true convolution), TensorFlow does not:
  Theano-backend kernels are rotated 180 degrees. The file's ``backend``
  attribute decides; the reference's ``json_h5_export`` (TensorFlow backend)
  needs no flip.
- The reference was channels_first, so its ``Flatten`` produced features in
  (channel, row, column) order; ours produces (row, column, channel). The
  BatchNormalization after ``Flatten`` and the rows of the first Dense kernel are
  permuted accordingly.
- The reference normalized inputs with EMNIST Digits' statistics
  (``(x - 0.17325132) / 0.3316614``). A model built with other statistics (a run
  on other data) gets the difference folded exactly into the first convolution
  (exact because it has 'valid' padding), so it computes the same function.
- Layers are matched by position and kind, and every array's shape is checked;
  any mismatch is a one-line :class:`WeightsError`.

``find_reference_files`` lists a reference weight tree; the engine's
``import_reference`` turns it into a run directory of ours.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import EMNIST_DIGITS_MEAN, EMNIST_DIGITS_STD
from ..errors import DataError, WeightsError, format_one_line

__all__ = ["REFERENCE_MEAN", "REFERENCE_STD", "REFERENCE_CLASSES", "REFERENCE_FILE_RE", "ReferenceLayer",
           "ReferenceWeights", "ReferenceFile", "parse_epoch", "is_reference_weights", "read_reference_weights",
           "check_reference_architecture", "flatten_permutation", "load_reference_weights", "sibling_json",
           "find_reference_files", "is_keras2_file"]

log = logging.getLogger(__name__)

# The reference's input normalization, hard-coded in its Lambda layer (EMNIST Digits' pixel statistics).
REFERENCE_MEAN = EMNIST_DIGITS_MEAN
REFERENCE_STD = EMNIST_DIGITS_STD
REFERENCE_CLASSES = tuple("0123456789")
# The reference's own file names: 267epochs_weights_model_3.pkl
REFERENCE_FILE_RE = re.compile(r"^(\d+)epochs_weights_model_(\d+)\.(pkl|h5|hdf5)$")
_EPOCH_RE = re.compile(r"(\d+)epochs")


# ----------------------------------------------------------------------------- reading


@dataclass
class ReferenceLayer:
    """One weighted layer of a Keras 2 weights file, in file order."""

    name: str
    kind: str  # "conv2d", "batch_normalization" or "dense"
    arrays: dict[str, np.ndarray]  # by short weight name: kernel, bias, gamma, ...
    after_flatten: bool  # between Flatten and the first Dense after it (inclusive)


@dataclass
class ReferenceWeights:
    path: Path
    backend: str
    keras_version: str
    layers: list[ReferenceLayer] = field(default_factory=list)

    @property
    def epoch(self) -> int | None:
        return parse_epoch(self.path)


def parse_epoch(path) -> int | None:
    """The epoch in a reference file name (``258epochs_...``), or None."""
    m = _EPOCH_RE.search(Path(path).name)
    return int(m.group(1)) if m else None


def _attr_str(value) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _keras2_root(f):
    """The group holding Keras 2 weights: the file itself, or 'model_weights' of a full-model save."""
    if "layer_names" in f.attrs:
        return f
    if "model_weights" in f and "layer_names" in f["model_weights"].attrs:
        return f["model_weights"]
    return None


def _keras_version(f, root) -> str:
    for holder in (root, f):
        if "keras_version" in holder.attrs:
            return _attr_str(holder.attrs["keras_version"])
    return ""


def is_keras2_file(f) -> bool:
    """True for an open h5py File holding Keras 2 weights (a save_weights or full-model file)."""
    root = _keras2_root(f)
    return root is not None and _keras_version(f, root).startswith("2.")


def is_reference_weights(path) -> bool:
    """True for a Keras 2 ``save_weights`` (or full-model) HDF5 file, whatever its suffix."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return is_keras2_file(f)
    except Exception:  # not HDF5, truncated, unreadable: not a reference file
        return False


def read_reference_weights(path) -> ReferenceWeights:
    """Every weighted layer of a Keras 2 weights file, in the file's layer order."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    try:
        with h5py.File(path, "r") as f:
            root = _keras2_root(f)
            if root is None:
                raise WeightsError(f"{path}: not a Keras 2 weights file (no layer_names attribute)")
            version = _keras_version(f, root)
            if not version.startswith("2."):
                raise WeightsError(f"{path}: written by Keras {version or 'unknown'}, not a Keras 2 weights file")
            backend = _attr_str(root.attrs.get("backend", f.attrs.get("backend", "")))
            out = ReferenceWeights(path, backend, version)
            after_flatten = False
            for raw in root.attrs["layer_names"]:
                name = _attr_str(raw)
                if name.startswith("flatten"):
                    after_flatten = True
                group = root[name]
                weight_names = [_attr_str(w) for w in group.attrs.get("weight_names", [])]
                if weight_names:
                    arrays = {_short_name(w): np.asarray(group[w], dtype=np.float32) for w in weight_names}
                    out.layers.append(ReferenceLayer(name, _kind(name, arrays), arrays, after_flatten))
                if name.startswith("dense"):
                    after_flatten = False
            return out
    except WeightsError:
        raise
    except Exception as exc:  # h5py raises OSError, KeyError, ValueError, TypeError, RuntimeError... on damage
        why = format_one_line(exc)
        raise WeightsError(f"{path}: unreadable HDF5 weights file, truncated or corrupt ({why})") from exc


def _short_name(weight_name: str) -> str:
    """'batch_normalization_36/moving_mean:0' -> 'moving_mean'."""
    return weight_name.rsplit("/", 1)[-1].split(":", 1)[0]


def _kind(name: str, arrays: dict) -> str:
    if "gamma" in arrays or "moving_mean" in arrays:
        return "batch_normalization"
    kernel = arrays.get("kernel")
    if kernel is not None and kernel.ndim == 4:
        return "conv2d"
    if kernel is not None and kernel.ndim == 2:
        return "dense"
    return name.rstrip("0123456789_") or name


# ----------------------------------------------------------------------------- architecture (JSON)

# The reference's layer sequence, as Keras 2 class names, against ours (Lambda = our Normalization).
_KERAS2_TO_OURS = {"Lambda": "Normalization"}


def check_reference_architecture(json_path, model) -> dict:
    """Check a reference Keras 2 JSON architecture against our model, layer by layer.

    The JSON is read as data; its Lambda layer's marshalled code is never
    executed (its normalization constants are only looked for as bytes).
    Returns {"data_format": ..., "normalization_confirmed": bool}.
    """
    import keras

    json_path = Path(json_path)
    try:
        spec = json.loads(json_path.read_text())
        layers = spec["config"]
        if isinstance(layers, dict):  # Keras 2.2+ Sequential: {"name":..., "layers": [...]}
            layers = layers["layers"]
        classes = [layer["class_name"] for layer in layers]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise WeightsError(f"{json_path}: unreadable Keras architecture JSON ({format_one_line(exc)})") from exc
    ours = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    ours_classes = [type(layer).__name__ for layer in ours]
    theirs = [_KERAS2_TO_OURS.get(c, c) for c in classes]
    if theirs != ours_classes:
        raise WeightsError(
            f"{json_path}: architecture differs from ours: {len(classes)} layers ({', '.join(classes)}) "
            f"vs {len(ours)} ({', '.join(ours_classes)})"
        )
    data_format = None
    for layer, mine in zip(layers, ours):
        cfg = layer.get("config", {})
        name = cfg.get("name", layer["class_name"])
        checks: list[tuple[str, Any, Any]] = []
        if layer["class_name"] == "Conv2D":
            checks = [("filters", cfg.get("filters"), mine.filters),
                      ("kernel_size", tuple(cfg.get("kernel_size", ())), tuple(mine.kernel_size)),
                      ("strides", tuple(cfg.get("strides", ())), tuple(mine.strides)),
                      ("padding", cfg.get("padding"), mine.padding)]
            data_format = cfg.get("data_format", data_format)
        elif layer["class_name"] == "Dense":
            checks = [("units", cfg.get("units"), mine.units),
                      ("activation", cfg.get("activation"), getattr(mine.activation, "__name__", None))]
        elif layer["class_name"] == "LeakyReLU":
            checks = [("alpha", round(float(cfg.get("alpha", -1)), 5), round(float(mine.negative_slope), 5))]
        elif layer["class_name"] == "BatchNormalization":
            checks = [("epsilon", cfg.get("epsilon"), mine.epsilon)]
        elif layer["class_name"] == "MaxPooling2D":
            checks = [("pool_size", tuple(cfg.get("pool_size", ())), tuple(mine.pool_size))]
        for what, theirs_value, ours_value in checks:
            if theirs_value != ours_value:
                raise WeightsError(f"{json_path}: layer {name}: {what} is {theirs_value!r}, ours is {ours_value!r}")
    confirmed = False
    try:
        code = base64.b64decode(layers[0]["config"]["function"][0])
        confirmed = struct.pack("<d", REFERENCE_MEAN) in code and struct.pack("<d", REFERENCE_STD) in code
    except (KeyError, IndexError, TypeError, ValueError):
        pass
    if not confirmed:
        log.warning("%s: could not confirm the normalization constants %g / %g in its Lambda layer",
                    json_path, REFERENCE_MEAN, REFERENCE_STD)
    return {"data_format": data_format, "normalization_confirmed": confirmed}


# ----------------------------------------------------------------------------- loading into our model


def _weighted_layers(model) -> list:
    import keras

    return [layer for layer in model.layers
            if layer.weights and not isinstance(layer, keras.layers.Normalization)]


def _our_kind(layer) -> str:
    import keras

    if isinstance(layer, keras.layers.Conv2D):
        return "conv2d"
    if isinstance(layer, keras.layers.BatchNormalization):
        return "batch_normalization"
    if isinstance(layer, keras.layers.Dense):
        return "dense"
    return type(layer).__name__


def flatten_permutation(model) -> np.ndarray | None:
    """Index map p with ours[j] = reference[p[j]] for the features after Flatten."""
    import keras

    flat = [layer for layer in model.layers if isinstance(layer, keras.layers.Flatten)]
    if not flat:
        return None
    shape = tuple(flat[0].input.shape[1:])  # (H, W, C) in channels_last
    if len(shape) != 3 or any(s is None for s in shape):
        return None
    h, w, c = (int(s) for s in shape)
    return np.arange(h * w * c).reshape(c, h, w).transpose(1, 2, 0).ravel()


def model_normalization(model) -> tuple[float, float] | None:
    """(mean, std) of the model's input Normalization layer, None if it has none."""
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.layers.Normalization):
            mean = np.asarray(keras.ops.convert_to_numpy(layer.mean), np.float64).ravel()
            var = np.asarray(keras.ops.convert_to_numpy(layer.variance), np.float64).ravel()
            if mean.size == 0 or np.ptp(mean) > 0 or np.ptp(var) > 0:
                return None
            return float(mean[0]), float(max(math.sqrt(var[0]), 1e-7))
    return None


def load_reference_weights(model, path, *, flip_kernels: bool | None = None, permute_flatten: bool = True,
                           json_path=None) -> dict:
    """Load a reference Keras 2 weights file into our channels_last ``build_model()`` model.

    ``flip_kernels`` None decides from the file's ``backend`` attribute (theano:
    flip; tensorflow: no flip). ``permute_flatten`` reorders the features after
    Flatten from channels_first to channels_last. ``json_path`` (the reference's
    architecture JSON) is checked layer by layer against the model when given.
    Disabling either conversion exists to show that it matters.

    Returns {"path", "backend", "keras_version", "epoch", "flipped_kernels",
    "permuted_flatten", "normalization_folded", "layers"}.
    """
    path = Path(path)
    ref = read_reference_weights(path)
    if flip_kernels is None:
        backend = ref.backend.lower()
        if backend == "theano":
            flip_kernels = True
        elif backend == "tensorflow":
            flip_kernels = False
        else:
            raise WeightsError(f"{path}: backend attribute is {ref.backend!r}, expected theano or tensorflow; "
                               "cannot tell whether its kernels are flipped")
    if json_path is not None:
        check_reference_architecture(json_path, model)

    ours = _weighted_layers(model)
    kinds_file = [layer.kind for layer in ref.layers]
    kinds_ours = [_our_kind(layer) for layer in ours]
    if kinds_file != kinds_ours:
        raise WeightsError(
            f"{path}: holds {len(kinds_file)} weighted layers ({_summary(kinds_file)}), "
            f"the model has {len(kinds_ours)} ({_summary(kinds_ours)}): not this architecture"
        )
    perm = flatten_permutation(model) if permute_flatten else None
    new_values: list[tuple[Any, list[np.ndarray]]] = []
    for k, (theirs, mine) in enumerate(zip(ref.layers, ours)):
        values = []
        for var in mine.weights:
            short = _short_name(var.name)
            if short not in theirs.arrays:
                raise WeightsError(f"{path}: layer {theirs.name} has no {short!r} (has {', '.join(theirs.arrays)})")
            arr = theirs.arrays[short]
            if theirs.kind == "conv2d" and short == "kernel" and flip_kernels:
                arr = arr[::-1, ::-1, :, :]
            if perm is not None and theirs.after_flatten and arr.shape[:1] == perm.shape:
                # BN vectors and the Dense kernel's rows follow the flattened features.
                if theirs.kind == "batch_normalization" or (theirs.kind == "dense" and short == "kernel"):
                    arr = arr[perm]
            if tuple(arr.shape) != tuple(var.shape):
                raise WeightsError(
                    f"{path}: layer {k + 1} ({theirs.name} -> our {mine.name}): {short} has shape "
                    f"{tuple(arr.shape)}, the model needs {tuple(var.shape)}"
                )
            values.append(np.ascontiguousarray(arr, dtype=np.float32))
        new_values.append((mine, values))
    folded = _fold_normalization(model, new_values, path)
    for layer, values in new_values:
        layer.set_weights(values)
    info = {"path": str(path), "backend": ref.backend, "keras_version": ref.keras_version, "epoch": ref.epoch,
            "flipped_kernels": bool(flip_kernels), "permuted_flatten": perm is not None,
            "normalization_folded": folded, "layers": len(ours)}
    log.debug("loaded reference weights %s", info)
    return info


def _summary(kinds: list[str]) -> str:
    short = {"conv2d": "conv", "batch_normalization": "bn", "dense": "dense"}
    return " ".join(short.get(k, k) for k in kinds)


def _fold_normalization(model, new_values, path: Path) -> bool:
    """Make the first convolution absorb the difference between our input normalization and the reference's.

    The reference feeds conv1 with z = (x - m_r) / s_r; our model feeds it
    y = (x - m) / s, so z = a*y + b with a = s/s_r, b = (m - m_r)/s_r, and
    conv(W, z) + c = conv(a*W, y) + (c + b * sum(W)) exactly for 'valid' padding.
    """
    import keras

    norm = model_normalization(model)
    mean, std = norm if norm is not None else (0.0, 1.0)
    if abs(mean - REFERENCE_MEAN) <= 1e-6 and abs(std - REFERENCE_STD) <= 1e-6 * REFERENCE_STD:
        return False
    layer, values = new_values[0]
    if not isinstance(layer, keras.layers.Conv2D) or layer.padding != "valid" or len(values) != 2:
        raise WeightsError(f"{path}: the model normalizes inputs with mean {mean:g} / std {std:g}, not the "
                           "reference's, and its first layer cannot absorb the difference; build it with "
                           f"mean={REFERENCE_MEAN}, std={REFERENCE_STD}")
    a = std / REFERENCE_STD
    b = (mean - REFERENCE_MEAN) / REFERENCE_STD
    kernel = values[0].astype(np.float64)
    bias = values[1].astype(np.float64) + b * kernel.sum(axis=(0, 1, 2))
    values[0] = (kernel * a).astype(np.float32)
    values[1] = bias.astype(np.float32)
    log.debug("folded the normalization difference (mean %g vs %g, std %g vs %g) into %s",
              mean, REFERENCE_MEAN, std, REFERENCE_STD, layer.name)
    return True


def sibling_json(path) -> Path | None:
    """The reference's architecture JSON beside a weights file (same stem), if any."""
    path = Path(path)
    candidate = path.with_suffix(".json")
    return candidate if candidate.is_file() else None


@dataclass
class ReferenceFile:
    """One reference weights file: dropout_X/weights/NNNepochs_weights_model_I.pkl."""

    dropout: float
    index: int
    epoch: int
    path: Path


def find_reference_files(ref_dir) -> list[ReferenceFile]:
    """Every ``dropout_X/weights/NNNepochs_weights_model_I.pkl`` under ``ref_dir``.

    ``ref_dir`` is the reference's root (holding dropout_* folders) or one
    dropout_X folder.
    """
    ref_dir = Path(ref_dir)
    if not ref_dir.is_dir():
        raise DataError(f"{ref_dir}: reference directory does not exist")
    if re.fullmatch(r"dropout_[0-9.]+", ref_dir.name):
        folders = [ref_dir]
    else:
        folders = sorted(p for p in ref_dir.glob("dropout_*") if p.is_dir())
    found: list[ReferenceFile] = []
    for folder in folders:
        try:
            rate = float(folder.name[len("dropout_"):])
        except ValueError:
            continue
        weights = folder / "weights"
        if not weights.is_dir():
            log.info("%s has no weights/ folder; skipping it", folder)
            continue
        for p in sorted(weights.iterdir()):
            m = REFERENCE_FILE_RE.match(p.name)
            if m:
                found.append(ReferenceFile(rate, int(m.group(2)), int(m.group(1)), p))
    if not found:
        raise DataError(f"{ref_dir}: no reference weight files (dropout_*/weights/NNNepochs_weights_model_I.pkl)")
    return found
