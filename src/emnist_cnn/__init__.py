"""emnist-cnn: augmented CNN ensembles on EMNIST Digits with Keras 3."""

from .startup import install_quiet_tensorflow_import, set_backend_defaults

set_backend_defaults()
install_quiet_tensorflow_import()

__version__ = "0.1.0"
