"""The reference CNN in Keras 3 (channels_last), its ensembles as single models, BatchNormalization recalibration.

Three ways to run several members as one Keras model, one per purpose:
`core.trainer.build_device_trainer` (training: one compiled step trains every member),
`build_member_predictor` (inference: one output per member) and
`build_averaged_ensemble` (deployment: one output, the mean softmax).
"""

from __future__ import annotations

import functools
import logging
import weakref

import keras
import numpy as np

from ..config import EMNIST_DIGITS_MEAN, EMNIST_DIGITS_STD, IMAGE_SIDE, ModelConfig

__all__ = ["EMNIST_DIGITS_MEAN", "EMNIST_DIGITS_STD", "build_model", "compile_model", "build_optimizer",
           "copy_optimizer_state", "accelerator_available", "build_member_predictor", "build_averaged_ensemble",
           "predict_members", "predict_probabilities", "recalibrate_batchnorm", "read_variable", "read_variables",
           "average_per_channel", "use_jit_compile", "jit_compile_enabled", "predict_batch", "upload_images"]

log = logging.getLogger(__name__)


def build_model(
    num_classes: int = 10,
    dropout: float = 0.2,
    mean: float = EMNIST_DIGITS_MEAN,
    std: float = EMNIST_DIGITS_STD,
    cfg: ModelConfig | None = None,
    name: str = "emnist_cnn",
    seed: int | None = None,
) -> keras.Model:
    """The reference CNN: takes upright [0, 1] pixels (N, 28, 28, 1), returns softmax.

    Normalization with the training split's mean and std is the first layer, so
    a saved model needs no preprocessing beyond scaling pixels to [0, 1].
    601,578 parameters for 10 classes. `seed` seeds the dropout masks.
    """
    cfg = cfg or ModelConfig()
    # Variables stay float32 under mixed_bfloat16, so checkpoints load into either precision.
    policy = cfg.precision

    def bn():
        return keras.layers.BatchNormalization(momentum=cfg.bn_momentum, epsilon=cfg.bn_epsilon, dtype=policy)

    def act():
        return keras.layers.LeakyReLU(negative_slope=cfg.leaky_slope, dtype=policy)

    def conv(filters):
        return keras.layers.Conv2D(filters, 3, dtype=policy)

    def pool():
        return keras.layers.MaxPooling2D(2, dtype=policy)

    inputs = keras.Input((IMAGE_SIDE, IMAGE_SIDE, 1), name="pixels")
    x = keras.layers.Normalization(mean=float(mean), variance=float(std) ** 2, name="normalize",
                                   dtype=policy)(inputs)
    x = conv(32)(x)
    x = act()(x)
    x = bn()(x)
    x = conv(32)(x)
    x = act()(x)
    x = pool()(x)
    x = bn()(x)
    x = conv(64)(x)
    x = act()(x)
    x = bn()(x)
    x = conv(64)(x)
    x = act()(x)
    x = pool()(x)
    x = keras.layers.Flatten(dtype=policy)(x)
    x = bn()(x)
    x = keras.layers.Dense(512, dtype=policy)(x)
    x = act()(x)
    x = bn()(x)
    # An unseeded Dropout on torch draws from torch's global generator, which no state file
    # restores; a seeded one keeps its stream in a variable that is saved and resumed. 31 bits: some
    # backends keep that variable as int32.
    x = keras.layers.Dropout(dropout, seed=None if seed is None else seed & 0x7FFFFFFF, dtype=policy)(x)
    # The softmax and the loss stay in float32 whatever the compute precision.
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="probabilities", dtype="float32")(x)
    return keras.Model(inputs, outputs, name=name)


# The process's one XLA switch (see `use_jit_compile`); None until a run decides it.
_JIT_COMPILE: dict[str, bool | None] = {"on": None}


def use_jit_compile(on: bool | None) -> None:
    """Set whether every model this package compiles or predicts with uses XLA (None: `jit_compile_enabled`'s
    default). Set once a run has decided (`training.device.describe_runtime`); models already run keep theirs."""
    _JIT_COMPILE["on"] = on


