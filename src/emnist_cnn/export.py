"""Export a run's member or ensemble as deployable files, with a metadata.json.

Formats, all of the same model (upright ``[0, 1]`` pixels ``(N, 28, 28, 1)`` in,
softmax out, normalization inside):

- ``json_h5``: ``model.json`` + ``model.weights.h5``, loadable with plain Keras 3
  (``keras.models.model_from_json`` then ``load_weights``), no import of this package;
- ``keras``: ``model.keras``, ``keras.saving.load_model``;
- ``saved_model``: a TensorFlow SavedModel for serving (``model.export``), endpoint ``serve``;
- ``onnx``: ``model.onnx`` via tf2onnx (TensorFlow backend), input ``pixels``.

An ensemble is exported as one model whose output is the mean of its members'
softmax outputs, so it deploys as one file.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from .config import TrainConfig, dropout_dirname
from .errors import ConfigError, EmnistCnnError, RunDirError
from .rundir import read_run_config

log = logging.getLogger(__name__)

FORMATS = ("json_h5", "keras", "saved_model", "onnx")
DEFAULT_OUT = "export_json_h5"  # RUN/export_json_h5/, named after the reference's json_h5_export
FILES = {"json": "model.json", "weights": "model.weights.h5", "keras": "model.keras",
         "saved_model": "saved_model", "onnx": "model.onnx"}
_WEIGHTS_RE = re.compile(r"^(\d+)epochs_weights_model_(\d+)\.weights\.h5$")


class ExportError(EmnistCnnError):
    """A model could not be written in a requested format."""


# ----------------------------------------------------------------------------- the ensemble as one model


def build_ensemble_model(members: Sequence, name: str = "emnist_cnn_ensemble"):
    """One Keras model whose output is the mean of the members' softmax outputs.

    Each member is cloned with its layer names prefixed ``m{i}_`` (so no two
    layers clash) and its weights copied; the members share the input
    ``pixels``. A single member is returned as it is.
    """
    import keras

    members = list(members)
    if not members:
        raise ConfigError("an ensemble needs at least one member")
    if len(members) == 1:
        return members[0]
    inputs = keras.Input(tuple(members[0].inputs[0].shape[1:]), name="pixels")
    outputs = []
    for i, member in enumerate(members):
        def rename(layer, i=i):
            cfg = layer.get_config()
            cfg["name"] = f"m{i}_{layer.name}"
            return layer.__class__.from_config(cfg)

        clone = keras.models.clone_model(member, input_tensors=inputs, clone_function=rename)
        for src, dst in zip(member.layers, clone.layers):
            if src.weights:
                dst.set_weights(src.get_weights())
        outputs.append(clone.outputs[0])
    mean = keras.layers.Average(name="probabilities")(outputs)
    return keras.Model(inputs, mean, name=name)


# ----------------------------------------------------------------------------- writing the formats


def export_model(model, out_dir, *, metadata: dict | None = None, formats: Sequence[str] = FORMATS,
                 strict: bool = False) -> dict:
    """Write ``model`` in every requested format into ``out_dir``, then ``metadata.json``.

    A format this stack cannot produce (ONNX without tf2onnx, SavedModel off the
    TensorFlow backend) is skipped with a warning and recorded under
    "skipped", unless ``strict``, where it is an :class:`ExportError`.
    Returns the metadata written (with "files" and "skipped").
    """
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ConfigError(f"--formats: unknown format {unknown[0]!r}; choose from {', '.join(FORMATS)}")
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(f"{out_dir}: cannot create the export folder ({exc.strerror or exc})") from exc
    files: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for fmt in formats:
        try:
            if fmt == "json_h5":
                _write_json_h5(model, out_dir)
                files["json"], files["weights"] = FILES["json"], FILES["weights"]
            elif fmt == "keras":
                _replace_with(out_dir / FILES["keras"], lambda tmp: model.save(tmp))
                files["keras"] = FILES["keras"]
            elif fmt == "saved_model":
                _write_saved_model(model, out_dir / FILES["saved_model"])
                files["saved_model"] = FILES["saved_model"]
            elif fmt == "onnx":
                _write_onnx(model, out_dir / FILES["onnx"])
                files["onnx"] = FILES["onnx"]
        except _Unsupported as exc:
            if strict:
                raise ExportError(f"{out_dir}: cannot export {fmt}: {exc}") from exc
            log.warning("skipping the %s format: %s", fmt, exc)
            skipped[fmt] = str(exc)
        except EmnistCnnError:
            raise
        except Exception as exc:  # Keras/TF/tf2onnx raise many types; one line for the user
            text = " ".join(str(exc).split())[:300]
            raise ExportError(f"{out_dir}: exporting {fmt} failed ({type(exc).__name__}: {text})") from exc
    meta = dict(metadata or {})
    meta["files"] = files
    meta["skipped"] = skipped
    from .rundir import atomic_write_json

    atomic_write_json(out_dir / "metadata.json", meta)
    return meta


class _Unsupported(Exception):
    """This stack cannot produce the format (a missing package or another backend)."""


def _replace_with(path: Path, write) -> None:
    """Let `write(tmp)` create a temporary file beside `path`, then rename it into place."""
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink()


def _write_json_h5(model, out_dir: Path) -> None:
    from .rundir import atomic_write_text

    text = json.dumps(json.loads(model.to_json()), indent=1)
    _replace_with(out_dir / FILES["weights"], lambda tmp: model.save_weights(tmp))
    atomic_write_text(out_dir / FILES["json"], text + "\n")


def _write_saved_model(model, path: Path) -> None:
    import keras

    if keras.backend.backend() != "tensorflow":
        raise _Unsupported(f"a TensorFlow SavedModel needs the tensorflow backend, not {keras.backend.backend()}")
    if path.exists() and not (path / "saved_model.pb").exists():
        raise ExportError(f"{path}: exists and is not a SavedModel; refusing to replace it")

    def write(tmp: Path) -> None:
        tf_log = logging.getLogger("tensorflow")
        level = tf_log.level
        tf_log.setLevel(logging.WARNING)  # not "Assets written to: <temp name>"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model.export(str(tmp), format="tf_saved_model", verbose=False)
        finally:
            tf_log.setLevel(level)
        if path.exists():
            shutil.rmtree(path)

    _replace_with(path, write)


def _write_onnx(model, path: Path) -> None:
    import keras

    try:
        import onnx  # noqa: F401
        if keras.backend.backend() == "tensorflow":
            import tf2onnx  # noqa: F401
    except ImportError as exc:
        raise _Unsupported(f"{exc.name} is not installed (pip install tf2onnx onnx)") from exc
    logging.getLogger("tf2onnx").setLevel(logging.ERROR)
    # Keras' Normalization keeps mean and variance as eager tensors; tf2onnx turns such
    # captured tensors into extra graph inputs. As numpy arrays they become constants.
    norms = [layer for layer in _all_layers(model) if isinstance(layer, keras.layers.Normalization)]
    saved = [(layer.mean, layer.variance) for layer in norms]
    try:
        for layer in norms:
            layer.mean = keras.ops.convert_to_numpy(layer.mean)
            layer.variance = keras.ops.convert_to_numpy(layer.variance)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _replace_with(path, lambda tmp: model.export(str(tmp), format="onnx", verbose=False))
    finally:
        for layer, (mean, variance) in zip(norms, saved):
            layer.mean, layer.variance = mean, variance
    _finish_onnx(path)


def _finish_onnx(path: Path) -> None:
    """Check that the graph takes only the pixels, and name its output as the Keras model's: probabilities."""
    import onnx

    proto = onnx.load(str(path))
    graph = proto.graph
    initializers = {i.name for i in graph.initializer}
    inputs = [i.name for i in graph.input if i.name not in initializers]
    if len(inputs) != 1:
        path.unlink(missing_ok=True)
        raise ExportError(f"{path}: the ONNX graph has inputs {inputs}, expected only the pixels")
    if len(graph.output) == 1 and graph.output[0].name != "probabilities":
        old = graph.output[0].name
        for node in graph.node:
            node.output[:] = ["probabilities" if o == old else o for o in node.output]
            node.input[:] = ["probabilities" if i == old else i for i in node.input]
        graph.output[0].name = "probabilities"
        onnx.checker.check_model(proto)
        _replace_with(path, lambda tmp: onnx.save(proto, str(tmp)))


