"""Live tracking: TensorBoard event files (always) and an MLflow run (on request), caught up from the run directory.

The run directory stays the record. `Tracker.sync` reads what it holds (each
member's history up to its saved state, errors.csv, the ensemble's mistakes)
and sends each sink only what that sink has not received yet, so one call
serves a new run, a resumed one, the Ray driver and `emnist-cnn track` after
the fact. A sink that fails (a server outage, a full disk) costs one warning
line: training goes on, and a later call sends what was missed.

What appears where (a TensorBoard run is a folder under RUN/tensorboard/;
an MLflow metric key is folder/tag; the step is the epoch):

    dropout_0.2/model_0    epoch/loss, epoch/accuracy, epoch/val_loss, epoch/val_error (%),
                           epoch/learning_rate, epoch/seconds; checkpoint/val_error, checkpoint/test_error (%)
    dropout_0.2/ensemble   checkpoint/val_error, checkpoint/test_error (%); TensorBoard only, per checkpoint:
                           images/augmentation, images/misclassified_val, images/misclassified_test
"""

from __future__ import annotations

import io
import logging
import math
import os
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import IMAGE_SIDE, RESUMABLE_CHANGES, TrackingConfig, TrainConfig
from ..core.augment import augment_batch
from ..errors import ConfigError, DataError, RunDirError, format_one_line
from ..io.files import LockBusyError
from ..io.rundir import RunDir, dropout_dirname
from .prepare import PreparedData, load_run_data

__all__ = ["Point", "member_writer", "ensemble_writer", "collect_epoch_points", "collect_checkpoint_points",
           "build_checkpoint_images", "find_local_artifact_root", "import_mlflow", "Tracker", "log_run_artifacts",
           "log_export", "track_run", "open_search_run", "close_search_run"]

log = logging.getLogger(__name__)

# (tag, history column): what each member's epoch sends; val_error is 100 * (1 - val_accuracy).
EPOCH_TAGS = (("epoch/loss", "loss"), ("epoch/accuracy", "accuracy"), ("epoch/val_loss", "val_loss"),
              ("epoch/val_error", "val_accuracy"), ("epoch/learning_rate", "learning_rate"),
              ("epoch/seconds", "seconds"))
IMAGE_TAGS = ("images/augmentation", "images/misclassified_val", "images/misclassified_test")
MLFLOW_BATCH = 1000  # metrics per log_batch request: MLflow's limit


@dataclass(frozen=True)
class Point:
    """One scalar: `tag` of TensorBoard run `writer` at `step` (an epoch)."""

    writer: str
    tag: str
    step: int
    value: float

    @property
    def key(self) -> str:
        """The MLflow metric key."""
        return f"{self.writer}/{self.tag}"


def member_writer(dropout: float, index: int) -> str:
    return f"{dropout_dirname(dropout)}/model_{index}"


def ensemble_writer(dropout: float) -> str:
    return f"{dropout_dirname(dropout)}/ensemble"


def collect_epoch_points(run: RunDir, dropout: float, index: int) -> list[Point]:
    """Every recorded epoch of one member, up to its saved state (a row past it is trained again)."""
    last = run.state_epoch(dropout, index)
    writer = member_writer(dropout, index)
    out = []
    for row in run.read_history_rows(dropout, index):
        try:
            epoch = int(row["epoch"])
            if epoch > last:
                continue
            for tag, column in EPOCH_TAGS:
                value = float(row[column])
                if column == "val_accuracy":
                    value = 100.0 * (1.0 - value)
                if math.isfinite(value):
                    out.append(Point(writer, tag, epoch, value))
        except (KeyError, TypeError, ValueError) as exc:
            raise RunDirError(f"{run.history_path(dropout, index)}: malformed row ({exc})") from exc
    return out


def collect_checkpoint_points(run: RunDir, dropout: float) -> list[Point]:
    """Every member's and the ensemble's recorded checkpoint errors (%), validation and test."""
    return [Point(ensemble_writer(dropout) if r.is_ensemble else member_writer(dropout, int(r.model)),
                  f"checkpoint/{r.split}_error", r.epoch, r.rate.pct) for r in run.read_errors(dropout)]


