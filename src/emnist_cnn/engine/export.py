"""Export a run's member or ensemble as deployable files, with a metadata.json.

Formats (written by `io.model_files.export_model`), all of the same model (upright ``[0, 1]``
pixels ``(N, 28, 28, 1)`` in, softmax out, normalization inside):

- ``json_h5``: ``model.json`` + ``model.weights.h5``, loadable with plain Keras 3
  (``keras.models.model_from_json`` then ``load_weights``), no import of this package;
- ``keras``: ``model.keras``, ``keras.saving.load_model``;
- ``saved_model``: a TensorFlow SavedModel for serving (``model.export``), endpoint ``serve``;
- ``onnx``: ``model.onnx`` (Keras' exporter: tf2onnx, jax2onnx or torch.onnx), input ``pixels``.

An ensemble is exported as one model whose output is the mean of its members'
softmax outputs, so it deploys as one file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence


from ..config import IMAGE_SIDE, TrainConfig
from ..core.metrics import ErrorRate
from ..core.selection import select_best_dropout, select_best_member
from ..errors import ConfigError, RunDirError
from ..io.rundir import RunDir, choose_image_preprocessing, collect_versions, format_utc_now, parse_checkpoint_epoch
from ..io.model_files import FORMATS, export_model
from ..io.weights import load_checkpoint_model

__all__ = ["Selection", "Exported", "export_run", "select_export"]

log = logging.getLogger(__name__)

@dataclass
class Selection:
    """What `export_run` exports: a dropout rate, a checkpoint epoch and its member(s)."""

    dropout: float
    epoch: int
    kind: str  # "best", "ensemble" or "member"
    members: list[int]
    val: ErrorRate | None = None  # errors.csv entry of the exported model (member or "ensemble")
    test: ErrorRate | None = None
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Exported:
    """What `export_run` wrote: the selection, where, and `metadata` (the contents of metadata.json)."""

    selection: Selection
    out_dir: Path
    metadata: dict

    @property
    def files(self) -> dict[str, str]:
        """Format key -> file name in `out_dir`."""
        return self.metadata["files"]

    @property
    def skipped(self) -> dict[str, str]:
        """Format key -> why this stack could not write it."""
        return self.metadata["skipped"]


def _parse_member(member) -> str | int:
    if isinstance(member, int):
        return member
    text = str(member).strip().lower()
    if text in ("best", "ensemble"):
        return text
    if text.isdigit():
        return int(text)
    raise ConfigError(f"--member must be best, ensemble or a member index, got {member!r}")


def select_export(run: RunDir, config: TrainConfig, *, dropout: float | None = None, epoch="latest",
                  member="best") -> Selection:
    """Which weights files to export: dropout rate, epoch and member(s).

    ``epoch`` "latest" is the latest checkpoint holding what ``member`` needs (every
    member for best and ensemble). ``best`` is the member with the lowest
    validation error at that epoch. With several dropout rates and no
    ``dropout``, the rate whose chosen model has the lowest validation error is taken.
    """
    which = _parse_member(member)
    if isinstance(which, int) and not 0 <= which < config.models:
        raise ConfigError(f"--member {which}: the run has members 0..{config.models - 1}")
    rates = list(config.dropouts) if dropout is None else [config.find_dropout(dropout)]
    candidates = [c for d in rates if (c := _select_one(run, config, d, epoch, which)) is not None]
    if not candidates:
        what = "every member" if not isinstance(which, int) else f"member {which}"
        available = sorted({e for d in rates for e in _usable_epochs(run, config, d, which)})
        latest = parse_checkpoint_epoch(epoch) is None
        if not latest and available:
            raise ConfigError(f"--epoch {epoch}: no checkpoint with {what} of dropout "
                              f"{', '.join(f'{d:g}' for d in rates)}; available: {', '.join(map(str, available))}")
        at = "any epoch" if latest else f"epoch {epoch}"
        raise RunDirError(f"{run}: no weights checkpoint with {what} at {at} "
                          f"(dropout {', '.join(f'{d:g}' for d in rates)})")
    if len(candidates) == 1:
        return candidates[0]
    if any(c.val is None for c in candidates):
        raise ConfigError(f"{run} has dropout rates {', '.join(f'{c.dropout:g}' for c in candidates)} and no "
                          "validation errors to choose between them: pick one with --dropout")
    best = select_best_dropout({c.dropout: c.val for c in candidates})
    chosen = next(c for c in candidates if c.dropout == best)
    chosen.notes.append(f"dropout {chosen.dropout:g} chosen: lowest validation error of the rates")
    return chosen


def _usable_epochs(run: RunDir, config: TrainConfig, dropout: float, which) -> list[int]:
    """Checkpoint epochs holding what `which` needs: member `which`, or every member."""
    return run.complete_checkpoints(dropout, config.models, which if isinstance(which, int) else None)


def _select_one(run: RunDir, config: TrainConfig, dropout: float, epoch, which) -> Selection | None:
    chosen_epoch = run.choose_checkpoint(dropout, config.models, epoch, which if isinstance(which, int) else None)
    if chosen_epoch is None:
        return None
    errors = {(r.model, r.split): r.rate for r in run.read_errors(dropout) if r.epoch == chosen_epoch}
    if which == "ensemble":
        return Selection(dropout, chosen_epoch, "ensemble", list(range(config.models)),
                         errors.get(("ensemble", "val")), errors.get(("ensemble", "test")))
    if isinstance(which, int):
        return Selection(dropout, chosen_epoch, "member", [which],
                         errors.get((str(which), "val")), errors.get((str(which), "test")))
    best = select_best_member({i: errors.get((str(i), "val")) for i in range(config.models)})
    if best is None:
        raise ConfigError(
            f"{run}: no validation errors for every member at epoch {chosen_epoch} of dropout {dropout:g} "
            "(history/errors.csv; a run with --val-fraction 0 has none): use --member ensemble or --member I")
    sel = Selection(dropout, chosen_epoch, "best", [best], errors.get((str(best), "val")),
                    errors.get((str(best), "test")))
    sel.notes.append(f"member {best} chosen: lowest validation error at epoch {chosen_epoch}")
    return sel


def _error_dict(rate: ErrorRate | None) -> dict | None:
    """metadata.json's shape of an error (export format 1, read by deployments): pct, n_errors, n."""
    return None if rate is None else {"pct": rate.pct, "n_errors": rate.n_errors, "n": rate.n}