def jit_compile_enabled() -> bool:
    """The XLA switch: as `use_jit_compile` set it, else on where the backend sees a GPU that is not hidden.

    Keras' own "auto" looks at the physical GPUs, so with `--device cpu` or
    `--jit-compile off` on a GPU machine it would still compile inference with
    XLA. JAX runs nothing uncompiled (Keras' jit_compile=False there is eager).
    """
    if keras.backend.backend() == "jax":
        return True
    on = _JIT_COMPILE["on"]
    if on is None:
        return keras.backend.backend() == "tensorflow" and accelerator_available()
    return on


def _ready(model: keras.Model) -> keras.Model:
    """`model` with its inference function, when not made yet, to be compiled as the XLA switch says."""
    if getattr(model, "predict_function", None) is None:
        model.jit_compile = jit_compile_enabled()
    return model


def predict_batch(model: keras.Model, x):
    """`model.predict_on_batch(x)`, compiled as the process's XLA switch says (see `jit_compile_enabled`)."""
    return _ready(model).predict_on_batch(x)


def compile_model(model: keras.Model, lr: float, label_smoothing: float = 0.0,
                  loss_scaling: bool = False) -> keras.Model:
    """Adam with categorical cross-entropy, as the reference: on integer labels, or with
    `label_smoothing` on one-hot targets (Keras' sparse loss cannot smooth). `loss_scaling`:
    Adam inside Keras' dynamic `LossScaleOptimizer`, for float16 compute."""
    model.compile(
        optimizer=build_optimizer(lr, loss_scaling),
        loss=_loss(label_smoothing),
        metrics=["accuracy"],
        jit_compile=jit_compile_enabled(),
    )
    return model


def build_optimizer(lr, loss_scaling: bool = False) -> keras.optimizers.Optimizer:
    """Adam at `lr` (a float or a schedule); with `loss_scaling`, wrapped in a dynamic LossScaleOptimizer."""
    adam = keras.optimizers.Adam(learning_rate=lr)
    return keras.optimizers.LossScaleOptimizer(adam) if loss_scaling else adam


def _loss(label_smoothing: float):
    if label_smoothing:
        return keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing)
    return "sparse_categorical_crossentropy"


def copy_optimizer_state(src: keras.optimizers.Optimizer, dst: keras.optimizers.Optimizer, variables) -> None:
    """Copy Adam's step count and the moments of `variables` from `src` to `dst` (both built), with the
    loss scale and its step counter when both are LossScaleOptimizers.

    Lets a compiled training step's optimizer take over members' optimizers and
    hand them back, so a member's saved state is the same whichever way it was trained.
    """
    scaled = [isinstance(o, keras.optimizers.LossScaleOptimizer) for o in (src, dst)]
    if scaled[0] != scaled[1]:
        raise TypeError("copy_optimizer_state: one optimizer scales the loss, the other does not")
    if scaled[0]:
        dst.dynamic_scale.assign(src.dynamic_scale)
        dst.step_counter.assign(src.step_counter)
        src, dst = src.inner_optimizer, dst.inner_optimizer
    for opt in (src, dst):
        if not isinstance(opt, keras.optimizers.Adam):
            raise TypeError(f"copy_optimizer_state supports Adam, got {type(opt).__name__}")
    dst.iterations.assign(src.iterations)
    for v in variables:
        i, j = src._get_variable_index(v), dst._get_variable_index(v)
        dst._momentums[j].assign(src._momentums[i])
        dst._velocities[j].assign(src._velocities[i])


def accelerator_available() -> bool:
    """True when the Keras backend sees a GPU (or TPU)."""
    backend = keras.backend.backend()
    try:
        if backend == "tensorflow":
            import tensorflow as tf

            return bool(tf.config.get_visible_devices("GPU"))  # --device cpu hides them
        if backend == "jax":
            import jax

            return jax.default_backend() != "cpu"
        if backend == "torch":
            import torch

            return bool(torch.cuda.is_available())
    except Exception:  # a broken accelerator stack means: train on the CPU
        log.debug("no accelerator check for backend %s", backend, exc_info=True)
    return False


def build_member_predictor(models: list[keras.Model]) -> keras.Model:
    """One input, every member's softmax stacked as one output (members, batch, classes): every member
    predicts a batch in a single call, read back in one piece."""
    inputs = keras.Input(models[0].inputs[0].shape[1:], name="pixels")
    outputs = [keras.Model(m.inputs[0], m.outputs[0], name=f"member_{i}")(inputs) for i, m in enumerate(models)]
    return keras.Model(inputs, keras.ops.stack(outputs), name="stacked_ensemble")


