"""Live tracking: TensorBoard event files read back with TensorBoard's own reader, and a real MLflow tracking
server (`mlflow server`, sqlite backend, started here on 127.0.0.1) queried through its REST API.

The runs are tiny (synthetic digits); what is checked is that every recorded epoch and checkpoint reaches each
sink exactly once, with the run directory's values, through a server outage, a resume, and kills between an
epoch and its tracking call or between a sent batch and its record.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import warmstart

from deps import require_module
from oracles import read_csv, read_errors_csv, read_tensorboard
from emnist_cnn.demos import make_tiny_digits, write_mnist_idx
from killtargets import MLFLOW_SENT, TRACKER_SYNC

pytestmark = pytest.mark.trains


WRAPPER = Path(__file__).with_name("killwrap.py")
EPOCH_TAGS = {"epoch/loss": "loss", "epoch/accuracy": "accuracy", "epoch/val_loss": "val_loss",
              "epoch/val_error": "val_accuracy", "epoch/learning_rate": "learning_rate", "epoch/seconds": "seconds"}
RUN_ARGS = ["--dataset", "mnist", "--dropout", "0.2", "--models", "2", "--checkpoint-every", "1",
            "--batch-size", "32", "--val-fraction", "0.2", "--bn-recalibration", "100", "--quiet", "--no-fused"]
ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}  # never reach outside 127.0.0.1


def expected_values(run_dir: Path) -> dict[str, dict[int, float]]:
    """MLflow key -> {step: value}, from the run directory's files read without the package."""
    out: dict[str, dict[int, float]] = {}
    drop = "dropout_0.2"
    for i in range(2):
        for row in read_csv(run_dir / drop / "history" / f"model_{i}.csv"):
            for tag, col in EPOCH_TAGS.items():
                v = float(row[col])
                out.setdefault(f"{drop}/model_{i}/{tag}", {})[int(row["epoch"])] = \
                    100 * (1 - v) if col == "val_accuracy" else v
    for r in read_errors_csv(run_dir / drop / "history" / "errors.csv"):
        writer = "ensemble" if r["model"] == "ensemble" else f"model_{r['model']}"
        out.setdefault(f"{drop}/{writer}/checkpoint/{r['split']}_error", {})[r["epoch"]] = 100 * r["n_errors"] / r["n"]
    return out


def assert_every_point_once(got: dict[str, list[tuple[int, float]]], want: dict[str, dict[int, float]],
                            rel: float) -> None:
    assert sorted(got) == sorted(want)
    for key, points in got.items():
        steps = [s for s, _ in points]
        assert sorted(steps) == sorted(want[key]), f"{key}: steps {steps}, recorded {sorted(want[key])}"
        for step, value in points:
            assert value == pytest.approx(want[key][step], rel=rel, abs=1e-6), f"{key} step {step}"


def test_tensorboard_holds_every_epoch_and_checkpoint_once_with_the_recorded_values(tiny_run):
    run_dir, _ = tiny_run
    scalars, images = read_tensorboard(run_dir)
    # Event files keep float32: equal to the CSVs' values to float32 precision.
    assert_every_point_once(scalars, expected_values(run_dir), rel=1e-6)
    errors = [r for r in read_errors_csv(run_dir / "dropout_0.2" / "history" / "errors.csv")
              if r["model"] == "ensemble"]
    for split in ("val", "test"):
        shown = {e.step: e for e in images.get(f"dropout_0.2/ensemble/images/misclassified_{split}", [])}
        wrong = {r["epoch"]: r["n_errors"] for r in errors if r["split"] == split}
        assert sorted(wrong) == [1, 2] and sorted(shown) == [e for e in (1, 2) if wrong[e]]
        for epoch, n in wrong.items():  # 8 per row, 56 + 12 pixels each (2x scale and a caption)
            if n:
                assert shown[epoch].height == 68 * math.ceil(min(n, 64) / 8), (split, epoch, n)
    grids = images["dropout_0.2/ensemble/images/augmentation"]
    assert [(e.step, e.width, e.height) for e in grids] == [(1, 448, 448), (2, 448, 448)]
    assert grids[0].encoded_image_string != grids[1].encoded_image_string  # warps drawn per checkpoint


