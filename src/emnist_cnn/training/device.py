"""Which device trains, decided and said out loud: `--device`, `--jit-compile`, GPU memory, the start-up line.

Imports no backend at module level: hiding the GPUs has to happen before the backend starts.
"""

from __future__ import annotations

import logging
import os
import sys

from ..errors import ConfigError

__all__ = ["DEVICES", "JIT_COMPILE", "STEPS_PER_CALL_GPU", "DEVICE_FED_BACKENDS", "LOOP_FORM", "configure_device",
           "describe_runtime", "format_runtime"]

log = logging.getLogger(__name__)

DEVICES = ("auto", "gpu", "cpu")
JIT_COMPILE = ("auto", "on", "off")
STEPS_PER_CALL_GPU = 16  # training steps per compiled call on a GPU (a choice: no GPU here to measure it on)
DEVICE_FED_BACKENDS = ("tensorflow", "jax")  # backends whose training step loop is the package's own (torch: fit)
# How several steps make one call (core.trainer.train_steps): a loop around one compiled step, in a graph
# (TensorFlow) or in Python (JAX). On XLA:CPU a loop compiled into the program measured 19x (TensorFlow)
# and 22x (JAX) slower per step (README, "Steps per call").
LOOP_FORM = "outer"


def configure_device(device: str) -> None:
    """Apply `--device` to this process, before it trains.

    `cpu` hides every GPU; `gpu` fails at once, in one line, when no GPU is
    usable; `auto` uses a GPU when there is one. With TensorFlow, GPU memory
    grows as needed instead of being reserved whole on every visible GPU (pick
    GPUs with CUDA_VISIBLE_DEVICES; one process per GPU).
    """
    if device not in DEVICES:
        raise ConfigError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    if device == "cpu":
        if backend == "jax" and "jax" not in sys.modules:
            os.environ["JAX_PLATFORMS"] = "cpu"
        if backend == "torch" and "torch" not in sys.modules:
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
    if backend == "tensorflow":
        _configure_tensorflow(device)
    if device == "gpu":
        from ..core.model import accelerator_available

        if not accelerator_available():
            raise ConfigError(f"--device gpu: the {backend} backend sees no usable GPU ({_why_no_gpu(backend)}); "
                              "use --device cpu or auto")


def _configure_tensorflow(device: str) -> None:
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    try:
        if device == "cpu":
            tf.config.set_visible_devices([], "GPU")
            return
        for gpu in gpus:
            tf.config.experimental.set_memory_growth(gpu, True)
    except RuntimeError as exc:  # TensorFlow already placed work on its devices in this process
        visible = tf.config.get_visible_devices("GPU")
        if device == "cpu" and visible:
            raise ConfigError(f"--device cpu: TensorFlow already started on {len(visible)} GPU(s) in this "
                              "process") from exc
        log.debug("GPU options unchanged: %s", exc)


def _why_no_gpu(backend: str) -> str:
    if backend == "tensorflow":
        import tensorflow as tf

        if not tf.test.is_built_with_cuda():
            return "this TensorFlow is built without CUDA; install the GPU build with make setup EXTRA=gpu"
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    if hidden is not None:
        return f"CUDA_VISIBLE_DEVICES={hidden!r}; check the driver with nvidia-smi"
    return "check the driver with nvidia-smi"