def export_run(run_dir, *, dropout: float | None = None, epoch="latest", member="best", out_dir=None,
               formats: Sequence[str] = FORMATS, strict: bool = False) -> Exported:
    """Export a run's best member, ensemble, or member I into `out_dir` (default: the run's export folder)."""
    from ..core.model import build_averaged_ensemble

    run = RunDir.of(run_dir)
    _parse_member(member)  # a malformed flag is reported as such, before the run is opened
    parse_checkpoint_epoch(epoch)  # a malformed --epoch too
    saved = run.read_record()
    config = run.read_config()
    sel = select_export(run, config, dropout=dropout, epoch=epoch, member=member)
    members = [load_checkpoint_model(run, sel.dropout, sel.epoch, i, config=config) for i in sel.members]
    exported = build_averaged_ensemble(members) if sel.kind == "ensemble" else members[0]
    out = Path(out_dir) if out_dir is not None else run.export_dir
    log.info("exporting dropout %g epoch %d %s (members %s) to %s", sel.dropout, sel.epoch, sel.kind,
             sel.members, out)
    meta = _export_metadata(run, config, saved, sel, int(exported.count_params()))
    return Exported(sel, out, export_model(exported, out, metadata=meta, formats=formats, strict=strict))


def _export_metadata(run: RunDir, config: TrainConfig, saved: dict, sel: Selection, parameters: int) -> dict:
    data = saved.get("data", {})
    classes = list(str(data.get("classes", "0123456789")))
    meta = {
        "format": "emnist-cnn export 1",
        "classes": classes,
        "input": {
            "name": "pixels", "shape": [None, IMAGE_SIDE, IMAGE_SIDE, 1], "dtype": "float32", "range": [0.0, 1.0],
            "orientation": "upright, as a person reads the character",
            "polarity": "ink bright (1.0) on a dark (0.0) background",
            "normalization": "inside the model: (x - mean) / std", "mean": data.get("mean"), "std": data.get("std"),
            "image_preprocessing": choose_image_preprocessing(config, saved),
        },
        "output": {"name": "probabilities", "shape": [None, len(classes)],
                   "meaning": "softmax probabilities, in the order of classes"
                              + (" (mean of the members' softmax)" if sel.kind == "ensemble" else "")},
        "dataset": {k: data.get(k) for k in ("name", "fingerprint", "n_train", "n_val", "n_test")},
        "run_dir": str(run.path.resolve()),
        "dropout": sel.dropout,
        "epoch": sel.epoch,
        "model": sel.kind,
        "members": sel.members,
        "selection": sel.notes,
        "validation_error": _error_dict(sel.val),
        "test_error": _error_dict(sel.test),
        "parameters": parameters,
        "created": format_utc_now(),
        "versions": {k: v for k, v in collect_versions(threads=False).items()
                     if k in ("emnist_cnn", "keras", "backend", "tensorflow", "jax", "torch")},
    }
    if "imported" in saved:
        meta["imported_from"] = saved["imported"].get("from")
    return meta
