"""step: what the training loop adds around the compiled step, and its blocking device reads."""

from __future__ import annotations

import logging
import statistics

import numpy as np

from emnist_cnn.demos import count_device_reads

from ..harness import Results, Sizes, alternate, device_trainer, new_member, paired_ratio

log = logging.getLogger("bench")


def bench_step(res: Results, s: Sizes, ctx: dict) -> None:
    """What the loop adds around the compiled step: at a tiny batch the step is nearly all fixed cost."""
    import keras

    from emnist_cnn.config import AugmentConfig
    from emnist_cnn.core.trainer import train_epoch

    x, y = ctx["pool"], ctx["labels"]
    b, k = s.tiny_batch, s.tiny_steps
    trainer = device_trainer([new_member(3)], x, AugmentConfig(), b)
    rng = np.random.default_rng(4)
    order = rng.choice(len(y), k * b, replace=False).astype(np.int32)
    xs = (keras.ops.convert_to_tensor(order[:b]),)
    ys = (keras.ops.convert_to_tensor(y[order[:b]]),)
    ws = (keras.ops.convert_to_tensor(np.ones(b, np.float32)),)  # sample weights, as train_epoch passes them

    def loop():
        train_epoch(trainer, [order], [y[order]], b)

    def bare():  # the compiled step alone, on tensors already on the device, nothing read back
        for _ in range(k):
            trainer.train_function(iter([(xs, ys, ws)]))

    loop(), bare()
    log.info("step overhead: %d steps of batch %d, %d repetitions, alternating loop / bare step", k, b, s.reps)
    t = alternate({"loop": loop, "bare": bare}, s.reps)
    res.set("host_ms_per_step", max(0.0, (statistics.median(t["loop"]) - statistics.median(t["bare"])) / k * 1e3),
            f"(train_epoch - bare compiled step) per step at batch {b}: slicing, bookkeeping, one metrics read "
            "per epoch")
    res.set("loop_vs_bare_step", paired_ratio(k, t["bare"], k, t["loop"]),
            "train_epoch's time per step / a bare compiled step's (median of per-round ratios)")
    reads = count_device_reads(loop)
    res.set("reads_per_step", reads / k, f"{reads} blocking device reads in an epoch of {k} steps (numpy(), "
            "float(), np.array of a tensor), all at its end")
