"""The compiled training step: members fed from a training set that lives on the device.

`build_device_trainer` wraps one or more member models in a Keras model whose
inputs are the batch's image indices, one int32 vector per member. Each step
gathers the images from `DeviceImages` (uploaded once), warps them in the graph
with `AugmentImages` and trains every member; Keras' `fit` runs an epoch of
such steps, its metrics accumulate on the device and `EpochCallbacks` reads
them once, at the epoch's end. The members share their variables with the
trainer; copy optimizer moments in and out with `copy_optimizer_state`.
"""

from __future__ import annotations

import keras
import numpy as np

from ..config import AugmentConfig
from .augment import scale_affine_params, warp_images
from .model import build_optimizer

__all__ = ["DeviceImages", "AugmentImages", "StepRates", "EpochCallbacks", "build_device_trainer",
           "train_epoch", "train_step", "read_member_logs", "augment_key"]


class DeviceImages(keras.layers.Layer):
    """uint8 images (N, H, W) held in one device variable; maps a batch of indices to float [0, 1] (B, H, W, 1)."""

    def __init__(self, images: np.ndarray, **kwargs):
        super().__init__(dtype="float32", **kwargs)
        # float16 holds 0-255 exactly and every backend gathers it on a GPU (TensorFlow has no uint8 GPU
        # gather); twice uint8's bytes, half float32's. Not autocast: a mixed policy would cast all of it.
        self.images = self.add_weight(shape=images.shape, dtype="float16", trainable=False, autocast=False,
                                      initializer=lambda shape, dtype: images.astype(np.float16), name="images")

    def call(self, indices):
        x = keras.ops.cast(keras.ops.take(self.images, indices, axis=0), "float32")
        return keras.ops.expand_dims(x * np.float32(1.0 / 255.0), -1)


class AugmentImages(keras.layers.Layer):
    """The reference augmentation in training mode (identity at inference).

    Uniform numbers come from a stateless generator whose key `set_key` sets
    (once per member and epoch); each step advances it by one, so a step's
    warps depend only on (key, step): the same fused or alone, resumed or not.
    """

    def __init__(self, cfg: AugmentConfig, batch_size: int, xla: bool = False, **kwargs):
        super().__init__(dtype="float32", **kwargs)
        self.cfg, self.batch_size, self.xla = cfg, batch_size, xla
        self.seed_generator = keras.random.SeedGenerator(0, name=f"{self.name}_seed")

    def set_key(self, key: int) -> None:
        self.seed_generator.state.assign(np.array([key, 0]).astype(self.seed_generator.state.dtype))

    def call(self, x, training=None):
        if not training or not self.cfg.enabled:
            return x
        # Drawn for a full batch and cut to this one: the last, smaller batch needs no other shape.
        u = keras.random.uniform((6, self.batch_size), seed=self.seed_generator)[:, : keras.ops.shape(x)[0]]
        return warp_images(x, scale_affine_params(u, self.cfg), self.cfg, self.xla)


@keras.saving.register_keras_serializable(package="emnist_cnn")
class StepRates(keras.optimizers.schedules.LearningRateSchedule):
    """A learning rate per optimizer step, read from a table (the step count indexes it; the last rate holds)."""

    def __init__(self, rates):
        self.rates = np.asarray(rates, np.float32)

    def __call__(self, step):
        i = keras.ops.minimum(keras.ops.cast(step, "int32"), len(self.rates) - 1)
        return keras.ops.take(keras.ops.convert_to_tensor(self.rates), i)

    def get_config(self):
        return {"rates": self.rates.tolist()}


class EpochCallbacks(keras.callbacks.CallbackList):
    """`fit`'s callbacks for one epoch: a step bar on a terminal; the epoch's logs, read once at its end.

    Keras' own list converts every step's logs to Python numbers (a blocking
    device read per step); this one never looks at them before the epoch ends.
    """

    def __init__(self, trainer: keras.Model, steps: int, show_bar: bool):
        super().__init__(add_history=True, add_progbar=False, model=trainer)  # fit returns the History
        self.bar = keras.utils.Progbar(steps, unit_name="step") if show_bar else None
        self.epoch_logs: dict[str, float] = {}

    def on_train_batch_begin(self, batch, logs=None):
        pass

    def on_train_batch_end(self, batch, logs=None):
        if self.bar is not None:
            self.bar.update(batch + 1)

    def on_epoch_end(self, epoch, logs=None):
        self.epoch_logs = {k: float(keras.ops.convert_to_numpy(v)) for k, v in (logs or {}).items()}
        if self.bar is not None:
            self.bar.update(self.bar.target, values=sorted(self.epoch_logs.items()), finalize=True)


