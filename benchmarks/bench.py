"""Throughput, efficiency and memory figures for emnist_cnn, measured in one process run.

    make bench [ARGS="--quick | --only KEY[,KEY] | --json PATH"]
    .venv/bin/python benchmarks/bench.py [--quick] [--only KEY[,KEY]] [--json PATH]

Every figure is the median of several timed repetitions after an untimed
warm-up. Figures that form a ratio are timed in alternating repetitions (A, B,
A, B, ...) in the same process, so the ratio holds on a noisy shared machine
even when the absolute numbers move. Only the peak resident memory is measured
in a subprocess of its own (a process's peak cannot be reset). The data is
synthetic, of EMNIST Digits' shape; no download happens.

Prints the environment, then one aligned table (key, value, unit, note) and the
targets met or missed; `--json PATH` also writes the figures as one JSON
object (figures at the top level, plus "units", "notes", "targets", "env").
Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import emnist_cnn  # noqa: E402,F401  (selects the Keras backend before keras is imported)
from emnist_cnn.demos import count_device_reads, synthetic_images  # noqa: E402

log = logging.getLogger("bench")

# ----------------------------------------------------------------------------- keys

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
GPU_IMG_S = 20_000  # the README's assumed training speed of one GPU on EMNIST Digits, img/s

NUM_CLASSES = 10
LR = 1e-3
DROPOUT = 0.2
PARAMS = 601_578


@dataclass
class Sizes:
    """How much work each measurement does; --quick shrinks everything."""

    reps: int = 5  # timed repetitions per figure (median taken)
    batch: int = 512
    pool: int = 16_384  # distinct uint8 training images batches are drawn from
    aug_batches: int = 10  # our augmentation: batches per repetition
    ref_batches: int = 2  # reference augmentation: batches per repetition
    train_steps: int = 4  # optimizer steps per repetition (single member)
    torch_steps: int = 3
    bf16_steps: int = 3
    members: int = 10
    ens_steps: int = 1  # steps per member per repetition
    ens_reps: int = 3
    predict_images: int = 2_000  # one predict_probabilities batch per member
    predict_batch: int = 2_000
    predict_reps: int = 3
    sgemm_n: int = 2048
    n_train: int = 240_000  # synthetic EMNIST Digits .mat
    n_test: int = 40_000
    load_reps: int = 3
    rss_steps: int = 20
    tiny_batch: int = 8  # the step-overhead figures: a batch this small is all fixed cost
    tiny_steps: int = 60
    calib_images: int = 10_000  # TrainConfig().bn_recalibration_images
    val_images: int = 24_000  # EMNIST Digits' validation split at --val-fraction 0.1


QUICK = dict(reps=2, batch=64, pool=512, aug_batches=2, ref_batches=1, train_steps=1, torch_steps=1, bf16_steps=1,
             members=2, ens_steps=1, ens_reps=2, predict_images=400, predict_batch=200, predict_reps=2, sgemm_n=256,
             n_train=1_200, n_test=200, load_reps=2, rss_steps=2, tiny_steps=10, calib_images=500, val_images=500)


@dataclass
class Results:
    figures: dict[str, float | None] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    def set(self, key: str, value: float | None, note: str) -> None:
        assert key in KEYS, key
        self.figures[key] = None if value is None else float(value)
        self.notes[key] = note


# ----------------------------------------------------------------------------- timing


def alternate(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, list[float]]:
    """Seconds per call of each function, per repetition: one untimed warm-up call each,
    then `reps` rounds that call every function once, in turn (A, B, A, B, ...)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    for name, ts in times.items():
        log.info("  %-26s %s s per repetition", name, " ".join(f"{t:.3f}" for t in ts))
    return times


def rate(units: float, times: list[float]) -> float:
    """Units per second at the median repetition time."""
    return units / statistics.median(times)


def paired_ratio(num_units: float, num_times: list[float], den_units: float, den_times: list[float]) -> float:
    """Median over rounds of (rate of A / rate of B) from alternating repetitions: a burst of load
    from another process slows both members of a round, so their ratio survives it."""
    return statistics.median((num_units / a) / (den_units / b) for a, b in zip(num_times, den_times))


class Batches:
    """Shuffled index batches over a pool, as `_train_epoch` draws them."""

    def __init__(self, n: int, batch: int, rng: np.random.Generator):
        self.n, self.batch, self.rng = n, batch, rng
        self.perm, self.pos = rng.permutation(n), 0

    def next(self) -> np.ndarray:
        if self.pos + self.batch > self.n:
            self.perm, self.pos = self.rng.permutation(self.n), 0
        idx = self.perm[self.pos : self.pos + self.batch]
        self.pos += self.batch
        return idx


# ----------------------------------------------------------------------------- environment


