"""Resumable training of augmented CNN ensembles, one per dropout rate."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from . import __version__
from .augment import augment_batch
from .config import RESUMABLE_CHANGES, TrainConfig, dropout_dirname
from .errors import ConfigError, DataError, RunDirError
from .evaluate import ErrorRate, ensemble_probabilities, evaluate_error, evaluate_loss
from .rundir import (
    ERRORS_COLUMNS,
    HISTORY_COLUMNS,
    RunLock,
    atomic_write_json,
    atomic_write_text,
    load_member_state,
    read_csv_rows,
    read_run_config,
    save_weights_atomic,
    read_state_epoch,
    save_member_state,
    write_csv_rows,
)

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- data


@dataclass
class PreparedData:
    """The splits a run trains and evaluates on; images stay uint8 until a batch is drawn."""

    name: str
    classes: tuple[str, ...]
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    mean: float  # training-split pixel mean in [0, 1]
    std: float  # training-split pixel standard deviation in [0, 1]
    fingerprint: str
    source: str
    data_dir: str | None = None  # where the files were found, so a run can reopen its data

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def describe(self) -> dict:
        return {
            "name": self.name, "fingerprint": self.fingerprint, "source": self.source,
            "data_dir": self.data_dir,
            "n_train": int(len(self.y_train)), "n_val": int(len(self.y_val)), "n_test": int(len(self.y_test)),
            "classes": "".join(self.classes), "mean": self.mean, "std": self.std,
        }


def load_or_download(name: str, data_dir=None, *, mirror=None, download: bool = True):
    """`load_dataset`, downloading an EMNIST split first when its files are absent.

    Returns the dataset and the folder it was read from.
    """
    from .data import default_data_dir, find_dataset_files, load_dataset

    data_dir = Path(data_dir) if data_dir else default_data_dir()
    if find_dataset_files(name, data_dir) is None and download and name.startswith("emnist-"):
        from .download import download_emnist

        log.info("%s not found in %s: downloading it", name, data_dir)
        download_emnist(name[len("emnist-"):], data_dir, mirror=mirror)
    return load_dataset(name, data_dir), data_dir


def load_run_data(run_dir, data_dir=None, *, download: bool = False) -> tuple[TrainConfig, PreparedData]:
    """Reopen a run's config and exactly the splits it trained on (checked by fingerprint).

    `data_dir` defaults to the folder recorded in RUN/config.json.
    """
    config, saved = read_run_config(run_dir)
    fingerprint = saved["data"]["fingerprint"]
    data_dir = data_dir or saved["data"].get("data_dir")
    dataset, data_dir = load_or_download(config.dataset, data_dir, download=download)
    if dataset.fingerprint != fingerprint:
        raise DataError(f"{data_dir}: {config.dataset} files differ from the ones {run_dir} was trained on "
                        f"(fingerprint {dataset.fingerprint[:12]} vs {fingerprint[:12]})")
    data = prepare_data(config, dataset)
    data.data_dir = str(Path(data_dir).resolve())
    return config, data


def prepare_data(config: TrainConfig, dataset) -> PreparedData:
    """Apply --limit-train and the validation split; compute the normalization statistics."""
    from .data import split_validation, subsample_stratified

    ds = dataset
    if config.limit_train is not None and config.limit_train < len(ds.y_train):
        keep = subsample_stratified(ds.y_train, config.limit_train, config.seed)
        ds = dataclasses.replace(
            ds,
            x_train=np.asarray(ds.x_train[keep]),
            y_train=np.asarray(ds.y_train[keep]),
            writers_train=None if ds.writers_train is None else np.asarray(ds.writers_train[keep]),
        )
    train_idx, val_idx = split_validation(ds, config.val_fraction, config.seed)
    x_train = np.ascontiguousarray(ds.x_train[train_idx])
    mean, std = _pixel_stats(x_train)
    return PreparedData(
        name=ds.name, classes=tuple(ds.classes),
        x_train=x_train, y_train=np.asarray(ds.y_train[train_idx], np.int64),
        x_val=np.ascontiguousarray(ds.x_train[val_idx]), y_val=np.asarray(ds.y_train[val_idx], np.int64),
        x_test=np.asarray(ds.x_test), y_test=np.asarray(ds.y_test, np.int64),
        mean=mean, std=std, fingerprint=ds.fingerprint, source=str(ds.source),
    )


def _pixel_stats(x: np.ndarray, chunk: int = 20_000) -> tuple[float, float]:
    total, total_sq, count = 0.0, 0.0, 0
    for start in range(0, len(x), chunk):
        part = x[start : start + chunk].astype(np.float64) / 255.0
        total += part.sum()
        total_sq += (part * part).sum()
        count += part.size
    mean = total / count
    return float(mean), float(math.sqrt(max(total_sq / count - mean * mean, 1e-12)))


# ----------------------------------------------------------------------------- run directory


def member_seed(seed: int, dropout: float, index: int) -> int:
    """Each member's own random stream: init, shuffling, augmentation, dropout."""
    return int(np.random.SeedSequence([seed, int(round(dropout * 1e6)), index]).generate_state(1)[0])


