"""Config files: `config show` writes every experiment setting as commented TOML, `train`/`run --config FILE` read
it (or a run's config.json) with flags over its keys, and a bad file is one line naming the file and the key."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from conftest import run_cli
from emnist_cnn.cli import build_parser
from emnist_cnn.cli.commands import config_from_args
from emnist_cnn.config import FLAGS, PRESETS, AugmentConfig, ModelConfig, TrainConfig
from emnist_cnn.io.config_files import SECTIONS

PARSER = build_parser()


def show(capsys, *extra) -> str:
    capsys.readouterr()
    assert run_cli(["config", "show", *extra]) == 0
    out = capsys.readouterr()
    assert out.err == ""
    return out.out


def config_of(argv: list) -> TrainConfig:
    """The experiment `emnist-cnn ARGV` (train or run) would start, without training."""
    args = PARSER.parse_args([str(a) for a in argv])
    return config_from_args(args, getattr(args, "preset", None))


@pytest.mark.parametrize("preset", [None, *sorted(PRESETS)])
def test_config_show_round_trips_to_the_same_experiment(preset, capsys, tmp_path):
    """`config show [--preset P]` > FILE; `train --config FILE` starts exactly the experiment the preset (or the
    defaults) would, every setting included. Caught: a setting missing from the file or written in a form that
    reads back differently (the preset's batch size replaced by the recipe's, a float printed as an int)."""
    text = show(capsys, *(["--preset", preset] if preset else []))
    path = tmp_path / "experiment.toml"
    path.write_text(text)
    assert config_of(["train", "--run-dir", tmp_path / "run", "--config", path]) == TrainConfig.new_run(preset)


def test_every_setting_is_written_with_what_it_means_and_its_flag(capsys):
    """Every field of the three config classes is a key of `config show`, commented; the settings a flag sets
    name it. Caught: a new field without a comment in config.py, or a flag missing from the one table."""
    text = show(capsys)
    lines = text.splitlines()
    sections = {"": TrainConfig, **SECTIONS}
    current, seen, block = "", set(), []
    for line in lines[4:]:  # after the header
        if line.startswith("["):
            current = line.strip("[]")
            continue
        m = re.match(r"^(?:# )?([a-z_]+) = (.*?)(?:  # (.*))?$", line)
        if not m:
            block = block + [line[2:]] if line.startswith("# ") else []
            continue
        key = f"{current}.{m[1]}" if current else m[1]
        comment = m[3] or " ".join(block)
        block = []
        assert comment.strip(), f"{key} has no comment"
        assert (f"[flag {FLAGS.get(key)}]" in comment) == (key in FLAGS), (key, comment)
        seen.add(key)
    fields = {f.name if not prefix else f"{prefix}.{f.name}"
              for prefix, cls in sections.items() for f in dataclasses.fields(cls)} - set(SECTIONS)
    assert seen == fields


def test_the_flag_table_names_real_flags_of_train_and_run_and_real_settings():
    """config.FLAGS is the one table of settings and flags: each flag exists on train and run, each key is a
    setting. Caught: a renamed flag left in the table."""
    subs = PARSER._subparsers._group_actions[0].choices
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    fields |= {f"augment.{f.name}" for f in dataclasses.fields(AugmentConfig)}
    fields |= {f"model.{f.name}" for f in dataclasses.fields(ModelConfig)}
    for command in ("train", "run"):
        flags = {s for action in subs[command]._actions for s in action.option_strings}
        assert set(FLAGS.values()) <= flags, command
    assert set(FLAGS) <= fields


def test_flags_override_the_file_and_the_file_overrides_the_preset(tmp_path):
    """Precedence: defaults, then --preset (run), then the file, then flags; [augment] keys merge into the
    preset's augmentation. Caught: the file read after the flags, or a partial [augment] resetting the rest."""
    path = tmp_path / "mine.toml"
    path.write_text('models = 3\nepochs = 5\nrecipe = "fast"\n\n[augment]\nrotation_deg = 8.5\n')
    config = config_of(["run", "--preset", "quick", "--config", path, "--models", "4", "--run-dir", tmp_path / "r"])
    quick = TrainConfig.new_run("quick")
    assert (config.models, config.epochs, config.recipe) == (4, 5, "fast")
    assert config.augment == dataclasses.replace(quick.augment, rotation_deg=8.5)
    assert config.limit_train == quick.limit_train == 20_000
    assert config.batch_size == 64  # no batch size in the file or the flags: the fast recipe's, as with --recipe
    assert config_of(["train", "--config", path, "--no-augment", "--run-dir", tmp_path / "t"]).augment == \
        AugmentConfig(enabled=False, rotation_deg=8.5)


