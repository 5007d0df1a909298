"""RUN/report.html: one self-contained page with a run's settings, results tables and plots.

The page needs nothing but itself: plots are embedded as base64 PNG data URIs,
the style is inline, there is no script and no external link, so it opens
offline in any browser and can be mailed as one file.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import re
from collections.abc import Mapping
from pathlib import Path

from ..core.metrics import ErrorRate
from ..core.stats import standard_error_images
from ..errors import DataError
from ..io.files import atomic_write_text
from ..io.rundir import RunDir, format_utc_now
from .reference_history import reference_best_ensemble
from ..core.selection import select_dropout
from .summary import CheckpointResults, find_fixed_lr_phase, load_recipe_rates, load_results

__all__ = ["caption_for", "render_report", "write_report"]

log = logging.getLogger(__name__)

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
h3 { margin-bottom: 0.4em; }
table { border-collapse: collapse; margin: 0.5em 0 1.2em; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.7em; text-align: right; vertical-align: top; }
th { background: #f2f4f7; } td.l, th.l { text-align: left; }
tr.ensemble td { font-weight: bold; background: #eef6ee; } tr.best td { background: #fff7e0; }
.headline { background: #f4f8fb; border-left: 4px solid #2e86c1; padding: 0.6em 1em; margin: 1em 0; }
.note { color: #555; font-size: 0.9em; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #444; font-size: 0.92em; margin-top: 0.3em; }
code { background: #f4f4f4; padding: 0 0.2em; }
"""


# ----------------------------------------------------------------------------- images


def caption_for(name: str) -> str:
    """The report's caption for a plot written by `plot_run`, by its name."""
    m = re.fullmatch(r"(errors|training_curves)_dropout_(.+)", name)
    if m and m.group(1) == "errors":
        return (f"Dropout {m.group(2)}: test and validation error of every member (thin lines) and of the "
                "ensemble (bold) at every checkpoint; dashed red: the reference's published test errors "
                "when compared.")
    if m:
        return (f"Dropout {m.group(2)}: loss and error per epoch of every member, training (augmented images, "
                "dropout active) against validation (inference mode); shaded: fixed-learning-rate epochs.")
    return {
        "ensembles": "Every dropout rate's ensemble (solid) and its best single member chosen on validation "
                     "(dashed), test and validation error per checkpoint.",
        "fixed_lr": "The fixed-learning-rate phase: error per epoch after the continuation (shaded), with the "
                    "checkpoints before it; x counts epochs since the switch so that the reference's epochs "
                    "256-272 line up.",
        "misclassified": "Every misclassified test image of the selected ensemble, titled "
                         "predicted/true label/#test index (the reference's incorrect_predictions grid).",
        "correct": "Random correctly classified test images, titled predicted/true label/#test index.",
        "confusion_matrix": "Confusion matrix of the selected ensemble on the test set, in images; "
                            "errors are coloured on a log scale.",
        "confusion_matrix_normalized": "The same confusion matrix as % of each true class.",
        "augmentation": "One training image and random draws of the run's augmentation.",
    }.get(name, name.replace("_", " "))


def _png_bytes(name: str, image) -> bytes:
    if isinstance(image, (bytes, bytearray)):
        data = bytes(image)
    elif isinstance(image, (str, Path)):
        try:
            data = Path(image).read_bytes()
        except OSError as exc:
            raise DataError(f"{image}: cannot read plot ({exc.strerror or exc})") from exc
    elif hasattr(image, "savefig"):
        buf = io.BytesIO()
        image.savefig(buf, format="png", dpi=110, facecolor="white")
        data = buf.getvalue()
    else:
        raise DataError(f"plot {name!r}: expected a PNG path, PNG bytes or a matplotlib Figure, "
                        f"got {type(image).__name__}")
    if not data.startswith(_PNG_MAGIC):
        raise DataError(f"plot {name!r} is not a PNG image")
    return data


# ----------------------------------------------------------------------------- html


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _cell(rate: ErrorRate | None) -> str:
    return "-" if rate is None else str(rate)


