"""RUN/report.html: one self-contained page whose tables hold the run's numbers."""

import base64
import json
import shutil
from html.parser import HTMLParser

import numpy as np
import pytest
from test_plots import DROPOUTS, run_cli_plot

from emnist_cnn.errors import DataError
from conftest import read_errors_csv
from emnist_cnn.present.image_plots import plot_confusion_matrix
from emnist_cnn.present.reference_history import load_reference_history
from emnist_cnn.present.report import render_report, write_report
from emnist_cnn.present.summary import load_results

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


def _parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    page.close()
    return page


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    run_dir, _ = run_cli_plot(tmp_path_factory)
    return run_dir, (run_dir / "report.html").read_text()


def test_report_is_self_contained(report):
    run_dir, text = report
    page = _parse(text)
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
    tables = _parse(text).tables
    summary = tables["At the last checkpoint"]
    for d in DROPOUTS:
        errors = read_errors_csv(run_dir / f"dropout_{d:g}" / "history" / "errors.csv")
        last = max(r["epoch"] for r in errors)
        assert last == 5
        by = {(r["model"], r["split"]): r for r in errors if r["epoch"] == last}
        def cell(m, s, by=by):
            return f"{by[m, s]['error_pct']:.3f}% ({by[m, s]['n_errors']}/{by[m, s]['n']})"

        # A row per member and the ensemble: val then test, numbers and counts as in errors.csv.
        rows = tables[f"Dropout {d:g}, epoch 5"]
        assert rows[0] == ["member", "val error", "test error"]
        assert [r[1:] for r in rows[1:]] == [[cell(m, "val"), cell(m, "test")] for m in ("0", "1", "ensemble")]
        assert [r[0].split(" (")[0] for r in rows[1:]] == ["model 0", "model 1", "ensemble"]
        assert [f"{d:g}", "5", cell("ensemble", "val"), cell("ensemble", "test")] == \
            next(r for r in summary if r[0] == f"{d:g}")[:4]


def test_report_summarizes_the_run_and_its_fixed_lr_phase(report):
    run_dir, text = report
    page_text = " ".join(_parse(text).text)
    assert "mnist: 480 train, 120 validation, 200 test images, 10 classes" in page_text
    assert "epochs 4-5 at learning rate 1e-05" in page_text
    for key in ("batch_size", "val_fraction", "bn_recalibration_images", "keras", "tensorflow", "fingerprint"):
        assert key in page_text


def test_best_member_is_chosen_on_validation(report):
    run_dir, _ = report
    for item in load_results(run_dir):
        val = {m["name"]: (m["val"].n_errors, int(m["name"])) for m in item["members"]}
        assert item["best_member"] == str(min(val.values())[1])
        assert item["epoch"] == 5 and item["ensemble"]["test"].n == 200


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
    rows = _parse(render_report(copy)).rows
    assert ["1", "1", "5.000% (6/120)", "7.500% (15/200)"] in rows
    assert ["2", "1 0", "4.167% (5/120)", "5.500% (11/200)"] in rows


def test_write_report_embeds_figures_bytes_and_paths(report, tmp_path):
    run_dir, _ = report
    fig = plot_confusion_matrix(np.array([[3, 1], [0, 4]]), ("a", "b"))
    png = next((run_dir / "plot_history").glob("*.png"))
    path = write_report(run_dir, {"figure": fig, "bytes": png.read_bytes(), "path": png},
                        captions={"figure": "a caption <with> markup"}, out_path=tmp_path / "r.html")
    text = path.read_text()
    page = _parse(text)
    assert len([a for t, a in page.tags if t == "img"]) == 3
    assert "a caption &lt;with&gt; markup" in text and "<with>" not in text
    with pytest.raises(DataError, match="not a PNG"):
        write_report(run_dir, {"bad": b"GIF89a"}, out_path=tmp_path / "bad.html")
    with pytest.raises(DataError, match="expected a PNG path"):
        write_report(run_dir, {"bad": 42}, out_path=tmp_path / "bad.html")


def test_report_shows_the_reference_results(report, shared_dir):
    run_dir, _ = report
    ref = load_reference_history(shared_dir / "reference" / "plot_history")
    page = _parse(render_report(run_dir, reference=ref))
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
    page = _parse(render_report(copy))
    assert ["0.2", "5", "-"] == page.tables["At the last checkpoint"][1][:3]
    assert "first rate (no validation split)" in " ".join(page.text)
