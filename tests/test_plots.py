"""`emnist-cnn plot`: every plot and RUN/report.html written from a tiny run, readable, and faithful to the
run's tables."""

import base64
import json
import logging
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from conftest import trains_a_model
from emnist_cnn.demos import make_tiny_digits, write_mnist_idx

from emnist_cnn.config import DataSource, TrainConfig, TrainOptions
from emnist_cnn.core.metrics import ErrorRate
from emnist_cnn.errors import ConfigError, DataError, RunDirError
from oracles import read_errors_csv
from emnist_cnn.cli import build_parser
from emnist_cnn.cli.commands import cmd_plot
from emnist_cnn.io.rundir import RunDir
from emnist_cnn.present.image_plots import plot_confusion_matrix, plot_misclassified
from emnist_cnn.present.report import render_report, write_report
from emnist_cnn.present.plots import plot_checkpoint_errors, plot_ensemble_comparison, plot_fixed_lr_phase
from emnist_cnn.present.reference_history import load_reference_history, reference_best_ensemble
from emnist_cnn.present.run_plots import plot_run_figures
from emnist_cnn.core.selection import find_last_epoch, select_dropout
from emnist_cnn.present.summary import find_fixed_lr_phase, load_results

TITLE_RE = re.compile(r"^(\w)/(\w)/#(\d+)$")
DROPOUTS = (0.2, 0.3)

# Built once per module and shared by the plot and report tests: training the tiny run is most of
# this file's time.
_CACHE: dict = {}


