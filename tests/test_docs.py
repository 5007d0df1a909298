"""The documentation site: it builds in strict mode (a broken link, a missing anchor, a page outside the nav or
a snippet that is not there fails), and its generated references name every flag and every setting."""

import dataclasses
import html
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deps import require_module
from emnist_cnn.cli import build_parser
from emnist_cnn.cli.main import COMMANDS
from emnist_cnn.cli.reference import format_cli_markdown, format_config_markdown
from emnist_cnn.config import FLAGS, PRESETS, TrainConfig
from emnist_cnn.io.config_files import SECTIONS

ROOT = Path(__file__).resolve().parents[1]
# MkDocs plugins print a notice about a future MkDocs 2 on every build; these turn it off.
QUIET_BUILD = {"NO_MKDOCS_2_WARNING": "1", "DISABLE_MKDOCS_2_WARNING": "true"}


def _sections(markdown: str) -> dict[str, str]:
    """Each `## heading`'s text, by heading."""
    parts = markdown.split("\n## ")
    return {part.split("\n", 1)[0]: part for part in parts[1:]}


def test_the_site_builds_strictly_with_the_generated_pages(tmp_path):
    """`mkdocs build --strict`, as `make test` runs it. Catches a broken link or anchor, a page missing from
    the nav, a snippet of CONTRIBUTING.md or CHANGELOG.md that moved, a docstring mkdocstrings cannot read,
    and a generated page that failed to appear."""
    require_module("mkdocs", "builds the documentation site")
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env={**os.environ, **QUIET_BUILD})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "WARNING" not in r.stderr, r.stderr[-3000:]
    cli_page = (site / "reference" / "cli" / "index.html").read_text()
    config_page = (site / "reference" / "config" / "index.html").read_text()
    assert "--checkpoint-every" in cli_page and "augment.rotation_deg" in config_page
    tutorial = (site / "tutorial" / "index.html").read_text()
    assert "from a first run to a shipped model" in tutorial
    assert not list(site.rglob("gen_reference.py")), "the generator script was published as a page asset"


def test_the_cli_reference_lists_every_flag_of_every_subcommand_under_it():
    """Each subcommand's section holds each of its option strings and positional arguments, and a train/run
    flag that sets a config key names it. Catches a generator that drops an argument group (the groups are
    read from argparse's private lists), a new subcommand left out, or a flag shown under the wrong command."""
    page = _sections(format_cli_markdown())
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    assert set(page) == {f"`{name}`" for name in COMMANDS}
    for name, sub in subparsers.items():
        section = html.unescape(page[f"`{name}`"].replace("\\", ""))  # the text as a reader sees it
        for action in sub._actions:
            if action.dest == "help":
                continue
            for spelling in action.option_strings or [action.dest]:
                assert f"`{spelling}`" in section, (name, spelling)
            if action.help:
                assert " ".join(action.help.split()) in section, (name, action.dest)
    for key, flag in FLAGS.items():
        for name in ("train", "run"):
            assert f"| `{flag}`" in page[f"`{name}`"] and f"| `{key}` |" in page[f"`{name}`"], (name, key)
    assert "`--preset`" not in page["`train`"], "run's --preset listed under train"


def test_the_config_reference_lists_every_setting_with_its_default_flag_and_presets():
    """Every key a config file takes, with its default as TOML writes it, its flag, and each preset that
    changes it. Catches a new field left out, a section (augment, model) dropped, a wrong default, or a preset
    column that misses a preset's change."""
    page = format_config_markdown()
    default = TrainConfig()
    rows = {line.split("|")[1].strip(" `"): line for line in page.splitlines() if line.startswith("| `")}
    want = {f.name for f in dataclasses.fields(TrainConfig) if f.name not in SECTIONS}
    want |= {f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    assert set(rows) == want
    assert "| `epochs` | `256` |" in rows["epochs"] and "`--epochs`" in rows["epochs"]
    assert "| `augment.rotation_deg` | `12.0` | max rotation, degrees" in rows["augment.rotation_deg"]
    assert "| `limit_train` | `not set` |" in rows["limit_train"]
    for name, settings in PRESETS.items():
        preset = TrainConfig.from_preset(name)
        for key in settings:
            if getattr(preset, key) != getattr(default, key):
                assert f"{name}: `" in rows[key], (name, key)
    assert "quick: `128`" in rows["batch_size"] and "reference-fast: `64`" in rows["batch_size"]
    assert "reference:" not in rows["epochs"], "a preset equal to the default listed as a change"


@pytest.mark.parametrize("path", ["README.md", "CONTRIBUTING.md", "docs/index.md"])
def test_the_front_door_stays_short(path):
    """The README is a front door (at most about 150 lines), not the manual; the site holds the rest."""
    lines = (ROOT / path).read_text().splitlines()
    assert len(lines) <= 150, f"{path} has {len(lines)} lines"
