"""What training a sweep's members as Ray tasks costs, against the same work in one local process.

    .venv/bin/python -m benchmarks.scaleout [--members 2] [--epochs 3] [--images 1200] [--gpu-img-s 20000]

Trains the same tiny sweep (synthetic digits, one dropout rate, a checkpoint
every epoch, 1 thread per training process) twice through the command line:
locally, then with `--ray` on a one-node Ray cluster of 1 CPU started here, so
both train one member at a time and the difference is Ray's. Prints the wall
times, the overhead per member segment (task start, Keras import on a fresh
worker, model build, state load, data from the object store), and what that
overhead is against a 16-epoch segment at an assumed GPU speed, with the
projected wall time of the full protocol on N GPUs. Needs the `ray` extra.
"""

from __future__ import annotations

import argparse
import gzip
import os
import re
import secrets
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# The full reference protocol: 4 dropout rates x 10 members x 256 epochs, checkpoints every 16 epochs,
# on EMNIST Digits' 240,000 training images less the 10% validation split.
FULL_MEMBERS = 40
FULL_EPOCHS = 256
SEGMENT_EPOCHS = 16
TRAIN_IMAGES = 216_000


def write_digits(folder: Path, n_train: int, n_test: int) -> Path:
    """Synthetic learnable digits as MNIST idx files (a stroke pattern per class, jittered)."""
    rng = np.random.default_rng(0)
    templates = (rng.random((10, 28, 28)) > 0.8).astype(np.float32)

    def draw(n):
        y = rng.integers(0, 10, n).astype(np.uint8)
        x = np.clip(templates[y] * 200 + rng.normal(0, 30, (n, 28, 28)), 0, 255).astype(np.uint8)
        return x, y

    folder.mkdir(parents=True, exist_ok=True)
    for prefix, (x, y) in (("train", draw(n_train)), ("t10k", draw(n_test))):
        with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">IIII", 2051, len(x), 28, 28) + x.tobytes())
        with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">II", 2049, len(y)) + y.tobytes())
    return folder


def train(run: Path, data: Path, args, *extra: str) -> tuple[float, str]:
    """One `emnist-cnn train` of the sweep; (wall seconds, what it logged)."""
    cmd = [sys.executable, "-m", "emnist_cnn", "train", "--run-dir", str(run), "--data-dir", str(data),
           "--dataset", "mnist", "--dropout", "0.2", "--models", str(args.members), "--epochs", str(args.epochs),
           "--checkpoint-every", "1", "--batch-size", "64", "--bn-recalibration", "200", "--threads", "1",
           "--quiet", *extra]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"scaleout bench: {' '.join(cmd[3:5])} failed: {r.stderr.strip().splitlines()[-1:]}")
    return wall, r.stderr


