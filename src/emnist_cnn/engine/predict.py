"""Classify real image files (PNG, JPEG, any size, either polarity) with any model we can load.

Image files are read here and turned into 28x28 images by `core.preprocess`, the way the model's training
images were made (EMNIST's or MNIST's conversion).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..core.preprocess import MIN_CONTRAST, preprocess
from ..errors import DataError, ImageError
from ..io.model_files import Predictor, load_predictor

__all__ = ["STYLES", "read_grayscale", "load_image_for_emnist", "predict_files"]


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
