"""The run directory: atomic files, a lock, resumable member state, history tables.

Layout (kept close to the reference's):

    RUN/config.json                          every setting, versions, data fingerprint
    RUN/invocations.jsonl                    one line per train/run command on this run
    RUN/dropout_0.2/weights/016epochs_weights_model_0.weights.h5
    RUN/dropout_0.2/state/model_0.npz        weights + optimizer + RNG state + epoch
    RUN/dropout_0.2/history/model_0.csv      one row per epoch
    RUN/dropout_0.2/history/errors.csv       per checkpoint, member and ensemble, val and test
    RUN/dropout_0.2/history/test_errors_epoch_016.txt   the reference's format
"""

from __future__ import annotations

import csv
import errno
import io
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .errors import RunDirError

log = logging.getLogger(__name__)

_UMASK = os.umask(0)
os.umask(_UMASK)

HISTORY_COLUMNS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "seconds")
ERRORS_COLUMNS = ("epoch", "model", "split", "error_pct", "n_errors", "n")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename over `path`.

    A reader sees the old file or the new one, never half of one.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _io_error(path, exc) from exc
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise _io_error(path, exc) from exc
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _io_error(path: Path, exc: OSError) -> RunDirError:
    if exc.errno == errno.ENOSPC:
        return RunDirError(f"{path}: no space left on device; earlier checkpoints are intact")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return RunDirError(f"{path}: run directory is not writable ({exc.strerror})")
    return RunDirError(f"{path}: could not write ({exc.strerror or exc})")


class RunLock:
    """An exclusive lock on a run directory; the OS releases it if the process dies."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self._fd: int | None = None

    def __enter__(self) -> "RunLock":
        import fcntl

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise _io_error(self.path, exc) from exc
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._fd)
            self._fd = None
            raise RunDirError(
                f"{self.path.parent}: another emnist-cnn process is training in this run directory"
            ) from exc
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()}\n".encode())
        return self

    def __exit__(self, *exc_info) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def save_weights_atomic(model, path: Path) -> None:
    """`model.save_weights` (Keras picks the file name's format) via a synced temp file and a rename."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        model.save_weights(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:  # also Ctrl-C: no temporary file is left behind
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise _io_error(path, exc) from exc
        raise


def read_run_config(run_dir):
    """RUN/config.json: the run's TrainConfig and the whole saved dict (config, data, versions, ...)."""
    from .config import TrainConfig
    from .errors import ConfigError

    path = Path(run_dir) / "config.json"
    try:
        saved = json.loads(path.read_text())
        return TrainConfig.from_dict(saved["config"]), saved
    except FileNotFoundError as exc:
        raise RunDirError(f"{path}: not found; is {run_dir} a run directory?") from exc
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ConfigError) as exc:
        raise RunDirError(f"{path}: unreadable run configuration ({exc})") from exc


# ----------------------------------------------------------------------------- member state


def save_member_state(path: Path, model, epoch: int, extra: dict | None = None) -> None:
    """Save weights, optimizer variables, dropout RNG state and the epoch, atomically.

    The previous state is kept as `<name>.prev.npz` so that a damaged latest
    file never costs more than one epoch.
    """
    arrays: dict[str, np.ndarray] = {}
    for k, w in enumerate(model.get_weights()):
        arrays[f"weight_{k}"] = w
    for k, v in enumerate(model.optimizer.variables):
        arrays[f"optimizer_{k}"] = np.asarray(v.numpy() if hasattr(v, "numpy") else v)
    for k, v in enumerate(_seed_states(model)):
        arrays[f"rng_{k}"] = np.asarray(v.numpy())
    meta = {"epoch": int(epoch), "n_weights": len(model.get_weights()),
            "n_optimizer": len(model.optimizer.variables), **(extra or {})}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path = Path(path)
    prev = path.with_name(path.name.replace(".npz", ".prev.npz"))
    if path.exists():
        try:
            os.replace(path, prev)
        except OSError as exc:
            raise _io_error(prev, exc) from exc
    atomic_write_bytes(path, buf.getvalue())


