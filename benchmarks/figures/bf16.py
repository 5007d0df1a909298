"""bf16: the training step under the mixed_bfloat16 policy, against float32."""

from __future__ import annotations

import gc
import logging

import numpy as np


from ..harness import Results, Sizes, alternate, device_trainer, epoch_steps, new_member, paired_ratio, rate

log = logging.getLogger("bench")


def bench_bf16(res: Results, s: Sizes, ctx: dict) -> None:
    import keras

    from emnist_cnn.config import AugmentConfig

    from emnist_cnn.config import ModelConfig

    # The global policy, and the model's own precision setting where ModelConfig has one
    # (build_model then passes it to every layer, which overrides the global policy).
    cfg = ModelConfig(precision="mixed_bfloat16") if "precision" in ModelConfig.__dataclass_fields__ else None
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = new_member(0, name="emnist_cnn_bf16", cfg=cfg)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert all(c.compute_dtype == "bfloat16" and c.kernel.dtype == "float32" for c in convs), \
        [(c.compute_dtype, c.kernel.dtype) for c in convs]
    x, y = ctx["pool"], ctx["labels"]
    rng = np.random.default_rng(4)
    bf16 = epoch_steps(device_trainer([model], x, AugmentConfig(enabled=False), s.batch), y, 1, s.batch,
                       s.bf16_steps, rng)
    fp32 = epoch_steps(ctx["noaug_trainer"], y, 1, s.batch, s.bf16_steps, rng)
    bf16()  # trace
    log.info("bf16: %d steps of %d per repetition, %d repetitions, alternating with float32", s.bf16_steps,
             s.batch, s.reps)
    t = alternate({"mixed_bfloat16": bf16, "float32": fp32}, s.reps)
    n = s.bf16_steps * s.batch
    res.set("train_bf16_img_s", rate(n, t["mixed_bfloat16"]), "experiment: train_noaug_img_s's step under the "
            "'mixed_bfloat16' policy (bf16 compute, float32 weights)")
    res.set("bf16_vs_fp32", paired_ratio(n, t["mixed_bfloat16"], n, t["float32"]),
            f"bf16 / float32 alternated in the same rounds (float32 here {rate(n, t['float32']):,.0f} img/s)")
    del model
    gc.collect()
