"""Evaluate a run's checkpoints, or loose weight files, as members and ensembles, and write the tables.

Per dropout rate: every member, the ensemble (mean softmax), the best member
and the best-k ensembles, all chosen on the validation split; the evaluated
split never drives a choice.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..config import DEFAULT_DATASET, EMNIST_DIGITS_MEAN, EMNIST_DIGITS_STD, AugmentConfig
from ..core.metrics import confusion_matrix, ensemble_probabilities, evaluate_error, find_mistakes
from ..core.results import BestK, EnsembleEvaluation, Evaluation, ModelErrors
from ..core.selection import rank_on_validation
from ..core.stats import mcnemar_exact
from ..errors import ConfigError, DataError
from ..io.download import load_or_download
from ..io.files import atomic_write_text
from ..io.rundir import EVALUATION_FILES, RunDir, dropout_dirname, write_mistakes
from ..io.weights import load_checkpoint_model, load_member_model
from ..training.prepare import load_run_data

__all__ = ["evaluate_ensemble", "predict_with_tta", "evaluate_run", "evaluate_weights"]


def evaluate_ensemble(
    member_probabilities: list[np.ndarray],
    labels: np.ndarray,
    names: list[str],
    val_probabilities: list[np.ndarray] | None = None,
    val_labels: np.ndarray | None = None,
) -> EnsembleEvaluation:
    """Errors of each member and of their mean, and the choices made on validation.

    With validation outputs, `best_member` is the member with the lowest
    validation error (ties: first), and `best_k[k-1]` is the ensemble of the k
    members ranked best on validation, for k = 1..N. The evaluated split never
    drives a choice.
    """
    has_val = val_probabilities is not None and val_labels is not None and len(val_labels) > 0

    def errors(name, chosen) -> ModelErrors:
        test = evaluate_error(ensemble_probabilities([member_probabilities[i] for i in chosen]), labels)
        if not has_val:
            return ModelErrors(name, test)
        return ModelErrors(name, test, evaluate_error(ensemble_probabilities([val_probabilities[i] for i in chosen]),
                                                      val_labels))

    members = tuple(errors(name, [i]) for i, name in enumerate(names))
    ensemble = errors("ensemble", range(len(names)))
    if not has_val:
        return EnsembleEvaluation(members, ensemble)
    order = rank_on_validation({i: m.val for i, m in enumerate(members)})
    # Paired on the same images: is the ensemble really better than the member one would pick alone?
    ens_wrong = np.argmax(ensemble_probabilities(member_probabilities), axis=1) != labels
    versus = mcnemar_exact(ens_wrong, np.argmax(member_probabilities[order[0]], axis=1) != labels)
    best_k = []
    for k in range(1, len(order) + 1):
        chosen = order[:k]
        e = errors("", chosen)
        best_k.append(BestK(k, tuple(names[i] for i in chosen), e.val, e.error))
    return EnsembleEvaluation(members, ensemble, members[order[0]], versus, tuple(best_k))


def predict_with_tta(model, images: np.ndarray, tta: int, augment_cfg, seed: int = 0) -> np.ndarray:
    """Softmax averaged over the image and `tta` augmented copies (0 = plain prediction)."""
    from ..core.augment import augment_batch
    from ..core.model import predict_batch, predict_probabilities

    probs = predict_probabilities(model, images)
    if tta <= 0 or len(images) == 0:
        return probs
    rng = np.random.default_rng([seed, 1234])
    total = probs.astype(np.float64)
    for _ in range(tta):
        views = []
        for start in range(0, len(images), 2000):
            x = np.asarray(augment_batch(images[start : start + 2000], rng, augment_cfg))
            views.append(np.asarray(predict_batch(model, x)))
        total += np.concatenate(views)
    return (total / (tta + 1)).astype(np.float32)


def evaluate_run(run_dir, *, dropouts=None, epoch="latest", split: str = "test", tta: int = 0,
                 data_dir=None, data=None, config=None, write: bool = True) -> Evaluation:
    """Evaluate a run's ensembles at one checkpoint and write the tables next to it.

    Per dropout rate: every member, the ensemble (mean softmax), the best member
    and the best-k ensembles chosen on the validation split. Writes
    `RUN/dropout_X/evaluation/<split>_epoch_NNN/{evaluation.json,
    confusion_matrix.csv, misclassified.csv}`.
    """
    run = RunDir.of(run_dir)
    if split not in ("test", "val"):
        raise ConfigError(f"--split must be test or val, got {split!r}")
    if data is None or config is None:
        config, data = load_run_data(run, data_dir)
    rates = list(config.dropouts) if dropouts is None else [config.find_dropout(d) for d in dropouts]
    x, y = (data.x_test, data.y_test) if split == "test" else (data.x_val, data.y_val)
    if len(y) == 0:
        raise ConfigError(f"--split {split}: this run has no {split} images (val_fraction 0?)")
    ensembles, all_probs, all_names = [], [], []
    for d in rates:
        e = _checkpoint_epoch(run, config.models, d, epoch)
        probs, val_probs = _predict_checkpoint(run, config, data, d, e, x, split, tta)
        names = [str(i) for i in range(config.models)]
        result = replace(evaluate_ensemble(probs, y, names, val_probs or None, data.y_val if val_probs else None),
                         dropout=d, epoch=e, tta=tta)
        if write:
            result = _write_evaluation(run.evaluation_dir(d, split, e, tta), result, ensemble_probabilities(probs),
                                       y, split, data.classes)
        ensembles.append(result)
        all_probs += probs
        all_names += [f"{dropout_dirname(d)}/model_{n}" for n in names]
    return Evaluation(data.name, split, tta, evaluate_ensemble(all_probs, y, all_names), tuple(ensembles))


def _checkpoint_epoch(run: RunDir, models: int, dropout: float, epoch) -> int:
    """The checkpoint `epoch` asks for ("latest" or a number), checked to hold every member."""
    epochs = run.complete_checkpoints(dropout, models)
    if not epochs:
        raise ConfigError(f"{run.dropout_dir(dropout)}: no checkpoint with all {models} members yet")
    e = run.choose_checkpoint(dropout, models, epoch)
    if e is None:
        raise ConfigError(f"--epoch {epoch}: no checkpoint for dropout {dropout:g}; available: "
                          f"{', '.join(map(str, epochs))}")
    return e


def _predict_checkpoint(run: RunDir, config, data, dropout: float, epoch: int, x, split: str, tta: int):
    """Every member's softmax on `x` and on the validation split ([] when the run has none)."""
    from ..core.model import build_member_predictor, predict_members

    models = [load_checkpoint_model(run, dropout, epoch, i, config=config, data=data) for i in range(config.models)]
    if tta:
        def predict(images):
            return [predict_with_tta(m, images, tta, config.augment, seed=i) for i, m in enumerate(models)]
    else:
        predictor = build_member_predictor(models)  # built once for both splits

        def predict(images):
            return list(predict_members(predictor, images))  # all members in one pass over the images
    probs = predict(x)
    if split == "val":
        return probs, probs
    return probs, predict(data.x_val) if len(data.y_val) else []


