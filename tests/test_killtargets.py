"""Every kill target of tests/killtargets.py names a function that exists where killwrap.py patches it: a
renamed or moved function fails here, in the fast tier, not as a kill point that silently never fires."""

import pytest
from killtargets import ALL, resolve

import emnist_cnn  # noqa: F401  (selects the backend before keras is imported)


@pytest.mark.parametrize("target", ALL)
def test_each_kill_target_resolves_to_a_function(target):
    """Caught: a target left at a module's old path (emnist_cnn.engine.train after the move to training)."""
    owner, name = resolve(target)
    assert callable(getattr(owner, name)), target


def test_unknown_targets_are_refused():
    with pytest.raises((LookupError, AttributeError)):
        resolve("emnist_cnn.training.no_such_module.no_such_function")
