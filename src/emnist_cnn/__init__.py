"""emnist-cnn: augmented CNN ensembles on EMNIST Digits with Keras 3."""

import os

# TensorFlow is the fastest Keras 3 backend on CPU here; a user's choice wins.
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# Warnings stay visible (a GPU that TensorFlow skips says why there); its info lines are hidden.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

__version__ = "0.1.0"
