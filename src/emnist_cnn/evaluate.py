"""Error rates of members and ensembles from softmax outputs, and their tables."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ErrorRate:
    n_errors: int
    n: int

    @property
    def pct(self) -> float:
        return 100.0 * self.n_errors / self.n if self.n else float("nan")

    def __str__(self) -> str:
        if not self.n:
            return "-"
        return f"{self.pct:.3f}% ({self.n_errors}/{self.n})"


def evaluate_error(probabilities: np.ndarray, labels: np.ndarray) -> ErrorRate:
    """Top-1 error of (N, C) probabilities against integer labels."""
    labels = np.asarray(labels)
    if len(labels) == 0:
        return ErrorRate(0, 0)
    wrong = int(np.count_nonzero(np.argmax(probabilities, axis=1) != labels))
    return ErrorRate(wrong, int(len(labels)))


def ensemble_probabilities(member_probabilities: list[np.ndarray] | np.ndarray) -> np.ndarray:
    """The ensemble's prediction: the mean of the members' softmax outputs."""
    return np.mean(np.stack(list(member_probabilities)), axis=0)


def evaluate_loss(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Mean cross-entropy, clipped as Keras clips it."""
    if len(labels) == 0:
        return float("nan")
    p = np.clip(probabilities[np.arange(len(labels)), labels], 1e-7, 1.0)
    return float(-np.mean(np.log(p)))


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain aligned text table."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    return "\n".join(lines)


# ----------------------------------------------------------------------------- ensembles


def evaluate_ensemble(
    member_probabilities: list[np.ndarray],
    labels: np.ndarray,
    names: list[str],
    val_probabilities: list[np.ndarray] | None = None,
    val_labels: np.ndarray | None = None,
) -> dict:
    """Errors of each member and of their mean, and the choices made on validation.

    With validation outputs, `best_member` is the member with the lowest
    validation error (ties: first), and `best_k[k-1]` is the ensemble of the k
    members ranked best on validation, for k = 1..N. The evaluated split never
    drives a choice. Returns a JSON-ready dict.
    """
    has_val = val_probabilities is not None and val_labels is not None and len(val_labels) > 0
    members = []
    val_errors = []
    for i, (name, p) in enumerate(zip(names, member_probabilities)):
        err = evaluate_error(p, labels)
        row = {"name": name, "error_pct": err.pct, "n_errors": err.n_errors}
        if has_val:
            v = evaluate_error(val_probabilities[i], val_labels)
            row.update(val_error_pct=v.pct, val_n_errors=v.n_errors)
            val_errors.append(v.n_errors)
        members.append(row)
    ens = evaluate_error(ensemble_probabilities(member_probabilities), labels)
    result = {"n": int(len(labels)), "members": members,
              "ensemble": {"error_pct": ens.pct, "n_errors": ens.n_errors}}
    if has_val:
        v = evaluate_error(ensemble_probabilities(val_probabilities), val_labels)
        result["ensemble"].update(val_error_pct=v.pct, val_n_errors=v.n_errors)
        result["n_val"] = int(len(val_labels))
        order = sorted(range(len(names)), key=lambda i: (val_errors[i], i))
        result["best_member"] = dict(members[order[0]])
        best_k = []
        for k in range(1, len(order) + 1):
            chosen = order[:k]
            e = evaluate_error(ensemble_probabilities([member_probabilities[i] for i in chosen]), labels)
            ve = evaluate_error(ensemble_probabilities([val_probabilities[i] for i in chosen]), val_labels)
            best_k.append({"k": k, "members": [names[i] for i in chosen], "val_error_pct": ve.pct,
                           "val_n_errors": ve.n_errors, "error_pct": e.pct, "n_errors": e.n_errors})
        result["best_k"] = best_k
    return result


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts: rows are true classes, columns predicted classes."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (np.asarray(labels), np.asarray(predictions)), 1)
    return cm


def misclassified_rows(probabilities: np.ndarray, labels: np.ndarray) -> list[dict]:
    """One row per wrong prediction: index, true label, predicted label, its probability."""
    pred = np.argmax(probabilities, axis=1)
    wrong = np.flatnonzero(pred != labels)
    return [{"index": int(i), "label": int(labels[i]), "predicted": int(pred[i]),
             "confidence": float(probabilities[i, pred[i]])} for i in wrong]


def predict_with_tta(model, images: np.ndarray, tta: int, augment_cfg, seed: int = 0) -> np.ndarray:
    """Softmax averaged over the image and `tta` augmented copies (0 = plain prediction)."""
    from .augment import augment_batch
    from .model import predict_probabilities

    probs = predict_probabilities(model, images)
    if tta <= 0 or len(images) == 0:
        return probs
    rng = np.random.default_rng([seed, 1234])
    total = probs.astype(np.float64)
    for _ in range(tta):
        views = []
        for start in range(0, len(images), 2000):
            x = np.asarray(augment_batch(images[start : start + 2000], rng, augment_cfg))
            views.append(np.asarray(model.predict_on_batch(x)))
        total += np.concatenate(views)
    return (total / (tta + 1)).astype(np.float32)