def predict_members(models, images, batch_size: int = 2000, count: int | None = None) -> np.ndarray:
    """Inference-mode softmax of every member, (members, N, classes), in one pass over `images`.

    `models` is a list of models, one model, or a model from `build_member_predictor`;
    each batch is fed to all members in one call. `images` is uint8 (N, 28, 28),
    or `upload_images`' device copy with `count`, the number of real images in it.
    """
    stacked = models if isinstance(models, keras.Model) else build_member_predictor(list(models))
    shape = stacked.outputs[0].shape
    out = []
    for batch, n in _batches(images, batch_size, count):
        probs = np.asarray(predict_batch(stacked, batch))
        out.append((probs if len(shape) == 3 else probs[None])[:, :n])
    if not out:
        return np.zeros((shape[0] if len(shape) == 3 else 1, 0, shape[-1]), np.float32)
    return np.concatenate(out, axis=1).astype(np.float32)


def upload_images(images: np.ndarray, batch_size: int | None = 2000):
    """uint8 (N, 28, 28) images as float [0, 1] (N, 28, 28, 1) on the device, blank images added to a whole
    number of `batch_size` batches when there are several (as `predict_members` pads; None: none added,
    for one call on them all): inference from it converts and uploads nothing."""
    x = _to_float(images)
    if batch_size is not None and batch_size < len(x) and len(x) % batch_size:
        x = np.concatenate([x, np.zeros((batch_size - len(x) % batch_size,) + x.shape[1:], x.dtype)])
    return keras.ops.convert_to_tensor(x)


# One pass holds every calibration image's activations at once (measured: 2.0 GB more peak memory for 10,000
# images on a CPU); above this many, prefix passes in batches of 1,000 bound the memory, at 3.2x the arithmetic
# and one read per layer and batch.
ONE_PASS_MAX_IMAGES = 20_000


def recalibrate_batchnorm(model: keras.Model, images, batch_size: int | None = None) -> None:
    """Set every BatchNormalization layer's moving statistics to their exact values on `images`.

    With few optimizer steps the moving averages (momentum 0.99) lag far behind
    the weights and inference-mode predictions are poor; the population
    statistics of the current weights fix that. Each layer's statistics are
    taken with the earlier ones already recalibrated, because inference mode
    feeds each layer its predecessors' normalized outputs. `images` is uint8
    (N, 28, 28), float [0, 1] (N, 28, 28, 1), or such a float tensor already on
    the device.

    Up to ONE_PASS_MAX_IMAGES images (and no smaller `batch_size`), one
    compiled call does it all: a forward pass over the whole set in which each
    layer normalizes by its input's statistics over the set, exactly what it
    will do in inference once they are its moving statistics; only the
    statistics come back. Otherwise one prefix pass per layer in batches of
    `batch_size` (1,000 by default), moments combined in float64 (Chan et al.).
    """
    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    n = len(images)
    if not bns or n == 0:
        return
    x = keras.ops.convert_to_tensor(_to_float(images) if isinstance(images, np.ndarray) else images)
    population = _population_model(model, bns)
    if population is not None and n <= min(batch_size or n, ONE_PASS_MAX_IMAGES):
        stats = np.asarray(predict_batch(population, x), np.float32)  # (2, all layers' channels)
        start = 0
        for layer in bns:
            channels = layer.moving_mean.shape[0]
            layer.moving_mean.assign(stats[0, start : start + channels])
            layer.moving_variance.assign(stats[1, start : start + channels])
            start += channels
        return
    batch_size = batch_size or 1000
    for layer, probe in zip(bns, _probe_models(model, bns)):
        sizes, moments = [], []
        for start in range(0, n, batch_size):
            batch = x[start : start + batch_size]
            sizes.append(batch.shape[0])
            moments.append(np.asarray(predict_batch(probe, batch), np.float64))
        w = np.array(sizes, np.float64)[:, None] / n
        m, v = np.stack([mv[0] for mv in moments]), np.stack([mv[1] for mv in moments])  # (batches, channels)
        mean = (w * m).sum(axis=0)
        layer.moving_mean.assign(mean.astype(np.float32))
        layer.moving_variance.assign((w * (v + (m - mean) ** 2)).sum(axis=0).astype(np.float32))


