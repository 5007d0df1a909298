"""compile: XLA compilations of one fused trainer over three epochs."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path



from ..harness import Results, Sizes

log = logging.getLogger("bench")


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