def cpu_info() -> dict:
    info: dict = {"model": platform.processor() or "unknown", "vendor": "", "family": None, "mhz": None,
                  "flags": set()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "model name":
            info["model"] = value
        elif key == "vendor_id":
            info["vendor"] = value
        elif key == "cpu family":
            info["family"] = int(value)
        elif key == "cpu MHz":
            info["mhz"] = float(value)
        elif key == "flags":
            info["flags"] = set(value.split())
    if info["mhz"] is None:  # no "cpu MHz" line (some ARM kernels): ask lscpu
        try:
            out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
            for line in out.splitlines():
                if line.startswith(("CPU max MHz", "CPU MHz")):
                    info["mhz"] = float(line.split(":")[1])
                    break
        except (OSError, ValueError, subprocess.SubprocessError):
            pass
    try:
        info["cores"] = len(os.sched_getaffinity(0))
    except AttributeError:
        info["cores"] = os.cpu_count() or 1
    return info


def fp32_peak(cpu: dict) -> tuple[float | None, str]:
    """Theoretical fp32 GFLOP/s = cores x GHz x fp32 lanes per FMA x FMA pipes x 2 (an FMA is 2 FLOP).

    Lanes come from the widest vector ISA in the flags, capped by the width of
    the FMA pipes that execute it: AMD Zen 2-4 (families 0x17, 0x19) have two
    256-bit FMA pipes, so Zen 4's AVX-512 runs double-pumped and gives 8 lanes
    per pipe; Zen 5 (0x1A) and Intel AVX-512 server cores are taken as two
    512-bit pipes; other AVX2+FMA cores as two 256-bit pipes.
    """
    flags, mhz, cores = cpu["flags"], cpu["mhz"], cpu["cores"]
    if not mhz:
        return None, "no clock found in /proc/cpuinfo or lscpu"
    isa = 512 if "avx512f" in flags else 256 if "avx2" in flags or "avx" in flags else 128
    fma = "fma" in flags or "avx512f" in flags
    pipes, pipe_bits = 2, isa
    if cpu["vendor"] == "AuthenticAMD" and cpu["family"] in (0x17, 0x19):
        pipe_bits = min(isa, 256)
    lanes = min(isa, pipe_bits) // 32
    per_fma = 2 if fma else 1  # without FMA: count one mul or add per lane per pipe
    peak = cores * mhz / 1000 * lanes * pipes * per_fma
    zen = " (AVX-512 double-pumped on 256-bit pipes)" if isa == 512 and pipe_bits == 256 else ""
    return peak, (f"{cores} cores x {mhz / 1000:.3f} GHz x {lanes} fp32 lanes per FMA{zen} x {pipes} FMA pipes "
                  f"x {per_fma} FLOP/FMA; clock = /proc/cpuinfo 'cpu MHz' (nominal; boost would raise it)")


def environment() -> dict:
    import keras
    import scipy
    import tensorflow as tf

    cpu = cpu_info()
    env = {
        "cpu": cpu["model"], "vendor": cpu["vendor"], "cores": cpu["cores"], "cpu_count": os.cpu_count(),
        "mhz": cpu["mhz"],
        "isa": "avx512f" if "avx512f" in cpu["flags"] else "avx2" if "avx2" in cpu["flags"] else "sse",
        "avx512_bf16": "avx512_bf16" in cpu["flags"],
        "python": platform.python_version(), "numpy": np.__version__, "scipy": scipy.__version__,
        "tensorflow": tf.__version__, "keras": keras.__version__, "backend": keras.backend.backend(),
        "tf_intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "tf_inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
        "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default (on)"),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
        "loadavg_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
    try:
        import torch

        env["torch"] = torch.__version__
    except ImportError:
        env["torch"] = "not installed"
    return env


def print_environment(env: dict) -> None:
    threads = (f"TF intra/inter-op {env['tf_intra_op_threads']}/{env['tf_inter_op_threads']} (0 = one per core), "
               f"OMP_NUM_THREADS {env['omp_num_threads']}, oneDNN {env['onednn']}")
    lines = [
        f"cpu:       {env['cpu']} ({env['vendor']}), {env['cores']} usable cores of {env['cpu_count']}, "
        f"{env['mhz']} MHz, {env['isa']}{', avx512_bf16' if env['avx512_bf16'] else ''}",
        f"software:  python {env['python']}, numpy {env['numpy']}, scipy {env['scipy']}, "
        f"tensorflow {env['tensorflow']}, keras {env['keras']} (backend {env['backend']}), torch {env['torch']}",
        f"threads:   {threads}",
        f"load avg:  {env['loadavg_start']} at start (other processes on the machine skew absolute figures)",
    ]
    print("\n".join(lines), flush=True)


# ----------------------------------------------------------------------------- model helpers


def new_member(seed: int, name: str = "emnist_cnn", cfg=None):
    """A compiled member as `training.members.build_member_model` makes one (default mean/std, dropout 0.2)."""
    import keras

    from emnist_cnn.core.model import build_model, compile_model

    keras.utils.set_random_seed(seed)
    model = build_model(NUM_CLASSES, DROPOUT, cfg=cfg, name=name)
    compile_model(model, LR)
    model.optimizer.build(model.trainable_variables)
    return model


def device_trainer(members, x_u8, aug_cfg, batch: int):
    """The package's compiled step for `members`: training images on the device, augmentation in the graph."""
    from emnist_cnn.core.trainer import DeviceImages, build_device_trainer

    return build_device_trainer(list(members), DeviceImages(x_u8), aug_cfg, batch, LR)


def epoch_steps(trainer, y, n_members: int, batch: int, steps: int, rng) -> Callable[[], None]:
    """`steps` steps of `train_epoch` (the package's epoch loop), each member its own order; logs read once."""
    from emnist_cnn.core.trainer import train_epoch

    def run():
        orders = [rng.choice(len(y), steps * batch, replace=False).astype(np.int32) for _ in range(n_members)]
        train_epoch(trainer, orders, [y[o] for o in orders], batch)

    return run


def repeat(fn: Callable[[], None], n: int) -> Callable[[], None]:
    def run():
        for _ in range(n):
            fn()

    return run


def flops_per_image(model) -> tuple[int, int]:
    """(forward multiply-adds, training FLOPs) per image from the Conv2D/Dense layer shapes.

    Conv2D: output height x width x kernel size (kh*kw*cin*cout); Dense: kernel size.
    BatchNormalization, activations, pooling and the optimizer are elementwise and left out
    (under 1% here). Training = 3 x forward FLOPs by the usual convention: forward, gradient
    w.r.t. the inputs and gradient w.r.t. the weights each cost one forward pass.
    """
    import keras

    macs = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            _, h, w, _ = layer.output.shape
            macs += h * w * int(np.prod(layer.kernel.shape))
        elif isinstance(layer, keras.layers.Dense):
            macs += int(np.prod(layer.kernel.shape))
    return macs, 3 * 2 * macs


# ----------------------------------------------------------------------------- reference augmentation


def _k208_offset_center(matrix: np.ndarray, x: int, y: int) -> np.ndarray:
    # keras 2.0.8 transform_matrix_offset_center: move the origin to the image centre and back.
    o_x, o_y = float(x) / 2 + 0.5, float(y) / 2 + 0.5
    offset = np.array([[1, 0, o_x], [0, 1, o_y], [0, 0, 1]])
    reset = np.array([[1, 0, -o_x], [0, 1, -o_y], [0, 0, 1]])
    return np.dot(np.dot(offset, matrix), reset)


def _k208_apply_transform(x: np.ndarray, matrix: np.ndarray, channel_axis: int, fill_mode: str,
                          cval: float = 0.0) -> np.ndarray:
    # keras 2.0.8 apply_transform: scipy's order-0 (nearest) affine resampling, one channel at a time.
    from scipy import ndimage

    x = np.rollaxis(x, channel_axis, 0)
    affine, offset = matrix[:2, :2], matrix[:2, 2]
    channels = [ndimage.affine_transform(c, affine, offset, order=0, mode=fill_mode, cval=cval) for c in x]
    return np.rollaxis(np.stack(channels, axis=0), 0, channel_axis + 1)


def k208_random_transform(x: np.ndarray, rs: np.random.RandomState, cfg) -> np.ndarray:
    """keras 2.0.8 ImageDataGenerator.random_transform for one channels_first image (1, 28, 28).

    The reference ran Theano (channels_first) with rotation_range=12,
    width/height_shift_range=0.1, shear_range=0.3 (radians in 2.0.x), zoom_range=0.1,
    fill_mode='nearest'; the draws use the legacy global-RandomState API in the same order.
    """
    row_axis, col_axis, channel_axis = 1, 2, 0
    theta = np.pi / 180 * rs.uniform(-cfg.rotation_deg, cfg.rotation_deg)
    tx = rs.uniform(-cfg.shift_frac, cfg.shift_frac) * x.shape[row_axis]  # height_shift_range
    ty = rs.uniform(-cfg.shift_frac, cfg.shift_frac) * x.shape[col_axis]  # width_shift_range
    shear = rs.uniform(-cfg.shear_rad, cfg.shear_rad)
    zx, zy = rs.uniform(cfg.zoom_min, cfg.zoom_max, 2)

    matrix = None
    if theta != 0:
        matrix = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    if tx != 0 or ty != 0:
        shift = np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1]])
        matrix = shift if matrix is None else np.dot(matrix, shift)
    if shear != 0:
        shear_m = np.array([[1, -np.sin(shear), 0], [0, np.cos(shear), 0], [0, 0, 1]])
        matrix = shear_m if matrix is None else np.dot(matrix, shear_m)
    if zx != 1 or zy != 1:
        zoom = np.array([[zx, 0, 0], [0, zy, 0], [0, 0, 1]])
        matrix = zoom if matrix is None else np.dot(matrix, zoom)
    if matrix is not None:
        h, w = x.shape[row_axis], x.shape[col_axis]
        matrix = _k208_offset_center(matrix, h, w)
        x = _k208_apply_transform(x, matrix, channel_axis, fill_mode=cfg.fill_mode)
    return x


