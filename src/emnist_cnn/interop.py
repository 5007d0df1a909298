"""The reference workflow's Keras 2 weight files: read, convert, check, import as a run.

The reference (a 2017 notebook workflow on Keras 2.0.8 with the Theano backend)
saved its members with ``model.save_weights``. Despite the ``.pkl`` ending those
files are HDF5; this module reads them with h5py only (nothing is ever
unpickled) and loads them into our channels_last :func:`emnist_cnn.model.build_model`:

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

``import_reference`` turns a reference weight tree into a run directory of ours
that ``emnist-cnn train --run-dir RUN --epochs N --lr 1e-5`` continues.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import math
import os
import re
import struct
import sys
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import DATASETS, AugmentConfig, TrainConfig
from .errors import ConfigError, DataError, RunDirError

log = logging.getLogger(__name__)

# The reference's input normalization, hard-coded in its Lambda layer.
REFERENCE_MEAN = 0.17325132
REFERENCE_STD = 0.3316614
REFERENCE_CLASSES = tuple("0123456789")
# The reference's own file names: 267epochs_weights_model_3.pkl
REFERENCE_FILE_RE = re.compile(r"^(\d+)epochs_weights_model_(\d+)\.(pkl|h5|hdf5)$")
_EPOCH_RE = re.compile(r"(\d+)epochs")


class WeightsError(DataError):
    """A weights file is unreadable, truncated, foreign, or does not fit the model."""


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


def is_reference_weights(path) -> bool:
    """True for a Keras 2 ``save_weights`` (or full-model) HDF5 file, whatever its suffix."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            root = _keras2_root(f)
            return root is not None and _keras_version(f, root).startswith("2.")
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
        raise WeightsError(f"{path}: unreadable HDF5 weights file, truncated or corrupt ({_one_line(exc)})") from exc


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


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] + ("..." if len(text) > 300 else "")


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
        raise WeightsError(f"{json_path}: unreadable Keras architecture JSON ({_one_line(exc)})") from exc
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


def _flatten_permutation(model) -> np.ndarray | None:
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
    perm = _flatten_permutation(model) if permute_flatten else None
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


