"""Experiment config files: `emnist-cnn config show` writes one (TOML, every setting commented), `train` and
`run` read one with `--config FILE` (TOML, or a run's own config.json), and flags override its keys."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import json
import math
import sys
import textwrap
import tokenize
from pathlib import Path
from typing import Any

from ..config import (DATASETS, FILL_MODES, FLAGS, INTERPOLATIONS, PRECISIONS, RECIPES, AugmentConfig, ModelConfig,
                      TrainConfig)
from ..errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["SECTIONS", "CHOICES", "read_config_file", "read_toml_file", "apply_config_file", "format_config_toml",
           "format_toml_value", "describe_settings"]

# TOML tables of TrainConfig's nested settings, in the order `config show` writes them.
SECTIONS = {"augment": AugmentConfig, "model": ModelConfig}

# The settings that take one of a few values, as `config show` lists them.
CHOICES = {"dataset": DATASETS, "recipe": tuple(RECIPES), "model.precision": PRECISIONS,
           "augment.fill_mode": FILL_MODES, "augment.interpolation": INTERPOLATIONS}

WIDTH = 110  # a longer line gets its comment above the key


def read_config_file(path: Path) -> dict[str, Any]:
    """The settings a config file sets, checked against TrainConfig's keys and types: top-level keys, and
    `augment` / `model` as dicts of theirs. A run's config.json (its "config" record) is read as well."""
    path = Path(path)
    if path.suffix == ".json":
        text = _read_text(path, "--config")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None
        data = data.get("config", data) if isinstance(data, dict) else data
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected an object of settings")
        data = {k: v for k, v in data.items() if v is not None}
        for name in SECTIONS:
            if isinstance(data.get(name), dict):
                data[name] = {k: v for k, v in data[name].items() if v is not None}
    else:
        data = read_toml_file(path, "--config")
    return _checked(path, data, TrainConfig, "")


def _read_text(path: Path, flag: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{flag} {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{flag} {path}: cannot be read ({getattr(exc, 'strerror', None) or exc})") from None


def read_toml_file(path: Path, flag: str) -> dict[str, Any]:
    """A TOML file's tables, or one ConfigError naming `flag` and the file (missing, unreadable, not TOML)."""
    try:
        return tomllib.loads(_read_text(Path(path), flag))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None


def apply_config_file(base: TrainConfig | None, settings: dict[str, Any], path: Path,
                      preset: str | None = None) -> dict[str, Any]:
    """`settings` (from `read_config_file`) as changes to `base` (None: a new run from `preset`): top-level
    values as they are, `augment` and `model` merged into the base's own. An out-of-range value is one
    ConfigError naming the file and the key."""
    if base is None:
        base = TrainConfig.new_run(preset)
    changes = {k: v for k, v in settings.items() if k not in SECTIONS}
    try:
        for name in SECTIONS:
            if name in settings:
                changes[name] = dataclasses.replace(getattr(base, name), **settings[name])
        if "dropouts" in changes:
            changes["dropouts"] = tuple(changes["dropouts"])
        base.replace(**changes)  # every range check, now, naming the file's key
    except ConfigError as exc:
        raise ConfigError(f"{path}: {_as_key(str(exc))}") from None
    return changes


def _checked(path: Path, data: dict, cls: type, prefix: str) -> dict[str, Any]:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out: dict[str, Any] = {}
    for key, value in data.items():
        where = f"{prefix}{key}"
        if key not in fields:
            known = ", ".join(fields)
            table = f" in [{prefix[:-1]}]" if prefix else ""
            raise ConfigError(f"{path}: unknown key {where!r}{table} (known: {known})")
        if not prefix and key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: {where} must be a table ([{key}]), got {value!r}")
            out[key] = _checked(path, value, SECTIONS[key], f"{key}.")
            continue
        out[key] = _typed(path, where, fields[key].type, value)
    return out


def _typed(path: Path, where: str, annotation: str, value: Any) -> Any:
    """`value` as the field's type (annotations are strings here), or a ConfigError naming the key."""
    kind = annotation.replace(" | None", "")
    if kind == "bool":
        ok = isinstance(value, bool)
        want = "true or false"
    elif kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
        want = "an integer"
    elif kind == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
        want = "a number"
    elif kind == "str":
        ok = isinstance(value, str)
        want = "a string"
    elif kind == "tuple[float, ...]":
        ok = isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        value = tuple(float(v) for v in value) if ok else value
        want = "a list of numbers"
    else:  # a new field type: teach this function its TOML form
        raise TypeError(f"{where}: no TOML form for {annotation}")
    if not ok:
        raise ConfigError(f"{path}: {where} must be {want}, got {value!r}")
    return value


def _as_key(message: str) -> str:
    """A range error's flag (`--models must be >= 1`) as the config key a file sets (`models must be >= 1`)."""
    for key, flag in {**FLAGS, "lr": "--lr"}.items():  # TrainConfig checks lr under import-reference's flag
        if message.startswith(f"{flag} "):
            return key + message[len(flag):]
    return message


def describe_settings(cls: type) -> dict[str, str]:
    """Each field of a config class with the comment written beside it (or just above it) in config.py."""
    source = inspect.getsource(cls)
    lines = source.splitlines()
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    out: dict[str, str] = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            line = node.lineno
            text = comments.get(line) if lines[line - 1].lstrip()[:1] != "#" else None
            if text is None:  # the comment lines just above the field
                above, k = [], line - 1
                while k in comments and lines[k - 1].lstrip().startswith("#"):
                    above.insert(0, comments[k])
                    k -= 1
                text = " ".join(above)
            out[node.target.id] = text
    return out


def format_config_toml(config: TrainConfig, title: str) -> str:
    """`config` as a complete TOML file for `--config`: every setting, with what it means and its flag."""
    out = [f"# {title}",
           "# Use it with: emnist-cnn train --run-dir RUN --config FILE (or run --config FILE).",
           "# Flags given on the command line override the keys here. A key left out takes the default",
           "# (or --preset's, with run). Keys marked 'not set' take no value: uncomment one to set it.", ""]
    out += _format_table(config, TrainConfig, "")
    for name, cls in SECTIONS.items():
        out += ["", f"[{name}]"] + _format_table(getattr(config, name), cls, f"{name}.")
    return "\n".join(out) + "\n"


def _format_table(obj, cls: type, prefix: str) -> list[str]:
    docs = describe_settings(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not prefix and f.name in SECTIONS:
            continue
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        note = docs.get(f.name, "").rstrip(".")
        if key in CHOICES:
            note = f"{note}; one of {', '.join(CHOICES[key])}" if note else f"one of {', '.join(CHOICES[key])}"
        flag = f"[flag {FLAGS[key]}]" if key in FLAGS else ""
        line = f"# {f.name} = ...  (not set)" if value is None else f"{f.name} = {format_toml_value(value)}"
        whole = " ".join(x for x in (note, flag) if x)
        if whole and len(line) + len(whole) + 4 <= WIDTH:
            out.append(f"{line}  # {whole}")
        else:  # above the key, the flag on a line of its own
            out += [f"# {text}" for text in textwrap.wrap(note, WIDTH - 2)] + ([f"# {flag}"] if flag else [])
            out.append(line)
    return out


def format_toml_value(value: Any) -> str:
    """`value` as TOML writes it (a config file's right-hand side)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"no TOML form for {value}")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(format_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")
