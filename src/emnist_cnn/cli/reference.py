"""The documentation's reference pages, written from the code they describe: every subcommand's flags from
the parser, every experiment setting from the config classes (docs/gen_reference.py builds them)."""

from __future__ import annotations

import argparse
import dataclasses
import html

from ..config import FLAGS, PRESETS, TrainConfig
from ..io.config_files import CHOICES, SECTIONS, describe_settings, format_toml_value
from .main import COMMANDS, build_parser

__all__ = ["format_cli_markdown", "format_config_markdown"]


def _cell(text: str) -> str:
    """Plain text as one Markdown table cell: no HTML, no emphasis, no column break."""
    return html.escape(" ".join(text.split()), quote=False).replace("|", "\\|").replace("*", "\\*")


def _flag_cell(action: argparse.Action) -> str:
    spelling = ", ".join(f"`{s}`" for s in action.option_strings) or f"`{action.dest}`"
    if action.nargs != 0 and not isinstance(action, argparse.BooleanOptionalAction):
        if action.choices is not None:
            spelling += " " + " \\| ".join(f"`{c}`" for c in action.choices)
        elif action.option_strings:
            spelling += f" `{action.metavar or action.dest.upper()}`"
    return spelling


def _actions(parser: argparse.ArgumentParser) -> list[tuple[str, list[argparse.Action]]]:
    # argparse keeps its groups private; there is no public way to list a parser's flags by group.
    groups = [(g.title or "", [a for a in g._group_actions if a.help is not argparse.SUPPRESS
                               and not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))])
              for g in parser._action_groups]
    return [(title, actions) for title, actions in groups if actions]


def format_cli_markdown() -> str:
    """docs/reference/cli.md: every subcommand with its description and its flags by group, each flag's help
    as `--help` prints it, and the config key a train/run flag sets."""
    key_of = {flag: key for key, flag in FLAGS.items()}
    parser = build_parser()
    out = ["# Command line", "",
           "Generated from the parser (`emnist_cnn.cli.main.build_parser`); every flag's help states its default. "
           "A flag with a config key sets that key of the experiment (see [Config keys](config.md)); "
           "flags override a `--config` file's keys.", "",
           "```", parser.format_usage().strip(), "```", ""]
    out += _flag_table(parser, key_of={})
    for name, (add_args, _, _, description) in COMMANDS.items():
        sub = argparse.ArgumentParser(prog=f"emnist-cnn {name}", description=description, add_help=False)
        add_args(sub)
        out += [f"## `{name}`", "", f"{_cell(description)}", "", "```", sub.format_usage().strip(), "```", ""]
        out += _flag_table(sub, key_of if name in ("train", "run") else {})
    return "\n".join(out) + "\n"


def _flag_table(parser: argparse.ArgumentParser, key_of: dict[str, str]) -> list[str]:
    out = []
    for title, actions in _actions(parser):
        if title not in ("options", "optional arguments"):
            out += [f"**{title}**", ""]
        header = ["flag", "config key", "what it does"] if key_of else ["flag", "what it does"]
        out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for action in actions:
            cells = [_flag_cell(action)]
            if key_of:
                key = next((key_of[s] for s in action.option_strings if s in key_of), None)
                cells.append(f"`{key}`" if key else "")
            cells.append(_cell(action.help or ""))
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return out


def format_config_markdown() -> str:
    """docs/reference/config.md: every experiment setting (a config file's keys, config.json's fields) with
    its default, meaning and unit, allowed values, flag, and the presets that change it."""
    default = TrainConfig()
    presets = {name: TrainConfig.from_preset(name) for name in sorted(PRESETS)}
    out = ["# Config keys", "",
           "Generated from the config classes (`emnist_cnn.config`). These are the keys of a `--config` file "
           "(`emnist-cnn config show` prints one with every key) and the fields of a run's `config.json`. "
           "The order is: the defaults, `--preset` (with `run`), the file, then flags. Settings without a "
           "flag are set in a file or the Python API.", ""]
    tables = [("Top level (`TrainConfig`)", TrainConfig, "", default, {n: p for n, p in presets.items()})]
    for section, cls in SECTIONS.items():
        tables.append((f"`[{section}]` (`{cls.__name__}`)", cls, f"{section}.", getattr(default, section),
                       {n: getattr(p, section) for n, p in presets.items()}))
    for title, cls, prefix, base, by_preset in tables:
        notes = describe_settings(cls)
        out += [f"## {title}", "", _cell(cls.__doc__ or ""), "",
                "| key | default | what it is | flag | presets that change it |", "|---|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            if not prefix and f.name in SECTIONS:
                continue
            key = f"{prefix}{f.name}"
            value = getattr(base, f.name)
            note = notes.get(f.name, "")
            if key in CHOICES:
                note = f"{note.rstrip('.')}; one of {', '.join(CHOICES[key])}".lstrip("; ")
            changed = [f"{n}: `{_value(getattr(p, f.name))}`" for n, p in by_preset.items()
                       if getattr(p, f.name) != value]
            out.append(f"| `{key}` | `{_value(value)}` | {_cell(note)} | "
                       f"{'`' + FLAGS[key] + '`' if key in FLAGS else ''} | {', '.join(changed)} |")
        out.append("")
    return "\n".join(out) + "\n"


def _value(value) -> str:
    return "not set" if value is None else format_toml_value(value)