def evaluate_weights(paths, *, dataset: str = DEFAULT_DATASET, data_dir=None, split: str = "test",
                     tta: int = 0, out_dir=None) -> Evaluation:
    """Evaluate weight files outside a run as one ensemble (ours, or the reference's Keras 2 files).

    Normalization statistics come from the run each file belongs to when it
    has one (RUN/config.json), else the reference's EMNIST Digits values.
    """
    from ..core.model import predict_members

    if split != "test":
        raise ConfigError("--split with --weights: only test is defined outside a run")
    paths = [Path(p) for p in paths]
    for p in paths:
        if not p.is_file():
            raise DataError(f"{p}: weight file not found")
    ds, _ = load_or_download(dataset, data_dir, download=True)
    models = []
    for p in paths:
        mean, std = _file_normalization(p)
        models.append(load_member_model(p, num_classes=ds.num_classes, dropout=0.0, mean=mean, std=std))
    names = [p.name for p in paths]
    x = np.asarray(ds.x_test)
    if tta:
        probs = [predict_with_tta(m, x, tta, AugmentConfig()) for m in models]
    else:
        probs = list(predict_members(models, x))  # every file's model in one pass over the images
    y = np.asarray(ds.y_test)
    evaluation = Evaluation(ds.name, split, tta, evaluate_ensemble(probs, y, names))
    if out_dir is not None:
        evaluation = replace(evaluation, overall=_write_evaluation(
            Path(out_dir), evaluation.overall, ensemble_probabilities(probs), y, split, ds.classes,
            header={"dataset": ds.name, "split": split, "tta": tta}))
    return evaluation


def _file_normalization(path: Path) -> tuple[float, float]:
    """(mean, std) of the run a weights file belongs to (RUN/dropout_X/weights/), else EMNIST Digits'."""
    found = RunDir.find_checkpoint(path)
    if found is None:
        return EMNIST_DIGITS_MEAN, EMNIST_DIGITS_STD
    _, mean, std = found[0].read_normalization()
    return mean, std


def _write_evaluation(folder: Path, result: EnsembleEvaluation, ens_probs: np.ndarray, labels: np.ndarray,
                      split: str, classes, header: dict | None = None) -> EnsembleEvaluation:
    """Write evaluation.json (`header`'s keys first), confusion_matrix.csv and misclassified.csv; the result
    with their paths."""
    cm = confusion_matrix(labels, np.argmax(ens_probs, axis=1), len(classes))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["label", *classes])
    for c, row in zip(classes, cm):
        w.writerow([c, *row.tolist()])
    atomic_write_text(folder / EVALUATION_FILES["confusion_matrix"], buf.getvalue())
    write_mistakes(folder / EVALUATION_FILES["misclassified"], {split: find_mistakes(ens_probs, labels)})
    result = replace(result, files={key: str(folder / name) for key, name in EVALUATION_FILES.items()})
    atomic_write_text(folder / EVALUATION_FILES["evaluation"],
                      json.dumps({**(header or {}), **result.to_json()}, indent=2) + "\n")
    return result