def library_versions() -> dict:
    import keras

    versions = {"emnist_cnn": __version__, "keras": keras.__version__, "backend": keras.backend.backend(),
                "numpy": np.__version__, "python": platform.python_version(), "platform": platform.platform()}
    # Kernel summation order follows the thread count and oneDNN: needed to rerun a run to the bit.
    versions["cpu_count"] = os.cpu_count()
    versions["env"] = {k: os.environ[k] for k in ("TF_ENABLE_ONEDNN_OPTS", "TF_DETERMINISTIC_OPS",
                                                  "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES") if k in os.environ}
    try:
        import tensorflow as tf

        versions["tensorflow"] = tf.__version__
        versions["tf_threads"] = {"intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
                                  "inter_op": tf.config.threading.get_inter_op_parallelism_threads()}
    except ImportError:
        pass
    return versions


def open_run(run_dir: Path, config: TrainConfig, data: PreparedData) -> TrainConfig:
    """Create RUN/config.json, or check that a resumed run is the same experiment.

    Returns the config to train with. Changing anything but the epoch count and
    checkpoint interval of an existing run is refused.
    """
    path = run_dir / "config.json"
    saved = check_compatible(run_dir, config)
    if saved is not None:
        old_fp = saved["data"]["fingerprint"]
        if old_fp != data.fingerprint:
            raise ConfigError(
                f"{run_dir} was trained on different data (fingerprint {old_fp[:12]} vs {data.fingerprint[:12]}); "
                "use the same data files or a new --run-dir"
            )
        saved["config"] = config.to_dict()
        saved["updated"] = _now()
        atomic_write_json(path, saved)
    else:
        atomic_write_json(path, {
            "config": config.to_dict(), "data": data.describe(), "versions": library_versions(),
            "created": _now(), "updated": _now(),
        })
    return config


