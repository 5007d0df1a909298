"""torch: the same CNN's training step in plain PyTorch, against Keras's."""

from __future__ import annotations

import logging
import os

import numpy as np


from ..baselines import count_torch_params, torch_cnn
from ..harness import LR, PARAMS, Batches, Results, Sizes, alternate, epoch_steps, paired_ratio, rate, repeat

log = logging.getLogger("bench")


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
