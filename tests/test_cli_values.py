"""Flag values out of range, on every command: one error line naming the flag and what it accepts, exit 2,
nothing written. Complements test_cli.py's train cases (run in-process here: no TensorFlow start-up each)."""

from __future__ import annotations

import json

import pytest

from emnist_cnn.cli import main
from conftest import trains_a_model

TINY = ["--dataset", "mnist", "--dropout", "0.2", "--models", "1", "--checkpoint-every", "1", "--batch-size", "64",
        "--val-fraction", "0.2", "--bn-recalibration", "100", "--quiet"]


def run(argv, capsys) -> tuple[int, str]:
    """`emnist-cnn ARGV` in this process: exit code and stderr."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse
        code = exc.code
    return code, capsys.readouterr().err


def assert_one_line(code: int, stderr: str, flag: str, allowed: str) -> str:
    assert code == 2, stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, stderr
    assert flag in lines[0] and allowed in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
@trains_a_model
def trained(tmp_path_factory):
    """A tiny run: 1 member, 2 epochs, checkpoints at 1 and 2."""
    from emnist_cnn.demos import make_tiny_digits, write_mnist_idx

    root = tmp_path_factory.mktemp("values")
    data = write_mnist_idx(root / "data", *make_tiny_digits(n_train=200, n_test=60))
    run_dir = root / "run"
    with pytest.MonkeyPatch.context() as mp:  # module fixtures run outside conftest's per-test cache folder
        mp.setenv("EMNIST_CNN_CACHE", str(root / "decoded-cache"))
        assert main(["train", "--run-dir", str(run_dir), "--data-dir", str(data), *TINY, "--epochs", "2"]) == 0
    return run_dir


@pytest.mark.parametrize("command, args, flag, allowed", [
    ("train", ["--dropout", "1"], "--dropout", "[0, 1)"),
    ("train", ["--dropout", "0.2", "0.2"], "--dropout", "repeated"),
    ("train", ["--epochs", "0"], "--epochs", ">= 1"),
    ("train", ["--models", "-2"], "--models", ">= 1"),
    ("train", ["--batch-size", "-5"], "--batch-size", ">= 1"),
    ("train", ["--seed", "-1"], "--seed", ">= 0"),
    ("train", ["--limit-train", "5"], "--limit-train", ">= 10"),
    ("train", ["--bn-recalibration", "-1"], "--bn-recalibration", ">= 0"),
    ("train", ["--val-fraction", "-0.1"], "--val-fraction", "[0, 1)"),
    ("train", ["--lr", "-0.001"], "--lr", "positive"),
    ("train", ["--dataset", "emnist"], "--dataset", "emnist-digits"),
    ("train", ["--epochs", "1.5"], "--epochs", "int"),
    ("run", ["--epochs", "0"], "--epochs", ">= 1"),
    ("run", ["--models", "0"], "--models", ">= 1"),
    ("run", ["--dropout", "1.0"], "--dropout", "[0, 1)"),
    ("run", ["--batch-size", "0"], "--batch-size", ">= 1"),
    ("run", ["--preset", "huge"], "--preset", "quick"),
    ("run", ["--dataset", "cifar10"], "--dataset", "mnist"),
])
def test_train_and_run_refuse_out_of_range_values(tmp_path, capsys, command, args, flag, allowed):
    run_dir = tmp_path / "run"
    code, err = run([command, "--run-dir", run_dir, *args], capsys)
    assert_one_line(code, err, flag, allowed)
    assert not run_dir.exists()


@pytest.mark.parametrize("args, flag, allowed", [
    (["evaluate", "--run-dir", "RUN", "--tta", "-1"], "--tta", ">= 0"),
    (["evaluate", "--run-dir", "RUN", "--split", "train"], "--split", "'test'"),
    (["evaluate", "--weights", "w.h5", "--dataset", "cifar10"], "--dataset", "emnist-digits"),
    (["evaluate", "--run-dir", "RUN", "--epoch", "last"], "--epoch", "'latest'"),
    (["download", "--dataset", "mnist"], "--dataset", "EMNIST"),
    (["download", "--format", "zip"], "--format", "'mat'"),
    (["export", "--run-dir", "RUN", "--formats", "tflite"], "--formats", "json_h5"),
    (["export", "--run-dir", "RUN", "--member", "worst"], "--member", "best, ensemble or a member index"),
    (["export", "--run-dir", "RUN", "--epoch", "last"], "--epoch", "'latest'"),
    (["predict", "model.keras", "a.png", "--top", "0"], "--top", ">= 1"),
    (["predict", "model.keras", "a.png", "--preprocessing", "nist"], "--preprocessing", "emnist"),
])
def test_other_commands_refuse_out_of_range_values(tmp_path, capsys, args, flag, allowed):
    code, err = run([str(tmp_path / a) if a in ("RUN", "w.h5") else a for a in args], capsys)
    assert_one_line(code, err, flag, allowed)


def test_a_checkpoint_the_run_does_not_have_names_the_available_ones(trained, tmp_path, capsys):
    for epoch in ("999", "0"):
        code, err = run(["evaluate", "--run-dir", trained, "--epoch", epoch], capsys)
        line = assert_one_line(code, err, f"--epoch {epoch}", "available: 1, 2")
        code, err = run(["export", "--run-dir", trained, "--epoch", epoch, "--out", tmp_path / "x",
                         "--formats", "json_h5"], capsys)
        line = assert_one_line(code, err, f"--epoch {epoch}", "available: 1, 2")
        assert not (tmp_path / "x").exists(), line
    code, err = run(["evaluate", "--run-dir", trained, "--dropout", "0.9"], capsys)
    assert_one_line(code, err, "--dropout 0.9", "0.2")
    code, err = run(["export", "--run-dir", trained, "--dropout", "0.9", "--out", tmp_path / "x"], capsys)
    assert_one_line(code, err, "--dropout 0.9", "0.2")
    code, err = run(["export", "--run-dir", trained, "--member", "3", "--out", tmp_path / "x"], capsys)
    assert_one_line(code, err, "--member 3", "0..0")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("command", ["train", "run"])
def test_epochs_below_what_is_trained_is_refused_and_changes_nothing(trained, capsys, command):
    before = {p: p.stat().st_mtime_ns for p in trained.rglob("*") if p.is_file()}
    config = json.loads((trained / "config.json").read_text())
    code, err = run([command, "--run-dir", trained, "--epochs", "1"], capsys)
    assert_one_line(code, err, "--epochs 1", "2 epochs already trained")
    assert {p: p.stat().st_mtime_ns for p in trained.rglob("*") if p.is_file()} == before
    assert json.loads((trained / "config.json").read_text()) == config


@pytest.mark.parametrize("setting, value, allowed", [
    ("rotation_deg", -1.0, ">= 0 degrees"),
    ("shift_frac", 1.0, "[0, 1)"),
    ("shear_rad", 2.0, "[0, pi/2) radians"),
    ("zoom_min", 1.2, "0 < min <= max"),
    ("fill_mode", "mirror", "nearest, constant, reflect or wrap"),
    ("interpolation", "cubic", "bilinear or nearest"),
])
def test_a_bad_augmentation_setting_is_named_as_config_json_spells_it(setting, value, allowed):
    """The augmentation has no flags: an error names the setting as config.json and the Python API spell it
    (`augment.rotation_deg`), never a flag `train` does not have. Caught: --rotation, --shift, --shear, --zoom
    (issue 30)."""
    import re

    from emnist_cnn.cli import build_parser
    from emnist_cnn.config import AugmentConfig, TrainConfig
    from emnist_cnn.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        TrainConfig.from_dict({**TrainConfig().to_dict(), "augment": {**AugmentConfig().__dict__, setting: value}})
    message = str(caught.value)
    assert message.startswith(f"augment.{setting}") and allowed in message, message
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    flags = {s for action in train._actions for s in action.option_strings}
    assert set(re.findall(r"--[a-z-]+", message)) <= flags, message
