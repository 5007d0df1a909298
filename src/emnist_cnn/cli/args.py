"""The flags of every subcommand, in argparse groups; every help text states its default."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..config import DATASETS, DEFAULT_DATASET, PRECISIONS, PRESETS, RECIPES
from ..training.device import DEVICES, JIT_COMPILE

__all__ = ["EXPORT_FORMATS", "PREPROCESSING_STYLES", "Parser", "add_run_args", "add_train_args", "add_evaluate_args",
           "add_plot_args", "add_export_args", "add_predict_args", "add_import_reference_args", "add_download_args",
           "add_track_args", "add_compare_args", "add_config_args", "add_tune_args"]

# Kept in step with io.model_files.FORMATS and engine.predict.STYLES (checked by the tests); spelled out
# here so that `--help` never imports the engine.
EXPORT_FORMATS = ("json_h5", "keras", "saved_model", "onnx")
PREPROCESSING_STYLES = ("auto", "emnist", "mnist")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors instead of the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _add_data_group(p: argparse.ArgumentParser, *, dataset_default: str | None = None,
                    dataset_help: str | None = None) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS, default=dataset_default,
                   help=dataset_help or ("dataset to train on (default: emnist-digits, or the run's own when "
                                         "resuming)" if dataset_default is None else
                                         f"data the run is built on (default: {dataset_default})"))
    g.add_argument("--data-dir", type=Path, default=None,
                   help="folder with the dataset files (default: $EMNIST_CNN_DATA, else ~/.cache/emnist-cnn/data)")
    g.add_argument("--mirror", default=None,
                   help="base URL to download EMNIST from (default: $EMNIST_CNN_MIRROR, else NIST)")
    g.add_argument("--download", action=argparse.BooleanOptionalAction, default=True,
                   help="download a missing EMNIST split; --no-download fails instead (default: download)")


def _add_training_group(p: argparse.ArgumentParser) -> None:
    t = p.add_argument_group(
        "training",
        "Unset flags take the run's saved values when --run-dir already holds a run, else the defaults. "
        "Resuming: run the same command again; every member continues from its last finished epoch. "
        "Raising --epochs continues a finished run; changing the data, members, dropout rates, batch "
        "size, augmentation, split or seed of an existing run is refused.",
    )
    t.add_argument("--config", type=Path, default=None, metavar="FILE",
                   help="experiment settings from a TOML file (emnist-cnn config show writes one) or a run's "
                        "config.json; flags override its keys (default: none)")
    t.add_argument("--dropout", type=float, nargs="+", default=None, metavar="D",
                   help="dropout rates, one ensemble each (default: 0.2 0.3 0.4 0.5)")
    t.add_argument("--models", type=int, default=None, help="members per ensemble (default: 10)")
    t.add_argument("--epochs", type=int, default=None, help="total epochs per member (default: 256)")
    t.add_argument("--checkpoint-every", type=int, default=None,
                   help="epochs between weight checkpoints and ensemble evaluations (default: 16)")
    t.add_argument("--batch-size", type=int, default=None,
                   help="images per step (default: the recipe's, 64 for fast; for reference the preset's, "
                        "else 512)")
    t.add_argument("--recipe", choices=tuple(RECIPES), default=None,
                   help="how members are optimised: reference is Adam at a constant rate, as the reference "
                        "workflow; fast takes 64 images per step, warms up to 3x the base rate over the first "
                        "10%% of steps, then decays it linearly to zero by the last epoch; part of the "
                        "experiment (default: the preset's, else reference)")
    t.add_argument("--lr", type=float, default=None,
                   help="fixed Adam learning rate for the epochs this command trains, e.g. 1e-5 to continue "
                        "a finished run; replaces a recipe's schedule (default: the recipe's rate from the "
                        "run's base rate, 1e-3 for a new run)")
    t.add_argument("--val-fraction", type=float, default=None,
                   help="share of the training set held out for validation, by writer when writer ids "
                        "exist; 0 reproduces the reference protocol (default: 0.1)")
    t.add_argument("--seed", type=int, default=None, help="seed for everything random (default: 0)")
    t.add_argument("--limit-train", type=int, default=None,
                   help="train on a stratified subset of N images (default: all)")
    t.add_argument("--bn-recalibration", type=int, default=None, metavar="N",
                   help="training images used to recompute BatchNormalization statistics before each "
                        "evaluation; 0 keeps Keras' moving averages like the reference (default: 10000)")
    t.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="the reference's augmentation on or off (--no-augment); its settings are in the config "
                        "file's [augment] (default: on, or the run's own when resuming)")
    t.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="compute precision, float32 weights throughout: mixed_bfloat16 computes in bfloat16 "
                        "(faster on CPUs with AVX-512 BF16 and GPUs from Ampere on); mixed_float16 in float16 "
                        "with dynamic loss scaling (the usual GPU choice; slow on a CPU); part of the "
                        "experiment (default: float32)")
    t.add_argument("--fused", action=argparse.BooleanOptionalAction, default=None,
                   help="train each ensemble's members together in one compiled step; same weights and "
                        "histories as one by one, faster on a GPU, more memory (default: where the members "
                        "train on a GPU: this machine's, or with --ray when tasks reserve one, --gpus-per-member; "
                        "off on a CPU and with mixed_float16)")
    t.add_argument("--quiet", action="store_true",
                   help="no progress bars, only one line per epoch (default: progress bars)")
    d = p.add_argument_group(
        "device", "The first log line says where training runs (devices, fused or not, XLA, precision); "
        "config.json and invocations.jsonl record it. Not part of the experiment: a run may switch.")
    d.add_argument("--device", choices=DEVICES, default="auto",
                   help="auto: a GPU when one is usable, else the CPU; gpu: stop at once, in one line, when "
                        "no GPU is usable; cpu: hide the GPUs (choose GPUs with CUDA_VISIBLE_DEVICES) "
                        "(default: auto)")
    d.add_argument("--jit-compile", choices=JIT_COMPILE, default="auto",
                   help="compile with XLA, training and inference alike: auto is on with a GPU that is not "
                        "hidden and off on a CPU, where XLA measured slower; JAX always uses XLA (default: auto)")
    d.add_argument("--steps-per-call", type=int, default=None, metavar="N",
                   help="training steps per compiled call, in a loop on the device (default: 16 with a GPU, "
                        "1 on a CPU)")


def _add_scaleout_group(p: argparse.ArgumentParser) -> None:
    s = p.add_argument_group(
        "threads and many machines (Ray)",
        "With --ray, every member trains as a Ray task up to its next checkpoint, on any node of the cluster; "
        "the run directory must be an absolute path every node mounts at the same place. A task whose "
        "worker or node dies is retried and resumes from the member's last finished epoch. Results equal a "
        "local run with the same --threads, to the bit. Not part of the experiment: a run may switch.",
    )
    s.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="train on Ray: 'local' starts Ray on this machine, 'auto' joins the cluster `ray start` "
                        "made here, HOST:PORT joins that head node (default: off, train in this process)")
    s.add_argument("--threads", type=int, default=None, metavar="N",
                   help="backend intra- and inter-op threads of every training process, and the CPUs each "
                        "Ray task reserves; the thread count decides summation order, so compare runs at "
                        "equal counts (default: one per core; 1 with --ray)")
    s.add_argument("--gpus-per-member", type=float, default=0.0, metavar="F",
                   help="GPUs each member's Ray task reserves, e.g. 0.25 packs four members on a GPU; "
                        "with --fused a dropout rate's members share one task (default: 0)")
    s.add_argument("--max-retries", type=int, default=3, metavar="N",
                   help="times Ray reruns a member task whose worker or node died (default: 3)")


def _add_mlflow_args(g) -> None:
    g.add_argument("--mlflow", default=os.environ.get("MLFLOW_TRACKING_URI") or None, metavar="URI",
                   help="also log into an MLflow run at this tracking URI: a server (http://HOST:PORT) or a "
                        "local store (sqlite:///PATH); one MLflow run per run directory, resumes included "
                        "(default: $MLFLOW_TRACKING_URI, else off)")
    g.add_argument("--mlflow-experiment", default=os.environ.get("MLFLOW_EXPERIMENT_NAME") or "emnist-cnn",
                   metavar="NAME",
                   help="MLflow experiment a new MLflow run is created in (default: $MLFLOW_EXPERIMENT_NAME, "
                        "else emnist-cnn)")


def _add_tracking_group(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "tracking",
        "TensorBoard event files are always written to RUN/tensorboard/ (tensorboard --logdir RUN). "
        "Tracking catches up from the run directory's records: a resumed run, or one whose server was "
        "down, sends what was missed, never an epoch twice. An unreachable server is one warning; "
        "training goes on.",
    )
    _add_mlflow_args(g)


def add_train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run directory")
    g.add_argument("--run-dir", type=Path, required=True,
                   help="where config, weights, state and histories live (required, no default)")
    _add_data_group(p)
    _add_training_group(p)
    _add_tracking_group(p)
    _add_scaleout_group(p)


def add_track_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", type=Path, required=True, help="the run directory to send (required, no default)")
    _add_mlflow_args(p)
    p.add_argument("--data-dir", type=Path, default=None,
                   help="folder with the dataset files, for TensorBoard's image grids (default: the folder "
                        "recorded in RUN/config.json; without the data the images are skipped)")


def add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick",
                   help="quick: 2 members x 4 epochs on 20,000 images, minutes on a laptop CPU; "
                        "reference: the original 4 x 10 x 256-epoch protocol for a GPU; reference-fast: the "
                        "same sweep with the fast recipe for 96 epochs (default: quick)")
    g = p.add_argument_group("run directory")
    g.add_argument("--run-dir", type=Path, default=None,
                   help="where config, weights, state and histories live (default: runs/<preset>-<dataset>)")
    _add_data_group(p)
    _add_training_group(p)
    _add_tracking_group(p)
    _add_scaleout_group(p)


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("show",),
                   help="show: print every experiment setting as a commented TOML file, to edit and pass to "
                        "train or run with --config (required)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="start from this preset (default: none: the defaults, the reference protocol)")


def add_evaluate_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run-dir", type=Path, default=None, help="a run directory to evaluate (default: none)")
    src.add_argument("--weights", type=Path, nargs="+", default=None, metavar="FILE",
                     help="weight files evaluated as one ensemble: ours (.weights.h5) or the reference's "
                          "Keras 2 files (default: none)")
    p.add_argument("--dropout", type=float, nargs="+", default=None, metavar="D",
                   help="dropout rates to evaluate (default: all of the run's)")
    p.add_argument("--epoch", default="latest", help="checkpoint epoch, or 'latest' (default: latest)")
    p.add_argument("--split", choices=("test", "val"), default="test", help="split to report (default: test)")
    p.add_argument("--tta", type=int, default=0, metavar="N",
                   help="average each prediction over N augmented copies too (default: 0, off)")
    p.add_argument("--dataset", choices=DATASETS, default=DEFAULT_DATASET,
                   help="dataset for --weights (default: emnist-digits; a run uses its own)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="dataset folder (default: the run's recorded folder, else $EMNIST_CNN_DATA or "
                        "~/.cache/emnist-cnn/data)")
    p.add_argument("--out", type=Path, default=None,
                   help="with --weights: folder for the confusion matrix and misclassified CSVs "
                        "(default: none; a run writes into RUN/dropout_X/evaluation/)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables (default: off)")


def add_compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", type=Path, nargs=2, required=True, metavar=("A", "B"),
                   help="the two run directories, trained on the same test set (required, no default)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table (default: off)")


def add_plot_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", type=Path, required=True, help="the run directory to plot (required, no default)")
    p.add_argument("--out", type=Path, default=None, help="folder for the PNGs (default: RUN/plot_history)")
    p.add_argument("--report", type=Path, default=None, help="path of the HTML report (default: RUN/report.html)")
    p.add_argument("--compare-reference", type=Path, default=None, metavar="DIR",
                   help="the reference's plot_history folder (training_history_emnist_*.csv) to overlay, "
                        "e.g. ../shared/reference/plot_history (default: no overlay)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="folder with the dataset files, for the image plots (default: the folder recorded in "
                        "RUN/config.json)")
    p.add_argument("--dropout", type=float, default=None, metavar="D",
                   help="ensemble whose misclassified images and confusion matrix are drawn (default: the "
                        "dropout rate with the lowest validation error at its last checkpoint)")
    p.add_argument("--images", action=argparse.BooleanOptionalAction, default=True,
                   help="draw the plots that need the data and weights: misclassified, correct, confusion "
                        "matrix, augmentation; --no-images skips them (default: draw them)")


def add_export_args(p: argparse.ArgumentParser) -> None:
    formats = EXPORT_FORMATS
    p.add_argument("--run-dir", type=Path, required=True, help="the run directory to export from (required)")
    p.add_argument("--dropout", type=float, default=None,
                   help="dropout rate (default: the run's only one, else the one with the lowest validation "
                        "error)")
    p.add_argument("--epoch", default="latest",
                   help="checkpoint epoch, or 'latest': the latest checkpoint holding every needed member "
                        "(default: latest)")
    p.add_argument("--member", default="best",
                   help="best: the member with the lowest validation error; ensemble: all members averaged; "
                        "or a member index I (default: best)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: RUN/export_json_h5/)")
    p.add_argument("--formats", nargs="+", choices=formats, default=list(formats), metavar="FORMAT",
                   help=f"formats to write, from {', '.join(formats)}; a format the stack cannot produce is "
                        f"skipped with a warning unless named here explicitly (default: all: {' '.join(formats)})")
    g = p.add_argument_group("tracking", "With --mlflow, the export folder is logged into the run's MLflow run, "
                             "and model.keras as an MLflow Keras model (mlflow.keras.load_model('runs:/ID/model')).")
    _add_mlflow_args(g)


def add_predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, metavar="MODEL",
                   help="an export folder, model.keras, model.json (+ model.weights.h5), a SavedModel folder, "
                        "model.onnx, a run's weights file, or a reference .pkl/.h5 (required)")
    p.add_argument("images", type=Path, nargs="+", metavar="IMAGE", help="image files to classify (required)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON list of objects (file, class, probability or error) (default: text lines)")
    p.add_argument("--preprocessing", choices=PREPROCESSING_STYLES, default="auto",
                   help="how images are turned into 28x28: the model's own (EMNIST's unless trained on MNIST), "
                        "emnist or mnist (default: auto)")
    p.add_argument("--top", type=int, default=1, help="also list the N most probable classes (default: 1)")


def add_import_reference_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("ref_dir", type=Path, metavar="DIR",
                   help="the reference's folder holding dropout_*/weights/ (or one dropout_X folder) (required)")
    p.add_argument("--run-dir", type=Path, required=True,
                   help="new run directory to create (required, no default)")
    _add_data_group(p, dataset_default=DEFAULT_DATASET)
    g = p.add_argument_group("the run's settings for continued training")
    g.add_argument("--models", type=int, default=None, metavar="N",
                   help="import only members 0..N-1 (default: every member found)")
    g.add_argument("--val-fraction", type=float, default=None,
                   help="share of the training set held out for validation (default: 0.1)")
    g.add_argument("--seed", type=int, default=None, help="seed of the split and of continued training (default: 0)")
    g.add_argument("--limit-train", type=int, default=None,
                   help="continue on a stratified subset of N training images (default: all)")
    g.add_argument("--batch-size", type=int, default=None, help="images per step when continuing (default: 512)")
    g.add_argument("--checkpoint-every", type=int, default=None,
                   help="epochs between checkpoints when continuing (default: 16, as the reference)")
    g.add_argument("--lr", type=float, default=None,
                   help="the run's base Adam learning rate; continue with train --lr for a fixed one (default: 0.001)")
    g.add_argument("--bn-recalibration", type=int, default=None, metavar="N",
                   help="training images used to recompute BatchNormalization statistics after each continued "
                        "epoch; 0 keeps the moving averages (default: 10000)")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                   help="continue with the reference's augmentation, or without it (--no-augment) (default: "
                        "with it)")
    p.add_argument("--evaluate", action=argparse.BooleanOptionalAction, default=True,
                   help="evaluate the imported checkpoints on validation and test; --no-evaluate skips it "
                        "(default: evaluate)")


def add_download_args(p: argparse.ArgumentParser) -> None:
    _add_data_group(p)
    p.add_argument("--format", choices=("idx", "mat"), default="idx",
                   help="idx: NIST's gzip.zip (536 MB); mat: NIST's matlab.zip (default: idx)")
    p.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                   help="give up when the server sends nothing for this long; the partial file is kept and "
                        "the next run resumes it (default: 60)")


def add_tune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--search-dir", type=Path, required=True, metavar="DIR",
                   help="where the search keeps its trials (one run directory each), its state, the leaderboard "
                        "and best.toml; the same command resumes it (required, no default)")
    p.add_argument("--space", type=Path, required=True, metavar="FILE",
                   help="TOML file of the settings to vary: a list of values or {uniform = [low, high]} / "
                        "{loguniform = [low, high]} per key (required, no default)")
    b = p.add_argument_group("the base experiment",
                             "Settings the space does not vary come from the preset, then the --config file.")
    b.add_argument("--preset", choices=sorted(PRESETS), default="quick",
                   help="base settings (default: quick)")
    b.add_argument("--config", type=Path, default=None, metavar="FILE",
                   help="base settings from a TOML file or a run's config.json, over the preset (default: none)")
    _add_data_group(p, dataset_help="dataset to search on (default: the --config file's, else emnist-digits)")
    s = p.add_argument_group("the search", "Successive halving (ASHA) on the trials' validation error; the test "
                             "split is never loaded by a trial.")
    s.add_argument("--trials", type=int, default=16, metavar="N",
                   help="configurations sampled from the space (default: 16)")
    s.add_argument("--max-epochs", type=int, default=16, metavar="E",
                   help="epochs a trial trains unless stopped (default: 16)")
    s.add_argument("--grace-epochs", type=int, default=2, metavar="E",
                   help="epochs every trial trains before it may be stopped (default: 2)")
    s.add_argument("--reduction-factor", type=int, default=3, metavar="R",
                   help="at each rung ASHA lets the best 1/R of the trials go on (default: 3)")
    s.add_argument("--members-per-trial", type=int, default=1, metavar="K",
                   help="ensemble members per trial; the trial reports their ensemble (default: 1)")
    s.add_argument("--concurrent", type=int, default=1, metavar="N",
                   help="trials training at once, each in a process of its own (default: 1)")
    s.add_argument("--search-seed", type=int, default=0, metavar="S",
                   help="seed of the sampled configurations; the trials train with the base seed (default: 0)")
    s.add_argument("--threads", type=int, default=None, metavar="N",
                   help="backend threads per trial, and the CPUs it reserves (default: the cores / --concurrent)")
    s.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="run the trials on this Ray cluster: 'auto' or HOST:PORT (default: Ray on this machine)")
    s.add_argument("--max-retries", type=int, default=3, metavar="N",
                   help="times a trial whose worker or node died is started again; it resumes (default: 3)")
    s.add_argument("--final-members", type=int, default=None, metavar="N",
                   help="then train the best settings with N members in SEARCH/final, on the whole dataset, and "
                        "report its test error (default: off; best.toml and the printed command do it later)")
    g = p.add_argument_group("tracking", "With --mlflow, the search is one MLflow run and each trial a run nested "
                             "under it (TensorBoard files are in each trial's run directory).")
    _add_mlflow_args(g)
    p.add_argument("--json", action="store_true", help="print the leaderboard as JSON (default: a table)")