def build_checkpoint_images(run: RunDir, config: TrainConfig, data: PreparedData, dropout: float,
                            epoch: int) -> dict[str, np.ndarray]:
    """The ensemble's image grids at a checkpoint, uint8 (H, W): tag -> image.

    augmentation: 8 training images (left column) and 7 warps of each, drawn for this checkpoint;
    misclassified_val / _test: up to 64 of the ensemble's mistakes, captioned label>predicted.
    """
    import keras  # deferred: the backend is slow to import

    rng = np.random.default_rng([config.seed, 11, epoch])
    originals = data.x_train[np.sort(rng.choice(len(data.y_train), 8, replace=False))]
    warped = keras.ops.convert_to_numpy(augment_batch(np.repeat(originals, 7, axis=0), rng, config.augment))
    warped = np.clip(np.round(warped[..., 0] * 255.0), 0, 255).astype(np.uint8).reshape(8, 7, IMAGE_SIDE, IMAGE_SIDE)
    rows = np.concatenate([originals[:, None], warped], axis=1).reshape(64, IMAGE_SIDE, IMAGE_SIDE)
    images = {"images/augmentation": _tile(rows, columns=8)}
    for split, x in (("val", data.x_val), ("test", data.x_test)):
        wrong = run.read_checkpoint_misclassified(dropout, epoch, split)[:64]
        if wrong and len(x):
            captions = [f"{data.classes[m.label]}>{data.classes[m.predicted]}" for m in wrong]
            images[f"images/misclassified_{split}"] = _tile(x[[m.index for m in wrong]], columns=8,
                                                             captions=captions)
    return images


def _tile(images: np.ndarray, columns: int, captions: list[str] | None = None, scale: int = 2) -> np.ndarray:
    """uint8 (N, 28, 28) images in a grid, each scaled `scale` times, with an optional caption under each."""
    from PIL import Image, ImageDraw

    n, h, w = images.shape
    cap = 12 if captions else 0
    cell_h, cell_w = h * scale + cap, w * scale
    rows = math.ceil(n / columns)
    grid = Image.new("L", (columns * cell_w, rows * cell_h), 0)
    draw = ImageDraw.Draw(grid)
    for k in range(n):
        r, c = divmod(k, columns)
        tile = Image.fromarray(images[k]).resize((w * scale, h * scale), Image.NEAREST)
        grid.paste(tile, (c * cell_w, r * cell_h))
        if captions:
            draw.text((c * cell_w + 2, r * cell_h + h * scale), captions[k], fill=255)
    return np.asarray(grid)


def _encode_png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


class _TensorBoardSink:
    """Event files under RUN/tensorboard/, one folder per member and per ensemble.

    What they already hold is read back once, with TensorBoard's own loader, so
    a resumed run writes each step once. Only one process writes them at a time:
    the one holding the run's lock.
    """

    name = "tensorboard"

    def __init__(self, root: Path):
        self.root = root
        self.writers: dict = {}
        self.sent: dict[tuple[str, str], int] = {}
        if root.is_dir():
            from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

            for path in sorted(root.rglob("events.out.tfevents.*")):
                writer = path.parent.relative_to(root).as_posix()
                for event in LegacyEventFileLoader(str(path)).Load():
                    for value in event.summary.value:
                        key = (writer, value.tag)
                        self.sent[key] = max(self.sent.get(key, 0), int(event.step))

    def needs(self, writer: str, tag: str, step: int) -> bool:
        return step > self.sent.get((writer, tag), 0)

    def send(self, points: list[Point], images: list[tuple[str, str, int, np.ndarray]]) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2

        now = time.time()
        touched = set()
        for p in points:
            value = summary_pb2.Summary.Value(tag=p.tag, simple_value=p.value)
            self._writer(p.writer).add_event(event_pb2.Event(wall_time=now, step=p.step,
                                                             summary=summary_pb2.Summary(value=[value])))
            touched.add(p.writer)
        for writer, tag, step, image in images:
            png = summary_pb2.Summary.Image(height=image.shape[0], width=image.shape[1], colorspace=1,
                                            encoded_image_string=_encode_png(image))
            self._writer(writer).add_event(event_pb2.Event(
                wall_time=now, step=step, summary=summary_pb2.Summary(value=[summary_pb2.Summary.Value(
                    tag=tag, image=png)])))
            touched.add(writer)
        for writer in touched:
            self.writers[writer].flush()
        for p in points:
            self.sent[(p.writer, p.tag)] = max(self.sent.get((p.writer, p.tag), 0), p.step)
        for writer, tag, step, _ in images:
            self.sent[(writer, tag)] = max(self.sent.get((writer, tag), 0), step)

    def _writer(self, writer: str):
        if writer not in self.writers:
            from tensorboard.summary.writer.event_file_writer import EventFileWriter

            self.writers[writer] = EventFileWriter(str(self.root / writer))
        return self.writers[writer]

    def close(self, status: str | None) -> None:
        for w in self.writers.values():
            w.close()
        self.writers.clear()


