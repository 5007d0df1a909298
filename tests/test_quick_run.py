"""`make run` as a new user meets it: `emnist-cnn run`, the quick preset, EMNIST Digits fetched on first use
(from a local HTTP server standing in for NIST), then the tables, evaluation files, plots and report.html in
runs/quick-emnist-digits."""

import gzip
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from deps import optional_module
from oracles import read_csv
from emnist_cnn.demos import make_tiny_digits
from localhttp import make_zip, md5

import emnist_cnn  # noqa: F401  (selects the backend before keras is imported)
from emnist_cnn.cli import build_parser, config_from_args
from emnist_cnn.config import TrainConfig
from emnist_cnn.io import download as dl
from emnist_cnn.io.datasets import load_dataset

TUTORIAL = Path(__file__).resolve().parents[1] / "docs" / "tutorial.md"

# What the tutorial says the quick preset is ("A first run").
TUTORIAL_QUICK = dict(dropouts=(0.2,), models=2, epochs=4, checkpoint_every=2, batch_size=128, limit_train=20_000,
                    val_fraction=0.1, bn_recalibration_images=5_000)

PLOTS = {"errors_dropout_0.2", "ensembles", "training_curves_dropout_0.2", "misclassified", "correct",
         "confusion_matrix", "confusion_matrix_normalized", "augmentation"}


def test_quick_preset_is_what_the_tutorial_says(tmp_path, monkeypatch):
    quick = TrainConfig.from_preset("quick")
    assert {k: getattr(quick, k) for k in TUTORIAL_QUICK} == TUTORIAL_QUICK
    assert quick.dataset == "emnist-digits" and quick.lr == 1e-3 and quick.augment.enabled
    # 18,000 train + 2,000 validation images out of the 20,000-image subset.
    assert round(quick.limit_train * (1 - quick.val_fraction)) == 18_000
    # The tutorial's "every setting spelled out as flags" is that preset (on MNIST, with its --epochs 2).
    text = TUTORIAL.read_text()
    command = re.search(r"emnist-cnn (train --run-dir runs/small [^`]*)```", text)
    assert command, "the tutorial lost its spelled-out quick command"
    argv = command.group(1).replace("\\\n", " ").split()
    monkeypatch.chdir(tmp_path)  # runs/small is a new run here, whatever exists in the checkout
    assert config_from_args(build_parser().parse_args(argv)) == quick.replace(dataset="mnist", epochs=2)


@pytest.mark.parametrize("argv, folder", [
    (["run"], "runs/quick-emnist-digits"),
    (["run", "--dataset", "mnist"], "runs/quick-mnist"),
    (["run", "--preset", "reference", "--dataset", "emnist-letters"], "runs/reference-emnist-letters"),
])
def test_run_names_its_default_folder_after_preset_and_dataset(tmp_path, monkeypatch, argv, folder):
    """Without --run-dir, `run` trains in runs/<preset>-<dataset> under the current folder, with the preset."""
    from emnist_cnn.training import train as train_module

    class Started(Exception):
        pass

    calls = []

    def instead_of_training(config, run_dir, source=None, options=None):
        calls.append((config, run_dir))
        raise Started

    monkeypatch.setattr(train_module, "train_and_evaluate", instead_of_training)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Started):
        run_cli(argv)
    [(config, run_dir)] = calls
    assert Path(run_dir) == Path(folder)
    preset = argv[argv.index("--preset") + 1] if "--preset" in argv else "quick"
    dataset = argv[argv.index("--dataset") + 1] if "--dataset" in argv else "emnist-digits"
    assert config == TrainConfig.from_preset(preset, dataset=dataset)


