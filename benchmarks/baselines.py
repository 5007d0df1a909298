"""What our figures are compared with: the reference's Keras 2.0.8 augmentation, re-implemented, and the
reference CNN in plain PyTorch."""

from __future__ import annotations

import numpy as np

from .harness import DROPOUT, NUM_CLASSES


def _k208_offset_center(matrix: np.ndarray, x: int, y: int) -> np.ndarray:
    # keras 2.0.8 transform_matrix_offset_center: move the origin to the image centre and back.
    o_x, o_y = float(x) / 2 + 0.5, float(y) / 2 + 0.5
    offset = np.array([[1, 0, o_x], [0, 1, o_y], [0, 0, 1]])
    reset = np.array([[1, 0, -o_x], [0, 1, -o_y], [0, 0, 1]])
    return np.dot(np.dot(offset, matrix), reset)

def _k208_apply_transform(x: np.ndarray, matrix: np.ndarray, channel_axis: int, fill_mode: str,
                          cval: float = 0.0) -> np.ndarray:
    # keras 2.0.8 apply_transform: scipy's order-0 (nearest) affine resampling, one channel at a time.
    from scipy import ndimage

    x = np.rollaxis(x, channel_axis, 0)
    affine, offset = matrix[:2, :2], matrix[:2, 2]
    channels = [ndimage.affine_transform(c, affine, offset, order=0, mode=fill_mode, cval=cval) for c in x]
    return np.rollaxis(np.stack(channels, axis=0), 0, channel_axis + 1)

def k208_random_transform(x: np.ndarray, rs: np.random.RandomState, cfg) -> np.ndarray:
    """keras 2.0.8 ImageDataGenerator.random_transform for one channels_first image (1, 28, 28).

    The reference ran Theano (channels_first) with rotation_range=12,
    width/height_shift_range=0.1, shear_range=0.3 (radians in 2.0.x), zoom_range=0.1,
    fill_mode='nearest'; the draws use the legacy global-RandomState API in the same order.
    """
    row_axis, col_axis, channel_axis = 1, 2, 0
    theta = np.pi / 180 * rs.uniform(-cfg.rotation_deg, cfg.rotation_deg)
    tx = rs.uniform(-cfg.shift_frac, cfg.shift_frac) * x.shape[row_axis]  # height_shift_range
    ty = rs.uniform(-cfg.shift_frac, cfg.shift_frac) * x.shape[col_axis]  # width_shift_range
    shear = rs.uniform(-cfg.shear_rad, cfg.shear_rad)
    zx, zy = rs.uniform(cfg.zoom_min, cfg.zoom_max, 2)

    matrix = None
    if theta != 0:
        matrix = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    if tx != 0 or ty != 0:
        shift = np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1]])
        matrix = shift if matrix is None else np.dot(matrix, shift)
    if shear != 0:
        shear_m = np.array([[1, -np.sin(shear), 0], [0, np.cos(shear), 0], [0, 0, 1]])
        matrix = shear_m if matrix is None else np.dot(matrix, shear_m)
    if zx != 1 or zy != 1:
        zoom = np.array([[zx, 0, 0], [0, zy, 0], [0, 0, 1]])
        matrix = zoom if matrix is None else np.dot(matrix, zoom)
    if matrix is not None:
        h, w = x.shape[row_axis], x.shape[col_axis]
        matrix = _k208_offset_center(matrix, h, w)
        x = _k208_apply_transform(x, matrix, channel_axis, fill_mode=cfg.fill_mode)
    return x

def reference_augment_batch(images: np.ndarray, rs: np.random.RandomState, cfg) -> np.ndarray:
    """The reference's batch path (keras 2.0.8 NumpyArrayIterator.next): a Python loop over the
    batch, each float32 image through random_transform. Returns float32 (N, 28, 28, 1)."""
    x = images[:, None].astype(np.float32) * np.float32(1.0 / 255.0)  # the reference's float32 arrays
    batch_x = np.zeros(x.shape, dtype=np.float32)
    for i in range(len(x)):
        batch_x[i] = k208_random_transform(x[i].astype(np.float32), rs, cfg)
    return batch_x.transpose(0, 2, 3, 1)

def torch_cnn():
    """The reference CNN in plain PyTorch (NCHW), layer for layer as emnist_cnn.core.model.build_model."""
    import torch
    from torch import nn

    from emnist_cnn.config import EMNIST_DIGITS_MEAN, EMNIST_DIGITS_STD

    class Normalize(nn.Module):
        def __init__(self, mean: float, std: float):
            super().__init__()
            self.mean, self.std = mean, std

        def forward(self, t):
            return (t - self.mean) / self.std

    def bn2(c):  # Keras momentum 0.99 is torch momentum 0.01
        return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)

    def bn1(c):
        return nn.BatchNorm1d(c, eps=1e-3, momentum=0.01)

    def act():
        return nn.LeakyReLU(0.3)

    with torch.no_grad():
        return nn.Sequential(
            Normalize(EMNIST_DIGITS_MEAN, EMNIST_DIGITS_STD),
            nn.Conv2d(1, 32, 3), act(), bn2(32),
            nn.Conv2d(32, 32, 3), act(), nn.MaxPool2d(2), bn2(32),
            nn.Conv2d(32, 64, 3), act(), bn2(64),
            nn.Conv2d(64, 64, 3), act(), nn.MaxPool2d(2),
            nn.Flatten(), bn1(1024),
            nn.Linear(1024, 512), act(), bn1(512), nn.Dropout(DROPOUT),
            nn.Linear(512, NUM_CLASSES),  # softmax is inside cross_entropy
        )

def count_torch_params(model) -> int:
    """Parameters plus BatchNorm running mean/variance: what Keras' count_params() counts."""
    from torch import nn

    n = sum(p.numel() for p in model.parameters())
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n += m.running_mean.numel() + m.running_var.numel()
    return n
