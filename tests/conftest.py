"""Shared pytest fixtures."""

import csv
import gzip
import os
import re
import socket
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
from localhttp import FakeServer, Handler, HTTPServer

from emnist_cnn.io.download import MIRROR_ENV

# ../shared next to the project root: real data on developer and CI machines only.
SHARED_DIR = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture
def shared_dir() -> Path:
    """The ../shared folder; skip if absent, fail if EMNIST_CNN_REQUIRE_SHARED=1."""
    if not SHARED_DIR.is_dir():
        message = f"../shared not found at {SHARED_DIR} (real-data tests need it)"
        if os.environ.get("EMNIST_CNN_REQUIRE_SHARED") == "1":
            pytest.fail(message + " and EMNIST_CNN_REQUIRE_SHARED=1 is set")
        pytest.skip(message)
    return SHARED_DIR


# TensorFlow's C++ log lines: absl's ("E0000 00:00:1796614850.961017    2305 util.cc:131] ...") with its notice
# that it is not initialised yet, and TensorFlow's own ("2026-12-07 03:41:34.123456: W tensorflow/...").
TENSORFLOW_LOG_LINE = re.compile(r"^([IWEF]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [\w.-]+:\d+\] "
                                 r"|WARNING: All log messages before absl::InitializeLog\(\)"
                                 r"|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWEF] )", re.M)


# TensorFlow's warnings about a GPU it cannot use ("W0000 ... gpu_device.cc:2342] Cannot dlopen some GPU
# libraries ..."), printed on purpose on a GPU build whose GPU is unusable: the one kind of line tests let through.
TENSORFLOW_GPU_WARNING = re.compile(r"^(W\d{4} \d\d:\d\d:\d+\.\d+ +\d+ |\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: W (\S+/)?)"
                                    r"(gpu_\w+|cuda_\w+|dso_loader)\.cc:\d+\] ")


def read_console_lines(text: str) -> list[str]:
    """The lines of `text` (a process's stderr), less TensorFlow's warnings about a GPU it cannot use."""
    return [line for line in text.splitlines() if not TENSORFLOW_GPU_WARNING.match(line)]


def find_tensorflow_log_lines(text: str) -> list[str]:
    """The lines of `text` that TensorFlow's C++ logging wrote, less its warnings about a GPU it cannot use."""
    return [line for line in read_console_lines(text) if TENSORFLOW_LOG_LINE.match(line)]


def read_csv(path) -> list[dict[str, str]]:
    """A CSV file's rows as dicts of text, read without the package (an independent oracle)."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_errors_csv(path) -> list[dict]:
    """errors.csv rows with typed values: epoch, n_errors, n as int; error_pct as float."""
    return [{"epoch": int(r["epoch"]), "model": r["model"], "split": r["split"], "error_pct": float(r["error_pct"]),
             "n_errors": int(r["n_errors"]), "n": int(r["n"])} for r in read_csv(path)]


def run_cli(argv: list[str]) -> int:
    """`emnist-cnn ARGV` in this process (output captured by capsys)."""
    from emnist_cnn.cli import main

    return main([str(a) for a in argv])


def make_tiny_digits(n_train: int = 600, n_test: int = 200, seed: int = 0):
    """Ten learnable synthetic classes: a fixed random stroke pattern per class, jittered."""
    rng = np.random.default_rng(seed)
    templates = np.zeros((10, 28, 28), np.float32)
    for c in range(10):
        for _ in range(3):
            r, col = rng.integers(6, 22, size=2)
            dr, dc = rng.integers(-1, 2, size=2)
            for t in range(8):
                rr, cc = np.clip(r + t * dr, 2, 25), np.clip(col + t * dc, 2, 25)
                templates[c, rr - 1 : rr + 2, cc - 1 : cc + 2] = 1.0

    def draw(n):
        y = np.arange(n) % 10
        rng.shuffle(y)
        x = templates[y]
        shifts = rng.integers(-2, 3, size=(n, 2))
        x = np.stack([np.roll(img, tuple(s), axis=(0, 1)) for img, s in zip(x, shifts)])
        x = np.clip(x + rng.normal(0, 0.1, x.shape), 0, 1)
        return (x * 255).astype(np.uint8), y.astype(np.int64)

    x_train, y_train = draw(n_train)
    x_test, y_test = draw(n_test)
    return x_train, y_train, x_test, y_test


def write_mnist_idx(folder: Path, x_train, y_train, x_test, y_test) -> Path:
    """Write arrays as classic MNIST gzip idx files (upright images)."""
    folder.mkdir(parents=True, exist_ok=True)

    def images(path, x):
        with gzip.open(path, "wb") as f:
            f.write(struct.pack(">IIII", 2051, len(x), 28, 28) + np.ascontiguousarray(x, np.uint8).tobytes())

    def labels(path, y):
        with gzip.open(path, "wb") as f:
            f.write(struct.pack(">II", 2049, len(y)) + np.asarray(y, np.uint8).tobytes())

    images(folder / "train-images-idx3-ubyte.gz", x_train)
    labels(folder / "train-labels-idx1-ubyte.gz", y_train)
    images(folder / "t10k-images-idx3-ubyte.gz", x_test)
    labels(folder / "t10k-labels-idx1-ubyte.gz", y_test)
    return folder


def arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of a state file (.npz) or a weights file (.h5), by name: to compare runs to the bit."""
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    import h5py

    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def without_seconds(path: Path) -> list[list[str]]:
    """A history CSV's cells without the wall-time column, the one that differs between equal runs."""
    rows = [line.split(",") for line in path.read_text().splitlines()]
    col = rows[0].index("seconds")
    return [r[:col] + r[col + 1:] for r in rows]


