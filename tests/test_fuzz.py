"""Fuzzing every loader of untrusted files: each damaged input ends either in success or in one
`EmnistCnnError` line naming the file; never another exception type, never a hang, never an unpickle.

Loaders: EMNIST `.mat` and gzip idx files (`load_dataset`), our Keras 3 `.weights.h5` and the reference's
Keras 2 HDF5 `.pkl` (`read_reference_weights`, `load_weights_any`), `.keras` archives (`load_predictor`,
Keras' safe mode), and a member's resumable state `.npz` (`load_member_state`).

Inputs are a small valid file of each kind, then damaged: bytes flipped, overwritten with "interesting"
integers (huge or zero dimensions, sign bits), inserted, deleted, the file truncated, or replaced by random
bytes. HDF5, zip and npy mutations aim at the structure (metadata, headers, directories) rather than at the
array data, where a flip only changes a number. Bounded and derandomized, so CI sees the same cases on every
run; the whole file takes well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import functools
import gzip
import io
import json
import os
import pickle
import re
import shutil
import struct
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

import emnist_cnn  # noqa: F401  (selects the backend before keras is imported)
from emnist_cnn.errors import EmnistCnnError

REFERENCE_PKL = Path("reference/dropout_0.2/weights/258epochs_weights_model_7.pkl")

# Hypothesis keeps caches in ./.hypothesis by default: keep them out of the working tree.
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "emnist-cnn-hypothesis")


# EMNIST_CNN_FUZZ_EXAMPLES=N runs N random (not derandomized) examples per loader: a longer hunt for bugs.
_EXPLORE = int(os.environ.get("EMNIST_CNN_FUZZ_EXAMPLES", "0") or 0)

# A loader that hangs fails its own test (and the run goes on): 240 s is far above any test's time here.
# A long hunt may take longer than any fixed bound.
pytestmark = [] if _EXPLORE else [pytest.mark.timeout(240)]


def fuzz_settings(n: int) -> settings:
    # derandomize: the same examples on every run (CI is repeatable); database=None: nothing is written
    # into the repository. The conftest's autouse cache fixture is function-scoped but harmless here.
    # deadline=None: a slow example on a busy machine is not a bug; a hang is caught by the timeout marker.
    return settings(max_examples=_EXPLORE or n, deadline=None, derandomize=not _EXPLORE,
                    database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def expect_ok_or_clean_error(call, path: Path) -> str:
    """Run `call`; "ok", or "error" for an EmnistCnnError whose message is one line naming `path`."""
    try:
        call()
    except EmnistCnnError as exc:
        message = str(exc)
        note(f"{type(exc).__name__}: {message}")
        assert "\n" not in message, f"multi-line message: {message!r}"
        assert path.name in message, f"message does not name {path.name}: {message!r}"
        _event(f"refused: {type(exc).__name__}")
        return "error"
    _event("loaded")
    return "ok"


def _event(text: str) -> None:
    """Count outcomes in --hypothesis-show-statistics (outside a hypothesis test there is nothing to count)."""
    from hypothesis.control import currently_in_test_context

    if currently_in_test_context():
        event(text)


# ----------------------------------------------------------------------------- byte mutations

# Integers that break parsers: zero, off-by-one around 28, sign bits, "huge" sizes.
INTERESTING = [0, 1, 2, 27, 28, 29, 255, 256, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF,
               2051, 2049, 10**6, 10**9]


def _word(value: int, width: int, order: str) -> bytes:
    return (value % (1 << (8 * width))).to_bytes(width, order)


def apply_mutations(data: bytes, ops) -> bytes:
    buf = bytearray(data)
    for op in ops:
        kind = op[0]
        if not buf:
            break
        if kind == "flip":
            _, pos, mask = op
            buf[pos % len(buf)] ^= mask
        elif kind == "word":
            _, pos, value, width, order = op
            pos %= len(buf)
            buf[pos:pos + width] = _word(value, width, order)
        elif kind == "insert":
            _, pos, blob = op
            pos %= len(buf) + 1
            buf[pos:pos] = blob
        elif kind == "delete":
            _, pos, count = op
            pos %= len(buf)
            del buf[pos:pos + count]
        elif kind == "truncate":
            _, keep = op
            del buf[keep % len(buf):]
    return bytes(buf)


def mutation_ops(positions: st.SearchStrategy[int]) -> st.SearchStrategy:
    flip = st.tuples(st.just("flip"), positions, st.integers(1, 255))
    word = st.tuples(st.just("word"), positions, st.sampled_from(INTERESTING), st.sampled_from([1, 2, 4, 8]),
                     st.sampled_from(["big", "little"]))
    # In-place damage (flips, interesting words) is drawn most: it keeps a file parseable far enough
    # to reach the deeper checks; shifting and truncating mostly stop a parser at its first check.
    op = st.one_of(
        flip, word, flip, word,
        st.tuples(st.just("insert"), positions, st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("delete"), positions, st.integers(1, 64)),
        st.tuples(st.just("truncate"), st.integers(0, 1 << 30)),
    )
    return st.lists(op, min_size=1, max_size=3)


def mutated(original: bytes, hot: list[tuple[int, int]] | None = None, head: int = 512) -> st.SearchStrategy[bytes]:
    """`original` damaged, mostly at its head and in the `hot` byte ranges [start, end); or random bytes."""
    n = len(original)
    spots = [st.integers(0, min(n, head) - 1), st.integers(0, n - 1)]
    if hot:
        spots.append(st.sampled_from(hot).flatmap(lambda r: st.integers(r[0], max(r[0], r[1] - 1))))
    ops = mutation_ops(st.one_of(*spots))
    return st.one_of(
        ops.map(lambda o: apply_mutations(original, o)),
        ops.map(lambda o: apply_mutations(original, o)),
        ops.map(lambda o: apply_mutations(original, o)),
        st.binary(max_size=4096),
    )


def write_in_fresh_dir(workdir: Path, name: str, content: bytes) -> Path:
    folder = Path(tempfile.mkdtemp(dir=workdir))
    path = folder / name
    path.write_bytes(content)
    return path


# ----------------------------------------------------------------------------- EMNIST .mat


def _emnist_split(n_train=20, n_test=10, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.integers(0, 256, (n_train, 784), dtype=np.uint8),
        "y_train": (np.arange(n_train) % 10).astype(np.uint8).reshape(-1, 1),
        "writers": (100 + np.arange(n_train) // 4).astype(np.uint16).reshape(-1, 1),
        "x_test": rng.integers(0, 256, (n_test, 784), dtype=np.uint8),
        "y_test": (np.arange(n_test) % 10).astype(np.uint8).reshape(-1, 1),
        "mapping": np.array([[i, 48 + i] for i in range(10)], np.uint8),
    }


def _mat_bytes(dataset: dict, compress: bool) -> bytes:
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"dataset": dataset}, do_compression=compress)
    return buf.getvalue()


def _nist_layout(s: dict) -> dict:
    return {
        "train": {"images": s["x_train"], "labels": s["y_train"], "writers": s["writers"]},
        "test": {"images": s["x_test"], "labels": s["y_test"], "writers": np.zeros((len(s["y_test"]), 1))},
        "mapping": s["mapping"],
    }


VALID_MAT = {c: _mat_bytes(_nist_layout(_emnist_split()), c) for c in (False, True)}


def load_mat(workdir: Path, content: bytes) -> tuple[str, Path]:
    from emnist_cnn.io.datasets import load_dataset

    path = write_in_fresh_dir(workdir, "emnist-digits.mat", content)
    try:
        return expect_ok_or_clean_error(lambda: load_dataset("emnist-digits", path.parent, fmt="mat",
                                                             cache=False), path), path
    finally:
        shutil.rmtree(path.parent)


def test_valid_mat_files_load(workdir):
    for content in VALID_MAT.values():
        assert load_mat(workdir, content)[0] == "ok"


@fuzz_settings(60)
@given(content=st.sampled_from([False, True]).flatmap(lambda c: mutated(VALID_MAT[c], head=1024)))
def test_fuzz_mat_bytes(workdir, content):
    load_mat(workdir, content)


# Structure-aware: NIST's layout with any field replaced by a value of another type or shape.
_odd_values = st.one_of(
    st.text(max_size=5),
    st.just(np.zeros((0, 0))),
    st.just({"a": np.ones(2)}),
    st.just(np.array(["ab", "cd"])),
    st.just(np.array([[1.5, np.nan], [np.inf, -1]])),
    st.just(np.full((3, 2), 10**6, np.int64)),
    st.just(np.full((3, 2), -7, np.int32)),
    st.just(np.array([[1e300, 48]])),
    st.just(np.ones((2, 784), np.complex64)),
    st.just(np.ones((3, 784), np.float64) * 300),
    st.just(np.ones((20, 1), bool)),
    st.just(np.array([[70000, 48], [1, 49]], np.uint32)),
    st.just(np.empty((2,), dtype=object)),
)


@fuzz_settings(40)
@given(field=st.sampled_from(["mapping", "train.images", "train.labels", "train.writers", "test.images",
                              "test.labels", "train", "test"]),
       value=_odd_values, compress=st.booleans())
def test_fuzz_mat_structure(workdir, field, value, compress):
    layout = _nist_layout(_emnist_split())
    target, *rest = field.split(".")
    if rest:
        layout[target][rest[0]] = value
    else:
        layout[target] = value
    if isinstance(value, np.ndarray) and value.dtype == object:
        value[:] = [np.ones(3), "x"]
    load_mat(workdir, _mat_bytes(layout, compress))


# ----------------------------------------------------------------------------- idx .gz

MNIST_NAMES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
               "t10k-labels-idx1-ubyte.gz")


def _idx_payloads(n_train=20, n_test=10) -> dict[str, bytes]:
    rng = np.random.default_rng(1)

    def images(n):
        return struct.pack(">IIII", 2051, n, 28, 28) + rng.integers(0, 256, n * 784, dtype=np.uint8).tobytes()

    def labels(n):
        return struct.pack(">II", 2049, n) + (np.arange(n) % 10).astype(np.uint8).tobytes()

    return dict(zip(MNIST_NAMES, (images(n_train), labels(n_train), images(n_test), labels(n_test))))


IDX_RAW = _idx_payloads()
IDX_GZ = {name: gzip.compress(raw, mtime=0) for name, raw in IDX_RAW.items()}


def load_idx(workdir: Path, name: str, content: bytes) -> str:
    from emnist_cnn.io.datasets import load_dataset

    folder = Path(tempfile.mkdtemp(dir=workdir))
    try:
        for other, data in IDX_GZ.items():
            (folder / other).write_bytes(content if other == name else data)
        return expect_ok_or_clean_error(lambda: load_dataset("mnist", folder, cache=False), folder / name)
    finally:
        shutil.rmtree(folder)


def test_valid_idx_files_load(workdir):
    assert load_idx(workdir, MNIST_NAMES[0], IDX_GZ[MNIST_NAMES[0]]) == "ok"


@fuzz_settings(50)
@given(data=st.data(), name=st.sampled_from(MNIST_NAMES))
def test_fuzz_idx_gzip_bytes(workdir, data, name):
    """The compressed bytes damaged: CRC, length, deflate stream, header."""
    load_idx(workdir, name, data.draw(mutated(IDX_GZ[name], head=64)))


@fuzz_settings(60)
@given(data=st.data(), name=st.sampled_from(MNIST_NAMES))
def test_fuzz_idx_payload(workdir, data, name):
    """A valid gzip of a damaged idx file: wrong magic, wrong or huge dimensions, truncated, padded."""
    raw = data.draw(st.one_of(
        mutated(IDX_RAW[name], head=16),
        st.builds(lambda magic, dims, tail: struct.pack(f">I{len(dims)}I", magic, *dims) + tail,
                  st.sampled_from([2051, 2049, 0x0803, 0x0801, 0x0C03, 0, 0xFFFFFFFF, 0x00000D03]),
                  st.lists(st.sampled_from(INTERESTING), min_size=0, max_size=4),
                  st.binary(max_size=2048)),
    ))
    load_idx(workdir, name, gzip.compress(raw, mtime=0))


@pytest.mark.parametrize("dims, says", [
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), "needs 79228162458924105385300197375 bytes"),
    ((2**21, 2**21, 2**22), "needs 18446744073709551616 bytes"),  # 2**64: 0 in int64 arithmetic
])
def test_idx_dimensions_whose_product_overflows_int64_are_reported_exactly(workdir, dims, says):
    from emnist_cnn.io.datasets import read_idx_images
    from emnist_cnn.errors import DataError

    path = write_in_fresh_dir(workdir, "train-images-idx3-ubyte", struct.pack(">IIII", 2051, *dims) + bytes(100))
    with pytest.raises(DataError, match=f"truncated payload: header .* {says}, only 100 present"):
        read_idx_images(path)


# EMNIST's own mapping file (label ascii [ascii2] per line).
@fuzz_settings(40)
@given(text=st.one_of(
    st.text(alphabet="0123456789 -\n\t+.e", max_size=80),
    st.lists(st.tuples(st.integers(-5, 10**20), st.integers(-5, 0x110000 + 5)), min_size=1, max_size=12)
    .map(lambda rows: "".join(f"{a} {b}\n" for a, b in rows)),
    st.binary(max_size=64).map(lambda b: b.decode("latin-1")),
))
def test_fuzz_emnist_mapping_file(workdir, text):
    from emnist_cnn.io.datasets import load_dataset

    folder = Path(tempfile.mkdtemp(dir=workdir))
    try:
        for name, data in IDX_GZ.items():
            base = name.replace("t10k", "test").replace(".gz", "")
            (folder / f"emnist-digits-{base}.gz").write_bytes(data)
        mapping = folder / "emnist-digits-mapping.txt"
        mapping.write_bytes(text.encode("latin-1", "replace"))
        outcome = expect_ok_or_clean_error(lambda: load_dataset("emnist-digits", folder, fmt="idx", cache=False),
                                           mapping)
        note(outcome)
    finally:
        shutil.rmtree(folder)


# ----------------------------------------------------------------------------- HDF5 weight files


@functools.lru_cache(maxsize=None)
def _model():
    from emnist_cnn.core.model import build_model

    return build_model()


def hdf5_metadata_ranges(data: bytes) -> list[tuple[int, int]]:
    """Byte ranges of an HDF5 file that are not array data: superblock, object headers, B-trees, heaps."""
    import h5py

    extents = []
    with h5py.File(io.BytesIO(data), "r") as f:
        def visit(_name, obj):
            if isinstance(obj, h5py.Dataset):
                offset = obj.id.get_offset()
                if offset is not None:
                    extents.append((offset, offset + obj.id.get_storage_size()))

        f.visititems(visit)
    ranges, at = [], 0
    for start, end in sorted(extents):
        if start > at:
            ranges.append((at, start))
        at = max(at, end)
    if at < len(data):
        ranges.append((at, len(data)))
    return ranges


# Originals are module-level values, not fixture arguments: hypothesis would print megabytes of them.
@functools.lru_cache(maxsize=None)
def our_weights() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ours.weights.h5"
        _model().save_weights(path)
        return path.read_bytes()


@functools.lru_cache(maxsize=None)
def reference_weights() -> bytes:
    from conftest import SHARED_DIR

    path = SHARED_DIR / REFERENCE_PKL
    if not path.is_file():
        if os.environ.get("EMNIST_CNN_REQUIRE_SHARED") == "1":
            pytest.fail(f"{path} not found and EMNIST_CNN_REQUIRE_SHARED=1 is set")
        pytest.skip(f"{path} not found (real-data tests need ../shared)")
    return path.read_bytes()  # read in place; mutated copies are written to temporary folders only


def load_weights_file(workdir: Path, name: str, content: bytes, *, reference_reader: bool = False) -> str:
    from emnist_cnn.io.reference_weights import read_reference_weights
    from emnist_cnn.io.weights import load_weights_any

    path = write_in_fresh_dir(workdir, name, content)
    try:
        if reference_reader:
            return expect_ok_or_clean_error(lambda: read_reference_weights(path), path)
        return expect_ok_or_clean_error(lambda: load_weights_any(_model(), path), path)
    finally:
        shutil.rmtree(path.parent)


def test_valid_weight_files_load(workdir):
    assert load_weights_file(workdir, "m.weights.h5", our_weights()) == "ok"
    assert load_weights_file(workdir, "258epochs_weights_model_7.pkl", reference_weights()) == "ok"


@fuzz_settings(50)
@given(data=st.data())
def test_fuzz_our_weights_h5(workdir, data):
    content = data.draw(mutated(our_weights(), hot=_cached_ranges("ours", our_weights()), head=2048))
    load_weights_file(workdir, "000epochs_weights_model_0.weights.h5", content)


@fuzz_settings(50)
@given(data=st.data(), reader=st.booleans())
def test_fuzz_reference_pkl(workdir, data, reader):
    original = reference_weights()
    content = data.draw(mutated(original, hot=_cached_ranges("ref", original), head=2048))
    load_weights_file(workdir, "258epochs_weights_model_7.pkl", content, reference_reader=reader)


_RANGES: dict[str, list] = {}


def _cached_ranges(key: str, data: bytes) -> list[tuple[int, int]]:
    if key not in _RANGES:
        _RANGES[key] = hdf5_metadata_ranges(data)
    return _RANGES[key]


# ----------------------------------------------------------------------------- .keras archives


@functools.lru_cache(maxsize=None)
def keras_archive() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.keras"
        _model().save(path)
        return path.read_bytes()


def zip_structure_ranges(data: bytes) -> list[tuple[int, int]]:
    """Local file headers, the central directory and its end record of a zip archive."""
    ranges = [(m.start(), m.start() + 30 + 64) for m in re.finditer(rb"PK\x03\x04", data)]
    first_central = data.find(b"PK\x01\x02")
    if first_central >= 0:
        ranges.append((first_central, len(data)))
    return ranges or [(0, len(data))]


def _json_edit(doc, path_choice: int, value):
    """Replace the `path_choice`-th node (in document order) of a JSON document with `value`."""
    nodes = []

    def walk(node, parent, key):
        nodes.append((parent, key))
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, node, k)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, node, i)

    walk(doc, None, None)
    parent, key = nodes[path_choice % len(nodes)]
    if parent is None:
        return value
    parent[key] = value
    return doc


_json_values = st.one_of(st.none(), st.booleans(), st.integers(-3, 1000), st.floats(allow_nan=True),
                         st.text(max_size=8), st.just([]), st.just({}), st.just({"class_name": "Dense"}),
                         st.just({"module": "os", "class_name": "system", "config": {}}))


def load_keras_file(workdir: Path, content: bytes) -> str:
    from emnist_cnn.io.model_files import load_predictor

    path = write_in_fresh_dir(workdir, "model.keras", content)
    try:
        return expect_ok_or_clean_error(lambda: load_predictor(path), path)
    finally:
        shutil.rmtree(path.parent)


def rezip(archive: bytes, replace: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(archive)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, replace.get(info.filename, src.read(info.filename)))
    return out.getvalue()


def test_valid_keras_archive_loads(workdir):
    assert load_keras_file(workdir, keras_archive()) == "ok"


@fuzz_settings(30)
@given(data=st.data(), kind=st.sampled_from(["bytes", "config", "weights"]))
def test_fuzz_keras_archive(workdir, data, kind):
    archive = keras_archive()
    if kind == "bytes":
        content = data.draw(mutated(archive, hot=zip_structure_ranges(archive), head=256))
    elif kind == "config":
        with zipfile.ZipFile(io.BytesIO(archive)) as zf:
            config = json.loads(zf.read("config.json"))
        edited = _json_edit(config, data.draw(st.integers(0, 10_000)), data.draw(_json_values))
        content = rezip(archive, {"config.json": json.dumps(edited).encode()})
    else:
        with zipfile.ZipFile(io.BytesIO(archive)) as zf:
            inner = zf.read("model.weights.h5")
        damaged = data.draw(mutated(inner, hot=_cached_ranges("keras-inner", inner), head=2048))
        content = rezip(archive, {"model.weights.h5": damaged})
    load_keras_file(workdir, content)


# ----------------------------------------------------------------------------- member state .npz


@functools.lru_cache(maxsize=None)
def _compiled_model():
    from emnist_cnn.core.model import build_model, compile_model

    model = build_model()
    compile_model(model, 1e-3)
    model.optimizer.build(model.trainable_variables)
    return model


@functools.lru_cache(maxsize=None)
def state_npz() -> bytes:
    from emnist_cnn.io.state import save_member_state

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model_0.npz"
        save_member_state(path, _compiled_model(), 3, {"seed": 1})
        return path.read_bytes()


def npz_structure_ranges(data: bytes) -> list[tuple[int, int]]:
    """Zip headers, npy headers (magic, version, dict with shape and dtype) and the metadata array."""
    ranges = zip_structure_ranges(data)
    ranges += [(m.start(), m.start() + 128) for m in re.finditer(rb"\x93NUMPY", data)]
    meta = data.find(b'{"epoch"')
    if meta >= 0:
        ranges.append((meta, meta + 80))
    return ranges


def _state_variables(model) -> dict[str, object]:
    """Everything a state file restores, by its array name in the file: weights, optimizer variables, and
    the random layers' seed states (found here independently of the package)."""
    out = {f"optimizer_{k}": v for k, v in enumerate(model.optimizer.variables)}
    seeds = [layer.seed_generator.state for layer in model.layers if getattr(layer, "seed_generator", None)]
    out.update({f"rng_{k}": v for k, v in enumerate(seeds)})
    return out