def load_member_state(path: Path, model) -> dict | None:
    """Restore what `save_member_state` wrote; falls back to the previous file.

    Returns the state's metadata (with "epoch"), or None if there is no state.
    The optimizer must already be built (see `build_optimizer`).
    """
    path = Path(path)
    prev = path.with_name(path.name.replace(".npz", ".prev.npz"))
    candidates = [p for p in (path, prev) if p.exists()]
    reasons = []
    for p in candidates:
        try:
            meta = _restore(p, model)
        except Exception as exc:  # any damage means: do not trust this file
            reason = " ".join(str(exc).split())[:200] or type(exc).__name__
            reasons.append(reason)
            log.warning("%s: unreadable state (%s); trying the previous one", p, reason)
            continue
        if p == prev:
            log.warning("%s: using the previous state file (epoch %d)", prev, meta["epoch"])
        return meta
    if candidates:
        what = "state file and its backup are both" if len(candidates) == 2 else "state file is"
        raise RunDirError(f"{candidates[0]}: {what} unreadable ({reasons[0]}); move the member's state "
                          "files away to train it again from scratch")
    return None


def read_state_epoch(path: Path) -> int:
    """The epoch a member's state (or its backup) records; 0 when there is none or it is unreadable."""
    path = Path(path)
    for p in (path, path.with_name(path.name.replace(".npz", ".prev.npz"))):
        if p.exists():
            try:
                with np.load(p, allow_pickle=False) as z:
                    return _state_meta(z)["epoch"]
            except Exception:  # a damaged file is handled (with a warning) when the member is opened
                continue
    return 0


def _state_meta(z) -> dict:
    """The metadata record of an open state file, checked: epoch and array counts are non-negative ints."""
    meta = json.loads(bytes(z["meta"]).decode())
    if not isinstance(meta, dict):
        raise ValueError("its metadata is not a record")
    for key in ("epoch", "n_weights", "n_optimizer"):
        value = meta.get(key)
        # type() rather than isinstance(): True is an int to Python, and 2.0 is not an epoch count.
        if type(value) is not int or value < 0:
            raise ValueError(f"its metadata has {key} {value!r}, expected a non-negative integer")
    return meta


def _restore(p: Path, model) -> dict:
    with np.load(p, allow_pickle=False) as z:
        meta = _state_meta(z)
        weights = [z[f"weight_{k}"] for k in range(meta["n_weights"])]
        opt = [z[f"optimizer_{k}"] for k in range(meta["n_optimizer"])]
        rng = [z[k] for k in sorted((k for k in z.files if k.startswith("rng_")), key=lambda s: int(s[4:]))]
    current = model.get_weights()
    if len(weights) != len(current) or any(a.shape != b.shape for a, b in zip(weights, current)):
        raise ValueError("weights do not match the model's shapes")
    if len(opt) != len(model.optimizer.variables):
        raise ValueError("optimizer state does not match the model")
    model.set_weights(weights)
    for var, value in zip(model.optimizer.variables, opt):
        var.assign(value)
    for var, value in zip(_seed_states(model), rng):
        var.assign(value)
    return meta


def _seed_states(model) -> list:
    """The state variables of the model's random layers (Dropout), in layer order."""
    states = []
    for layer in model.layers:
        gen = getattr(layer, "seed_generator", None)
        if gen is not None:
            states.append(gen.state)
    return states


# ----------------------------------------------------------------------------- tables


def read_csv_rows(path: Path) -> list[dict[str, str]]:
    path = Path(path)
    if not path.exists():
        return []
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        raise RunDirError(f"{path}: unreadable table ({exc})") from exc


def write_csv_rows(path: Path, columns: Iterable[str], rows: Iterable[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row[k] for k in columns})
    atomic_write_text(path, buf.getvalue())
