"""Both notebooks run top to bottom on tiny data and show their figures."""

from pathlib import Path

import csv
import json
import re

import nbformat
import pytest
from nbclient import NotebookClient
from conftest import trains_a_model

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def execute(name: str, params: dict, cwd: Path, probe: str | None = None):
    """Run a notebook with `params` injected after its parameters cell (papermill style), and `probe`, code
    that prints what the test inspects, appended as a last cell."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    source = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
    if probe:
        nb.cells.append(nbformat.v4.new_code_cell(probe, metadata={"tags": ["test-probe"]}))
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def cell_with(nb, text: str):
    """The code cell whose source contains `text`."""
    [cell] = [c for c in nb.cells if c.cell_type == "code" and text in c.source]
    return cell


def pngs(cell) -> int:
    return sum("image/png" in o.get("data", {}) for o in cell.get("outputs", []))


def printed(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []))


def test_notebooks_are_committed_without_outputs():
    for path in NOTEBOOKS.glob("*.ipynb"):
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name} has outputs"


@pytest.fixture(scope="module")
@trains_a_model
def notebook_run(tmp_path_factory):
    """emnist.ipynb on tiny synthetic digits: train, continue at a fixed rate, evaluate, export."""
    from emnist_cnn.demos import make_tiny_digits, write_mnist_idx

    base = tmp_path_factory.mktemp("notebook")
    data = write_mnist_idx(base / "data", *make_tiny_digits())
    params = dict(run_dir=str(base / "run"), dataset="mnist", data_dir=str(data), preset="quick",
                  settings=dict(epochs=2, checkpoint_every=1, batch_size=64, limit_train=None), fixed_lr=1e-5,
                  fixed_lr_epochs=1, export_format="keras")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EMNIST_CNN_CACHE", str(base / "cache"))  # inherited by the kernel
        nb = execute("emnist.ipynb", params, base)
    return nb, base / "run"


def test_emnist_notebook_trains_evaluates_and_exports(notebook_run):
    nb, run = notebook_run
    # Every cell shows our own lines only: nothing that TensorFlow's C++ logging wrote (in red, under a cell).
    from console_lines import find_tensorflow_log_lines

    for cell in nb.cells:
        assert find_tensorflow_log_lines(printed(cell)) == [], cell.source
    # The data: the quick preset's 10% validation split of the 600 training digits, and three figures.
    data_cell = cell_with(nb, "plot_samples(")
    assert "540 train / 60 validation / 200 test images, classes 0123456789" in printed(data_cell)
    assert pngs(data_cell) == 3  # samples, class balance, augmentation
    # Trained 2 epochs, then 1 more at the fixed rate, checkpointed every epoch.
    for i in (0, 1):
        with open(run / "dropout_0.2" / "history" / f"model_{i}.csv", newline="") as f:
            hist = list(csv.DictReader(f))
        assert [(r["epoch"], float(r["learning_rate"])) for r in hist] == [("1", 1e-3), ("2", 1e-3), ("3", 1e-5)]
    with open(run / "dropout_0.2" / "history" / "errors.csv", newline="") as f:
        errors = list(csv.DictReader(f))
    assert sorted({r["epoch"] for r in errors}) == ["1", "2", "3"]
    last = {(r["model"], r["split"]): int(r["n_errors"]) for r in errors if r["epoch"] == "3"}
    # The evaluation printed epoch 3's errors, as errors.csv has them.
    table = printed(cell_with(nb, "evaluate_run("))
    assert "dropout 0.2, epoch 3:" in table and "best-k ensembles" in table
    for name, key in (("model 0", "0"), ("model 1", "1"), ("ensemble", "ensemble")):
        row = re.search(rf"^{name}\s+[\d.]+% \((\d+)/60; 95% CI [\d.]+-[\d.]+%\)"
                        rf"\s+[\d.]+% \((\d+)/200; 95% CI [\d.]+-[\d.]+%\)$", table, re.M)
        assert row and (int(row[1]), int(row[2])) == (last[key, "val"], last[key, "test"]), name
    # Mistakes, confusion matrix, the errors over checkpoints and the fixed-LR phase.
    assert pngs(cell_with(nb, "plot_run_figures(")) == 4
    # The exported ensemble: one .keras file of both members at epoch 3, scored as errors.csv scored it.
    meta = json.loads((run / "export_json_h5" / "metadata.json").read_text())
    assert (meta["model"], meta["members"], meta["epoch"], meta["files"]) == (
        "ensemble", [0, 1], 3, {"keras": "model.keras"})
    assert meta["test_error"]["n_errors"] == last["ensemble", "test"]
    import emnist_cnn  # noqa: F401  (selects the backend before keras is imported)
    import keras
    import numpy as np

    from emnist_cnn.demos import make_tiny_digits

    model = keras.saving.load_model(run / "export_json_h5" / "model.keras")
    assert model.count_params() == 2 * 601_578
    _, _, x_test, y_test = make_tiny_digits()  # the notebook's data
    probs = model.predict(x_test.astype(np.float32)[..., None] / 255, verbose=0)
    assert int(np.sum(np.argmax(probs, axis=1) != y_test)) == meta["test_error"]["n_errors"]


PROBE_LEGENDS = """
import json
print("LEGENDS " + json.dumps({name: [t.get_text() for legend in [*fig.legends, *(ax.get_legend() for ax in fig.axes)]
                                      if legend is not None for t in legend.get_texts()]
                               for figs in figures.values() for name, fig in figs.items()}))
"""


def test_plot_history_notebook_compares_runs(notebook_run, shared_dir):
    _, run = notebook_run
    nb = execute("plot_history.ipynb", dict(run_dirs=[str(run)],
                                             reference_dir=str(shared_dir / "reference" / "plot_history")),
                 run.parent, probe=PROBE_LEGENDS)
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "reference overlay: " + str(shared_dir / "reference" / "plot_history") in text
    # One figure per section: errors per checkpoint, ensembles, the fixed-LR phase (the run has one), curves.
    assert [pngs(cell_with(nb, key)) for key in ('startswith("errors_dropout_")', 'figs["ensembles"]',
                                                   'figs["fixed_lr"]', 'startswith("training_curves_")')] == [1] * 4
    assert "no fixed-learning-rate phase" not in text
    # The reference's published curves are drawn into the comparison plots, not only announced.
    legends = json.loads(re.search(r"^LEGENDS (.*)$", text, re.M)[1])
    assert set(legends) == {"errors_dropout_0.2", "ensembles", "fixed_lr", "training_curves_dropout_0.2"}
    for name in ("errors_dropout_0.2", "ensembles", "fixed_lr"):
        assert any("reference" in label for label in legends[name]), (name, legends[name])
    assert any("0.160%" in label for label in legends["ensembles"])  # its best ensemble, 0.16%
