"""Loading weight files into our models: Keras 3 checkpoints and archives, or the reference's Keras 2 files.

`load_member_model` builds a member's model and loads a weights file into it;
`load_checkpoint_model` does it for a run's checkpoint with the run's settings.
"""

from __future__ import annotations

import os
import tempfile
import warnings
import zipfile
from pathlib import Path

from ..config import ModelConfig, TrainConfig
from ..errors import WeightsError, format_one_line
from .reference_weights import is_keras2_file, load_reference_weights, sibling_json
from .rundir import RunDir

__all__ = ["load_weights_any", "load_member_model", "load_checkpoint_model"]


def load_member_model(path, *, num_classes: int, dropout: float, mean: float, std: float,
                      model_config: ModelConfig | None = None, name: str = "emnist_cnn"):
    """Build the reference CNN with the run's normalization and load the weights file at `path` into it."""
    from ..core.model import build_model  # deferred: Keras is slow to import and flag parsing never needs it

    model = build_model(num_classes, dropout, mean, std, model_config, name=name)
    load_weights_any(model, path)
    return model


def load_checkpoint_model(run: RunDir, dropout: float, epoch: int, index: int, *, config: TrainConfig | None = None,
                          data=None):
    """Member `index` of `run` at checkpoint `epoch`, built as the run builds it.

    The normalization and class count come from `data` (a PreparedData) when
    given, else from config.json; the model settings from `config`, else config.json.
    """
    if data is not None:
        num_classes, mean, std = data.num_classes, data.mean, data.std
    else:
        classes, mean, std = run.read_normalization()
        num_classes = len(classes)
    config = config or run.read_config()
    return load_member_model(run.weights_path(dropout, epoch, index), num_classes=num_classes, dropout=dropout,
                             mean=mean, std=std, model_config=config.model)


def load_weights_any(model, path) -> dict:
    """Load any weights file we know into ``model``, with one-line errors.

    A reference Keras 2 file (any suffix) goes through :func:`load_reference_weights`
    (checking the architecture JSON beside it, if there is one); our own
    ``.weights.h5`` checkpoints and ``.keras`` archives go through Keras. A
    missing, truncated, foreign or mismatched file raises :class:`WeightsError`.
    Returns {"format": "reference", ...load_reference_weights info} or {"format": "keras"}.
    """
    import h5py  # deferred: only weight-file users pay for it

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    if zipfile.is_zipfile(path):
        _keras_load_weights(model, path, ".keras")
        return {"format": "keras", "path": str(path)}
    try:
        with h5py.File(path, "r") as f:
            reference = is_keras2_file(f)
            shapes = _keras3_shapes(f) if not reference else None
    except Exception as exc:  # OSError for a non-HDF5 file; RuntimeError, KeyError... for damaged metadata
        raise WeightsError(f"{path}: not a readable HDF5 weights file, truncated or not HDF5 "
                           f"({format_one_line(exc)})") from exc
    if reference:
        info = load_reference_weights(model, path, json_path=sibling_json(path))
        return {"format": "reference", **info}
    if shapes is None:
        raise WeightsError(f"{path}: HDF5 file but neither a Keras 3 weights file nor a Keras 2 reference "
                           "weights file (foreign HDF5)")
    wanted = sorted(tuple(w.shape) for w in model.weights)
    if sorted(shapes) != wanted:
        missing = sorted(set(wanted) - set(shapes)) or sorted(set(shapes) - set(wanted))
        raise WeightsError(f"{path}: weights of a different model: {len(shapes)} arrays vs the model's "
                           f"{len(wanted)} (e.g. shape {missing[0] if missing else '?'} does not match)")
    _keras_load_weights(model, path, ".weights.h5")
    return {"format": "keras", "path": str(path)}


def _keras3_shapes(f) -> list[tuple] | None:
    """Shapes of every array in a Keras 3 .weights.h5 file; None if it is not one."""
    import h5py

    if "layers" not in f or not isinstance(f["layers"], h5py.Group):
        return None
    shapes: list[tuple] = []

    def visit(_name, obj):
        if isinstance(obj, h5py.Dataset):
            shapes.append(tuple(obj.shape))

    f["layers"].visititems(visit)  # not "optimizer/": a compiled model's file holds its state too
    return shapes


def _keras_load_weights(model, path: Path, kind: str) -> None:
    target = path
    link = None
    if kind == ".weights.h5" and not path.name.endswith(".weights.h5"):
        # Keras 3 picks its reader by suffix; give it the name it expects.
        tmpdir = Path(tempfile.mkdtemp(prefix="emnist-cnn-weights-"))
        link = tmpdir / "model.weights.h5"
        os.symlink(path.resolve(), link)
        target = link
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.load_weights(target)
    except Exception as exc:  # Keras raises ValueError/OSError/KeyError with multi-line messages
        why = format_one_line(exc).split(" List of objects")[0]
        raise WeightsError(f"{path}: cannot load into the model ({why})") from exc
    finally:
        if link is not None:
            link.unlink(missing_ok=True)
            link.parent.rmdir()


