"""What each subcommand does: turn flags into library calls and print the results.

Engine and presentation modules are imported inside the handlers: they pull
in Keras, TensorFlow and matplotlib, which `--help` and flag errors never need.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

from ..config import (DEFAULT_DATASET, PRESETS, AugmentConfig, DataSource, ScaleOutConfig, SearchSettings,
                      TrackingConfig, TrainConfig, TrainOptions)
from ..errors import ConfigError
from ..io.rundir import RunDir, parse_checkpoint_epoch

__all__ = ["config_from_args", "options_from_args", "scaleout_from_args", "tracking_from_args", "cmd_run",
           "cmd_track", "cmd_train", "cmd_evaluate", "cmd_compare", "cmd_plot", "cmd_export", "cmd_predict",
           "cmd_import_reference", "cmd_download", "cmd_config"]


def config_from_args(args: argparse.Namespace, preset: str | None = None) -> TrainConfig:
    """Defaults, then the run's saved config (when resuming), then the preset, then the --config file, then
    explicit flags; a new run without a batch size takes its recipe's batch size, when the recipe has one."""
    from ..io.config_files import apply_config_file, read_config_file

    run = RunDir.of(args.run_dir) if args.run_dir else None
    resuming = run is not None and run.exists()
    base = run.read_config() if resuming else None
    changes = {}
    if getattr(args, "config", None) is not None:
        changes = apply_config_file(base, read_config_file(args.config), args.config, preset)
    explicit = {
        "dataset": args.dataset, "models": args.models, "epochs": args.epochs,
        "checkpoint_every": args.checkpoint_every, "batch_size": args.batch_size,
        "val_fraction": args.val_fraction, "seed": args.seed, "limit_train": args.limit_train,
        "bn_recalibration_images": args.bn_recalibration,
        "dropouts": tuple(args.dropout) if args.dropout else None, "recipe": args.recipe,
    }
    changes.update({k: v for k, v in explicit.items() if v is not None})
    if args.augment is not None:
        augment = changes.get("augment", (base or TrainConfig()).augment)
        changes["augment"] = dataclasses.replace(augment, enabled=args.augment)
    if args.precision is not None:
        model = changes.get("model", (base or TrainConfig()).model)
        changes["model"] = dataclasses.replace(model, precision=args.precision)
    return base.replace(**changes) if resuming else TrainConfig.new_run(preset, **changes)


def _find_data_dir(args: argparse.Namespace) -> None:
    """A resumed run finds its data where it was trained unless told otherwise."""
    run = RunDir.of(args.run_dir) if args.run_dir else None
    if args.data_dir is None and run is not None and run.exists():
        recorded = run.read_record()["data"].get("data_dir")
        if recorded:
            args.data_dir = Path(recorded)


def scaleout_from_args(args: argparse.Namespace) -> ScaleOutConfig:
    return ScaleOutConfig(ray_address=args.ray, threads=args.threads, gpus_per_member=args.gpus_per_member,
                          max_retries=args.max_retries)


def tracking_from_args(args: argparse.Namespace) -> TrackingConfig:
    """TensorBoard always; MLflow when --mlflow (or $MLFLOW_TRACKING_URI) names a server, checked importable."""
    tracking = TrackingConfig(mlflow_uri=args.mlflow or None, mlflow_experiment=args.mlflow_experiment)
    if tracking.mlflow_uri is not None:
        from ..training.tracking import import_mlflow

        import_mlflow()  # before loading data: a missing extra is a one-line error, not a late failure
    return tracking


def options_from_args(args: argparse.Namespace) -> TrainOptions:
    """How this command trains: --lr, --fused, --device, --jit-compile, --steps-per-call, the progress bars,
    tracking and scale-out."""
    return TrainOptions(fixed_lr=args.lr, fused=args.fused, device=args.device, jit_compile=args.jit_compile,
                        steps_per_call=args.steps_per_call, verbose=0 if getattr(args, "quiet", False) else 1,
                        tracking=tracking_from_args(args), scaleout=scaleout_from_args(args))


def _train(args: argparse.Namespace, preset: str | None = None):
    """Train (or resume) the run the flags name; returns the engine's TrainedRun."""
    options = options_from_args(args)
    args.run_dir = RunDir.of(args.run_dir)  # one RunDir for the whole command: config.json is read once
    _find_data_dir(args)
    config = config_from_args(args, preset)
    source = DataSource(data_dir=args.data_dir, mirror=args.mirror, download=args.download)
    if options.scaleout.ray_address is not None:
        from ..training.scaleout import train_and_evaluate_on_ray

        return train_and_evaluate_on_ray(config, args.run_dir, source, options)
    from ..training.train import train_and_evaluate

    return train_and_evaluate(config, args.run_dir, source, options)