def read_tensorboard(run_dir: Path) -> tuple[dict[str, list[tuple[int, float]]], dict[str, list]]:
    """(folder/tag -> [(step, value)] in file order, folder/tag -> [image events]) via TensorBoard's reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars, images = {}, {}
    root = run_dir / "tensorboard"
    for folder in sorted({p.parent for p in root.rglob("events.out.tfevents.*")}):
        acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
        acc.Reload()
        writer = folder.relative_to(root).as_posix()
        for tag in acc.Tags()["scalars"]:
            scalars[f"{writer}/{tag}"] = [(e.step, e.value) for e in acc.Scalars(tag)]
        for tag in acc.Tags()["images"]:
            images[f"{writer}/{tag}"] = acc.Images(tag)
    return scalars, images


# The mark of a test that trains a model, in this process or in a command it runs: `make test-fast` leaves
# these out (`-m "not trains"`), `make test` runs everything.
TRAINS = "trains"


def trains_a_model(fixture_function):
    """Declare that a fixture trains a model: every test that uses it, directly or through another fixture,
    is marked `trains`. Put it under `@pytest.fixture`."""
    fixture_function.trains_a_model = True
    return fixture_function


@pytest.fixture
def tiny_mnist_dir(tmp_path_factory) -> Path:
    """A folder of small synthetic MNIST-format files."""
    return write_mnist_idx(tmp_path_factory.mktemp("tiny-mnist"), *make_tiny_digits())


@pytest.fixture(scope="session")
@trains_a_model
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    """One tiny trained run shared by the tests that only read it: (run directory, data folder).

    2 members of dropout 0.2 x 2 epochs on 600 synthetic digits, checkpoints at 1 and 2, validation and
    test errors. Tests that write into it write only files of their own (evaluation/, export_json_h5/).
    """
    import emnist_cnn  # noqa: F401  (selects the backend before keras is imported)
    from emnist_cnn.config import DataSource, TrainConfig, TrainOptions
    from emnist_cnn.training.train import train_and_evaluate

    base = tmp_path_factory.mktemp("shared-tiny-run")
    data = write_mnist_idx(base / "data", *make_tiny_digits())
    cfg = TrainConfig(dataset="mnist", dropouts=(0.2,), models=2, epochs=2, checkpoint_every=1, batch_size=64,
                      val_fraction=0.2, bn_recalibration_images=200)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EMNIST_CNN_CACHE", str(base / "cache"))
        train_and_evaluate(cfg, base / "run", DataSource(data_dir=data), TrainOptions(verbose=0))
    return base / "run", data


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Never write decoded-data caches or downloads into the user's home during tests."""
    monkeypatch.setenv("EMNIST_CNN_CACHE", str(tmp_path_factory.mktemp("decoded-cache")))
    monkeypatch.delenv("EMNIST_CNN_MIRROR", raising=False)


def planned_steps(run_dir) -> tuple[int, int]:
    """(steps per member epoch, steps of the whole run) as the run's config.json plans them: an epoch is
    ceil(n_train / batch_size) steps, the run `epochs` of them per member and dropout rate."""
    import json
    import math

    record = json.loads((Path(run_dir) / "config.json").read_text())
    cfg = record["config"]
    per_epoch = math.ceil(record["data"]["n_train"] / cfg["batch_size"])
    return per_epoch, per_epoch * cfg["epochs"] * cfg["models"] * len(cfg["dropouts"])


# ----------------------------------------------------------------------------- added helpers

# The 2017 reference's published weights on the 10,000 real MNIST test digits in ../shared, as measured with
# a working conversion (README: 16 errors for the 267-epoch ensemble, 21 for its best model); tests allow a
# stated margin around these counts.
REFERENCE_MNIST_ERRORS = {
    "267_members": (21, 13, 25, 22, 17, 22, 26, 22, 24, 25),  # 267epochs_weights_model_0..9
    "258_model_7": 21,
}

# CI sets this (.ci/run): a test dependency that is missing fails the test instead of skipping it.
REQUIRE_DEPS_ENV = "EMNIST_CNN_REQUIRE_DEPS"