def _table(headers: list[str], rows: list[list[str]], row_classes: list[str] | None = None,
           left: int = 1) -> str:
    """An HTML table of already-escaped cells; the first `left` columns are left-aligned."""
    head = "".join(f'<th class="l">{h}</th>' if k < left else f"<th>{h}</th>" for k, h in enumerate(headers))
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        cells = "".join(f'<td class="l">{c}</td>' if k < left else f"<td>{c}</td>" for k, c in enumerate(row))
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _results_html(results: list[CheckpointResults]) -> str:
    parts = []
    summary = []
    for r in results:
        if r.epoch is None:
            summary.append([_e(f"{r.dropout:g}"), "-", "no checkpoint evaluated yet", "", "", ""])
            continue
        best = next((m for m in r.members if m.name == r.best_member), None)
        summary.append([_e(f"{r.dropout:g}"), _e(r.epoch), _e(_cell(r.ensemble.val)), _e(_cell(r.ensemble.error)),
                        _e(f"model {best.name}" if best is not None else "-"),
                        _e(_cell(best.error) if best is not None else "-")])
    parts.append("<h3>At the last checkpoint</h3>")
    parts.append(_table(["dropout", "epoch", "ensemble val error", "ensemble test error",
                         "best member (on val)", "its test error"], summary, left=1))
    parts.append(_noise_html(results))
    for r in results:
        if r.epoch is None:
            continue
        rate = f"{r.dropout:g}"
        parts.append(f'<h3 id="dropout-{_e(rate)}">Dropout {_e(rate)}, epoch {_e(r.epoch)}</h3>')
        rows, classes = [], []
        for m in r.members:
            star = " (best on val)" if m.name == r.best_member else ""
            rows.append([_e(f"model {m.name}{star}"), _e(_cell(m.val)), _e(_cell(m.error))])
            classes.append("best" if star else "")
        rows.append(["ensemble", _e(_cell(r.ensemble.val)), _e(_cell(r.ensemble.error))])
        classes.append("ensemble")
        parts.append(_table(["member", "val error", "test error"], rows, classes))
        ev = r.evaluation
        if ev is not None and ev.best_k:
            parts.append(f"<p>Best-k ensembles at epoch {_e(ev.epoch if ev.epoch is not None else '?')} (from "
                         "<code>emnist-cnn evaluate</code>): the k members ranked best on validation, averaged.</p>")
            krows = [[_e(b.k), _e(" ".join(b.members)), _e(_cell(b.val)), _e(_cell(b.error))] for b in ev.best_k]
            parts.append(_table(["k", "members", "val error", "test error"], krows, left=2))
    return "\n".join(parts)


def _noise_html(results: list[CheckpointResults]) -> str:
    """How many images one standard error is at these error rates: what a difference between two models needs."""
    rates = [r.ensemble.error for r in results if r.epoch is not None and r.ensemble.error is not None]
    text = ("<p>Each error is given with its 95% interval (Wilson), the range the true error rate lies in given "
            "this many test images.")
    if rates:
        best = min(rates, key=lambda rate: rate.pct)
        se = standard_error_images(best.n_errors, best.n)
        text += (f" At the best ensemble's test error, {_e(best)}, one standard error is about {se:.1f} images of "
                 f"{best.n:,}: two models a few images apart are not shown to differ. Paired on the same images, "
                 "<code>emnist-cnn evaluate</code> tests the ensemble against its best member (McNemar's exact "
                 "test).")
    return text + "</p>"


def _reference_html(reference: Mapping) -> str:
    rows = []
    for d, t in sorted(reference.get("dropouts", {}).items()):
        rows.append([_e(f"dropout {d:g}")] + _reference_row(t))
    fixed = reference.get("fixed_lr")
    if fixed is not None:
        rows.append([_e("fixed learning rate")] + _reference_row(fixed))
    best = reference_best_ensemble(reference)
    head = ""
    if best is not None:
        head = (f'<p>The reference\'s best published ensemble: <b>{best[0]:.3f}%</b> test error at epoch '
                f"{best[1]}. The reference picked checkpoints and its best single model on the test set, "
                "so its numbers are optimistic; this project chooses on validation.</p>")
    return head + _table(["table", "epochs", "last ensemble", "lowest ensemble", "lowest best single model"],
                         rows, left=1)


