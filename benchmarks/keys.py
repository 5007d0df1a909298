"""What `make bench` measures: every figure's key, unit and group, and the targets some must meet."""

from __future__ import annotations

# key -> (unit, group). A group is measured when any of its keys is asked for.
KEYS: dict[str, tuple[str, str]] = {
    "aug_img_s": ("img/s", "aug"),
    "aug_reference_img_s": ("img/s", "aug"),
    "aug_speedup": ("x", "aug"),
    "train_img_s": ("img/s", "train"),
    "train_noaug_img_s": ("img/s", "train"),
    "train_aug_ratio": ("x", "train"),
    "train_torch_img_s": ("img/s", "torch"),
    "keras_vs_torch": ("x", "torch"),
    "train_bf16_img_s": ("img/s", "bf16"),
    "bf16_vs_fp32": ("x", "bf16"),
    "ensemble_sequential_img_s": ("img/s", "ensemble"),
    "ensemble_fused_img_s": ("img/s", "ensemble"),
    "fused_speedup": ("x", "ensemble"),
    "predict_img_s": ("img/s", "predict"),
    "predict_loop_img_s": ("img/s", "predict"),
    "gflops_achieved": ("GFLOP/s", "flops"),
    "gflops_peak": ("GFLOP/s", "flops"),
    "gflops_sgemm": ("GFLOP/s", "flops"),
    "peak_fraction": ("of peak", "flops"),
    "peak_rss_mb": ("MiB", "memory"),
    "mat_load_s": ("s", "load"),
    "cache_load_s": ("s", "load"),
    "host_ms_per_step": ("ms", "step"),
    "reads_per_step": ("reads", "step"),
    "loop_vs_bare_step": ("x", "step"),
    "epoch_fixed_s": ("s", "fixed"),
    "epoch_fixed_gpu_share": ("of epoch", "fixed"),
    "fixed_calls_per_member_epoch": ("calls", "fixed"),
    "fixed_host_ms_per_member_epoch": ("ms", "fixed"),
    "xla_compiles_per_trainer": ("programs", "compile"),
}

# Groups that need another group's figures first.
DEPENDS = {"torch": ["train"], "bf16": ["train"], "flops": ["train"], "fixed": ["train"]}

GROUP_ORDER = ["aug", "train", "torch", "bf16", "flops", "ensemble", "predict", "step", "fixed", "compile", "load",
               "memory"]

# key -> (comparison, threshold, what it means)
TARGETS = {
    "aug_speedup": (">=", 20.0, "our augmentation >= 20x the reference's Keras 2.0.8 path"),
    "train_aug_ratio": (">=", 0.9, "training with augmentation >= 0.9x without"),
    "keras_vs_torch": (">=", 1.0, "Keras/TF training >= plain PyTorch (augmentation off)"),
    "fused_speedup": (">=", 1.2, "fused ensemble step >= 1.2x sequential members"),
    "peak_fraction": (">=", 0.5, "training reaches >= 50% of fp32 peak"),
    "peak_rss_mb": ("<", 2500.0, "peak RSS of an EMNIST-Digits-sized training process < 2.5 GB"),
    "cache_load_s": ("<", 1.0, "reopening the decoded cache < 1 s"),
    "reads_per_step": ("<", 0.5, "no blocking device read per training step (only at the epoch's end)"),
    "loop_vs_bare_step": ("<", 1.1, "the training loop at batch 8 within 1.1x of a bare compiled step"),
    "epoch_fixed_gpu_share": ("<", 0.1, "recalibration + validation + state < 10% of a GPU member-epoch"),
}
