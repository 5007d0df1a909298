"""The compiled training step: members fed from a training set that lives on the device.

`build_device_trainer` wraps one or more member models in a Keras model whose
inputs are the batch's image indices, one int32 vector per member. Each step
gathers the images from `DeviceImages` (uploaded once), warps them in the graph
with `AugmentImages` and trains every member; metrics accumulate on the device
and are read once, at the epoch's end. Every step has the same shape: the
last, smaller batch is padded with index -1, rows that BatchNormalization's
statistics, the loss and the metrics leave out, so a step function is traced
(and, under XLA, compiled) once. The members share their variables with the
trainer; copy optimizer moments in and out with `copy_optimizer_state`.
"""

from __future__ import annotations

import logging
import re
import time
import weakref
from contextlib import contextmanager

import keras
import numpy as np

from ..config import AugmentConfig
from ..startup import filter_stderr_lines
from .augment import scale_affine_params, warp_images
from .model import build_optimizer, average_per_channel

__all__ = ["DeviceImages", "AugmentImages", "MaskedBatchNorm", "build_masked_member", "StepRates", "EpochCallbacks",
           "build_device_trainer", "HARMLESS_GRAPH_LINES", "train_epoch", "train_step", "train_steps",
           "train_steps_jax", "read_member_logs", "augment_key", "LOOP_FORMS"]

log = logging.getLogger(__name__)


# Where oneDNN is on (by default on CPUs with AVX-512 VNNI, BF16 or AMX), TensorFlow logs two errors that cost
# nothing measured (README, "What the console shows"): the float16 image store falls back to Eigen (logged when
# it is made), and the graph optimizer's remapper gives up fusing a convolution whose output LeakyReLU's
# gradient also reads (logged on a trainer's first step).
HARMLESS_GRAPH_LINES = re.compile(  # absl's format (TensorFlow 2.17 on), or TensorFlow's own before it
    rb"(?:E\d{4} \d\d:\d\d:\d+\.\d+ +\d+ |\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: E (?:\S+/)?)"
    rb"(util\.cc:\d+\] oneDNN supports DT_HALF only on platforms with AVX-512\. .*"
    rb"|meta_optimizer\.cc:\d+\] remapper failed: INVALID_ARGUMENT: Mutation::Apply error: fanout '[^']*LeakyReluGrad' "
    rb"exist for missing node '[^']*BiasAdd'\.)")


class DeviceImages(keras.layers.Layer):
    """uint8 images (N, H, W) held in one device variable; maps a batch of indices to float [0, 1] (B, H, W, 1)."""

    def __init__(self, images: np.ndarray, **kwargs):
        super().__init__(dtype="float32", **kwargs)
        # float16 holds 0-255 exactly and every backend gathers it on a GPU (TensorFlow has no uint8 GPU
        # gather); twice uint8's bytes, half float32's. Not autocast: a mixed policy would cast all of it.
        with filter_stderr_lines(HARMLESS_GRAPH_LINES):  # oneDNN's note on float16, once per process
            self.images = self.add_weight(shape=images.shape, dtype="float16", trainable=False, autocast=False,
                                          initializer=lambda shape, dtype: images.astype(np.float16), name="images")

    def call(self, indices):
        # Padding rows (index -1) gather image 0; their outputs count nowhere (see `build_device_trainer`).
        x = keras.ops.take(self.images, keras.ops.maximum(indices, 0), axis=0)
        x = keras.ops.cast(x, "float32")
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
        # Drawn for a full batch and cut to this one (train_epoch pads every batch to full size anyway).
        u = keras.random.uniform((6, self.batch_size), seed=self.seed_generator)[:, : keras.ops.shape(x)[0]]
        return warp_images(x, scale_affine_params(u, self.cfg), self.cfg, self.xla)