@pytest.mark.parametrize("content, expected", [
    ("modles = 3\n", "unknown key 'modles' (known: dataset, dropouts, models"),
    ("[augment]\nrotation = 3\n", "unknown key 'augment.rotation' in [augment] (known: enabled, rotation_deg"),
    ('epochs = "ten"\n', "epochs must be an integer, got 'ten'"),
    ("dropouts = 0.2\n", "dropouts must be a list of numbers, got 0.2"),
    ("augment = 3\n", "augment must be a table ([augment]), got 3"),
    ("models = 0\n", "models must be >= 1, got 0"),
    ("lr = -1.0\n", "lr must be a positive number, got -1.0"),
    ("[augment]\nrotation_deg = -1\n", "augment.rotation_deg must be >= 0 degrees, got -1.0"),
    ('[model]\nprecision = "fp8"\n', "model.precision must be one of float32, mixed_bfloat16, mixed_float16"),
    ("models = = 3\n", "not valid TOML (Invalid value (at line 1, column 10))"),
])
def test_a_bad_config_file_is_one_line_naming_the_file_and_the_key(content, expected, tmp_path, capsys):
    """Unknown keys, wrong types, out-of-range values and broken TOML: exit 2, one line naming the file and the
    setting as the file spells it (never the flag), nothing written. Caught: a range error naming --models."""
    path = tmp_path / "bad.toml"
    path.write_text(content)
    run = tmp_path / "run"
    capsys.readouterr()
    assert run_cli(["train", "--run-dir", run, "--config", path]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"emnist-cnn: error: {path}: {expected}"), err
    assert not run.exists()


def test_a_missing_config_file_is_one_line(tmp_path, capsys):
    capsys.readouterr()
    assert run_cli(["train", "--run-dir", tmp_path / "run", "--config", tmp_path / "nope.toml"]) == 2
    assert capsys.readouterr().err == f"emnist-cnn: error: --config {tmp_path / 'nope.toml'}: no such file\n"


def test_a_runs_own_config_json_starts_the_same_experiment(tiny_run, tmp_path):
    """`--config RUN/config.json` (a run's record: settings, data, versions) starts the experiment that run has,
    for a new run directory. Caught: the record's other keys taken for settings."""
    run, _ = tiny_run
    saved = json.loads((Path(run) / "config.json").read_text())
    assert set(saved) > {"config"}
    assert config_of(["train", "--run-dir", tmp_path / "new", "--config", Path(run) / "config.json"]) == \
        TrainConfig.from_dict(saved["config"])


def test_run_names_its_default_folder_after_the_files_recipe(tmp_path, monkeypatch):
    """`run --config FILE` without --run-dir: a file choosing the fast recipe gets the folder --recipe fast would
    (runs/quick-emnist-digits-fast), not the preset's. Caught: the folder named before the file is read."""
    from emnist_cnn.cli import commands

    path = tmp_path / "fast.toml"
    path.write_text('recipe = "fast"\n')
    seen = {}

    def stop(args, preset=None):
        seen["run_dir"] = str(args.run_dir)
        raise KeyboardInterrupt

    monkeypatch.setattr(commands, "_train", stop)
    monkeypatch.chdir(tmp_path)
    assert run_cli(["run", "--config", path]) == 130
    assert seen["run_dir"].endswith("runs/quick-emnist-digits-fast")


def test_each_preset_is_a_config_file_that_reads_back_as_the_preset(tmp_path):
    """Presets are data: src/emnist_cnn/presets/NAME.toml, each a config file `--config` accepts (keys and types
    checked) that starts the same experiment as the preset. Caught: a preset file with a misspelt key or a
    wrong type, which config.PRESETS itself would only meet when the preset is used."""
    from importlib import resources

    files = {e.name.removesuffix(".toml"): Path(str(e))
             for e in resources.files("emnist_cnn").joinpath("presets").iterdir() if e.name.endswith(".toml")}
    assert set(files) == set(PRESETS) == {"quick", "reference", "reference-fast"}
    for name, path in files.items():
        assert config_of(["train", "--run-dir", tmp_path / name, "--config", path]) == TrainConfig.new_run(name)