def _all_layers(model) -> list:
    out = []
    for layer in model.layers:
        out.append(layer)
        if hasattr(layer, "layers"):
            out += _all_layers(layer)
    return out


# ----------------------------------------------------------------------------- choosing from a run


@dataclass
class Selection:
    dropout: float
    epoch: int
    kind: str  # "best", "ensemble" or "member"
    members: list[int]
    val: dict | None = None  # errors.csv row of the exported model (member or "ensemble")
    test: dict | None = None
    notes: list[str] = field(default_factory=list)


def _checkpoints(run_dir: Path, dropout: float) -> dict[int, set[int]]:
    """{epoch: member indices with a weights file} of one dropout rate."""
    folder = run_dir / dropout_dirname(dropout) / "weights"
    out: dict[int, set[int]] = {}
    if folder.is_dir():
        for p in folder.iterdir():
            m = _WEIGHTS_RE.match(p.name)
            if m:
                out.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    return out


def _error_rows(run_dir: Path, dropout: float, epoch: int) -> dict[tuple[str, str], dict]:
    from .rundir import read_csv_rows

    path = run_dir / dropout_dirname(dropout) / "history" / "errors.csv"
    return {(r["model"], r["split"]): r for r in read_csv_rows(path) if int(r["epoch"]) == epoch}


