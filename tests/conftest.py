"""Shared pytest fixtures and the test tiers (`trains`). Helpers live by job: oracles.py (reading and comparing
results), console_lines.py (stderr), deps.py (optional dependencies); the synthetic digits are the package's
own (emnist_cnn.demos), shared with the benchmarks."""

import os
import socket
import threading
from pathlib import Path

import pytest
from localhttp import FakeServer, Handler, HTTPServer
from emnist_cnn.demos import make_tiny_digits, write_mnist_idx

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


def run_cli(argv: list[str]) -> int:
    """`emnist-cnn ARGV` in this process (output captured by capsys)."""
    from emnist_cnn.cli import main

    return main([str(a) for a in argv])


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


# ----------------------------------------------------------------------------- added helpers


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
# end. Longest first, by their seconds in `make test` on 2 cores (--durations=0, 2026-12-07, with the warm
# CLI processes of tests/warmstart.py); a file not listed runs after these, in name order.
LONGEST_FILES_FIRST = (
    "test_scaleout.py",  # 255 s
    "test_tune.py",  # 130 s (2026-12-08, measured alone)
    "test_tutorial.py",  # 136 s (2026-12-08)
    "test_backends.py",  # 218 s
    "test_gpu_check.py",  # 144 s
    "test_fused.py",  # 130 s
    "test_device.py",  # 122 s
    "test_cli.py",  # 101 s
    "test_tracking.py",  # 94 s
    "test_bench.py",  # 91 s
    "test_plots.py",  # 84 s
    "test_killpoints.py",  # 77 s
    "test_train.py",  # 74 s
    "test_compile.py",  # 66 s
    "test_faults.py",  # 59 s
    "test_reference_weights.py",  # 48 s
    "test_reproducible.py",  # 48 s
    "test_notebooks.py",  # 45 s
    "test_quick_run.py",  # 41 s
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
