"""What live tracking costs: TensorBoard event files and an MLflow server, against the training they follow.

    .venv/bin/python -m benchmarks.tracking [--members 2] [--epochs 4] [--images 6000] [--gpu-img-s 20000]
                                            [--json PATH]

Starts `mlflow server` (sqlite backend) on 127.0.0.1, trains a small sweep on
the real MNIST digits in ../shared (synthetic digits without it) with both
sinks on, and prints the time spent in tracking calls: in all, per member-epoch
call (that member's history row to both sinks), per checkpoint call (errors
and TensorBoard's image grids), and per sink; then each against the training it
follows, here and at an assumed GPU speed on EMNIST Digits. Needs the `mlflow`
extra.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from .harness import GPU_IMG_S, dated_results_path, save_results
from .scaleout import write_digits  # the same synthetic digits

ROOT = Path(__file__).resolve().parents[1]

MNIST = ROOT.parent / "shared" / "data" / "mnist"
EMNIST_TRAIN_IMAGES = 216_000  # EMNIST Digits' training set less the 10% validation split


class Captured(logging.Handler):
    """Keeps the tracker's closing record, which carries its timings."""

    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        if hasattr(record, "timings"):
            self.records.append(record)


def start_mlflow(root: Path) -> tuple[subprocess.Popen, str]:
    """`mlflow server` on a port of its own choosing (--port 0), found in its log."""
    log_path = root / "server.log"
    proc = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri",
                             f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
                             "--host", "127.0.0.1", "--port", "0", "--workers", "1"],
                            stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        found = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", log_path.read_text(errors="replace"))
        try:
            if found:
                with urllib.request.urlopen(f"{found.group(1)}/health", timeout=2):
                    return proc, found.group(1)
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("mlflow server did not start in 120 s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--members", type=int, default=2, help="members of the one dropout rate (default: 2)")
    ap.add_argument("--epochs", type=int, default=4, help="epochs per member, a checkpoint every 2 (default: 4)")
    ap.add_argument("--images", type=int, default=6000, help="training images, before the split (default: 6000)")
    ap.add_argument("--gpu-img-s", type=float, default=GPU_IMG_S,
                    help=f"assumed training speed of one member on a GPU, images/s (default: {GPU_IMG_S})")
    ap.add_argument("--json", type=Path, default=None,
                    help="write the figures here (default: benchmarks/results/DATE-tracking-ISA-Ncores.json)")
    args = ap.parse_args()

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import emnist_cnn  # noqa: F401  (selects the backend)
    from emnist_cnn.config import DataSource, TrackingConfig, TrainConfig, TrainOptions
    from emnist_cnn.training.train import train_and_evaluate

    with tempfile.TemporaryDirectory(prefix="emnist-cnn-tracking-") as tmp:
        tmp = Path(tmp)
        data = MNIST if MNIST.is_dir() else write_digits(tmp / "digits", 10_000, 2_000)
        server, url = start_mlflow(tmp)
        try:
            config = TrainConfig(dataset="mnist", dropouts=(0.2,), models=args.members, epochs=args.epochs,
                                 checkpoint_every=2, batch_size=128, limit_train=args.images,
                                 bn_recalibration_images=2000)
            captured = Captured()
            logging.getLogger("emnist_cnn").addHandler(captured)
            logging.getLogger("emnist_cnn").setLevel(logging.INFO)
            t0 = time.perf_counter()
            train_and_evaluate(config, tmp / "run", DataSource(data_dir=data),
                               TrainOptions(verbose=0, tracking=TrackingConfig(mlflow_uri=url)))
            wall = time.perf_counter() - t0
        finally:
            server.kill()
            server.wait()
    record = captured.records[-1]
    timings, sinks = record.timings, record.sink_seconds
    tracked = sum(sum(v) for v in timings.values())
    epoch_ms = 1000 * statistics.median(timings["epoch"])
    ckpt_ms = 1000 * statistics.median(timings.get("checkpoint", [0.0]))
    member_epoch_s = (wall - tracked) / (args.members * args.epochs)
    gpu_epoch_s = EMNIST_TRAIN_IMAGES / args.gpu_img_s
    figures = {
        "wall_s": round(wall, 2), "tracking_s": round(tracked, 3), "tracking_share_pct": round(100 * tracked / wall, 3),
        "epoch_call_ms": round(epoch_ms, 1), "checkpoint_call_ms": round(ckpt_ms, 1),
        "calls": {k: len(v) for k, v in timings.items()},
        "sink_s": {k: round(v, 3) for k, v in sinks.items()},
        "member_epoch_s_here": round(member_epoch_s, 2),
        "epoch_call_share_here_pct": round(100 * epoch_ms / 1000 / member_epoch_s, 3),
        "gpu_member_epoch_s": round(gpu_epoch_s, 2),
        "epoch_call_share_gpu_pct": round(100 * epoch_ms / 1000 / gpu_epoch_s, 3),
    }
    print(f"sweep: {args.members} members x {args.epochs} epochs on {args.images} images ({data.name}), "
          f"TensorBoard + MLflow at {url}")
    print(f"wall {wall:.1f} s, tracking {tracked:.2f} s in {sum(figures['calls'].values())} calls "
          f"({figures['tracking_share_pct']:.2f}% of the run)")
    print(f"per member-epoch call: {epoch_ms:.1f} ms (median); per checkpoint call (with image grids): "
          f"{ckpt_ms:.1f} ms; by sink: " + ", ".join(f"{k} {v:.2f} s" for k, v in sinks.items()))
    print(f"a member-epoch call against a member-epoch: {figures['epoch_call_share_here_pct']:.2f}% here "
          f"({member_epoch_s:.1f} s), {figures['epoch_call_share_gpu_pct']:.2f}% on EMNIST Digits at an assumed "
          f"{args.gpu_img_s:,.0f} img/s per GPU ({gpu_epoch_s:.1f} s)")
    print(f"wrote {save_results(args.json or dated_results_path('tracking'), figures)}")


if __name__ == "__main__":
    main()
