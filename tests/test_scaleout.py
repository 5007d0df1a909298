"""`--ray`: a sweep's members trained as Ray tasks on a real 2-node cluster (started here on this machine) give
the bits of a local run with the same thread count, also when a worker is SIGKILLed and a node dies
mid-segment."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import warmstart

from conftest import trains_a_model
from deps import require_module
from oracles import assert_same_run
from emnist_cnn.demos import make_tiny_digits, write_mnist_idx

pytestmark = pytest.mark.cpu_facts  # to the bit (and the CPU chosen): CPU facts

# Without --quiet: the output is a pipe, so training prints one line per epoch instead of progress bars.
ARGS = ["--dataset", "mnist", "--dropout", "0.2", "0.3", "--models", "2", "--checkpoint-every", "1",
        "--batch-size", "64", "--val-fraction", "0.2", "--bn-recalibration", "100", "--threads", "1"]
MEMBERS = [(d, i) for d in ("0.2", "0.3") for i in (0, 1)]


def cli(*argv, timeout=600) -> subprocess.CompletedProcess:
    """The driver, in a warm process (tests/warmstart.py); the cluster's workers are Ray's own."""
    return warmstart.run([sys.executable, "-m", "emnist_cnn", *map(str, argv)], capture_output=True, text=True,
                         timeout=timeout)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_mnist_idx(tmp_path_factory.mktemp("scaleout-data"), *make_tiny_digits(n_train=300, n_test=100))


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes of one CPU each on this machine: every member segment waits for a free node."""
    require_module("ray", "the --ray tests start a Ray cluster")
    from ray.cluster_utils import Cluster

    # One logical GPU per node: Ray schedules by it (TensorFlow's CPU build ignores the device).
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 1})
    worker = c.add_node(num_cpus=1, num_gpus=1)
    c.wait_for_nodes()
    yield c, worker
    c.shutdown()