def build_tiny_run(tmp_path_factory) -> Path:
    """2 dropout rates x 2 members, 3 epochs at the base rate, then 2 at a fixed lr of 1e-5.

    6% of the labels are flipped so that the ensembles make errors to plot.
    """
    if "run" in _CACHE:
        return _CACHE["run"]
    from emnist_cnn.training.train import train_and_evaluate

    root = tmp_path_factory.mktemp("plot-run")
    x_train, y_train, x_test, y_test = make_tiny_digits()
    rng = np.random.default_rng(1)
    for y in (y_train, y_test):
        k = rng.choice(len(y), len(y) * 6 // 100, replace=False)
        y[k] = (y[k] + rng.integers(1, 10, len(k))) % 10
    data_dir = write_mnist_idx(root / "data", x_train, y_train, x_test, y_test)
    config = TrainConfig(dataset="mnist", dropouts=DROPOUTS, models=2, epochs=3, checkpoint_every=1,
                         batch_size=64, val_fraction=0.2, bn_recalibration_images=200)
    run_dir = root / "run"
    with pytest.MonkeyPatch.context() as mp:
        # The autouse cache fixture is function-scoped; this runs outside any test's scope.
        mp.setenv("EMNIST_CNN_CACHE", str(root / "cache"))
        train_and_evaluate(config, run_dir, DataSource(data_dir=data_dir), TrainOptions(verbose=0))
        train_and_evaluate(config.replace(epochs=5), run_dir, DataSource(data_dir=data_dir),
                           TrainOptions(fixed_lr=1e-5, verbose=0))
    _CACHE["run"] = run_dir
    return run_dir


def run_cli_plot(tmp_path_factory) -> tuple[Path, str]:
    """`emnist-cnn plot --run-dir RUN` on the tiny run: (run dir, what it printed)."""
    if "cli" in _CACHE:
        return _CACHE["cli"]
    import contextlib
    import io

    run_dir = build_tiny_run(tmp_path_factory)
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.setenv("EMNIST_CNN_CACHE", str(run_dir.parent / "cache"))
        args = _parse(["plot", "--run-dir", str(run_dir)])
        assert args.handler(args) == 0
    _CACHE["cli"] = (run_dir, out.getvalue())
    return _CACHE["cli"]


def _parse(argv):
    return build_parser().parse_args(argv)


@pytest.fixture(scope="module")
@trains_a_model
def tiny_run(tmp_path_factory) -> Path:
    return build_tiny_run(tmp_path_factory)


@pytest.fixture(scope="module")
@trains_a_model
def cli_output(tmp_path_factory):
    return run_cli_plot(tmp_path_factory)


@pytest.fixture(scope="module")
def run_figures(tiny_run):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EMNIST_CNN_CACHE", str(tiny_run.parent / "cache"))
        return plot_run_figures(tiny_run)


def _errors(run_dir):
    return {d: RunDir(run_dir).read_errors(d) for d in DROPOUTS}


def _histories(run_dir):
    return {d: RunDir(run_dir).read_histories(d, 2) for d in DROPOUTS}


def _line_ys(fig) -> list[np.ndarray]:
    return [np.asarray(line.get_ydata(), dtype=float) for ax in fig.axes for line in ax.lines]


def _contains_series(fig, values) -> bool:
    values = np.asarray(values, dtype=float)
    return any(len(y) == len(values) and np.allclose(y, values, equal_nan=True) for y in _line_ys(fig))


EXPECTED_PNGS = {
    "errors_dropout_0.2", "errors_dropout_0.3", "ensembles", "fixed_lr",
    "training_curves_dropout_0.2", "training_curves_dropout_0.3",
    "misclassified", "correct", "confusion_matrix", "confusion_matrix_normalized", "augmentation",
}


# ----------------------------------------------------------------------------- the reference's tables


def test_load_reference_history_reads_german_headers_and_empty_cells(tmp_path):
    (tmp_path / "training_history_emnist_dropout_0.3.csv").write_text(
        "\ufeffModell,16 Epochen,32 Epochen\n"
        "Modell 0,,0.47\nModell 1,0.5,0.48\nEnsemble,,0.35\nBest single Model,,0.38\n")
    (tmp_path / "training_history_emnist_manual_lr.csv").write_text(
        "Modell,256 Epochen,257 Epochen\nModell 0,0.3,0.2\nEnsemble,0.2,0.16\n")
    ref = load_reference_history(tmp_path)
    t = ref["dropouts"][0.3]
    assert t.epochs.tolist() == [16, 32]
    assert np.isnan(t.members["0"][0]) and t.members["0"][1] == pytest.approx(0.47)
    assert t.members["1"].tolist() == [0.5, 0.48]
    assert np.isnan(t.ensemble[0]) and t.best[1] == pytest.approx(0.38)
    assert ref["fixed_lr"].epochs.tolist() == [256, 257]
    assert reference_best_ensemble(ref) == (pytest.approx(0.16), 257)


def test_load_reference_history_refuses_a_folder_without_tables(tmp_path):
    with pytest.raises(ConfigError, match="no training_history"):
        load_reference_history(tmp_path)
    with pytest.raises(ConfigError, match="not a folder"):
        load_reference_history(tmp_path / "missing")


def test_load_reference_history_real_files(shared_dir):
    ref = load_reference_history(shared_dir / "reference" / "plot_history")
    assert sorted(ref["dropouts"]) == [0.2, 0.3, 0.4, 0.5]
    for t in ref["dropouts"].values():
        assert t.epochs.tolist() == list(range(16, 289, 16))
        assert sorted(t.members, key=int) == [str(i) for i in range(10)]
        assert t.ensemble is not None and t.best is not None
    assert np.isnan(ref["dropouts"][0.3].ensemble[0])  # the 0.3 table starts at 32 epochs
    assert ref["fixed_lr"].epochs.tolist() == list(range(256, 273))
    best, epoch = reference_best_ensemble(ref)
    assert round(best, 2) == 0.16 and epoch == 267  # the reference's headline: 64 of 40,000 wrong


# ----------------------------------------------------------------------------- plot_run on a tiny run


def test_plot_run_writes_every_png(cli_output):
    import matplotlib.image

    run_dir, printed = cli_output
    out = run_dir / "plot_history"
    assert {p.stem for p in out.glob("*.png")} == EXPECTED_PNGS
    assert printed.strip() == str(run_dir / "report.html")
    for name in EXPECTED_PNGS:
        path = out / f"{name}.png"
        assert path.stat().st_size > 15_000, name
        img = matplotlib.image.imread(path)[..., :3]
        assert img.shape[0] > 300 and img.shape[1] > 500, name
        # Not blank: a real share of the pixels is drawn, not background white.
        assert (img.min(axis=2) < 0.9).mean() > 0.02, name


def test_figures_are_titled_labelled_and_have_legends(run_figures):
    assert set(run_figures) == EXPECTED_PNGS
    for name, fig in run_figures.items():
        assert fig.get_suptitle() or fig.axes[0].get_title(), name
        plotted = [ax for ax in fig.axes if ax.lines]
        for ax in plotted:
            assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel(), (name, ax.get_title())
            if "error" in ax.get_ylabel():
                assert "%" in ax.get_ylabel(), (name, ax.get_ylabel())
        labelled = {line.get_label() for ax in plotted for line in ax.lines if not line.get_label().startswith("_")}
        if len(labelled) > 1:
            assert fig.legends, name
            # The legend sits outside every axes, so it never covers data.
            fig.draw_without_rendering()
            for leg in fig.legends:
                box = leg.get_window_extent()
                assert not any(box.overlaps(ax.get_window_extent()) for ax in fig.axes), name


def test_checkpoint_error_plot_draws_every_member_and_a_bold_ensemble(tiny_run, run_figures):
    rows = read_errors_csv(tiny_run / "dropout_0.2" / "history" / "errors.csv")
    fig = run_figures["errors_dropout_0.2"]
    test_ax = next(ax for ax in fig.axes if ax.get_title() == "test error")
    by_label = {line.get_label(): line for line in test_ax.lines}
    for model in ("0", "1", "ensemble"):
        expected = [r["error_pct"] for r in rows if r["model"] == model and r["split"] == "test"]
        line = by_label["ensemble" if model == "ensemble" else f"model {model}"]
        assert np.allclose(line.get_ydata(), expected)
        assert list(line.get_xdata()) == [1, 2, 3, 4, 5]
    assert by_label["ensemble"].get_linewidth() > 2 * by_label["model 0"].get_linewidth()


def test_fixed_lr_phase_is_found_and_plotted_per_epoch(tiny_run, run_figures):
    history = RunDir(tiny_run).read_histories(0.2, 2)
    assert find_fixed_lr_phase(history, 1e-3) == (3, 5, [1e-5])
    at_base = {k: {**v, "learning_rate": np.full(5, 1e-3)} for k, v in history.items()}
    assert find_fixed_lr_phase(at_base, 1e-3) is None
    fig = run_figures["fixed_lr"]
    ax = next(a for a in fig.axes if a.get_title() == "dropout 0.2: test error")
    ens = next(line for line in ax.lines if line.get_label() == "ensemble")
    # x counts epochs since the switch at epoch 3: the two fixed-lr epochs are 1 and 2.
    assert list(ens.get_xdata()) == [-2, -1, 0, 1, 2]
    rows = read_errors_csv(tiny_run / "dropout_0.2" / "history" / "errors.csv")
    expected = [r["error_pct"] for r in rows if r["model"] == "ensemble" and r["split"] == "test"]
    assert np.allclose(ens.get_ydata(), expected)
    with pytest.raises(DataError, match="base rate"):
        plot_fixed_lr_phase(_errors(tiny_run), {d: {} for d in DROPOUTS}, 1e-3)


def test_misclassified_grid_has_one_titled_subplot_per_error(tiny_run, run_figures):
    from emnist_cnn.training.prepare import load_run_data

    errors = _errors(tiny_run)
    d = select_dropout(errors)
    epoch = find_last_epoch(errors[d])
    expected = next(r for r in errors[d] if r.epoch == epoch and r.model == "ensemble" and r.split == "test")
    assert expected.rate.n_errors > 0
    _, data = load_run_data(tiny_run)
    titles = [ax.get_title() for ax in run_figures["misclassified"].axes if ax.get_title()]
    # The plot predicted the test set itself (no evaluation tables): it must agree with training's count.
    assert len(titles) == expected.rate.n_errors
    for t in titles:
        pred, label, index = TITLE_RE.match(t).groups()
        assert pred != label and data.classes[data.y_test[int(index)]] == label
    correct = [TITLE_RE.match(ax.get_title()).groups() for ax in run_figures["correct"].axes if ax.get_title()]
    assert len(correct) == 40 and all(p == y for p, y, _ in correct)


def test_plot_misclassified_titles_pred_label_index():
    images = np.zeros((3, 28, 28), np.uint8)
    fig = plot_misclassified(images, [1, 2, 3], [7, 5, 8], [42, 7, 1999], tuple("0123456789"), n_total=2000)
    assert [ax.get_title() for ax in fig.axes if ax.get_title()] == ["7/1/#42", "5/2/#7", "8/3/#1999"]
    assert "All 3 misclassified test images of 2,000" in fig._suptitle.get_text()
    capped = plot_misclassified(np.zeros((5, 28, 28), np.uint8), [0] * 5, [1] * 5, range(5), "01", max_images=2)
    assert sum(bool(ax.get_title()) for ax in capped.axes) == 2 and "First 2 of 5" in capped._suptitle.get_text()


def test_confusion_matrix_counts_and_normalized():
    cm = np.array([[50, 1, 0], [0, 48, 2], [3, 0, 46]])
    fig = plot_confusion_matrix(cm, ("a", "b", "c"))
    ax = fig.axes[0]
    assert ax.get_xlabel() == "predicted class" and ax.get_ylabel() == "true class"
    assert "6 errors of 150" in ax.get_title()
    assert {t.get_text() for t in ax.texts} == {"50", "1", "48", "2", "3", "46"}
    norm = plot_confusion_matrix(cm, ("a", "b", "c"), normalize=True).axes[0]
    assert {t.get_text() for t in norm.texts} == {"98.0", "2.0", "96.0", "4.0", "6.1", "93.9"}
    with pytest.raises(DataError, match="shape"):
        plot_confusion_matrix(cm, ("a", "b"))


def test_image_plots_read_the_checkpoints_recorded_mistakes_and_never_predict(tiny_run, tmp_path, caplog):
    """Caught: plots reading the validation rows of the mistakes file, or predicting again from the weights
    (absent in this copy)."""
    # A copy without weights: the grids must come from history/misclassified_epoch_NNN.csv alone.
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy, ignore=shutil.ignore_patterns("weights", "state", "plot_history", "report.html"))
    from emnist_cnn.training.prepare import load_run_data

    _, data = load_run_data(copy)
    picked = [3, 17, 150]
    table = copy / "dropout_0.3" / "history" / "misclassified_epoch_005.csv"
    lines = ["split,index,label,predicted", "val,0,1,2"]  # a validation mistake is not a test one
    lines += [f"test,{i},{data.y_test[i]},{(data.y_test[i] + 1) % 10}" for i in picked]
    table.write_text("\n".join(lines) + "\n")
    figs = plot_run_figures(copy, dropout=0.3, data=data)
    titles = [ax.get_title() for ax in figs["misclassified"].axes if ax.get_title()]
    assert titles == [f"{(data.y_test[i] + 1) % 10}/{data.y_test[i]}/#{i}" for i in picked]
    assert "3 errors of 200" in figs["confusion_matrix"].axes[0].get_title()
    assert "dropout 0.3 ensemble, epoch 5" in figs["confusion_matrix"].axes[0].get_title()
    # Without that record the image plots of predictions are skipped, saying which file is missing.
    table.unlink()
    with caplog.at_level(logging.WARNING, logger="emnist_cnn.present.run_plots"):
        figs = plot_run_figures(copy, dropout=0.3, data=data)
    assert "misclassified" not in figs and "confusion_matrix" not in figs and "augmentation" in figs
    assert "misclassified_epoch_005.csv is missing" in caplog.text