def import_mlflow():
    """The mlflow module, or one clear error when the `mlflow` extra is not installed."""
    try:
        import mlflow
    except ImportError as exc:
        raise ConfigError("--mlflow needs MLflow, which is not installed: pip install 'emnist-cnn[mlflow]'") from exc
    return mlflow


def find_local_artifact_root(uri: str) -> str | None:
    """Where a new experiment in a local sqlite store keeps its files: `mlartifacts/` beside the database file
    (MLflow's own default is ./mlruns, in whatever folder the command runs in). None for any other store."""
    if not uri.lower().startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()


def _configure_mlflow_client(tracking: TrackingConfig) -> None:
    """MLflow's client settings for this process, once: bounded requests, no links on stdout, quiet loggers."""
    import_mlflow()
    # Bounded requests: an outage must cost seconds, not the client's default minutes of retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, math.ceil(tracking.request_timeout))))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    # Closing a run prints "View run ..." links to stdout, where `export` prints its own result.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    for name in ("mlflow", "alembic"):  # their INFO lines (store migrations, links) would interleave with ours
        logging.getLogger(name).setLevel(logging.WARNING)


def _find_or_create_experiment(client, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    return exp.experiment_id if exp is not None else client.create_experiment(
        name, artifact_location=find_local_artifact_root(uri))


class _MlflowSink:
    """One MLflow run per run directory, found again through RUN/tracking/mlflow.json.

    The record keeps, per tracking URI, the run's id and the last step sent of
    every metric. A batch is written there as pending before it is sent; a
    process that finds one pending (killed mid-send, or a request that timed
    out after the server stored it) asks the server which of its points
    arrived and sends only the others.
    """

    name = "mlflow"

    def __init__(self, run: RunDir, config: TrainConfig, tracking: TrackingConfig, training: bool):
        _configure_mlflow_client(tracking)
        self.run, self.config, self.tracking = run, config, tracking
        self.uri = tracking.mlflow_uri
        self.client = None  # made on first use: a store MLflow refuses is an outage like any other
        self.state: dict = {}
        self.opened = False  # params and tags logged by this process
        self.training = training  # this process trains the run: its MLflow run is RUNNING until it ends

    def load(self) -> None:
        self.state = self.run.read_tracking(self.name).get(self.uri, {})
        self.state.setdefault("sent", {})

    def _save(self) -> None:
        record = self.run.read_tracking(self.name)
        record[self.uri] = self.state
        self.run.write_tracking(self.name, record)

    @property
    def run_id(self) -> str | None:
        return self.state.get("run_id")

    def open(self) -> None:
        """Find or create the MLflow run, log the config as parameters (once per process)."""
        from mlflow.entities import Param, RunTag
        from mlflow.tracking import MlflowClient

        if self.client is None:
            self.client = MlflowClient(tracking_uri=self.uri)

        if self.run_id is None:
            if "run_key" not in self.state:
                self.state["run_key"] = uuid.uuid4().hex
                self._save()
            name = self.tracking.mlflow_experiment
            exp_id = _find_or_create_experiment(self.client, name, self.uri)
            # Created but not recorded (killed in between): found again by its key, not created twice.
            found = self.client.search_runs([exp_id], f"tags.`emnist_cnn.run_key` = '{self.state['run_key']}'",
                                            max_results=1)
            if found:
                run_id = found[0].info.run_id
            else:
                tags = {"emnist_cnn.run_key": self.state["run_key"], "emnist_cnn.run_dir": str(self.run.path.resolve())}
                if self.tracking.parent_run_id is not None:  # MLflow's own tag for a nested run
                    tags["mlflow.parentRunId"] = self.tracking.parent_run_id
                run_id = self.client.create_run(exp_id, run_name=self.run.path.name, tags=tags).info.run_id
            self.state.update(run_id=run_id, experiment_id=exp_id)
            self._save()
            log.info("mlflow: logging into run %s of experiment %r at %s", run_id, name, self.uri)
        if not self.opened:
            settings = _flatten(self.config.to_dict())
            params = [Param(k, v) for k, v in settings.items() if k not in RESUMABLE_CHANGES]
            tags = [RunTag(k, settings[k]) for k in RESUMABLE_CHANGES]
            self.client.log_batch(self.run_id, params=params, tags=tags)
            if self.training:
                self.client.update_run(self.run_id, status="RUNNING")
            self.opened = True

    def needs(self, writer: str, tag: str, step: int) -> bool:
        return step > self.state.get("sent", {}).get(f"{writer}/{tag}", 0)

    def send(self, points: list[Point], images) -> None:
        from mlflow.entities import Metric

        for k in range(0, len(points), MLFLOW_BATCH):
            chunk = points[k:k + MLFLOW_BATCH]
            ms = int(time.time() * 1000)
            self.state["pending"] = [[p.key, p.step, p.value, ms] for p in chunk]
            self._save()
            self.client.log_batch(self.run_id, metrics=[Metric(p.key, p.value, ms, p.step) for p in chunk])
            self._mark_sent(self.state.pop("pending"))
            self._save()

    def settle_pending(self) -> None:
        """Send what of an interrupted batch the server lacks, then count the batch as sent."""
        from mlflow.entities import Metric

        pending = self.state.get("pending")
        if not pending:
            return
        have = {(m.key, m.step) for key in {p[0] for p in pending}
                for m in self.client.get_metric_history(self.run_id, key)}
        missing = [p for p in pending if (p[0], p[1]) not in have]
        if missing:
            self.client.log_batch(self.run_id, metrics=[Metric(key, value, ms, step)
                                                        for key, step, value, ms in missing])
        self._mark_sent(self.state.pop("pending"))
        self._save()

    def _mark_sent(self, pending: list) -> None:
        sent = self.state.setdefault("sent", {})
        for key, step, _, _ in pending:
            sent[key] = max(sent.get(key, 0), step)

    def log_artifacts(self, paths: list[Path], artifact_path: str | None) -> None:
        timeout = os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"]
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(120, int(timeout)))  # files take longer than metrics
        try:
            for path in paths:
                if path.is_dir():
                    self.client.log_artifacts(self.run_id, str(path), "/".join(filter(None, [artifact_path,
                                                                                             path.name])))
                else:
                    self.client.log_artifact(self.run_id, str(path), artifact_path)
        finally:
            os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = timeout

    def close(self, status: str | None) -> None:
        if status is not None and self.training and self.run_id is not None and self.opened:
            self.client.set_terminated(self.run_id, status)

    def mark(self, status: str) -> None:
        """End an MLflow run left RUNNING (or SCHEDULED) with `status`, from outside a training process
        (`track`); a run that ended FINISHED, KILLED or FAILED keeps what its process said."""
        if self.client.get_run(self.run_id).info.status in ("RUNNING", "SCHEDULED"):
            self.client.set_terminated(self.run_id, status)