@pytest.fixture(scope="module")
@trains_a_model
def local_run(tmp_path_factory, data) -> Path:
    """The same sweep in one local process, 1 thread, 2 epochs."""
    run = tmp_path_factory.mktemp("scaleout-local") / "run"
    r = cli("train", "--run-dir", run, "--data-dir", data, *ARGS, "--epochs", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    # Not a terminal: no progress-bar frames (about 16 KB per member-epoch in a log), one line per epoch.
    assert "\r" not in r.stdout + r.stderr and "step" not in r.stdout
    assert len(re.findall(r"^dropout 0\.[23] model [01] epoch [12]/2: loss ", r.stderr, re.M)) == 8, r.stderr
    assert json.loads((run / "config.json").read_text())["versions"]["env"]["TF_NUM_INTRAOP_THREADS"] == "1"
    return run


def assert_same_results(run: Path, expected: Path) -> None:
    """Histories (wall time aside), errors.csv, text tables, checkpoints and states, to the bit; and TensorBoard
    (sent by the driver after each segment) holding every epoch once, with the same values."""
    kinds = assert_same_run(run, expected, tensorboard=True)
    # 2 rates x 2 members x 2 epochs: 4 histories, 2 errors.csv, 4 ensemble mistake tables, 4 text tables,
    # 8 checkpoints, 8 states.
    assert kinds == {"history": 4, "errors": 2, "misclassified": 4, "text": 4, "weights": 8, "state": 8}


def read_segments(run: Path) -> dict[tuple[str, int], list[dict]]:
    out = {}
    for d, i in MEMBERS:
        path = run / f"dropout_{d}" / "history" / f"segments_model_{i}.jsonl"
        out[(d, i)] = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return out


def test_fused_groups_on_gpus_equal_the_local_run(cluster, data, local_run, tmp_path):
    """--gpus-per-member 0.5, fused by default since the tasks get GPUs: one task per dropout rate and
    checkpoint trains its two members together on a node's (logical) GPU, spread over both nodes; fused
    training gives the one-at-a-time bits. Each GPU task runs in a worker process of its own (a reused one
    would keep the GPU its first task opened). (One-member tasks are the killed-worker test's: they give
    the same bits.)"""
    cluster, _ = cluster
    run = tmp_path / "ray-run"
    r = cli("train", "--run-dir", run, "--data-dir", data, *ARGS, "--epochs", "2", "--ray", cluster.address,
            "--gpus-per-member", "0.5")
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_results(run, local_run)
    segments = read_segments(run)
    assert all([s["target"] for s in segments[m]] == [1, 2] for m in MEMBERS), segments
    assert len({s["node"] for m in MEMBERS for s in segments[m]}) == 2
    # Both members of a rate in one process per segment.
    for d in ("0.2", "0.3"):
        assert [s["pid"] for s in segments[(d, 0)]] == [s["pid"] for s in segments[(d, 1)]]
    assert len({s["pid"] for m in MEMBERS for s in segments[m]}) == 4  # 2 rates x 2 segments, 4 processes
    # One progress line per member and segment, nothing from the workers themselves.
    lines = [line for line in r.stderr.splitlines() if ": epochs " in line]
    assert len(lines) == 8 and all(" on " in line and "attempt" not in line for line in lines), lines
    assert r.stderr.count("ensemble error val") == 4
    assert "\r" not in r.stdout + r.stderr and "epoch 1/2: loss" not in r.stderr
    # The thread count is recorded with the run, as its driver and tasks used it.
    saved = json.loads((run / "config.json").read_text())
    assert saved["versions"]["env"]["TF_NUM_INTRAOP_THREADS"] == "1"
    invocation = [json.loads(line) for line in (run / "invocations.jsonl").read_text().splitlines()][-1]
    assert (invocation["ray"], invocation["threads"]) == (cluster.address, 1)
    assert invocation["runtime"]["device"] == invocation["runtime"]["jit_compile"] == "auto"
    # Each task decided on its own worker, and its segment says what it got (no GPU build here: the CPU).
    assert {(s["device"], s["xla"]) for m in MEMBERS for s in segments[m]} == {("CPU", False)}


@pytest.mark.trains
def test_device_gpu_reaches_the_workers_and_fails_there_in_one_line(cluster, data, tmp_path):
    """--device gpu is applied by each task on its worker: on these workers (a logical GPU for Ray, a CPU-only
    TensorFlow) the first task stops the run with the worker's reason, not a silent CPU run."""
    cluster, _ = cluster
    r = cli("train", "--run-dir", tmp_path / "run", "--data-dir", data, *ARGS, "--epochs", "1", "--ray",
            cluster.address, "--gpus-per-member", "0.5", "--device", "gpu")
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert "--device gpu: the tensorflow backend sees no usable GPU" in last, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not list((tmp_path / "run").glob("dropout_*/state/*.npz"))


@pytest.mark.trains
def test_ray_local_starts_its_own_instance_beside_a_running_cluster(cluster, data, tmp_path):
    """`--ray local` (and `tune`, which uses it) while another Ray cluster runs on this machine: the members
    train on a Ray instance of the command's own, not on the other cluster's nodes (Ray's default would join
    it, and the other cluster's end would take the command down with it)."""
    cluster, worker = cluster
    run = tmp_path / "run"
    r = cli("train", "--run-dir", run, "--data-dir", data, "--dataset", "mnist", "--dropout", "0.2", "--models",
            "1", "--epochs", "1", "--batch-size", "64", "--val-fraction", "0.2", "--bn-recalibration", "100",
            "--threads", "1", "--ray", "local")
    assert r.returncode == 0, r.stderr[-3000:]
    [segment] = [json.loads(line) for line in (run / "dropout_0.2" / "history" / "segments_model_0.jsonl")
                 .read_text().splitlines()]
    assert segment["node"].split("/")[1] not in {cluster.head_node.node_id[:8], worker.node_id[:8]}


SPACE = "dropout = [0.2, 0.5]\nlr = {loguniform = [1e-4, 3e-3]}\n"


def test_a_search_trial_whose_worker_is_killed_resumes_on_a_retry(cluster, data, tmp_path):
    """`tune --ray ADDRESS` on the cluster: SIGKILL the worker of the first trial after its first epoch. Tune
    starts the trial again in another process, which resumes from the trial's run directory: the epoch finished
    before the kill is not trained again, and the search ends with every trial at its epochs. (Before the
    killed-worker test, which removes a node.)"""
    cluster, _ = cluster
    space = tmp_path / "space.toml"
    space.write_text(SPACE)
    folder = tmp_path / "search"
    driver = warmstart.start([sys.executable, "-m", "emnist_cnn", "tune", "--search-dir", str(folder), "--space",
                              str(space), "--data-dir", str(data), "--dataset", "mnist", "--trials", "2",
                              "--max-epochs", "3", "--grace-epochs", "3", "--threads", "1", "--ray",
                              cluster.address], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    trial = folder / "trials" / "trial_00000"
    try:
        deadline = time.monotonic() + 300
        first = None
        while first is None and time.monotonic() < deadline and driver.poll() is None:
            history = list(trial.glob("dropout_*/history/model_0.csv"))
            rows = history[0].read_text().splitlines() if history else []
            if len(rows) == 2:  # the header and epoch 1
                first = rows[1]
                pid = json.loads((trial / "invocations.jsonl").read_text().splitlines()[-1])["pid"]
                os.kill(pid, signal.SIGKILL)
            time.sleep(0.02)
        assert first is not None, driver.communicate()[1][-3000:]
        out, err = driver.communicate(timeout=600)
    finally:
        driver.kill()
    assert driver.returncode == 0, err[-3000:]
    rows = next(trial.glob("dropout_*/history/model_0.csv")).read_text().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == ["1", "2", "3"] and rows[1] == first
    pids = [json.loads(line)["pid"] for line in (trial / "invocations.jsonl").read_text().splitlines()]
    assert len(pids) == 2 and pids[0] == pid != pids[1]
    board = json.loads((folder / "leaderboard.json").read_text())
    assert sorted(t["trial"] for t in board["trials"]) == ["trial_00000", "trial_00001"]
    assert all(t["epochs"] == 3 for t in board["trials"])


def test_a_killed_worker_and_a_dead_node_are_retried_and_the_result_stays_identical(cluster, data, local_run,
                                                                                   tmp_path):
    """Remove the other node (raylet and all) while its first segment runs, and SIGKILL the worker training a
    second segment (epochs past the first checkpoint) on the head node: both segments run again, the run
    finishes, and every file is the local run's. The killed segment's retry resumes from its member's
    epoch-1 state, not from scratch (which would give the same files on a CPU; issue 28, #1). (Runs last on
    the cluster: it leaves the head node alone.)"""
    cluster, worker_node = cluster
    run = tmp_path / "ray-run"
    driver = warmstart.start([sys.executable, "-m", "emnist_cnn", "train", "--run-dir", str(run), "--data-dir",
                              str(data), *ARGS, "--epochs", "2", "--ray", cluster.address],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # A segment record names the node and process training it; each node's first segment then still
        # has to import Keras, build the model and train, so both kills land mid-segment.
        on_worker = f"/{worker_node.node_id[:8]}"
        deadline = time.monotonic() + 300
        removed = killed = None
        while killed is None and time.monotonic() < deadline and driver.poll() is None:
            for s in (s for m in MEMBERS for s in read_segments(run)[m]):
                if removed is None and s["node"].endswith(on_worker):
                    removed = s
                    cluster.remove_node(worker_node, allow_graceful=False)
                elif killed is None and removed is not None and s["target"] == 2 and not s["node"].endswith(
                        on_worker):
                    killed = s
                    os.kill(killed["pid"], signal.SIGKILL)
            time.sleep(0.05)
        assert removed is not None and killed is not None, f"no segments to interrupt: {read_segments(run)}"
        # A second driver on the same run is refused while the first one holds it.
        second = cli("train", "--run-dir", run, "--data-dir", data, *ARGS, "--epochs", "2", "--ray", cluster.address)
        assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr
        assert second.stderr.strip().splitlines()[-1].endswith("another emnist-cnn process is training in this "
                                                              "run directory"), second.stderr
        out, err = driver.communicate(timeout=600)
    finally:
        driver.kill()
    assert driver.returncode == 0, err[-3000:]
    assert_same_results(run, local_run)
    # Each interrupted segment ran again in another process, on the head node, and the driver said so.
    segments = read_segments(run)
    for victim in (killed, removed):
        member = next(m for m in MEMBERS if victim in segments[m])
        again = [s for s in segments[member] if s["target"] == victim["target"] and s != victim]
        assert len(again) == 1 and again[0]["pid"] != victim["pid"] and not again[0]["node"].endswith(on_worker)
        assert again[0]["from"] == victim["from"] == victim["target"] - 1, (victim, again)
    assert sorted(len(segments[m]) for m in MEMBERS) == [2, 2, 3, 3], segments
    retried = [line for line in err.splitlines() if "(attempt 2)" in line]
    assert len(retried) == 2 and any(": epochs 2-2, " in line for line in retried), err[-3000:]


@pytest.mark.parametrize("case", ["relative run dir", "ray missing", "gpus without ray", "gpu without gpus"])
def test_bad_ray_settings_are_one_line(case, data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = ["train", "--data-dir", str(data), *ARGS, "--epochs", "1"]
    if case == "relative run dir":
        r = cli(*base, "--run-dir", "runs/relative", "--ray", "local")
        want = "must be an absolute path with --ray"
    elif case == "ray missing":
        # Ray made unimportable in the CLI's own process.
        code = "import sys; sys.modules['ray'] = None; from emnist_cnn.cli import main; sys.exit(main(sys.argv[1:]))"
        r = subprocess.run([sys.executable, "-c", code, *base, "--run-dir", str(tmp_path / "run"), "--ray", "local"],
                           capture_output=True, text=True, timeout=300)
        want = "--ray needs Ray, which is not installed"
    elif case == "gpus without ray":
        r = cli(*base, "--run-dir", str(tmp_path / "run"), "--gpus-per-member", "0.5")
        want = "--gpus-per-member needs --ray"
    else:  # Ray would hide every GPU from the tasks
        r = cli(*base, "--run-dir", str(tmp_path / "run"), "--ray", "local", "--device", "gpu")
        want = "--device gpu with --ray needs --gpus-per-member above 0"
    assert r.returncode == 2, r.stderr[-2000:]
    assert want in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()


def test_ray_fuses_members_when_its_tasks_get_gpus_whatever_the_driver_has():
    """The driver of a GPU cluster is often a machine without one: fusing by default follows the tasks' GPUs
    (--gpus-per-member), not the driver's. Catches Ray left unfused by default (`bool(None)`), and
    mixed_float16 fused (its members would share one loss scale)."""
    import dataclasses

    from emnist_cnn.config import ScaleOutConfig, TrainConfig
    from emnist_cnn.training.scaleout import resolve_ray_fused

    config = TrainConfig()
    gpus, cpus = ScaleOutConfig(ray_address="auto", gpus_per_member=0.25), ScaleOutConfig(ray_address="auto")
    assert resolve_ray_fused(None, config, gpus) is True
    assert resolve_ray_fused(None, config, cpus) is False
    assert resolve_ray_fused(False, config, gpus) is False and resolve_ray_fused(True, config, cpus) is True
    half = dataclasses.replace(config, model=dataclasses.replace(config.model, precision="mixed_float16"))
    assert resolve_ray_fused(None, half, gpus) is False


def test_an_ensemble_is_evaluated_once_every_member_has_its_checkpoint(tmp_path):
    """The driver's readiness rule: per dropout rate, the first checkpoint not yet evaluated whose every
    member has its weights file; one evaluation per rate at a time. Catches an evaluation started as soon
    as one member has its file (on a cluster with room, it would load a missing file and stop the run)."""
    from emnist_cnn.config import TrainConfig
    from emnist_cnn.training.scaleout import find_ready_evaluations
    from emnist_cnn.io.rundir import RunDir

    config = TrainConfig(dropouts=(0.2, 0.3), models=3, epochs=32, checkpoint_every=16)
    run = RunDir(tmp_path / "run")

    def write(d, epoch, members):
        for i in members:
            path = run.weights_path(d, epoch, i)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"weights")

    none: dict = {0.2: set(), 0.3: set()}
    assert find_ready_evaluations(run, config, none, set()) == []
    write(0.2, 16, [0])
    write(0.3, 16, [0, 2])
    assert find_ready_evaluations(run, config, none, set()) == []  # members 1 and 2, 1 still training
    write(0.2, 16, [1, 2])
    assert find_ready_evaluations(run, config, none, set()) == [(0.2, 16)]
    assert find_ready_evaluations(run, config, none, {0.2}) == []  # one evaluation per rate at a time
    write(0.2, 32, [0, 1, 2])
    assert find_ready_evaluations(run, config, none, set()) == [(0.2, 16)]  # the earlier checkpoint first
    assert find_ready_evaluations(run, config, {0.2: {16}, 0.3: set()}, set()) == [(0.2, 32)]
    write(0.3, 16, [1])
    assert find_ready_evaluations(run, config, {0.2: {16, 32}, 0.3: set()}, set()) == [(0.3, 16)]
