"""train: one member's training step, augmentation on and off."""

from __future__ import annotations

import logging

import numpy as np


from ..harness import (Results, Sizes, alternate, device_trainer, epoch_steps, flops_per_image, new_member,
                       paired_ratio, rate)

log = logging.getLogger("bench")


def bench_train(res: Results, s: Sizes, ctx: dict) -> None:
    from emnist_cnn.config import AugmentConfig

    x, y = ctx["pool"], ctx["labels"]
    model = new_member(0)
    ctx["flops"] = flops_per_image(model)
    rng = np.random.default_rng(2)
    noaug = device_trainer([model], x, AugmentConfig(enabled=False), s.batch)
    on = epoch_steps(device_trainer([model], x, AugmentConfig(), s.batch), y, 1, s.batch, s.train_steps, rng)
    off = epoch_steps(noaug, y, 1, s.batch, s.train_steps, rng)
    log.info("training, one member: %d steps of %d per repetition, %d repetitions, alternating aug on/off",
             s.train_steps, s.batch, s.reps)
    on(), off()  # trace both
    t = alternate({"augment on": on, "augment off": off}, s.reps)
    n = s.train_steps * s.batch
    res.set("train_img_s", rate(n, t["augment on"]), f"batch {s.batch}: train_epoch over build_device_trainer "
            "(images on the device, warp in the graph), build_model + compile_model, Adam")
    res.set("train_noaug_img_s", rate(n, t["augment off"]), "same step with AugmentConfig(enabled=False)")
    res.set("train_aug_ratio", paired_ratio(n, t["augment on"], n, t["augment off"]),
            "train_img_s / train_noaug_img_s (median of per-round ratios)")
    ctx["keras_member"] = model
    ctx["noaug_trainer"] = noaug
    ctx["train_img_s"] = res.figures["train_img_s"]