class MaskedBatchNorm(keras.layers.Layer):
    """A member's BatchNormalization in training with its batch statistics over the real rows (index >= 0)
    only; the layer's own variables are used and updated as Keras' BatchNormalization does.

    Not Keras' `mask` argument: its masked statistics broadcast the mask to every
    feature and cost 20% of the training speed here; these weight per-image sums.
    """

    def __init__(self, layer: keras.layers.BatchNormalization, **kwargs):
        super().__init__(dtype=layer.dtype_policy, **kwargs)
        self.layer = layer

    def call(self, features, indices, training=None):
        bn = self.layer
        if not (training and bn.trainable):
            return bn(features, training=training)
        ops = keras.ops
        x = ops.cast(features, "float32")  # as Keras: float16 statistics overflow
        real = ops.cast(ops.greater_equal(indices, 0), "float32")
        mean = average_per_channel(x, real)
        variance = average_per_channel(ops.square(x - mean), real)
        bn.moving_mean.assign(bn.moving_mean * bn.momentum + mean * (1.0 - bn.momentum))
        bn.moving_variance.assign(bn.moving_variance * bn.momentum + variance * (1.0 - bn.momentum))
        y = ops.batch_normalization(x, mean, variance, axis=-1, offset=bn.beta, scale=bn.gamma, epsilon=bn.epsilon)
        return ops.cast(y, bn.compute_dtype)

    def compute_output_shape(self, features_shape, indices_shape):
        return tuple(features_shape)


def build_masked_member(model: keras.Model, name: str) -> keras.Model:
    """`model` (a chain of layers, as `build_model` makes) with inputs (pixels, indices): every
    BatchNormalization layer takes its statistics over the rows whose index is >= 0. Shares `model`'s layers."""
    pixels = keras.Input(model.inputs[0].shape[1:], name="pixels")
    indices = keras.Input((), dtype="int32", name="indices")
    x = pixels
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if isinstance(layer, keras.layers.BatchNormalization):
            x = MaskedBatchNorm(layer, name=f"{layer.name}_masked")(x, indices)
        else:
            x = layer(x)
    return keras.Model([pixels, indices], x, name=name)


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

    Index -1 pads a batch: the row enters no BatchNormalization statistics, and
    with sample weight 0 (see `train_epoch`) no loss or metric either. The
    trainer shares its variables with `models` (weights, BatchNormalization
    statistics, dropout seeds). Its loss is the sum of the members' losses, so the
    gradient reaching each member's weights is exactly that member's own, and Adam
    updates every variable independently: a step of k members equals one step of
    each. `learning_rate`: a float, or a `StepRates` schedule; `loss_scaling`
    for float16 compute (see `build_optimizer`). Per member the logs hold `ce`
    (the loss, label smoothing included) and `accuracy`, means over the epoch's
    images (see `read_member_logs`).
    """
    names = [f"member_{i}" for i in range(len(models))]
    # Only TensorFlow's image-transform kernel has no XLA version; JAX's and torch's warps compile.
    gather = jit_compile and keras.backend.backend() == "tensorflow"
    inputs, outputs = [], []
    for i, (m, name) in enumerate(zip(models, names)):
        idx = keras.Input((), dtype="int32", name=f"index_{i}")
        x = AugmentImages(augment, batch_size, gather, name=f"augment_{i}")(images(idx))
        # A functional wrapper per member, named member_i: graph names must be unique, layers stay shared.
        outputs.append(build_masked_member(m, name)([x, idx]))
        inputs.append(idx)
    trainer = keras.Model(inputs, outputs, name="member_trainer")
    # The mean over the weighted (real) rows: a full batch's mean is the same as without weights.
    mean = "mean_with_sample_weight"
    if label_smoothing:  # Keras' sparse loss cannot smooth: one-hot targets
        loss = keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing, reduction=mean)
        metric = lambda: keras.metrics.CategoricalCrossentropy(label_smoothing=label_smoothing, name="ce")  # noqa: E731
    else:
        loss = keras.losses.SparseCategoricalCrossentropy(reduction=mean)
        metric = lambda: keras.metrics.SparseCategoricalCrossentropy(name="ce")  # noqa: E731
    # The loss metric, not Keras' loss tracker: the tracker weights a batch by its row count, padding included.
    trainer.compile(optimizer=build_optimizer(learning_rate, loss_scaling),
                    loss={n: loss for n in names},
                    # Weighted: padding rows (weight 0) count nowhere.
                    weighted_metrics={n: ["accuracy", metric()] for n in names},
                    jit_compile=jit_compile)
    trainer.optimizer.build(trainer.trainable_variables)
    # The metrics' variables now, from shapes alone, as Keras' own fit does before its first step: TensorFlow
    # traces a step that creates variables twice (about a second more per trainer on a 2-core CPU).
    classes = models[0].output_shape[-1]
    target = np.zeros((batch_size, classes), np.float32) if label_smoothing else np.zeros(batch_size, np.int32)
    trainer._symbolic_build(data_batch=(tuple(np.zeros(batch_size, np.int32) for _ in models),
                                        (target,) * len(models), (np.ones(batch_size, np.float32),) * len(models)))
    return trainer


# The programs each TensorFlow trainer has run: a program's first call traces and compiles it, and is the only
# time the graph optimizer logs those errors.
_COMPILED: "weakref.WeakKeyDictionary[keras.Model, set]" = weakref.WeakKeyDictionary()


@contextmanager
def _first_call_logged(trainer: keras.Model, program: tuple, what: str):
    """Around a call of one of `trainer`'s programs: the first call (which compiles it) is said, with its time."""
    done = _COMPILED.setdefault(trainer, set())
    if program in done:
        yield
        return
    members = len(trainer.outputs)
    how = "XLA" if trainer.jit_compile else "graph"
    if done:  # a later program (an epoch's last, shorter call): under "outer", no new XLA program
        log.info("compiling the training step for %s (%s)...", what, how)
    else:
        log.info("compiling the training step (%d member%s, %s, %s)...", members, "s" * (members > 1), what, how)
    t0 = time.perf_counter()
    with filter_stderr_lines(HARMLESS_GRAPH_LINES):
        yield
    done.add(program)
    log.info("compiled the training step in %.1f s", time.perf_counter() - t0)