def _flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)
    return out


class Tracker:
    """Sends a run's records to TensorBoard (and MLflow when asked), catching up on what each sink lacks.

    `data` (the run's prepared data) is needed for TensorBoard's images only;
    without it they are skipped. `training`: this process trains the run, so
    its MLflow run is marked running, and `close` marks how it ended.
    """

    def __init__(self, run: RunDir, config: TrainConfig, tracking: TrackingConfig,
                 data: PreparedData | None = None, *, tensorboard: bool | None = None, training: bool = False):
        self.run, self.config, self.tracking, self.data = run, config, tracking, data
        self.sinks: list = []
        if tracking.tensorboard if tensorboard is None else tensorboard:
            self.sinks.append(_TensorBoardSink(run.tensorboard_dir))
        if tracking.mlflow_uri is not None:
            self.sinks.append(_MlflowSink(run, config, tracking, training))
        self.retry_at: dict[str, float] = {}  # sink name -> when to try again after a failure
        self.failed: dict[str, str] = {}  # sink name -> its error, while it fails
        # Seconds per call, by what was synced ("epoch", "checkpoint", "all") and per sink.
        self.timings: dict[str, list[float]] = {}
        self.sink_seconds: dict[str, float] = {s.name: 0.0 for s in self.sinks}

    @property
    def mlflow_run_id(self) -> str | None:
        return next((s.run_id for s in self.sinks if s.name == "mlflow"), None)

    def sync(self, members: list[tuple[float, int]] | None = None, dropouts: list[float] | None = None,
             *, force: bool = False) -> None:
        """Send what the run records and a sink lacks: these members' epochs and these dropout rates'
        checkpoints; with neither given, everything. `force` retries a failed sink at once."""
        if not self.sinks:
            return
        t0 = time.perf_counter()
        kind = "all" if members is None and dropouts is None else "checkpoint" if members is None else "epoch"
        if members is None and dropouts is None:
            members = [(d, i) for d in self.config.dropouts for i in range(self.config.models)]
            dropouts = list(self.config.dropouts)
        try:
            points = [p for d, i in members or () for p in collect_epoch_points(self.run, d, i)]
            points += [p for d in dropouts or () for p in collect_checkpoint_points(self.run, d)]
        except RunDirError as exc:
            # Training decides what an unreadable record means; tracking only reports it.
            log.warning("tracking: skipped (%s)", exc)
            return
        for sink in self.sinks:
            if not force and time.monotonic() < self.retry_at.get(sink.name, 0.0):
                continue
            t1 = time.perf_counter()
            self._sync_sink(sink, points, dropouts or [])
            self.sink_seconds[sink.name] += time.perf_counter() - t1
        self.timings.setdefault(kind, []).append(time.perf_counter() - t0)

    @property
    def seconds(self) -> float:
        """Time spent in `sync` so far (reading the run's records and sending them)."""
        return sum(sum(v) for v in self.timings.values())

    def _sync_sink(self, sink, points: list[Point], dropouts: list[float]) -> None:
        try:
            if sink.name == "mlflow":
                with self.run.tracking_lock(sink.name, timeout=self.tracking.request_timeout):
                    sink.load()
                    sink.open()
                    sink.settle_pending()  # before choosing what to send: it may hold some of it
                    todo = [p for p in points if sink.needs(p.writer, p.tag, p.step)]
                    if todo:
                        sink.send(todo, [])
            else:
                todo = [p for p in points if sink.needs(p.writer, p.tag, p.step)]
                images = self._pending_images(sink, dropouts)
                if todo or images:
                    sink.send(todo, images)
        except Exception as exc:  # noqa: BLE001  (an outage must not stop training)
            self._report_failure(sink, exc)
            return
        if sink.name in self.failed:
            del self.failed[sink.name]
            log.info("%s: reachable again; the epochs it missed are sent", self._label(sink))
        self.retry_at.pop(sink.name, None)

    def _pending_images(self, sink, dropouts: list[float]) -> list[tuple[str, str, int, np.ndarray]]:
        if self.data is None:
            return []
        out = []
        for d in dropouts:
            writer = ensemble_writer(d)
            for epoch in sorted(self.run.evaluated_epochs(d)):
                if sink.needs(writer, IMAGE_TAGS[0], epoch):
                    images = build_checkpoint_images(self.run, self.config, self.data, d, epoch)
                    out += [(writer, tag, epoch, image) for tag, image in images.items()]
        return out

    def _label(self, sink) -> str:
        return f"mlflow {sink.uri}" if sink.name == "mlflow" else f"tensorboard {self.run.tensorboard_dir}"

    def _report_failure(self, sink, exc: BaseException) -> None:
        self.retry_at[sink.name] = time.monotonic() + self.tracking.retry_after
        reported = sink.name in self.failed
        self.failed[sink.name] = format_one_line(exc, 200)
        if reported:
            log.debug("%s: still failing (%s)", self._label(sink), format_one_line(exc))
            return
        log.warning("%s: tracking failed (%s); training goes on, and what it misses is sent once it works again",
                    self._label(sink), format_one_line(exc, 200))

    def log_artifacts(self, paths: list[Path], artifact_path: str | None = None) -> None:
        """Upload files (or folders) to the MLflow run, if there is one; a failure is one warning."""
        self._call_mlflow(lambda sink: sink.log_artifacts([Path(p) for p in paths], artifact_path))

    def mark_mlflow_run(self, status: str) -> None:
        """End the MLflow run with `status` (FINISHED, KILLED) if it is still marked running; call it holding
        the run's lock, so that no process trains it. A failure is one warning."""
        self._call_mlflow(lambda sink: sink.mark(status))

    def _call_mlflow(self, action) -> None:
        """`action(sink)` on the opened MLflow sink, if there is one, holding its tracking lock."""
        for sink in self.sinks:
            if sink.name != "mlflow":
                continue
            try:
                with self.run.tracking_lock(sink.name, timeout=self.tracking.request_timeout):
                    sink.load()
                    sink.open()
                    action(sink)
            except Exception as exc:  # noqa: BLE001
                self._report_failure(sink, exc)

    def close(self, status: str | None = "FINISHED") -> None:
        """A last attempt at whatever is unsent, then close the writers and mark the MLflow run `status`
        (None: leave it as it is)."""
        self.sync(force=True)
        for sink in self.sinks:
            try:
                sink.close(status)
            except Exception as exc:  # noqa: BLE001
                self._report_failure(sink, exc)
        if self.sinks:
            per_kind = ", ".join(f"{k} {len(v)} x {1000 * sum(v) / len(v):.0f} ms" for k, v in self.timings.items())
            log.info("tracking: %.2f s in all (%s)", self.seconds, per_kind,
                     extra={"timings": self.timings, "sink_seconds": self.sink_seconds})