def _emnist_digits_gzip_zip(x_train, y_train, x_test, y_test) -> dict[str, bytes]:
    """NIST's gzip.zip layout for the digits split: EMNIST idx files (images stored transposed) and the mapping."""
    def images(x):
        stored = np.ascontiguousarray(np.transpose(x, (0, 2, 1)), np.uint8)  # EMNIST: column by column
        return gzip.compress(struct.pack(">IIII", 2051, len(x), 28, 28) + stored.tobytes(), mtime=0)

    def labels(y):
        return gzip.compress(struct.pack(">II", 2049, len(y)) + np.asarray(y, np.uint8).tobytes(), mtime=0)

    return {
        "gzip/emnist-digits-train-images-idx3-ubyte.gz": images(x_train),
        "gzip/emnist-digits-train-labels-idx1-ubyte.gz": labels(y_train),
        "gzip/emnist-digits-test-images-idx3-ubyte.gz": images(x_test),
        "gzip/emnist-digits-test-labels-idx1-ubyte.gz": labels(y_test),
        "gzip/emnist-digits-mapping.txt": "".join(f"{i} {48 + i}\n" for i in range(10)).encode(),
        "gzip/emnist-letters-mapping.txt": b"1 65 97\n",  # another split: not extracted
    }


@pytest.mark.trains
@pytest.mark.usefixtures("offline_network")
def test_first_run_downloads_emnist_then_trains_evaluates_plots_and_reports(server, tmp_path,
                                                                             monkeypatch, capsys):
    digits = make_tiny_digits(n_train=300, n_test=100, seed=1)
    members = _emnist_digits_gzip_zip(*digits)
    archive = make_zip(members)
    server.files["/gzip.zip"] = archive
    # The archive and its files are checked against md5 sums, as NIST's are (ours are a small stand-in).
    monkeypatch.setattr(dl, "ARCHIVE_MD5S", {"gzip.zip": md5(archive)})
    monkeypatch.setitem(dl.download_emnist.__kwdefaults__, "member_md5s",
                        {name.split("/")[-1]: md5(content) for name, content in members.items()})
    data_dir = tmp_path / "home" / ".cache" / "emnist-cnn" / "data"
    monkeypatch.setenv("EMNIST_CNN_DATA", str(data_dir))  # where ~/.cache would be: nothing there yet
    monkeypatch.setenv(dl.MIRROR_ENV, server.url)  # NIST's stand-in
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)

    # `make run ARGS="--epochs 2"`: the quick preset with 2 of its 4 epochs (one checkpoint), to save CI time.
    # With an MLflow store (sqlite, no server): the run's metrics, then its config, plots and report as files.
    mlflow = optional_module("mlflow", "the run is also logged into a local MLflow store")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert run_cli(["run", "--epochs", "2", *(["--mlflow", store] if mlflow else [])]) == 0
    out = capsys.readouterr().out

    # Downloaded once, verified, and only the digits split extracted.
    assert server.requests == [("/gzip.zip", None)]
    assert sorted(p.name for p in data_dir.iterdir()) == sorted(
        ["gzip.zip"] + [name.split("/")[-1] for name in members if "-digits-" in name])
    ds = load_dataset("emnist-digits", data_dir)
    np.testing.assert_array_equal(ds.x_test, digits[2])  # upright again
    np.testing.assert_array_equal(ds.y_test, digits[3])

    # The default folder, holding the preset.
    assert [p.name for p in (project / "runs").iterdir()] == ["quick-emnist-digits"]
    run = Path("runs/quick-emnist-digits")
    saved = json.loads((run / "config.json").read_text())
    assert TrainConfig.from_dict(saved["config"]) == TrainConfig.from_preset("quick", epochs=2)
    assert saved["data"]["name"] == "emnist-digits" and Path(saved["data"]["data_dir"]) == data_dir.resolve()
    assert (saved["data"]["n_train"], saved["data"]["n_val"], saved["data"]["n_test"]) == (270, 30, 100)
    d = run / "dropout_0.2"
    assert sorted(p.name for p in (d / "weights").iterdir()) == [
        f"002epochs_weights_model_{i}.weights.h5" for i in (0, 1)]
    for i in (0, 1):
        assert [int(r["epoch"]) for r in read_csv(d / "history" / f"model_{i}.csv")] == [1, 2]

    # The evaluation of the last checkpoint, written beside it.
    folder = d / "evaluation" / "test_epoch_002"
    assert sorted(p.name for p in folder.iterdir()) == ["confusion_matrix.csv", "evaluation.json",
                                                       "misclassified.csv"]
    evaluation = json.loads((folder / "evaluation.json").read_text())
    errors = {(r["model"], r["split"]): int(r["n_errors"]) for r in read_csv(d / "history" / "errors.csv")
              if r["epoch"] == "2"}
    assert evaluation["ensemble"]["n_errors"] == errors["ensemble", "test"]
    assert len(read_csv(folder / "misclassified.csv")) == errors["ensemble", "test"]

    # The printed table: every member's and the ensemble's errors as in errors.csv, and the best member on
    # validation (the fewest validation errors, the first on a tie) with its test error.
    for name in ("model 0", "model 1", "ensemble"):
        key = name.removeprefix("model ")
        row = re.search(rf"^{name}\s+[\d.]+% \((\d+)/30; 95% CI [\d.]+-[\d.]+%\)"
                        rf"\s+[\d.]+% \((\d+)/100; 95% CI [\d.]+-[\d.]+%\)$", out, re.M)
        assert row and (int(row.group(1)), int(row.group(2))) == (errors[key, "val"], errors[key, "test"]), name
    best = min(("0", "1"), key=lambda m: (errors[m, "val"], int(m)))
    assert re.search(rf"^best member on validation: model {best}, test error [\d.]+% "
                     rf"\({errors[best, 'test']}/100; 95% CI [\d.]+-[\d.]+%\)$", out, re.M), out

    # 8 PNGs and one self-contained report page.
    plots = run / "plot_history"
    assert {p.stem for p in plots.iterdir()} == PLOTS and all(p.suffix == ".png" for p in plots.iterdir())
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots.iterdir())
    html = (run / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') == len(PLOTS)
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", html)  # nothing fetched from elsewhere
    assert out.rstrip().endswith(f"run directory: {run}\nplots: {plots}/ (8 PNG files)\nreport: {run}/report.html")

    assert sorted(p.name for p in project.iterdir()) == ["runs"]  # nothing else in the folder it ran in
    if mlflow is None:
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store)
    [logged] = client.search_runs([client.get_experiment_by_name("emnist-cnn").experiment_id])
    for i in (0, 1):
        loss = client.get_metric_history(logged.info.run_id, f"dropout_0.2/model_{i}/epoch/loss")
        assert [(m.step, m.value) for m in loss] == [(int(r["epoch"]), float(r["loss"]))
                                                    for r in read_csv(d / "history" / f"model_{i}.csv")]
    files = {f.path for f in client.list_artifacts(logged.info.run_id)}
    assert files == {"config.json", "plot_history", "report.html"}
    # The store's files beside it, none in the folder the command ran in (MLflow's default is ./mlruns).
    assert logged.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri() + "/")
    assert (tmp_path / "mlartifacts" / logged.info.run_id / "artifacts" / "report.html").is_file()
    assert {f.path for f in client.list_artifacts(logged.info.run_id, "plot_history")} == {
        f"plot_history/{p.name}" for p in plots.iterdir()}