def _parse_model(model) -> str | int:
    if isinstance(model, int):
        return model
    text = str(model).strip().lower()
    if text in ("best", "ensemble"):
        return text
    if text.isdigit():
        return int(text)
    raise ConfigError(f"--model must be best, ensemble or a member index, got {model!r}")


def select(run_dir, config: TrainConfig, *, dropout: float | None = None, epoch="latest",
           model="best") -> Selection:
    """Which weights files to export: dropout rate, epoch and member(s).

    ``epoch`` "latest" is the latest checkpoint holding what ``model`` needs (every
    member for best and ensemble). ``best`` is the member with the lowest
    validation error at that epoch (from history/errors.csv; ties: lowest
    index). With several dropout rates and no ``dropout``, the rate whose
    chosen model has the lowest validation error is taken.
    """
    run_dir = Path(run_dir)
    which = _parse_model(model)
    if isinstance(which, int) and not 0 <= which < config.models:
        raise ConfigError(f"--model {which}: the run has members 0..{config.models - 1}")
    if dropout is not None:
        matches = [d for d in config.dropouts if abs(d - dropout) < 1e-9]
        if not matches:
            raise ConfigError(f"--dropout {dropout:g}: the run has {', '.join(f'{d:g}' for d in config.dropouts)}")
        rates = matches
    else:
        rates = list(config.dropouts)
    candidates = [_select_one(run_dir, config, d, epoch, which) for d in rates]
    candidates = [c for c in candidates if c is not None]
    if not candidates:
        what = "every member" if not isinstance(which, int) else f"member {which}"
        available = sorted({e for d in rates for e in _usable_epochs(run_dir, config, d, which)})
        if epoch not in ("latest", None) and available:
            raise ConfigError(f"--epoch {epoch}: no checkpoint with {what} of dropout "
                              f"{', '.join(f'{d:g}' for d in rates)}; available: {', '.join(map(str, available))}")
        at = "any epoch" if epoch in ("latest", None) else f"epoch {epoch}"
        raise RunDirError(f"{run_dir}: no weights checkpoint with {what} at {at} "
                          f"(dropout {', '.join(f'{d:g}' for d in rates)})")
    if len(candidates) == 1:
        return candidates[0]
    if any(c.val is None for c in candidates):
        raise ConfigError(f"{run_dir} has dropout rates {', '.join(f'{c.dropout:g}' for c in candidates)} and no "
                          "validation errors to choose between them: pick one with --dropout")
    chosen = min(candidates, key=lambda c: (float(c.val["error_pct"]), c.dropout))
    chosen.notes.append(f"dropout {chosen.dropout:g} chosen: lowest validation error of the rates")
    return chosen