def reference_augment_batch(images: np.ndarray, rs: np.random.RandomState, cfg) -> np.ndarray:
    """The reference's batch path (keras 2.0.8 NumpyArrayIterator.next): a Python loop over the
    batch, each float32 image through random_transform. Returns float32 (N, 28, 28, 1)."""
    x = images[:, None].astype(np.float32) * np.float32(1.0 / 255.0)  # the reference's float32 arrays
    batch_x = np.zeros(x.shape, dtype=np.float32)
    for i in range(len(x)):
        batch_x[i] = k208_random_transform(x[i].astype(np.float32), rs, cfg)
    return batch_x.transpose(0, 2, 3, 1)


# ----------------------------------------------------------------------------- groups


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


def bench_torch(res: Results, s: Sizes, ctx: dict) -> None:
    try:
        import torch
    except ImportError:
        note = "torch not installed (.venv/bin/pip install torch==2.13.0 for the CPU wheel)"
        res.set("train_torch_img_s", None, note)
        res.set("keras_vs_torch", None, note)
        return
    import torch.nn.functional as F

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    x, y = ctx["pool"], ctx["labels"]
    y_t = torch.from_numpy(y)
    variants = {}
    for fmt in ("contiguous", "channels_last"):
        model = torch_cnn()
        if fmt == "channels_last":
            model = model.to(memory_format=torch.channels_last)
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=LR, eps=1e-7)  # Keras' Adam epsilon
        rng = np.random.default_rng(3)
        variants[fmt] = (model, opt, Batches(len(y), s.batch, rng))

    def make_step(fmt):
        model, opt, batches = variants[fmt]

        def step():
            idx = batches.next()
            xb = torch.from_numpy(x[idx]).unsqueeze(1).float().mul_(1.0 / 255.0)
            if fmt == "channels_last":
                xb = xb.contiguous(memory_format=torch.channels_last)
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(xb), y_t[idx])
            loss.backward()
            opt.step()
            float(loss)  # loss back to the host, as the Keras step does

        return step

    n_params = count_torch_params(variants["contiguous"][0])
    assert n_params == PARAMS, f"torch CNN has {n_params:,} parameters, Keras' has {PARAMS:,}"
    log.info("torch: %d steps of %d per repetition, %d repetitions, NCHW vs channels_last, %d threads",
             s.torch_steps, s.batch, s.reps, torch.get_num_threads())
    fns = {f"torch {f}": repeat(make_step(f), s.torch_steps) for f in variants}
    fns["keras (augmentation off)"] = epoch_steps(ctx["noaug_trainer"], y, 1, s.batch, s.torch_steps,
                                                  np.random.default_rng(5))
    t = alternate(fns, s.reps)
    n = s.torch_steps * s.batch
    rates = {f: rate(n, t[f"torch {f}"]) for f in variants}
    best = max(rates, key=rates.get)
    other = min(rates, key=rates.get)
    res.set("train_torch_img_s", rates[best],
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, augmentation off, {best} "
            f"(faster; {other} {rates[other]:,.0f}), Adam(eps 1e-7), {n_params:,} params incl. BN running stats")
    keras_rate = rate(n, t["keras (augmentation off)"])
    res.set("keras_vs_torch", paired_ratio(n, t["keras (augmentation off)"], n, t[f"torch {best}"]),
            f"Keras no-aug step / torch, alternated in the same rounds (Keras here {keras_rate:,.0f} img/s)")


