"""Tests for emnist_cnn.core.augment: the reference's Keras 2.0.8 ImageDataGenerator warp.

The reference (github.com/j05t/emnist) trained with
``ImageDataGenerator(rotation_range=12, width_shift_range=0.1,
height_shift_range=0.1, shear_range=0.3, zoom_range=0.1)``: rotation +-12
degrees, shifts +-10% of the side (up to 2.8 px), shear 0.3 *radians* (Keras
2.0.x; Keras >= 2.1 reads it as degrees), zoom 0.9-1.1 drawn separately for x
and y, fill 'nearest', one affine warp per image.

Geometry is measured on the images themselves (centroids of small Gaussian
blobs, principal axes of real MNIST "1"s, centroids of real digits), so the
tests check what the warp does to pixels, not how the matrix is written.
Pixel coordinates are (x, y) = (column, row); the image centre is (13.5, 13.5).
"""

import math

import emnist_cnn  # noqa: F401  (sets KERAS_BACKEND before keras is imported)

import keras
import numpy as np
import pytest

from emnist_cnn.core import augment
from emnist_cnn.core.augment import augment_batch, build_affine_transforms, sample_affine_params
from emnist_cnn.config import AugmentConfig
from emnist_cnn.io.datasets import load_dataset

SIDE = 28
CENTRE = (SIDE - 1) / 2.0  # 13.5: the pixel-centre midpoint of a 28-pixel side
MAX_ROT = math.radians(12.0)
MAX_SHIFT_PX = 0.1 * SIDE  # 2.8
MAX_SHEAR = 0.3  # radians
YY, XX = np.mgrid[0:SIDE, 0:SIDE].astype(np.float64)

NO_WARP = dict(rotation_deg=0.0, shift_frac=0.0, shear_rad=0.0, zoom_min=1.0, zoom_max=1.0)


def only(**ranges) -> AugmentConfig:
    """Augmentation with every range zero except the given ones."""
    return AugmentConfig(**{**NO_WARP, **ranges})


def to_numpy(x) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(x))


# --------------------------------------------------------------------------
# Synthetic images and measurements


def blobs(*points, sigma: float = 1.2) -> np.ndarray:
    """uint8 (28, 28) image with a Gaussian blob (peak 255) at each (x, y)."""
    img = np.zeros((SIDE, SIDE))
    for x, y in points:
        img = np.maximum(img, np.exp(-((XX - x) ** 2 + (YY - y) ** 2) / (2 * sigma**2)))
    return np.round(255 * img).astype(np.uint8)


def centroid(img) -> tuple[float, float]:
    """Intensity-weighted (x, y) centroid of one image."""
    img = np.asarray(img, np.float64).reshape(SIDE, SIDE)
    m = img.sum()
    return float((img * XX).sum() / m), float((img * YY).sum() / m)


def centroids(imgs) -> tuple[np.ndarray, np.ndarray]:
    """Per-image (x, y) centroids of a batch."""
    imgs = np.asarray(imgs, np.float64).reshape(-1, SIDE, SIDE)
    m = imgs.sum(axis=(1, 2))
    return (imgs * XX).sum(axis=(1, 2)) / m, (imgs * YY).sum(axis=(1, 2)) / m


def blob_centroids(imgs, guesses) -> np.ndarray:
    """(N, len(guesses), 2): centroid of each blob, pixels assigned to the nearest guess."""
    imgs = np.asarray(imgs, np.float64).reshape(-1, SIDE, SIDE)
    g = np.asarray(guesses, np.float64)
    d2 = (XX[None] - g[:, 0, None, None]) ** 2 + (YY[None] - g[:, 1, None, None]) ** 2
    owner = d2.argmin(axis=0)
    out = np.zeros((len(imgs), len(g), 2))
    for k in range(len(g)):
        w = imgs * (owner == k)
        m = w.sum(axis=(1, 2))
        out[:, k, 0] = (w * XX).sum(axis=(1, 2)) / m
        out[:, k, 1] = (w * YY).sum(axis=(1, 2)) / m
    return out


def principal_axis_angle(imgs) -> np.ndarray:
    """Angle (radians, mod pi) of each image's major axis from its second moments."""
    imgs = np.asarray(imgs, np.float64).reshape(-1, SIDE, SIDE)
    m = imgs.sum(axis=(1, 2))
    cx, cy = centroids(imgs)
    dx = XX[None] - cx[:, None, None]
    dy = YY[None] - cy[:, None, None]
    mxx = (imgs * dx * dx).sum(axis=(1, 2)) / m
    myy = (imgs * dy * dy).sum(axis=(1, 2)) / m
    mxy = (imgs * dx * dy).sum(axis=(1, 2)) / m
    return 0.5 * np.arctan2(2 * mxy, mxx - myy)


