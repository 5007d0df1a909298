"""predict: the ensemble's prediction through one stacked model against a loop over members."""

from __future__ import annotations

import gc
import logging
import statistics
import time

import numpy as np


from ..harness import Results, Sizes, alternate, new_member, paired_ratio, rate

log = logging.getLogger("bench")


def bench_predict(res: Results, s: Sizes, ctx: dict) -> None:
    from emnist_cnn.core import model as model_mod

    members = ctx.get("members") or [new_member(100 + i, name=f"member_{i}") for i in range(s.members)]
    images = ctx["test_pool"][: s.predict_images]
    bs = s.predict_batch

    def loop():
        return np.stack([model_mod.predict_probabilities(m, images, bs) for m in members])

    fns = {"predict_probabilities loop": loop}
    has_ensemble = hasattr(model_mod, "predict_members")
    stacked = None
    if has_ensemble:
        # predict_members(list) builds (and traces) a stacked model on every call; a model from
        # build_member_predictor is built once. Time the steady state; the list form's extra cost
        # per call is measured once below.
        if hasattr(model_mod, "build_member_predictor"):
            stacked = model_mod.build_member_predictor(members)
        target = stacked if stacked is not None else members
        fns["predict_members"] = lambda: model_mod.predict_members(target, images, bs)
    log.info("predict: %d members x %d images (batch %d), %d repetitions", len(members), len(images), bs,
             s.predict_reps)
    t = alternate(fns, s.predict_reps)
    n = len(images)
    list_overhead = None
    if stacked is not None:
        t0 = time.perf_counter()
        model_mod.predict_members(members, images, bs)
        list_overhead = time.perf_counter() - t0 - statistics.median(t["predict_members"])
        log.info("  predict_members(list of models) once: %.3f s more than with a stacked model", list_overhead)
    size = f"{n:,} images (a 40,000-image test set would take {40_000 / n:.1f}x as long; timing budget)"
    loop_rate = rate(n, t["predict_probabilities loop"])
    res.set("predict_loop_img_s", loop_rate, f"predict_probabilities per member, {len(members)} members, "
            f"batch {bs}, {size}")
    if has_ensemble:
        how = "build_member_predictor once, then predict_members" if stacked is not None else "predict_members"
        extra = f"; a list of models adds {list_overhead:.1f} s per call (stacked build + trace)" \
            if list_overhead is not None else ""
        res.set("predict_img_s", rate(n, t["predict_members"]), f"{how}, {len(members)} members, "
                f"batch {bs}, images through the whole ensemble per s; "
                f"{paired_ratio(n, t['predict_members'], n, t['predict_probabilities loop']):.2f}x the loop"
                + extra)
    else:
        res.set("predict_img_s", loop_rate, "predict_members not in emnist_cnn.core.model: the per-member loop "
                "(= predict_loop_img_s)")
    ctx.pop("members", None)
    gc.collect()
