"""Optional test dependencies (skipped without them, failed in CI), and figures measured on the real data."""

import os

import pytest


# The 2017 reference's published weights on the 10,000 real MNIST test digits in ../shared, as measured with
# a working conversion (README: 16 errors for the 267-epoch ensemble, 21 for its best model); tests allow a
# stated margin around these counts.
REFERENCE_MNIST_ERRORS = {
    "267_members": (21, 13, 25, 22, 17, 22, 26, 22, 24, 25),  # 267epochs_weights_model_0..9
    "258_model_7": 21,
}


# CI sets this (.ci/run): a test dependency that is missing fails the test instead of skipping it.
REQUIRE_DEPS_ENV = "EMNIST_CNN_REQUIRE_DEPS"


# The extra (pyproject.toml) that installs each optional test dependency; `make test` installs them all.
EXTRA_OF = {"ray": "ray", "mlflow": "mlflow", "jax": "backends", "torch": "backends"}


def _missing_dependency(name: str, why: str) -> str:
    message = f"{name} is not installed ({why}; pip install -e '.[{EXTRA_OF.get(name.split('.')[0], 'dev')}]')"
    if os.environ.get(REQUIRE_DEPS_ENV) == "1":
        pytest.fail(f"{message} and {REQUIRE_DEPS_ENV}=1 is set: in CI a missing test dependency fails")
    return message


def require_module(name: str, why: str):
    """Import a test dependency; skip without it (a test, a fixture or a whole module when called at its top),
    fail when EMNIST_CNN_REQUIRE_DEPS=1 (CI)."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        pytest.skip(_missing_dependency(name, why), allow_module_level=True)


def optional_module(name: str, why: str):
    """Import a dependency a test can partly do without: None and a warning without it, a failure in CI."""
    import importlib
    import warnings

    try:
        return importlib.import_module(name)
    except ImportError:
        warnings.warn(_missing_dependency(name, why), stacklevel=2)
        return None