# ----------------------------------------------------------------------------- a real MLflow server


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with a sqlite backend; stop() kills it, start() brings it back (same data).

    The first start takes a port of the server's own choosing (--port 0; its log says which); a restart asks
    for the same port again, as a real server coming back at its address would."""

    def __init__(self, root: Path):
        require_module("mlflow", "the tracking tests start a real MLflow server")
        self.root, self.port, self.url = root, 0, None
        self.proc = None

    def start(self) -> None:
        mlflow = Path(sys.executable).with_name("mlflow")
        log_path = self.root / "server.log"
        offset = log_path.stat().st_size if log_path.exists() else 0
        self.proc = subprocess.Popen(
            [str(mlflow), "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            stdout=open(log_path, "ab"), stderr=subprocess.STDOUT, start_new_session=True,
            # Without MLflow's job runner (9 more Python processes at each start; runs are logged without it).
            env={**os.environ, **ENV, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            log = log_path.read_bytes()[offset:].decode(errors="replace")
            assert self.proc.poll() is None, log[-2000:]
            if self.url is None:
                found = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", log)
                if found:
                    self.port = int(found.group(1))
                    self.url = f"http://127.0.0.1:{self.port}"
            if self.url is not None:
                try:
                    with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                        if r.status == 200:
                            return
                except OSError:
                    pass
            time.sleep(0.5)
        raise AssertionError("mlflow server did not start in 120 s")

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def api(self, endpoint: str, **query) -> dict:
        url = f"{self.url}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query)}"
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.loads(r.read())

    def runs(self, experiment: str) -> list[dict]:
        exp = self.api("experiments/get-by-name", experiment_name=experiment)["experiment"]
        body = json.dumps({"experiment_ids": [exp["experiment_id"]], "max_results": 100}).encode()
        req = urllib.request.Request(f"{self.url}/api/2.0/mlflow/runs/search", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read()).get("runs", [])

    def history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        metrics = self.api("metrics/get-history", run_id=run_id, metric_key=key, max_results=10000)
        return [(int(m["step"]), float(m["value"])) for m in metrics.get("metrics", [])]

    def all_metrics(self, run: dict) -> dict[str, list[tuple[int, float]]]:
        keys = {m["key"] for m in run["data"].get("metrics", [])}
        return {k: self.history(run["info"]["run_id"], k) for k in keys}


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    yield server
    if server.proc.poll() is None:
        server.stop()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_mnist_idx(tmp_path_factory.mktemp("tracking-data"), *make_tiny_digits(n_train=300, n_test=100))


def emnist_cnn(args, *, kill: dict | None = None, cache: Path, timeout=300) -> subprocess.CompletedProcess:
    """The CLI in a warm child process (tests/warmstart.py); with `kill`, through tests/killwrap.py."""
    env = {**os.environ, **ENV, "EMNIST_CNN_CACHE": str(cache)}
    env.pop("MLFLOW_TRACKING_URI", None)
    if kill is None:
        cmd = [sys.executable, "-m", "emnist_cnn"]
    else:
        cmd = [sys.executable, str(WRAPPER)]
        env["EMNIST_CNN_KILL_SPEC"] = json.dumps({"targets": [kill["target"]], "fired_file": kill["fired_file"],
                                                  **kill})
    return warmstart.run([*cmd, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)


def the_run(server: MlflowServer, experiment: str) -> dict:
    runs = server.runs(experiment)
    assert len(runs) == 1, [r["info"]["run_name"] for r in runs]
    return runs[0]


def assert_run_complete(server: MlflowServer, experiment: str, run_dir: Path, epochs: int) -> None:
    """One MLflow run holding every recorded epoch and checkpoint once, and the config as parameters."""
    run = the_run(server, experiment)
    want = expected_values(run_dir)
    assert all(sorted(v) == list(range(1, epochs + 1)) for v in want.values())
    assert_every_point_once(server.all_metrics(run), want, rel=1e-9)
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    config = json.loads((run_dir / "config.json").read_text())["config"]
    assert params["models"] == "2" and params["dropouts"] == "[0.2]" and params["augment.rotation_deg"] == "12.0"
    assert params["batch_size"] == str(config["batch_size"]) and "epochs" not in params  # epochs may grow: a tag
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["epochs"] == str(epochs) and tags["emnist_cnn.run_dir"] == str(run_dir.resolve())
    tb, _ = read_tensorboard(run_dir)
    assert_every_point_once(tb, want, rel=1e-6)


def wait_for_metric(server: MlflowServer, experiment: str, key: str, step: int, proc, timeout=240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            runs = server.runs(experiment)
        except OSError:  # 404 until the training process creates the experiment
            runs = []
        if runs and step in [s for s, _ in server.history(runs[0]["info"]["run_id"], key)]:
            return
        time.sleep(0.3)
    raise AssertionError(f"{key} step {step} never reached the server (training exit {proc.poll()})")


@pytest.mark.trains
def test_kills_and_a_server_outage_neither_lose_nor_double_an_epoch(mlflow_server, data_dir, tmp_path):
    """One run through four processes: killed between an epoch and its tracking call; killed after the
    server stored a batch but before the run recorded it; the server killed mid-run (training finishes with
    one warning); the server back and the same command again. Then one MLflow run holds every epoch once."""
    run_dir, exp, cache = tmp_path / "run", "kills-and-outage", tmp_path / "cache"
    args = ["train", "--run-dir", run_dir, "--data-dir", data_dir, "--epochs", "3", *RUN_ARGS,
            "--mlflow", mlflow_server.url, "--mlflow-experiment", exp]
    fired = tmp_path / "fired.json"
    # Syncs: 1 the catch-up at start, 2 model 0's epoch 1, 3 model 1's epoch 1 (recorded, not yet sent).
    r = emnist_cnn(args, cache=cache, kill={"target": TRACKER_SYNC, "n": 3,
                                            "when": "before", "how": "SIGKILL", "fired_file": str(fired)})
    assert r.returncode == -signal.SIGKILL and fired.is_file(), r.stderr[-3000:]
    # The catch-up at start sends model 1's epoch 1; killed before the run records that it did.
    r = emnist_cnn(args, cache=cache, kill={"target": MLFLOW_SENT, "n": 1,
                                            "when": "before", "how": "SIGKILL", "fired_file": str(fired)})
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert json.loads((run_dir / "tracking" / "mlflow.json").read_text())[mlflow_server.url]["pending"]

    env = {**os.environ, **ENV, "EMNIST_CNN_CACHE": str(cache)}
    proc = warmstart.start([sys.executable, "-m", "emnist_cnn", *map(str, args)], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_for_metric(mlflow_server, exp, "dropout_0.2/model_0/epoch/loss", 2, proc)
        mlflow_server.stop()  # the server dies mid-run
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    warnings = [line for line in err.splitlines() if "tracking failed" in line]
    assert len(warnings) == 1 and mlflow_server.url in warnings[0], err[-3000:]
    assert (run_dir / "dropout_0.2" / "weights" / "003epochs_weights_model_1.weights.h5").is_file()

    mlflow_server.start()  # back, with what it stored before the outage
    r = emnist_cnn(args, cache=cache)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "tracking failed" not in r.stderr
    assert_run_complete(mlflow_server, exp, run_dir, epochs=3)
    run = the_run(mlflow_server, exp)
    assert run["info"]["status"] == "FINISHED"
    assert mlflow_server.api("artifacts/list", run_id=run["info"]["run_id"]).get("files", []) == []  # `train`
    # logs no files; `run` and `track` do


def test_a_stopped_or_failed_training_says_so_in_mlflow(mlflow_server, data_dir, tmp_path):
    """Ctrl-C (SIGINT) mid-run leaves the MLflow run KILLED; a failure (an exception where a bug would raise)
    leaves it FAILED, not FINISHED, and the epochs recorded before either are there. Catches every ending
    marked FINISHED (issue 28, #7; the other tests kill with SIGKILL, which marks nothing)."""
    if mlflow_server.proc.poll() is not None:
        mlflow_server.start()
    run_dir, exp, cache = tmp_path / "run", "stopped-and-failed", tmp_path / "cache"
    args = ["train", "--run-dir", run_dir, "--data-dir", data_dir, "--epochs", "2", *RUN_ARGS,
            "--mlflow", mlflow_server.url, "--mlflow-experiment", exp]
    fired = tmp_path / "fired.json"
    # Syncs: 1 the catch-up at start, 2 the first epoch this process records (model 0's epoch 1, then after
    # the resume model 1's epoch 1).
    for how, status in (("SIGINT", "KILLED"), ("raise", "FAILED")):
        r = emnist_cnn(args, cache=cache, kill={"target": TRACKER_SYNC, "n": 2,
                                                "when": "after", "how": how, "fired_file": str(fired)})
        assert r.returncode not in (0, -signal.SIGKILL) and fired.is_file(), r.stderr[-3000:]
        run = the_run(mlflow_server, exp)
        assert run["info"]["status"] == status, (how, run["info"]["status"])
        steps = [s for s, _ in mlflow_server.history(run["info"]["run_id"], "dropout_0.2/model_0/epoch/loss")]
        assert steps == [1]
    r = emnist_cnn(args, cache=cache)
    assert r.returncode == 0, r.stderr[-3000:]
    assert the_run(mlflow_server, exp)["info"]["status"] == "FINISHED"


def test_a_server_back_while_the_process_still_trains_gets_what_it_missed(mlflow_server, tiny_run, tmp_path):
    """README: while the MLflow server is down, training goes on and the sink is tried again every
    `retry_after` seconds (30 by default; 1 here). The server back within the same process: the next
    epoch's sync after that delay sends everything it lacks, and the failure is over. Catches a failed sink
    never retried within the process, whose loss the next command's catch-up would hide (issue 28, #8)."""
    import shutil

    from emnist_cnn.config import TrackingConfig
    from emnist_cnn.training.tracking import Tracker
    from emnist_cnn.io.rundir import RunDir

    if mlflow_server.proc.poll() is not None:
        mlflow_server.start()
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run[0], run_dir)
    run = RunDir(run_dir)
    tracking = TrackingConfig(tensorboard=False, mlflow_uri=mlflow_server.url, mlflow_experiment="retried",
                              retry_after=1.0)
    tracker = Tracker(run, run.read_config(), tracking, training=True)
    mlflow_server.stop()
    tracker.sync(members=[(0.2, 0)])  # one warning, then training would go on
    assert tracker.failed
    mlflow_server.start()
    time.sleep(1.5)
    tracker.sync(members=[(0.2, 1)])  # an ordinary epoch's sync, not a forced one
    assert not tracker.failed
    sent = mlflow_server.all_metrics(the_run(mlflow_server, "retried"))
    want = {k: v for k, v in expected_values(run_dir).items() if "/model_1/epoch/" in k}
    assert_every_point_once({k: v for k, v in sent.items() if "/model_1/epoch/" in k}, want, rel=1e-9)
    tracker.close("FINISHED")