# The extra (pyproject.toml) that installs each optional test dependency; `make test` installs them all.
EXTRA_OF = {"ray": "ray", "mlflow": "mlflow", "jax": "backends", "torch": "backends"}


def _missing_dependency(name: str, why: str) -> str:
    message = f"{name} is not installed ({why}; pip install -e '.[{EXTRA_OF.get(name.split('.')[0], 'dev')}]')"
    if os.environ.get(REQUIRE_DEPS_ENV) == "1":
        pytest.fail(f"{message} and {REQUIRE_DEPS_ENV}=1 is set: in CI a missing test dependency fails")
    return message


def require_module(name: str, why: str):
    """Import a test dependency; skip without it (a test, a fixture or a whole module when called at its top),
    fail when EMNIST_CNN_REQUIRE_DEPS=1 (CI)."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        pytest.skip(_missing_dependency(name, why), allow_module_level=True)


def optional_module(name: str, why: str):
    """Import a dependency a test can partly do without: None and a warning without it, a failure in CI."""
    import importlib
    import warnings

    try:
        return importlib.import_module(name)
    except ImportError:
        warnings.warn(_missing_dependency(name, why), stacklevel=2)
        return None


# --------------------------------------------------------------------------- no network but 127.0.0.1


@pytest.fixture
def server():
    state = FakeServer()
    httpd = HTTPServer(("127.0.0.1", 0), Handler)
    httpd.state = state
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.release.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


@pytest.fixture
def closed_port() -> int:
    """A port of 127.0.0.1 that refuses connections: bound, never listening, and held by the test so that
    nothing else can take it meanwhile."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


@pytest.fixture
def offline_network(monkeypatch):
    """Only 127.0.0.1 may be resolved, and no proxy or user setting leaks in."""
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
                MIRROR_ENV, "EMNIST_CNN_DATA"):
        monkeypatch.delenv(var, raising=False)
    real = socket.getaddrinfo

    def local_only(host, *args, **kwargs):
        if host not in ("127.0.0.1", "localhost"):
            raise socket.gaierror(socket.EAI_NONAME, f"test refuses to resolve {host}")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", local_only)


# CI's wall time is the busier worker's: with `--dist loadfile --no-loadscope-reorder` (Makefile) xdist hands
# out whole files in collection order, so the longest files go first and the short ones fill the gaps at the
# end. Longest first, by their seconds in `make test` on 2 cores (--durations=0, 2026-12-07); a file not
# listed runs after these, in name order.
LONGEST_FILES_FIRST = (
    "test_scaleout.py",  # 195 s
    "test_backends.py",  # 192 s
    "test_tracking.py",  # 145 s
    "test_killpoints.py",  # 128 s
    "test_fused.py",  # 109 s
    "test_cli.py",  # 97 s
    "test_device.py",  # 93 s
    "test_gpu_check.py",  # 91 s
    "test_compile.py",  # 80 s
    "test_bench.py",  # 66 s
    "test_evaluate.py",  # 64 s
    "test_train.py",  # 59 s
    "test_plots.py",  # 58 s
    "test_reproducible.py",  # 41 s
    "test_interop.py",  # 38 s
    "test_faults.py",  # 38 s
    "test_notebooks.py",  # 35 s
)

def _uses_a_training_fixture(item) -> bool:
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return False
    return any(getattr(d.func, "trains_a_model", False)
               for name in item.fixturenames for d in info.name2fixturedefs.get(name, ()))


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order is kept
    for item in items:
        if item.get_closest_marker(TRAINS) is None and _uses_a_training_fixture(item):
            item.add_marker(TRAINS)
    cpu_facts = [item for item in items if item.get_closest_marker("cpu_facts")]
    if cpu_facts:
        from emnist_cnn.core import model

        if model.accelerator_available():
            skip = pytest.mark.skip(reason="checks a CPU fact (results to the bit, or the CPU chosen), and the "
                                           "Keras backend sees a GPU here")
            for item in cpu_facts:
                item.add_marker(skip)


def _fast_tier(config) -> bool:
    return (config.option.markexpr or "").replace(" ", "") == f"not{TRAINS}"


@pytest.fixture(autouse=True)
def _no_training_in_the_fast_tier(request, monkeypatch):
    """In `make test-fast`, a test not marked `trains` that builds a trainer in this process fails, naming
    the mark it lacks (training in a child process is caught by the tier's time, not here)."""
    if not _fast_tier(request.config) or request.node.get_closest_marker(TRAINS) is not None:
        return
    from emnist_cnn.core import trainer

    def refuse(*args, **kwargs):
        raise AssertionError(f"{request.node.nodeid} trains a model: mark it @pytest.mark.{TRAINS} "
                             "(or its fixture @trains_a_model)")

    monkeypatch.setattr(trainer, "build_device_trainer", refuse)
