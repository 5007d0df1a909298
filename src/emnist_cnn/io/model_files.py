"""The exported model's formats, each writer beside its reader: JSON + HDF5 weights, .keras, SavedModel and ONNX
(`export_model`), and every model file this package can run, ours or the reference's (`load_predictor`).

Each format takes upright ``[0, 1]`` pixels ``(N, 28, 28, 1)`` and returns softmax probabilities;
metadata.json beside them records classes, preprocessing and errors.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..config import IMAGE_SIDE
from ..errors import ConfigError, DataError, EmnistCnnError, ExportError, RunDirError, format_one_line
from .files import atomic_write_json, atomic_write_text
from .reference_weights import REFERENCE_CLASSES, is_reference_weights, load_reference_weights, sibling_json
from .rundir import RunDir, choose_image_preprocessing
from .weights import load_checkpoint_model, load_weights_any

__all__ = ["FORMATS", "FILES", "export_model", "Predictor", "load_predictor"]

log = logging.getLogger(__name__)

FORMATS = ("json_h5", "keras", "saved_model", "onnx")
FILES = {"json": "model.json", "weights": "model.weights.h5", "keras": "model.keras",
         "saved_model": "saved_model", "onnx": "model.onnx"}


# ----------------------------------------------------------------------------- writing the formats


def export_model(model, out_dir, *, metadata: dict | None = None, formats: Sequence[str] = FORMATS,
                 strict: bool = False) -> dict:
    """Write ``model`` in every requested format into ``out_dir``, then ``metadata.json``.

    A format this stack cannot produce (ONNX without its converter, SavedModel off the
    TensorFlow backend) is skipped with a warning and recorded under
    "skipped", unless ``strict``, where it is an :class:`ExportError`.
    Returns the metadata written (with "files" and "skipped").
    """
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ConfigError(f"--formats: unknown format {unknown[0]!r}; choose from {', '.join(FORMATS)}")
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(f"{out_dir}: cannot create the export folder ({exc.strerror or exc})") from exc
    files: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for fmt in formats:
        try:
            if fmt == "json_h5":
                _write_json_h5(model, out_dir)
                files["json"], files["weights"] = FILES["json"], FILES["weights"]
            elif fmt == "keras":
                _replace_with(out_dir / FILES["keras"], lambda tmp: model.save(tmp))
                files["keras"] = FILES["keras"]
            elif fmt == "saved_model":
                _write_saved_model(model, out_dir / FILES["saved_model"])
                files["saved_model"] = FILES["saved_model"]
            elif fmt == "onnx":
                _write_onnx(model, out_dir / FILES["onnx"])
                files["onnx"] = FILES["onnx"]
        except _Unsupported as exc:
            if strict:
                raise ExportError(f"{out_dir}: cannot export {fmt}: {exc}") from exc
            log.warning("skipping the %s format: %s", fmt, exc)
            skipped[fmt] = str(exc)
        except EmnistCnnError:
            raise
        except Exception as exc:  # Keras/TF/tf2onnx raise many types; one line for the user
            why = f"{type(exc).__name__}: {format_one_line(exc)}"
            raise ExportError(f"{out_dir}: exporting {fmt} failed ({why})") from exc
    meta = dict(metadata or {})
    meta["files"] = files
    meta["skipped"] = skipped
    atomic_write_json(out_dir / "metadata.json", meta)
    return meta


class _Unsupported(Exception):
    """This stack cannot produce the format (a missing package or another backend)."""


def _replace_with(path: Path, write) -> None:
    """Let `write(tmp)` create a temporary file beside `path`, then rename it into place."""
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink()


def _write_json_h5(model, out_dir: Path) -> None:
    text = json.dumps(json.loads(model.to_json()), indent=1)
    _replace_with(out_dir / FILES["weights"], lambda tmp: model.save_weights(tmp))
    atomic_write_text(out_dir / FILES["json"], text + "\n")


def _write_saved_model(model, path: Path) -> None:
    import keras

    if keras.backend.backend() != "tensorflow":
        raise _Unsupported(f"a TensorFlow SavedModel needs the tensorflow backend, not {keras.backend.backend()}")
    if path.exists() and not (path / "saved_model.pb").exists():
        raise ExportError(f"{path}: exists and is not a SavedModel; refusing to replace it")

    def write(tmp: Path) -> None:
        tf_log = logging.getLogger("tensorflow")
        level = tf_log.level
        tf_log.setLevel(logging.WARNING)  # not "Assets written to: <temp name>"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model.export(str(tmp), format="tf_saved_model", verbose=False)
        finally:
            tf_log.setLevel(level)
        if path.exists():
            shutil.rmtree(path)

    _replace_with(path, write)


def _write_onnx(model, path: Path) -> None:
    import keras

    # Keras converts through tf2onnx on TensorFlow, jax2onnx on JAX and torch's own exporter on torch.
    converter = {"tensorflow": "tf2onnx", "jax": "jax2onnx"}.get(keras.backend.backend())
    try:
        import onnx  # noqa: F401

        if converter:
            importlib.import_module(converter)
    except ImportError as exc:
        raise _Unsupported(f"{exc.name} is not installed (pip install onnx {converter or ''})".rstrip()) from exc
    # Keras exports only a model that has been called; a model just loaded or built has not.
    model(np.zeros((1, *model.inputs[0].shape[1:]), np.float32), training=False)
    logging.getLogger("tf2onnx").setLevel(logging.ERROR)
    # Keras' Normalization keeps mean and variance as eager tensors; tf2onnx turns such
    # captured tensors into extra graph inputs. As numpy arrays they become constants.
    norms = [layer for layer in _all_layers(model) if isinstance(layer, keras.layers.Normalization)]
    saved = [(layer.mean, layer.variance) for layer in norms]
    try:
        for layer in norms:
            layer.mean = keras.ops.convert_to_numpy(layer.mean)
            layer.variance = keras.ops.convert_to_numpy(layer.variance)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _replace_with(path, lambda tmp: model.export(str(tmp), format="onnx", verbose=False))
    finally:
        for layer, (mean, variance) in zip(norms, saved):
            layer.mean, layer.variance = mean, variance
    _finish_onnx(path)


def _finish_onnx(path: Path) -> None:
    """Check that the graph takes only the pixels, and name its output as the Keras model's: probabilities."""
    import onnx

    proto = onnx.load(str(path))
    graph = proto.graph
    initializers = {i.name for i in graph.initializer}
    inputs = [i.name for i in graph.input if i.name not in initializers]
    if len(inputs) != 1:
        path.unlink(missing_ok=True)
        raise ExportError(f"{path}: the ONNX graph has inputs {inputs}, expected only the pixels")
    if len(graph.output) == 1 and graph.output[0].name != "probabilities":
        old = graph.output[0].name
        for node in graph.node:
            node.output[:] = ["probabilities" if o == old else o for o in node.output]
            node.input[:] = ["probabilities" if i == old else i for i in node.input]
        graph.output[0].name = "probabilities"
        onnx.checker.check_model(proto)
        _replace_with(path, lambda tmp: onnx.save(proto, str(tmp)))


