"""Search spaces for `emnist-cnn tune`: a TOML file whose keys are experiment settings and whose values say
what a trial may take: a list (one of these values) or a distribution table, `{uniform = [low, high]}` or
`{loguniform = [low, high]}`. The augmentation's keys go under `[augment]`, as in a config file:

    dropout = [0.2, 0.3, 0.4, 0.5]
    lr = {loguniform = [1e-4, 3e-3]}
    recipe = ["reference", "fast"]
    [augment]
    rotation_deg = {uniform = [0.0, 15.0]}
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import AugmentConfig, TrainConfig
from ..errors import ConfigError
from .config_files import read_toml_file

__all__ = ["TUNABLE", "DISTRIBUTIONS", "Dimension", "SearchSpace", "read_search_space", "apply_sample", "read_sample"]

# The settings a search may vary, with their type. The rest define the data and the trial (dataset, split,
# seed, members, epochs) and come from the base config.
TUNABLE = {
    "dropout": float,  # the trial's one dropout rate
    "lr": float,
    "recipe": str,
    "batch_size": int,
    "augment.rotation_deg": float,
    "augment.shift_frac": float,
    "augment.shear_rad": float,
    "augment.zoom_min": float,
    "augment.zoom_max": float,
}
DISTRIBUTIONS = ("uniform", "loguniform")  # continuous, between two numbers


@dataclass(frozen=True)
class Dimension:
    """One varied setting: `kind` "choice" (values: the list) or a distribution (values: low, high)."""

    key: str
    kind: str
    values: tuple

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "kind": self.kind, "values": list(self.values)}


@dataclass(frozen=True)
class SearchSpace:
    """The settings a search varies, in the file's order."""

    dimensions: tuple[Dimension, ...]

    def to_dict(self) -> dict[str, Any]:
        return {d.key: {"kind": d.kind, "values": list(d.values)} for d in self.dimensions}


def read_search_space(path: Path, base: TrainConfig) -> SearchSpace:
    """The file's space, checked: every key tunable, every list non-empty and every range non-empty, and every
    value (each choice, each range's ends) a valid setting of `base`. One ConfigError naming the file and key."""
    path = Path(path)
    data = read_toml_file(path, "--space")
    dims = []
    for key, spec in _flatten(path, data):
        dims.append(_dimension(path, key, spec))
    if not dims:
        raise ConfigError(f"{path}: the space varies nothing (give at least one of: {', '.join(TUNABLE)})")
    space = SearchSpace(tuple(dims))
    _check_zoom(path, space, base)
    # Each value alone, with a varied zoom's partner at its most permissive end (the pair is checked above).
    partner = {"augment.zoom_min": ("augment.zoom_max", max), "augment.zoom_max": ("augment.zoom_min", min)}
    by_key = {d.key: d for d in space.dimensions}
    for dim in space.dimensions:
        for value in dim.values:
            sample = {dim.key: value}
            other, pick = partner.get(dim.key, (None, None))
            if other in by_key:
                sample[other] = pick(by_key[other].values)
            try:
                apply_sample(base, sample)
            except ConfigError as exc:
                raise ConfigError(f"{path}: {dim.key} = {value!r}: {_rule(exc)}") from None
    return space


def _flatten(path: Path, data: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for name, spec in data.items():
        key = f"{prefix}{name}"
        if isinstance(spec, dict) and not (set(spec) & set(DISTRIBUTIONS)) and not prefix and name == "augment":
            out += _flatten(path, spec, "augment.")
            continue
        if key not in TUNABLE:
            known = {f.name for f in dataclasses.fields(AugmentConfig if prefix else TrainConfig)} | {"dropout"}
            why = "cannot vary in a search" if name in known else "is not a setting"
            raise ConfigError(f"{path}: {key} {why} (a search varies: {', '.join(TUNABLE)})")
        out.append((key, spec))
    return out


def _dimension(path: Path, key: str, spec: Any) -> Dimension:
    kind = TUNABLE[key]
    if isinstance(spec, list):
        if not spec:
            raise ConfigError(f"{path}: {key} is an empty list (give at least one value)")
        values = tuple(_typed(path, key, kind, v) for v in spec)
        if len(set(values)) != len(values):
            raise ConfigError(f"{path}: {key} lists a value twice: {list(values)}")
        return Dimension(key, "choice", values)
    if isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DISTRIBUTIONS:
        (dist, ends), = spec.items()
        if kind is not float:
            raise ConfigError(f"{path}: {key} takes a list of values, not a {dist} range")
        if not (isinstance(ends, list) and len(ends) == 2):
            raise ConfigError(f"{path}: {key}: {dist} needs [low, high], got {ends!r}")
        low, high = (_typed(path, key, float, v) for v in ends)
        if not low < high:
            raise ConfigError(f"{path}: {key}: {dist} range [{low:g}, {high:g}] is empty (need low < high)")
        if dist == "loguniform" and low <= 0:
            raise ConfigError(f"{path}: {key}: loguniform needs low > 0, got {low:g}")
        return Dimension(key, dist, (low, high))
    raise ConfigError(f"{path}: {key} must be a list of values or one of {{uniform = [low, high]}}, "
                      f"{{loguniform = [low, high]}}; got {spec!r}")


def _typed(path: Path, key: str, kind: type, value: Any) -> Any:
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is str and isinstance(value, str):
        return value
    want = {float: "a number", int: "an integer", str: "a string"}[kind]
    raise ConfigError(f"{path}: {key} values must be {want}, got {value!r}")


def _check_zoom(path: Path, space: SearchSpace, base: TrainConfig) -> None:
    """Every sample must keep zoom_min <= zoom_max: their ranges may touch, not overlap."""
    dims = {d.key: d for d in space.dimensions}
    lows = dims.get("augment.zoom_min")
    highs = dims.get("augment.zoom_max")
    if lows is None and highs is None:
        return
    top_low = max(lows.values) if lows else base.augment.zoom_min
    bottom_high = min(highs.values) if highs else base.augment.zoom_max
    if top_low > bottom_high:
        raise ConfigError(f"{path}: augment.zoom_min can exceed augment.zoom_max ({top_low:g} > {bottom_high:g}); "
                          "keep zoom_min's values at or below zoom_max's")


def _rule(exc: ConfigError) -> str:
    """A range error's rule without the flag or key it starts with (the caller names the key)."""
    text = str(exc)
    return text.split(" ", 1)[1] if text.startswith(("--", "augment.")) else text


def apply_sample(base: TrainConfig, sample: dict[str, Any]) -> TrainConfig:
    """`base` with a trial's sampled settings (keys of TUNABLE); every range checked (ConfigError)."""
    top: dict[str, Any] = {}
    augment: dict[str, Any] = {}
    for key, value in sample.items():
        if key == "dropout":
            top["dropouts"] = (float(value),)
        elif key.startswith("augment."):
            augment[key.split(".", 1)[1]] = value
        else:
            top[key] = value
    if augment:
        top["augment"] = dataclasses.replace(base.augment, **augment)
    return base.replace(**top)


def read_sample(config: TrainConfig) -> dict[str, Any]:
    """`config`'s value of every tunable setting: what `apply_sample` sets, read back."""
    out: dict[str, Any] = {}
    for key in TUNABLE:
        if key == "dropout":
            out[key] = config.dropouts[0]
        elif key.startswith("augment."):
            out[key] = getattr(config.augment, key.split(".", 1)[1])
        else:
            out[key] = getattr(config, key)
    return out