@pytest.mark.skipif(shutil.which("strace") is None, reason="counts the files a command opens with strace")
def test_run_on_a_finished_run_reads_its_config_and_loads_its_data_once(tiny_run, tmp_path):
    """`run` with nothing left to train (evaluate, plot, report) opens config.json once and loads the dataset
    once: one RunDir for the command, and the data training loaded handed on to evaluation and plots.
    Caught: RunDir re-reading config.json on every read_record (11 opens), a RunDir built again from the path."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run[0], run)
    ds = load_dataset("mnist", tiny_run[1])  # fills this test's decoded cache: a load is one read of its meta.json
    trace = tmp_path / "openat.txt"
    # --seccomp-bpf: only openat stops the process (12 s here instead of 33 s with every system call traced).
    r = subprocess.run(["strace", "-f", "-qq", "--seccomp-bpf", "-e", "trace=openat", "-o", str(trace), sys.executable,
                        "-m", "emnist_cnn", "run", "--run-dir", str(run)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ensemble" in r.stdout and (run / "report.html").is_file()
    opened = [line.split('"')[1] for line in trace.read_text().splitlines()
              if "openat(" in line and '"' in line and "ENOENT" not in line]
    assert sum(Path(p) == run / "config.json" for p in opened) == 1
    cache = Path(os.environ["EMNIST_CNN_CACHE"])
    assert sum(Path(p).name == "meta.json" and cache in Path(p).parents for p in opened) == 1
    assert ds.fingerprint == json.loads((run / "config.json").read_text())["data"]["fingerprint"]