# ----------------------------------------------------------------------------- runs and weight files


def available_epochs(run_dir, dropout: float, models: int) -> list[int]:
    """Checkpoint epochs at which every member's weights exist."""
    from .train import weights_path

    folder = weights_path(run_dir, dropout, 0, 0).parent
    epochs = sorted({int(p.name[:3]) for p in folder.glob("*epochs_weights_model_*.weights.h5")
                     if p.name[:3].isdigit()})
    return [e for e in epochs if all(weights_path(run_dir, dropout, e, i).exists() for i in range(models))]


def evaluate_run(run_dir, *, dropouts=None, epoch="latest", split: str = "test", tta: int = 0,
                 data_dir=None, data=None, config=None, write: bool = True) -> dict:
    """Evaluate a run's ensembles at one checkpoint and write the tables next to it.

    Per dropout rate: every member, the ensemble (mean softmax), the best member
    and the best-k ensembles chosen on the validation split. Writes
    `RUN/dropout_X/evaluation/<split>_epoch_NNN/{evaluation.json,
    confusion_matrix.csv, misclassified.csv}`. Returns a JSON-ready dict.
    """
    from pathlib import Path

    from .config import dropout_dirname
    from .errors import ConfigError
    from .model import build_model, build_stacked_model, predict_ensemble
    from .train import load_run_data, weights_path

    run_dir = Path(run_dir)
    if split not in ("test", "val"):
        raise ConfigError(f"--split must be test or val, got {split!r}")
    if data is None or config is None:
        config, data = load_run_data(run_dir, data_dir)
    rates = list(config.dropouts) if dropouts is None else list(dropouts)
    for d in rates:
        if d not in config.dropouts:
            raise ConfigError(f"--dropout {d:g} is not in this run (it has {', '.join(f'{x:g}' for x in config.dropouts)})")
    x, y = (data.x_test, data.y_test) if split == "test" else (data.x_val, data.y_val)
    if len(y) == 0:
        raise ConfigError(f"--split {split}: this run has no {split} images (val_fraction 0?)")
    ensembles, all_probs, all_names = [], [], []
    for d in rates:
        epochs = available_epochs(run_dir, d, config.models)
        if not epochs:
            raise ConfigError(f"{run_dir / dropout_dirname(d)}: no checkpoint with all {config.models} members yet")
        e = epochs[-1] if epoch in (None, "latest") else int(epoch)
        if e not in epochs:
            raise ConfigError(f"--epoch {e}: no checkpoint for dropout {d:g}; available: {', '.join(map(str, epochs))}")
        models = []
        for i in range(config.models):
            models.append(build_model(data.num_classes, d, data.mean, data.std, config.model))
            _load_weights(models[-1], weights_path(run_dir, d, e, i))
        names = [str(i) for i in range(config.models)]
        stacked = None if tta else build_stacked_model(models)  # built once for both splits
        if tta:
            probs = [predict_with_tta(m, x, tta, config.augment, seed=i) for i, m in enumerate(models)]
        else:
            probs = list(predict_ensemble(stacked, x))  # all members in one pass over the images
        if split == "val":
            val_probs = probs
        elif not len(data.y_val):
            val_probs = []
        elif tta:
            val_probs = [predict_with_tta(m, data.x_val, tta, config.augment, seed=i) for i, m in enumerate(models)]
        else:
            val_probs = list(predict_ensemble(stacked, data.x_val))
        del models, stacked
        result = {"dropout": d, "epoch": e, "tta": tta,
                  **evaluate_ensemble(probs, y, names, val_probs or None, data.y_val if val_probs else None)}
        ens_probs = ensemble_probabilities(probs)
        if write:
            folder = run_dir / dropout_dirname(d) / "evaluation" / (
                f"{split}_epoch_{e:03d}" + (f"_tta{tta}" if tta else ""))
            result["files"] = _write_evaluation(folder, result, ens_probs, y, data.classes)
        ensembles.append(result)
        all_probs += probs
        all_names += [f"dropout_{d:g}/model_{n}" for n in names]
    overall = evaluate_ensemble(all_probs, y, all_names)
    return {"dataset": data.name, "split": split, "n": int(len(y)), "tta": tta,
            "members": overall["members"], "ensemble": overall["ensemble"], "ensembles": ensembles}