def _reference_row(t) -> list[str]:
    import numpy as np

    def at_min(values):
        if values is None or not np.isfinite(values).any():
            return "-"
        k = int(np.nanargmin(values))
        return f"{values[k]:.3f}% (epoch {int(t.epochs[k])})"

    last = "-"
    if t.ensemble is not None and np.isfinite(t.ensemble).any():
        k = int(np.flatnonzero(np.isfinite(t.ensemble))[-1])
        last = f"{t.ensemble[k]:.3f}% (epoch {int(t.epochs[k])})"
    return [_e(f"{int(t.epochs[0])}-{int(t.epochs[-1])}"), _e(last), _e(at_min(t.ensemble)), _e(at_min(t.best))]


def _settings_html(saved: dict, run: RunDir) -> str:
    cfg = saved.get("config", {})
    rows = []
    for k, v in cfg.items():
        if isinstance(v, dict):
            v = ", ".join(f"{a}={b}" for a, b in v.items())
        elif isinstance(v, list):
            v = ", ".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v)
        rows.append([_e(k), _e(v)])
    parts = ["<h3>Training settings</h3>", _table(["setting", "value"], rows, left=2)]
    data = saved.get("data", {})
    drows = [[_e(k), _e(v)] for k, v in data.items() if k != "classes"]
    if "classes" in data:
        drows.append(["classes", _e(f"{len(data['classes'])}: {data['classes']}")])
    parts += ["<h3>Data</h3>", _table(["field", "value"], drows, left=2)]
    parts += ["<h3>Versions</h3>", _table(["library", "version"],
                                          [[_e(k), _e(v)] for k, v in saved.get("versions", {}).items()], left=2)]
    irows = []
    for rec in run.read_invocations():
        argv = rec.get("argv") or []
        irows.append([_e(rec.get("time", "")), _e(rec.get("epochs", "")),
                      _e("-" if rec.get("fixed_lr") is None else f"{rec['fixed_lr']:g}"),
                      _e(" ".join(str(a) for a in argv))])
    if irows:
        parts += ["<h3>Training commands on this run</h3>",
                  _table(["time", "epochs", "fixed lr", "command"], irows, left=4)]
    return "\n".join(parts)


def _headline(results: list[CheckpointResults], errors: Mapping, reference: Mapping | None) -> str:
    """The chosen ensemble's test and validation error (chosen on validation), and the reference's best."""
    chosen = select_dropout(errors)
    if chosen is None:
        return "No checkpoint has been evaluated yet."
    r = next(x for x in results if x.dropout == chosen)
    how = "lowest validation error" if r.ensemble.val is not None else "first rate (no validation split)"
    headline = (f"Ensemble of dropout {chosen:g} ({how}) at epoch {r.epoch}: test error "
                f"<b>{_e(_cell(r.ensemble.error))}</b>, validation error {_e(_cell(r.ensemble.val))}.")
    best = reference_best_ensemble(reference) if reference else None
    if best is not None:
        headline += f" The reference's best published ensemble: {best[0]:.3f}% (epoch {best[1]})."
    return headline