def _scramble(model) -> None:
    """Overwrite everything a state restores, so that a load which restores nothing cannot pass."""
    model.set_weights([np.full_like(w, 7) for w in model.get_weights()])
    for var in _state_variables(model).values():
        var.assign(np.full(var.shape, 3, dtype=np.asarray(var.numpy()).dtype))


def _restored_arrays(model) -> dict[str, np.ndarray]:
    out = {f"weight_{k}": w for k, w in enumerate(model.get_weights())}
    out.update({name: np.asarray(var.numpy()) for name, var in _state_variables(model).items()})
    return out


@functools.lru_cache(maxsize=None)
def _original_state_arrays() -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(state_npz()), allow_pickle=False) as z:
        return {k: z[k] for k in z.files if k != "meta"}


def load_state(workdir: Path, content: bytes) -> str:
    from emnist_cnn.io.state import load_member_state

    path = write_in_fresh_dir(workdir, "model_0.npz", content)
    model = _compiled_model()
    original = _original_state_arrays()  # (cached: taken before any scramble)
    _scramble(model)
    before = _restored_arrays(model)
    assert all(before[k].tobytes() != original[k].tobytes() for k in original if k.startswith("weight_"))
    result = {}

    def call():
        result["meta"] = load_member_state(path, model)

    try:
        outcome = expect_ok_or_clean_error(call, path)
        if outcome == "ok":
            # What a caller relies on: an epoch it can count from...
            epoch = result["meta"]["epoch"]
            assert isinstance(epoch, int) and not isinstance(epoch, bool) and epoch >= 0, result["meta"]
            # ...and exactly the arrays that were saved: damage that still loads must not change a number
            # (zip's CRC-32 covers the array data; names, shapes and dtypes are checked against the model).
            restored = _restored_arrays(model)
            assert sorted(restored) == sorted(original)
            for name, array in original.items():
                got = restored[name]
                assert got.dtype == array.dtype and got.shape == array.shape, name
                assert got.tobytes() == array.tobytes(), f"{name} loaded with other values than were saved"
        return outcome
    finally:
        shutil.rmtree(path.parent)


