"""The `emnist-cnn` command line: every subcommand registered the same way, one error line on failure."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .. import __version__
from ..errors import EmnistCnnError
from ..io.rundir import RunDir
from . import args as a
from . import commands as c

__all__ = ["COMMANDS", "build_parser", "main"]

# name: (add its flags, handler, one-line help, description)
COMMANDS = {
    "run": (a.add_run_args, c.cmd_run,
            "train, then print per-member and ensemble errors (what `make run` runs)",
            "Train (or resume) a preset, evaluate its last checkpoint, write the plots and report.html."),
    "train": (a.add_train_args, c.cmd_train, "train or resume ensembles in a run directory",
              "Train or resume ensembles; defaults are the reference protocol."),
    "evaluate": (a.add_evaluate_args, c.cmd_evaluate,
                 "errors of members, ensemble and best-k ensembles at a checkpoint",
                 "Evaluate a run's checkpoint (choices made on validation), or weight files."),
    "compare": (a.add_compare_args, c.cmd_compare,
                "two runs' chosen ensembles on the same test images, with McNemar's exact test",
                "Compare two runs (two recipes, seeds or settings) on the same test images: each run's ensemble "
                "chosen on validation, its test error with a 95% interval, and McNemar's exact test on the "
                "images exactly one of them gets wrong. Reads the runs' records; loads no model."),
    "plot": (a.add_plot_args, c.cmd_plot, "write a run's plots (PNG) and a self-contained report.html",
             "Write RUN/plot_history/*.png and RUN/report.html (plots embedded, opens offline)."),
    "export": (a.add_export_args, c.cmd_export,
               "export a run's best member or its ensemble as JSON+H5, .keras, SavedModel and ONNX",
               "Export one model that takes upright [0, 1] pixels (N, 28, 28, 1) and returns softmax "
               "probabilities, normalization inside, with a metadata.json beside it. An ensemble is "
               "exported as one model averaging its members' softmax."),
    "predict": (a.add_predict_args, c.cmd_predict,
                "classify PNG/JPEG image files with an exported model, a run's weights or the reference's",
                "Classify image files of any size and either polarity (dark ink on light paper or light on "
                "dark). Each image is preprocessed the way the model's training images were made (EMNIST: "
                "blur, crop to the character, center in a square keeping the aspect ratio, 2-pixel border, "
                "bicubic 28x28; MNIST: fit into 20x20, center of mass at the center). Prints the top class "
                "and its probability per file. Exit status 1 if any file could not be predicted."),
    "import-reference": (
        a.add_import_reference_args, c.cmd_import_reference,
        "convert the reference's Keras 2 weight files into a run directory you can continue",
        "Convert a reference weight tree (dropout_*/weights/NNNepochs_weights_model_I.pkl, Keras 2 HDF5) "
        "into a new run directory: every file becomes a weights checkpoint, each member's latest epoch its "
        "resumable state. The reference saved no optimizer state, so continuing starts a fresh Adam: "
        "emnist-cnn train --run-dir RUN --epochs N --lr 1e-5 (with the same --data-dir)."),
    "track": (a.add_track_args, c.cmd_track,
              "send a run's records to TensorBoard and MLflow, e.g. a run trained without --mlflow",
              "Write RUN/tensorboard/ event files and, with --mlflow, log into the run's MLflow run "
              "(created on first use): every recorded epoch and checkpoint not sent yet, then config.json, "
              "the plots and report.html. Safe while the run trains: nothing is sent twice."),
    "config": (a.add_config_args, c.cmd_config, "print every experiment setting as a TOML file for --config",
               "Print the experiment's settings (the defaults, or --preset's) as a TOML file with every key "
               "commented: what it means, its unit, and the flag that overrides it. Edit it and pass it to "
               "train or run with --config FILE."),
    "tune": (a.add_tune_args, c.cmd_tune, "search settings by successive halving on validation (Ray Tune's ASHA)",
             "Sample configurations from a search space, train each as a run directory (one member by default), "
             "and stop the trials that trail on validation (ASHA). The same command resumes the search. Prints "
             "the leaderboard and writes SEARCH/best.toml for train --config."),
    "download": (a.add_download_args, c.cmd_download,
                 "download and unpack an EMNIST split from NIST (or a mirror)",
                 "Download NIST's EMNIST archive (resumable, checksummed) and unpack one split."),
}


def build_parser() -> argparse.ArgumentParser:
    parser = a.Parser(prog="emnist-cnn",
                      description="Train, resume, compare and ship ensembles of augmented CNNs on EMNIST.")
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging (default: info)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="print the version and exit (default: off)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=a.Parser)
    for name, (add_args, handler, help_text, description) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=description)
        add_args(p)
        p.set_defaults(handler=handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if isinstance(getattr(args, "run_dir", None), (str, os.PathLike)):
        args.run_dir = RunDir.of(args.run_dir)  # one RunDir for the whole command: config.json is read once
    # This package's progress at INFO; other libraries' only from WARNING on (JAX says at INFO that it found
    # no TPU on every start): --verbose shows everyone's DEBUG.
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(message)s",
                        stream=sys.stderr)
    if not args.verbose:
        logging.getLogger("emnist_cnn").setLevel(logging.INFO)
    try:
        return args.handler(args)
    except EmnistCnnError as exc:
        print(f"emnist-cnn: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("emnist-cnn: interrupted; finished epochs are saved, run the same command to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
