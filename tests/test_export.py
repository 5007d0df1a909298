"""Export: every format reloads in a fresh process (plain Keras/TF/ONNX Runtime) with the same probabilities."""

import csv
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import emnist_cnn  # noqa: F401  (selects the backend before keras is imported)
from conftest import run_cli
from deps import REQUIRE_DEPS_ENV, optional_module, require_module
import keras
from emnist_cnn.errors import ConfigError
from emnist_cnn.core.model import build_averaged_ensemble, build_model
from emnist_cnn.engine.export import export_run
from emnist_cnn.io.model_files import FORMATS, export_model
from emnist_cnn.io.rundir import RunDir
from emnist_cnn.io.weights import load_checkpoint_model
from emnist_cnn.training.prepare import load_run_data

TOLERANCE = 1e-5  # max abs difference of probabilities, as the issue asks


@pytest.fixture(scope="module")
def run_dir(tiny_run) -> Path:
    """The session's tiny run: 2 members of dropout 0.2 x 2 epochs, checkpoints at 1 and 2."""
    return tiny_run[0]


def _x(n=50, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 28, 28, 1)).astype(np.float32)


RELOAD = textwrap.dedent('''
    import json, sys
    import numpy as np
    import keras, tensorflow as tf, onnxruntime as ort
    x = np.load(sys.argv[1])
    out = {}
    for folder in sys.argv[2:]:
        meta = json.load(open(f"{folder}/metadata.json"))
        files = meta["files"]
        model = keras.models.model_from_json(open(f"{folder}/{files['json']}").read())
        model.load_weights(f"{folder}/{files['weights']}")
        out[f"{folder}|json_h5"] = model.predict(x, verbose=0)
        out[f"{folder}|keras"] = keras.saving.load_model(f"{folder}/{files['keras']}").predict(x, verbose=0)
        served = tf.saved_model.load(f"{folder}/{files['saved_model']}")
        out[f"{folder}|saved_model"] = served.serve(x).numpy()
        session = ort.InferenceSession(f"{folder}/{files['onnx']}", providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == ["pixels"], session.get_inputs()
        assert [o.name for o in session.get_outputs()] == ["probabilities"], session.get_outputs()
        out[f"{folder}|onnx"] = session.run(None, {"pixels": x})[0]
    assert "emnist_cnn" not in sys.modules  # plain Keras/TF/ONNX Runtime, not our package
    np.savez(sys.argv[1] + ".out.npz", **out)
''')


def _reload_in_fresh_process(tmp_path: Path, x: np.ndarray, folders: list[Path]) -> dict:
    require_module("onnxruntime", "runs the exported ONNX model")
    script = tmp_path / "reload.py"
    script.write_text(RELOAD)
    np.save(tmp_path / "x.npy", x)
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "x.npy"), *map(str, folders)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(tmp_path / "x.npy.out.npz") as z:
        return {k: z[k] for k in z.files}


def _scaled(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float32)[..., None] / np.float32(255)


def _n_errors(probs: np.ndarray, labels: np.ndarray) -> int:
    return int(np.sum(np.argmax(probs, axis=1) != labels))


def test_best_member_and_ensemble_round_trip_in_every_format(run_dir, tmp_path):
    saved = json.loads((run_dir / "config.json").read_text())
    _, data = load_run_data(run_dir)  # the run's own validation and test splits
    n_val, n_test = len(data.y_val), len(data.y_test)
    assert (n_val, n_test) == (120, 200)
    # "Best" from the members' own predictions on the validation split (the first on a tie).
    members = [load_checkpoint_model(RunDir(run_dir), 0.2, 2, i) for i in (0, 1)]
    member_val = [_n_errors(m.predict(_scaled(data.x_val), verbose=0), data.y_val) for m in members]
    best = min((0, 1), key=lambda i: (member_val[i], i))

    meta = export_run(run_dir, member="best", out_dir=tmp_path / "best").metadata
    assert meta["skipped"] == {} and set(meta["files"]) == {"json", "weights", "keras", "saved_model", "onnx"}
    assert (meta["model"], meta["members"], meta["epoch"], meta["dropout"]) == ("best", [best], 2, 0.2)
    assert meta["classes"] == list("0123456789")
    assert meta["input"]["shape"] == [None, 28, 28, 1] and meta["input"]["range"] == [0.0, 1.0]
    assert meta["dataset"]["name"] == "mnist" and meta["dataset"]["fingerprint"] == saved["data"]["fingerprint"]
    assert meta["input"]["image_preprocessing"] == "mnist"  # a model trained on MNIST reads MNIST-style inputs
    assert json.loads((tmp_path / "best" / "metadata.json").read_text()) == json.loads(json.dumps(meta))

    ens_meta = export_run(run_dir, member="ensemble", out_dir=tmp_path / "ensemble").metadata
    assert (ens_meta["model"], ens_meta["members"]) == ("ensemble", [0, 1])

    # Random inputs, then the run's test and validation images, through every exported file in a fresh process.
    x = np.concatenate([_x(), _scaled(data.x_test), _scaled(data.x_val)])
    got = _reload_in_fresh_process(tmp_path, x, [tmp_path / "best", tmp_path / "ensemble"])
    assert len(got) == 2 * len(FORMATS)
    # In memory: the member as trained, and the mean of both members' softmax.
    want = {"best": members[best].predict(x, verbose=0),
            "ensemble": np.mean([m.predict(x, verbose=0) for m in members], axis=0)}
    metas = {"best": meta, "ensemble": ens_meta}
    for key, probs in got.items():
        which = Path(key.split("|")[0]).name
        assert np.abs(probs - want[which]).max() <= TOLERANCE, key
        # The metadata's errors are what the exported file scores on the run's splits.
        test_probs, val_probs = probs[50 : 50 + n_test], probs[50 + n_test :]
        assert metas[which]["test_error"] == {"pct": pytest.approx(100 * _n_errors(test_probs, data.y_test) / n_test),
                                              "n_errors": _n_errors(test_probs, data.y_test), "n": n_test}, key
        assert metas[which]["validation_error"]["n_errors"] == _n_errors(val_probs, data.y_val), key
        assert metas[which]["validation_error"]["n"] == n_val, key
    assert np.abs(want["best"] - want["ensemble"]).max() > 1e-3  # two different models were compared


