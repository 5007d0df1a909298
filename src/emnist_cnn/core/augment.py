"""The reference augmentation as one random affine warp per image.

The same functions serve two callers: `augment_batch` draws the parameters on
the host from a numpy Generator (plots, tracking, test-time checks), and the
compiled training step (`core.trainer`) draws them in the graph from uniform
numbers (`scale_affine_params`). Either way the matrix is built and the image
resampled once with `keras.ops`, on the accelerator when there is one.
"""

from __future__ import annotations

import numpy as np

from ..config import IMAGE_SIDE, AugmentConfig
from ..errors import ConfigError

__all__ = ["PARAM_NAMES", "sample_affine_params", "scale_affine_params", "build_affine_transforms",
           "warp_images", "augment_batch"]

PARAM_NAMES = ("theta", "tx", "ty", "shear", "zx", "zy")


def _ranges(cfg: AugmentConfig) -> list[tuple[float, float]]:
    """(low, high) per parameter of PARAM_NAMES, all drawn uniformly."""
    r = float(np.deg2rad(cfg.rotation_deg))
    return [(-r, r),  # rotation, radians
            (-cfg.shift_frac, cfg.shift_frac),  # fraction of width, + moves right
            (-cfg.shift_frac, cfg.shift_frac),  # fraction of height, + moves down
            (-cfg.shear_rad, cfg.shear_rad),
            (cfg.zoom_min, cfg.zoom_max),
            (cfg.zoom_min, cfg.zoom_max)]


def sample_affine_params(rng: np.random.Generator, n: int, cfg: AugmentConfig) -> dict[str, np.ndarray]:
    """Draw per-image parameters on the host with the reference's distributions (all uniform)."""
    return {name: rng.uniform(lo, hi, n) for name, (lo, hi) in zip(PARAM_NAMES, _ranges(cfg))}


def scale_affine_params(u, cfg: AugmentConfig) -> dict:
    """Per-image parameters from uniform numbers `u` in [0, 1), shape (6, N), a backend tensor."""
    import keras  # deferred: importing the backend is slow and data-only users never need it

    return {name: keras.ops.add(lo, keras.ops.multiply(hi - lo, u[k]))
            for k, (name, (lo, hi)) in enumerate(zip(PARAM_NAMES, _ranges(cfg)))}


def build_affine_transforms(params: dict, height: int = IMAGE_SIDE, width: int = IMAGE_SIDE):
    """Compose rotation, shift, shear and zoom about the image centre, in float32 with `keras.ops`.

    Returns (N, 8) rows `[a0, a1, a2, b0, b1, b2, 0, 0]` that map an output
    pixel (x, y) to the input pixel it samples, as `affine_transform` expects.
    Like Keras 2's ImageDataGenerator the matrix is the inverse map: zoom > 1
    samples a larger area, so the digit shrinks. Shifts are applied in output
    space so that `tx` moves the content by `tx * width` pixels.
    """
    import keras

    ops = keras.ops
    p = {k: ops.cast(ops.convert_to_tensor(v), "float32") for k, v in params.items()}
    c, s = ops.cos(p["theta"]), ops.sin(p["theta"])
    # input = A (output - shift - centre) + centre with A = rotation @ shear @ zoom. Keras 2 sheared
    # (row, col) indices with [[1, -sin], [0, cos]]; in (x, y) = (col, row) that is [[cos, 0], [-sin, 1]]:
    # vertical strokes stay vertical, horizontal ones tilt.
    csh, ssh = ops.cos(p["shear"]), ops.sin(p["shear"])
    a00, a01 = (c * csh + s * ssh) * p["zx"], -s * p["zy"]
    a10, a11 = (s * csh - c * ssh) * p["zx"], c * p["zy"]
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    px, py = p["tx"] * width + cx, p["ty"] * height + cy
    zero = ops.zeros_like(c)
    return ops.stack([a00, a01, cx - a00 * px - a01 * py, a10, a11, cy - a10 * px - a11 * py, zero, zero], axis=1)


def warp_images(x, params: dict, cfg: AugmentConfig, xla: bool = False):
    """Resample float (N, H, W, 1) images `x` once with per-image `params`.

    `xla`: for a step compiled by XLA, which has no kernel for TensorFlow's
    image transform: the same warp by gathering pixels (within 1e-7 of the
    kernel; on a CPU 14x slower than it without XLA, faster with XLA).
    """
    import keras

    transforms = build_affine_transforms(params, x.shape[1], x.shape[2])
    if not xla:
        return keras.ops.image.affine_transform(x, transforms, interpolation=cfg.interpolation,
                                                fill_mode=cfg.fill_mode, data_format="channels_last")
    return _warp_by_gathering(x, transforms, cfg)


def _warp_by_gathering(x, transforms, cfg: AugmentConfig):
    import keras

    ops = keras.ops
    if cfg.fill_mode not in ("nearest", "constant"):
        raise ConfigError(f"fill_mode {cfg.fill_mode} has no XLA version here; use --jit-compile off")
    h, w = x.shape[1], x.shape[2]
    flat = ops.reshape(x, (-1,))
    first = ops.reshape(ops.arange(ops.shape(x)[0], dtype="int32") * (h * w), (-1, 1, 1))  # each image's offset
    rows, cols = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij")
    t = [ops.reshape(transforms[:, k], (-1, 1, 1)) for k in range(6)]
    x_in, y_in = t[0] * cols + t[1] * rows + t[2], t[3] * cols + t[4] * rows + t[5]

    def read(r, c):  # pixels at integer (row, col), (N, H, W), filled outside the image
        inside = (r >= 0) & (r < h) & (c >= 0) & (c < w)
        v = ops.take(flat, first + ops.clip(r, 0, h - 1) * w + ops.clip(c, 0, w - 1))
        return v if cfg.fill_mode == "nearest" else ops.where(inside, v, ops.zeros_like(v))

    if cfg.interpolation == "nearest":
        out = read(ops.cast(ops.floor(y_in + 0.5), "int32"), ops.cast(ops.floor(x_in + 0.5), "int32"))
    else:
        y0, x0 = ops.floor(y_in), ops.floor(x_in)
        dy, dx = y_in - y0, x_in - x0
        r, c = ops.cast(y0, "int32"), ops.cast(x0, "int32")
        out = ((1 - dy) * ((1 - dx) * read(r, c) + dx * read(r, c + 1))
               + dy * ((1 - dx) * read(r + 1, c) + dx * read(r + 1, c + 1)))
    return ops.expand_dims(out, -1)


def augment_batch(images: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig):
    """Warp a batch of uint8 (N, 28, 28) images; returns float32 (N, 28, 28, 1) in [0, 1].

    The result is a backend tensor when augmentation runs, else a numpy array.
    """
    x = images.astype(np.float32)[..., None] * np.float32(1.0 / 255.0)
    if not cfg.enabled:
        return x
    return warp_images(x, sample_affine_params(rng, len(images), cfg), cfg)
