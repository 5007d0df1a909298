"""The run directory: the one owner of its layout and of typed reads of what it records.

Layout (kept close to the reference's):

    RUN/config.json                          every setting, versions, data fingerprint
    RUN/invocations.jsonl                    one line per train/run/import command on this run
    RUN/dropout_0.2/weights/016epochs_weights_model_0.weights.h5
    RUN/dropout_0.2/state/model_0.npz        weights + optimizer + RNG state + epoch
    RUN/dropout_0.2/history/model_0.csv      one row per epoch
    RUN/dropout_0.2/history/errors.csv       per checkpoint, member and ensemble, val and test
    RUN/dropout_0.2/history/test_errors_epoch_016.txt   the reference's format
    RUN/dropout_0.2/history/misclassified_epoch_016.csv the ensemble's wrong val and test predictions
    RUN/tensorboard/dropout_0.2/model_0/, .../ensemble/   TensorBoard event files
    RUN/tracking/mlflow.json                 the MLflow run this run logs into, and what it has received
    RUN/dropout_0.2/evaluation/test_epoch_016/          `emnist-cnn evaluate` tables
    RUN/plot_history/*.png, RUN/report.html, RUN/export_json_h5/
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import platform
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .. import __version__
from ..config import TrainConfig
from ..core.metrics import ErrorRate, Mistake
from ..core.results import EnsembleEvaluation
from ..errors import ConfigError, RunDirError, format_one_line
from .files import RunLock, atomic_write_json, atomic_write_text, read_csv_rows, write_csv_rows
from .state import read_state_epoch

__all__ = ["HISTORY_COLUMNS", "ERRORS_COLUMNS", "EVALUATION_FILES", "ErrorRecord", "RunDir", "dropout_dirname",
           "make_history_row", "parse_checkpoint_epoch", "choose_image_preprocessing", "collect_versions",
           "format_utc_now", "MISCLASSIFIED_COLUMNS", "write_mistakes", "read_mistakes"]

log = logging.getLogger(__name__)

HISTORY_COLUMNS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "seconds")
# What `emnist-cnn evaluate` writes into RUN/dropout_X/evaluation/<split>_epoch_NNN/.
EVALUATION_FILES = {"confusion_matrix": "confusion_matrix.csv", "misclassified": "misclassified.csv",
                    "evaluation": "evaluation.json"}
ERRORS_COLUMNS = ("epoch", "model", "split", "error_pct", "n_errors", "n")
# Both mistake files: history/misclassified_epoch_NNN.csv and evaluate's misclassified.csv.
MISCLASSIFIED_COLUMNS = ("split", "index", "label", "predicted", "confidence")
_WEIGHTS_RE = re.compile(r"^(\d+)epochs_weights_model_(\d+)\.weights\.h5$")


def dropout_dirname(rate: float) -> str:
    """Folder name per dropout rate, as the reference named it: dropout_0.2."""
    return f"dropout_{rate:g}"


@dataclass(frozen=True)
class ErrorRecord:
    """One errors.csv row: a member ("0", "1", ...) or "ensemble", on "val" or "test", at a checkpoint."""

    epoch: int
    model: str
    split: str
    rate: ErrorRate
    # The ensemble's wrong predictions; not in errors.csv (history/misclassified_epoch_NNN.csv holds them).
    wrong: tuple[Mistake, ...] = field(default=(), compare=False, repr=False)

    @property
    def is_ensemble(self) -> bool:
        return self.model == "ensemble"


class RunDir:
    """A run directory: every path in it, and typed reads and writes of its records."""

    def __init__(self, path):
        self.path = Path(path)
        self._record: tuple[tuple, dict] | None = None  # (config.json's stat key, its parsed record)

    @classmethod
    def of(cls, run_dir) -> "RunDir":
        """`run_dir` itself when it is a RunDir already (its cached record kept), else a RunDir at that path."""
        return run_dir if isinstance(run_dir, RunDir) else cls(run_dir)

    @classmethod
    def find_checkpoint(cls, weights_file) -> tuple["RunDir", float, int, int] | None:
        """(run, dropout, epoch, index) of a checkpoint file inside a run (RUN/dropout_X/weights/), else None."""
        path = Path(weights_file).resolve()
        m = _WEIGHTS_RE.match(path.name)
        if m is None or len(path.parents) < 3 or path.parent.name != "weights":
            return None
        folder = path.parent.parent.name
        if not folder.startswith("dropout_"):
            return None
        try:
            dropout = float(folder[len("dropout_"):])
        except ValueError:
            return None
        run = cls(path.parents[2])
        epoch, index = int(m.group(1)), int(m.group(2))
        # Only the run's own name for it ("16epochs_..." or "dropout_0.20" would name another file).
        if not run.config_path.is_file() or run.weights_path(dropout, epoch, index).resolve() != path:
            return None
        return run, dropout, epoch, index

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    # ---- the layout: where each file lives

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def invocations_path(self) -> Path:
        return self.path / "invocations.jsonl"

    @property
    def plots_dir(self) -> Path:
        return self.path / "plot_history"

    @property
    def report_path(self) -> Path:
        return self.path / "report.html"

    @property
    def export_dir(self) -> Path:
        return self.path / "export_json_h5"  # named after the reference's json_h5_export

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / "tensorboard"

    def dropout_dir(self, dropout: float) -> Path:
        return self.path / dropout_dirname(dropout)

    def weights_path(self, dropout: float, epoch: int, index: int) -> Path:
        return self.dropout_dir(dropout) / "weights" / f"{epoch:03d}epochs_weights_model_{index}.weights.h5"

    def state_path(self, dropout: float, index: int) -> Path:
        return self.dropout_dir(dropout) / "state" / f"model_{index}.npz"

    def history_path(self, dropout: float, index: int) -> Path:
        return self.dropout_dir(dropout) / "history" / f"model_{index}.csv"

    def segments_path(self, dropout: float, index: int) -> Path:
        """Where scale-out tasks log each training segment they start (node, process, epochs)."""
        return self.dropout_dir(dropout) / "history" / f"segments_model_{index}.jsonl"

    def errors_path(self, dropout: float) -> Path:
        return self.dropout_dir(dropout) / "history" / "errors.csv"

    def text_table_path(self, dropout: float, epoch: int) -> Path:
        return self.dropout_dir(dropout) / "history" / f"test_errors_epoch_{epoch:03d}.txt"

    def checkpoint_misclassified_path(self, dropout: float, epoch: int) -> Path:
        return self.dropout_dir(dropout) / "history" / f"misclassified_epoch_{epoch:03d}.csv"

    def evaluation_dir(self, dropout: float, split: str, epoch: int, tta: int = 0) -> Path:
        return self.dropout_dir(dropout) / "evaluation" / (f"{split}_epoch_{epoch:03d}" + (f"_tta{tta}" if tta else ""))

    def tracking_path(self, sink: str) -> Path:
        """What a tracking sink ("mlflow") has received, so a later process sends only the rest."""
        return self.path / "tracking" / f"{sink}.json"

    # ---- config.json and the invocation log

    def exists(self) -> bool:
        """True when config.json is there: a run was started here."""
        return self.config_path.exists()

    def read_record(self) -> dict:
        """The whole config.json (config, data, versions, created, updated; imported for imports).

        Read once while the file stays the same (same inode, size and time: a write replaces it); each caller
        gets its own copy to change."""
        path = self.config_path
        try:
            st = os.stat(path)
        except FileNotFoundError as exc:
            raise RunDirError(f"{path}: not found; is {self.path} a run directory?") from exc
        except OSError as exc:
            raise RunDirError(f"{path}: unreadable run configuration ({exc})") from exc
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        if self._record is None or self._record[0] != key:
            self._record = (key, self._parse_record(path))
        return copy.deepcopy(self._record[1])

    def _parse_record(self, path: Path, text: str | None = None) -> dict:
        try:
            saved = json.loads(path.read_text() if text is None else text)
            TrainConfig.from_dict(saved["config"])
        except FileNotFoundError as exc:
            raise RunDirError(f"{path}: not found; is {self.path} a run directory?") from exc
        except ConfigError as exc:  # a recorded setting out of range: a config error (exit 2), with its file
            raise ConfigError(f"{path}: {exc}") from exc
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise RunDirError(f"{path}: unreadable run configuration ({exc})") from exc
        if not isinstance(saved.get("data"), dict):
            raise RunDirError(f"{path}: unreadable run configuration (no data record)")
        return saved

    def read_config(self) -> TrainConfig:
        """The run's experiment, as recorded in config.json."""
        return TrainConfig.from_dict(self.read_record()["config"])

    def read_normalization(self) -> tuple[str, float, float]:
        """(classes, mean, std) the run's models were built with, from config.json's data record."""
        data = self.read_record()["data"]
        try:
            return str(data["classes"]), float(data["mean"]), float(data["std"])
        except (KeyError, TypeError, ValueError) as exc:
            raise RunDirError(f"{self.config_path}: unreadable run configuration (data {exc})") from exc

    def write_record(self, saved: dict) -> None:
        self._record = None
        atomic_write_json(self.config_path, saved)
        st = os.stat(self.config_path)
        with contextlib.suppress(RunDirError, ConfigError):  # a record the next read must refuse is not kept
            self._record = ((st.st_ino, st.st_size, st.st_mtime_ns),
                            self._parse_record(self.config_path, json.dumps(saved)))  # as a read gives it

    def append_invocation(self, record: dict) -> None:
        _append_json_line(self.invocations_path, record)

    def read_invocations(self) -> list[dict]:
        """Every recorded command, oldest first (unreadable lines are skipped)."""
        return _read_json_lines(self.invocations_path)

    def find_schedule_epochs(self, default: int) -> int:
        """The epochs a scheduled recipe's rate spans: those of the last command that trained at the recipe's
        own rate (not a fixed --lr); `default` when there is none."""
        for record in reversed(self.read_invocations()):
            if "epochs" in record and record.get("fixed_lr") is None:
                return int(record["epochs"])
        return default

    # ---- locks and interrupted writes

    def lock(self) -> RunLock:
        """The exclusive lock a process holds while it writes to this run."""
        return RunLock(self.path)

    def member_lock(self, dropout: float, indices: tuple[int, ...], timeout: float) -> RunLock:
        """The lock a scale-out task holds while it trains these members (waits up to `timeout` seconds)."""
        name = f".locks/{dropout_dirname(dropout)}_model_{'_'.join(str(i) for i in indices)}.lock"
        return RunLock(self.path, name, busy=f"{self.path}: dropout {dropout:g} member(s) "
                       f"{', '.join(str(i) for i in indices)} still locked by another process after {timeout:g} s",
                       timeout=timeout)

    def tracking_lock(self, sink: str, timeout: float) -> RunLock:
        """Held while a process sends to a tracking sink, so that two never send the same epochs."""
        return RunLock(self.path, f".locks/tracking_{sink}.lock", timeout=timeout,
                       busy=f"{self.path}: another process is sending this run to {sink}")

    def remove_stale_temporaries(self) -> None:
        """Delete temp files a killed process left mid-write (call it holding the lock: none is live)."""
        for pattern in (".tmp-*", ".*.tmp"):
            for path in self.path.rglob(pattern):
                log.debug("removing %s, left by an interrupted write", path)
                path.unlink(missing_ok=True)

    # ---- per-member histories and scale-out segments

    def read_history_rows(self, dropout: float, index: int) -> list[dict[str, str]]:
        """history/model_i.csv as written (text cells), for appending to it."""
        return read_csv_rows(self.history_path(dropout, index))

    def write_history_rows(self, dropout: float, index: int, rows: list[dict]) -> None:
        write_csv_rows(self.history_path(dropout, index), HISTORY_COLUMNS, rows)

    def read_histories(self, dropout: float, models: int) -> dict[int, dict[str, np.ndarray]]:
        """Per member index, the columns of history/model_i.csv as float arrays (absent members omitted)."""
        out = {}
        for i in range(models):
            rows = self.read_history_rows(dropout, i)
            if not rows:
                continue
            try:
                out[i] = {k: np.array([float(r[k]) for r in rows]) for k in rows[0]}
            except (TypeError, ValueError) as exc:
                raise RunDirError(f"{self.history_path(dropout, i)}: malformed value ({exc})") from exc
        return out

    def append_segment(self, dropout: float, index: int, record: dict) -> None:
        _append_json_line(self.segments_path(dropout, index), record)

    def read_segments(self, dropout: float, index: int) -> list[dict]:
        """Every segment started for a member, oldest first (unreadable lines are skipped)."""
        return _read_json_lines(self.segments_path(dropout, index))

    # ---- results: error tables, each checkpoint's mistakes, evaluations

    def read_errors(self, dropout: float) -> list[ErrorRecord]:
        """errors.csv of one dropout rate, typed; the percentages are recomputed from the counts."""
        path = self.errors_path(dropout)
        out = []
        for k, row in enumerate(read_csv_rows(path), start=2):
            try:
                out.append(ErrorRecord(int(row["epoch"]), str(row["model"]), str(row["split"]),
                                       ErrorRate(int(row["n_errors"]), int(row["n"]))))
            except (KeyError, TypeError, ValueError) as exc:
                raise RunDirError(f"{path}:{k}: malformed row ({exc})") from exc
        return out

    def write_errors(self, dropout: float, records: list[ErrorRecord]) -> None:
        rows = [{"epoch": r.epoch, "model": r.model, "split": r.split, "error_pct": f"{r.rate.pct:.4f}",
                 "n_errors": r.rate.n_errors, "n": r.rate.n} for r in sorted(records, key=lambda r: r.epoch)]
        write_csv_rows(self.errors_path(dropout), ERRORS_COLUMNS, rows)

    def write_text_table(self, dropout: float, epoch: int, records: list[ErrorRecord]) -> None:
        """history/test_errors_epoch_NNN.txt in the reference's format: the ensemble's, then each member's."""
        test = [r for r in records if r.split == "test"]
        if not test:
            return
        ens = next(r for r in test if r.is_ensemble)
        lines = [f"epoch: {epoch} test error on ensemble: {_pct4(ens)}"]
        lines += [str(_pct4(r)) for r in test if not r.is_ensemble]
        atomic_write_text(self.text_table_path(dropout, epoch), "\n".join(lines) + "\n")

    def evaluated_epochs(self, dropout: float) -> set[int]:
        """Checkpoint epochs whose ensemble evaluation is recorded in errors.csv."""
        return {r.epoch for r in self.read_errors(dropout) if r.is_ensemble}

    def write_checkpoint_misclassified(self, dropout: float, epoch: int, records: list[ErrorRecord]) -> None:
        """The ensemble's wrong predictions at a checkpoint, from its records' `wrong` lists."""
        write_mistakes(self.checkpoint_misclassified_path(dropout, epoch),
                       {r.split: r.wrong for r in records if r.is_ensemble})

    def read_checkpoint_misclassified(self, dropout: float, epoch: int, split: str) -> list[Mistake]:
        """The ensemble's wrong predictions on `split` at a checkpoint ([] if none)."""
        return read_mistakes(self.checkpoint_misclassified_path(dropout, epoch), split)

    def latest_evaluation(self, dropout: float) -> EnsembleEvaluation | None:
        """The newest plain `emnist-cnn evaluate` result on the test split (any epoch), or None."""
        found = []
        for path in (self.dropout_dir(dropout) / "evaluation").glob(f"test_epoch_*/{EVALUATION_FILES['evaluation']}"):
            m = re.fullmatch(r"test_epoch_(\d+)", path.parent.name)  # not the _ttaN ones
            if m:
                found.append((int(m.group(1)), path))
        if not found:
            return None
        _, path = max(found)
        try:
            return EnsembleEvaluation.from_json(json.loads(path.read_text()))
        except KeyError as exc:
            raise RunDirError(f"{path}: unreadable evaluation (no {exc.args[0]!r} entry)") from exc
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            raise RunDirError(f"{path}: unreadable evaluation ({format_one_line(exc)})") from exc

    # ---- checkpoints and member states: which epochs exist, which one to use

    def checkpoints(self, dropout: float) -> dict[int, set[int]]:
        """{epoch: member indices with a weights file} of one dropout rate."""
        folder = self.dropout_dir(dropout) / "weights"
        out: dict[int, set[int]] = {}
        if folder.is_dir():
            for p in folder.iterdir():
                m = _WEIGHTS_RE.match(p.name)
                if m:
                    out.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
        return out

    def complete_checkpoints(self, dropout: float, models: int, member: int | None = None) -> list[int]:
        """Checkpoint epochs at which every member's weights exist (or member `member`'s), ascending."""
        needed = set(range(models)) if member is None else {member}
        return sorted(e for e, have in self.checkpoints(dropout).items() if needed <= have)

    def choose_checkpoint(self, dropout: float, models: int, epoch, member: int | None = None) -> int | None:
        """The checkpoint `epoch` names (`parse_checkpoint_epoch`): the latest with complete weights (every
        member's, or member `member`'s), or that epoch if its weights are complete; None when there is none."""
        usable = self.complete_checkpoints(dropout, models, member)
        wanted = parse_checkpoint_epoch(epoch)
        if wanted is None:
            return usable[-1] if usable else None
        return wanted if wanted in usable else None

    def has_all_weights(self, dropout: float, epoch: int, models: int) -> bool:
        return all(self.weights_path(dropout, epoch, i).exists() for i in range(models))

    def state_epoch(self, dropout: float, index: int) -> int:
        """The epoch a member's state records (0: none yet, or unreadable)."""
        return read_state_epoch(self.state_path(dropout, index))

    def trained_epochs(self, config: TrainConfig) -> int:
        """The most epochs any member of `config` has a state for."""
        return max((self.state_epoch(d, i) for d in config.dropouts for i in range(config.models)), default=0)

    # ---- what tracking sinks have received

    def read_tracking(self, sink: str) -> dict:
        path = self.tracking_path(sink)
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise RunDirError(f"{path}: unreadable tracking record ({exc})") from exc

    def write_tracking(self, sink: str, record: dict) -> None:
        atomic_write_json(self.tracking_path(sink), record)