def torch_cnn():
    """The reference CNN in plain PyTorch (NCHW), layer for layer as emnist_cnn.core.model.build_model."""
    import torch
    from torch import nn

    from emnist_cnn.config import EMNIST_DIGITS_MEAN, EMNIST_DIGITS_STD

    class Normalize(nn.Module):
        def __init__(self, mean: float, std: float):
            super().__init__()
            self.mean, self.std = mean, std

        def forward(self, t):
            return (t - self.mean) / self.std

    def bn2(c):  # Keras momentum 0.99 is torch momentum 0.01
        return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)

    def bn1(c):
        return nn.BatchNorm1d(c, eps=1e-3, momentum=0.01)

    def act():
        return nn.LeakyReLU(0.3)

    with torch.no_grad():
        return nn.Sequential(
            Normalize(EMNIST_DIGITS_MEAN, EMNIST_DIGITS_STD),
            nn.Conv2d(1, 32, 3), act(), bn2(32),
            nn.Conv2d(32, 32, 3), act(), nn.MaxPool2d(2), bn2(32),
            nn.Conv2d(32, 64, 3), act(), bn2(64),
            nn.Conv2d(64, 64, 3), act(), nn.MaxPool2d(2),
            nn.Flatten(), bn1(1024),
            nn.Linear(1024, 512), act(), bn1(512), nn.Dropout(DROPOUT),
            nn.Linear(512, NUM_CLASSES),  # softmax is inside cross_entropy
        )


