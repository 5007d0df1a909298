"""flops: achieved training GFLOP/s against the CPU's fp32 peak and numpy's sgemm."""

from __future__ import annotations

import logging

import numpy as np


from ..harness import Results, Sizes, alternate, cpu_info, fp32_peak, rate, repeat

log = logging.getLogger("bench")


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