class _PopulationNormalization(keras.layers.Layer):
    """A BatchNormalization layer in inference mode with its input's statistics over the whole batch as its
    moving statistics: returns the normalized features and those statistics, (2, channels) float32."""

    def __init__(self, layer: keras.layers.BatchNormalization, **kwargs):
        super().__init__(dtype=layer.dtype_policy, name=f"{layer.name}_population", **kwargs)
        self.bn = layer

    def call(self, feats):
        # As BatchNormalization itself: statistics and normalization in float32 under a mixed policy.
        x = keras.ops.cast(feats, "float32")
        m = average_per_channel(x)
        v = average_per_channel(keras.ops.square(x - m))
        bn = self.bn
        y = keras.ops.batch_normalization(x, m, v, axis=-1, epsilon=bn.epsilon,
                                          offset=None if bn.beta is None else keras.ops.cast(bn.beta, "float32"),
                                          scale=None if bn.gamma is None else keras.ops.cast(bn.gamma, "float32"))
        return keras.ops.cast(y, feats.dtype), keras.ops.stack([m, v])

    def compute_output_spec(self, feats):
        channels = feats.shape[-1]
        return (keras.KerasTensor(feats.shape, feats.dtype), keras.KerasTensor((2, channels), "float32"))


_POPULATION: "weakref.WeakKeyDictionary[keras.Model, keras.Model | None]" = weakref.WeakKeyDictionary()


def _population_model(model: keras.Model, bns: list) -> keras.Model | None:
    """`model`'s layers up to its last BatchNormalization, each of those normalizing by the batch's statistics
    (`_PopulationNormalization`), with every layer's statistics as output; built once per model. None for a
    model that is not a chain of layers, which recalibrates by prefix passes."""
    if model not in _POPULATION:
        layers = model.layers
        chain = all(b.input is a.output for a, b in zip(layers, layers[1:]))
        if not chain or not isinstance(layers[0], keras.layers.InputLayer):
            _POPULATION[model] = None
        else:
            inputs = keras.Input(model.inputs[0].shape[1:], name="calibration_images")
            x, stats = inputs, []
            for layer in layers[1 : layers.index(bns[-1]) + 1]:
                if isinstance(layer, keras.layers.BatchNormalization):
                    x, s = _PopulationNormalization(layer)(x)
                    stats.append(s)
                else:
                    x = layer(x, training=False)
            _POPULATION[model] = keras.Model(inputs, keras.ops.concatenate(stats, axis=-1),
                                             name=f"{model.name}_population_statistics")
    return _POPULATION[model]


class _ChannelMoments(keras.layers.Layer):
    """A batch's per-channel mean and variance as (2, channels), float32."""

    def call(self, feats):
        feats = keras.ops.cast(feats, "float32")
        m = average_per_channel(feats)
        return keras.ops.stack([m, average_per_channel(keras.ops.square(feats - m))])

    def compute_output_shape(self, input_shape):
        return (2, input_shape[-1])


def average_per_channel(feats, weights=None):
    """Mean over all but the last axis, per image first: float32 sums of a million values drift by 1e-4.
    `weights` (batch,) weight the images (0 leaves one out)."""
    if len(feats.shape) > 2:
        feats = keras.ops.mean(feats, axis=tuple(range(1, len(feats.shape) - 1)))
    if weights is None:
        return keras.ops.mean(feats, axis=0)
    return keras.ops.sum(feats * weights[:, None], axis=0) / keras.ops.sum(weights)


_PROBES: "weakref.WeakKeyDictionary[keras.Model, list[keras.Model]]" = weakref.WeakKeyDictionary()


def _probe_models(model: keras.Model, bns: list) -> list[keras.Model]:
    """Per BatchNormalization layer, `model` truncated at its input (a pass skips the rest) with the input's
    channel moments as output; built, and compiled by its first call, once per model."""
    if model not in _PROBES:
        _PROBES[model] = [keras.Model(model.inputs[0], _ChannelMoments()(layer.input)) for layer in bns]
    return _PROBES[model]


def _drop_keras_retracing_warning(record: logging.LogRecord) -> bool:
    """TensorFlow counts the first trace of every new Keras step function (a trainer per member group, a
    probe per BatchNormalization layer) as a retracing of one function, the same code, and warns."""
    message = record.getMessage()
    return not ("triggered tf.function retracing" in message and "TensorFlowTrainer." in message)