def count_torch_params(model) -> int:
    """Parameters plus BatchNorm running mean/variance: what Keras' count_params() counts."""
    from torch import nn

    n = sum(p.numel() for p in model.parameters())
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n += m.running_mean.numel() + m.running_var.numel()
    return n


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


def bench_flops(res: Results, s: Sizes, ctx: dict) -> None:
    macs, train_flops = ctx["flops"]
    peak, formula = fp32_peak(cpu_info())
    a = np.random.default_rng(5).random((s.sgemm_n, s.sgemm_n), dtype=np.float32)
    b = np.random.default_rng(6).random((s.sgemm_n, s.sgemm_n), dtype=np.float32)
    out = np.empty_like(a)
    sgemm_reps = 3 if s.sgemm_n >= 1024 else 20
    log.info("sgemm: numpy %dx%d float32 matmul x %d per repetition, %d repetitions", s.sgemm_n, s.sgemm_n,
             sgemm_reps, s.reps)
    t = alternate({"numpy sgemm": repeat(lambda: np.matmul(a, b, out=out), sgemm_reps)}, s.reps)
    sgemm = rate(sgemm_reps * 2 * s.sgemm_n**3, t["numpy sgemm"]) / 1e9
    noaug = res.figures["train_noaug_img_s"]
    achieved = noaug * train_flops / 1e9
    res.set("gflops_achieved", achieved, f"train_noaug_img_s x {train_flops / 1e6:.1f} MFLOP/img (3 x forward "
            f"{2 * macs / 1e6:.1f} MFLOP = 2 x {macs:,} conv+dense multiply-adds; BN/activations not counted)")
    if peak and sgemm > peak:
        formula += (f"; numpy sgemm beats it, so the cores ran above the nominal clock "
                    f"(>= {sgemm / peak * cpu_info()['mhz'] / 1000:.2f} GHz effective)")
    res.set("gflops_peak", peak, formula)
    res.set("gflops_sgemm", sgemm, f"numpy matmul {s.sgemm_n}x{s.sgemm_n} float32 ({np.__version__}; "
            f"{_blas_name()}): a practical ceiling")
    res.set("peak_fraction", achieved / peak if peak else None,
            f"gflops_achieved / gflops_peak; of the sgemm ceiling: {achieved / sgemm:.0%}")


def _blas_name() -> str:
    try:
        cfg = np.show_config(mode="dicts")
        return cfg["Build Dependencies"]["blas"]["name"]
    except Exception:  # noqa: BLE001 - best effort, varies across numpy versions
        return "BLAS unknown"


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


def bench_compile(res: Results, s: Sizes, ctx: dict) -> None:
    """XLA compilations of one fused trainer's training programs over 3 epochs of several calls and a tail."""
    script = textwrap.dedent("""
        import sys
        import numpy as np
        import emnist_cnn
        from emnist_cnn.config import AugmentConfig
        from emnist_cnn.training.device import LOOP_FORM, STEPS_PER_CALL_GPU
        from emnist_cnn.core.model import build_model, compile_model
        from emnist_cnn.core.trainer import DeviceImages, build_device_trainer, train_epoch
        rng = np.random.default_rng(0)
        batch = 8
        n = batch * (3 * STEPS_PER_CALL_GPU + 1)  # 3 calls and a 1-step tail per epoch
        images = DeviceImages(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        labels = rng.integers(0, 10, n)
        members = [compile_model(build_model(), 1e-3) for _ in range(2)]
        trainer = build_device_trainer(members, images, AugmentConfig(), batch, 1e-3, jit_compile=True)
        for epoch in range(3):
            orders = [rng.permutation(n).astype(np.int32) for _ in members]
            train_epoch(trainer, orders, [labels[o] for o in orders], batch, steps_per_call=STEPS_PER_CALL_GPU,
                        loop=LOOP_FORM)
    """)
    dump = Path(ctx["tmp"]) / "xla-dump"
    env = dict(os.environ, XLA_FLAGS=f"--xla_dump_to={dump}")
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=1200)
    if done.returncode != 0:
        log.warning("compile: the trainer failed: %s", done.stderr[-2000:])
        res.set("xla_compiles_per_trainer", None, "failed")
        return
    from emnist_cnn.training.device import STEPS_PER_CALL_GPU

    # One "before optimizations" file per compilation (a program compiled again writes another).
    compiled = len(list(dump.glob("*.before_optimizations.txt")))
    res.set("xla_compiles_per_trainer", compiled, f"2 fused members, 3 epochs of 3 calls of the GPU's "
            f"{STEPS_PER_CALL_GPU} steps and a 1-step tail, XLA on, on this CPU "
            f"({time.perf_counter() - t0:.0f} s with process start)")


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