def cmd_train(args: argparse.Namespace) -> int:
    """`train`: train or resume, then print each dropout rate's last-checkpoint table."""
    from ..present.tables import format_results

    print(format_results(_train(args).errors))
    print(f"\nrun directory: {args.run_dir}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """`run`: train (or resume) a preset, then evaluate the last checkpoint, plot, and write the report page."""
    from ..engine.evaluate import evaluate_run
    from ..present.report import write_report
    from ..present.run_plots import plot_run
    from ..present.tables import format_evaluation

    if args.run_dir is None:
        from ..io.config_files import read_config_file

        in_file = read_config_file(args.config).get("recipe") if args.config is not None else None
        recipe = args.recipe or in_file or PRESETS[args.preset].get("recipe", "reference")
        # A recipe other than the preset's is another experiment: its own folder.
        suffix = "" if recipe == PRESETS[args.preset].get("recipe", "reference") else f"-{recipe}"
        args.run_dir = Path("runs") / f"{args.preset}-{args.dataset or DEFAULT_DATASET}{suffix}"
        if args.ray is not None:  # every node must find it: the default, made absolute
            args.run_dir = args.run_dir.absolute()
    trained = _train(args, args.preset)  # its run, config and data serve evaluation and plots too
    result = evaluate_run(trained.run, config=trained.config, data=trained.data)
    pngs = plot_run(trained.run, data=trained.data)
    report = write_report(trained.run, pngs)
    if args.mlflow:
        from ..training.tracking import log_run_artifacts

        log_run_artifacts(args.run_dir, tracking_from_args(args))
    print(format_evaluation(result))
    print(f"\nrun directory: {args.run_dir}")
    print(f"plots: {Path(next(iter(pngs.values()))).parent}/ ({len(pngs)} PNG files)")
    print(f"report: {report}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    """`config show`: every experiment setting of the defaults (or a preset) as a commented TOML file."""
    from ..io.config_files import format_config_toml

    what = f"the {args.preset} preset" if args.preset else "the defaults (the reference protocol)"
    print(format_config_toml(TrainConfig.new_run(args.preset), f"emnist-cnn experiment settings: {what}"), end="")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """`evaluate`: a run's checkpoint, or weight files as one ensemble."""
    if args.tta < 0:
        raise ConfigError(f"--tta must be >= 0, got {args.tta}")
    parse_checkpoint_epoch(args.epoch)  # a bad --epoch is refused before any data is loaded
    from ..engine.evaluate import evaluate_run, evaluate_weights
    from ..present.tables import format_evaluation

    if args.run_dir is not None:
        result = evaluate_run(args.run_dir, dropouts=args.dropout, epoch=args.epoch, split=args.split,
                              tta=args.tta, data_dir=args.data_dir)
    else:
        result = evaluate_weights(args.weights, dataset=args.dataset, data_dir=args.data_dir, split=args.split,
                                  tta=args.tta, out_dir=args.out)
    print(json.dumps(result.to_json(), indent=2) if args.json else format_evaluation(result))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    """`plot`: write the PNGs and report.html, print the report's path."""
    from ..present.reference_history import load_reference_history
    from ..present.report import write_report
    from ..present.run_plots import plot_run

    pngs = plot_run(args.run_dir, args.out, args.compare_reference, args.data_dir,
                    dropout=args.dropout, images=args.images)
    reference = load_reference_history(args.compare_reference) if args.compare_reference else None
    print(write_report(args.run_dir, pngs, reference=reference, out_path=args.report))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """`export`: write the chosen model in every asked format and print where."""
    from ..engine.export import export_run
    from ..io.model_files import FORMATS

    explicit = list(args.formats) != list(FORMATS)
    tracking = tracking_from_args(args)
    if tracking.mlflow_uri is not None and "keras" not in args.formats:
        raise ConfigError("--mlflow logs the exported model.keras: add keras to --formats")
    exported = export_run(args.run_dir, dropout=args.dropout, epoch=args.epoch, member=args.member, out_dir=args.out,
                          formats=args.formats, strict=explicit)
    sel, out = exported.selection, exported.out_dir
    what = {"best": f"member {sel.members[0]} (best on validation)", "ensemble":
            f"ensemble of {len(sel.members)} members", "member": f"member {sel.members[0]}"}[sel.kind]
    print(f"exported dropout {sel.dropout:g}, epoch {sel.epoch}, {what}: "
          f"validation error {sel.val or '-'}, test error {sel.test or '-'}")
    for key, name in exported.files.items():
        print(f"  {key:12s} {out / name}")
    for key, why in exported.skipped.items():
        print(f"  {key:12s} skipped: {why}")
    print(f"  {'metadata':12s} {out / 'metadata.json'}")
    if tracking.mlflow_uri is not None:
        from ..training.tracking import log_export

        print(f"  {'mlflow':12s} {log_export(args.run_dir, tracking, out, exported.metadata)} at "
              f"{tracking.mlflow_uri}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """`compare`: two runs' chosen ensembles on the same test images, with McNemar's exact test."""
    from ..engine.compare import compare_runs
    from ..present.tables import format_comparison

    result = compare_runs(*args.run_dir)
    print(json.dumps(result.to_json(), indent=2) if args.json else format_comparison(result))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """`predict`: one line per image file; exit 1 if any file could not be predicted."""
    if args.top < 1:
        raise ConfigError(f"--top must be >= 1, got {args.top}")
    from ..engine.predict import predict_files

    results = predict_files(args.model, args.images, preprocessing=args.preprocessing, top=args.top)
    if args.json:
        print(json.dumps(results, indent=2))
        return 1 if any("error" in r for r in results) else 0
    for r in results:
        if "error" in r:
            print(f"emnist-cnn: error: {r['error']}", file=sys.stderr)
            continue
        line = f"{r['file']}: {r['class']} ({100 * r['probability']:.2f}%)"
        if "top" in r:
            line += "  top: " + ", ".join(f"{c} {100 * q:.2f}%" for c, q in r["top"])
        print(line)
    return 1 if any("error" in r for r in results) else 0


def cmd_import_reference(args: argparse.Namespace) -> int:
    """`import-reference`: convert the reference's weight tree into a run, print its table and how to continue."""
    from ..engine.import_reference import import_reference
    from ..present.tables import format_results

    settings = {k: v for k, v in {
        "val_fraction": args.val_fraction, "seed": args.seed, "limit_train": args.limit_train,
        "batch_size": args.batch_size, "checkpoint_every": args.checkpoint_every, "lr": args.lr,
        "bn_recalibration_images": args.bn_recalibration,
    }.items() if v is not None}
    if not args.augment:
        settings["augment"] = AugmentConfig(enabled=False)
    result = import_reference(args.ref_dir, args.run_dir, dataset=args.dataset, data_dir=args.data_dir,
                              models=args.models, evaluate=args.evaluate, download=args.download,
                              mirror=args.mirror, settings=settings)
    config: TrainConfig = result["config"]
    n_files = sum(len(m["epochs"]) for m in result["members"])
    print(f"imported {n_files} reference weight files: {config.models} members x "
          f"{', '.join(f'dropout {d:g}' for d in config.dropouts)}, latest epoch {config.epochs}")
    if any(result["errors"].values()):
        print(format_results(result["errors"]))
    print("\nThe reference saved no optimizer state: continuing starts a fresh Adam optimizer. Continue with")
    data_dir = f" --data-dir {args.data_dir}" if args.data_dir else ""
    print(f"  emnist-cnn train --run-dir {args.run_dir} --epochs {config.epochs + 1} --lr 1e-5{data_dir}")
    print(f"\nrun directory: {args.run_dir}")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    """`download`: fetch and unpack an EMNIST split, print its files."""
    from ..io.download import download_emnist

    name = args.dataset or DEFAULT_DATASET
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


def cmd_track(args: argparse.Namespace) -> int:
    """`track`: send a run's records to TensorBoard and (with --mlflow) MLflow, then say what each holds."""
    from ..training.tracking import track_run

    summary = track_run(args.run_dir, tracking_from_args(args), data_dir=args.data_dir)
    for line in summary:
        print(line)
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    """`tune`: run (or resume) a search, then print its leaderboard and how to train the winner."""
    from ..io.config_files import apply_config_file, read_config_file
    from ..io.search_space import read_search_space
    from ..present.tables import format_leaderboard

    base = TrainConfig.new_run(args.preset)
    if args.config is not None:
        base = base.replace(**apply_config_file(base, read_config_file(args.config), args.config))
    if args.dataset is not None:
        base = base.replace(dataset=args.dataset)
    space = read_search_space(args.space, base)
    settings = SearchSettings(trials=args.trials, max_epochs=args.max_epochs, grace_epochs=args.grace_epochs,
                              reduction_factor=args.reduction_factor, members_per_trial=args.members_per_trial,
                              concurrent=args.concurrent, seed=args.search_seed)
    if args.final_members is not None and args.final_members < 1:
        raise ConfigError(f"--final-members must be >= 1, got {args.final_members}")
    options = TrainOptions(verbose=0, tracking=tracking_from_args(args),
                           scaleout=ScaleOutConfig(ray_address=args.ray, threads=args.threads,
                                                   max_retries=args.max_retries))
    source = DataSource(data_dir=args.data_dir, mirror=args.mirror, download=args.download)
    from ..training.search import run_search, train_winner

    board = run_search(base, space, args.search_dir, settings, source, options)
    if args.json:
        print(json.dumps(board.to_json(), indent=2))
    else:
        print(format_leaderboard(board))
    if args.final_members is not None:
        from ..present.tables import format_results

        trained = train_winner(args.search_dir, base, settings, board, args.final_members, source,
                               dataclasses.replace(options, scaleout=ScaleOutConfig(threads=args.threads)))
        if not args.json:
            print(f"\nthe winner, {board.best.name}'s settings with {args.final_members} members "
                  f"(run directory {trained.run}):\n{format_results(trained.errors)}")
    elif board.best is not None and not args.json:
        data = f" --data-dir {args.data_dir}" if args.data_dir is not None else ""
        print(f"\nbest settings: {args.search_dir / 'best.toml'}\ntrain the winner: emnist-cnn train --run-dir "
              f"RUN --config {args.search_dir / 'best.toml'}{data} (or tune again with --final-members N)")
    return 0