def test_track_and_export_send_a_run_trained_without_mlflow_and_bad_uris_are_refused(mlflow_server, tiny_run,
                                                                                      tmp_path, capsys, caplog,
                                                                                      monkeypatch, closed_port):
    import shutil

    from conftest import run_cli

    if mlflow_server.proc.poll() is not None:
        mlflow_server.start()
    run_dir = tmp_path / "copy"
    shutil.copytree(tiny_run[0], run_dir)
    args = ["track", "--run-dir", run_dir, "--data-dir", tiny_run[1], "--mlflow", mlflow_server.url,
            "--mlflow-experiment", "after-the-fact"]
    assert run_cli(args) == 0
    assert "mlflow: run " in capsys.readouterr().out
    run = the_run(mlflow_server, "after-the-fact")
    assert run["info"]["status"] == "FINISHED"  # every member has its 2 epochs, and no process trains it
    assert_every_point_once(mlflow_server.all_metrics(run), expected_values(run_dir), rel=1e-9)
    files = mlflow_server.api("artifacts/list", run_id=run["info"]["run_id"])["files"]
    assert "config.json" in [f["path"] for f in files]
    assert run_cli(args) == 0  # again: nothing new, nothing doubled
    assert_every_point_once(mlflow_server.all_metrics(the_run(mlflow_server, "after-the-fact")),
                            expected_values(run_dir), rel=1e-9)

    # A run stopped before its epochs (a resume to 3 epochs, killed): KILLED, not RUNNING for ever.
    stopped = tmp_path / "stopped"
    shutil.copytree(tiny_run[0], stopped)
    record = json.loads((stopped / "config.json").read_text())
    record["config"]["epochs"] = 3
    (stopped / "config.json").write_text(json.dumps(record))
    assert run_cli(["track", "--run-dir", stopped, "--mlflow", mlflow_server.url, "--mlflow-experiment",
                    "stopped"]) == 0
    assert the_run(mlflow_server, "stopped")["info"]["status"] == "KILLED"
    # A status a process set stays: a run that FAILED is not made FINISHED by a later `track`.
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=mlflow_server.url).set_terminated(run["info"]["run_id"], "FAILED")
    assert run_cli(args) == 0
    assert the_run(mlflow_server, "after-the-fact")["info"]["status"] == "FAILED"

    # export --mlflow: the export folder as files, and model.keras as an MLflow model anyone can load.
    import keras
    import mlflow.keras
    import numpy as np

    out_dir = tmp_path / "export"
    capsys.readouterr()
    assert run_cli(["export", "--run-dir", run_dir, "--formats", "keras", "--out", out_dir, "--mlflow",
                    mlflow_server.url, "--mlflow-experiment", "after-the-fact"]) == 0
    out = capsys.readouterr().out
    uri = re.search(r"^  mlflow\s+(runs:/\w+/model) at ", out, re.M).group(1)
    assert "View run" not in out  # MLflow's own links stay out of our output
    assert uri == f"runs:/{run['info']['run_id']}/model"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    x = np.random.default_rng(0).random((16, 28, 28, 1), dtype=np.float32)
    np.testing.assert_allclose(mlflow.keras.load_model(uri).predict(x, verbose=0),
                               keras.saving.load_model(out_dir / "model.keras").predict(x, verbose=0), rtol=1e-6)
    files = mlflow_server.api("artifacts/list", run_id=run["info"]["run_id"], path="export")["files"]
    assert {f["path"] for f in files} == {"export/metadata.json", "export/model.keras"}

    unreachable = f"http://127.0.0.1:{closed_port}"
    for uri, code, expect in (("ftp://127.0.0.1/x", 2, "--mlflow needs a tracking URI"),
                              ("mlruns", 2, "--mlflow needs a tracking URI"),
                              (unreachable, 1, f"--mlflow {unreachable}: ")):
        capsys.readouterr()
        assert run_cli(["track", "--run-dir", run_dir, "--mlflow", uri]) == code
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("emnist-cnn: error: ") and expect in err[0], err

    # Training that cannot reach its server at start still trains, and says so once.
    caplog.clear()
    new_run = tmp_path / "unreachable"
    assert run_cli(["train", "--run-dir", new_run, "--data-dir", tiny_run[1], "--dataset", "mnist", "--dropout",
                    "0.2", "--models", "1", "--epochs", "2", "--batch-size", "64", "--limit-train", "200",
                    "--bn-recalibration", "50", "--quiet", "--mlflow", unreachable]) == 0
    failures = [r for r in caplog.records if "tracking failed" in r.getMessage()]
    assert len(failures) == 1 and unreachable in failures[0].getMessage()
    assert (new_run / "dropout_0.2" / "state" / "model_0.npz").is_file()
