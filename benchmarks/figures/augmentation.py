"""aug: our augmentation against the reference's Keras 2.0.8 path."""

from __future__ import annotations

import logging

import numpy as np


from ..baselines import reference_augment_batch
from ..harness import Results, Sizes, alternate, paired_ratio, rate

log = logging.getLogger("bench")


def bench_aug(res: Results, s: Sizes, ctx: dict) -> None:
    from emnist_cnn.core.augment import augment_batch
    from emnist_cnn.config import AugmentConfig

    cfg = AugmentConfig()
    x = ctx["pool"]
    rng = np.random.default_rng(1)
    rs = np.random.RandomState(1)
    batches = [x[i * s.batch : (i + 1) * s.batch] for i in range(max(s.aug_batches, s.ref_batches))]

    def ours():
        for b in batches[: s.aug_batches]:
            np.asarray(augment_batch(b, rng, cfg))

    def reference():
        for b in batches[: s.ref_batches]:
            reference_augment_batch(b, rs, cfg)

    log.info("augmentation: %d x %d images (ours) vs %d x %d (reference), %d repetitions",
             s.aug_batches, s.batch, s.ref_batches, s.batch, s.reps)
    t = alternate({"augment_batch": ours, "keras 2.0.8 loop": reference}, s.reps)
    n_ours, n_ref = s.aug_batches * s.batch, s.ref_batches * s.batch
    ours_rate, ref_rate = rate(n_ours, t["augment_batch"]), rate(n_ref, t["keras 2.0.8 loop"])
    res.set("aug_img_s", ours_rate, f"augment_batch, default AugmentConfig ({cfg.interpolation}), "
            f"uint8 batches of {s.batch} -> float32, result fetched as numpy")
    res.set("aug_reference_img_s", ref_rate, "keras 2.0.8 random_transform re-implemented: per-image Python "
            "loop, 4 matrices composed, scipy affine_transform order=0 mode=nearest on float32")
    res.set("aug_speedup", paired_ratio(n_ours, t["augment_batch"], n_ref, t["keras 2.0.8 loop"]),
            "aug_img_s / aug_reference_img_s (median of per-round ratios)")
