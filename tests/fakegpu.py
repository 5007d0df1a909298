"""`emnist-cnn ARGS` in a process that believes this machine has a GPU, where Keras and this package look.

EMNIST_CNN_FAKE_GPU=physical: TensorFlow lists a GPU among its physical devices, but none is visible (what
Keras sees on a GPU machine under `--device cpu`: its "auto" XLA looks at the physical devices).
EMNIST_CNN_FAKE_GPU=visible: this package also sees one (`accelerator_available`); the steps run on the CPU.
With XLA_FLAGS=--xla_dump_to=DIR every XLA compilation leaves its files in DIR (tests/test_compile.py).
"""

import os
import sys

import emnist_cnn  # noqa: F401  (selects the backend)
import tensorflow as tf

from emnist_cnn.cli import main
from emnist_cnn.core import model

physical = tf.config.list_physical_devices


def with_a_gpu(device_type=None):
    """All physical devices and a GPU; asked for GPUs only (as `training.device` asks, to configure them), the
    real list: nothing can be configured on a GPU that is not there."""
    devices = physical(device_type)
    return devices if device_type is not None else devices + [tf.config.PhysicalDevice("/physical_device:GPU:0",
                                                                                       "GPU")]


tf.config.list_physical_devices = with_a_gpu
if os.environ.get("EMNIST_CNN_FAKE_GPU") == "visible":
    model.accelerator_available = lambda: True
sys.exit(main(sys.argv[1:]))