def write_mistakes(path: Path, mistakes: Mapping[str, Sequence[Mistake]]) -> None:
    """A mistakes file (MISCLASSIFIED_COLUMNS): split -> its wrong predictions, in that order."""
    rows = [{"split": split, **m._asdict(), "confidence": f"{m.confidence:.6f}"}
            for split, found in mistakes.items() for m in found]
    write_csv_rows(path, MISCLASSIFIED_COLUMNS, rows)


def read_mistakes(path: Path, split: str) -> list[Mistake]:
    """The wrong predictions on `split` in a mistakes file ([] if none; confidence nan in files without it)."""
    out = []
    for k, row in enumerate(read_csv_rows(path), start=2):
        try:
            if row["split"] == split:
                out.append(Mistake(int(row["index"]), int(row["label"]), int(row["predicted"]),
                                   float(row.get("confidence") or "nan")))
        except (KeyError, TypeError, ValueError) as exc:
            raise RunDirError(f"{path}:{k}: malformed row ({exc})") from exc
    return out


def _append_json_line(path: Path, record: dict) -> None:
    """Add one JSON line to a log, rewriting it atomically (a kill leaves the old log or the new one)."""
    old = path.read_text() if path.exists() else ""
    atomic_write_text(path, old + json.dumps(record, sort_keys=True) + "\n")


