"""What a process printed on stderr, as the console tests read it: TensorFlow's C++ log lines told apart."""

import re


# TensorFlow's C++ log lines: absl's ("E0000 00:00:1796614850.961017    2305 util.cc:131] ...") with its notice
# that it is not initialised yet, and TensorFlow's own ("2026-12-07 03:41:34.123456: W tensorflow/...").
TENSORFLOW_LOG_LINE = re.compile(r"^([IWEF]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [\w.-]+:\d+\] "
                                 r"|WARNING: All log messages before absl::InitializeLog\(\)"
                                 r"|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWEF] )", re.M)


# TensorFlow's warnings about a GPU it cannot use ("W0000 ... gpu_device.cc:2342] Cannot dlopen some GPU
# libraries ..."), printed on purpose on a GPU build whose GPU is unusable: the one kind of line tests let through.
TENSORFLOW_GPU_WARNING = re.compile(r"^(W\d{4} \d\d:\d\d:\d+\.\d+ +\d+ |\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: W (\S+/)?)"
                                    r"(gpu_\w+|cuda_\w+|dso_loader)\.cc:\d+\] ")


def read_console_lines(text: str) -> list[str]:
    """The lines of `text` (a process's stderr), less TensorFlow's warnings about a GPU it cannot use."""
    return [line for line in text.splitlines() if not TENSORFLOW_GPU_WARNING.match(line)]


def find_tensorflow_log_lines(text: str) -> list[str]:
    """The lines of `text` that TensorFlow's C++ logging wrote, less its warnings about a GPU it cannot use."""
    return [line for line in read_console_lines(text) if TENSORFLOW_LOG_LINE.match(line)]
