"""The `emnist-cnn` command line: download, train, run."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
from pathlib import Path

from . import __version__
from .config import DATASETS, PRECISIONS, AugmentConfig, TrainConfig
from .errors import ConfigError, EmnistCnnError

log = logging.getLogger("emnist_cnn")

# `run` presets; explicit flags override them.
PRESETS = {
    # A few minutes on a 2-core laptop: a small ensemble on a subset, still a real result.
    "quick": dict(dropouts=(0.2,), models=2, epochs=4, checkpoint_every=2, batch_size=128,
                  limit_train=20_000, bn_recalibration_images=5_000),
    # The reference protocol (meant for a GPU): 4 dropout rates x 10 members x 256 epochs.
    "reference": dict(dropouts=(0.2, 0.3, 0.4, 0.5), models=10, epochs=256, checkpoint_every=16,
                      batch_size=512, limit_train=None),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS, default=None,
                   help="dataset to train on (default: emnist-digits, or the run's own when resuming)")
    g.add_argument("--data-dir", type=Path, default=None,
                   help="folder with the dataset files (default: $EMNIST_CNN_DATA, else ~/.cache/emnist-cnn/data)")
    g.add_argument("--mirror", default=None,
                   help="base URL to download EMNIST from (default: $EMNIST_CNN_MIRROR, else NIST)")
    g.add_argument("--no-download", action="store_true",
                   help="fail instead of downloading a missing EMNIST split (default: download it)")


def _add_train_args(p: argparse.ArgumentParser, run_dir_required: bool) -> None:
    g = p.add_argument_group("run directory")
    g.add_argument("--run-dir", type=Path, required=run_dir_required, default=None,
                   help="where config, weights, state and histories live"
                   + (" (required, no default)" if run_dir_required else " (default: runs/<preset>-<dataset>)"))
    _add_data_args(p)
    t = p.add_argument_group(
        "training",
        "Unset flags take the run's saved values when --run-dir already holds a run, else the defaults. "
        "Resuming: run the same command again; every member continues from its last finished epoch. "
        "Raising --epochs continues a finished run; changing the data, members, dropout rates, batch "
        "size, augmentation, split or seed of an existing run is refused.",
    )
    t.add_argument("--dropout", type=float, nargs="+", default=None, metavar="D",
                   help="dropout rates, one ensemble each (default: 0.2 0.3 0.4 0.5)")
    t.add_argument("--models", type=int, default=None, help="members per ensemble (default: 10)")
    t.add_argument("--epochs", type=int, default=None, help="total epochs per member (default: 256)")
    t.add_argument("--checkpoint-every", type=int, default=None,
                   help="epochs between weight checkpoints and ensemble evaluations (default: 16)")
    t.add_argument("--batch-size", type=int, default=None, help="images per step (default: 512)")
    t.add_argument("--lr", type=float, default=None,
                   help="fixed Adam learning rate for the epochs this command trains, e.g. 1e-5 to continue "
                        "a finished run (default: the run's base rate, 1e-3 for a new run)")
    t.add_argument("--val-fraction", type=float, default=None,
                   help="share of the training set held out for validation, by writer when writer ids "
                        "exist; 0 reproduces the reference protocol (default: 0.1)")
    t.add_argument("--seed", type=int, default=None, help="seed for everything random (default: 0)")
    t.add_argument("--limit-train", type=int, default=None,
                   help="train on a stratified subset of N images (default: all)")
    t.add_argument("--bn-recalibration", type=int, default=None, metavar="N",
                   help="training images used to recompute BatchNormalization statistics before each "
                        "evaluation; 0 keeps Keras' moving averages like the reference (default: 10000)")
    t.add_argument("--no-augment", action="store_true", help="train without augmentation (default: augment)")
    t.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="compute precision: mixed_bfloat16 computes in bfloat16 with float32 weights, faster on "
                        "CPUs with AVX-512 BF16 and recent GPUs; part of the experiment (default: float32)")
    t.add_argument("--fused", action=argparse.BooleanOptionalAction, default=None,
                   help="train each ensemble's members together in one compiled step; same weights and "
                        "histories as one by one, faster on a GPU, more memory (default: on with a GPU, "
                        "off on a CPU)")
    t.add_argument("--quiet", action="store_true", help="no progress bars, only one line per epoch (default: progress bars)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="emnist-cnn", description=__doc__)
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging (default: info)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="print the version and exit (default: off)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("run", help="train, then print per-member and ensemble errors (what `make run` runs)",
                       description="Train (or resume) and print the error table at the last checkpoint.")
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick",
                   help="quick: 2 members x 4 epochs on 20,000 images, minutes on a laptop CPU; "
                        "reference: the original 4 x 10 x 256-epoch protocol for a GPU (default: quick)")
    _add_train_args(p, run_dir_required=False)

    p = sub.add_parser("train", help="train or resume ensembles in a run directory",
                       description="Train or resume ensembles; defaults are the reference protocol.")
    _add_train_args(p, run_dir_required=True)

    p = sub.add_parser("evaluate", help="errors of members, ensemble and best-k ensembles at a checkpoint",
                       description="Evaluate a run's checkpoint (choices made on validation), or weight files.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run-dir", type=Path, default=None, help="a run directory to evaluate (default: none)")
    src.add_argument("--weights", type=Path, nargs="+", default=None, metavar="FILE",
                     help="weight files evaluated as one ensemble: ours (.weights.h5) or the reference's "
                          "Keras 2 files (default: none)")
    p.add_argument("--dropout", type=float, nargs="+", default=None, metavar="D",
                   help="dropout rates to evaluate (default: all of the run's)")
    p.add_argument("--epoch", default="latest",
                   help="checkpoint epoch, or 'latest' (default: latest)")
    p.add_argument("--split", choices=("test", "val"), default="test", help="split to report (default: test)")
    p.add_argument("--tta", type=int, default=0, metavar="N",
                   help="average each prediction over N augmented copies too (default: 0, off)")
    p.add_argument("--dataset", choices=DATASETS, default="emnist-digits",
                   help="dataset for --weights (default: emnist-digits; a run uses its own)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="dataset folder (default: the run's recorded folder, else $EMNIST_CNN_DATA or "
                        "~/.cache/emnist-cnn/data)")
    p.add_argument("--out", type=Path, default=None,
                   help="with --weights: folder for the confusion matrix and misclassified CSVs "
                        "(default: none; a run writes into RUN/dropout_X/evaluation/)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables (default: off)")

    # Commands that live with their modules; each sets `func`.
    from . import export, interop, plots, predict

    plots.register(sub)
    export.register(sub)
    predict.register(sub)
    interop.register(sub)

    p = sub.add_parser("download", help="download and unpack an EMNIST split from NIST (or a mirror)")
    _add_data_args(p)
    p.add_argument("--format", choices=("idx", "mat"), default="idx",
                   help="idx: NIST's gzip.zip (536 MB); mat: NIST's matlab.zip (default: idx)")
    p.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                   help="give up when the server sends nothing for this long; the partial file is kept and "
                        "the next run resumes it (default: 60)")
    return parser


def config_from_args(args: argparse.Namespace, preset: dict | None = None) -> TrainConfig:
    """Defaults, then the run's saved config (when resuming), then the preset, then explicit flags."""
    base = TrainConfig()
    saved_path = args.run_dir / "config.json" if args.run_dir else None
    if saved_path is not None and saved_path.exists():
        try:
            base = TrainConfig.from_dict(json.loads(saved_path.read_text())["config"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise EmnistCnnError(f"{saved_path}: unreadable run configuration ({exc})") from exc
    elif preset:
        base = base.replace(**preset)
    explicit = {
        "dataset": args.dataset, "models": args.models, "epochs": args.epochs,
        "checkpoint_every": args.checkpoint_every, "batch_size": args.batch_size,
        "val_fraction": args.val_fraction, "seed": args.seed, "limit_train": args.limit_train,
        "bn_recalibration_images": args.bn_recalibration,
        "dropouts": tuple(args.dropout) if args.dropout else None,
    }
    changes = {k: v for k, v in explicit.items() if v is not None}
    if args.no_augment:
        changes["augment"] = AugmentConfig(enabled=False)
    if args.precision is not None:
        changes["model"] = dataclasses.replace(base.model, precision=args.precision)
    return base.replace(**changes)


def _check_lr_and_data_dir(args: argparse.Namespace) -> None:
    """--lr must be usable; a resumed run finds its data where it was trained unless told otherwise."""
    if args.lr is not None and not (args.lr > 0 and math.isfinite(args.lr)):
        raise ConfigError(f"--lr must be a positive number, got {args.lr!r}")
    saved_path = args.run_dir / "config.json" if args.run_dir else None
    if args.data_dir is None and saved_path is not None and saved_path.exists():
        try:
            recorded = json.loads(saved_path.read_text())["data"].get("data_dir")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise EmnistCnnError(f"{saved_path}: unreadable run configuration ({exc})") from exc
        if recorded:
            args.data_dir = Path(recorded)


def _cmd_train(args: argparse.Namespace, preset: dict | None = None) -> int:
    from .train import train_and_evaluate

    _check_lr_and_data_dir(args)
    config = config_from_args(args, preset)
    rows = train_and_evaluate(config, args.run_dir, data_dir=args.data_dir, mirror=args.mirror,
                              fixed_lr=args.lr, download=not args.no_download, verbose=0 if args.quiet else 1,
                              fused=args.fused)
    print(format_results(rows))
    print(f"\nrun directory: {args.run_dir}")
    return 0


def format_results(rows: list[dict]) -> str:
    """The per-member and ensemble table at the last checkpoint, with the best member chosen on val."""
    from .evaluate import format_table

    out = []
    for dropout in sorted({r["dropout"] for r in rows}):
        by = {(r["model"], r["split"]): r for r in rows if r["dropout"] == dropout}
        epoch = next(r["epoch"] for r in rows if r["dropout"] == dropout)
        members = sorted({m for m, _ in by if m != "ensemble"}, key=int)
        cell = lambda m, s: (f"{float(by[m, s]['error_pct']):.3f}% ({by[m, s]['n_errors']}/{by[m, s]['n']})"
                             if (m, s) in by else "-")
        table = [[f"model {m}", cell(m, "val"), cell(m, "test")] for m in members]
        table.append(["ensemble", cell("ensemble", "val"), cell("ensemble", "test")])
        out.append(f"dropout {dropout:g}, epoch {epoch}:")
        out.append(format_table(["member", "val error", "test error"], table))
        if all((m, "val") in by for m in members) and members:
            best = min(members, key=lambda m: (float(by[m, "val"]["error_pct"]), int(m)))
            out.append(f"best member on validation: model {best}, test error {cell(best, 'test')}")
        out.append("")
    return "\n".join(out).rstrip()


def _cmd_run(args: argparse.Namespace) -> int:
    """Train (or resume), then evaluate the last checkpoint, plot, and write the report page."""
    from .evaluate import evaluate_run, format_evaluation
    from .plots import plot_run
    from .report import write_report
    from .train import load_run_data, train_and_evaluate

    preset = PRESETS[args.preset]
    if args.run_dir is None:
        args.run_dir = Path("runs") / f"{args.preset}-{args.dataset or 'emnist-digits'}"
    _check_lr_and_data_dir(args)
    config = config_from_args(args, preset)
    train_and_evaluate(config, args.run_dir, data_dir=args.data_dir, mirror=args.mirror, fixed_lr=args.lr,
                       download=not args.no_download, verbose=0 if args.quiet else 1, fused=args.fused)
    config, data = load_run_data(args.run_dir, args.data_dir)  # once, for evaluation and plots
    result = evaluate_run(args.run_dir, config=config, data=data)
    pngs = plot_run(args.run_dir, data=data)
    report = write_report(args.run_dir, pngs)
    print(format_evaluation(result))
    print(f"\nrun directory: {args.run_dir}")
    print(f"plots: {Path(next(iter(pngs.values()))).parent}/ ({len(pngs)} PNG files)")
    print(f"report: {report}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_run, evaluate_weights, format_evaluation

    if args.tta < 0:
        raise ConfigError(f"--tta must be >= 0, got {args.tta}")
    if args.epoch != "latest" and not str(args.epoch).isdigit():
        raise ConfigError(f"--epoch must be a checkpoint epoch number or 'latest', got {args.epoch!r}")
    if args.run_dir is not None:
        result = evaluate_run(args.run_dir, dropouts=args.dropout, epoch=args.epoch, split=args.split,
                              tta=args.tta, data_dir=args.data_dir)
    else:
        result = evaluate_weights(args.weights, dataset=args.dataset, data_dir=args.data_dir, split=args.split,
                                  tta=args.tta, out_dir=args.out)
    print(json.dumps(result, indent=2) if args.json else format_evaluation(result))
    return 0


def _cmd_download(args: argparse.Namespace) -> int:
    from .download import download_emnist

    name = args.dataset or "emnist-digits"
    if not name.startswith("emnist-"):
        raise ConfigError(f"--dataset {name}: only EMNIST splits are downloaded from NIST")
    if not (args.timeout > 0 and math.isfinite(args.timeout)):
        raise ConfigError(f"--timeout must be a positive number of seconds, got {args.timeout!r}")
    archive = "gzip.zip" if args.format == "idx" else "matlab.zip"
    paths = download_emnist(name[len("emnist-"):], args.data_dir, mirror=args.mirror, archive=archive,
                            timeout=args.timeout)
    for path in paths:
        print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s",
                        stream=sys.stderr)
    commands = {"run": _cmd_run, "train": _cmd_train, "evaluate": _cmd_evaluate, "download": _cmd_download}
    try:
        func = commands.get(args.command) or args.func
        return func(args)
    except EmnistCnnError as exc:
        print(f"emnist-cnn: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("emnist-cnn: interrupted; finished epochs are saved, run the same command to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
