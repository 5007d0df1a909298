"""`emnist-cnn tune` on the tiny digits, on Ray started by the command itself on this machine: ASHA stops the
trailing trials, the leaderboard ranks the rest on validation, no trial ever holds a test image, a killed
search resumes to the uninterrupted one's bits, and best.toml trains."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import warmstart

from conftest import trains_a_model
from deps import require_module
from oracles import assert_same_run, read_csv
from emnist_cnn.demos import make_tiny_digits, write_mnist_idx

pytestmark = [pytest.mark.cpu_facts, pytest.mark.timeout(900)]

SPACE = """
dropout = [0.2, 0.5]
lr = {loguniform = [1e-4, 3e-3]}
[augment]
rotation_deg = {uniform = [0.0, 15.0]}
"""
# One trial at a time, so the scheduler sees the results in one order and the search is repeatable.
SEARCH = ["--dataset", "mnist", "--trials", "6", "--max-epochs", "3", "--grace-epochs", "1", "--reduction-factor",
          "3", "--concurrent", "1", "--threads", "1"]


def tune(search: Path, data: Path, space: Path, *extra, timeout=600) -> subprocess.CompletedProcess:
    return warmstart.run([sys.executable, "-m", "emnist_cnn", "tune", "--search-dir", str(search), "--space",
                          str(space), "--data-dir", str(data), *SEARCH, *map(str, extra)], capture_output=True,
                         text=True, timeout=timeout)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("tune-inputs")
    space = base / "space.toml"
    space.write_text(SPACE)
    return write_mnist_idx(base / "data", *make_tiny_digits(n_train=300, n_test=100)), space


@pytest.fixture(scope="module")
@trains_a_model
def search(tmp_path_factory, inputs) -> tuple[Path, subprocess.CompletedProcess]:
    """The uninterrupted search, 6 trials of up to 3 epochs, logged into a local MLflow store (sqlite)."""
    require_module("ray", "tune runs its trials with Ray Tune")
    require_module("mlflow", "the search logs into MLflow")
    folder = tmp_path_factory.mktemp("tune-search") / "search"
    r = tune(folder, *inputs, "--mlflow", f"sqlite:///{folder.parent / 'mlflow.db'}")
    assert r.returncode == 0, r.stderr[-3000:]
    return folder, r


def epochs_trained(trial: Path) -> list[int]:
    [history] = trial.glob("dropout_*/history/model_0.csv")
    return [int(row["epoch"]) for row in read_csv(history)]


def test_asha_stops_trailing_trials_and_the_leaderboard_ranks_the_rest_on_validation(search):
    """At least a third of the trials stop early; the leaderboard (printed and leaderboard.json) is in order of
    validation error, each trial at the epochs it trained, with settings inside the space. Catches a scheduler
    that never stops (every trial to 3 epochs), a leaderboard ranked by anything else, and a trial trained
    with settings other than its sample."""
    folder, r = search
    board = json.loads((folder / "leaderboard.json").read_text())
    trials = board["trials"]
    assert len(trials) == 6 and board["max_epochs"] == 3
    stopped = [t for t in trials if t["epochs"] < 3]
    assert len(stopped) >= 2, trials
    errors = [t["val_errors"] / t["val_n"] for t in trials]
    assert errors == sorted(errors)
    # What Tune sampled for each trial (its own params.json), by the trial's index.
    sampled = {p.parent.name.split("_")[3]: json.loads(p.read_text())
               for p in (folder / "tune" / "experiment").glob("run_trial_*/params.json")}
    for t in trials:
        run = folder / "trials" / t["trial"]
        assert epochs_trained(run) == list(range(1, t["epochs"] + 1))
        config = json.loads((run / "config.json").read_text())["config"]
        sample = sampled[t["trial"].split("_")[1]]
        assert config["dropouts"] == [sample["dropout"]] and sample["dropout"] in (0.2, 0.5)
        assert config["lr"] == sample["lr"] and 1e-4 <= sample["lr"] <= 3e-3
        assert config["augment"]["rotation_deg"] == sample["augment.rotation_deg"]
        assert (config["models"], config["epochs"], config["checkpoint_every"]) == (1, 3, 1)
        assert t["settings"] == sample
    lines = r.stdout.splitlines()
    assert [line.split()[1] for line in lines[2:8]] == [t["trial"] for t in trials]
    assert "McNemar exact p =" in r.stdout and "train the winner: emnist-cnn train --run-dir RUN --config" in r.stdout
    assert r.stderr.count("stopped by ASHA at epoch") == len(stopped)


def test_no_trial_ever_holds_a_test_image(search):
    """Trials are trained on a dataset without its test split: each run records 0 test images and has no test
    error anywhere. Catches a search that hands its trials the whole dataset."""
    folder, _ = search
    for run in (folder / "trials").iterdir():
        record = json.loads((run / "config.json").read_text())
        assert record["data"]["n_test"] == 0 and record["data"]["n_val"] == 30
        rows = read_csv(next(run.glob("dropout_*/history/errors.csv")))
        assert rows and {row["split"] for row in rows} == {"val"}


def test_a_killed_search_resumes_to_the_uninterrupted_searchs_bits(tmp_path, search, inputs):
    """SIGKILL the driver (its Ray processes go with it) after the third trial's first epoch, then run the same
    command: every trial ends with the uninterrupted search's files, to the bit, and a finished epoch is not
    trained again (its history row, wall time included, is the one written before the kill). Catches a resume
    that restarts trials from scratch, a scheduler that forgets its rungs (other trials stop or go on), and
    different samples on the second start."""
    uninterrupted, _ = search
    folder = tmp_path / "search"
    data, space = inputs
    driver = warmstart.start([sys.executable, "-m", "emnist_cnn", "tune", "--search-dir", str(folder), "--space",
                              str(space), "--data-dir", str(data), *SEARCH], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    target = folder / "trials" / "trial_00002"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and driver.poll() is None:
            histories = list(target.glob("dropout_*/history/model_0.csv"))
            if histories and len(read_csv(histories[0])) >= 1:
                break
            time.sleep(0.05)
        assert driver.poll() is None, driver.communicate()[1][-3000:]
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=60)
    finally:
        driver.kill()
    before = {p.parent.parent.parent.name: read_csv(p) for p in folder.glob("trials/*/dropout_*/history/model_0.csv")}
    r = tune(folder, data, space)
    assert r.returncode == 0, r.stderr[-3000:]
    names = sorted(p.name for p in (uninterrupted / "trials").iterdir())
    assert sorted(p.name for p in (folder / "trials").iterdir()) == names
    for name in names:
        assert_same_run(folder / "trials" / name, uninterrupted / "trials" / name)
        after = read_csv(next((folder / "trials" / name).glob("dropout_*/history/model_0.csv")))
        assert after[:len(before.get(name, []))] == before.get(name, []), name  # not trained again
    assert json.loads((folder / "leaderboard.json").read_text())["trials"] == \
        json.loads((uninterrupted / "leaderboard.json").read_text())["trials"]


def test_best_toml_trains_the_winner_as_an_ordinary_run(tmp_path, search, inputs):
    """The printed command trains the best trial's settings with the base's members (the quick preset's 2)."""
    folder, _ = search
    data, _ = inputs
    best = json.loads((folder / "leaderboard.json").read_text())["trials"][0]
    run = tmp_path / "winner"
    r = warmstart.run([sys.executable, "-m", "emnist_cnn", "train", "--run-dir", str(run), "--config",
                       str(folder / "best.toml"), "--data-dir", str(data), "--epochs", "1", "--quiet"],
                      capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    config = json.loads((run / "config.json").read_text())["config"]
    assert config["dropouts"] == [best["settings"]["dropout"]] and config["lr"] == best["settings"]["lr"]
    assert config["augment"]["rotation_deg"] == best["settings"]["augment.rotation_deg"]
    assert config["models"] == 2 and config["dataset"] == "mnist"
    assert json.loads((run / "config.json").read_text())["data"]["n_test"] == 100


@pytest.mark.parametrize("change, words", [
    (["--max-epochs", "4"], "holds a search whose --max-epochs differs"),
    (["--search-seed", "1"], "holds a search whose --search-seed differs"),
    (["--preset", "reference"], "holds a search whose base setting batch_size differs"),
])
def test_a_changed_search_is_refused_in_one_line_and_nothing_changes(search, inputs, change, words):
    """The same --search-dir with another setting of the search or of its base: exit 2, one line naming what
    changed, before Ray starts or any file is written. Catches a resume that silently changes its scheduler
    or its samples."""
    folder, _ = search
    data, space = inputs
    def stamps():  # every file but Tune's scratch and the lock (which notes who holds it)
        return {p: p.stat().st_mtime_ns for p in folder.rglob("*")
                if p.is_file() and "tune" not in p.parts and p.name != ".lock"}

    before = stamps()
    args = list(SEARCH)
    for flag, value in zip(change[::2], change[1::2]):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    r = warmstart.run([sys.executable, "-m", "emnist_cnn", "tune", "--search-dir", str(folder), "--space",
                       str(space), "--data-dir", str(data), *args], capture_output=True, text=True, timeout=300)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and words in lines[0], r.stderr
    assert stamps() == before


def test_a_changed_space_is_refused_naming_its_key(search, inputs, tmp_path):
    folder, _ = search
    data, _ = inputs
    other = tmp_path / "space.toml"
    other.write_text(SPACE.replace("[0.2, 0.5]", "[0.2, 0.4]"))
    r = warmstart.run([sys.executable, "-m", "emnist_cnn", "tune", "--search-dir", str(folder), "--space",
                       str(other), "--data-dir", str(data), *SEARCH], capture_output=True, text=True, timeout=300)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "holds a search whose space key dropout differs" in lines[0], r.stderr


def test_final_members_trains_the_winner_on_the_whole_dataset_and_retrains_no_trial(search, inputs):
    """`--final-members 3` on the finished search: every trial replays from its disk (none trains again), then
    the best settings train as SEARCH/final with the test split, whose test error is printed. Catches a final run
    with other settings than best.toml's, one that still lacks the test images, and a rerun that retrains."""
    folder, _ = search
    data, space = inputs
    histories = {p: p.read_text() for p in folder.glob("trials/*/dropout_*/history/model_0.csv")}
    r = tune(folder, data, space, "--final-members", "3")
    assert r.returncode == 0, r.stderr[-3000:]
    assert {p: p.read_text() for p in histories} == histories
    best = json.loads((folder / "leaderboard.json").read_text())["trials"][0]
    record = json.loads((folder / "final" / "config.json").read_text())
    config = record["config"]
    assert config["dropouts"] == [best["settings"]["dropout"]] and config["lr"] == best["settings"]["lr"]
    assert (config["models"], config["epochs"], record["data"]["n_test"]) == (3, 3, 100)
    from emnist_cnn.config import TrainConfig
    from emnist_cnn.io.config_files import apply_config_file, read_config_file

    path = folder / "best.toml"  # the same settings, with the base's members
    assert TrainConfig().replace(**apply_config_file(TrainConfig(), read_config_file(path), path)) == \
        TrainConfig.from_dict(config).replace(models=2)
    tests = [row for row in read_csv(next((folder / "final").glob("dropout_*/history/errors.csv")))
             if row["split"] == "test" and row["model"] == "ensemble"]
    assert [int(row["epoch"]) for row in tests] == [2, 3]  # the quick preset's checkpoints: every 2 epochs, the last
    assert f"the winner, {best['trial']}'s settings with 3 members" in r.stdout and "test error" in r.stdout


def test_the_search_is_an_mlflow_run_with_each_trial_nested_under_it(search):
    """One parent run named after the search directory, finished, with the best validation error and the
    leaderboard; one run per trial under it (MLflow's parentRunId tag) with the trial's settings and its
    validation error per epoch. Catches trials logged as unrelated top-level runs, or a parent left RUNNING."""
    from mlflow.tracking import MlflowClient

    folder, _ = search
    client = MlflowClient(tracking_uri=f"sqlite:///{folder.parent / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("emnist-cnn").experiment_id], max_results=100)
    [parent] = [r for r in runs if r.info.run_name == "search"]
    board = json.loads((folder / "leaderboard.json").read_text())
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["best_val_error_pct"] == pytest.approx(board["trials"][0]["val_error_pct"])
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} == {"leaderboard.json", "best.toml"}
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {t["trial"] for t in board["trials"]} and len(runs) == 7
    for t in board["trials"]:
        child = children[t["trial"]]
        assert float(child.data.params["lr"]) == pytest.approx(t["settings"]["lr"])
        key = f"dropout_{t['settings']['dropout']:g}/ensemble/checkpoint/val_error"
        history = client.get_metric_history(child.info.run_id, key)
        assert [m.step for m in history] == list(range(1, t["epochs"] + 1)), t