def _artifact_paths(run: RunDir) -> list[Path]:
    return [p for p in (run.config_path, run.plots_dir, run.report_path) if p.exists()]


def log_run_artifacts(run_dir, tracking: TrackingConfig) -> None:
    """Upload config.json, the plots and report.html to the run's MLflow run (one warning if that fails)."""
    run = RunDir.of(run_dir)
    tracker = Tracker(run, run.read_config(), tracking, tensorboard=False)
    tracker.log_artifacts(_artifact_paths(run))


def track_run(run_dir, tracking: TrackingConfig, *, data_dir=None) -> list[str]:
    """Send everything a run records that its sinks lack: TensorBoard (unless a process is training the
    run, which writes them itself) and MLflow when configured. Returns one line per sink.

    An MLflow run still marked running with no process training the run is marked FINISHED when every member
    has reached the run's epochs, else KILLED (stopped early): never RUNNING without a process behind it."""
    run = RunDir.of(run_dir)
    config = run.read_config()
    lines = []
    try:
        with run.lock():
            try:
                _, data = load_run_data(run, data_dir)
            except DataError as exc:
                data = None
                log.warning("tensorboard: image grids skipped, the run's data is not readable (%s)", exc)
            tracker = Tracker(run, config, TrackingConfig(), data)
            tracker.sync(force=True)
            tracker.close(None)
            lines.append(f"tensorboard: {run.tensorboard_dir} (view: tensorboard --logdir {run.path})")
    except LockBusyError:
        lines.append("tensorboard: left to the process training this run, which writes it")
    if tracking.mlflow_uri is not None:
        tracker = Tracker(run, config, tracking, tensorboard=False)
        tracker.sync(force=True)
        if "mlflow" not in tracker.failed:
            tracker.log_artifacts(_artifact_paths(run))
        if "mlflow" not in tracker.failed:
            try:
                with run.lock():
                    done = all(run.state_epoch(d, i) >= config.epochs
                               for d in config.dropouts for i in range(config.models))
                    tracker.mark_mlflow_run("FINISHED" if done else "KILLED")
            except LockBusyError:
                pass  # a process trains the run: it sets the status itself
        if "mlflow" in tracker.failed:
            raise RunDirError(f"--mlflow {tracking.mlflow_uri}: {tracker.failed['mlflow']}")
        lines.append(f"mlflow: run {tracker.mlflow_run_id} in experiment {tracking.mlflow_experiment!r} at "
                     f"{tracking.mlflow_uri}")
    return lines