def synthetic_mat(ctx: dict, s: Sizes) -> Path:
    """An EMNIST-Digits-sized emnist-digits.mat laid out as NIST's (written once per run)."""
    if "mat_dir" in ctx:
        return ctx["mat_dir"]
    import scipy.io

    d = Path(ctx["tmp"]) / "data"
    d.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def stored(upright: np.ndarray) -> np.ndarray:
        # EMNIST's layout: a 784-pixel row is the upright image read column by column.
        return np.ascontiguousarray(upright.transpose(0, 2, 1)).reshape(len(upright), 784)

    rng = np.random.default_rng(9)
    per_writer = 100
    train = {
        "images": stored(synthetic_images(s.n_train, 10)),
        "labels": (np.arange(s.n_train) % NUM_CLASSES).astype(np.uint8).reshape(-1, 1),
        "writers": (np.arange(s.n_train) // per_writer).astype(np.uint16).reshape(-1, 1),
    }
    test = {
        "images": stored(synthetic_images(s.n_test, 11)),
        "labels": rng.permutation(np.arange(s.n_test) % NUM_CLASSES).astype(np.uint8).reshape(-1, 1),
        "writers": np.zeros((s.n_test, 1), np.uint16),
    }
    mapping = np.array([[i, 48 + i] for i in range(NUM_CLASSES)], np.uint8)
    scipy.io.savemat(d / "emnist-digits.mat", {"dataset": {"train": train, "test": test, "mapping": mapping}})
    del train, test
    size = (d / "emnist-digits.mat").stat().st_size
    log.info("wrote a synthetic emnist-digits.mat (%d + %d images, %.0f MB) in %.1f s", s.n_train, s.n_test,
             size / 1e6, time.perf_counter() - t0)
    ctx["mat_dir"] = d
    return d


def bench_load(res: Results, s: Sizes, ctx: dict) -> None:
    from emnist_cnn.io.datasets import load_dataset

    d = synthetic_mat(ctx, s)
    caches = Path(ctx["tmp"]) / "load-caches"
    old = os.environ.get("EMNIST_CNN_CACHE")
    counter = iter(range(10**6))
    first_cache: list[Path] = []

    def cold():
        cache = caches / f"cold-{next(counter)}"  # empty every time: decode, fingerprint, write the cache
        os.environ["EMNIST_CNN_CACHE"] = str(cache)
        ds = load_dataset("emnist-digits", d)
        assert not isinstance(ds.x_train, np.memmap)
        if not first_cache:
            first_cache.append(cache)
        else:
            shutil.rmtree(cache, ignore_errors=True)

    def warm():
        os.environ["EMNIST_CNN_CACHE"] = str(first_cache[0])
        ds = load_dataset("emnist-digits", d)
        assert isinstance(ds.x_train, np.memmap), "reopen did not come from the cache"

    try:
        log.info("load: %d cold .mat loads and %d cache reopens", s.load_reps, s.load_reps)
        tc = alternate({"cold .mat": cold}, s.load_reps)
        tw = alternate({"cache reopen": warm}, max(s.load_reps, 5))
    finally:
        if old is None:
            os.environ.pop("EMNIST_CNN_CACHE", None)
        else:
            os.environ["EMNIST_CNN_CACHE"] = old
        shutil.rmtree(caches, ignore_errors=True)
    what = f"{s.n_train:,} + {s.n_test:,} images"
    res.set("mat_load_s", statistics.median(tc["cold .mat"]),
            f"load_dataset, empty EMNIST_CNN_CACHE: loadmat + upright + fingerprint + cache write, {what} "
            "(file in the OS page cache)")
    res.set("cache_load_s", statistics.median(tw["cache reopen"]),
            "load_dataset again: memory-mapped .npy from the decoded cache (pages are read on first use)")


def bench_memory(res: Results, s: Sizes, ctx: dict) -> None:
    d = synthetic_mat(ctx, s)
    cache = Path(ctx["tmp"]) / "rss-cache"
    env = dict(os.environ, EMNIST_CNN_CACHE=str(cache))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--rss-child", str(d), "--rss-steps", str(s.rss_steps)]
    # Linux keeps a process's ru_maxrss across exec, and a child started straight from this
    # (large) process starts with our peak (vfork shares our memory until exec; fork copies
    # its page counts). A shell that forks the child from its own small image gives the
    # child a clean count; the trailing `exit` stops sh from exec'ing python in place.
    cmd = ["/bin/sh", "-c", shlex.join(cmd) + "; exit $?"]
    log.info("peak RSS: subprocess with %d training steps (cold .mat load, empty cache)", s.rss_steps)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"peak-RSS subprocess failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    for phase, (mib, secs) in child["phases"].items():
        log.info("  %-12s max RSS %6.0f MiB, %5.1f s", phase, mib, secs)
    phases = ", ".join(f"{k} {v[0]:,.0f}" for k, v in child["phases"].items())
    res.set("peak_rss_mb", child["peak_rss_mb"], f"ru_maxrss of a subprocess: load_dataset (.mat, empty cache) + "
            f"prepare_data(TrainConfig()) + {s.rss_steps} steps + BN recalibration + val predict "
            f"({time.perf_counter() - t0:.0f} s); max MiB after {phases}; VmHWM {child['vmhwm_mb']:,.0f}")


def rss_child(mat_dir: str, steps: int) -> None:
    """Runs in the peak-RSS subprocess: the memory path of one member's epoch on EMNIST-sized data."""
    started = time.perf_counter()
    from emnist_cnn.config import TrainConfig
    from emnist_cnn.core.trainer import DeviceImages, build_device_trainer, train_epoch
    from emnist_cnn.io.datasets import load_dataset
    from emnist_cnn.core.model import build_model, compile_model, predict_probabilities, recalibrate_batchnorm
    from emnist_cnn.training.prepare import prepare_data

    def maxrss_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB

    phases: dict[str, tuple[float, float]] = {}
    clock = [started]

    def mark(name: str) -> None:
        now = time.perf_counter()
        phases[name] = (maxrss_mb(), now - clock[0])
        clock[0] = now

    mark("import")
    config = TrainConfig(dataset="emnist-digits")
    dataset = load_dataset("emnist-digits", mat_dir)
    mark("load")
    data = prepare_data(config, dataset)
    del dataset
    mark("prepare")
    model = build_model(data.num_classes, config.dropouts[0], data.mean, data.std, config.model)
    compile_model(model, config.lr)
    trainer = build_device_trainer([model], DeviceImages(data.x_train), config.augment, config.batch_size, config.lr)
    order = np.random.default_rng(0).permutation(len(data.y_train))[: steps * config.batch_size].astype(np.int32)
    train_epoch(trainer, [order], [data.y_train[order]], config.batch_size)
    mark("train")
    n_cal = min(config.bn_recalibration_images, len(data.y_train))
    calib = data.x_train[np.sort(np.random.default_rng(1).choice(len(data.y_train), n_cal, replace=False))]
    recalibrate_batchnorm(model, calib)
    mark("recalibrate")
    predict_probabilities(model, data.x_val)
    mark("val predict")
    try:  # the kernel's high-water mark of this process image, as a cross-check
        status = Path("/proc/self/status").read_text()
        vmhwm = float(status.split("VmHWM:")[1].split()[0]) / 1024
    except (OSError, IndexError, ValueError):
        vmhwm = float("nan")
    print(json.dumps({"peak_rss_mb": maxrss_mb(), "vmhwm_mb": vmhwm, "phases": phases}))


GROUPS: dict[str, Callable[[Results, Sizes, dict], None]] = {
    "aug": bench_aug, "train": bench_train, "torch": bench_torch, "bf16": bench_bf16, "flops": bench_flops,
    "ensemble": bench_ensemble, "predict": bench_predict, "step": bench_step, "fixed": bench_fixed,
    "compile": bench_compile,
    "load": bench_load, "memory": bench_memory,
}


# ----------------------------------------------------------------------------- output


def fmt_value(key: str, value: float | None) -> str:
    if value is None:
        return "null"
    unit = KEYS[key][0]
    if unit in ("img/s", "MiB"):
        return f"{value:,.0f}"
    if unit == "GFLOP/s":
        return f"{value:,.1f}"
    if unit == "s":
        return f"{value:.3f}"
    if unit in ("of peak", "of epoch"):
        return f"{value:.1%}"
    return f"{value:.2f}"


def target_status(key: str, value: float | None) -> dict:
    op, threshold, what = TARGETS[key]
    met = None if value is None else (value >= threshold if op == ">=" else value < threshold)
    return {"target": f"{op} {threshold:g}", "met": met, "what": what}


def print_table(res: Results) -> None:
    keys = [k for k in KEYS if k in res.figures]
    rows = [(k, fmt_value(k, res.figures[k]), KEYS[k][0], res.notes.get(k, "")) for k in keys]
    head = ("key", "value", "unit", "note")
    w = [max(len(r[i]) for r in rows + [head]) for i in range(3)]
    print(f"{head[0]:<{w[0]}}  {head[1]:>{w[1]}}  {head[2]:<{w[2]}}  {head[3]}")
    print(f"{'-' * w[0]}  {'-' * w[1]}  {'-' * w[2]}  {'-' * 4}")
    for k, v, u, n in rows:
        print(f"{k:<{w[0]}}  {v:>{w[1]}}  {u:<{w[2]}}  {n}")
    targets = [k for k in TARGETS if k in res.figures]
    if targets:
        print("\ntargets:")
        for k in targets:
            st = target_status(k, res.figures[k])
            verdict = {True: "met", False: "NOT met", None: "not measured"}[st["met"]]
            print(f"  {k:<{w[0]}} {st['target']:<8} {verdict:<12} {st['what']}")


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="keys: " + ", ".join(KEYS))
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes and 2 repetitions, for a smoke test; figures are not meaningful (default: off)")
    p.add_argument("--only", metavar="KEY[,KEY]", default=None,
                   help="measure only these keys (and the figures they are computed from) (default: all keys)")
    p.add_argument("--json", metavar="PATH", default=None,
                   help="also write the figures as one JSON object to PATH (default: none, table only)")
    p.add_argument("--reps", type=int, default=None,
                   help="timed repetitions per figure, median reported (default: 5, 2 with --quick; "
                        "3 for the ensemble, predict and .mat figures)")
    p.add_argument("--members", type=int, default=None,
                   help="ensemble members for the ensemble and predict figures (default: 10, 2 with --quick)")
    p.add_argument("--predict-images", type=int, default=None,
                   help="images predicted per repetition by the whole ensemble (default: 2000, 400 with --quick)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging (default: off)")
    p.add_argument("--rss-child", metavar="DIR", default=None, help=argparse.SUPPRESS)
    p.add_argument("--rss-steps", type=int, default=20, help=argparse.SUPPRESS)
    return p