def wrap_half_turn(a: np.ndarray) -> np.ndarray:
    """Axis-angle differences wrapped to (-pi/2, pi/2]."""
    return np.angle(np.exp(2j * np.asarray(a))) / 2


def inverse_map(params: dict, x: float, y: float) -> tuple[float, float]:
    """Where content at input (x, y) lands, from the output->input matrix of image 0."""
    row = to_numpy(build_affine_transforms(params))[0].astype(np.float64)
    m = np.array([row[0:3], row[3:6], [0.0, 0.0, 1.0]])
    out = np.linalg.solve(m, np.array([x, y, 1.0]))
    return float(out[0]), float(out[1])


def params_for(n: int, **values) -> dict:
    """Parameters of sample_affine_params' shape: identity except the given values."""
    p = {"theta": 0.0, "tx": 0.0, "ty": 0.0, "shear": 0.0, "zx": 1.0, "zy": 1.0, **values}
    return {k: np.full(n, float(v)) for k, v in p.items()}


@pytest.fixture
def warp_with(monkeypatch):
    """augment_batch with the random draw replaced by fixed parameters.

    Everything else (matrix, interpolation, fill mode, scaling to [0, 1]) is
    the production path.
    """

    def warp(images: np.ndarray, **values) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim == 2:
            images = images[None]
        fixed = params_for(len(images), **values)
        monkeypatch.setattr(augment, "sample_affine_params", lambda rng, n, cfg: fixed)
        return to_numpy(augment_batch(images, np.random.default_rng(0), AugmentConfig()))

    return warp