logging.getLogger("tensorflow").addFilter(_drop_keras_retracing_warning)


def predict_probabilities(model: keras.Model, images: np.ndarray, batch_size: int = 2000) -> np.ndarray:
    """Inference-mode softmax for uint8 (N, 28, 28) images, in batches to bound memory."""
    out = []
    for batch, n in _batches(images, batch_size):
        out.append(np.asarray(predict_batch(model, batch))[:n])
    if not out:
        return np.zeros((0, model.output_shape[-1]), np.float32)
    return np.concatenate(out).astype(np.float32)


def build_averaged_ensemble(members, name: str = "emnist_cnn_ensemble") -> keras.Model:
    """One Keras model whose output is the mean of the members' softmax outputs (for export).

    Each member is cloned with its layer names prefixed ``m{i}_`` (so no two
    layers clash) and its weights copied; the members share the input
    ``pixels``. A single member is returned as it is.
    """
    members = list(members)
    if not members:
        raise ValueError("an ensemble needs at least one member")
    if len(members) == 1:
        return members[0]
    inputs = keras.Input(tuple(members[0].inputs[0].shape[1:]), name="pixels")
    outputs = []
    for i, member in enumerate(members):
        def rename(layer, i=i):
            cfg = layer.get_config()
            cfg["name"] = f"m{i}_{layer.name}"
            return layer.__class__.from_config(cfg)

        clone = keras.models.clone_model(member, input_tensors=inputs, clone_function=rename)
        for src, dst in zip(member.layers, clone.layers):
            if src.weights:
                dst.set_weights(src.get_weights())
        outputs.append(clone.outputs[0])
    mean = keras.layers.Average(name="probabilities")(outputs)
    return keras.Model(inputs, mean, name=name)


def read_variable(variable) -> float:
    """A scalar backend variable (learning rate, step count) as a Python float."""
    return float(keras.ops.convert_to_numpy(variable))


def read_variables(variables: list) -> list[np.ndarray]:
    """The values of `variables` (a model's weights, optimizer, random layers) on the host, in few blocking
    reads: on TensorFlow one compiled call and one read per dtype, on JAX one batched transfer, else one read
    each. The arrays may share one buffer; they are the caller's."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return [np.asarray(a) for a in jax.device_get([v.value for v in variables])]
    if backend != "tensorflow":
        return [keras.ops.convert_to_numpy(v) for v in variables]
    by_dtype: dict[str, list[int]] = {}
    for i, v in enumerate(variables):
        by_dtype.setdefault(str(v.dtype), []).append(i)
    groups = list(by_dtype.values())
    out: list = [None] * len(variables)
    for indices, flat in zip(groups, _tf_packer()([[variables[i].value for i in idx] for idx in groups])):
        flat, start = flat.numpy(), 0
        for i in indices:
            shape = tuple(variables[i].shape)
            size = int(np.prod(shape))
            out[i] = flat[start : start + size].reshape(shape)
            start += size
    return out


@functools.cache
def _tf_packer():
    """A tf.function returning each list of variables flattened and concatenated: one call and one read per
    list. Variables are its arguments, so models of one architecture share one trace."""
    import tensorflow as tf

    return tf.function(lambda groups: [tf.concat([tf.reshape(v, [-1]) for v in g], 0) for g in groups],
                       autograph=False)


def _batches(images, batch_size: int, count: int | None = None):
    """(float batch, its number of real images) over `images`; when there are several batches the last is
    padded to full size, so inference has one shape (one trace, one XLA compilation). A device tensor from
    `upload_images` (`count` real images) is sliced where it is."""
    if not isinstance(images, np.ndarray):
        count = len(images) if count is None else count
        for start in range(0, count, batch_size):
            yield images[start : start + batch_size], min(batch_size, count - start)
        return
    for start in range(0, len(images), batch_size):
        batch = _to_float(images[start : start + batch_size])
        n = len(batch)
        if n < batch_size < len(images):
            batch = np.concatenate([batch, np.zeros((batch_size - n,) + batch.shape[1:], batch.dtype)])
        yield batch, n


def _to_float(x: np.ndarray) -> np.ndarray:
    if x.dtype == np.uint8:
        return x.astype(np.float32)[..., None] * np.float32(1.0 / 255.0)
    return np.asarray(x, np.float32)
