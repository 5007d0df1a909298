"""The command line as a user meets it: errors, kill-and-resume, and a real training run."""

import argparse
import os
import socket
import subprocess
import sys

import pytest

from console_lines import find_tensorflow_log_lines, read_console_lines
from oracles import read_csv

from emnist_cnn.cli import build_parser

TINY_ARGS = ["--dataset", "mnist", "--dropout", "0.2", "--models", "2", "--checkpoint-every", "1",
             "--batch-size", "64", "--val-fraction", "0.2", "--bn-recalibration", "200", "--quiet"]


def cli(*args, env=None, timeout=600):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "emnist_cnn", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=full_env)


def read_one_error_line(stderr: str) -> str:
    """The whole of stderr, which must be exactly one line: ours (no start-up notes, no log lines before it).
    Only TensorFlow's warnings about a GPU it cannot use may stand beside it (a GPU build on a CPU machine)."""
    lines = read_console_lines(stderr)
    assert len(lines) == 1 and lines[0].startswith("emnist-cnn: error: "), stderr
    return lines[0]


@pytest.mark.parametrize("args, flag", [
    (["--dropout", "1.5"], "--dropout"),
    (["--dropout", "-0.1"], "--dropout"),
    (["--models", "0"], "--models"),
    (["--epochs", "-3"], "--epochs"),
    (["--batch-size", "0"], "--batch-size"),
    (["--val-fraction", "1"], "--val-fraction"),
    (["--lr", "0"], "--lr"),
    (["--lr", "inf"], "--lr"),
    (["--models", "two"], "--models"),
    (["--dataset", "cifar10"], "--dataset"),
    (["--checkpoint-every", "0"], "--checkpoint-every"),
])
def test_bad_flag_values_get_one_line_and_exit_2(tmp_path, args, flag):
    run = tmp_path / "run"
    r = cli("train", "--run-dir", run, *args)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and flag in lines[0], r.stderr
    assert not run.exists()  # nothing written for a rejected command


def test_every_flag_of_every_command_documents_its_default():
    from emnist_cnn.cli.main import COMMANDS

    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices
    assert set(sub) == set(COMMANDS) == {"run", "train", "evaluate", "plot", "export", "predict",
                                          "import-reference", "download", "track", "compare", "config", "tune"}
    for name, p in [("emnist-cnn", parser), *sub.items()]:
        for action in p._actions:
            if action.dest != "help" and not isinstance(action, argparse._SubParsersAction):
                assert "(default:" in (action.help or "") or "(required" in (action.help or ""), \
                    f"{name} {action.option_strings or action.dest} help lacks its default"


def test_every_switch_and_output_is_spelt_one_way():
    """On every command, an on/off flag is a pair (--x/--no-x, one argparse action), never a lone --no-x, and an
    output location is --out (a file or a folder), never --out-dir. Caught (issue 30): --no-download,
    --no-augment, --no-evaluate, --no-images as lone flags beside --fused/--no-fused; plot --out-dir beside
    export --out."""
    sub = build_parser()._subparsers._group_actions[0].choices
    for name, p in sub.items():
        for action in p._actions:
            for option in action.option_strings:
                if option.startswith("--no-"):
                    assert f"--{option[5:]}" in action.option_strings, f"{name} {option} has no --{option[5:]}"
                assert option not in ("--out-dir", "--output", "--output-dir"), f"{name} {option}: use --out"


def test_flag_choices_match_the_engine():
    """The CLI spells out export formats and preprocessing styles so that --help never loads the engine."""
    from emnist_cnn.cli.args import EXPORT_FORMATS, PREPROCESSING_STYLES
    from emnist_cnn.io.model_files import FORMATS
    from emnist_cnn.engine.predict import STYLES

    assert EXPORT_FORMATS == FORMATS and PREPROCESSING_STYLES == STYLES


def test_missing_data_is_one_clear_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = cli("train", "--run-dir", tmp_path / "run", "--data-dir", empty, *TINY_ARGS)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    line = read_one_error_line(r.stderr)
    assert str(empty) in line and "train-images-idx3-ubyte" in line


