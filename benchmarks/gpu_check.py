"""The GPU check: what the device-fed path does on one GPU, measured in at most 9 minutes with no network.

Run by `benchmarks/gpu_check.sh` (which installs carried wheels and picks the backend); `--device cpu`
with small sizes is the dry run the test suite makes, so this script cannot rot unseen. Every figure comes
from `emnist-cnn train` runs on synthetic EMNIST-sized data made here (learnable: a stroke pattern per
class, jittered), each in a process of its own, as a user would run it:

  fused    float32, every member in one step: the start-up line, the training step's compile time,
           XLA compilations, steady img/s (epochs after the first), GPU utilisation from nvidia-smi
  unfused  the same, one member at a time
  fixed    a member-epoch's work besides training (recalibration, validation, the state's snapshot and
           write) at these sizes: blocking calls and milliseconds, and validation with the write overlapped
  bf16     the fused run with --precision mixed_bfloat16: img/s and validation error against float32
  resume   the fused run killed (SIGKILL) once every member has finished epoch 1, then resumed: its
           final weights and validation error against the uninterrupted fused run
  steps1   the fused run at one step per call, against the default's img/s (is 16 per call worth it?)

Results land in OUT/gpu_check.json (figures) and OUT/gpu_check.txt (the same, one line each), written
after every phase, so a run cut short keeps what it measured. The parent process imports no backend:
each phase's process has the GPU to itself.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

DROPOUT = 0.3
SIZES = {  # images, members and epochs per device; the GPU's: EMNIST Digits' sizes, 10 members
    "gpu": dict(train=240_000, test=40_000, models=10, unfused_models=2, epochs=2, calibration=10_000),
    "cpu": dict(train=600, test=100, models=2, unfused_models=1, epochs=2, calibration=100),
}


def write_synthetic_digits(folder: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """MNIST-format gzip idx files of learnable synthetic digits: a stroke pattern per class, shifted by up to
    2 pixels, with noise."""
    rng = np.random.default_rng(seed)
    templates = np.zeros((10, 32, 32), np.float32)  # 2 pixels of margin around 28 x 28 for the shifts
    for c in range(10):
        for _ in range(3):
            r, col = rng.integers(8, 24, size=2)
            dr, dc = rng.integers(-1, 2, size=2)
            for t in range(8):
                rr, cc = np.clip(r + t * dr, 4, 27), np.clip(col + t * dc, 4, 27)
                templates[c, rr - 1 : rr + 2, cc - 1 : cc + 2] = 1.0

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.permutation(np.arange(n) % 10).astype(np.uint8)
        dy, dx = rng.integers(0, 5, size=(2, n))
        rows = dy[:, None] + np.arange(28)[None, :]
        cols = dx[:, None] + np.arange(28)[None, :]
        x = templates[y[:, None, None], rows[:, :, None], cols[:, None, :]]
        x = np.clip(x + rng.normal(0, 0.1, x.shape).astype(np.float32), 0, 1)
        return (x * 255).astype(np.uint8), y

    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x, y = draw(n)
        with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb", compresslevel=1) as f:
            f.write(struct.pack(">IIII", 2051, n, 28, 28) + x.tobytes())
        with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb", compresslevel=1) as f:
            f.write(struct.pack(">II", 2049, n) + y.tobytes())
    return folder


class GpuSampler:
    """`nvidia-smi` utilisation and memory samples every 200 ms, in a thread, with their times."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float, float]] = []  # (time, utilisation %, memory MiB)
        self.proc = None
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                                          "--format=csv,noheader,nounits", "-lms", "200"],
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                util, mem = (float(v) for v in line.split(",")[:2])
            except ValueError:
                continue
            self.samples.append((time.time(), util, mem))

    def between(self, t0: float, t1: float) -> dict | None:
        inside = [(u, m) for t, u, m in self.samples if t0 <= t <= t1]
        if not inside:
            return None
        return {"gpu_util_mean_pct": statistics.mean(u for u, _ in inside),
                "gpu_util_median_pct": statistics.median(u for u, _ in inside),
                "gpu_memory_max_mib": max(m for _, m in inside), "samples": len(inside)}

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()


