"""ensemble: members trained in one fused step against one after another."""

from __future__ import annotations

import logging

import numpy as np


from ..harness import Results, Sizes, alternate, device_trainer, epoch_steps, new_member, paired_ratio, rate

log = logging.getLogger("bench")


def bench_ensemble(res: Results, s: Sizes, ctx: dict) -> None:
    from emnist_cnn.config import AugmentConfig

    cfg = AugmentConfig()
    x, y = ctx["pool"], ctx["labels"]
    log.info("ensemble: building %d members", s.members)
    members = [new_member(100 + i, name=f"member_{i}") for i in range(s.members)]
    ctx["members"] = members
    rng = np.random.default_rng(7)
    alone = [epoch_steps(device_trainer([m], x, cfg, s.batch), y, 1, s.batch, s.ens_steps, rng) for m in members]

    def sequential():  # one member after another, each its own compiled step
        for run in alone:
            run()

    log.info("ensemble: building the fused trainer")
    fused = epoch_steps(device_trainer(members, x, cfg, s.batch), y, s.members, s.batch, s.ens_steps, rng)
    sequential(), fused()  # trace
    log.info("ensemble: %d members x %d steps of %d per repetition, %d repetitions", s.members, s.ens_steps,
             s.batch, s.ens_reps)
    t = alternate({"sequential": sequential, "fused": fused}, s.ens_reps)
    n = s.members * s.ens_steps * s.batch
    res.set("ensemble_sequential_img_s", rate(n, t["sequential"]), f"member-images/s, {s.members} members one "
            "after another, own compiled step each, augmentation on")
    res.set("ensemble_fused_img_s", rate(n, t["fused"]), f"member-images/s, {s.members} members in one "
            "build_device_trainer step, augmentation on per member")
    res.set("fused_speedup", paired_ratio(n, t["fused"], n, t["sequential"]),
            "ensemble_fused_img_s / ensemble_sequential_img_s (median of per-round ratios)")