@pytest.fixture
def mnist(shared_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("EMNIST_CNN_CACHE", str(tmp_path / "cache"))
    return load_dataset("mnist", shared_dir / "data" / "mnist")


# --------------------------------------------------------------------------
# Identity, shapes, dtype, range


def test_zero_ranges_give_the_identity_on_real_digits(mnist):
    x = np.asarray(mnist.x_train[:256])
    out = to_numpy(augment_batch(x, np.random.default_rng(0), only()))
    assert out.shape == (256, 28, 28, 1)
    assert out.dtype == np.float32
    assert np.abs(out[..., 0] - x / 255.0).max() < 1e-6


def test_disabled_augmentation_returns_scaled_pixels_unchanged(mnist):
    x = np.asarray(mnist.x_test[:100])
    out = to_numpy(augment_batch(x, np.random.default_rng(0), AugmentConfig(enabled=False)))
    assert out.shape == (100, 28, 28, 1)
    assert out.dtype == np.float32
    assert np.abs(out[..., 0] - x / 255.0).max() < 1e-6


def test_default_augmentation_output_is_float32_in_unit_range_and_keeps_the_ink(mnist):
    x = np.asarray(mnist.x_train[:300])
    out = to_numpy(augment_batch(x, np.random.default_rng(3), AugmentConfig()))
    assert out.shape == (300, 28, 28, 1)
    assert out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    # Every image is warped, none is blanked or smeared over the frame: zoom and
    # shear change the ink area by at most 1 / (0.9 * 0.9 * cos 0.3) = 1.30x
    # and at least 1 / 1.21 = 0.83x (bilinear resampling blurs a little).
    ink_ratio = out[..., 0].sum(axis=(1, 2)) / (x / 255.0).sum(axis=(1, 2))
    assert ink_ratio.min() > 0.75 and ink_ratio.max() < 1.4
    assert (np.abs(out[..., 0] - x / 255.0).max(axis=(1, 2)) > 0.1).all()


def test_each_image_gets_its_own_warp():
    digit = blobs((9.5, 9.5), (17.5, 12.5), (12.5, 19.5))
    batch = np.repeat(digit[None], 32, axis=0)
    out = to_numpy(augment_batch(batch, np.random.default_rng(0), AugmentConfig()))
    flat = out.reshape(32, -1)
    diffs = np.abs(flat[:, None, :] - flat[None, :, :]).max(axis=2)
    off_diagonal = diffs[~np.eye(32, dtype=bool)]
    assert off_diagonal.min() > 1e-3


def test_transforms_are_affine_rows_for_affine_transform():
    p = sample_affine_params(np.random.default_rng(0), 7, AugmentConfig())
    t = to_numpy(build_affine_transforms(p))
    assert t.shape == (7, 8)
    assert t.dtype == np.float32
    assert (t[:, 6:] == 0).all()  # no projective part: one pure affine warp


# --------------------------------------------------------------------------
# Deterministic warps: where content lands


def test_shift_moves_content_by_whole_pixels(warp_with):
    img = blobs((10.0, 12.0))
    assert centroid(img) == pytest.approx((10.0, 12.0), abs=1e-9)
    assert centroid(warp_with(img, tx=2 / 28)) == pytest.approx((12.0, 12.0), abs=0.02)
    assert centroid(warp_with(img, ty=2 / 28)) == pytest.approx((10.0, 14.0), abs=0.02)
    assert centroid(warp_with(img, tx=-2 / 28, ty=-2 / 28)) == pytest.approx((8.0, 10.0), abs=0.02)


def test_quarter_turn_rotates_about_the_centre(warp_with):
    start = (20.0, 13.5)  # 6.5 px right of the centre
    params = params_for(1, theta=math.pi / 2)
    out = warp_with(blobs(start), theta=math.pi / 2)
    x, y = centroid(out)
    # Same distance from the centre, a quarter turn around it ...
    assert math.hypot(x - CENTRE, y - CENTRE) == pytest.approx(6.5, abs=0.05)
    turned = math.atan2(y - CENTRE, x - CENTRE) - math.atan2(start[1] - CENTRE, start[0] - CENTRE)
    turned = np.angle(np.exp(1j * turned))  # wrapped to (-pi, pi]
    assert abs(turned) == pytest.approx(math.pi / 2, abs=math.radians(0.5))
    # ... exactly where the documented output->input matrix says.
    assert (x, y) == pytest.approx(inverse_map(params, *start), abs=0.05)


def test_zoom_above_one_shrinks_content_towards_the_centre(warp_with):
    # Keras' matrix is the inverse map: zoom 2 samples twice the area, so the
    # content shrinks and its offset from the centre halves.
    start = (22.0, 13.5)  # 8.5 px right of the centre
    x, y = centroid(warp_with(blobs(start), zx=2.0))
    assert x - CENTRE == pytest.approx(8.5 / 2, abs=0.1)
    assert y == pytest.approx(CENTRE, abs=0.02)
    # zy acts on the other axis only.
    x, y = centroid(warp_with(blobs((CENTRE, 5.5)), zy=2.0))
    assert x == pytest.approx(CENTRE, abs=0.02)
    assert y - CENTRE == pytest.approx(-8.0 / 2, abs=0.1)


def test_shift_is_in_output_pixels_even_with_rotation_and_zoom(warp_with):
    # Documented choice: shifts apply after the warp, so tx moves the content by
    # tx * 28 px whatever the rotation and zoom (a centred blob stays a blob).
    out = warp_with(blobs((CENTRE, CENTRE)), theta=math.pi / 2, zx=2.0, zy=2.0, tx=2 / 28, ty=-1 / 28)
    assert centroid(out) == pytest.approx((CENTRE + 2, CENTRE - 1), abs=0.05)


@pytest.mark.parametrize("shear", [0.3, -0.3, 0.15])
@pytest.mark.parametrize("start", [(13.5, 5.5), (21.5, 13.5), (17.5, 9.5)])
def test_shear_lands_content_where_the_matrix_says(warp_with, shear, start):
    params = params_for(1, shear=shear)
    expected = inverse_map(params, *start)
    got = centroid(warp_with(blobs(start), shear=shear))
    assert math.dist(got, expected) < 0.5, (got, expected)


# --------------------------------------------------------------------------
# Random draws: ranges, units, independence


def test_sampled_parameters_stay_in_range_and_fill_it():
    n = 100_000
    p = sample_affine_params(np.random.default_rng(12345), n, AugmentConfig())
    assert set(p) == {"theta", "tx", "ty", "shear", "zx", "zy"}
    bounds = {
        "theta": (-MAX_ROT, MAX_ROT),  # radians, from +-12 degrees
        "tx": (-0.1, 0.1),
        "ty": (-0.1, 0.1),
        "shear": (-MAX_SHEAR, MAX_SHEAR),  # radians
        "zx": (0.9, 1.1),
        "zy": (0.9, 1.1),
    }
    for name, (lo, hi) in bounds.items():
        v = p[name]
        assert v.shape == (n,), name
        assert v.min() >= lo and v.max() <= hi, name
        # Uniform over the whole range: reaches both ends, centred, flat spread.
        width = hi - lo
        assert v.min() < lo + 0.01 * width and v.max() > hi - 0.01 * width, name
        assert abs(v.mean() - (lo + hi) / 2) < 0.01 * width, name
        assert v.std() == pytest.approx(width / math.sqrt(12), rel=0.02), name
    assert np.abs(p["theta"]).max() > 0.95 * MAX_ROT


def test_parameters_are_drawn_independently():
    p = sample_affine_params(np.random.default_rng(7), 100_000, AugmentConfig())
    names = sorted(p)
    corr = np.corrcoef(np.stack([p[k] for k in names]))
    off_diagonal = corr[~np.eye(len(names), dtype=bool)]
    assert np.abs(off_diagonal).max() < 0.02  # sampling noise is ~0.003
    assert np.abs(np.corrcoef(p["zx"], p["zy"])[0, 1]) < 0.02  # separate x and y zoom


def test_same_seed_same_output_different_seed_different_output(mnist):
    x = np.asarray(mnist.x_train[:64])
    a = to_numpy(augment_batch(x, np.random.default_rng(42), AugmentConfig()))
    b = to_numpy(augment_batch(x, np.random.default_rng(42), AugmentConfig()))
    c = to_numpy(augment_batch(x, np.random.default_rng(43), AugmentConfig()))
    np.testing.assert_array_equal(a, b)
    per_image = np.abs(a - c).max(axis=(1, 2, 3))
    assert (per_image > 0.05).mean() > 0.9


# --------------------------------------------------------------------------
# Each range alone moves pixels by the expected amount


def test_shift_alone_moves_real_digits_by_at_most_ten_percent(mnist):
    x = np.asarray(mnist.x_train[:500])
    out = to_numpy(augment_batch(x, np.random.default_rng(1), only(shift_frac=0.1)))
    (x0, y0), (x1, y1) = centroids(x), centroids(out)
    dx, dy = x1 - x0, y1 - y0
    tol = 0.2  # a few digits touch the border, where 'nearest' fill replicates ink
    assert np.abs(dx).max() <= MAX_SHIFT_PX + tol
    assert np.abs(dy).max() <= MAX_SHIFT_PX + tol
    # The range is used: shifts of over 2 px both ways on both axes, with the
    # spread of a uniform draw on +-2.8 px (std 1.62 px) ...
    for d in (dx, dy):
        assert d.max() > 2.0 and d.min() < -2.0
        assert 1.3 < d.std() < 1.9
    # ... and x and y shifts are drawn separately.
    assert abs(np.corrcoef(dx, dy)[0, 1]) < 0.2


def test_rotation_alone_turns_real_ones_by_at_most_twelve_degrees(mnist):
    # A handwritten "1" is a long stroke: its principal axis turns with the image.
    ones = np.asarray(mnist.x_train)[np.asarray(mnist.y_train) == 1][:400]
    out = to_numpy(augment_batch(ones, np.random.default_rng(2), only(rotation_deg=12)))
    turned = np.degrees(wrap_half_turn(principal_axis_angle(out) - principal_axis_angle(ones)))
    assert np.abs(turned).max() <= 12.0 + 0.6  # resampling noise on real strokes
    assert turned.max() > 10.0 and turned.min() < -10.0
    # A single blob's centroid turns about the centre and keeps its distance.
    start = (22.5, CENTRE)  # 9 px right of the centre
    out = to_numpy(
        augment_batch(np.repeat(blobs(start)[None], 400, 0), np.random.default_rng(3), only(rotation_deg=12))
    )
    x, y = centroids(out)
    assert np.abs(np.hypot(x - CENTRE, y - CENTRE) - 9.0).max() < 0.05
    about_centre = np.degrees(np.arctan2(y - CENTRE, x - CENTRE))
    assert np.abs(about_centre).max() <= 12.0 + 0.1
    assert about_centre.max() > 11.0 and about_centre.min() < -11.0


def test_zoom_alone_scales_x_and_y_separately_by_ten_percent():
    # Four blobs 8 px left/right/above/below the centre: their horizontal and
    # vertical spans scale by 1/zx and 1/zy.
    arms = [(CENTRE - 8, CENTRE), (CENTRE + 8, CENTRE), (CENTRE, CENTRE - 8), (CENTRE, CENTRE + 8)]
    batch = np.repeat(blobs(*arms)[None], 400, axis=0)
    out = to_numpy(augment_batch(batch, np.random.default_rng(4), only(zoom_min=0.9, zoom_max=1.1)))
    c = blob_centroids(out, arms)
    sx = (c[:, 1, 0] - c[:, 0, 0]) / 16.0
    sy = (c[:, 3, 1] - c[:, 2, 1]) / 16.0
    lo, hi = 1 / 1.1, 1 / 0.9  # 0.909 .. 1.111
    for s in (sx, sy):
        assert s.min() >= lo - 0.01 and s.max() <= hi + 0.01
        assert s.min() < lo + 0.02 and s.max() > hi - 0.02
    # Separate draws: a single shared zoom would make this correlation 1.
    assert abs(np.corrcoef(sx, sy)[0, 1]) < 0.2


def test_shear_is_in_radians_up_to_seventeen_degrees():
    # An "L" of three blobs: the corner at the centre, one arm up, one arm
    # right. A shear by angle s turns one arm against the other by exactly s,
    # whichever axis it acts on, so the corner angle moves away from 90 degrees
    # by up to 0.3 rad = 17.2 degrees. Read as degrees, 0.3 would give 0.3.
    corner, up, right = (CENTRE, CENTRE), (CENTRE, CENTRE - 9), (CENTRE + 9, CENTRE)
    batch = np.repeat(blobs(corner, up, right)[None], 400, axis=0)
    out = to_numpy(augment_batch(batch, np.random.default_rng(5), only(shear_rad=0.3)))
    c = blob_centroids(out, [corner, up, right])
    a = c[:, 1] - c[:, 0]
    b = c[:, 2] - c[:, 0]
    cos_angle = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    bend = np.degrees(np.abs(np.arccos(np.clip(cos_angle, -1, 1)) - math.pi / 2))
    assert bend.max() <= math.degrees(MAX_SHEAR) + 0.3
    assert bend.max() > 15.0  # far beyond the 0.3 degrees a degree reading would allow
    assert np.median(bend) > 5.0  # uniform on [0, 17.2]: median 8.6


def test_shear_alone_slants_a_long_bar_by_several_pixels():
    # A 20 px bar, vertical in half of the batch and horizontal in the other
    # half. A shear by s along either axis slants one of the two: the offset
    # between its two ends grows by sin(s) per pixel of length (up to 4.1 px
    # over the 14 px measured here), where 0.3 degrees would give 0.07 px.
    vertical = np.zeros((SIDE, SIDE), np.uint8)
    vertical[4:24, 13:15] = 255
    horizontal = np.ascontiguousarray(vertical.T)
    batch = np.concatenate([np.repeat(vertical[None], 200, 0), np.repeat(horizontal[None], 200, 0)])
    out = to_numpy(augment_batch(batch, np.random.default_rng(6), only(shear_rad=0.3)))[..., 0]

    def across(strip, coord):  # centroid across the bar within a strip of it
        return (strip * coord).sum(axis=(1, 2)) / strip.sum(axis=(1, 2))

    v, h = out[:200], out[200:]
    v_offset = across(v[:, 5:9, :], XX[None, 5:9]) - across(v[:, 19:23, :], XX[None, 19:23])
    h_offset = across(h[:, :, 5:9], YY[None, :, 5:9]) - across(h[:, :, 19:23], YY[None, :, 19:23])
    slant = np.maximum(np.abs(v_offset), np.abs(h_offset))
    assert slant.max() <= 14 * math.tan(MAX_SHEAR) + 0.3
    assert slant.max() > 3.5
    assert np.median(slant) > 1.0


def test_shear_axis_matches_keras_2_reference(warp_with):
    # Reference: input_row = row - sin(s) * col, input_col = cos(s) * col (about
    # the centre). Content above the centre stays put; content right of the
    # centre moves vertically by 8 tan(s) and outwards to 8 / cos(s).
    s = 0.3
    above = centroid(warp_with(blobs((CENTRE, CENTRE - 8)), shear=s))
    right = centroid(warp_with(blobs((CENTRE + 8, CENTRE)), shear=s))
    assert above == pytest.approx((CENTRE, CENTRE - 8), abs=0.3)
    assert right[0] == pytest.approx(CENTRE + 8 / math.cos(s), abs=0.3)
    assert abs(right[1] - CENTRE) == pytest.approx(8 * math.tan(s), abs=0.3)


# --------------------------------------------------------------------------
# Fill mode


@pytest.mark.parametrize("tx", [3 / 28, -3 / 28])
def test_nearest_fill_extends_a_bright_edge_instead_of_zero_filling(warp_with, tx):
    img = np.zeros((SIDE, SIDE), np.uint8)
    img[:, 0] = 255  # bright left edge column
    img[:, -1] = 200  # bright right edge column
    img[10:18, 10:18] = 128
    out = warp_with(img, tx=tx)[0, :, :, 0]
    if tx > 0:  # content moves right: columns 0..2 are new, filled from column 0
        np.testing.assert_allclose(out[:, 0:4], 1.0, atol=1e-6)
        np.testing.assert_allclose(out[:, -1], 0.0, atol=1e-6)  # old column 24
    else:  # content moves left: the last three columns are new, filled from column 27
        np.testing.assert_allclose(out[:, -4:], 200 / 255, atol=1e-6)
        np.testing.assert_allclose(out[:, 0], 0.0, atol=1e-6)  # old column 3
    # The interior square moved by exactly 3 columns.
    square = np.isclose(out, 128 / 255, atol=1e-6)
    assert square.sum() == 64
    assert centroid(square)[0] == pytest.approx(13.5 + 28 * tx, abs=1e-6)


def test_nearest_fill_keeps_a_uniform_image_uniform_under_any_warp():
    # With 'nearest' fill nothing outside the frame is invented: a flat grey
    # image stays flat grey whatever rotation, shift, shear and zoom are drawn
    # ('constant' fill would bring in black corners).
    grey = np.full((64, SIDE, SIDE), 180, np.uint8)
    out = to_numpy(augment_batch(grey, np.random.default_rng(8), AugmentConfig()))
    np.testing.assert_allclose(out, 180 / 255, atol=1e-5)


# --------------------------------------------------------------------------
# The warp inside the compiled training step


@pytest.mark.parametrize("interpolation", ["bilinear", "nearest"])
@pytest.mark.parametrize("fill_mode", ["nearest", "constant"])
def test_xla_warp_by_gathering_equals_the_image_kernel(mnist, interpolation, fill_mode):
    """XLA has no kernel for TensorFlow's image transform: the gathering warp must give the same pixels."""
    cfg = AugmentConfig(interpolation=interpolation, fill_mode=fill_mode, rotation_deg=40, shift_frac=0.3)
    x = mnist.x_train[:256].astype(np.float32)[..., None] / 255
    params = sample_affine_params(np.random.default_rng(9), 256, cfg)
    kernel = to_numpy(augment.warp_images(x, params, cfg))
    gathered = to_numpy(augment.warp_images(x, params, cfg, xla=True))
    np.testing.assert_allclose(gathered, kernel, atol=1e-6)
    assert np.abs(kernel - x).mean() > 0.05  # the warps are large, with plenty of filled border


def test_in_graph_draws_cover_the_reference_ranges():
    u = keras.random.uniform((6, 20_000), seed=3)
    p = {k: to_numpy(v) for k, v in augment.scale_affine_params(u, AugmentConfig()).items()}
    for name, bound in (("theta", MAX_ROT), ("tx", 0.1), ("ty", 0.1), ("shear", MAX_SHEAR)):
        assert np.abs(p[name]).max() <= bound * (1 + 1e-6) and np.abs(p[name]).max() > 0.99 * bound, name
        assert abs(p[name].mean()) < 0.02 * bound, name
    for name in ("zx", "zy"):
        assert 0.9 <= p[name].min() < 0.901 and 1.099 < p[name].max() <= 1.1, name
    assert abs(np.corrcoef(p["zx"], p["zy"])[0, 1]) < 0.03  # drawn separately for x and y


def test_training_warp_depends_only_on_its_key_and_step(mnist):
    """Same key, same warps (a resumed or fused member redraws them exactly); another key, other warps;
    each step its own; inference mode never warps."""
    from emnist_cnn.core.trainer import AugmentImages

    x = mnist.x_train[:64].astype(np.float32)[..., None] / 255
    layer = AugmentImages(AugmentConfig(), batch_size=64)

    def two_steps(key):
        layer.set_key(key)
        return [to_numpy(layer(x, training=True)) for _ in range(2)]

    a, b, c = two_steps(5), two_steps(5), two_steps(6)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert np.abs(a[0] - a[1]).max() > 0.5 and np.abs(a[0] - c[0]).max() > 0.5
    np.testing.assert_array_equal(to_numpy(layer(x, training=False)), x)
    # A smaller last batch takes the first draws of a full one.
    layer.set_key(5)
    np.testing.assert_array_equal(to_numpy(layer(x[:10], training=True)), a[0][:10])
