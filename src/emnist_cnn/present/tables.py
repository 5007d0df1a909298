"""Plain-text tables for the terminal: training results, evaluations.

Every error cell is `str(ErrorRate)`: "0.160% (64/40000; 95% CI 0.125-0.204%)".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from ..core.results import Comparison, Evaluation
from ..core.selection import select_best_member
from ..io.rundir import ErrorRecord

if TYPE_CHECKING:  # the search module imports Ray's glue; a table needs only its types
    from ..training.search import Leaderboard

__all__ = ["format_table", "format_results", "format_evaluation", "format_comparison", "format_leaderboard"]


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain aligned text table."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    return "\n".join(lines)


def format_results(errors: Mapping[float, Sequence[ErrorRecord]]) -> str:
    """Per dropout rate, the member and ensemble table at the last checkpoint, and the best member on val."""
    out = []
    for dropout in sorted(d for d, records in errors.items() if records):
        records = errors[dropout]
        by = {(r.model, r.split): r.rate for r in records}
        members = sorted({r.model for r in records if not r.is_ensemble}, key=int)

        def cell(m: str, split: str, by=by) -> str:
            return str(by[m, split]) if (m, split) in by else "-"

        table = [[f"model {m}", cell(m, "val"), cell(m, "test")] for m in members]
        table.append(["ensemble", cell("ensemble", "val"), cell("ensemble", "test")])
        out.append(f"dropout {dropout:g}, epoch {records[0].epoch}:")
        out.append(format_table(["member", "val error", "test error"], table))
        best = select_best_member({int(m): by.get((m, "val")) for m in members})
        if best is not None:
            out.append(f"best member on validation: model {best}, test error {cell(str(best), 'test')}")
        out.append("")
    return "\n".join(out).rstrip()


def format_evaluation(result: Evaluation) -> str:
    """Human-readable tables for `evaluate_run` / `evaluate_weights` results."""
    split = result.split
    blocks = result.ensembles or (result.overall,)
    out = [f"{result.dataset}, {split} split, {result.n} images"
           + (f", test-time augmentation x{result.tta}" if result.tta else "")]
    for b in blocks:
        has_val = b.best_member is not None
        head = ["member"] + (["val error"] if has_val else []) + [f"{split} error"]
        rows = []
        for m in (*b.members, b.ensemble):
            row = [m.name if m is b.ensemble else f"model {m.name}"]
            if has_val:
                row.append(str(m.val))
            row.append(str(m.error))
            rows.append(row)
        if b.dropout is not None:
            out.append(f"\ndropout {b.dropout:g}, epoch {b.epoch}:")
        out.append(format_table(head, rows))
        if has_val:
            out.append(f"best member on validation: model {b.best_member.name}, {split} error {b.best_member.error}")
            if b.versus_best_member is not None:
                t = b.versus_best_member
                out.append(f"ensemble vs that member, on the same {b.n} images: {t.only_a} wrong only "
                           f"in the ensemble, {t.only_b} only in the member; McNemar exact p = {t.p_value:.3g}")
            out.append("best-k ensembles (members ranked on validation):")
            out.append(format_table(["k", "val error", f"{split} error", "members"], [
                [str(r.k), str(r.val), str(r.error), " ".join(r.members)] for r in b.best_k]))
        if b.files:
            out.append("wrote " + ", ".join(b.files.values()))
    if len(blocks) > 1:
        out.append(f"\nall {len(result.overall.members)} members together: {split} error "
                   f"{result.overall.ensemble.error}")
    return "\n".join(out)


def format_comparison(result: Comparison) -> str:
    """Two runs' chosen ensembles (`engine.compare.compare_runs`) and the paired test between them."""
    a, b, t = result.a, result.b, result.paired
    rows = [[label, r.run, r.recipe, f"{r.dropout:g}", str(r.epoch), str(r.error)] for label, r in (("A", a), ("B", b))]
    return "\n".join([
        f"{a.dataset}, test split, {result.n} images; each run's ensemble chosen on validation",
        "",
        format_table(["", "run", "recipe", "dropout", "epoch", "ensemble test error"], rows),
        "",
        f"paired on the same {result.n} images: {t.only_a} wrong only in A, {t.only_b} only "
        f"in B; McNemar exact p = {t.p_value:.3g}"
        + (" (a real difference at the 5% level)" if t.p_value < 0.05 else " (not shown to differ)"),
    ])


def format_leaderboard(board: "Leaderboard") -> str:
    """A search's trials, best first on validation, with the settings each tried, and whether the best two
    differ (McNemar's exact test on the same validation images)."""
    if not board.trials:
        return "no trial has finished an epoch yet"
    keys = list(board.trials[0].settings)
    rows = [[str(k), t.name, str(t.val), f"{t.epochs}/{board.max_epochs}",
             *(f"{t.settings[key]:.4g}" if isinstance(t.settings[key], float) else str(t.settings[key])
               for key in keys)]
            for k, t in enumerate(board.trials, 1)]
    lines = [format_table(["#", "trial", "val error", "epochs", *keys], rows)]
    versus = board.best_vs_next
    if versus is not None:
        a, b = board.trials[0].name, board.trials[1].name
        verdict = (f"{a} is better at the 5% level" if versus.p_value < 0.05
                   else "not distinguishable on validation")
        lines += ["", f"best two on the same {board.trials[0].val.n} validation images: {versus.only_a} wrong only "
                      f"in {a}, {versus.only_b} only in {b}; McNemar exact p = {versus.p_value:.3g} ({verdict})"]
    return "\n".join(lines)
