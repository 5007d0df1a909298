"""memory: the peak resident memory of an EMNIST-sized training process, measured in a process of its own."""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path



from ..harness import Results, Sizes
from .load import synthetic_mat

log = logging.getLogger("bench")

REPO = Path(__file__).resolve().parents[2]  # where `python -m benchmarks...` finds the benchmarks


def bench_memory(res: Results, s: Sizes, ctx: dict) -> None:
    d = synthetic_mat(ctx, s)
    cache = Path(ctx["tmp"]) / "rss-cache"
    env = dict(os.environ, EMNIST_CNN_CACHE=str(cache))
    cmd = [sys.executable, "-m", "benchmarks.memory_child", str(d), str(s.rss_steps)]
    # Linux keeps a process's ru_maxrss across exec, and a child started straight from this
    # (large) process starts with our peak (vfork shares our memory until exec; fork copies
    # its page counts). A shell that forks the child from its own small image gives the
    # child a clean count; the trailing `exit` stops sh from exec'ing python in place.
    cmd = ["/bin/sh", "-c", shlex.join(cmd) + "; exit $?"]
    log.info("peak RSS: subprocess with %d training steps (cold .mat load, empty cache)", s.rss_steps)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"peak-RSS subprocess failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    for phase, (mib, secs) in child["phases"].items():
        log.info("  %-12s max RSS %6.0f MiB, %5.1f s", phase, mib, secs)
    phases = ", ".join(f"{k} {v[0]:,.0f}" for k, v in child["phases"].items())
    res.set("peak_rss_mb", child["peak_rss_mb"], f"ru_maxrss of a subprocess: load_dataset (.mat, empty cache) + "
            f"prepare_data(TrainConfig()) + {s.rss_steps} steps + BN recalibration + val predict "
            f"({time.perf_counter() - t0:.0f} s); max MiB after {phases}; VmHWM {child['vmhwm_mb']:,.0f}")