def test_corrupt_data_file_is_one_clear_line(tmp_path, tiny_mnist_dir):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in tiny_mnist_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "t10k-images-idx3-ubyte.gz").write_bytes((bad / "t10k-images-idx3-ubyte.gz").read_bytes()[:500])
    r = cli("train", "--run-dir", tmp_path / "run", "--data-dir", bad, *TINY_ARGS, "--epochs", "1")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    line = read_one_error_line(r.stderr)
    assert "t10k-images-idx3-ubyte.gz" in line


def test_offline_download_says_so(tmp_path, closed_port):
    mirror = f"http://127.0.0.1:{closed_port}"
    r = cli("download", "--data-dir", tmp_path / "data", "--mirror", mirror)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    line = read_one_error_line(r.stderr)
    assert "could not reach" in line and "offline" in line


def test_train_tries_to_download_missing_emnist_and_reports_offline(tmp_path, closed_port):
    mirror = f"http://127.0.0.1:{closed_port}"
    run = tmp_path / "run"
    r = cli("train", "--run-dir", run, "--dataset", "emnist-digits", "--data-dir", tmp_path / "data",
            "--mirror", mirror, "--epochs", "1")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    line = read_one_error_line(r.stderr)
    assert f"could not reach {mirror}/" in line and "offline" in line  # it went to the mirror it was given
    assert not (run / "config.json").exists()
    # --no-download: no connection at all (the listening mirror is never called), and the command to run.
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen(1)
        listening.setblocking(False)
        r = cli("train", "--run-dir", run, "--dataset", "emnist-digits", "--data-dir", tmp_path / "data",
                "--mirror", f"http://127.0.0.1:{listening.getsockname()[1]}", "--no-download", "--epochs", "1")
        with pytest.raises(BlockingIOError):
            listening.accept()
    assert r.returncode == 1 and "Traceback" not in r.stderr
    line = read_one_error_line(r.stderr)
    assert "emnist-cnn download" in line and str(tmp_path / "data") in line
    assert not (run / "config.json").exists()


@pytest.mark.trains
def test_resume_with_changed_experiment_is_refused(tmp_path, tiny_mnist_dir, closed_port):
    run = tmp_path / "run"
    r = cli("train", "--run-dir", run, "--data-dir", tiny_mnist_dir, *TINY_ARGS, "--epochs", "1", "--models", "1")
    assert r.returncode == 0, r.stderr
    assert find_tensorflow_log_lines(r.stderr) == []  # training on any CPU: nothing from TensorFlow's C++ logging
    r = cli("train", "--run-dir", run, "--data-dir", tiny_mnist_dir, "--models", "3")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    line = read_one_error_line(r.stderr)
    assert "models" in line and "different experiment" in line
    # Refused before the backend starts: TensorFlow's import alone takes 6 s here. Catches the check moved
    # back after configure_process (which imports TensorFlow to set its threads and devices).
    script = ("import sys; from emnist_cnn.cli import main; rc = main(sys.argv[1:]); "
              "print(rc, 'tensorflow' in sys.modules, 'keras' in sys.modules)")
    probe = subprocess.run([sys.executable, "-c", script, "train", "--run-dir", str(run), "--data-dir",
                            str(tiny_mnist_dir), "--models", "3"], capture_output=True, text=True, timeout=120)
    assert probe.stdout.split() == ["2", "False", "False"], probe.stdout + probe.stderr
    # Refused before any data is loaded: no download is attempted for the other dataset (a download would
    # create the data folder, then fail on the closed mirror with exit 1).
    r = cli("train", "--run-dir", run, "--dataset", "emnist-letters", "--data-dir", tmp_path / "nowhere",
            "--mirror", f"http://127.0.0.1:{closed_port}")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    line = read_one_error_line(r.stderr)
    assert "dataset" in line and "different experiment" in line
    assert not (tmp_path / "nowhere").exists()
    # Unset flags take the run's saved values, the data folder included: --epochs and --lr continue it.
    r = cli("train", "--run-dir", run, "--epochs", "2", "--lr", "1e-5", "--quiet")
    assert r.returncode == 0, r.stderr
    hist = read_csv(run / "dropout_0.2" / "history" / "model_0.csv")
    assert [float(row["learning_rate"]) for row in hist] == [pytest.approx(1e-3), pytest.approx(1e-5)]
