"""Both notebooks run top to bottom on tiny data and show their figures."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def execute(name: str, params: dict, cwd: Path):
    """Run a notebook with `params` injected after its parameters cell (papermill style)."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    source = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def outputs(nb, kind):
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if kind in o.get("data", {})]


def test_notebooks_are_committed_without_outputs():
    for path in NOTEBOOKS.glob("*.ipynb"):
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name} has outputs"


@pytest.fixture(scope="module")
def notebook_run(tmp_path_factory):
    """emnist.ipynb on tiny synthetic digits: train, continue at a fixed rate, evaluate, export."""
    from conftest import make_tiny_digits, write_mnist_idx

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
    assert len(outputs(nb, "image/png")) >= 5  # samples, balance, augmentation, mistakes, confusion, ...
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "best-k ensembles" in text and "ensemble" in text
    hist = (run / "dropout_0.2" / "history" / "model_0.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in hist[1:]] == ["1", "2", "3"]
    assert hist[-1].split(",")[5] == "1e-05"  # the fixed-LR epoch
    assert list((run / "export_json_h5").glob("*.keras")) or list(run.rglob("*.keras"))


def test_plot_history_notebook_compares_runs(notebook_run, shared_dir):
    _, run = notebook_run
    nb = execute("plot_history.ipynb", dict(run_dirs=[str(run)],
                                             reference_dir=str(shared_dir / "reference" / "plot_history")),
                 run.parent)
    assert len(outputs(nb, "image/png")) >= 4  # errors, ensembles, fixed-LR phase, training curves
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "reference overlay: " + str(shared_dir / "reference" / "plot_history") in text