def _usable_epochs(run_dir: Path, config: TrainConfig, dropout: float, which) -> list[int]:
    """Checkpoint epochs holding what `which` needs: member `which`, or every member."""
    ckpts = _checkpoints(run_dir, dropout)
    if isinstance(which, int):
        return sorted(e for e, have in ckpts.items() if which in have)
    return sorted(e for e, have in ckpts.items() if set(range(config.models)) <= have)


def _select_one(run_dir: Path, config: TrainConfig, dropout: float, epoch, which) -> Selection | None:
    everyone = set(range(config.models))
    usable = _usable_epochs(run_dir, config, dropout, which)
    if epoch == "latest" or epoch is None:
        if not usable:
            return None
        chosen_epoch = usable[-1]
    else:
        try:
            chosen_epoch = int(epoch)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"--epoch must be an epoch number or 'latest', got {epoch!r}") from exc
        if chosen_epoch not in usable:
            return None
    rows = _error_rows(run_dir, dropout, chosen_epoch)
    if which == "ensemble":
        return Selection(dropout, chosen_epoch, "ensemble", sorted(everyone),
                         rows.get(("ensemble", "val")), rows.get(("ensemble", "test")))
    if isinstance(which, int):
        return Selection(dropout, chosen_epoch, "member", [which],
                         rows.get((str(which), "val")), rows.get((str(which), "test")))
    vals = {i: rows.get((str(i), "val")) for i in sorted(everyone)}
    if any(v is None for v in vals.values()):
        raise ConfigError(
            f"{run_dir}: no validation errors for every member at epoch {chosen_epoch} of dropout {dropout:g} "
            "(history/errors.csv; a run with --val-fraction 0 has none): use --model ensemble or --model I")
    best = min(vals, key=lambda i: (float(vals[i]["error_pct"]), i))
    sel = Selection(dropout, chosen_epoch, "best", [best], vals[best], rows.get((str(best), "test")))
    sel.notes.append(f"member {best} chosen: lowest validation error at epoch {chosen_epoch}")
    return sel


def load_member(run_dir, config: TrainConfig, saved: dict, dropout: float, epoch: int, index: int):
    """One member of a run at a checkpoint, as our Keras model."""
    from .interop import load_weights_any
    from .model import build_model
    from .train import weights_path

    data = saved.get("data", {})
    classes = str(data.get("classes", "0123456789"))
    model = build_model(len(classes), dropout, float(data["mean"]), float(data["std"]), config.model,
                        name="emnist_cnn")
    load_weights_any(model, weights_path(Path(run_dir), dropout, epoch, index))
    return model


def _error_dict(row: dict | None) -> dict | None:
    if row is None:
        return None
    return {"pct": float(row["error_pct"]), "n_errors": int(row["n_errors"]), "n": int(row["n"])}


def export_run(run_dir, *, dropout: float | None = None, epoch="latest", model="best", out_dir=None,
               formats: Sequence[str] = FORMATS, strict: bool = False) -> dict:
    """Export a run's best member, ensemble, or member I; returns the metadata written."""
    run_dir = Path(run_dir)
    _parse_model(model)  # a malformed flag is reported as such, before the run is opened
    if epoch not in ("latest", None) and not str(epoch).strip().isdigit():
        raise ConfigError(f"--epoch must be an epoch number or 'latest', got {epoch!r}")
    config, saved = read_run_config(run_dir)
    sel = select(run_dir, config, dropout=dropout, epoch=epoch, model=model)
    members = [load_member(run_dir, config, saved, sel.dropout, sel.epoch, i) for i in sel.members]
    exported = build_ensemble_model(members) if sel.kind == "ensemble" else members[0]
    data = saved.get("data", {})
    classes = list(str(data.get("classes", "0123456789")))
    meta = {
        "format": "emnist-cnn export 1",
        "classes": classes,
        "input": {
            "name": "pixels", "shape": [None, 28, 28, 1], "dtype": "float32", "range": [0.0, 1.0],
            "orientation": "upright, as a person reads the character",
            "polarity": "ink bright (1.0) on a dark (0.0) background",
            "normalization": "inside the model: (x - mean) / std", "mean": data.get("mean"), "std": data.get("std"),
            # How `predict` turns image files into inputs: as the images the weights learned from were made
            # (the reference's imported weights learned 267 epochs of EMNIST, whatever data a run continues on).
            "image_preprocessing": "mnist" if config.dataset == "mnist" and "imported" not in saved else "emnist",
        },
        "output": {"name": "probabilities", "shape": [None, len(classes)],
                   "meaning": "softmax probabilities, in the order of classes"
                              + (" (mean of the members' softmax)" if sel.kind == "ensemble" else "")},
        "dataset": {k: data.get(k) for k in ("name", "fingerprint", "n_train", "n_val", "n_test")},
        "run_dir": str(run_dir.resolve()),
        "dropout": sel.dropout,
        "epoch": sel.epoch,
        "model": sel.kind,
        "members": sel.members,
        "selection": sel.notes,
        "validation_error": _error_dict(sel.val),
        "test_error": _error_dict(sel.test),
        "parameters": int(exported.count_params()),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
    }
    if "imported" in saved:
        meta["imported_from"] = saved["imported"].get("from")
    out = Path(out_dir) if out_dir is not None else run_dir / DEFAULT_OUT
    log.info("exporting dropout %g epoch %d %s (members %s) to %s", sel.dropout, sel.epoch, sel.kind,
             sel.members, out)
    return export_model(exported, out, metadata=meta, formats=formats, strict=strict)


