"""Turn the reference's Keras 2 weight tree into a run directory of ours that `train` continues.

Every file becomes a weights checkpoint (``dropout_X/weights/NNNepochs_weights_model_I.weights.h5``);
each member's latest epoch also becomes its resumable state, with a fresh Adam
optimizer (the reference never saved its optimizer state). Members are created,
checkpoints evaluated and recorded, and config.json written by the same steps
`train` uses.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..config import DEFAULT_DATASET, TrainConfig, TrainOptions
from ..errors import ConfigError, DataError, RunDirError
from ..io.download import load_or_download
from ..io.files import save_weights_atomic
from ..io.reference_weights import (
    REFERENCE_CLASSES,
    REFERENCE_MEAN,
    REFERENCE_STD,
    ReferenceFile,
    find_reference_files,
    load_reference_weights,
    sibling_json,
)
from ..io.rundir import ErrorRecord, RunDir
from ..io.state import save_member_state
from ..training.members import build_member_model, member_seed
from ..training.prepare import PreparedData, prepare_data
from ..training.session import record_session
from ..training.train import evaluate_checkpoint, record_checkpoint

__all__ = ["import_reference"]

log = logging.getLogger(__name__)

_NOTE = ("weights converted from the reference's Keras 2 files (Theano kernels flipped, post-Flatten features "
         "permuted to channels_last, the normalization difference folded into the first convolution); the "
         "reference saved no optimizer state, so continuing starts a fresh Adam")


def import_reference(ref_dir, run_dir, *, dataset: str = DEFAULT_DATASET, data_dir=None, models: int | None = None,
                     evaluate: bool = True, download: bool = True, mirror=None,
                     settings: dict | None = None) -> dict:
    """Convert a reference weight tree into a new run directory that ``train`` can continue.

    The run's data (``dataset``, ``data_dir``) and experiment ``settings``
    (TrainConfig fields such as val_fraction, limit_train, batch_size, seed) are
    recorded in config.json exactly as ``train`` would, so the data fingerprint
    and the validation split come from the real data. ``models`` keeps members
    0..models-1. With ``evaluate``, every epoch at which all members have
    weights is evaluated on the run's validation and test splits (``history/errors.csv``).

    Returns {"run_dir", "config", "members": [...], "errors": {dropout: last checkpoint's ErrorRecords}}.
    """
    ref_dir, run = Path(ref_dir), RunDir.of(run_dir)
    if models is not None and models < 1:
        raise ConfigError(f"--models must be >= 1, got {models}")
    files = find_reference_files(ref_dir)
    config = _import_config(ref_dir, files, models, dataset, settings)
    files = [f for f in files if f.index < config.models]
    with run.lock():
        if run.exists():
            raise RunDirError(f"{run} already holds a run (config.json); import into a new --run-dir")
        ds, used_dir = load_or_download(dataset, data_dir, mirror=mirror, download=download)
        if len(ds.classes) != len(REFERENCE_CLASSES):
            raise ConfigError(f"--dataset {dataset} has {len(ds.classes)} classes; the reference models have "
                              f"{len(REFERENCE_CLASSES)} (digits): use emnist-digits, emnist-mnist or mnist")
        data = prepare_data(config, ds, used_dir)
        log.info("importing %d reference files (%d members x %s) into %s; data %s: %d train / %d val / %d test",
                 len(files), config.models, ", ".join(f"dropout {r:g}" for r in config.dropouts), run, data.name,
                 len(data.y_train), len(data.y_val), len(data.y_test))
        members = [_import_member(run, config, data, files, rate, index)
                   for rate in config.dropouts for index in range(config.models)]
        errors = {rate: _evaluate_imported(run, config, data, files, rate) for rate in config.dropouts} \
            if evaluate else {}
        record_session(run, config, data, TrainOptions(), scheduler="import",
                       imported_from=str(ref_dir.resolve()))
        saved = run.read_record()
        saved["imported"] = {
            "from": str(ref_dir.resolve()), "files": [str(f.path) for f in files],
            "reference_normalization": {"mean": REFERENCE_MEAN, "std": REFERENCE_STD},
            "run_normalization": {"mean": data.mean, "std": data.std}, "note": _NOTE,
        }
        run.write_record(saved)
    return {"run_dir": str(run), "config": config, "members": members, "errors": errors}


def _import_config(ref_dir: Path, files: list[ReferenceFile], models: int | None, dataset: str,
                   settings: dict | None) -> TrainConfig:
    """The run's TrainConfig: rates, member count (all, or the first `models`) and epochs from the files,
    the rest from `settings`."""
    rates = sorted({f.dropout for f in files})
    count = None
    for r in rates:
        idx = sorted({f.index for f in files if f.dropout == r})
        n = models if models is not None else len(idx)
        if idx[:n] != list(range(n)):
            raise DataError(f"{ref_dir}: dropout {r:g} has members {idx}; a run needs members 0..{n - 1}")
        if count is not None and n != count:
            raise DataError(f"{ref_dir}: dropout rates have different member counts ({count} vs {n}); "
                            "import one dropout_X folder at a time")
        count = n
    settings = dict(settings or {})
    bad = {"dataset", "dropouts", "models", "epochs"} & set(settings)
    if bad:
        raise ConfigError(f"settings {', '.join(sorted(bad))} come from the reference files, not from options")
    return TrainConfig(dataset=dataset, dropouts=tuple(rates), models=count or 1,
                       epochs=max(f.epoch for f in files if f.index < (count or 1)), **settings)


def _import_member(run: RunDir, config: TrainConfig, data: PreparedData, files: list[ReferenceFile],
                   rate: float, index: int) -> dict:
    """Write one member's files as checkpoints and its latest one as its state; returns what was imported."""
    seed = member_seed(config.seed, rate, index)
    model = build_member_model(config, data, rate, seed)
    mine = sorted((f for f in files if (f.dropout, f.index) == (rate, index)), key=lambda f: f.epoch)
    info = None
    for f in mine:
        info = load_reference_weights(model, f.path, json_path=sibling_json(f.path))
        save_weights_atomic(model, run.weights_path(rate, f.epoch, index))
    # The last one loaded is the latest epoch: it becomes the member's state.
    save_member_state(run.state_path(rate, index), model, mine[-1].epoch, {
        "seed": seed, "learning_rate": config.lr, "imported_from": str(mine[-1].path),
        "optimizer": "fresh Adam: the reference saved no optimizer state",
    })
    return {"dropout": rate, "index": index, "epochs": [f.epoch for f in mine], "state_epoch": mine[-1].epoch,
            "backend": info["backend"] if info else None, "files": [str(f.path) for f in mine]}


def _evaluate_imported(run: RunDir, config: TrainConfig, data: PreparedData, files: list[ReferenceFile],
                       rate: float) -> list[ErrorRecord]:
    """Evaluate and record every imported checkpoint of `rate` that holds all members; the last one's errors."""
    epochs = sorted({f.epoch for f in files if f.dropout == rate})
    complete = [e for e in epochs if run.has_all_weights(rate, e, config.models)]
    records: list[ErrorRecord] = []
    for epoch in complete:
        log.info("evaluating the imported dropout %g ensemble at epoch %d", rate, epoch)
        records = evaluate_checkpoint(run, config, data, rate, epoch)
        record_checkpoint(run, rate, epoch, records)
    return records
