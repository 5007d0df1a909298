"""fixed: a member-epoch's work besides training (recalibration, validation, the state file), measured here and
projected onto a GPU."""

from __future__ import annotations

import logging
import statistics
from pathlib import Path
from typing import Callable


from emnist_cnn.demos import count_device_reads, synthetic_images

from ..harness import GPU_IMG_S, LR, Results, Sizes, alternate, new_member

log = logging.getLogger("bench")


def build_fixed_work(members, calib, val, n_val: int, state_path: Path,
                     batch_size: int = 2000) -> dict[str, Callable[[], object]]:
    """A fused group's work besides training in one member-epoch, as `training.members` does it: each member
    recalibrated on `calib`, all validated together on `val` (device copies from `upload_images`; `n_val`
    real images, in batches of `batch_size`), each member's state written to `state_path`. Also used by
    benchmarks/gpu_check.py."""
    from emnist_cnn.core.model import build_member_predictor, predict_members, recalibrate_batchnorm
    from emnist_cnn.io.state import save_member_state

    stacked = build_member_predictor(members)
    state_path.parent.mkdir(parents=True, exist_ok=True)
    return {"recalibrate": lambda: [recalibrate_batchnorm(m, calib) for m in members],
            "validate": lambda: predict_members(stacked, val, batch_size=batch_size, count=n_val),
            "state": lambda: [save_member_state(state_path, m, 1, {"seed": 0, "learning_rate": LR})
                              for m in members]}

def bench_fixed(res: Results, s: Sizes, ctx: dict) -> None:
    """A member-epoch's work besides training, at EMNIST Digits' sizes, as a fused group of `s.members` does it:
    each member recalibrated and all validated at once from images on the device, each member's state."""
    from emnist_cnn.core.model import upload_images

    members = ctx.get("members") or [new_member(100 + i, name=f"member_{i}") for i in range(s.members)]
    g = len(members)
    path = Path(ctx["tmp"]) / "state" / "model_0.npz"
    parts = build_fixed_work(members, upload_images(synthetic_images(s.calib_images, 5), batch_size=None),
                             upload_images(synthetic_images(s.val_images, 6)), s.val_images, path)
    for fn in parts.values():
        fn()  # trace
    log.info("fixed per member-epoch: recalibration on %d, validation on %d images, state; %d members, "
             "%d repetitions", s.calib_images, s.val_images, g, s.reps)
    t = {name: statistics.median(v) / g for name, v in alternate(parts, s.reps).items()}
    total = sum(t.values())
    res.set("epoch_fixed_s", total, ", ".join(f"{k} {v:.2f} s" for k, v in t.items()) + f" per member, in a group "
            f"of {g} (this CPU)")
    # On a GPU the compute parts speed up like training does; the state write does not.
    compute_images = (t["recalibrate"] + t["validate"]) * ctx["train_img_s"]
    gpu_epoch = 216_000 / GPU_IMG_S  # EMNIST Digits training images at --val-fraction 0.1
    gpu_fixed = compute_images / GPU_IMG_S + t["state"]
    res.set("epoch_fixed_gpu_share", gpu_fixed / gpu_epoch,
            f"projection: recalibration + validation cost {compute_images:,.0f} training-image equivalents here; "
            f"at an assumed {GPU_IMG_S:,} img/s that is {gpu_fixed:.2f} s with the state write, against "
            f"{gpu_epoch:.1f} s of training per member-epoch")

    # Blocking device calls (reads back to the host) per member-epoch, at the real sizes; and the host's time:
    # the same calls on 8-image batches, where the device's share is nothing (what a fast GPU leaves).
    calls = sum(count_device_reads(fn) for name, fn in parts.items() if name != "state") / g
    res.set("fixed_calls_per_member_epoch", calls, f"recalibration on {s.calib_images:,} and validation on "
            f"{s.val_images:,} images, {g} members validated together (62 before: 50 for recalibration's "
            f"prefix passes, 12 validation batches, each member alone)")
    tiny, val_calls = 8, -(-s.val_images // 2000)
    small = build_fixed_work(members, upload_images(synthetic_images(tiny, 5), batch_size=None),
                             upload_images(synthetic_images(val_calls * tiny, 6), batch_size=tiny), val_calls * tiny,
                             path, batch_size=tiny)
    for fn in small.values():
        fn()  # trace the small shapes
    host = {name: statistics.median(v) / g for name, v in alternate(small, s.reps).items()}
    per_member = sum(host.values())
    res.set("fixed_host_ms_per_member_epoch", 1000 * per_member,
            ", ".join(f"{k} {1000 * v:.0f} ms" for k, v in host.items()) + f": the same calls on {tiny}-image "
            f"batches (309 ms before); at an assumed 500,000 img/s a fused epoch of 10 members trains 2,160,000 "
            f"images in 4.32 s, and 10 x this is {10 * per_member / 4.32:.0%} of it")