def test_image_plots_are_skipped_with_a_warning_without_data(tiny_run, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="emnist_cnn.present.run_plots"):
        figs = plot_run_figures(tiny_run, data_dir=tmp_path)
    assert "misclassified" not in figs and "augmentation" not in figs and "ensembles" in figs
    assert "skipping the image plots" in caplog.text


def test_plot_run_refuses_bad_input(tiny_run, tmp_path):
    with pytest.raises(RunDirError, match="not found"):
        plot_run_figures(tmp_path)
    with pytest.raises(ConfigError, match="--dropout 0.7 is not in this run"):
        plot_run_figures(tiny_run, dropout=0.7)


# ----------------------------------------------------------------------------- reference overlay


def test_reference_overlay_draws_the_reference_values(tiny_run, shared_dir):
    ref = load_reference_history(shared_dir / "reference" / "plot_history")
    errors = _errors(tiny_run)
    t = ref["dropouts"][0.2]
    fig = plot_checkpoint_errors(errors[0.2], 0.2, t, reference_best_ensemble(ref))
    assert _contains_series(fig, t.ensemble)
    for values in t.members.values():
        assert _contains_series(fig, values)
    test_ax = next(ax for ax in fig.axes if ax.get_title() == "test error")
    assert test_ax.get_xscale() == "log"  # 288 reference epochs next to 5: both stay visible
    assert any(np.allclose(line.get_ydata(), 0.160002708435059) for line in test_ax.lines)

    fig = plot_ensemble_comparison(errors, ref)
    for table in ref["dropouts"].values():
        assert _contains_series(fig, table.ensemble) and _contains_series(fig, table.best)

    fig = plot_fixed_lr_phase(errors, _histories(tiny_run), 1e-3, ref)
    ax = next(a for a in fig.axes if a.get_title() == "dropout 0.2: test error")
    line = next(ln for ln in ax.lines if ln.get_label().startswith("reference ensemble"))
    # The same epochs since the switch as this run (0..2): epoch 256 from the dropout-0.2 table
    # (the manual-lr table's 256 column repeats the 16-epoch one), then 257 and 258.
    assert list(line.get_xdata()) == [0, 1, 2]
    assert np.allclose(line.get_ydata(), [0.167500972747803, 0.177502632141113, 0.174999237060547])