def selected_groups(only: str | None) -> tuple[list[str], list[str] | None]:
    if not only:
        return list(GROUP_ORDER), None
    wanted = [k.strip() for k in only.split(",") if k.strip()]
    unknown = [k for k in wanted if k not in KEYS]
    if unknown:
        raise SystemExit(f"--only: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(KEYS)}")
    groups = {KEYS[k][1] for k in wanted}
    for g in list(groups):
        groups.update(DEPENDS.get(g, []))
    return [g for g in GROUP_ORDER if g in groups], wanted


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.rss_child:
        rss_child(args.rss_child, args.rss_steps)
        return 0
    start = time.perf_counter()
    groups, wanted = selected_groups(args.only)
    sizes = Sizes(**QUICK) if args.quick else Sizes()
    if args.reps is not None:
        sizes.reps = sizes.ens_reps = sizes.predict_reps = sizes.load_reps = max(1, args.reps)
    if args.members is not None:
        sizes.members = max(1, args.members)
    if args.predict_images is not None:
        sizes.predict_images = max(1, args.predict_images)
    sizes.predict_batch = min(sizes.predict_batch, sizes.predict_images)

    env = environment()
    print_environment(env)
    res = Results()
    tmp = tempfile.mkdtemp(prefix="emnist-bench-")
    ctx: dict = {"tmp": tmp}
    try:
        if set(groups) - {"load", "memory"}:
            ctx["pool"] = synthetic_images(sizes.pool, 0)
            ctx["labels"] = np.random.default_rng(0).integers(0, NUM_CLASSES, sizes.pool).astype(np.int64)
            ctx["test_pool"] = synthetic_images(sizes.predict_images, 1)
        for g in groups:
            t0 = time.perf_counter()
            log.info("[%s]", g)
            GROUPS[g](res, sizes, ctx)
            log.info("[%s] done in %.1f s", g, time.perf_counter() - t0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.perf_counter() - start
    env["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print()
    print_table(res)
    print(f"\n{'quick ' if args.quick else ''}run: {elapsed:.0f} s; load avg at end {env['loadavg_end']}")
    if wanted:
        log.debug("asked for %s; also shown: the figures they are computed from", ", ".join(wanted))
    if args.json:
        out = dict(res.figures)
        out["units"] = {k: KEYS[k][0] for k in res.figures}
        out["notes"] = dict(res.notes)
        out["targets"] = {k: target_status(k, res.figures[k]) for k in TARGETS if k in res.figures}
        out["env"] = env
        out["quick"] = args.quick
        out["elapsed_s"] = elapsed
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
        log.info("wrote %s", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