def load_weights_any(model, path) -> dict:
    """Load any weights file we know into ``model``, with one-line errors.

    A reference Keras 2 file (any suffix) goes through :func:`load_reference_weights`
    (checking the architecture JSON beside it, if there is one); our own
    ``.weights.h5`` checkpoints and ``.keras`` archives go through Keras. A
    missing, truncated, foreign or mismatched file raises :class:`WeightsError`.
    Returns {"format": "reference", ...load_reference_weights info} or {"format": "keras"}.
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    if zipfile.is_zipfile(path):
        _keras_load_weights(model, path, ".keras")
        return {"format": "keras", "path": str(path)}
    try:
        with h5py.File(path, "r") as f:
            reference = _keras2_root(f) is not None and _keras_version(f, _keras2_root(f)).startswith("2.")
            shapes = _keras3_shapes(f) if not reference else None
    except Exception as exc:  # OSError for a non-HDF5 file; RuntimeError, KeyError... for damaged metadata
        raise WeightsError(f"{path}: not a readable HDF5 weights file, truncated or not HDF5 "
                           f"({_one_line(exc)})") from exc
    if reference:
        info = load_reference_weights(model, path, json_path=sibling_json(path))
        return {"format": "reference", **info}
    if shapes is None:
        raise WeightsError(f"{path}: HDF5 file but neither a Keras 3 weights file nor a Keras 2 reference "
                           "weights file (foreign HDF5)")
    wanted = sorted(tuple(w.shape) for w in model.weights)
    if sorted(shapes) != wanted:
        missing = sorted(set(wanted) - set(shapes)) or sorted(set(shapes) - set(wanted))
        raise WeightsError(f"{path}: weights of a different model: {len(shapes)} arrays vs the model's "
                           f"{len(wanted)} (e.g. shape {missing[0] if missing else '?'} does not match)")
    _keras_load_weights(model, path, ".weights.h5")
    return {"format": "keras", "path": str(path)}


def _keras3_shapes(f) -> list[tuple] | None:
    """Shapes of every array in a Keras 3 .weights.h5 file; None if it is not one."""
    import h5py

    if "layers" not in f or not isinstance(f["layers"], h5py.Group):
        return None
    shapes: list[tuple] = []

    def visit(_name, obj):
        if isinstance(obj, h5py.Dataset):
            shapes.append(tuple(obj.shape))

    f["layers"].visititems(visit)  # not "optimizer/": a compiled model's file holds its state too
    return shapes


def _keras_load_weights(model, path: Path, kind: str) -> None:
    target = path
    link = None
    if kind == ".weights.h5" and not path.name.endswith(".weights.h5"):
        # Keras 3 picks its reader by suffix; give it the name it expects.
        import tempfile

        tmpdir = Path(tempfile.mkdtemp(prefix="emnist-cnn-weights-"))
        link = tmpdir / "model.weights.h5"
        os.symlink(path.resolve(), link)
        target = link
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.load_weights(target)
    except Exception as exc:  # Keras raises ValueError/OSError/KeyError with multi-line messages
        raise WeightsError(f"{path}: cannot load into the model ({_one_line(exc).split(' List of objects')[0]})") \
            from exc
    finally:
        if link is not None:
            link.unlink(missing_ok=True)
            link.parent.rmdir()


# ----------------------------------------------------------------------------- import into a run directory


@dataclass
class _RefFile:
    dropout: float
    index: int
    epoch: int
    path: Path


def find_reference_files(ref_dir) -> list[_RefFile]:
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
    found: list[_RefFile] = []
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
                found.append(_RefFile(rate, int(m.group(2)), int(m.group(1)), p))
    if not found:
        raise DataError(f"{ref_dir}: no reference weight files (dropout_*/weights/NNNepochs_weights_model_I.pkl)")
    return found


def import_reference(ref_dir, run_dir, *, dataset: str = "emnist-digits", data_dir=None, models: int | None = None,
                     evaluate: bool = True, download: bool = True, mirror=None,
                     settings: dict | None = None, verbose: int = 0) -> dict:
    """Convert a reference weight tree into a new run directory that ``train`` can continue.

    Every file becomes a weights checkpoint (``dropout_X/weights/NNNepochs_weights_model_I.weights.h5``);
    each member's latest epoch also becomes its resumable state, with a fresh
    Adam optimizer (the reference never saved its optimizer state). The run's
    data (``dataset``, ``data_dir``) and experiment ``settings`` (TrainConfig
    fields such as val_fraction, limit_train, batch_size, seed) are recorded
    in config.json exactly as ``train`` would, so the data fingerprint and the
    validation split come from the real data. ``models`` keeps members
    0..models-1. With ``evaluate``, every epoch at which all members have
    weights is evaluated on the run's validation and test splits
    (``history/errors.csv``).

    Returns {"run_dir", "config", "members": [...], "rows": [error rows with "dropout"]}.
    """
    from .model import build_model, compile_model
    from .rundir import RunLock, atomic_write_json, atomic_write_text, save_member_state, save_weights_atomic
    from .train import (
        _record_checkpoint,
        evaluate_checkpoint,
        load_or_download,
        member_seed,
        open_run,
        prepare_data,
        state_path,
        weights_path,
    )

    import keras

    ref_dir, run_dir = Path(ref_dir), Path(run_dir)
    files = find_reference_files(ref_dir)
    rates = sorted({f.dropout for f in files})
    members_by_rate = {r: sorted({f.index for f in files if f.dropout == r}) for r in rates}
    if models is not None:
        if models < 1:
            raise ConfigError(f"--models must be >= 1, got {models}")
        for r in rates:
            members_by_rate[r] = [i for i in members_by_rate[r] if i < models]
        files = [f for f in files if f.index < models]
    count = None
    for r in rates:
        idx = members_by_rate[r]
        n = models if models is not None else len(idx)
        if idx != list(range(n)):
            raise DataError(f"{ref_dir}: dropout {r:g} has members {idx}; a run needs members 0..{n - 1}")
        if count is not None and n != count:
            raise DataError(f"{ref_dir}: dropout rates have different member counts ({count} vs {n}); "
                            "import one dropout_X folder at a time")
        count = n
    assert count is not None
    latest = {(f.dropout, f.index): max(g.epoch for g in files if (g.dropout, g.index) == (f.dropout, f.index))
              for f in files}
    settings = dict(settings or {})
    bad = {"dataset", "dropouts", "models", "epochs"} & set(settings)
    if bad:
        raise ConfigError(f"settings {', '.join(sorted(bad))} come from the reference files, not from options")
    settings.setdefault("checkpoint_every", 16)
    config = TrainConfig(dataset=dataset, dropouts=tuple(rates), models=count, epochs=max(latest.values()),
                         **settings)

    with RunLock(run_dir):
        if (run_dir / "config.json").exists():
            raise RunDirError(f"{run_dir} already holds a run (config.json); import into a new --run-dir")
        loaded = load_or_download(dataset, data_dir, mirror=mirror, download=download)
        ds, used_dir = loaded if isinstance(loaded, tuple) else (loaded, data_dir)
        if len(ds.classes) != len(REFERENCE_CLASSES):
            raise ConfigError(f"--dataset {dataset} has {len(ds.classes)} classes; the reference models have "
                              f"{len(REFERENCE_CLASSES)} (digits): use emnist-digits, emnist-mnist or mnist")
        data = prepare_data(config, ds)
        if used_dir is not None and hasattr(data, "data_dir"):
            data.data_dir = str(Path(used_dir).resolve())  # lets `train --run-dir` find the data again
        log.info("importing %d reference files (%d members x %s) into %s; data %s: %d train / %d val / %d test",
                 len(files), count, ", ".join(f"dropout {r:g}" for r in rates), run_dir, data.name,
                 len(data.y_train), len(data.y_val), len(data.y_test))
        members = []
        for rate in rates:
            for index in range(count):
                seed = member_seed(config.seed, rate, index)
                keras.utils.set_random_seed(seed)
                model = build_model(data.num_classes, rate, data.mean, data.std, config.model)
                compile_model(model, config.lr)
                model.optimizer.build(model.trainable_variables)
                mine = sorted((f for f in files if (f.dropout, f.index) == (rate, index)), key=lambda f: f.epoch)
                info = None
                for f in mine:
                    info = load_reference_weights(model, f.path, json_path=sibling_json(f.path))
                    save_weights_atomic(model, weights_path(run_dir, rate, f.epoch, index))
                # The last one loaded is the latest epoch: it becomes the member's state.
                save_member_state(state_path(run_dir, rate, index), model, mine[-1].epoch, {
                    "seed": seed, "learning_rate": config.lr, "imported_from": str(mine[-1].path),
                    "optimizer": "fresh Adam: the reference saved no optimizer state",
                })
                members.append({"dropout": rate, "index": index, "epochs": [f.epoch for f in mine],
                                "state_epoch": mine[-1].epoch, "backend": info["backend"] if info else None,
                                "files": [str(f.path) for f in mine]})
                del model
        rows: list[dict] = []
        if evaluate:
            for rate in rates:
                epochs = sorted({f.epoch for f in files if f.dropout == rate})
                complete = [e for e in epochs
                            if all(weights_path(run_dir, rate, e, i).exists() for i in range(count))]
                errors: list[dict] = []
                for epoch in complete:
                    log.info("evaluating the imported dropout %g ensemble at epoch %d", rate, epoch)
                    epoch_rows = evaluate_checkpoint(run_dir, config, data, rate, epoch)
                    _record_checkpoint(run_dir, rate, epoch, epoch_rows)
                    errors += epoch_rows
                rows += [dict(r, dropout=rate) for r in errors if int(r["epoch"]) == max(complete, default=-1)]
        open_run(run_dir, config, data)
        path = run_dir / "config.json"
        saved = json.loads(path.read_text())
        saved["imported"] = {
            "from": str(ref_dir.resolve()),
            "files": [str(f.path) for f in files],
            "reference_normalization": {"mean": REFERENCE_MEAN, "std": REFERENCE_STD},
            "run_normalization": {"mean": data.mean, "std": data.std},
            "note": ("weights converted from the reference's Keras 2 files (Theano kernels flipped, post-Flatten "
                     "features permuted to channels_last, the normalization difference folded into the first "
                     "convolution); the reference saved no optimizer state, so continuing starts a fresh Adam"),
        }
        atomic_write_json(path, saved)
        record = {"time": saved.get("created"), "argv": sys.argv, "imported_from": str(ref_dir.resolve())}
        inv = run_dir / "invocations.jsonl"
        old = inv.read_text() if inv.exists() else ""
        atomic_write_text(inv, old + json.dumps(record, sort_keys=True) + "\n")
    return {"run_dir": str(run_dir), "config": config, "members": members, "rows": rows}


# ----------------------------------------------------------------------------- command line


def register(subparsers) -> argparse.ArgumentParser:
    """Add `import-reference` to an argparse subparsers object."""
    p = subparsers.add_parser(
        "import-reference",
        help="convert the reference's Keras 2 weight files into a run directory you can continue",
        description=(
            "Convert a reference weight tree (dropout_*/weights/NNNepochs_weights_model_I.pkl, Keras 2 HDF5) "
            "into a new run directory: every file becomes a weights checkpoint, each member's latest epoch its "
            "resumable state. The reference saved no optimizer state, so continuing starts a fresh Adam: "
            "emnist-cnn train --run-dir RUN --epochs N --lr 1e-5 (with the same --data-dir)."),
    )
    p.add_argument("ref_dir", type=Path, metavar="DIR",
                   help="the reference's folder holding dropout_*/weights/ (or one dropout_X folder) (required)")
    p.add_argument("--run-dir", type=Path, required=True,
                   help="new run directory to create (required, no default)")
    p.add_argument("--dataset", choices=DATASETS, default="emnist-digits",
                   help="data the run continues training on and is evaluated on (default: emnist-digits)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="folder with the dataset files (default: $EMNIST_CNN_DATA, else ~/.cache/emnist-cnn/data)")
    p.add_argument("--mirror", default=None,
                   help="base URL to download EMNIST from (default: $EMNIST_CNN_MIRROR, else NIST)")
    p.add_argument("--no-download", action="store_true",
                   help="fail instead of downloading a missing EMNIST split (default: download it)")
    p.add_argument("--models", type=int, default=None, metavar="N",
                   help="import only members 0..N-1 (default: every member found)")
    p.add_argument("--val-fraction", type=float, default=None,
                   help="share of the training set held out for validation (default: 0.1)")
    p.add_argument("--seed", type=int, default=None, help="seed of the split and of continued training (default: 0)")
    p.add_argument("--limit-train", type=int, default=None,
                   help="continue on a stratified subset of N training images (default: all)")
    p.add_argument("--batch-size", type=int, default=None, help="images per step when continuing (default: 512)")
    p.add_argument("--checkpoint-every", type=int, default=None,
                   help="epochs between checkpoints when continuing (default: 16, as the reference)")
    p.add_argument("--lr", type=float, default=None,
                   help="the run's base Adam learning rate; continue with train --lr for a fixed one (default: 0.001)")
    p.add_argument("--bn-recalibration", type=int, default=None, metavar="N",
                   help="training images used to recompute BatchNormalization statistics after each continued "
                        "epoch; 0 keeps the moving averages (default: 10000)")
    p.add_argument("--no-augment", action="store_true",
                   help="continue without augmentation (default: the reference's augmentation)")
    p.add_argument("--no-evaluate", action="store_true",
                   help="skip evaluating the imported checkpoints on validation and test (default: evaluate)")
    p.set_defaults(func=cmd_import_reference)
    return p


def cmd_import_reference(args: argparse.Namespace) -> int:
    from .cli import format_results

    settings = {k: v for k, v in {
        "val_fraction": args.val_fraction, "seed": args.seed, "limit_train": args.limit_train,
        "batch_size": args.batch_size, "checkpoint_every": args.checkpoint_every, "lr": args.lr,
        "bn_recalibration_images": args.bn_recalibration,
    }.items() if v is not None}
    if args.no_augment:
        settings["augment"] = AugmentConfig(enabled=False)
    result = import_reference(args.ref_dir, args.run_dir, dataset=args.dataset, data_dir=args.data_dir,
                              models=args.models, evaluate=not args.no_evaluate, download=not args.no_download,
                              mirror=args.mirror, settings=settings)
    config: TrainConfig = result["config"]
    n_files = sum(len(m["epochs"]) for m in result["members"])
    print(f"imported {n_files} reference weight files: {config.models} members x "
          f"{', '.join(f'dropout {d:g}' for d in config.dropouts)}, latest epoch {config.epochs}")
    if result["rows"]:
        print(format_results(result["rows"]))
    print("\nThe reference saved no optimizer state: continuing starts a fresh Adam optimizer. Continue with")
    data_dir = f" --data-dir {args.data_dir}" if args.data_dir else ""
    print(f"  emnist-cnn train --run-dir {args.run_dir} --epochs {config.epochs + 1} --lr 1e-5{data_dir}")
    print(f"\nrun directory: {args.run_dir}")
    return 0