def epoch_seconds(run: Path, members: int) -> dict[tuple[int, int], float]:
    """(member, epoch) -> the seconds the history records for that epoch's training and validation."""
    out = {}
    for i in range(members):
        lines = (run / "dropout_0.2" / "history" / f"model_{i}.csv").read_text().splitlines()
        cols = lines[0].split(",")
        for line in lines[1:]:
            row = dict(zip(cols, line.split(",")))
            out[(i, int(row["epoch"]))] = float(row["seconds"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--members", type=int, default=2, help="members of the tiny sweep (default: 2)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per member, one segment each (default: 3)")
    p.add_argument("--images", type=int, default=1200, help="synthetic training images (default: 1200)")
    p.add_argument("--gpu-img-s", type=float, default=20_000,
                   help="ASSUMED training images/s one GPU sustains for this CNN, all its members together; "
                        "not measured here (default: 20000)")
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 4, 10], help="GPU counts to project (default: 1 4 10)")
    args = p.parse_args()
    try:
        import ray  # noqa: F401
    except ImportError:
        sys.exit("scaleout bench: needs Ray: pip install -e '.[ray]'")

    root = Path(tempfile.mkdtemp(prefix="emnist-scaleout-bench-"))
    ray_bin = Path(sys.executable).with_name("ray")
    # Token authentication on, with a token of this run only (the user's ~/.ray is left alone); the
    # driver subprocess inherits it.
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    env = dict(os.environ)
    try:
        data = write_digits(root / "data", args.images, 200)
        print(f"sweep: 1 dropout rate x {args.members} members x {args.epochs} epochs of "
              f"{int(args.images * 0.9)} images, 1 thread per process", file=sys.stderr)
        local_wall, _ = train(root / "local", data, args)
        port = 6380 + os.getpid() % 1000
        subprocess.run([str(ray_bin), "start", "--head", "--num-cpus", "1", "--port", str(port),
                        "--node-ip-address", "127.0.0.1", "--include-dashboard", "false", "--disable-usage-stats"],
                       check=True, capture_output=True, env=env)
        try:
            ray_wall, log = train(root / "ray", data, args, "--ray", f"127.0.0.1:{port}")
        finally:
            subprocess.run([str(ray_bin), "stop", "--force"], capture_output=True, env=env)
    finally:
        shutil.rmtree(root / "data", ignore_errors=True)

    # Per segment: the task's wall time less the epoch it trained (as its history records it).
    trained = epoch_seconds(root / "ray", args.members)
    startup = []
    for m in re.finditer(r"model (\d+): epochs (\d+)-(\d+), .*?, ([\d.]+) s on", log):
        i, first, last, secs = int(m[1]), int(m[2]), int(m[3]), float(m[4])
        startup.append(secs - sum(trained[(i, e)] for e in range(first, last + 1)))
    segments = args.members * args.epochs
    per_segment = (ray_wall - local_wall) / segments
    shutil.rmtree(root, ignore_errors=True)

    seg_gpu = SEGMENT_EPOCHS * TRAIN_IMAGES / (args.gpu_img_s / 4)  # four members share a GPU
    rows = [
        ("local_wall_s", local_wall, "s", "the sweep in one process (1 thread)"),
        ("ray_wall_s", ray_wall, "s", "the same sweep as Ray tasks on a 1-CPU node (cluster start not counted)"),
        ("ray_overhead_per_segment_s", per_segment, "s", f"(ray - local) / {segments} segments"),
        ("task_startup_first_s", startup[0] if startup else float("nan"), "s",
         "in-task time besides training, a fresh worker (Keras import, build, state, data)"),
        ("task_startup_reused_s", statistics.median(startup[1:]) if len(startup) > 1 else float("nan"), "s",
         "the same on a worker that already ran a task (median)"),
        ("gpu_segment_s", seg_gpu, "s", f"one member's {SEGMENT_EPOCHS}-epoch segment at an assumed "
         f"{args.gpu_img_s:,.0f} img/s per GPU shared by 4 members"),
        ("overhead_vs_gpu_segment", per_segment / seg_gpu, "x", "Ray's per-segment overhead against that segment"),
    ]
    for n in args.gpus:
        train_s = FULL_MEMBERS * FULL_EPOCHS * TRAIN_IMAGES / (n * args.gpu_img_s)
        # Each member's 16 segments are serial; the overhead adds to every one of them on the critical path.
        total = train_s + (FULL_EPOCHS // SEGMENT_EPOCHS) * max(per_segment, 0) * max(1, FULL_MEMBERS // (4 * n))
        rows.append((f"full_protocol_{n}_gpu_h", total / 3600, "h",
                     f"40 x 256 epochs on {n} GPU(s), 4 members per GPU, assumed speed, plus overhead"))
    width = max(len(r[0]) for r in rows)
    print(f"{'key':<{width}}  {'value':>10}  unit  note")
    for key, value, unit, note in rows:
        print(f"{key:<{width}}  {value:>10.3f}  {unit:<4}  {note}")


if __name__ == "__main__":
    main()