def log_export(run_dir, tracking: TrackingConfig, out_dir, meta: dict) -> str:
    """Log an export into the run's MLflow run: its folder (metadata.json included) as files under its own
    name, and its model.keras as an MLflow Keras model under model/. Returns the model's URI (runs:/ID/model)."""
    import keras  # deferred: the backend is slow to import

    import_mlflow()
    import mlflow.keras

    from ..io.rundir import collect_versions

    run, out_dir = RunDir.of(run_dir), Path(out_dir)
    tracker = Tracker(run, run.read_config(), tracking, tensorboard=False)
    model = keras.saving.load_model(out_dir / "model.keras")
    versions = collect_versions(threads=False)
    backend = versions["backend"]
    requirements = [f"keras=={keras.__version__}"] + ([f"{backend}=={versions[backend]}"] if backend in versions
                                                      else [])
    with tempfile.TemporaryDirectory(prefix="emnist-cnn-mlflow-") as tmp:
        mlflow.keras.save_model(model, str(Path(tmp) / "model"), pip_requirements=requirements,
                                metadata={"emnist_cnn": {k: meta[k] for k in ("dropout", "epoch", "model", "members",
                                                                              "validation_error", "test_error")
                                                         if k in meta}})
        tracker.log_artifacts([out_dir, Path(tmp) / "model"])
    if "mlflow" in tracker.failed:
        raise RunDirError(f"--mlflow {tracking.mlflow_uri}: {tracker.failed['mlflow']}")
    return f"runs:/{tracker.mlflow_run_id}/model"


