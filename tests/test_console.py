"""What a user sees on the console: TensorFlow's start-up lines filtered out on every CPU, nothing else lost."""

import os
import signal
import subprocess
import sys

import pytest

from console_lines import read_console_lines

from emnist_cnn.startup import STARTUP_NOISE


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    """`python -c CODE` with `env` changed (None: unset), stdout and stderr as text."""
    full = {k: v for k, v in os.environ.items() if k not in env or env[k] is not None}
    full.update({k: v for k, v in env.items() if v is not None})
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=full)


# Unset: TensorFlow's own choice (on where the CPU has AVX-512, as on some CI machines); 1 forces oneDNN on, and
# with it the start-up lines, on any CPU.
@pytest.mark.parametrize("onednn", [None, "0", "1"], ids=["onednn-unset", "onednn-0", "onednn-1"])
def test_importing_keras_on_tensorflow_prints_nothing(onednn):
    """Catches: no filter around `import tensorflow` (seen failing with it off: the oneDNN lines, unset and 1)."""
    code = "import emnist_cnn, keras; print(keras.ops.convert_to_numpy(keras.ops.add(1, 2)))"
    env = {"KERAS_BACKEND": "tensorflow", "TF_ENABLE_ONEDNN_OPTS": onednn, "TF_CPP_MIN_LOG_LEVEL": None}
    r = run_python(code, **env)
    assert r.returncode == 0 and r.stdout == "3\n", r.stderr
    assert read_console_lines(r.stderr) == []  # nothing but, on a GPU build, why its GPU is not used


def test_asking_tensorflow_for_every_line_shows_its_start_up_notes():
    """Catches: the filter ignoring TF_CPP_MIN_LOG_LEVEL=0 (seen failing)."""
    r = run_python("import emnist_cnn, keras", KERAS_BACKEND="tensorflow", TF_ENABLE_ONEDNN_OPTS="1",
               TF_CPP_MIN_LOG_LEVEL="0")
    assert r.returncode == 0, r.stderr
    assert "oneDNN custom operations are on" in r.stderr


FILTER_CHECK = r"""
import os, sys
from emnist_cnn.startup import filter_stderr_lines
with filter_stderr_lines():
    os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n")
    os.write(2, b"I0000 00:00:1796614778.217247    2214 port.cc:153] oneDNN custom operations are on. You may see\n")
    os.write(2, b"W0000 00:00:1796614778.2 2214 gpu_device.cc:2342] Cannot dlopen some GPU libraries. Skipping ")
    os.write(2, b"registering GPU devices...\nE0000 00:00:1796614778.3 2214 util.cc:131] an error\n")
    print("python's own stderr", file=sys.stderr, flush=True)
    os.write(2, b"I1207 03:41:34.123456  2305 cpu_feature_guard.cc:227] This TensorFlow binary is optimized")
print("after", file=sys.stderr)
os.write(2, b"I0000 00:00:1.0 1 port.cc:153] outside the block: not filtered\n")
"""


def test_the_filter_drops_absl_start_up_notes_and_keeps_every_other_line():
    """Catches: a noise pattern that also drops warnings (W lines; seen failing)."""
    r = run_python(FILTER_CHECK, TF_CPP_MIN_LOG_LEVEL=None)
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines() == [
        "W0000 00:00:1796614778.2 2214 gpu_device.cc:2342] Cannot dlopen some GPU libraries. Skipping registering "
        "GPU devices...",
        "E0000 00:00:1796614778.3 2214 util.cc:131] an error",
        "python's own stderr",
        "after",
        "I0000 00:00:1.0 1 port.cc:153] outside the block: not filtered",
    ]


@pytest.mark.parametrize("line, noise", [
    (b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR", True),
    (b"I0000 00:00:1796614778.217247    2214 port.cc:153] oneDNN custom operations are on.", True),
    (b"I0000 00:00:1796614834.506851    2281 cpu_feature_guard.cc:227] This TensorFlow binary", True),
    (b"W0000 00:00:1796614778.217247    2214 gpu_device.cc:2342] Cannot dlopen some GPU libraries.", False),
    (b"E0000 00:00:1796614850.961017    2305 util.cc:131] oneDNN supports DT_HALF only", False),
    (b"F0000 00:00:1796614850.961017    2305 logging.cc:1] Check failed", False),
    (b"I see", False),
    (b"emnist-cnn: error: no such file", False),
])
def test_only_absl_info_lines_and_its_notice_are_noise(line, noise):
    """Catches: a pattern too wide (W, E, F lines) or too narrow (absl's pre-init I0000 form, missed at first)."""
    assert bool(STARTUP_NOISE.fullmatch(line)) is noise


CRASH = r"""
import ctypes
from emnist_cnn.startup import filter_stderr_lines
libc = ctypes.PyDLL(None)  # its calls keep the GIL, as an extension module's start-up code does
with filter_stderr_lines():
    line = b"F0000 00:00:1796614778.2 2214 cpu_feature_guard.cc:1] the last words before abort\n"
    libc.write(2, line, len(line))
    libc.abort()
"""


def test_a_process_that_dies_inside_the_filter_still_shows_its_last_words():
    """Catches: a filter read by a thread of the dying process (seen failing on that first version).
    TensorFlow's fatal start-up lines (a CPU without the instructions it was built for) come just before an
    abort, while the import holds the GIL: the filter runs in a process of its own and still passes them."""
    r = run_python(CRASH, TF_CPP_MIN_LOG_LEVEL=None)
    assert r.returncode == -signal.SIGABRT
    assert "the last words before abort" in r.stderr