def _versions() -> dict:
    import keras

    from . import __version__

    versions = {"emnist_cnn": __version__, "keras": keras.__version__, "backend": keras.backend.backend()}
    try:
        import tensorflow as tf

        versions["tensorflow"] = tf.__version__
    except ImportError:
        pass
    return versions


# ----------------------------------------------------------------------------- command line


def register(subparsers) -> argparse.ArgumentParser:
    """Add `export` to an argparse subparsers object."""
    p = subparsers.add_parser(
        "export", help="export a run's best member or its ensemble as JSON+H5, .keras, SavedModel and ONNX",
        description=("Export one model that takes upright [0, 1] pixels (N, 28, 28, 1) and returns softmax "
                     "probabilities, normalization inside, with a metadata.json beside it. An ensemble is "
                     "exported as one model averaging its members' softmax."),
    )
    p.add_argument("--run-dir", type=Path, required=True, help="the run directory to export from (required)")
    p.add_argument("--dropout", type=float, default=None,
                   help="dropout rate (default: the run's only one, else the one with the lowest validation "
                        "error)")
    p.add_argument("--epoch", default="latest",
                   help="checkpoint epoch, or 'latest': the latest checkpoint holding every needed member "
                        "(default: latest)")
    p.add_argument("--model", default="best",
                   help="best: the member with the lowest validation error; ensemble: all members averaged; "
                        "or a member index I (default: best)")
    p.add_argument("--out", type=Path, default=None, help=f"output folder (default: RUN/{DEFAULT_OUT}/)")
    p.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS), metavar="FORMAT",
                   help=f"formats to write, from {', '.join(FORMATS)}; a format the stack cannot produce is "
                        f"skipped with a warning unless named here explicitly (default: all: {' '.join(FORMATS)})")
    p.set_defaults(func=cmd_export)
    return p


def cmd_export(args: argparse.Namespace) -> int:
    explicit = list(args.formats) != list(FORMATS)
    meta = export_run(args.run_dir, dropout=args.dropout, epoch=args.epoch, model=args.model, out_dir=args.out,
                      formats=args.formats, strict=explicit)
    out = Path(args.out) if args.out is not None else Path(args.run_dir) / DEFAULT_OUT
    what = {"best": f"member {meta['members'][0]} (best on validation)", "ensemble":
            f"ensemble of {len(meta['members'])} members", "member": f"member {meta['members'][0]}"}[meta["model"]]

    def err(e):
        return "-" if e is None else f"{e['pct']:.3f}% ({e['n_errors']}/{e['n']})"

    print(f"exported dropout {meta['dropout']:g}, epoch {meta['epoch']}, {what}: "
          f"validation error {err(meta['validation_error'])}, test error {err(meta['test_error'])}")
    for key, name in meta["files"].items():
        print(f"  {key:12s} {out / name}")
    for key, why in meta["skipped"].items():
        print(f"  {key:12s} skipped: {why}")
    print(f"  {'metadata':12s} {out / 'metadata.json'}")
    return 0