def _all_layers(model) -> list:
    out = []
    for layer in model.layers:
        out.append(layer)
        if hasattr(layer, "layers"):
            out += _all_layers(layer)
    return out


# ----------------------------------------------------------------------------- reading any model


@dataclass
class Predictor:
    """A loaded model: call it on float32 (N, 28, 28, 1) pixels in [0, 1] to get probabilities."""

    source: str
    kind: str
    classes: list[str]
    preprocessing: str  # "emnist" or "mnist": how image files are prepared for it
    fn: Callable[[np.ndarray], np.ndarray] = field(repr=False)

    def __call__(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        out = [np.asarray(self.fn(np.ascontiguousarray(x[i:i + batch_size], np.float32)), np.float32)
               for i in range(0, len(x), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), np.float32)


def _keras_fn(model) -> Callable:
    from ..core.model import predict_batch

    return lambda x: predict_batch(model, x)


def _classes_for(n: int, given=None) -> list[str]:
    if given is not None and len(given) == n:
        return [str(c) for c in given]
    return [str(i) for i in range(n)]


def _read_metadata(folder: Path) -> dict:
    path = folder / "metadata.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable export metadata ({exc})") from exc


def _style_from_meta(meta: dict, default: str = "emnist") -> str:
    style = meta.get("input", {}).get("image_preprocessing")
    return style if style in ("emnist", "mnist") else default


