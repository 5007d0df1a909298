"""The reference augmentation as one random affine warp per image.

Parameters are drawn on the host with a numpy Generator (cheap, and a seed makes
the stream repeatable per member and epoch); the warp itself runs through
`keras.ops.image.affine_transform`, so it executes on the accelerator when
there is one and resamples each image exactly once.
"""

from __future__ import annotations

import numpy as np

from ..config import AugmentConfig

__all__ = ["sample_affine_params", "build_affine_transforms", "augment_batch"]


def sample_affine_params(rng: np.random.Generator, n: int, cfg: AugmentConfig) -> dict[str, np.ndarray]:
    """Draw per-image parameters with the reference's distributions (all uniform)."""
    return {
        "theta": np.deg2rad(rng.uniform(-cfg.rotation_deg, cfg.rotation_deg, n)),
        "tx": rng.uniform(-cfg.shift_frac, cfg.shift_frac, n),  # fraction of width, + moves right
        "ty": rng.uniform(-cfg.shift_frac, cfg.shift_frac, n),  # fraction of height, + moves down
        "shear": rng.uniform(-cfg.shear_rad, cfg.shear_rad, n),
        "zx": rng.uniform(cfg.zoom_min, cfg.zoom_max, n),
        "zy": rng.uniform(cfg.zoom_min, cfg.zoom_max, n),
    }


def build_affine_transforms(params: dict[str, np.ndarray], height: int = 28, width: int = 28) -> np.ndarray:
    """Compose rotation, shift, shear and zoom about the image centre.

    Returns (N, 8) rows `[a0, a1, a2, b0, b1, b2, 0, 0]` that map an output
    pixel (x, y) to the input pixel it samples, as `affine_transform` expects.
    Like Keras 2's ImageDataGenerator the matrix is the inverse map: zoom > 1
    samples a larger area, so the digit shrinks. Shifts are applied in output
    space so that `tx` moves the content by `tx * width` pixels.
    """
    theta, shear = params["theta"], params["shear"]
    n = theta.shape[0]
    c, s = np.cos(theta), np.sin(theta)
    rot = _stack(c, -s, 0 * c, s, c, 0 * c)
    # Keras 2 sheared (row, col) indices with [[1, -sin], [0, cos]]; in (x, y) = (col, row)
    # that is this matrix: vertical strokes stay vertical, horizontal ones tilt.
    shr = _stack(np.cos(shear), 0 * c, 0 * c, -np.sin(shear), 1 + 0 * c, 0 * c)
    zoom = _stack(params["zx"], 0 * c, 0 * c, 0 * c, params["zy"], 0 * c)
    # Map about the centre: output -> centred -> inverse warp -> input.
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    to_centre = np.tile(np.array([[1, 0, -cx], [0, 1, -cy], [0, 0, 1]], np.float64), (n, 1, 1))
    from_centre = np.tile(np.array([[1, 0, cx], [0, 1, cy], [0, 0, 1]], np.float64), (n, 1, 1))
    shift = _stack(1 + 0 * c, 0 * c, -params["tx"] * width, 0 * c, 1 + 0 * c, -params["ty"] * height)
    m = from_centre @ rot @ shr @ zoom @ to_centre @ shift
    out = np.zeros((n, 8), np.float32)
    out[:, 0:3] = m[:, 0, :]
    out[:, 3:6] = m[:, 1, :]
    return out


def augment_batch(images: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig):
    """Warp a batch of uint8 (N, 28, 28) images; returns float32 (N, 28, 28, 1) in [0, 1].

    The result is a backend tensor when augmentation runs, else a numpy array.
    """
    x = images.astype(np.float32)[..., None] * np.float32(1.0 / 255.0)
    if not cfg.enabled:
        return x
    import keras  # deferred: importing the backend is slow and data-only users never need it

    transforms = build_affine_transforms(sample_affine_params(rng, len(images), cfg), *images.shape[1:3])
    return keras.ops.image.affine_transform(
        x, transforms, interpolation=cfg.interpolation, fill_mode=cfg.fill_mode, data_format="channels_last"
    )


def _stack(a, b, c, d, e, f) -> np.ndarray:
    n = np.shape(a)[0]
    m = np.zeros((n, 3, 3), np.float64)
    m[:, 0, 0], m[:, 0, 1], m[:, 0, 2] = a, b, c
    m[:, 1, 0], m[:, 1, 1], m[:, 1, 2] = d, e, f
    m[:, 2, 2] = 1.0
    return m
