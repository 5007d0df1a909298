"""Before a Keras backend loads: the default backend, and TensorFlow's start-up lines kept off the console.

TensorFlow's shared libraries log through absl while they load, before absl's
logging is initialised, straight to file descriptor 2: "All log messages
before absl::InitializeLog() ...", then INFO lines such as "oneDNN custom
operations are on" (wherever oneDNN is on: by default on CPUs with AVX-512
VNNI, BF16 or AMX). TF_CPP_MIN_LOG_LEVEL does not reach them, so the import of
`tensorflow` runs with descriptor 2 read through a filter that drops exactly
those lines and passes everything else (warnings, errors) as it comes.
"""

from __future__ import annotations

import importlib.machinery
import os
import re
import subprocess
import sys
import threading
from contextlib import contextmanager

__all__ = ["STARTUP_NOISE", "filter_stderr_lines", "install_quiet_tensorflow_import", "set_backend_defaults"]

# absl's notice that it is not initialised yet, and its INFO lines: "I1207 03:41:34.123456  2305 port.cc:153] ...",
# or before initialisation "I0000 00:00:1796614778.217247  2305 port.cc:153] ..." (seconds since 1970); and
# TensorFlow's own INFO format before 2.17 ("2024-05-01 10:00:00.123456: I tensorflow/core/util/port.cc:113] ...").
STARTUP_NOISE = re.compile(rb"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
                           rb"|I\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [\w.-]+:\d+\] .*"
                           rb"|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: I \S+:\d+\] .*")


def set_backend_defaults() -> None:
    """TensorFlow as Keras' backend and its C++ info lines hidden, unless the user chose otherwise."""
    # TensorFlow is the fastest Keras 3 backend on CPU here; a user's choice wins.
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    # Warnings stay visible (a GPU that TensorFlow skips says why there); its info lines are hidden.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")


# The filter, run as a child process: it reads lines on stdin and copies those that do not match the pattern
# (argv[1]) in full to stdout. A process of its own needs no GIL (C++ start-up code writes while an extension
# module loads, holding it) and drains the pipe even after its parent died, so a fatal line still shows.
_FILTER_CODE = """
import os, re, sys
noise, pending = re.compile(os.fsencode(sys.argv[1])), b""
def put(data):
    try:
        while data:
            data = data[os.write(1, data):]
    except OSError:
        pass  # stderr gone: keep draining, so that writers never block
while True:
    try:
        chunk = os.read(0, 65536)
    except InterruptedError:
        continue
    if not chunk:
        break
    *lines, pending = (pending + chunk).split(b"\\n")
    put(b"".join(line + b"\\n" for line in lines if not noise.fullmatch(line.rstrip(b"\\r"))))
if pending and not noise.fullmatch(pending):
    put(pending)
"""
_FILTER_LOCK = threading.Lock()  # one filter at a time: a nested or concurrent block runs unfiltered


@contextmanager
def filter_stderr_lines(noise: re.Pattern = STARTUP_NOISE):
    """Within the block, lines written to file descriptor 2 (by C++ or Python) that match `noise` in full are
    dropped; every other line reaches the real stderr as it is written, by a child process, so a crash still
    shows what it said. TF_CPP_MIN_LOG_LEVEL=0 (TensorFlow's every line, asked for) turns the filter off."""
    reader = _start_filter(noise) if os.environ.get("TF_CPP_MIN_LOG_LEVEL") != "0" else None
    if reader is None:
        yield
        return
    proc, saved = reader
    try:
        yield
    finally:
        try:
            sys.stderr.flush()
        except (AttributeError, OSError, ValueError):
            pass
        os.dup2(saved, 2)  # the pipe's last writer closes: the filter drains it and ends
        os.close(saved)
        try:
            proc.wait(timeout=10)  # its lines come before anything written after the block
        except subprocess.TimeoutExpired:  # a process started in the block holds the pipe: leave the filter be
            pass
        _FILTER_LOCK.release()


def _start_filter(noise: re.Pattern):
    """Point descriptor 2 at a pipe read by the filter process: (the process, the real stderr's descriptor),
    or None (another filter is on, there is no stderr, or the process did not start)."""
    if not _FILTER_LOCK.acquire(blocking=False):
        return None
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (AttributeError, OSError, ValueError):  # no stderr (pythonw, a closed descriptor): nothing to filter
        _FILTER_LOCK.release()
        return None
    try:
        read_end, write_end = os.pipe()
        try:
            proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _FILTER_CODE, os.fsdecode(noise.pattern)],
                                    stdin=read_end, stdout=saved, stderr=subprocess.DEVNULL, close_fds=True)
        finally:
            os.close(read_end)
        os.dup2(write_end, 2)
        os.close(write_end)
    except (OSError, subprocess.SubprocessError):
        os.close(saved)
        _FILTER_LOCK.release()
        return None
    return proc, saved


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