def _read_json_lines(path: Path) -> list[dict]:
    """A JSON-lines log's records, oldest first; unreadable lines are skipped."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _pct4(record: ErrorRecord) -> float:
    return float(f"{record.rate.pct:.4f}")


def make_history_row(epoch: int, loss: float, accuracy: float, val_loss: float, val_accuracy: float,
                     learning_rate: float, seconds: float) -> dict[str, str | int]:
    """One history/model_i.csv row, with the precision every history file uses."""
    return {"epoch": epoch, "loss": f"{loss:.6f}", "accuracy": f"{accuracy:.6f}", "val_loss": f"{val_loss:.6f}",
            "val_accuracy": f"{val_accuracy:.6f}", "learning_rate": f"{learning_rate:.6g}", "seconds": f"{seconds:.2f}"}


def choose_image_preprocessing(config: TrainConfig, saved: dict) -> str:
    """How `predict` turns image files into inputs for a run's models: as its training images were made.

    The reference's imported weights learned 267 epochs of EMNIST, whatever data a run continues on.
    """
    return "mnist" if config.dataset == "mnist" and "imported" not in saved else "emnist"


def parse_checkpoint_epoch(value) -> int | None:
    """`--epoch`'s value: None for "latest" (or None), else the checkpoint's epoch number."""
    text = "" if value is None else str(value).strip()
    if value is None or text == "latest":
        return None
    if isinstance(value, bool) or not text.isdigit():
        raise ConfigError(f"--epoch must be a checkpoint epoch number or 'latest', got {value!r}")
    return int(text)


def format_utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# Environment variables that decide summation order, kernels or compilation: needed to rerun a run to the bit.
# Thread counts and oneDNN pick the CPU kernels; XLA_FLAGS and TF_XLA_FLAGS what XLA compiles; NVIDIA_TF32_OVERRIDE
# and JAX_DEFAULT_MATMUL_PRECISION whether float32 products round to TF32; the memory XLA may take on a GPU
# bounds the scratch space, so which convolution algorithms its autotuner can choose.
_RECORDED_ENV = ("TF_ENABLE_ONEDNN_OPTS", "TF_DETERMINISTIC_OPS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS",
                 "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "XLA_FLAGS", "TF_XLA_FLAGS", "NVIDIA_TF32_OVERRIDE",
                 "XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_MEM_FRACTION", "JAX_DEFAULT_MATMUL_PRECISION")
# JAX's CUDA support is a separate wheel; its metadata gives the version without importing it.
_JAX_CUDA_PLUGINS = ("jax-cuda13-plugin", "jax-cuda13-pjrt", "jax-cuda12-plugin", "jax-cuda12-pjrt")


def collect_versions(*, threads: bool = True) -> dict:
    """Library versions and what decides a run's numerics: cores, threads, oneDNN, XLA and TF32 settings,
    CUDA and cuDNN versions, GPU models. `threads=False` leaves out the backend's thread pool sizes."""
    import keras  # deferred: the backend is slow to import and readers of a run never need it

    versions = {"emnist_cnn": __version__, "keras": keras.__version__, "backend": keras.backend.backend(),
                "numpy": np.__version__, "python": platform.python_version(), "platform": platform.platform()}
    # Kernel summation order follows the thread count and oneDNN: needed to rerun a run to the bit.
    versions["cpu_count"] = os.cpu_count()
    versions["env"] = {k: os.environ[k] for k in _RECORDED_ENV if k in os.environ}
    # Only the backend's own library: importing TensorFlow under JAX or torch costs seconds and says nothing.
    backend = versions["backend"]
    try:
        if backend == "tensorflow":
            import tensorflow as tf

            versions["tensorflow"] = tf.__version__
            if threads:
                versions["tf_threads"] = {"intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
                                          "inter_op": tf.config.threading.get_inter_op_parallelism_threads()}
            _probe(versions, "TF32", lambda: {"tf32": bool(tf.config.experimental.tensor_float_32_execution_enabled())})
            # A CPU build names no CUDA or cuDNN: only what the build says is recorded.
            _probe(versions, "CUDA build", lambda: {k: v for k, v in tf.sysconfig.get_build_info().items()
                                                    if k in ("cuda_version", "cudnn_version")})
            _probe(versions, "GPUs", lambda: {"gpus": [tf.config.experimental.get_device_details(d)["device_name"]
                                                       for d in tf.config.get_visible_devices("GPU")]})
        elif backend == "jax":
            import jax
            import jaxlib

            versions["jax"], versions["jaxlib"] = jax.__version__, jaxlib.__version__
            # None: JAX's default (TF32 on GPUs that have it).
            _probe(versions, "matmul precision",
                   lambda: {"matmul_precision": jax.config.jax_default_matmul_precision})
            _probe(versions, "CUDA plugin", _jax_cuda_plugins)
            _probe(versions, "GPUs", lambda: {"gpus": [d.device_kind for d in jax.devices() if d.platform != "cpu"]})
        elif backend == "torch":
            import torch

            versions["torch"] = torch.__version__
            if threads:
                versions["torch_threads"] = {"intra_op": torch.get_num_threads(),
                                             "inter_op": torch.get_num_interop_threads()}
            # cuDNN's switch too: a CNN's convolutions run there, not through the matmul setting.
            _probe(versions, "TF32", lambda: {"matmul_precision": torch.get_float32_matmul_precision(),
                                              "tf32": {"matmul": bool(torch.backends.cuda.matmul.allow_tf32),
                                                       "cudnn": bool(torch.backends.cudnn.allow_tf32)}})
            # None on a CPU build: left out.
            _probe(versions, "CUDA build", lambda: {k: v for k, v in (("cuda_version", torch.version.cuda),
                                                                      ("cudnn_version", torch.backends.cudnn.version()))
                                                    if v is not None})
            _probe(versions, "GPUs", lambda: {"gpus": [torch.cuda.get_device_name(i)
                                                       for i in range(torch.cuda.device_count())]})
    except ImportError:
        pass
    return versions


def _probe(versions: dict, what: str, read) -> None:
    """Add read()'s keys to `versions`; a failed read leaves them out (a record must never stop a run)."""
    try:
        versions.update(read())
    except Exception:
        log.debug("could not record the %s", what, exc_info=True)


def _jax_cuda_plugins() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in _JAX_CUDA_PLUGINS:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return {"jax_cuda_plugin": found} if found else {}