def test_cli_plot_with_compare_reference(tiny_run, shared_dir, tmp_path, capsys):
    args = _parse(["plot", "--run-dir", str(tiny_run), "--out", str(tmp_path / "png"), "--report",
                   str(tmp_path / "r.html"), "--no-images", "--compare-reference",
                   str(shared_dir / "reference" / "plot_history")])
    assert cmd_plot(args) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "r.html")
    assert {p.stem for p in (tmp_path / "png").glob("*.png")} == {
        "errors_dropout_0.2", "errors_dropout_0.3", "ensembles", "fixed_lr",
        "training_curves_dropout_0.2", "training_curves_dropout_0.3"}
    assert "0.160%" in (tmp_path / "r.html").read_text()


def test_plot_flags_parse_to_the_plot_handler():
    args = _parse(["plot", "--run-dir", "r"])
    assert args.handler is cmd_plot and args.compare_reference is None and args.dropout is None


def test_sample_grid_and_class_balance():
    from emnist_cnn.demos import make_tiny_digits

    from emnist_cnn.present.image_plots import plot_class_balance, plot_samples

    x, y, xt, yt = make_tiny_digits(200, 50)
    classes = tuple("0123456789")
    fig = plot_samples(x, y, classes, per_class=4)
    axes = fig.get_axes()
    assert len(axes) == 40 and fig._suptitle.get_text().startswith("4 random training images")
    assert [axes[4 * c].get_ylabel() for c in range(10)] == list(classes)
    # Every shown image is a training image of the row's class.
    for c in range(10):
        shown = axes[4 * c].get_images()[0].get_array()
        assert any(np.array_equal(shown, img) for img in x[y == c])
    fig = plot_class_balance(y[:150], y[150:], yt, classes)
    ax = fig.get_axes()[0]
    heights = [p.get_height() for p in ax.patches]
    assert sum(heights) == len(y) + len(yt)
    assert heights[:10] == list(np.bincount(y[:150], minlength=10))
    assert ax.get_title() and ax.get_xlabel() == "class" and ax.get_ylabel() == "images"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train (150)", "validation (50)", "test (50)"]