def build_device_trainer(models: list[keras.Model], images: DeviceImages, augment: AugmentConfig, batch_size: int,
                         learning_rate, label_smoothing: float = 0.0, jit_compile: bool = False,
                         loss_scaling: bool = False) -> keras.Model:
    """All `models` in one compiled step: input `index_i` (int32 indices into `images`) feeds member i.

    The trainer shares its variables with `models` (weights, BatchNormalization
    statistics, dropout seeds). Its loss is the sum of the members' losses, so the
    gradient reaching each member's weights is exactly that member's own, and Adam
    updates every variable independently: a step of k members equals one step of
    each. `learning_rate`: a float, or a `StepRates` schedule; `loss_scaling` for
    float16 compute (see `build_optimizer`). Per member the
    logs hold `ce` (the loss, label smoothing included) and `accuracy`, means
    over the epoch's images (see `read_member_logs`).
    """
    names = [f"member_{i}" for i in range(len(models))]
    # Only TensorFlow's image-transform kernel has no XLA version; JAX's and torch's warps compile.
    gather = jit_compile and keras.backend.backend() == "tensorflow"
    inputs, outputs = [], []
    for i, (m, name) in enumerate(zip(models, names)):
        idx = keras.Input((), dtype="int32", name=f"index_{i}")
        x = AugmentImages(augment, batch_size, gather, name=f"augment_{i}")(images(idx))
        # A renamed functional wrapper per member: graph names must be unique, layers stay shared.
        outputs.append(keras.Model(m.inputs[0], m.outputs[0], name=name)(x))
        inputs.append(idx)
    trainer = keras.Model(inputs, outputs, name="member_trainer")
    if label_smoothing:  # Keras' sparse loss cannot smooth: one-hot targets
        loss = keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing)
        metric = lambda: keras.metrics.CategoricalCrossentropy(label_smoothing=label_smoothing, name="ce")  # noqa: E731
    else:
        loss = keras.losses.SparseCategoricalCrossentropy()
        metric = lambda: keras.metrics.SparseCategoricalCrossentropy(name="ce")  # noqa: E731
    # The loss metric, not Keras' loss tracker: the tracker weights a batch by its static size, which a
    # retraced step no longer knows, so the smaller last batch would count as a full one.
    trainer.compile(optimizer=build_optimizer(learning_rate, loss_scaling),
                    loss={n: loss for n in names}, metrics={n: ["accuracy", metric()] for n in names},
                    jit_compile=jit_compile)
    trainer.optimizer.build(trainer.trainable_variables)
    return trainer


def train_epoch(trainer: keras.Model, orders: list[np.ndarray], targets: list[np.ndarray], batch_size: int,
                show_bar: bool = False) -> dict[str, float]:
    """One epoch of `trainer`'s steps: member i sees its images in `orders[i]` with `targets[i]`, in batches
    of `batch_size` (the last may be smaller). Returns the epoch's logs, read from the device once.

    TensorFlow: the step is called directly, with each member's order and targets
    uploaded once per epoch and sliced on the device (Keras' `fit` reads a value
    back after every step). JAX and torch: Keras' `fit`.
    """
    steps = -(-len(orders[0]) // batch_size)
    callbacks = EpochCallbacks(trainer, steps, show_bar)
    if keras.backend.backend() != "tensorflow":
        trainer.fit(orders, targets, batch_size=batch_size, epochs=1, shuffle=False, verbose=0, callbacks=callbacks)
        return callbacks.epoch_logs
    trainer.make_train_function()
    xs = [keras.ops.convert_to_tensor(o) for o in orders]
    ys = [keras.ops.convert_to_tensor(t) for t in targets]
    trainer.reset_metrics()
    for s in range(steps):
        batch = slice(s * batch_size, (s + 1) * batch_size)
        train_step(trainer, [x[batch] for x in xs], [y[batch] for y in ys])
        callbacks.on_train_batch_end(s)
    callbacks.on_epoch_end(0, trainer.get_metrics_result())
    return callbacks.epoch_logs


def train_step(trainer: keras.Model, xs: list, ys: list) -> None:
    """One compiled step of a TensorFlow trainer on device tensors; nothing is read back."""
    trainer.train_function(iter([(tuple(xs), tuple(ys))]))


def read_member_logs(logs: dict[str, float], n_members: int) -> list[tuple[float, float]]:
    """(loss, accuracy) per member from a trainer's epoch logs."""
    def find(i: int, metric: str) -> float:
        # Keras names them "member_<i>_<metric>", or "<metric>" when the trainer has one output.
        keys = [k for k in logs if k == f"member_{i}_{metric}" or (n_members == 1 and k == metric)]
        return float(logs[keys[0]])

    return [(find(i, "ce"), find(i, "accuracy")) for i in range(n_members)]


def augment_key(member_seed: int, epoch: int) -> int:
    """The augmentation generator's key for a member's epoch (31 bits: some backends keep seeds as int32)."""
    return int(np.random.SeedSequence([member_seed, epoch, 1]).generate_state(1)[0]) & 0x7FFFFFFF