def evaluate_weights(paths, *, dataset: str = "emnist-digits", data_dir=None, split: str = "test",
                     tta: int = 0, out_dir=None) -> dict:
    """Evaluate weight files outside a run as one ensemble (ours, or the reference's Keras 2 files).

    Normalization statistics come from the run each file belongs to when it
    has one (RUN/config.json), else the reference's EMNIST Digits values.
    """
    import json
    from pathlib import Path

    from .config import AugmentConfig
    from .errors import ConfigError, DataError
    from .model import EMNIST_DIGITS_MEAN, EMNIST_DIGITS_STD, build_model, predict_ensemble
    from .train import load_or_download

    if split != "test":
        raise ConfigError("--split with --weights: only test is defined outside a run")
    paths = [Path(p) for p in paths]
    for p in paths:
        if not p.is_file():
            raise DataError(f"{p}: weight file not found")
    ds, _ = load_or_download(dataset, data_dir, download=True)
    models, names = [], []
    for p in paths:
        mean, std = EMNIST_DIGITS_MEAN, EMNIST_DIGITS_STD
        run_config = p.resolve().parent.parent.parent / "config.json"
        if run_config.is_file():
            try:
                saved = json.loads(run_config.read_text())["data"]
                mean, std = saved["mean"], saved["std"]
            except (OSError, ValueError, KeyError) as exc:
                raise DataError(f"{run_config}: unreadable run configuration ({exc})") from exc
        model = build_model(ds.num_classes, 0.0, mean, std)
        _load_weights(model, p)
        models.append(model)
        names.append(p.name)
    x = np.asarray(ds.x_test)
    if tta:
        probs = [predict_with_tta(m, x, tta, AugmentConfig()) for m in models]
    else:
        probs = list(predict_ensemble(models, x))  # every file's model in one pass over the images
    y = np.asarray(ds.y_test)
    result = {"dataset": ds.name, "split": split, "tta": tta, **evaluate_ensemble(probs, y, names)}
    if out_dir is not None:
        result["files"] = _write_evaluation(Path(out_dir), result, ensemble_probabilities(probs), y, ds.classes)
    return result


def _load_weights(model, path) -> None:
    from .interop import load_weights_any

    load_weights_any(model, path)


def _write_evaluation(folder, result: dict, ens_probs: np.ndarray, labels: np.ndarray, classes) -> dict:
    import csv
    import io
    import json

    from .rundir import atomic_write_text

    cm = confusion_matrix(labels, np.argmax(ens_probs, axis=1), len(classes))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["label", *classes])
    for c, row in zip(classes, cm):
        w.writerow([c, *row.tolist()])
    atomic_write_text(folder / "confusion_matrix.csv", buf.getvalue())
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["index", "label", "predicted", "confidence"], lineterminator="\n")
    w.writeheader()
    for row in misclassified_rows(ens_probs, labels):
        w.writerow({**row, "confidence": f"{row['confidence']:.6f}"})
    atomic_write_text(folder / "misclassified.csv", buf.getvalue())
    files = {"confusion_matrix": str(folder / "confusion_matrix.csv"),
             "misclassified": str(folder / "misclassified.csv"),
             "evaluation": str(folder / "evaluation.json")}
    atomic_write_text(folder / "evaluation.json", json.dumps({**result, "files": files}, indent=2) + "\n")
    return files


def format_evaluation(result: dict) -> str:
    """Human-readable tables for `evaluate_run` / `evaluate_weights` results."""
    split = result["split"]
    blocks = result.get("ensembles") or [result]
    out = [f"{result['dataset']}, {split} split, {result['n']} images"
           + (f", test-time augmentation x{result['tta']}" if result.get("tta") else "")]
    for b in blocks:
        has_val = "best_member" in b
        head = ["member"] + (["val error"] if has_val else []) + [f"{split} error"]
        rows = []
        for m in b["members"] + [{"name": "ensemble", **b["ensemble"]}]:
            row = [m["name"] if m["name"] == "ensemble" else f"model {m['name']}"]
            if has_val:
                row.append(f"{m['val_error_pct']:.3f}% ({m['val_n_errors']})")
            row.append(f"{m['error_pct']:.3f}% ({m['n_errors']}/{b.get('n', result['n'])})")
            rows.append(row)
        if "dropout" in b:
            out.append(f"\ndropout {b['dropout']:g}, epoch {b['epoch']}:")
        out.append(format_table(head, rows))
        if has_val:
            best = b["best_member"]
            out.append(f"best member on validation: model {best['name']}, {split} error "
                       f"{best['error_pct']:.3f}% ({best['n_errors']})")
            out.append("best-k ensembles (members ranked on validation):")
            out.append(format_table(["k", "val error", f"{split} error", "members"], [
                [str(r["k"]), f"{r['val_error_pct']:.3f}%", f"{r['error_pct']:.3f}% ({r['n_errors']})",
                 " ".join(r["members"])] for r in b["best_k"]]))
        if b.get("files"):
            out.append("wrote " + ", ".join(b["files"].values()))
    if len(blocks) > 1:
        e = result["ensemble"]
        out.append(f"\nall {len(result['members'])} members together: {split} error "
                   f"{e['error_pct']:.3f}% ({e['n_errors']}/{result['n']})")
    return "\n".join(out)
