"""The measuring harness shared by the figure groups: sizes, alternating timed repetitions, the environment,
a compiled member and its training steps, the printed table, and the dated results files."""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

import emnist_cnn  # noqa: F401  (selects the Keras backend before keras is imported)
from emnist_cnn.io.files import atomic_write_text

from .keys import KEYS, TARGETS

log = logging.getLogger("bench")


GPU_IMG_S = 20_000  # the README's assumed training speed of one GPU on EMNIST Digits, img/s
FAST_GPU_IMG_S = 500_000  # an H100-class GPU at about 30 TFLOP/s on 61.4 MFLOP an image, img/s (fused members)

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

def repeat(fn: Callable[[], None], n: int) -> Callable[[], None]:
    def run():
        for _ in range(n):
            fn()

    return run

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
        "isa": isa_name(cpu["flags"]),
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


RESULTS_DIR = Path(__file__).resolve().parent / "results"


def isa_name(flags) -> str:
    """The widest vector instruction set among a CPU's flags, as the results name it."""
    return "avx512f" if "avx512f" in flags else "avx2" if "avx2" in flags else "sse"


def dated_results_path(name: str) -> Path:
    """benchmarks/results/<UTC date>-<name>-<isa>-<cores>cores.json: one file per benchmark, machine kind and day."""
    cpu = cpu_info()
    day = time.strftime("%Y-%m-%d", time.gmtime())
    return RESULTS_DIR / f"{day}-{name}-{isa_name(cpu['flags'])}-{cpu['cores']}cores.json"


def save_results(path: Path, results: dict) -> Path:
    """Write a benchmark's figures (with their units, notes and environment) as one JSON object."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(results, indent=1) + "\n")
    log.info("wrote %s", path)
    return path