def describe_runtime(jit_compile: str, fused: bool, precision: str, steps_per_call: int | None = None) -> dict:
    """The devices this process trains on and how, resolving `--jit-compile auto`: XLA on with a GPU, off on a
    CPU (where XLA measured slower); JAX always compiles with XLA. `steps_per_call`: training steps per
    compiled call (None: `STEPS_PER_CALL_GPU` on a GPU, 1 on a CPU). Warns about bfloat16 on pre-Ampere GPUs."""
    import keras

    from ..core.model import accelerator_available

    backend = keras.backend.backend()
    accelerator = accelerator_available()
    devices = _list_devices(backend) if accelerator else []
    if jit_compile not in JIT_COMPILE:
        raise ConfigError(f"--jit-compile must be one of {', '.join(JIT_COMPILE)}, got {jit_compile!r}")
    # torch: "on" is torch.compile (what Keras' jit_compile means there); auto leaves it off, as Keras does.
    xla = {"on": True, "off": False}.get(jit_compile, backend == "jax" or (accelerator and backend == "tensorflow"))
    if backend == "jax":
        xla = True  # everything JAX runs is compiled by XLA
    if backend == "tensorflow" and xla and _op_determinism_enabled():
        # Keras turns XLA off then (not every XLA op has a deterministic version): say so, record the truth.
        log.warning("XLA off: TensorFlow op determinism is on (TF_DETERMINISTIC_OPS), which Keras runs without XLA")
        xla = False
    if precision == "mixed_bfloat16":
        old = [d["name"] for d in devices if d.get("compute_capability") and d["compute_capability"] < [8, 0]]
        if old:
            log.warning("--precision mixed_bfloat16 on %s (compute capability below 8.0, no native bfloat16): "
                        "slower than float32 there", ", ".join(old))
    fed = backend in DEVICE_FED_BACKENDS
    if steps_per_call is None:
        # Several steps per call on a GPU, where a step can take less time than Python needs to launch it;
        # on the CPU the step loop measured within 1.1x of a bare compiled step.
        steps_per_call = STEPS_PER_CALL_GPU if accelerator and fed else 1
    elif isinstance(steps_per_call, bool) or not isinstance(steps_per_call, int) or steps_per_call < 1:
        raise ConfigError(f"--steps-per-call must be a whole number of at least 1, got {steps_per_call!r}")
    elif steps_per_call > 1 and not fed:
        raise ConfigError(f"--steps-per-call {steps_per_call}: the {backend} backend trains through Keras' fit, "
                          "one step per call")
    return {"backend": backend, "device": "GPU" if accelerator else "CPU", "gpus": devices, "fused": fused,
            "xla": xla, "precision": precision, "steps_per_call": steps_per_call,
            "loop": LOOP_FORM if steps_per_call > 1 else "step"}


def _op_determinism_enabled() -> bool:
    from tensorflow.python.framework.config import is_op_determinism_enabled  # what Keras itself asks

    return bool(is_op_determinism_enabled()) or os.environ.get("TF_DETERMINISTIC_OPS", "").lower() in ("1", "true")


def _list_devices(backend: str) -> list[dict]:
    """Each visible GPU's name and, where the backend tells, its compute capability."""
    try:
        if backend == "tensorflow":
            import tensorflow as tf

            out = []
            for gpu in tf.config.get_visible_devices("GPU"):
                details = tf.config.experimental.get_device_details(gpu)
                cc = details.get("compute_capability")
                out.append({"name": details.get("device_name", gpu.name), "id": gpu.name,
                            "compute_capability": list(cc) if cc else None})
            return out
        if backend == "jax":
            import jax

            return [{"name": d.device_kind, "id": str(d)} for d in jax.devices() if d.platform != "cpu"]
        if backend == "torch":
            import torch

            return [{"name": torch.cuda.get_device_name(i), "id": f"cuda:{i}",
                     "compute_capability": list(torch.cuda.get_device_capability(i))}
                    for i in range(torch.cuda.device_count())]
    except Exception:  # a description only: never let it stop training
        log.warning("could not describe the %s backend's GPUs", backend, exc_info=True)
    return []


def format_runtime(runtime: dict) -> str:
    """The start-up line: `training on GPU:0 NVIDIA A100 (8.0); fused; XLA on; float32; tensorflow`."""
    if runtime["gpus"]:
        where = ", ".join(f"{d['id']} {d['name']}" + (f" ({d['compute_capability'][0]}.{d['compute_capability'][1]})"
                                                     if d.get("compute_capability") else "") for d in runtime["gpus"])
    else:
        where = "CPU (no GPU is used)"
    compiler = "torch.compile" if runtime["backend"] == "torch" else "XLA"
    per_call = f"; {runtime['steps_per_call']} steps per call" if runtime.get("steps_per_call", 1) > 1 else ""
    return (f"training on {where}; {'fused' if runtime['fused'] else 'one member at a time'}; "
            f"{compiler} {'on' if runtime['xla'] else 'off'}{per_call}; {runtime['precision']}; "
            f"{runtime['backend']} backend")