def load_predictor(path) -> Predictor:
    """Load any model we know how to run.

    - an export folder (with metadata.json), ``model.keras``, ``model.json``
      (+ ``model.weights.h5``), a SavedModel folder, ``model.onnx``;
    - our run's ``dropout_X/weights/NNNepochs_weights_model_I.weights.h5`` (the
      architecture comes from the run's config.json);
    - the reference's Keras 2 weight files (``*.pkl``, ``*.h5`` + JSON).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such model file or folder")
    try:
        if path.is_dir():
            if (path / "saved_model.pb").is_file():
                return _load_saved_model(path, _read_metadata(path.parent))
            meta = _read_metadata(path)
            files = meta.get("files", {})
            for key, loader in (("keras", _load_keras), ("saved_model", _load_saved_model),
                                ("json", _load_json), ("onnx", _load_onnx)):
                if key in files and (path / files[key]).exists():
                    return loader(path / files[key], meta)
            raise DataError(f"{path}: a folder without metadata.json naming a model, nor a SavedModel")
        name = path.name.lower()
        meta = _read_metadata(path.parent)
        if name.endswith(".keras"):
            return _load_keras(path, meta)
        if name.endswith(".onnx"):
            return _load_onnx(path, meta)
        if name.endswith(".json"):
            return _load_json(path, meta)
        if is_reference_weights(path):
            return _load_reference(path)
        if name.endswith(".weights.h5"):
            twin = path.with_name(path.name[: -len(".weights.h5")] + ".json")
            if twin.is_file():
                return _load_json(twin, meta)
            return _load_run_weights(path)
        raise DataError(f"{path}: not a model we can load (.keras, .json + .weights.h5, SavedModel folder, .onnx, "
                        "a run's .weights.h5, or the reference's Keras 2 weights)")
    except EmnistCnnError:
        raise
    except Exception as exc:  # Keras/TF raise many types for a damaged file: one line
        raise DataError(f"{path}: cannot load the model ({type(exc).__name__}: {format_one_line(exc)})") from exc


def _finish(path: Path, kind: str, model_or_fn, n_out: int, meta: dict, default_style="emnist") -> Predictor:
    fn = model_or_fn if callable(model_or_fn) and not hasattr(model_or_fn, "predict_on_batch") \
        else _keras_fn(model_or_fn)
    return Predictor(str(path), kind, _classes_for(n_out, meta.get("classes")), _style_from_meta(meta, default_style),
                     fn)


def _load_keras(path: Path, meta: dict) -> Predictor:
    import keras

    # safe_mode (Keras' default, spelled out): a file carrying Python code (a Lambda's bytecode) is refused.
    model = keras.saving.load_model(path, compile=False, safe_mode=True)
    return _finish(path, "keras", model, model.output_shape[-1], meta)


def _load_json(path: Path, meta: dict) -> Predictor:
    import keras

    text = path.read_text()
    spec = json.loads(text)
    if str(spec.get("keras_version", "")).startswith("2."):
        for suffix in (".h5", ".hdf5"):
            weights = path.with_suffix(suffix)
            if weights.is_file():
                return _load_reference(weights, json_path=path)
        raise DataError(f"{path}: a Keras 2 architecture without its weights file ({path.with_suffix('.h5').name})")
    candidates = [path.with_name(path.stem + ".weights.h5"), path.with_suffix(".h5")]
    weights = next((c for c in candidates if c.is_file()), None)
    if weights is None:
        raise DataError(f"{path}: no weights beside it ({candidates[0].name})")
    # What keras.models.model_from_json does, with safe mode explicit: no code from the file runs.
    model = keras.saving.deserialize_keras_object(spec, safe_mode=True)
    load_weights_any(model, weights)
    return _finish(path, "json+h5", model, model.output_shape[-1], meta)


def _load_saved_model(path: Path, meta: dict) -> Predictor:
    import tensorflow as tf

    obj = tf.saved_model.load(str(path))
    if not hasattr(obj, "serve"):
        raise DataError(f"{path}: SavedModel without a 'serve' endpoint (not exported by emnist-cnn export)")
    probe = obj.serve(np.zeros((1, IMAGE_SIDE, IMAGE_SIDE, 1), np.float32))
    return _finish(path, "saved_model", lambda x: obj.serve(x).numpy(), int(probe.shape[-1]), meta)


def _load_onnx(path: Path, meta: dict) -> Predictor:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise DataError(f"{path}: running ONNX models needs onnxruntime (pip install onnxruntime)") from exc
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    n_out = session.get_outputs()[0].shape[-1]
    return _finish(path, "onnx", lambda x: session.run(None, {name: x})[0], int(n_out), meta)


def _load_reference(path: Path, json_path=None) -> Predictor:
    from ..core.model import build_model

    model = build_model(len(REFERENCE_CLASSES))
    load_reference_weights(model, path, json_path=json_path or sibling_json(path))
    return Predictor(str(path), "reference", list(REFERENCE_CLASSES), "emnist", _keras_fn(model))


def _load_run_weights(path: Path) -> Predictor:
    found = RunDir.find_checkpoint(path)
    if found is None:
        raise DataError(f"{path}: a bare weights file; pass an exported model, or a weights file inside its run "
                        "directory (RUN/dropout_X/weights/), whose config.json gives the architecture")
    run, dropout, epoch, index = found
    saved = run.read_record()
    config = run.read_config()
    classes = list(run.read_normalization()[0])
    model = load_checkpoint_model(run, dropout, epoch, index, config=config)
    return Predictor(str(path), "run weights", classes, choose_image_preprocessing(config, saved), _keras_fn(model))