def _run_rows(run: RunDir, saved: dict) -> list[list[str]]:
    """The "Run" table: data, ensembles, training settings, fixed-LR phase, where and when."""
    config = run.read_config()
    data = saved.get("data", {})
    phases = []
    rates = load_recipe_rates(run)
    for d in config.dropouts:
        p = find_fixed_lr_phase(run.read_histories(d, config.models), rates)
        if p is not None:
            phases.append(f"dropout {d:g}: epochs {p[0] + 1}-{p[1]} at learning rate "
                          f"{', '.join(f'{x:g}' for x in p[2])}")
    own = f"the {config.recipe} recipe's schedule from base rate {config.lr:g}" if callable(rates) else \
        f"the base rate {config.lr:g}"
    phase_txt = ("; ".join(phases) + f" (otherwise {own})") if phases else f"none (every epoch at {own})"
    return [
        ["dataset", _e(f"{data.get('name', config.dataset)}: {data.get('n_train', '?')} train, "
                       f"{data.get('n_val', '?')} validation, {data.get('n_test', '?')} test images, "
                       f"{len(data.get('classes', '')) or '?'} classes")],
        ["ensembles", _e(f"{len(config.dropouts)} dropout rate(s) ({', '.join(f'{d:g}' for d in config.dropouts)})"
                         f" x {config.models} members, {config.epochs} epochs, checkpoint every "
                         f"{config.checkpoint_every}")],
        ["training", _e(f"{config.recipe} recipe, batch {config.batch_size}, Adam base lr {config.lr:g}, "
                        f"seed {config.seed}, "
                        f"augmentation {'on' if config.augment.enabled else 'off'}, BN recalibration on "
                        f"{config.bn_recalibration_images} images")],
        ["fixed-learning-rate phase", _e(phase_txt)],
        ["run directory", _e(str(run.path.resolve()))],
        ["created / updated", _e(f"{saved.get('created', '?')} / {saved.get('updated', '?')}")],
    ]


def render_report(run_dir, images: Mapping | None = None, *, captions: Mapping[str, str] | None = None,
                  reference: Mapping | None = None) -> str:
    """The report page as one HTML string (see `write_report`)."""
    run = RunDir.of(run_dir)
    saved = run.read_record()
    results = load_results(run)
    title = f"emnist-cnn report: {run.path.resolve().name}"
    headline = _headline(results, {r.dropout: run.read_errors(r.dropout) for r in results}, reference)
    summary = _run_rows(run, saved)

    figures = []
    for key, image in (images or {}).items():
        caption = (captions or {}).get(key) or caption_for(key)
        b64 = base64.b64encode(_png_bytes(key, image)).decode("ascii")
        figures.append(f'<figure id="plot-{_e(key)}"><img src="data:image/png;base64,{b64}" alt="{_e(caption)}">'
                       f"<figcaption><b>{_e(key)}</b>: {_e(caption)}</figcaption></figure>")

    generated = format_utc_now()
    version = saved.get("versions", {}).get("emnist_cnn", "")
    body = [
        f"<h1>{_e(title)}</h1>",
        f'<p class="note">Generated {_e(generated)} by emnist-cnn {_e(version)}. '
        "Validation errors drive every choice; test errors are only reported.</p>",
        f'<div class="headline">{headline}</div>',
        "<h2>Run</h2>", _table(["item", "value"], summary, left=2),
        "<h2>Results</h2>",
        '<p class="note">Error rates with (wrong/total) counts. The ensemble averages its members\' softmax '
        "outputs; the best member is the one with the lowest validation error.</p>",
        _results_html(results),
    ]
    if reference:
        body += ["<h2>The reference's published results (test error)</h2>", _reference_html(reference)]
    if figures:
        body += ["<h2>Plots</h2>", *figures]
    body += ["<h2>Settings</h2>", _settings_html(saved, run)]
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{_e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")


def write_report(run_dir, images: Mapping | None = None, *, captions: Mapping[str, str] | None = None,
                 reference: Mapping | None = None, out_path=None) -> Path:
    """Write the self-contained report page (default RUN/report.html); returns its path.

    `images` maps plot names to PNG paths, PNG bytes or matplotlib Figures
    (in page order; `plot_run`'s result fits); `captions` overrides
    `caption_for`; `reference` is `load_reference_history`'s result.
    """
    path = Path(out_path) if out_path is not None else RunDir.of(run_dir).report_path
    atomic_write_text(path, render_report(run_dir, images, captions=captions, reference=reference))
    log.info("wrote %s", path)
    return path