class Check:
    """The phases, their figures, and the report written after each."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(args.work)
        self.sizes = dict(SIZES[args.device])
        self.sizes.update({k: v for k, v in vars(args).items() if k in self.sizes and v is not None})
        self.deadline = time.monotonic() + args.budget
        self.results: dict = {"device": args.device, "sizes": self.sizes, "phases": {}}
        self.sampler = GpuSampler() if args.device == "gpu" else None

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "gpu_check.json").write_text(json.dumps(self.results, indent=1, default=str) + "\n")
        lines = [f"device {self.args.device}, sizes {self.sizes}"]
        for name, figures in self.results["phases"].items():
            lines += [f"{name}: " + "; ".join(f"{k} {_fmt(v)}" for k, v in figures.items()
                                              if k not in ("xla_module_names",))]
        (self.out / "gpu_check.txt").write_text("\n".join(lines) + "\n")

    def train_argv(self, run: Path, models: int, *extra: str) -> list[str]:
        s = self.sizes
        return [sys.executable, "-m", "emnist_cnn", "train", "--run-dir", str(run), "--dataset", "mnist",
                "--data-dir", str(self.work / "data"), "--no-download", "--models", str(models),
                "--dropout", str(DROPOUT), "--epochs", str(s["epochs"]), "--checkpoint-every", str(s["epochs"]),
                "--bn-recalibration", str(s["calibration"]), "--seed", "0", "--device", self.args.device, *extra]

    def run_phase(self, name: str, argv: list[str], kill_after_epoch: int | None = None,
                  env: dict | None = None) -> dict:
        """One process; its console output into OUT/NAME.log. With `kill_after_epoch`, SIGKILL once every
        member has recorded that epoch. Figures: wall time, return code, XLA compilations, utilisation."""
        dump = self.work / f"xla-{name}"
        shutil.rmtree(dump, ignore_errors=True)
        full_env = dict(os.environ, **(env or {}))
        full_env["XLA_FLAGS"] = (full_env.get("XLA_FLAGS", "") + f" --xla_dump_to={dump}").strip()
        full_env["PYTHONUNBUFFERED"] = "1"
        log_path = self.out / f"{name}.log"
        t0, wall0 = time.monotonic(), time.time()
        killed = False
        with open(log_path, "w") as log_file:
            proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, env=full_env, cwd=self.work)
            while proc.poll() is None:
                if self.left() < 0:
                    proc.kill()
                    break
                if kill_after_epoch is not None and self._all_recorded(argv, log_path, kill_after_epoch):
                    proc.send_signal(signal.SIGKILL)
                    killed = True
                    break
                time.sleep(0.05)
            rc = proc.wait()
        text = log_path.read_text(errors="replace")
        names = [p.name.split(".")[1] for p in dump.glob("*.before_optimizations.txt")] if dump.exists() else []
        training = [n for n in names if n in ("jit_step", "jit_run") or (n.startswith("a_inference_")
                                                                          and "one_step_on_data" not in n)]
        figures = {"rc": rc, "killed": killed, "timed_out": self.left() < 0, "wall_s": time.monotonic() - t0,
                   "xla_compilations": len(names), "xla_training_programs": len(training),
                   "xla_module_names": collections.Counter(names).most_common(12)}
        epochs = sorted({int(w.split("/")[0]) for line in text.splitlines() if " epoch " in line and ": loss " in line
                         for w in [line.split(" epoch ")[1].split(":")[0]]})
        figures["epochs_trained"] = epochs
        for line in text.splitlines():
            if "training on " in line and "start_up_line" not in figures:
                figures["start_up_line"] = line[line.index("training on "):]
            if "compiled the training step in " in line:
                figures.setdefault("compile_s", []).append(float(line.split(" in ")[-1].split()[0]))
        if self.sampler is not None:
            figures.update(self.sampler.between(wall0, time.time()) or {})
        if rc != 0 and not killed:
            figures["last_lines"] = text.splitlines()[-5:]
        return figures

    @staticmethod
    def _all_recorded(argv: list[str], log_path: Path, epoch: int) -> bool:
        """Every member's epoch line in the log: said once its state is written, so a kill loses no more."""
        text = log_path.read_text(errors="replace")
        models = int(argv[argv.index("--models") + 1])
        return all(f" model {i} epoch {epoch}/" in text for i in range(models))

    def history_figures(self, run: Path, models: int) -> dict:
        """Steady img/s (epochs after the first, fixed work included) and the last epoch's validation error."""
        from emnist_cnn.io.rundir import RunDir

        rows = [RunDir(run).read_history_rows(DROPOUT, i) for i in range(models)]
        if not all(len(r) == self.sizes["epochs"] for r in rows):
            return {"epochs_recorded": [len(r) for r in rows]}
        n_train = self.sizes["train"] - round(self.sizes["train"] * 0.1)  # --val-fraction 0.1
        later = [sum(float(r[e]["seconds"]) for r in rows) for e in range(1, self.sizes["epochs"])]
        first = sum(float(r[0]["seconds"]) for r in rows)
        return {"img_s_steady": n_train * models / statistics.mean(later) if later else None,
                "img_s_first_epoch": n_train * models / first,
                "val_error_pct_last": [round(100 * (1 - float(r[-1]["val_accuracy"])), 3) for r in rows],
                "val_loss_last": [round(float(r[-1]["val_loss"]), 5) for r in rows]}

    def phase(self, name: str, fn) -> None:
        if self.left() < 20:
            self.results["phases"][name] = {"skipped": "out of time"}
        else:
            try:
                self.results["phases"][name] = fn()
            except Exception as e:  # one phase's failure is a finding; the others still run
                self.results["phases"][name] = {"error": f"{type(e).__name__}: {e}"}
        self.save()

    def run(self) -> dict:
        s = self.sizes
        t0 = time.monotonic()
        write_synthetic_digits(self.work / "data", s["train"], s["test"])
        self.results["data_s"] = time.monotonic() - t0
        runs = self.work / "runs"
        shutil.rmtree(runs, ignore_errors=True)

        def trained(name: str, models: int, *flags: str, kill: int | None = None) -> dict:
            figures = self.run_phase(name, self.train_argv(runs / name, models, *flags), kill_after_epoch=kill)
            if figures["rc"] == 0:
                figures.update(self.history_figures(runs / name, models))
            return figures

        # Cheapest and most telling first: a phase the budget cannot fit is skipped, and said so.
        self.phase("fused", lambda: trained("fused", s["models"], "--fused"))
        self.phase("unfused", lambda: trained("unfused", s["unfused_models"], "--no-fused"))
        self.phase("fixed", self.fixed)
        self.phase("bf16", lambda: trained("bf16", s["models"], "--fused", "--precision", "mixed_bfloat16"))
        self.phase("resume", self.resume)
        # Is 16 steps per call (the GPU's default) worth it? The fused run again at one step per call.
        self.phase("steps1", lambda: trained("steps1", s["models"], "--fused", "--steps-per-call", "1"))
        if self.sampler is not None:
            self.sampler.stop()
        self.results["total_s"] = time.monotonic() - t0
        self.results["backend_imported_here"] = "keras" in sys.modules  # the phases' processes own the GPU
        self.save()
        return self.results

    def resume(self) -> dict:
        s, runs = self.sizes, self.work / "runs"
        argv = self.train_argv(runs / "resume", s["models"], "--fused")
        killed = self.run_phase("resume-killed", argv, kill_after_epoch=1)
        if not killed["killed"]:
            return {"error": "the run ended before it could be killed", **killed}
        resumed = self.run_phase("resume", argv)
        figures = {"killed_after_s": killed["wall_s"], "resumed_s": resumed["wall_s"], "rc": resumed["rc"],
                   "xla_training_programs_resumed": resumed["xla_training_programs"],
                   "epochs_trained_after_resume": resumed["epochs_trained"]}
        if resumed["rc"] != 0:
            return {**figures, "last_lines": resumed.get("last_lines")}
        figures.update(compare_runs(runs / "fused", runs / "resume", s["models"], s["epochs"]))
        return figures

    def fixed(self) -> dict:
        argv = [sys.executable, "-m", "benchmarks.gpu_check", "--fixed-work", "--device", self.args.device,
                "--work", str(self.work), "--out", str(self.out), "--models", str(self.sizes["models"]),
                "--calibration", str(self.sizes["calibration"]), "--train", str(self.sizes["train"])]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=max(self.left(), 1), cwd=self.work)
        if done.returncode != 0:
            return {"error": done.stderr.strip().splitlines()[-1:] or done.returncode}
        return json.loads(done.stdout.strip().splitlines()[-1])


