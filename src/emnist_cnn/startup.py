"""Before a Keras backend loads: the default backend, and TensorFlow's start-up lines kept off the console.

TensorFlow's shared libraries log through absl while they load, before absl's
logging is initialised, straight to file descriptor 2: "All log messages
before absl::InitializeLog() ...", then INFO lines such as "oneDNN custom
operations are on" (on every CPU where oneDNN is on, by default those with
AVX-512). TF_CPP_MIN_LOG_LEVEL does not reach them, so the import of
`tensorflow` runs with descriptor 2 read through a filter that drops exactly
those lines and passes everything else (warnings, errors) as it comes.
"""

from __future__ import annotations

import importlib.machinery
import os
import re
import sys
import threading
from contextlib import contextmanager

__all__ = ["STARTUP_NOISE", "filter_stderr_lines", "install_quiet_tensorflow_import", "set_backend_defaults"]

# absl's notice that it is not initialised yet, and its INFO lines: "I1207 03:41:34.123456  2305 port.cc:153] ...",
# or before initialisation "I0000 00:00:1796614778.217247  2305 port.cc:153] ..." (seconds since 1970).
STARTUP_NOISE = re.compile(rb"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
                           rb"|I\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [\w.-]+:\d+\] .*")


def set_backend_defaults() -> None:
    """TensorFlow as Keras' backend and its C++ info lines hidden, unless the user chose otherwise."""
    # TensorFlow is the fastest Keras 3 backend on CPU here; a user's choice wins.
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    # Warnings stay visible (a GPU that TensorFlow skips says why there); its info lines are hidden.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")


@contextmanager
def filter_stderr_lines(noise: re.Pattern = STARTUP_NOISE):
    """Within the block, lines written to file descriptor 2 (by C++ or Python) that match `noise` in full are
    dropped; every other line reaches the real stderr as it is written, so a crash still shows what it said.
    TF_CPP_MIN_LOG_LEVEL=0 (TensorFlow's every line, asked for) turns the filter off."""
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0":
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (AttributeError, OSError, ValueError):  # no stderr at all (pythonw, a closed descriptor): nothing to filter
        yield
        return
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def forward() -> None:
        pending = b""
        while chunk := os.read(read_end, 65536):
            *lines, pending = (pending + chunk).split(b"\n")
            kept = b"".join(line + b"\n" for line in lines if not noise.fullmatch(line.rstrip(b"\r")))
            if kept:
                os.write(saved, kept)
        if pending and not noise.fullmatch(pending):
            os.write(saved, pending)

    reader = threading.Thread(target=forward, name="stderr-filter", daemon=True)
    reader.start()
    try:
        yield
    finally:
        try:
            sys.stderr.flush()
        except (AttributeError, OSError, ValueError):
            pass
        os.dup2(saved, 2)  # the pipe's last writer closes: the reader drains it and stops
        reader.join(timeout=10)  # a child process started in the block could hold the pipe open: leave it be
        if not reader.is_alive():
            os.close(read_end)
            os.close(saved)


class _QuietTensorflowFinder:
    """Finds `tensorflow` as Python would, and runs its module code inside `filter_stderr_lines`."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name != "tensorflow":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            exec_module = spec.loader.exec_module

            def quiet_exec_module(module):
                if _QUIET_FINDER in sys.meta_path:  # once: the libraries log their start-up lines on first load
                    sys.meta_path.remove(_QUIET_FINDER)
                with filter_stderr_lines():
                    exec_module(module)

            spec.loader.exec_module = quiet_exec_module
        return spec


_QUIET_FINDER = _QuietTensorflowFinder()


def install_quiet_tensorflow_import() -> None:
    """Filter TensorFlow's start-up lines when it is first imported (by Keras, TensorBoard or anyone)."""
    if "tensorflow" not in sys.modules and _QUIET_FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _QUIET_FINDER)