def test_member_metadata_scores_that_member_at_that_epoch(run_dir, tmp_path):
    """An exported member at an earlier checkpoint: its metadata's errors are that file's own scores."""
    _, data = load_run_data(run_dir)
    for member, epoch in ((1, 1), (0, 1)):
        out = tmp_path / f"m{member}e{epoch}"
        meta = export_run(run_dir, member=str(member), epoch=epoch, out_dir=out, formats=["keras"]).metadata
        assert (meta["model"], meta["members"], meta["epoch"]) == ("member", [member], epoch)
        model = keras.saving.load_model(out / "model.keras")
        assert meta["test_error"]["n_errors"] == _n_errors(model.predict(_scaled(data.x_test), verbose=0),
                                                           data.y_test)
        assert meta["validation_error"]["n_errors"] == _n_errors(model.predict(_scaled(data.x_val), verbose=0),
                                                                 data.y_val)


def test_missing_test_dependency_skips_locally_and_fails_in_ci(monkeypatch):
    monkeypatch.delenv(REQUIRE_DEPS_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="no_such_module_for_emnist_cnn"):
        require_module("no_such_module_for_emnist_cnn", "a test")
    with pytest.warns(UserWarning, match="no_such_module_for_emnist_cnn"):
        assert optional_module("no_such_module_for_emnist_cnn", "a test") is None
    monkeypatch.setenv(REQUIRE_DEPS_ENV, "1")
    for helper in (require_module, optional_module):
        with pytest.raises(pytest.fail.Exception, match="missing test dependency fails"):
            helper("no_such_module_for_emnist_cnn", "a test")
    assert require_module("json", "a test").dumps({}) == "{}"


def test_ci_requires_every_test_dependency():
    """.ci/run sets EMNIST_CNN_REQUIRE_DEPS=1, so that the ONNX tests fail rather than skip on a bare machine."""
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert f"export {REQUIRE_DEPS_ENV}=1" in ci and "export EMNIST_CNN_REQUIRE_SHARED=1" in ci


def test_ensemble_model_is_one_model_with_unique_layer_names():
    keras.utils.set_random_seed(0)
    members = [build_model(name="emnist_cnn") for _ in range(3)]
    ensemble = build_averaged_ensemble(members)
    names = [layer.name for layer in ensemble.layers]
    assert len(names) == len(set(names))
    assert ensemble.count_params() == 3 * members[0].count_params()
    x = _x(8)
    want = np.mean([m.predict(x, verbose=0) for m in members], axis=0)
    np.testing.assert_allclose(ensemble.predict(x, verbose=0), want, atol=1e-6)
    # Plain Keras can rebuild it from its JSON alone.
    rebuilt = keras.models.model_from_json(ensemble.to_json())
    rebuilt.set_weights(ensemble.get_weights())
    np.testing.assert_allclose(rebuilt.predict(x, verbose=0), want, atol=1e-6)
    assert build_averaged_ensemble(members[:1]) is members[0]


def test_export_cli_default_folder_member_and_epoch(run_dir, capsys):
    out = run_dir / "export_json_h5"
    shutil.rmtree(out, ignore_errors=True)
    assert run_cli(["export", "--run-dir", str(run_dir), "--member", "1", "--epoch", "1",
                    "--formats", "json_h5", "keras"]) == 0
    printed = capsys.readouterr().out
    meta = json.loads((out / "metadata.json").read_text())
    assert (meta["model"], meta["members"], meta["epoch"]) == ("member", [1], 1)
    assert sorted(meta["files"]) == ["json", "keras", "weights"]
    assert not (out / "saved_model").exists() and not (out / "model.onnx").exists()
    assert "member 1" in printed and str(out / "model.json") in printed


def test_export_refuses_what_the_run_does_not_have(run_dir, tmp_path, capsys):
    def fails(*args) -> str:
        assert run_cli(["export", "--run-dir", str(run_dir), "--out", str(tmp_path / "x"), *args]) != 0
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "Traceback" not in err
        return err

    assert "members 0..1" in fails("--member", "5")
    assert "epoch 7" in fails("--epoch", "7")
    assert "--dropout 0.5" in fails("--dropout", "0.5")
    assert "best, ensemble or a member index" in fails("--member", "worst")
    assert "not found" in fails("--run-dir", str(tmp_path / "nothing"))
    # Without validation errors, "best" cannot be chosen: the message says what to do instead.
    copy = tmp_path / "noval"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("export*"))
    table = copy / "dropout_0.2" / "history" / "errors.csv"
    rows = [r for r in csv.DictReader(open(table)) if r["split"] != "val"]
    with open(table, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with pytest.raises(ConfigError, match="--member ensemble"):
        export_run(copy, member="best", out_dir=tmp_path / "y", formats=["keras"])


def test_export_model_rejects_unknown_formats(tmp_path):
    with pytest.raises(ConfigError, match="unknown format"):
        export_model(build_model(), tmp_path, formats=["tflite"])
