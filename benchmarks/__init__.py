"""Benchmarks: tooling around the package, run from the repository root as modules.

    python -m benchmarks.bench [--quick]   # throughput, efficiency and memory figures (make bench)
    python -m benchmarks.recipes           # the training recipes on real MNIST digits (make bench BENCH=recipes)

`harness` measures, `keys` names the figures, `baselines` holds what they are
compared with, `figures/` one module per figure group. Results are kept as
dated JSON under `benchmarks/results/`; the figures the docs quote come from
those files. Importing this package imports nothing of emnist_cnn (the GPU
check's parent process must not pick a backend).
"""
