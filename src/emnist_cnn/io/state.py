"""A member's resumable state: weights, optimizer, dropout RNG state and epoch in one .npz.

The previous state is kept as `<name>.prev.npz`, so a damaged latest file
costs at most one epoch. Nothing is unpickled (`allow_pickle=False`).
"""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path

import numpy as np

from ..errors import RunDirError
from . import files
from .files import to_run_dir_error

__all__ = ["previous_state_path", "save_member_state", "snapshot_member_state", "encode_member_state",
           "put_member_state", "load_member_state", "read_state_epoch"]

log = logging.getLogger(__name__)


def previous_state_path(path: Path) -> Path:
    """Where the state before `path`'s latest is kept: `<name>.prev.npz` beside it."""
    return path.with_name(path.name.replace(".npz", ".prev.npz"))


def save_member_state(path: Path, model, epoch: int, extra: dict | None = None) -> None:
    """Save weights, optimizer variables, dropout RNG state and the epoch, atomically.

    The previous state is kept as `<name>.prev.npz` so that a damaged latest
    file never costs more than one epoch.
    """
    put_member_state(path, files.write_temp_file(path, encode_member_state(snapshot_member_state(model, epoch,
                                                                                               extra))))


def snapshot_member_state(model, epoch: int, extra: dict | None = None) -> dict[str, np.ndarray]:
    """The arrays `save_member_state` writes, read to the host (written before the model trains again)."""
    from ..core.model import read_variables

    weights, opt, rng = list(model.weights), list(model.optimizer.variables), _seed_states(model)
    values = read_variables(weights + opt + rng)
    arrays: dict[str, np.ndarray] = {}
    for k, w in enumerate(values[: len(weights)]):
        arrays[f"weight_{k}"] = w
    for k, v in enumerate(values[len(weights) : len(weights) + len(opt)]):
        arrays[f"optimizer_{k}"] = v
    for k, v in enumerate(values[len(weights) + len(opt) :]):
        arrays[f"rng_{k}"] = v
    meta = {"epoch": int(epoch), "n_weights": len(weights),
            "n_optimizer": len(model.optimizer.variables), **(extra or {})}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    return arrays


def encode_member_state(arrays: dict[str, np.ndarray]) -> bytes:
    """A state file's bytes (.npz) from `snapshot_member_state`'s arrays."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def put_member_state(path: Path, tmp: Path) -> None:
    """Put a state file written to `tmp` (`io.files.write_temp_file`) in place as `path`, the state there
    before it kept as `<name>.prev.npz`."""
    path = Path(path)
    prev = previous_state_path(path)
    if path.exists():
        try:
            os.replace(path, prev)
        except OSError as exc:
            files.remove_temp_file(tmp)
            raise to_run_dir_error(prev, exc) from exc
    files.put_temp_file(tmp, path)


def load_member_state(path: Path, model) -> dict | None:
    """Restore what `save_member_state` wrote; falls back to the previous file.

    Returns the state's metadata (with "epoch"), or None if there is no state.
    The model must be compiled and its optimizer built (its variables are restored too).
    """
    path = Path(path)
    prev = previous_state_path(path)
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
    for p in (path, previous_state_path(path)):
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
