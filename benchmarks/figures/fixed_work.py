"""fixed: a member-epoch's work besides training (recalibration, validation, the state file), measured here and
projected onto a GPU."""

from __future__ import annotations

import logging
import statistics
from pathlib import Path
from typing import Callable


from emnist_cnn.demos import count_device_reads, synthetic_images

from ..harness import FAST_GPU_IMG_S, GPU_IMG_S, LR, Results, Sizes, alternate, new_member

log = logging.getLogger("bench")


def build_fixed_work(members, calib, val, n_val: int, state_path: Path,
                     batch_size: int = 2000) -> dict[str, Callable[[], object]]:
    """A fused group's work besides training in one member-epoch, in the parts `training.members` does it:
    each member recalibrated on `calib`; all validated together on `val` (device copies from `upload_images`;
    `n_val` real images, in batches of `batch_size`); each member's state copied to the host ("snapshot",
    on the epoch's path), then encoded and written by `STATE_WRITERS` threads and put in place ("write",
    which training overlaps with validation). Also used by benchmarks/gpu_check.py."""
    from concurrent.futures import ThreadPoolExecutor

    from emnist_cnn.core.model import build_member_predictor, predict_members, recalibrate_batchnorm
    from emnist_cnn.io.files import write_temp_file
    from emnist_cnn.io.state import encode_member_state, put_member_state, snapshot_member_state
    from emnist_cnn.training.members import STATE_WRITERS

    stacked = build_member_predictor(members)
    state_path.parent.mkdir(parents=True, exist_ok=True)
    paths = [state_path.with_name(f"model_{k}.npz") for k in range(len(members))]
    snapshots: list = []

    def snapshot():
        snapshots[:] = [snapshot_member_state(m, 1, {"seed": 0, "learning_rate": LR}) for m in members]

    def write():
        with ThreadPoolExecutor(min(len(members), STATE_WRITERS)) as pool:
            tmps = list(pool.map(lambda pa: write_temp_file(pa[0], encode_member_state(pa[1])),
                                 zip(paths, snapshots)))
        for path, tmp in zip(paths, tmps):
            put_member_state(path, tmp)

    return {"recalibrate": lambda: [recalibrate_batchnorm(m, calib) for m in members],
            "validate": lambda: predict_members(stacked, val, batch_size=batch_size, count=n_val),
            "snapshot": snapshot, "write": write}


def build_overlapped(parts: dict[str, Callable[[], object]]) -> Callable[[], object]:
    """`build_fixed_work`'s snapshot, validation and state write as training runs them: the write in the
    background while the members are validated."""
    from concurrent.futures import ThreadPoolExecutor

    def run():
        parts["snapshot"]()
        with ThreadPoolExecutor(1) as pool:
            written = pool.submit(parts["write"])
            parts["validate"]()
            written.result()

    return run


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
            f"of {g} (this CPU; the state's write, which training overlaps with validation, counted in full)")
    # On a GPU the compute parts speed up like training does; the state's snapshot and write do not.
    compute_images = (t["recalibrate"] + t["validate"]) * ctx["train_img_s"]
    gpu_epoch = 216_000 / GPU_IMG_S  # EMNIST Digits training images at --val-fraction 0.1
    gpu_fixed = compute_images / GPU_IMG_S + t["snapshot"] + t["write"]
    res.set("epoch_fixed_gpu_share", gpu_fixed / gpu_epoch,
            f"projection: recalibration + validation cost {compute_images:,.0f} training-image equivalents here; "
            f"at an assumed {GPU_IMG_S:,} img/s that is {gpu_fixed:.2f} s with the state's snapshot and write "
            f"(not overlapped), against {gpu_epoch:.1f} s of training per member-epoch")
    val_images_equiv = t["validate"] * ctx["train_img_s"]

    # Blocking device calls (reads back to the host) per member-epoch, at the real sizes; and the host's time:
    # the same calls on 1-image batches, where the device's share is next to nothing (what a fast GPU leaves).
    reads = {name: count_device_reads(parts[name]) / g for name in ("recalibrate", "validate", "snapshot")}
    res.set("fixed_calls_per_member_epoch", sum(reads.values()), f"recalibration on {s.calib_images:,} and "
            f"validation on {s.val_images:,} images, {g} members validated together, the state's snapshot: "
            + ", ".join(f"{k} {v:g}" for k, v in reads.items()) + " (141 before the GPU path's second round: "
            "50 for recalibration's prefix passes, 12 validation batches for each member alone, 79 for the "
            "state, one per variable)")
    tiny, val_calls = 1, -(-s.val_images // 2000)
    small = build_fixed_work(members, upload_images(synthetic_images(tiny, 5), batch_size=None),
                             upload_images(synthetic_images(val_calls * tiny, 6), batch_size=tiny), val_calls * tiny,
                             path, batch_size=tiny)
    for fn in small.values():
        fn()  # trace the small shapes
    host = {name: statistics.median(v) / g for name, v in alternate(small, s.reps).items()}
    # The state's write runs in threads while the device validates: on the epoch's path is only what the
    # device's validation time (its image equivalents at FAST_GPU_IMG_S) does not cover.
    cover = val_images_equiv / FAST_GPU_IMG_S
    host["write"] = max(0.0, host["write"] - cover)
    per_member = sum(host.values())
    fast_epoch = 10 * 216_000 / FAST_GPU_IMG_S
    device = 10 * compute_images / FAST_GPU_IMG_S
    share = (device + 10 * per_member) / (fast_epoch + device + 10 * per_member)
    res.set("fixed_host_ms_per_member_epoch", 1000 * per_member,
            ", ".join(f"{k} {1000 * v:.1f} ms" for k, v in host.items()) + f": the same calls on {tiny}-image "
            f"batches (51-56 ms before the state left the epoch's path; 309 ms before round 2 of the GPU path, on "
            f"8-image batches), the write (with its rename) less the {1000 * cover:.1f} ms of device validation it "
            f"overlaps ({val_images_equiv:,.0f} training-image equivalents). At an assumed {FAST_GPU_IMG_S:,} img/s a "
            f"fused epoch of 10 members trains 2,160,000 images in {fast_epoch:.2f} s; the device's fixed work "
            f"adds {device:.3f} s and the host's {10 * per_member:.3f} s: {share:.1%} of the epoch")
