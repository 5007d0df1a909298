"""The splits a run trains and evaluates on: --limit-train, the validation split, normalization statistics."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import TrainConfig
from ..errors import DataError, RunDirError
from ..io.datasets import Dataset, split_validation, subsample_stratified
from ..io.download import load_or_download
from ..io.rundir import RunDir

__all__ = ["PreparedData", "prepare_data", "load_run_data"]


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
        """What config.json records of the data."""
        return {
            "name": self.name, "fingerprint": self.fingerprint, "source": self.source,
            "data_dir": self.data_dir,
            "n_train": int(len(self.y_train)), "n_val": int(len(self.y_val)), "n_test": int(len(self.y_test)),
            "classes": "".join(self.classes), "mean": self.mean, "std": self.std,
        }


def prepare_data(config: TrainConfig, dataset: Dataset, data_dir=None) -> PreparedData:
    """Apply --limit-train and the validation split; compute the normalization statistics."""
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
        data_dir=None if data_dir is None else str(Path(data_dir).resolve()),
    )


def load_run_data(run_dir, data_dir=None, *, download: bool = False) -> tuple[TrainConfig, PreparedData]:
    """Reopen a run's config and exactly the splits it trained on (checked by fingerprint).

    `data_dir` defaults to the folder recorded in RUN/config.json.
    """
    run = RunDir.of(run_dir)
    saved = run.read_record()
    config = run.read_config()
    fingerprint = saved["data"].get("fingerprint")
    if not isinstance(fingerprint, str):
        raise RunDirError(f"{run.config_path}: unreadable run configuration (no data fingerprint)")
    data_dir = data_dir or saved["data"].get("data_dir")
    dataset, data_dir = load_or_download(config.dataset, data_dir, download=download)
    if dataset.fingerprint != fingerprint:
        raise DataError(f"{data_dir}: {config.dataset} files differ from the ones {run_dir} was trained on "
                        f"(fingerprint {dataset.fingerprint[:12]} vs {fingerprint[:12]})")
    return config, prepare_data(config, dataset, data_dir)


def _pixel_stats(x: np.ndarray, chunk: int = 20_000) -> tuple[float, float]:
    total, total_sq, count = 0.0, 0.0, 0
    for start in range(0, len(x), chunk):
        part = x[start : start + chunk].astype(np.float64) / 255.0
        total += part.sum()
        total_sq += (part * part).sum()
        count += part.size
    mean = total / count
    return float(mean), float(math.sqrt(max(total_sq / count - mean * mean, 1e-12)))