def compare_runs(a: Path, b: Path, models: int, epoch: int) -> dict:
    """Largest weight difference between two runs' last checkpoints, and their validation errors."""
    import h5py

    from emnist_cnn.io.rundir import RunDir

    diff, identical = 0.0, True
    for i in range(models):
        files = [h5py.File(RunDir(r).weights_path(DROPOUT, epoch, i), "r") for r in (a, b)]
        arrays = [{}, {}]
        for f, store in zip(files, arrays):
            f.visititems(lambda name, obj, store=store: store.__setitem__(name, obj[()])
                         if isinstance(obj, h5py.Dataset) else None)
        for name, value in arrays[0].items():
            other = arrays[1][name]
            identical &= np.array_equal(value, other)
            if value.dtype.kind == "f":
                diff = max(diff, float(np.abs(value.astype(np.float64) - other).max(initial=0.0)))
        for f in files:
            f.close()
    val = [[round(100 * (1 - float(RunDir(r).read_history_rows(DROPOUT, i)[-1]["val_accuracy"])), 3)
            for i in range(models)] for r in (a, b)]
    return {"weights_identical": identical, "weights_max_abs_diff": diff, "val_error_pct_uninterrupted": val[0],
            "val_error_pct_resumed": val[1]}


def measure_fixed_work(args: argparse.Namespace) -> dict:
    """A member-epoch's fixed work as training does it, for a fused group (`make bench`'s definition,
    benchmarks/figures/fixed_work.py); blocking calls counted at the one door every inference call goes
    through."""
    from benchmarks.figures.fixed_work import build_fixed_work, build_overlapped
    from benchmarks.harness import alternate, new_member
    from emnist_cnn.core import model as model_mod
    from emnist_cnn.training.device import describe_runtime
    from emnist_cnn.core.model import upload_images

    runtime = describe_runtime("auto", True, "float32")
    model_mod.use_jit_compile(runtime["xla"])
    rng = np.random.default_rng(0)
    n_val = round(args.train * 0.1)
    members = [new_member(i) for i in range(args.models)]
    parts = build_fixed_work(
        members, upload_images(rng.integers(0, 256, (args.calibration, 28, 28), dtype=np.uint8), batch_size=None),
        upload_images(rng.integers(0, 256, (n_val, 28, 28), dtype=np.uint8)), n_val,
        Path(args.work) / "fixed-state" / "model_0.npz")
    first = {}
    for name, fn in parts.items():  # the first call compiles
        t0 = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - t0
    calls = [0]
    real = model_mod.predict_batch

    def counted(model, x):
        calls[0] += 1
        return real(model, x)

    model_mod.predict_batch = counted
    reps = 3
    times = alternate(parts, reps)  # one more warm-up call each, then `reps` timed rounds
    per_member = {name: 1000 * statistics.median(v) / args.models for name, v in times.items()}
    calls_per_member_epoch = calls[0] / (reps + 1) / args.models
    # As training runs them: the state's write in the background while the members are validated.
    overlapped = alternate({"validate_while_writing": build_overlapped(parts)}, reps)["validate_while_writing"]
    return {"members": args.models, "calibration_images": args.calibration, "val_images": n_val,
            "calls_per_member_epoch": calls_per_member_epoch,
            **{f"{name}_ms_per_member": round(v, 2) for name, v in per_member.items()},
            "total_ms_per_member": round(sum(per_member.values()), 2),
            "validate_while_writing_ms_per_member": round(1000 * statistics.median(overlapped) / args.models, 2),
            "first_call_s": {k: round(v, 2) for k, v in first.items()}, "runtime": runtime}


