"""Classify real image files (PNG, JPEG, any size, either polarity) with any model we can load.

Image files are read here and turned into 28x28 images by `core.preprocess`, the way the model's training
images were made (EMNIST's or MNIST's conversion).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..config import IMAGE_SIDE
from ..core.preprocess import MIN_CONTRAST, preprocess
from ..errors import DataError, EmnistCnnError, ImageError, format_one_line
from ..io.reference_weights import REFERENCE_CLASSES, is_reference_weights, load_reference_weights, sibling_json
from ..io.rundir import RunDir, choose_image_preprocessing
from ..io.weights import load_checkpoint_model, load_weights_any

__all__ = ["STYLES", "Predictor", "read_grayscale", "load_image_for_emnist", "load_predictor", "predict_files"]


STYLES = ("auto", "emnist", "mnist")


# ----------------------------------------------------------------------------- reading and preprocessing


def read_grayscale(path) -> np.ndarray:
    """The image as float64 (H, W) in [0, 1]; transparency is composited onto paper."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such image file")
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(img, np.float64)
                gray = arr / (65535.0 if arr.max() > 255 else 255.0)
                alpha = None
            else:
                has_alpha = img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info
                rgba = img.convert("RGBA") if has_alpha else None
                gray = np.asarray(img.convert("L"), np.float64) / 255.0
                alpha = np.asarray(rgba, np.float64)[..., 3] / 255.0 if rgba is not None else None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        text = " ".join(str(exc).split())[:200]
        raise ImageError(f"{path}: cannot read the image: not a PNG/JPEG, or truncated ({text})") from exc
    if gray.ndim != 2 or gray.size == 0:
        raise ImageError(f"{path}: empty image")
    if alpha is not None and alpha.min() < 1.0:
        on_white = gray * alpha + (1.0 - alpha)
        # Ink drawn in white on a transparent background vanishes on white paper: use black then.
        gray = on_white if np.ptp(on_white) >= MIN_CONTRAST else gray * alpha
    return np.clip(gray, 0.0, 1.0)


def load_image_for_emnist(path, *, style: str = "emnist") -> np.ndarray:
    """Read an image file and preprocess it as EMNIST (default) or MNIST made its images: uint8 (28, 28)."""
    return preprocess(read_grayscale(path), style, name=str(path))


# ----------------------------------------------------------------------------- loading a model


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


# ----------------------------------------------------------------------------- predicting files


def predict_files(model_path, images: Sequence, *, preprocessing: str = "auto", predictor: Predictor | None = None,
                  top: int = 1) -> list[dict]:
    """Classify each image file; one dict per file, in order.

    Success: {"file", "class", "probability", "index"} (and "top": the `top`
    best [class, probability] pairs when top > 1). A file that cannot be read
    or holds no character: {"file", "error"}; the other files are still
    predicted. ``preprocessing`` "auto" uses the model's (EMNIST's procedure
    unless the model was trained on MNIST).
    """
    if preprocessing not in STYLES:
        raise DataError(f"--preprocessing must be one of {', '.join(STYLES)}, got {preprocessing!r}")
    pred = predictor or load_predictor(model_path)
    style = pred.preprocessing if preprocessing == "auto" else preprocessing
    results: list[dict] = []
    batch, where = [], []
    for image in images:
        try:
            batch.append(load_image_for_emnist(image, style=style))
            where.append(len(results))
            results.append({"file": str(image)})
        except ImageError as exc:
            results.append({"file": str(image), "error": str(exc)})
    if batch:
        x = np.stack(batch).astype(np.float32)[..., None] / np.float32(255.0)
        probs = pred(x)
        for k, p in zip(where, probs):
            i = int(np.argmax(p))
            results[k].update({"class": pred.classes[i], "probability": float(p[i]), "index": i})
            if top > 1:
                order = np.argsort(-p)[:top]
                results[k]["top"] = [[pred.classes[int(j)], float(p[j])] for j in order]
    return results
