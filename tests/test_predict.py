"""`predict` on real image files: any size, either polarity, EMNIST's preprocessing, clear per-file errors."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import emnist_cnn  # noqa: F401  (selects the backend before keras is imported)
from conftest import run_cli
from deps import optional_module
import keras
from emnist_cnn.config import TrainConfig
from emnist_cnn.io.datasets import load_dataset
from emnist_cnn.io.model_files import export_model, load_predictor
from emnist_cnn.core.model import build_model
from emnist_cnn.engine.predict import (
    ImageError,
    load_image_for_emnist,
    predict_files,
    read_grayscale,
)


def _stroke_image(h=300, w=200, dark_on_light=True) -> np.ndarray:
    """A thick '7'-like shape (horizontal bar + slanted stroke) off-center on a large canvas."""
    ink = np.zeros((h, w))
    ink[60:75, 40:140] = 1.0
    for r in range(75, 240):
        c = int(140 - (r - 75) * 0.4)
        ink[r, c - 8:c + 8] = 1.0
    return (1.0 - 0.8 * ink) if dark_on_light else 0.1 + 0.8 * ink


def _save(arr: np.ndarray, path: Path, mode="L") -> Path:
    Image.fromarray(np.round(np.clip(arr, 0, 1) * 255).astype(np.uint8)).convert(mode).save(path)
    return path


# ----------------------------------------------------------------------------- preprocessing (no shared data)


def test_emnist_preprocessing_crops_centers_and_keeps_the_aspect_ratio(tmp_path):
    img = load_image_for_emnist(_save(_stroke_image(), tmp_path / "seven.png"))
    assert img.dtype == np.uint8 and img.shape == (28, 28) and img.max() == 255
    rows = np.flatnonzero((img > 64).any(axis=1))
    cols = np.flatnonzero((img > 64).any(axis=0))
    height, width = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    # EMNIST: the character fills the frame up to a thin border, centered, aspect ratio kept (180 x 100 ink).
    assert 23 <= height <= 27
    assert abs(width / height - 100 / 180) < 0.12
    assert abs((rows[0] + rows[-1]) / 2 - 13.5) <= 1 and abs((cols[0] + cols[-1]) / 2 - 13.5) <= 1
    # The background is black and the ink bright: the polarity the models were trained on.
    assert img[0, 0] == 0 and img[:, 0].max() < 32


def test_both_polarities_and_any_size_give_the_same_image(tmp_path):
    light = load_image_for_emnist(_save(_stroke_image(dark_on_light=True), tmp_path / "a.png"))
    dark = load_image_for_emnist(_save(_stroke_image(dark_on_light=False), tmp_path / "b.png"))
    assert np.abs(light.astype(int) - dark.astype(int)).max() <= 2
    small = _stroke_image(dark_on_light=True)[::3, ::3]  # 100 x 67 pixels
    smaller = load_image_for_emnist(_save(small, tmp_path / "c.jpg", mode="RGB"))
    assert np.abs(light.astype(float) - smaller).mean() < 12


def test_mnist_preprocessing_fits_20_pixels_and_centers_the_mass(tmp_path):
    from scipy.ndimage import center_of_mass

    img = load_image_for_emnist(_save(_stroke_image(), tmp_path / "seven.png"), style="mnist")
    rows = np.flatnonzero((img > 32).any(axis=1))
    assert 19 <= rows[-1] - rows[0] + 1 <= 21
    cy, cx = center_of_mass(img.astype(float))
    assert abs(cy - 14) <= 0.75 and abs(cx - 14) <= 0.75


def test_transparent_png_with_ink_in_the_alpha_channel(tmp_path):
    ink = _stroke_image(dark_on_light=False)
    rgba = np.zeros(ink.shape + (4,), np.uint8)
    rgba[..., :3] = 255  # white ink ...
    rgba[..., 3] = np.round(np.clip(ink - 0.1, 0, 1) / 0.8 * 255).astype(np.uint8)  # ... drawn only by alpha
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    img = load_image_for_emnist(tmp_path / "alpha.png")
    reference = load_image_for_emnist(_save(ink, tmp_path / "plain.png"))
    assert np.abs(img.astype(int) - reference.astype(int)).max() <= 3


def test_unreadable_and_empty_images_are_reported_per_file(tmp_path, capsys):
    model = build_model()
    export_model(model, tmp_path / "model", metadata={"classes": list("0123456789")}, formats=["keras"])
    good = _save(_stroke_image(), tmp_path / "good.png")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:200])
    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image\n")
    blank = _save(np.full((50, 40), 0.9), tmp_path / "blank.png")
    missing = tmp_path / "missing.png"
    files = [truncated, good, text, blank, missing]
    rc = run_cli(["predict", str(tmp_path / "model"), *map(str, files), "--json"])
    assert rc == 1  # some files failed, and the others were still predicted
    results = json.loads(capsys.readouterr().out)
    assert [r["file"] for r in results] == [str(f) for f in files]
    by = {Path(r["file"]).name: r for r in results}
    assert set(by["good.png"]) >= {"class", "probability"} and 0 < by["good.png"]["probability"] <= 1
    assert "truncated" in by["truncated.png"]["error"]
    assert "cannot read" in by["notes.jpg"]["error"]
    assert "no character" in by["blank.png"]["error"]
    assert "no such" in by["missing.png"]["error"]
    for r in results:
        if "error" in r:
            assert r["file"] in r["error"] and "\n" not in r["error"]
    # Text mode: results on stdout, one error line per bad file on stderr.
    assert run_cli(["predict", str(tmp_path / "model" / "model.keras"), str(good), str(blank)]) == 1
    captured = capsys.readouterr()
    assert captured.out.startswith(f"{good}: ") and "%" in captured.out
    assert captured.err.count("\n") == 1 and "blank.png" in captured.err
    with pytest.raises(ImageError):
        read_grayscale(text)


def test_every_model_format_predicts_the_same(tmp_path):
    keras.utils.set_random_seed(3)
    model = build_model(mean=0.13, std=0.31)
    export_model(model, tmp_path / "export", metadata={"classes": list("0123456789"),
                                                        "input": {"image_preprocessing": "emnist"}})
    # A run directory's checkpoint: the architecture comes from RUN/config.json.
    run = tmp_path / "run"
    weights = run / "dropout_0.2" / "weights" / "004epochs_weights_model_0.weights.h5"
    weights.parent.mkdir(parents=True)
    model.save_weights(weights)
    (run / "config.json").write_text(json.dumps({
        "config": TrainConfig(dataset="emnist-digits", dropouts=(0.2,), models=1).to_dict(),
        "data": {"classes": "0123456789", "mean": 0.13, "std": 0.31, "name": "emnist-digits"}}))
    images = [_save(_stroke_image(), tmp_path / "seven.png"), _save(_stroke_image()[::-1], tmp_path / "flip.png")]
    want = model.predict(np.stack([load_image_for_emnist(p) for p in images])[..., None] / np.float32(255),
                         verbose=0)
    paths = [tmp_path / "export", tmp_path / "export" / "model.keras", tmp_path / "export" / "model.json",
             tmp_path / "export" / "model.weights.h5", tmp_path / "export" / "saved_model", weights]
    # Without onnxruntime the ONNX file is left out with a warning here, and fails the test in CI.
    if optional_module("onnxruntime", "predicts with the exported ONNX model") is not None:
        paths.append(tmp_path / "export" / "model.onnx")
    for path in paths:
        predictor = load_predictor(path)
        results = predict_files(path, images, predictor=predictor, top=3)
        for r, p in zip(results, want):
            assert r["class"] == str(int(np.argmax(p))), path
            assert abs(r["probability"] - float(p.max())) <= 1e-5, path
            assert len(r["top"]) == 3 and r["top"][0][0] == r["class"]


# ----------------------------------------------------------------------------- real digits (shared data)


VARIANTS = {
    # name: (polarity, scale of a 40 x 28 page holding the digit off-center, or None for the bare 28x28 digit)
    "light_on_dark_28.png": ("light", None),
    "dark_on_light_28.png": ("dark", None),
    "dark_on_light_160x112.png": ("dark", 4.0),
    "light_on_dark_212x148.jpg": ("light", 5.3),
    "dark_on_light_rgb_64x45.png": ("dark", 1.6),
}


def test_predict_real_digits_rendered_as_image_files(shared_dir, tmp_path, capsys):
    """MNIST test digits as PNG/JPEG files, both polarities, other sizes: the reference model reads them."""
    mnist = load_dataset("mnist", shared_dir / "data" / "mnist", cache=False)
    n = 40
    files, labels = [], []
    for k in range(n):
        digit = mnist.x_test[k]
        for name, (polarity, scale) in VARIANTS.items():
            pixels = digit if polarity == "light" else 255 - digit
            img = Image.fromarray(pixels)
            if scale is not None:
                page = np.full((28, 40), 0 if polarity == "light" else 255, np.uint8)
                page[:, 4:32] = pixels
                img = Image.fromarray(page).resize((round(40 * scale), round(28 * scale)), Image.Resampling.BICUBIC)
            if "rgb" in name:
                img = img.convert("RGB")
            path = tmp_path / f"{k:03d}_{name}"
            img.save(path, format="JPEG" if name.endswith(".jpg") else "PNG")
            files.append(path)
            labels.append(str(int(mnist.y_test[k])))
    model = shared_dir / "reference" / "dropout_0.2" / "weights" / "258epochs_weights_model_7.pkl"
    assert run_cli(["predict", str(model), *map(str, files), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert len(results) == len(files)
    for name in VARIANTS:
        got = [(r["class"], want) for r, want in zip(results, labels) if r["file"].endswith(name)]
        correct = sum(c == w for c, w in got)
        assert correct >= 0.95 * n, (name, correct)
    # Same digit, opposite polarity: the same class and nearly the same probability.
    for k in range(n):
        a = results[k * len(VARIANTS)]
        b = results[k * len(VARIANTS) + 1]
        assert a["class"] == b["class"] and abs(a["probability"] - b["probability"]) < 1e-3