def _fmt(v) -> str:
    return f"{v:,.3g}" if isinstance(v, float) else str(v)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("gpu", "cpu"), default="gpu",
                   help="train on the GPU, or the CPU with small sizes (the dry run) (default: gpu)")
    p.add_argument("--out", default=os.environ.get("OUT", "gpu-check"),
                   help="folder for the results (default: $OUT, else ./gpu-check)")
    p.add_argument("--work", default=None, help="folder for the data and runs (default: a temporary folder)")
    p.add_argument("--budget", type=float, default=510.0,
                   help="seconds for the whole check; phases left are skipped (default: 510)")
    for key in SIZES["gpu"]:
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=None,
                       help=f"override the size (default: gpu {SIZES['gpu'][key]:,}, cpu {SIZES['cpu'][key]:,})")
    p.add_argument("--fixed-work", action="store_true", help=argparse.SUPPRESS)  # the fixed phase's own process
    args = p.parse_args(argv)
    if args.fixed_work:
        print(json.dumps(measure_fixed_work(args), default=str))
        return 0
    if args.work is None:
        import tempfile

        args.work = tempfile.mkdtemp(prefix="gpu-check-")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    results = Check(args).run()
    print((Path(args.out) / "gpu_check.txt").read_text(), end="")
    failed = [name for name, f in results["phases"].items() if "error" in f or f.get("rc") not in (0, None)]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