# ----------------------------------------------------------------------------- RUN/report.html
# One self-contained page whose tables hold the run's numbers (same tiny run as the plots above).

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class _Page(HTMLParser):
    """Collects tags with their attributes, table rows (cell texts), tables by heading, and the text."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags, self.rows, self.text = [], [], []
        self.tables: dict[str, list[list[str]]] = {}  # last h2/h3 text before the table -> its rows
        self._row, self._cell, self._heading, self._in_heading = None, None, "", False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag in ("h2", "h3"):
            self._heading, self._in_heading = "", True
        elif tag == "table":
            self.tables[self._heading] = []
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self.tables[self._heading].append(self._row)
            self._row = None
        elif tag in ("h2", "h3"):
            self._in_heading = False

    def handle_data(self, data):
        self.text.append(data)
        if self._in_heading:
            self._heading += data
        if self._cell is not None:
            self._cell.append(data)


def _parse_page(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    page.close()
    return page


@pytest.fixture(scope="module")
@trains_a_model
def report(tmp_path_factory):
    run_dir, _ = run_cli_plot(tmp_path_factory)
    return run_dir, (run_dir / "report.html").read_text()


def test_report_is_self_contained(report):
    run_dir, text = report
    page = _parse_page(text)
    imgs = [attrs for tag, attrs in page.tags if tag == "img"]
    assert len(imgs) == len(list((run_dir / "plot_history").glob("*.png"))) == 11
    for attrs in imgs:
        assert attrs["src"].startswith("data:image/png;base64,")
        assert base64.b64decode(attrs["src"].split(",", 1)[1]).startswith(PNG_MAGIC)
        assert attrs.get("alt")
    assert not [tag for tag, _ in page.tags if tag in ("script", "link", "iframe", "object", "embed")]
    for tag, attrs in page.tags:
        for name, value in attrs.items():
            if name in ("src", "href", "srcset", "poster", "data", "action"):
                assert value.startswith(("data:", "#")), (tag, name, value[:60])
    # No URL anywhere a browser would fetch from, including CSS.
    assert "url(" not in text and "@import" not in text
    assert "http://" not in text and "https://" not in text


def test_report_tables_hold_the_numbers_of_errors_csv(report):
    run_dir, text = report
    tables = _parse_page(text).tables
    summary = tables["At the last checkpoint"]
    for d in DROPOUTS:
        errors = read_errors_csv(run_dir / f"dropout_{d:g}" / "history" / "errors.csv")
        last = max(r["epoch"] for r in errors)
        assert last == 5
        by = {(r["model"], r["split"]): r for r in errors if r["epoch"] == last}
        def cell(m, s, by=by):
            return str(ErrorRate(int(by[m, s]["n_errors"]), int(by[m, s]["n"])))

        # A row per member and the ensemble: val then test, numbers and counts as in errors.csv.
        rows = tables[f"Dropout {d:g}, epoch 5"]
        assert rows[0] == ["member", "val error", "test error"]
        assert [r[1:] for r in rows[1:]] == [[cell(m, "val"), cell(m, "test")] for m in ("0", "1", "ensemble")]
        assert [r[0].split(" (")[0] for r in rows[1:]] == ["model 0", "model 1", "ensemble"]
        assert [f"{d:g}", "5", cell("ensemble", "val"), cell("ensemble", "test")] == \
            next(r for r in summary if r[0] == f"{d:g}")[:4]


def test_report_summarizes_the_run_and_its_fixed_lr_phase(report):
    run_dir, text = report
    page_text = " ".join(_parse_page(text).text)
    assert "mnist: 480 train, 120 validation, 200 test images, 10 classes" in page_text
    assert "epochs 4-5 at learning rate 1e-05" in page_text
    for key in ("batch_size", "val_fraction", "bn_recalibration_images", "keras", "tensorflow", "fingerprint"):
        assert key in page_text


def test_best_member_is_chosen_on_validation(report):
    run_dir, _ = report
    for item in load_results(run_dir):
        val = {m.name: (m.val.n_errors, int(m.name)) for m in item.members}
        assert item.best_member == str(min(val.values())[1])
        assert item.epoch == 5 and item.ensemble.error.n == 200


def test_report_includes_best_k_rows_from_evaluation_json(report, tmp_path):
    run_dir, _ = report
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("weights", "state", "plot_history", "*.html"))
    folder = copy / "dropout_0.2" / "evaluation" / "test_epoch_005"
    folder.mkdir(parents=True)
    # The layout `emnist-cnn evaluate` writes (evaluate.evaluate_ensemble).
    (folder / "evaluation.json").write_text(json.dumps({
        "dropout": 0.2, "epoch": 5, "tta": 0, "n": 200, "n_val": 120,
        "members": [], "ensemble": {"error_pct": 6.0, "n_errors": 12},
        "best_k": [{"k": 1, "members": ["1"], "val_error_pct": 5.0, "val_n_errors": 6, "error_pct": 7.5,
                    "n_errors": 15},
                   {"k": 2, "members": ["1", "0"], "val_error_pct": 4.1667, "val_n_errors": 5,
                    "error_pct": 5.5, "n_errors": 11}]}))
    rows = _parse_page(render_report(copy)).rows
    assert ["1", "1", str(ErrorRate(6, 120)), str(ErrorRate(15, 200))] in rows
    assert ["2", "1 0", str(ErrorRate(5, 120)), str(ErrorRate(11, 200))] in rows
    assert str(ErrorRate(6, 120)) == "5.000% (6/120; 95% CI 2.311-10.480%)"


def test_write_report_embeds_figures_bytes_and_paths(report, tmp_path):
    run_dir, _ = report
    fig = plot_confusion_matrix(np.array([[3, 1], [0, 4]]), ("a", "b"))
    png = next((run_dir / "plot_history").glob("*.png"))
    path = write_report(run_dir, {"figure": fig, "bytes": png.read_bytes(), "path": png},
                        captions={"figure": "a caption <with> markup"}, out_path=tmp_path / "r.html")
    text = path.read_text()
    page = _parse_page(text)
    assert len([a for t, a in page.tags if t == "img"]) == 3
    assert "a caption &lt;with&gt; markup" in text and "<with>" not in text
    with pytest.raises(DataError, match="not a PNG"):
        write_report(run_dir, {"bad": b"GIF89a"}, out_path=tmp_path / "bad.html")
    with pytest.raises(DataError, match="expected a PNG path"):
        write_report(run_dir, {"bad": 42}, out_path=tmp_path / "bad.html")


def test_report_shows_the_reference_results(report, shared_dir):
    run_dir, _ = report
    ref = load_reference_history(shared_dir / "reference" / "plot_history")
    page = _parse_page(render_report(run_dir, reference=ref))
    assert ["fixed learning rate", "256-272", "0.175% (epoch 272)", "0.160% (epoch 267)", "0.175% (epoch 258)"] \
        in page.rows
    assert "0.160%" in " ".join(page.text)


def test_run_without_validation_split(report, tmp_path):
    import csv

    from emnist_cnn.present.run_plots import plot_run_figures

    run_dir, _ = report
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("weights", "state", "plot_history", "*.html"))
    # What a --val-fraction 0 run writes: no val rows, "nan" validation columns.
    for d in DROPOUTS:
        folder = copy / f"dropout_{d:g}" / "history"
        path = folder / "errors.csv"
        rows = [r for r in csv.DictReader(path.open()) if r["split"] != "val"]
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        for i in (0, 1):
            hist = folder / f"model_{i}.csv"
            rows = list(csv.DictReader(hist.open()))
            with hist.open("w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows({**r, "val_loss": "nan", "val_accuracy": "nan"} for r in rows)
    figs = plot_run_figures(copy, images=False)
    assert [ax.get_title() for ax in figs["ensembles"].axes] == ["test error"]
    labels = [line.get_label() for line in figs["ensembles"].axes[0].lines]
    assert "dropout 0.2 best member (on test: no val split)" in labels
    page = _parse_page(render_report(copy))
    assert ["0.2", "5", "-"] == page.tables["At the last checkpoint"][1][:3]
    assert "first rate (no validation split)" in " ".join(page.text)
