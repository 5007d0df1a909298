"""How many threads a training process uses: it decides the backend's summation order, so the bits of a result.

Kept free of Keras imports: the count has to be set before the backend starts.
"""

from __future__ import annotations

import logging
import os
import sys

from ..errors import ConfigError

__all__ = ["THREAD_ENV", "build_thread_env", "configure_threads"]

log = logging.getLogger(__name__)

# TensorFlow reads these when it starts (it ignores OMP_NUM_THREADS); torch reads OMP_NUM_THREADS.
THREAD_ENV = ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS")


def build_thread_env(threads: int) -> dict[str, str]:
    """The environment that pins a new process's backend to `threads` intra- and inter-op threads."""
    return {name: str(threads) for name in THREAD_ENV}


def configure_threads(threads: int | None) -> None:
    """Pin this process's backend to `threads` threads (None: leave the backend's default, one per core)."""
    if threads is None:
        return
    wanted = build_thread_env(threads)
    # Set before TensorFlow started (a Ray worker's environment, or an earlier call): it already uses them.
    preset = all(os.environ.get(k) == wanted[k] for k in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"))
    os.environ.update(wanted)
    tf = sys.modules.get("tensorflow")
    if tf is not None and hasattr(tf, "config"):
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
        except RuntimeError as exc:  # TensorFlow has started: its pools are fixed for this process
            now = (tf.config.threading.get_intra_op_parallelism_threads(),
                   tf.config.threading.get_inter_op_parallelism_threads())
            if now != (threads, threads) and not preset:
                raise ConfigError(f"--threads {threads}: TensorFlow already started in this process with "
                                  f"intra/inter-op threads {now[0]}/{now[1]}") from exc
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "set_num_threads"):
        torch.set_num_threads(threads)
    if os.environ.get("KERAS_BACKEND") == "jax":
        log.warning("--threads %d: JAX has no thread setting; it uses every core", threads)
