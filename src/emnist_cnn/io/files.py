"""Crash-safe files: atomic writes, an exclusive lock, CSV tables.

Every file a run writes goes through a temporary file in the same folder,
fsync, then a rename, so a reader (or a resumed run) sees the old file or the
new one, never half of one.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

from ..errors import RunDirError

__all__ = ["atomic_write_bytes", "write_temp_file", "put_temp_file", "remove_temp_file", "atomic_write_text",
           "atomic_write_json", "save_weights_atomic", "RunLock", "LockBusyError", "read_csv_rows", "write_csv_rows",
           "to_run_dir_error"]

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename over `path`.

    A reader sees the old file or the new one, never half of one.
    """
    put_temp_file(write_temp_file(path, data), path)


def write_temp_file(path: Path, data: bytes) -> Path:
    """`data` in a new temp file beside `path`, fsynced; `put_temp_file` puts it in place (the run's
    temp-file sweep removes it if that never happens)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise to_run_dir_error(path, exc) from exc
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are meant to be shared
    except BaseException as exc:
        remove_temp_file(Path(tmp))
        if isinstance(exc, OSError):
            raise to_run_dir_error(path, exc) from exc
        raise
    return Path(tmp)


def put_temp_file(tmp: Path, path: Path) -> None:
    """Rename `write_temp_file`'s `tmp` over `path`; on failure `tmp` is removed."""
    try:
        os.replace(tmp, path)
    except BaseException as exc:
        remove_temp_file(tmp)
        if isinstance(exc, OSError):
            raise to_run_dir_error(Path(path), exc) from exc
        raise


def remove_temp_file(tmp: Path) -> None:
    """Remove a temp file that will not be put in place (gone already is fine)."""
    try:
        os.unlink(tmp)
    except OSError:
        pass


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def to_run_dir_error(path: Path, exc: OSError) -> RunDirError:
    """The one-line error for a failed write: disk full, not writable, or other."""
    if exc.errno == errno.ENOSPC:
        return RunDirError(f"{path}: no space left on device; earlier checkpoints are intact")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return RunDirError(f"{path}: run directory is not writable ({exc.strerror})")
    return RunDirError(f"{path}: could not write ({exc.strerror or exc})")


class RunLock:
    """An exclusive lock on a run directory (or on one member in it); the OS releases it if the process dies.

    With `timeout` > 0, waits up to that many seconds for a holder to finish instead of refusing at once.
    """

    def __init__(self, run_dir: Path, name: str = ".lock", busy: str | None = None, timeout: float = 0.0):
        self.path = Path(run_dir) / name
        self.busy = busy or f"{Path(run_dir)}: another emnist-cnn process is training in this run directory"
        self.timeout = timeout
        self._fd: int | None = None

    def __enter__(self) -> "RunLock":
        import fcntl

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise to_run_dir_error(self.path, exc) from exc
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if time.monotonic() < deadline:
                    time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
                    continue
                os.close(self._fd)
                self._fd = None
                raise LockBusyError(self.busy) from exc
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()}\n".encode())
        return self

    def __exit__(self, *exc_info) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class LockBusyError(RunDirError):
    """Another process holds the lock."""


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
            raise to_run_dir_error(path, exc) from exc
        raise


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