def train_epoch(trainer: keras.Model, orders: list[np.ndarray], targets: list[np.ndarray], batch_size: int,
                show_bar: bool = False, steps_per_call: int = 1, loop: str = "outer") -> dict[str, float]:
    """One epoch of `trainer`'s steps: member i sees its images in `orders[i]` with `targets[i]`, in batches
    of `batch_size`, the last padded to full size (index -1, sample weight 0). Returns the epoch's logs,
    read from the device once.

    TensorFlow: the step is called directly, with each member's order and targets
    uploaded once per epoch and sliced on the device (Keras' `fit` reads a value
    back after every step); `steps_per_call` > 1 runs that many steps per call, in
    the form `loop` names (see `train_steps`; the same steps: to the bit without
    XLA, within rounding under it). Each distinct call is compiled once per trainer
    and process: a full call and, where the epoch's steps do not divide, the tail.
    JAX: the same, with the trainer's state passed through Keras' stateless
    `train_step` (see `train_steps_jax`). torch: Keras' `fit`.
    """
    n = len(orders[0])
    steps = -(-n // batch_size)
    pad = steps * batch_size - n
    xs = [np.concatenate([o.astype(np.int32), np.full(pad, -1, np.int32)]) for o in orders]
    ys = [np.concatenate([t, np.zeros((pad,) + t.shape[1:], t.dtype)]) for t in targets]
    weights = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
    callbacks = EpochCallbacks(trainer, steps, show_bar)
    if keras.backend.backend() == "jax":
        # One step per call is the "outer" form's compiled step, called once.
        _train_epoch_jax(trainer, xs, ys, weights, batch_size, steps_per_call,
                         loop if steps_per_call > 1 else "outer", callbacks)
        callbacks.on_epoch_end(0, trainer.get_metrics_result())
        return callbacks.epoch_logs
    if keras.backend.backend() != "tensorflow":
        trainer.fit(xs, ys, sample_weight=[weights] * len(xs), batch_size=batch_size, epochs=1, shuffle=False,
                    verbose=0, callbacks=callbacks)
        return callbacks.epoch_logs
    trainer.make_train_function()
    trainer.reset_metrics()
    if steps_per_call > 1:
        # (steps, batch, ...): a step's slice keeps its static shape inside the graph's loop.
        data = (tuple(keras.ops.convert_to_tensor(x.reshape((steps, batch_size))) for x in xs),
                tuple(keras.ops.convert_to_tensor(y.reshape((steps, batch_size) + y.shape[1:])) for y in ys),
                (keras.ops.convert_to_tensor(weights.reshape((steps, batch_size))),) * len(xs))
        for first in range(0, steps, steps_per_call):
            count = min(steps_per_call, steps - first)
            with _first_call_logged(trainer, (count, loop), f"{count} step{'s' * (count > 1)} per call"):
                train_steps(trainer, data, first, count, loop)
            callbacks.on_train_batch_end(first + count - 1)
    else:
        xs = [keras.ops.convert_to_tensor(x) for x in xs]
        ys = [keras.ops.convert_to_tensor(y) for y in ys]
        weights = keras.ops.convert_to_tensor(weights)
        for s in range(steps):
            batch = slice(s * batch_size, (s + 1) * batch_size)
            with _first_call_logged(trainer, (1, "step"), "one step per call"):
                train_step(trainer, [x[batch] for x in xs], [y[batch] for y in ys], [weights[batch]] * len(xs))
            callbacks.on_train_batch_end(s)
    callbacks.on_epoch_end(0, trainer.get_metrics_result())
    return callbacks.epoch_logs


def train_step(trainer: keras.Model, xs: list, ys: list, weights: list) -> None:
    """One compiled step of a TensorFlow trainer on device tensors (indices, targets, sample weights per
    member); nothing is read back."""
    trainer.train_function(iter([(tuple(xs), tuple(ys), tuple(weights))]))


def train_steps(trainer: keras.Model, data: tuple, first: int, count: int, loop: str = "outer") -> None:
    """Steps `first` .. `first + count - 1` of a TensorFlow trainer in one call; `data` holds (indices,
    targets, sample weights) per member as (steps, batch, ...) device tensors. Nothing is read back.

    `first` is a runtime value, so every call of the same length, in any epoch, resumed or not, runs the same
    program. `loop` (see `LOOP_FORMS`): "outer", a loop in a graph that XLA leaves alone around one compiled
    step, shared by calls of every length (under XLA, one compilation per trainer); "loop", the loop in the
    compiled program; "unrolled", `count` copies of the step in it (one compilation per call length).
    """
    programs = _MULTI_STEP.setdefault(trainer, {})
    if (count, loop) not in programs:
        programs[count, loop] = _build_multi_step(trainer, count, loop, programs)
    programs[count, loop](data, np.int32(first))


_MULTI_STEP: "weakref.WeakKeyDictionary[keras.Model, dict]" = weakref.WeakKeyDictionary()
# Measured on XLA:CPU, 2 members, batch 32, 4 steps per call (README, "Steps per call"): 67 ms a step called
# alone, 75 "outer", 66 "unrolled", 1,279 "loop"; "outer" also compiles one step, not `count` of them.
LOOP_FORMS = ("outer", "unrolled", "loop")


def _build_multi_step(trainer: keras.Model, count: int, loop: str, programs: dict):
    import tensorflow as tf

    if loop not in LOOP_FORMS:
        raise ValueError(f"loop must be one of {', '.join(LOOP_FORMS)}, got {loop!r}")
    owner = weakref.ref(trainer)  # the cache holds this function: a strong reference would keep the trainer
    xla = bool(trainer.jit_compile)

    def step(data, s):
        owner().train_step(keras.tree.map_structure(lambda t: tf.gather(t, s), data))

    if loop == "outer":
        if "step" not in programs:
            programs["step"] = tf.function(step, jit_compile=xla, reduce_retracing=True)
        step = programs["step"]

    @tf.function(jit_compile=xla and loop != "outer", reduce_retracing=True)
    def run(data, first):
        # The first step outside the loop: a first trace creates the metrics' variables there, and
        # TensorFlow allows no variable creation inside a loop.
        step(data, first)
        if loop == "unrolled":
            for s in range(1, count):
                step(data, first + s)
        else:
            # A trip count fixed when traced: XLA takes a loop's bound as a compile-time constant, so a bound
            # computed from `first` compiled a new program for every new `first`.
            for s in tf.range(1, count):
                step(data, first + s)

    return run


def _train_epoch_jax(trainer: keras.Model, xs: list, ys: list, weights: np.ndarray, batch_size: int,
                     steps_per_call: int, loop: str, callbacks: EpochCallbacks) -> None:
    """One epoch of a JAX trainer: its variables' values in, `steps_per_call` steps per call, values back."""
    import jax

    steps = len(weights) // batch_size
    trainer.reset_metrics()
    data = jax.device_put((tuple(x.reshape((steps, batch_size)) for x in xs),
                           tuple(y.reshape((steps, batch_size) + y.shape[1:]) for y in ys),
                           (weights.reshape((steps, batch_size)),) * len(xs)))
    groups = _jax_state_variables(trainer)
    state = tuple([v.value for v in g] for g in groups)
    for first in range(0, steps, steps_per_call):
        count = min(steps_per_call, steps - first)
        what = f"{count} step{'s' * (count > 1)} per call"
        with _first_call_logged(trainer, (count, loop), what):
            state = train_steps_jax(trainer, state, data, first, count, loop)
        callbacks.on_train_batch_end(first + count - 1)
    for g, values in zip(groups, state):
        for v, value in zip(g, values):
            v.assign(value)


def _jax_state_variables(trainer: keras.Model) -> tuple:
    """The variables of Keras' stateless JAX step, in its state's order."""
    return (trainer.trainable_variables, trainer.non_trainable_variables, trainer.optimizer.variables,
            trainer.metrics_variables)


def train_steps_jax(trainer: keras.Model, state: tuple, data: tuple, first: int, count: int,
                    loop: str = "outer") -> tuple:
    """Steps `first` .. `first + count - 1` of a JAX trainer from `state` (values of its trainable,
    non-trainable, optimizer and metrics variables, in that order); returns the new state, on the device.

    `data` as `train_steps`; `first` is a runtime value, so calls of one length share one compiled program.
    `loop`: "outer", a Python loop around one compiled step (shared by calls of every length); "loop", a
    `fori_loop` compiled whole; "unrolled", `count` copies of the step in one program. The state passed
    in is donated (its buffers are reused): use only the one returned.
    """
    programs = _MULTI_STEP.setdefault(trainer, {})
    if (count, loop) not in programs:
        programs[count, loop] = _build_jax_steps(trainer, count, loop, programs)
    return programs[count, loop](state, data, np.int32(first))


def _build_jax_steps(trainer: keras.Model, count: int, loop: str, programs: dict):
    import jax

    if loop not in LOOP_FORMS:
        raise ValueError(f"loop must be one of {', '.join(LOOP_FORMS)}, got {loop!r}")
    owner = weakref.ref(trainer)

    def step(state, data, s):
        _, state = owner().train_step(state, keras.tree.map_structure(lambda t: t[s], data))
        return tuple(list(g) for g in state)  # the same containers as the state passed in (a loop's carry)

    if loop == "outer":
        if "step" not in programs:
            programs["step"] = jax.jit(step, donate_argnums=0)
        one = programs["step"]

        def outer(state, data, first):
            for s in range(count):
                state = one(state, data, first + np.int32(s))
            return state

        return outer

    def run(state, data, first):
        if loop == "unrolled":
            for s in range(count):
                state = step(state, data, first + s)
            return state
        return jax.lax.fori_loop(0, count, lambda s, carried: step(carried, data, first + s), state)

    return jax.jit(run, donate_argnums=0)


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