def check_compatible(run_dir: Path, config: TrainConfig) -> dict | None:
    """Refuse a config that would change an existing run's experiment; returns its config.json.

    Checked before any data is loaded or downloaded, and again with the data's
    fingerprint once it is. Also refuses --epochs below what is already trained.
    """
    if not (Path(run_dir) / "config.json").exists():
        return None
    old, saved = read_run_config(run_dir)
    if not isinstance(saved.get("data"), dict) or "fingerprint" not in saved["data"]:
        raise RunDirError(f"{Path(run_dir) / 'config.json'}: unreadable run configuration (no data fingerprint)")
    old_d, new_d = old.to_dict(), config.to_dict()
    changed = [k for k in new_d if k not in RESUMABLE_CHANGES and old_d.get(k) != new_d[k]]
    if changed:
        details = "; ".join(f"{k}: run has {old_d.get(k)!r}, command asks {new_d[k]!r}" for k in changed)
        raise ConfigError(
            f"{run_dir} holds a different experiment ({details}); use a new --run-dir or the original settings"
        )
    done = max((read_state_epoch(state_path(Path(run_dir), d, i)) for d in config.dropouts
                for i in range(config.models)), default=0)
    if done > config.epochs:
        raise ConfigError(f"--epochs {config.epochs} is lower than the {done} epochs already trained in {run_dir}")
    return saved


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _append_invocation(run_dir: Path, record: dict) -> None:
    path = run_dir / "invocations.jsonl"
    old = path.read_text() if path.exists() else ""
    atomic_write_text(path, old + json.dumps(record, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------- members


@dataclass
class Member:
    dropout: float
    index: int
    seed: int
    model: object
    epoch: int = 0
    history: list[dict] = field(default_factory=list)
    val_probs: tuple[int, np.ndarray] | None = None  # (epoch, validation softmax) from the last epoch


def weights_path(run_dir: Path, dropout: float, epoch: int, index: int) -> Path:
    return run_dir / dropout_dirname(dropout) / "weights" / f"{epoch:03d}epochs_weights_model_{index}.weights.h5"


def state_path(run_dir: Path, dropout: float, index: int) -> Path:
    return run_dir / dropout_dirname(dropout) / "state" / f"model_{index}.npz"


def history_path(run_dir: Path, dropout: float, index: int) -> Path:
    return run_dir / dropout_dirname(dropout) / "history" / f"model_{index}.csv"


def errors_path(run_dir: Path, dropout: float) -> Path:
    return run_dir / dropout_dirname(dropout) / "history" / "errors.csv"


def _new_model(config: TrainConfig, data: PreparedData, dropout: float, seed: int, compiled: bool = True):
    import keras

    from .model import build_model, compile_model

    keras.utils.set_random_seed(seed)
    model = build_model(data.num_classes, dropout, data.mean, data.std, config.model)
    if compiled:
        compile_model(model, config.lr)
        model.optimizer.build(model.trainable_variables)
    return model


def _open_member(run_dir: Path, config: TrainConfig, data: PreparedData, dropout: float, index: int,
                 lr: float) -> Member:
    seed = member_seed(config.seed, dropout, index)
    model = _new_model(config, data, dropout, seed)
    member = Member(dropout, index, seed, model)
    meta = load_member_state(state_path(run_dir, dropout, index), model)
    if meta is not None:
        member.epoch = int(meta["epoch"])
    # Rows past the saved state belong to an epoch whose state never landed: it is trained again.
    rows = read_csv_rows(history_path(run_dir, dropout, index))
    member.history = [r for r in rows if int(r["epoch"]) <= member.epoch]
    if member.epoch > config.epochs:
        raise ConfigError(
            f"--epochs {config.epochs} is lower than the {member.epoch} epochs already trained in {run_dir}"
        )
    # Set after restoring the optimizer, so the value reaches the variable the train step reads.
    model.optimizer.learning_rate.assign(lr)
    return member


def _epoch_batches(member: Member, data: PreparedData, config: TrainConfig, epoch: int):
    """The member's (rng, permutation) for `epoch`: they depend only on (member seed, epoch),
    so a resumed run, or a fused one, draws exactly the same batches and warps."""
    rng = np.random.default_rng([member.seed, epoch])
    return rng, rng.permutation(len(data.y_train))


def _train_group_epoch(group: list[Member], config: TrainConfig, data: PreparedData, calib: np.ndarray,
                       ckpt_epochs: set[int], run_dir: Path, verbose: int, fused) -> None:
    """Train every member of `group` (all at the same epoch) for one epoch and record it.

    With a fused model all members take each step together; otherwise one after
    another. Both draw the same batches and give the same weights.
    """
    import keras

    from .model import copy_optimizer_state, fused_member_logs

    epoch = group[0].epoch + 1
    n, bs = len(data.y_train), config.batch_size
    steps = math.ceil(n / bs)
    if fused is None:
        for m in group:
            t0 = time.perf_counter()
            rng, perm = _epoch_batches(m, data, config, epoch)
            bar = keras.utils.Progbar(steps, verbose=1 if verbose else 0, unit_name="step")
            loss_sum = correct_sum = 0.0
            for step in range(steps):
                idx = perm[step * bs : (step + 1) * bs]
                xb = augment_batch(data.x_train[idx], rng, config.augment)
                logs = m.model.train_on_batch(xb, data.y_train[idx], return_dict=True)
                loss_sum += logs["loss"] * len(idx)
                correct_sum += logs["accuracy"] * len(idx)
                bar.update(step + 1, values=[("loss", logs["loss"]), ("accuracy", logs["accuracy"])])
            _finish_epoch(m, epoch, loss_sum / n, correct_sum / n, time.perf_counter() - t0, config, data,
                          calib, ckpt_epochs, run_dir)
        return
    t0 = time.perf_counter()
    for m in group:
        copy_optimizer_state(m.model.optimizer, fused.optimizer, m.model.trainable_variables)
    fused.optimizer.learning_rate.assign(group[0].model.optimizer.learning_rate)
    streams = [_epoch_batches(m, data, config, epoch) for m in group]
    bar = keras.utils.Progbar(steps, verbose=1 if verbose else 0, unit_name="step")
    sums = np.zeros((len(group), 2))
    for step in range(steps):
        idxs = [perm[step * bs : (step + 1) * bs] for _, perm in streams]
        xs = [augment_batch(data.x_train[idx], rng, config.augment) for (rng, _), idx in zip(streams, idxs)]
        logs = fused.train_on_batch(xs, [data.y_train[idx] for idx in idxs], return_dict=True)
        per = np.asarray(fused_member_logs(logs, len(group)))
        sums += per * len(idxs[0])
        bar.update(step + 1, values=[("loss", per[:, 0].mean()), ("accuracy", per[:, 1].mean())])
    train_seconds = (time.perf_counter() - t0) / len(group)
    for k, m in enumerate(group):
        copy_optimizer_state(fused.optimizer, m.model.optimizer, m.model.trainable_variables)
        _finish_epoch(m, epoch, sums[k, 0] / n, sums[k, 1] / n, train_seconds, config, data, calib, ckpt_epochs,
                      run_dir)


def _finish_epoch(member: Member, epoch: int, loss: float, accuracy: float, train_seconds: float,
                  config: TrainConfig, data: PreparedData, calib: np.ndarray, ckpt_epochs: set[int],
                  run_dir: Path) -> None:
    """BatchNormalization recalibration, validation, then checkpoint, history row and state, in that order."""
    from .model import predict_probabilities, recalibrate_batchnorm

    t0 = time.perf_counter()
    model = member.model
    if config.bn_recalibration_images > 0:
        recalibrate_batchnorm(model, calib)
    val_loss = val_acc = float("nan")
    if len(data.y_val):
        p = predict_probabilities(model, data.x_val)
        member.val_probs = (epoch, p)
        val_loss = evaluate_loss(p, data.y_val)
        val_acc = 1.0 - evaluate_error(p, data.y_val).pct / 100.0
    lr = float(keras_value(model.optimizer.learning_rate))
    # Training time (a fused epoch's shared equally among its members) plus recalibration and validation.
    seconds = train_seconds + time.perf_counter() - t0
    row = {"epoch": epoch, "loss": f"{loss:.6f}", "accuracy": f"{accuracy:.6f}",
           "val_loss": f"{val_loss:.6f}", "val_accuracy": f"{val_acc:.6f}", "learning_rate": f"{lr:.6g}",
           "seconds": f"{seconds:.2f}"}
    # Order matters for crash safety: checkpoint weights, then history, then state.
    # A state at epoch E therefore always has its history row and checkpoint file.
    if epoch in ckpt_epochs:
        save_weights_atomic(model, weights_path(run_dir, member.dropout, epoch, member.index))
    member.history = member.history + [row]
    write_csv_rows(history_path(run_dir, member.dropout, member.index), HISTORY_COLUMNS, member.history)
    save_member_state(state_path(run_dir, member.dropout, member.index), model, epoch,
                      {"seed": member.seed, "learning_rate": lr})
    member.epoch = epoch
    val_txt = f"val_loss {val_loss:.4f} val_error {100 * (1 - val_acc):.3f}%" if len(data.y_val) else "no val split"
    log.info("dropout %g model %d epoch %d/%d: loss %.4f accuracy %.2f%% %s lr %.3g (%.1f s)",
             member.dropout, member.index, epoch, config.epochs, loss, 100 * accuracy, val_txt, lr, seconds)


def keras_value(variable) -> float:
    import keras

    return float(keras.ops.convert_to_numpy(variable))


# ----------------------------------------------------------------------------- evaluation


def evaluate_checkpoint(run_dir: Path, config: TrainConfig, data: PreparedData, dropout: float,
                        epoch: int, members: dict[int, Member] | None = None) -> list[dict]:
    """Errors of every member and of the ensemble at one checkpoint, on val and test.

    Members held in memory at exactly `epoch` are used as they are (their weights
    are the checkpoint's) with the validation softmax of their last epoch; the
    others are loaded from their checkpoint files. All members predict in one pass.
    """
    from .model import build_stacked_model, predict_ensemble

    members = members or {}
    models, val = [], {}
    for i in range(config.models):
        m = members.get(i)
        if m is not None and m.epoch == epoch:
            models.append(m.model)
            if m.val_probs is not None and m.val_probs[0] == epoch:
                val[i] = m.val_probs[1]
            continue
        path = weights_path(run_dir, dropout, epoch, i)
        model = _new_model(config, data, dropout, 0, compiled=False)
        try:
            model.load_weights(path)
        except Exception as exc:  # h5py/keras raise many types for damaged files
            raise RunDirError(f"{path}: cannot load checkpoint weights ({exc})") from exc
        models.append(model)
    stacked = build_stacked_model(models)
    probs = {"test": list(predict_ensemble(stacked, data.x_test))}
    missing = [i for i in range(config.models) if i not in val]
    if len(data.y_val) and missing:
        # Reuse the stacked model when every member needs its validation pass (all loaded from files).
        subset = stacked if len(missing) == config.models else [models[i] for i in missing]
        for i, p in zip(missing, predict_ensemble(subset, data.x_val)):
            val[i] = p
    probs["val"] = [val.get(i) for i in range(config.models)]
    rows = []
    labels = {"val": data.y_val, "test": data.y_test}
    for split in ("val", "test"):
        if not len(labels[split]):
            continue
        for i, p in enumerate(probs[split]):
            rows.append(_error_row(epoch, str(i), split, evaluate_error(p, labels[split])))
        rows.append(_error_row(epoch, "ensemble", split,
                               evaluate_error(ensemble_probabilities(probs[split]), labels[split])))
    return rows


def _error_row(epoch: int, model: str, split: str, err: ErrorRate) -> dict:
    return {"epoch": epoch, "model": model, "split": split, "error_pct": f"{err.pct:.4f}",
            "n_errors": err.n_errors, "n": err.n}


def _record_checkpoint(run_dir: Path, dropout: float, epoch: int, rows: list[dict]) -> None:
    # The text table first: errors.csv is what marks a checkpoint as evaluated on resume,
    # so a kill between the two writes must leave errors.csv without it, not the reverse.
    test = [r for r in rows if r["split"] == "test"]
    if test:
        ens = next(r for r in test if r["model"] == "ensemble")
        lines = [f"epoch: {epoch} test error on ensemble: {float(ens['error_pct'])}"]
        lines += [str(float(r["error_pct"])) for r in test if r["model"] != "ensemble"]
        atomic_write_text(run_dir / dropout_dirname(dropout) / "history" / f"test_errors_epoch_{epoch:03d}.txt",
                          "\n".join(lines) + "\n")
    path = errors_path(run_dir, dropout)
    old = [r for r in read_csv_rows(path) if int(r["epoch"]) != epoch]
    write_csv_rows(path, ERRORS_COLUMNS, sorted(old + rows, key=lambda r: int(r["epoch"])))


def _evaluated_epochs(run_dir: Path, dropout: float) -> set[int]:
    return {int(r["epoch"]) for r in read_csv_rows(errors_path(run_dir, dropout)) if r["model"] == "ensemble"}


# ----------------------------------------------------------------------------- entry point


def train_ensembles(config: TrainConfig, run_dir, data: PreparedData, *, fixed_lr: float | None = None,
                    verbose: int = 1, fused: bool | None = None) -> list[dict]:
    """Train (or resume) every ensemble of the run; returns the last checkpoint's error rows.

    `fixed_lr` sets the learning rate for the epochs this call trains (the
    reference's "continue with a fixed learning rate"); without it the run's
    configured rate is used. `fused` trains each ensemble's members in one
    compiled step (same results as one by one); None: on a GPU only.
    """
    run_dir = Path(run_dir)
    with RunLock(run_dir):
        _remove_stale_temporaries(run_dir)
        config = open_run(run_dir, config, data)
        _append_invocation(run_dir, {"time": _now(), "argv": sys.argv, "epochs": config.epochs,
                                     "fixed_lr": fixed_lr, "fused": fused})
        lr = fixed_lr if fixed_lr is not None else config.lr
        ckpts = config.checkpoint_epochs()
        calib_rng = np.random.default_rng([config.seed, 7])
        n_cal = min(config.bn_recalibration_images, len(data.y_train))
        calib = data.x_train[np.sort(calib_rng.choice(len(data.y_train), n_cal, replace=False))]
        final_rows: list[dict] = []
        use_fused = fused_by_default() if fused is None else fused
        for dropout in config.dropouts:
            members: dict[int, Member] = {}
            fused_models: dict[tuple[int, ...], object] = {}  # built once per group of members
            done = _evaluated_epochs(run_dir, dropout)
            for target in ckpts:
                for i in range(config.models):
                    if i not in members:
                        members[i] = _open_member(run_dir, config, data, dropout, i, lr)
                # Epoch by epoch, the members furthest behind first: after an interruption
                # they catch up, then all train together again.
                while pending := [m for m in members.values() if m.epoch < target]:
                    low = min(m.epoch for m in pending)
                    group = [m for m in pending if m.epoch == low]
                    model = _fused_model(group, fused_models, lr) if use_fused else None
                    _train_group_epoch(group, config, data, calib, set(ckpts), run_dir, verbose, model)
                for i, m in members.items():
                    # A checkpoint epoch can be new to an epoch already trained (a changed --epochs
                    # or --checkpoint-every): its state holds exactly those weights.
                    if m.epoch == target and not weights_path(run_dir, dropout, target, i).exists():
                        save_weights_atomic(m.model, weights_path(run_dir, dropout, target, i))
                if target not in done and _has_all_weights(run_dir, config, dropout, target):
                    rows = evaluate_checkpoint(run_dir, config, data, dropout, target, members)
                    _record_checkpoint(run_dir, dropout, target, rows)
                    done.add(target)
                    ens = {r["split"]: r for r in rows if r["model"] == "ensemble"}
                    log.info("dropout %g epoch %d: ensemble error val %s test %s", dropout, target,
                             _pct(ens.get("val")), _pct(ens.get("test")))
            last = ckpts[-1]
            rows = [dict(r, dropout=dropout) for r in read_csv_rows(errors_path(run_dir, dropout))
                    if int(r["epoch"]) == last]
            if not rows:
                log.warning("dropout %g: no evaluation at epoch %d (not every member has its weights)",
                            dropout, last)
            final_rows += rows
            del members, fused_models
        return final_rows


def fused_by_default() -> bool:
    """Fuse members where it pays: on a GPU, whose steps a single 600k-parameter member leaves mostly idle.

    On a CPU one member's step already keeps every core busy; fusing there gains
    little and holds every member's activations at once (see README, Performance).
    """
    from .model import accelerator_available

    return accelerator_available()


def _fused_model(group: list[Member], cache: dict, lr: float):
    """The fused model for `group`, or None when it has one member or its optimizers' step counts differ."""
    from .model import build_fused_model

    if len(group) < 2:
        return None
    steps = {int(keras_value(m.model.optimizer.iterations)) for m in group}
    if len(steps) > 1:
        log.info("members %s have taken different numbers of optimizer steps (%s); training them one by one",
                 [m.index for m in group], sorted(steps))
        return None
    key = tuple(m.index for m in group)
    if key not in cache:
        cache[key] = build_fused_model([m.model for m in group], lr)
    return cache[key]


def _remove_stale_temporaries(run_dir: Path) -> None:
    """Delete temp files a killed process left mid-write (we hold the lock, so none is live)."""
    for pattern in (".tmp-*", ".*.tmp"):
        for path in run_dir.rglob(pattern):
            log.debug("removing %s, left by an interrupted write", path)
            path.unlink(missing_ok=True)


def _has_all_weights(run_dir: Path, config: TrainConfig, dropout: float, epoch: int) -> bool:
    return all(weights_path(run_dir, dropout, epoch, i).exists() for i in range(config.models))


def _pct(row: dict | None) -> str:
    return "-" if row is None else f"{float(row['error_pct']):.3f}%"


def train_and_evaluate(config: TrainConfig, run_dir, *, data_dir=None, mirror=None, fixed_lr=None,
                       dataset=None, download: bool = True, verbose: int = 1,
                       fused: bool | None = None) -> list[dict]:
    """Load (or download) the data, then train and evaluate every ensemble in `run_dir`."""
    check_compatible(Path(run_dir), config)  # before a download or a long parse, not after
    if dataset is None:
        dataset, data_dir = load_or_download(config.dataset, data_dir, mirror=mirror, download=download)
    if dataset.name != config.dataset:
        raise DataError(f"dataset {dataset.name} given for a run configured with {config.dataset}")
    data = prepare_data(config, dataset)
    if data_dir is not None:
        data.data_dir = str(Path(data_dir).resolve())
    log.info("data: %s, %d train / %d val / %d test images, %d classes", data.name, len(data.y_train),
             len(data.y_val), len(data.y_test), data.num_classes)
    return train_ensembles(config, run_dir, data, fixed_lr=fixed_lr, verbose=verbose, fused=fused)