def open_search_run(search_dir, tracking: TrackingConfig, run_id: str | None) -> str | None:
    """The MLflow run of a search, the parent of its trials' runs: `run_id` when the search has one, else a new
    run named after the search directory. Returns its id, or None (one warning) when MLflow cannot be reached:
    the search goes on, its trials log without a parent."""
    _configure_mlflow_client(tracking)
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(tracking_uri=tracking.mlflow_uri)
        if run_id is None:
            exp_id = _find_or_create_experiment(client, tracking.mlflow_experiment, tracking.mlflow_uri)
            run_id = client.create_run(exp_id, run_name=Path(search_dir).name, tags={
                "emnist_cnn.search_dir": str(Path(search_dir).resolve())}).info.run_id
            log.info("mlflow: the search logs into run %s of experiment %r at %s", run_id,
                     tracking.mlflow_experiment, tracking.mlflow_uri)
        client.update_run(run_id, status="RUNNING")
        return run_id
    except Exception as exc:  # an outage or a store that refuses: tracking never stops a search
        log.warning("mlflow: %s unreachable (%s); the trials log without a parent run", tracking.mlflow_uri,
                    format_one_line(exc))
        return None


def close_search_run(tracking: TrackingConfig, run_id: str, best_val_pct: float | None, files: list[Path],
                     status: str = "FINISHED") -> None:
    """The search's leaderboard and best.toml as artifacts, the best validation error as a metric, its status;
    one warning when MLflow cannot be reached."""
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(tracking_uri=tracking.mlflow_uri)
        if best_val_pct is not None:
            client.log_metric(run_id, "best_val_error_pct", best_val_pct)
        for path in files:
            if path.is_file():
                client.log_artifact(run_id, str(path))
        client.update_run(run_id, status=status)
    except Exception as exc:
        log.warning("mlflow: could not close the search's run %s (%s)", run_id, format_one_line(exc))
