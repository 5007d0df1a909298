"""The reference CNN in Keras 3 (channels_last) and BatchNormalization recalibration."""

from __future__ import annotations

import logging

import keras
import numpy as np

from .config import ModelConfig

log = logging.getLogger(__name__)

# EMNIST Digits training-set pixel statistics in [0, 1], as hard-coded by the reference.
EMNIST_DIGITS_MEAN = 0.17325132
EMNIST_DIGITS_STD = 0.3316614


def build_model(
    num_classes: int = 10,
    dropout: float = 0.2,
    mean: float = EMNIST_DIGITS_MEAN,
    std: float = EMNIST_DIGITS_STD,
    cfg: ModelConfig | None = None,
    name: str = "emnist_cnn",
) -> keras.Model:
    """The reference CNN: takes upright [0, 1] pixels (N, 28, 28, 1), returns softmax.

    Normalization with the training split's mean and std is the first layer, so
    a saved model needs no preprocessing beyond scaling pixels to [0, 1].
    601,578 parameters for 10 classes.
    """
    cfg = cfg or ModelConfig()

    def bn():
        return keras.layers.BatchNormalization(momentum=cfg.bn_momentum, epsilon=cfg.bn_epsilon)

    def act():
        return keras.layers.LeakyReLU(negative_slope=cfg.leaky_slope)

    inputs = keras.Input((28, 28, 1), name="pixels")
    x = keras.layers.Normalization(mean=float(mean), variance=float(std) ** 2, name="normalize")(inputs)
    x = keras.layers.Conv2D(32, 3)(x)
    x = act()(x)
    x = bn()(x)
    x = keras.layers.Conv2D(32, 3)(x)
    x = act()(x)
    x = keras.layers.MaxPooling2D(2)(x)
    x = bn()(x)
    x = keras.layers.Conv2D(64, 3)(x)
    x = act()(x)
    x = bn()(x)
    x = keras.layers.Conv2D(64, 3)(x)
    x = act()(x)
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Flatten()(x)
    x = bn()(x)
    x = keras.layers.Dense(512)(x)
    x = act()(x)
    x = bn()(x)
    x = keras.layers.Dropout(dropout)(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=name)


def compile_model(model: keras.Model, lr: float) -> keras.Model:
    """Adam with sparse categorical cross-entropy, as the reference (which one-hot encoded)."""
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=lr),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def recalibrate_batchnorm(model: keras.Model, images: np.ndarray, batch_size: int = 1000) -> None:
    """Set every BatchNormalization layer's moving statistics to their exact values on `images`.

    With few optimizer steps the moving averages (momentum 0.99) lag far behind
    the weights and inference-mode predictions are poor; the population
    statistics of the current weights fix that. Layers are done in order, each
    with the earlier ones already recalibrated, because inference mode feeds
    each layer its predecessors' normalized outputs. `images` is uint8
    (N, 28, 28) or float [0, 1] (N, 28, 28, 1).
    """
    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    if not bns or len(images) == 0:
        return
    for k, layer in enumerate(bns):
        # Truncated at this layer, so the pass skips everything after it.
        probe = keras.Model(model.inputs[0], layer.input)
        total, total_sq, count = 0.0, 0.0, 0
        for start in range(0, len(images), batch_size):
            x = _to_float(images[start : start + batch_size])
            feats = probe(x, training=False)
            f = keras.ops.convert_to_numpy(feats).astype(np.float64)
            f = f.reshape(-1, f.shape[-1])
            total = total + f.sum(axis=0)
            total_sq = total_sq + (f * f).sum(axis=0)
            count += f.shape[0]
        mean = total / count
        var = np.maximum(total_sq / count - mean * mean, 0.0)
        layer.moving_mean.assign(mean.astype(np.float32))
        layer.moving_variance.assign(var.astype(np.float32))


def predict_probabilities(model: keras.Model, images: np.ndarray, batch_size: int = 2000) -> np.ndarray:
    """Inference-mode softmax for uint8 (N, 28, 28) images, in batches to bound memory."""
    out = []
    for start in range(0, len(images), batch_size):
        out.append(np.asarray(model.predict_on_batch(_to_float(images[start : start + batch_size]))))
    if not out:
        return np.zeros((0, model.output_shape[-1]), np.float32)
    return np.concatenate(out).astype(np.float32)


def _to_float(x: np.ndarray) -> np.ndarray:
    if x.dtype == np.uint8:
        return x.astype(np.float32)[..., None] * np.float32(1.0 / 255.0)
    return np.asarray(x, np.float32)