def test_valid_state_loads(workdir):
    assert load_state(workdir, state_npz()) == "ok"


@fuzz_settings(50)
@given(data=st.data())
def test_fuzz_member_state(workdir, data):
    original = state_npz()
    load_state(workdir, data.draw(mutated(original, hot=npz_structure_ranges(original), head=256)))


@fuzz_settings(30)
@given(meta=st.dictionaries(st.sampled_from(["epoch", "n_weights", "n_optimizer", "seed"]),
                            st.one_of(st.integers(-2, 10**20), st.floats(allow_nan=True), st.text(max_size=4),
                                      st.none(), st.booleans(), st.just([1])), max_size=4)
       | st.one_of(st.just([]), st.just("x"), st.integers()))
def test_fuzz_member_state_metadata(workdir, meta):
    """The metadata record itself: a state must say which epoch it holds, as a non-negative integer."""
    with np.load(io.BytesIO(state_npz()), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    if isinstance(meta, dict):  # the fuzzed keys over a valid record, so the others still fit the model
        meta = {**json.loads(bytes(arrays["meta"]).decode()), **meta}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    load_state(workdir, buf.getvalue())


# ----------------------------------------------------------------------------- nothing is ever unpickled


class _Marker:
    """Unpickling this writes a marker file: proof that a loader ran code from a file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_real_pickle_is_refused_everywhere_and_never_unpickled(workdir, tmp_path):
    from emnist_cnn.io.reference_weights import read_reference_weights
    from emnist_cnn.io.weights import load_weights_any
    from emnist_cnn.io.model_files import load_predictor
    from emnist_cnn.io.state import load_member_state, read_state_epoch

    marker = tmp_path / "unpickled"
    payload = pickle.dumps({"weights": _Marker(marker)})
    # The payload is live: unpickling it does write the marker.
    pickle.loads(payload)
    assert marker.exists()
    marker.unlink()

    pkl = tmp_path / "weights" / "258epochs_weights_model_7.pkl"
    pkl.parent.mkdir()
    pkl.write_bytes(payload)
    for call in (lambda: read_reference_weights(pkl), lambda: load_weights_any(_model(), pkl),
                 lambda: load_predictor(pkl)):
        with pytest.raises(EmnistCnnError) as info:
            call()
        assert pkl.name in str(info.value) and "\n" not in str(info.value)
    # A state file that is a pickle, and one holding a pickled object array.
    state = tmp_path / "state" / "model_0.npz"
    state.parent.mkdir()
    state.write_bytes(payload)
    assert read_state_epoch(state) == 0
    with pytest.raises(EmnistCnnError, match="model_0.npz"):
        load_member_state(state, _model())
    obj = np.empty(1, dtype=object)
    obj[0] = _Marker(marker)
    buf = io.BytesIO()
    np.savez(buf, meta=np.frombuffer(b'{"epoch": 1, "n_weights": 1, "n_optimizer": 0}', np.uint8), weight_0=obj)
    state.write_bytes(buf.getvalue())
    assert read_state_epoch(state) == 1  # the metadata alone is plain bytes
    with pytest.raises(EmnistCnnError, match="model_0.npz"):
        load_member_state(state, _model())
    # A data file that is a pickle.
    data = tmp_path / "data"
    data.mkdir()
    for name, content in IDX_GZ.items():
        (data / name).write_bytes(gzip.compress(payload) if name == MNIST_NAMES[0] else content)
    from emnist_cnn.io.datasets import load_dataset

    with pytest.raises(EmnistCnnError, match=MNIST_NAMES[0]):
        load_dataset("mnist", data, cache=False)
    assert not marker.exists()


def test_every_np_load_refuses_pickles_and_nothing_imports_pickle():
    """A static check of the package's source: np.load always with allow_pickle=False, no pickle readers."""
    import ast

    src = Path(emnist_cnn.__file__).parent
    loads = 0
    for path in sorted(src.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                for name in names:
                    assert (name or "").split(".")[0] not in ("pickle", "cPickle", "dill", "joblib", "shelve",
                                                                "marshal"), f"{path.name} imports {name}"
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load":
                owner = node.func.value
                if isinstance(owner, ast.Name) and owner.id in ("np", "numpy"):
                    loads += 1
                    kw = {k.arg: k.value for k in node.keywords}
                    where = f"{path.name}:{node.lineno}"
                    assert "allow_pickle" in kw and isinstance(kw["allow_pickle"], ast.Constant) \
                        and kw["allow_pickle"].value is False, f"{where} np.load without allow_pickle=False"
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr in ("enable_unsafe_deserialization",):
                raise AssertionError(f"{path.name}:{node.lineno} turns Keras' safe mode off")
            if isinstance(node, ast.keyword) and node.arg == "safe_mode":
                assert isinstance(node.value, ast.Constant) and node.value.value is True, \
                    f"{path}: safe_mode must stay True"
    assert loads >= 3  # the state and the decoded-data cache readers were found


# ----------------------------------------------------------------------------- Keras safe mode


def _lambda_model(marker: Path):
    import keras

    # A lambda (not a def): Keras serializes its bytecode, which is what an attacker would ship.
    fn = eval(f"lambda x: (open({str(marker)!r}, 'w').close(), x)[1]")  # noqa: S307 - the test's own payload
    inputs = keras.Input((28, 28, 1), name="pixels")
    x = keras.layers.Lambda(fn, name="payload")(inputs)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(10, activation="softmax")(x)
    return keras.Model(inputs, outputs)


def test_keras_files_with_code_are_refused_in_safe_mode(tmp_path):
    import keras

    from emnist_cnn.io.model_files import load_predictor

    marker = tmp_path / "code-ran"
    model = _lambda_model(marker)
    marker.unlink()  # building the model ran it once, on purpose
    evil = tmp_path / "evil" / "model.keras"
    evil.parent.mkdir()
    model.save(evil)
    # The file really carries code: Keras with safe_mode off runs it while loading.
    keras.saving.load_model(evil, compile=False, safe_mode=False)
    assert marker.exists()
    marker.unlink()

    with pytest.raises(EmnistCnnError) as info:
        load_predictor(evil)
    assert "model.keras" in str(info.value) and "\n" not in str(info.value)
    assert "Lambda" in str(info.value) or "safe" in str(info.value).lower()
    assert not marker.exists()

    # The same model as export's model.json (+ weights): model_from_json must refuse it as well.
    export = tmp_path / "export"
    export.mkdir()
    (export / "model.json").write_text(model.to_json())
    model.save_weights(export / "model.weights.h5")
    (export / "metadata.json").write_text(json.dumps({"files": {"json": "model.json"}}))
    for target in (export / "model.json", export):
        with pytest.raises(EmnistCnnError) as info:
            load_predictor(target)
        assert "model.json" in str(info.value) or "export" in str(info.value)
        assert not marker.exists()

    # A config naming a module outside Keras (os.system) is refused too, and nothing is imported from it.
    archive = (tmp_path / "ok.keras")
    _model().save(archive)
    with zipfile.ZipFile(archive) as zf:
        config = json.loads(zf.read("config.json"))
    dense = next(layer for layer in config["config"]["layers"] if layer["class_name"] == "Dense")
    dense["config"]["activation"] = {"module": "os", "class_name": "function", "config": "system",
                                     "registered_name": "system"}
    foreign = tmp_path / "foreign" / "model.keras"
    foreign.parent.mkdir()
    foreign.write_bytes(rezip(archive.read_bytes(), {"config.json": json.dumps(config).encode()}))
    with pytest.raises(EmnistCnnError, match="model.keras"):
        load_predictor(foreign)
