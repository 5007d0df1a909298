"""A run's members trained as Ray tasks, on this machine or across a cluster: one task per member segment.

The driver (the `emnist-cnn` process) holds the run's lock, writes config.json,
invocations.jsonl, errors.csv and the text tables, and puts the prepared data
into Ray's object store once. Each task opens a member (or, fused, a dropout
rate's members) from its state file, trains to the next checkpoint epoch with
the same steps as the local loop (`open_member`, `train_members_to`) and
returns. A retried task is a resume: it continues from the last finished epoch.
When every member of a dropout rate has a checkpoint, one task per dropout rate
at a time evaluates it (`evaluate_checkpoint`) and the driver records it.

The run directory must be one absolute path on a filesystem every node mounts
at that path (atomic rename, fsync and flock are relied on).
"""

from __future__ import annotations

import errno
import logging
import os
import time
from pathlib import Path

from ..config import DataSource, ScaleOutConfig, TrainConfig, TrainOptions
from ..errors import ConfigError, EmnistCnnError, RunDirError, format_one_line
from ..io.files import LockBusyError
from ..io.rundir import ErrorRecord, RunDir, format_utc_now
from ..io.state import read_state_epoch
from .device import DEVICES, JIT_COMPILE, describe_runtime
from .members import TrainContext, open_member, resolve_fused, sample_calibration_images, train_members_to
from .prepare import PreparedData
from .session import (Session, TrainedRun, check_compatible, configure_process, load_training_data, log_checkpoint,
                      open_session)
from .threads import build_thread_env, configure_threads
from .train import evaluate_checkpoint, find_last_errors, record_checkpoint

__all__ = ["TransientStorageError", "build_gpu_memory_env", "check_run_dir_shared", "check_ray_device", "import_ray",
           "init_ray",
           "train_segment", "evaluate_segment", "find_ready_evaluations", "resolve_ray_fused", "train_ensembles_on_ray",
           "train_and_evaluate_on_ray"]

log = logging.getLogger(__name__)

# Errors of a shared filesystem that a second attempt can outlive (an NFS server restart, a stale handle).
TRANSIENT_ERRNOS = frozenset({errno.EIO, errno.ESTALE, errno.ETIMEDOUT, errno.EAGAIN, errno.EBUSY, errno.EINTR})

# Environment a task needs to give the bits the driver's machine would: backend, oneDNN, determinism.
_PASSED_ENV = ("KERAS_BACKEND", "TF_ENABLE_ONEDNN_OPTS", "TF_DETERMINISTIC_OPS", "TF_CPP_MIN_LOG_LEVEL",
               "PYTHONPATH")


def build_gpu_memory_env(gpus_per_member: float, backend: str) -> dict[str, str]:
    """A Ray worker's environment for its share of a GPU. JAX reserves 75% of a GPU when it starts, so two
    tasks sharing one would run out: under JAX, no preallocation, and the task's share as its limit.
    (TensorFlow's memory grows as needed, see `training.device.configure_device`.)"""
    if backend != "jax" or gpus_per_member <= 0:
        return {}
    share = f"{min(gpus_per_member, 1.0):.3f}"
    # XLA_CLIENT_MEM_FRACTION is the newer name; releases before it read only the older one.
    return {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "XLA_PYTHON_CLIENT_MEM_FRACTION": share,
            "XLA_CLIENT_MEM_FRACTION": share}


class TransientStorageError(RunDirError):
    """A run-directory failure worth another attempt (Ray retries only these, besides dead workers and nodes)."""


def check_run_dir_shared(run_dir) -> Path:
    """The run directory as every node must see it: an absolute path (a relative one would land in each
    worker's own working directory)."""
    path = Path(run_dir)
    if not path.is_absolute():
        raise ConfigError(f"--run-dir {run_dir} must be an absolute path with --ray, on a filesystem every node "
                          f"mounts at the same path (e.g. --run-dir {Path(run_dir).absolute()})")
    return path


def check_ray_device(device: str, jit_compile: str, scaleout: ScaleOutConfig) -> None:
    """`--device` and `--jit-compile` values, and `--device gpu` only with GPUs reserved per task: Ray hides
    every GPU from a task that reserves none (CUDA_VISIBLE_DEVICES is empty there)."""
    if device not in DEVICES:
        raise ConfigError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    if jit_compile not in JIT_COMPILE:
        raise ConfigError(f"--jit-compile must be one of {', '.join(JIT_COMPILE)}, got {jit_compile!r}")
    if device == "gpu" and not scaleout.gpus_per_member:
        raise ConfigError("--device gpu with --ray needs --gpus-per-member above 0: Ray hides the GPUs from "
                          "tasks that reserve none")


def import_ray(what: str = "--ray"):
    """The ray module, or one clear error naming `what` needs it when the `ray` extra is not installed."""
    try:
        import ray
    except ImportError as exc:
        raise ConfigError(f"{what} needs Ray, which is not installed: pip install 'emnist-cnn[ray]'") from exc
    return ray


def _raise_transient_or_original(exc: BaseException) -> None:
    """Re-raise `exc` as TransientStorageError when an OSError a retry can outlive caused it."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, LockBusyError) or (isinstance(cause, OSError) and cause.errno in TRANSIENT_ERRNOS):
            raise TransientStorageError(str(exc)) from exc
        cause = cause.__cause__
    raise exc


def _node_label() -> str:
    import ray

    ctx = ray.get_runtime_context()
    return f"{ray.util.get_node_ip_address()}/{ctx.get_node_id()[:8]}"


def train_segment(run_dir: str, config: TrainConfig, data: PreparedData, dropout: float, indices: tuple[int, ...],
                  target: int, fused: bool, options: TrainOptions) -> dict:
    """A Ray task: train these members of one dropout rate from their states to epoch `target`, on this
    worker's device as the options' device, XLA and steps per call decide here.

    Holds the members' lock while it trains, so that a stale attempt (on a node cut off from the
    cluster) and its retry never write at once. Returns what the driver prints.
    """
    t0 = time.perf_counter()
    run = RunDir.of(run_dir)
    node = _node_label()
    fixed_lr = options.fixed_lr
    try:
        # `--device gpu` on a worker without one: a final failure, in one line.
        configure_process(options, options.scaleout.task_threads)
        runtime = describe_runtime(options.jit_compile, fused, config.model.precision, options.steps_per_call)
        from ..core.model import use_jit_compile  # deferred: imports the backend, after configure_device

        use_jit_compile(runtime["xla"])
        with run.member_lock(dropout, indices, options.scaleout.lock_timeout):
            start = {i: read_state_epoch(run.state_path(dropout, i)) for i in indices}
            attempts = []
            for i in indices:
                previous = [s for s in run.read_segments(dropout, i) if s.get("target") == target]
                attempts.append(len(previous) + 1)
                run.append_segment(dropout, i, {"target": target, "from": start[i], "node": node,
                                                "pid": os.getpid(), "device": runtime["device"],
                                                "xla": runtime["xla"], "steps_per_call": runtime["steps_per_call"],
                                                "started": format_utc_now()})
            members = [open_member(run, config, data, dropout, i, fixed_lr) for i in indices]
            ctx = TrainContext(run, config, data, sample_calibration_images(config, data), verbose=0, fused=fused,
                               fixed_lr=fixed_lr, jit_compile=runtime["xla"],
                               steps_per_call=runtime["steps_per_call"], loop=runtime["loop"])
            train_members_to(members, target, ctx)
    except Exception as exc:  # noqa: BLE001  (sorted into retried and final failures)
        _raise_transient_or_original(exc)
    val = {}
    for m in members:
        rows = [r for r in m.history if int(r["epoch"]) == target]
        val[m.index] = 100 * (1 - float(rows[0]["val_accuracy"])) if rows and rows[0]["val_accuracy"] != "nan" \
            else None
    return {"dropout": dropout, "indices": list(indices), "from": start, "target": target, "val_error": val,
            "seconds": time.perf_counter() - t0, "node": node, "attempt": max(attempts)}


def evaluate_segment(run_dir: str, config: TrainConfig, data: PreparedData, dropout: float, epoch: int,
                     options: TrainOptions) -> list[ErrorRecord]:
    """A Ray task: every member's and the ensemble's errors at one checkpoint, from the checkpoint files."""
    try:
        configure_process(options, options.scaleout.task_threads)
        from ..core.model import use_jit_compile  # deferred: imports the backend, after configure_device

        use_jit_compile(describe_runtime(options.jit_compile, False, config.model.precision)["xla"])
        return evaluate_checkpoint(RunDir.of(run_dir), config, data, dropout, epoch)
    except Exception as exc:  # noqa: BLE001
        _raise_transient_or_original(exc)


def init_ray(ray, scaleout: ScaleOutConfig) -> None:
    """Start or join the Ray cluster `scaleout` names, its workers started with this process's backend settings
    and `scaleout.task_threads` threads; one RunDirError when it cannot connect."""
    env = {k: os.environ[k] for k in _PASSED_ENV if k in os.environ}
    env.update(build_thread_env(scaleout.task_threads))
    env.update(build_gpu_memory_env(scaleout.gpus_per_member, env.get("KERAS_BACKEND", "tensorflow")))
    kwargs = dict(runtime_env={"env_vars": env}, log_to_driver=False, logging_level=logging.WARNING)
    address = scaleout.ray_address
    try:
        if address == "local":  # a new instance of our own: Ray's default joins any cluster already running here
            ray.init(address="local", include_dashboard=False, **kwargs)
        else:
            ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise RunDirError(f"--ray {address}: cannot connect to the Ray cluster ({format_one_line(exc)})") from exc


def find_ready_evaluations(run: RunDir, config: TrainConfig, evaluated: dict[float, set[int]],
                           evaluating: set[float]) -> list[tuple[float, int]]:
    """The ensemble evaluations the driver may start, as (dropout, epoch): for each rate with none in flight,
    its first checkpoint not yet evaluated whose every member has its weights file (written atomically, so
    a member still training to it has none)."""
    ready = []
    for d in config.dropouts:
        if d in evaluating:
            continue
        for c in config.checkpoint_epochs():
            if c not in evaluated.get(d, set()) and run.has_all_weights(d, c, config.models):
                ready.append((d, c))
                break
    return ready


class _Driver:
    """Keeps one task per member (or fused group) in flight and one evaluation per dropout rate."""

    def __init__(self, ray, session: Session, fused: bool):
        run, config, data, scaleout = session.run, session.config, session.data, session.options.scaleout
        self.ray, self.run, self.config, self.options = ray, run, config, session.options
        self.tracker = session.tracker
        self.ckpts = config.checkpoint_epochs()
        groups = [tuple(range(config.models))] if fused else [(i,) for i in range(config.models)]
        self.units = [(d, g) for d in config.dropouts for g in groups]
        self.fused = fused
        self.epochs = {(d, i): read_state_epoch(run.state_path(d, i)) for d in config.dropouts
                       for i in range(config.models)}
        self.evaluated = {d: run.evaluated_epochs(d) for d in config.dropouts}
        self.data_ref = ray.put(data)
        threads = scaleout.task_threads
        gpus = scaleout.gpus_per_member
        retry = dict(max_retries=scaleout.max_retries, retry_exceptions=[TransientStorageError])
        group_gpus = min(1.0, gpus * len(groups[0])) if gpus else 0
        # GPUs named in ray.remote itself, not in .options(): then Ray starts a new worker process for each GPU
        # task (max_calls=1), as a framework that has opened one GPU keeps it for the life of the process.
        self.train_task = ray.remote(num_cpus=threads, num_gpus=group_gpus, **retry)(train_segment)
        self.eval_task = ray.remote(num_cpus=threads, num_gpus=min(1.0, gpus), **retry)(evaluate_segment)
        self.in_flight: dict = {}  # ObjectRef -> ("train", unit, target) or ("eval", dropout, epoch)

    def next_target(self, unit) -> int | None:
        """The next checkpoint epoch a unit trains to: the first some member is behind (or lacks the file of)."""
        d, indices = unit
        for c in self.ckpts:
            for i in indices:
                e = self.epochs[(d, i)]
                if e < c or (e == c and not self.run.weights_path(d, c, i).exists()):
                    return c
        return None

    def submit_ready(self) -> None:
        busy = {job[1] for job in self.in_flight.values() if job[0] == "train"}
        for unit in self.units:
            if unit not in busy and (target := self.next_target(unit)) is not None:
                ref = self.train_task.remote(str(self.run.path), self.config, self.data_ref, unit[0], unit[1],
                                             target, self.fused, self.options)
                self.in_flight[ref] = ("train", unit, target)
        evaluating = {job[1] for job in self.in_flight.values() if job[0] == "eval"}
        for d, c in find_ready_evaluations(self.run, self.config, self.evaluated, evaluating):
            ref = self.eval_task.remote(str(self.run.path), self.config, self.data_ref, d, c, self.options)
            self.in_flight[ref] = ("eval", d, c)

    def drive(self) -> None:
        self.submit_ready()
        while self.in_flight:
            (ref,), _ = self.ray.wait(list(self.in_flight), num_returns=1)
            job = self.in_flight.pop(ref)
            result = self._get(ref, job)
            if job[0] == "train":
                self._finish_segment(result)
            else:
                self._finish_evaluation(job[1], job[2], result)
            self.submit_ready()

    def _get(self, ref, job):
        from ray.exceptions import RayError, RayTaskError

        what = (f"dropout {job[1][0]:g} member(s) {', '.join(map(str, job[1][1]))} to epoch {job[2]}"
                if job[0] == "train" else f"evaluation of dropout {job[1]:g} epoch {job[2]}")
        try:
            return self.ray.get(ref)
        except RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, EmnistCnnError):
                raise cause from None
            raise RunDirError(f"{what} failed: {format_one_line(cause or exc)}") from exc
        except RayError as exc:  # the worker or node died more than --max-retries times
            retries = self.options.scaleout.max_retries
            raise RunDirError(f"{what} failed after {retries} retries: {format_one_line(exc)}; "
                              "run the same command to resume") from exc

    def _finish_segment(self, result: dict) -> None:
        d = result["dropout"]
        for i in result["indices"]:
            self.epochs[(d, i)] = max(self.epochs[(d, i)], result["target"])
            val = result["val_error"].get(i, result["val_error"].get(str(i)))
            start = result["from"].get(i, result["from"].get(str(i)))
            log.info("dropout %g model %d: epochs %d-%d, val error %s, %.1f s on %s%s", d, i, start + 1,
                     result["target"], "-" if val is None else f"{val:.3f}%", result["seconds"], result["node"],
                     f" (attempt {result['attempt']})" if result["attempt"] > 1 else "")
        self.tracker.sync(members=[(d, i) for i in result["indices"]])

    def _finish_evaluation(self, d: float, epoch: int, records: list[ErrorRecord]) -> None:
        record_checkpoint(self.run, d, epoch, records)
        self.tracker.sync(dropouts=[d])
        self.evaluated[d].add(epoch)
        log_checkpoint(d, epoch, records)


def resolve_ray_fused(fused: bool | None, config: TrainConfig, scaleout: ScaleOutConfig) -> bool:
    """Whether Ray's tasks train a rate's members fused: as asked, else when the tasks get GPUs
    (`--gpus-per-member`), whatever the driver's own machine has; never with mixed_float16 (`resolve_fused`)."""
    if fused is None and not config.model.loss_scaling:
        fused = scaleout.gpus_per_member > 0
    return resolve_fused(fused, config)


def train_ensembles_on_ray(config: TrainConfig, run: RunDir, data: PreparedData,
                           options: TrainOptions) -> dict[float, list[ErrorRecord]]:
    """Train (or resume) every ensemble of the run as Ray tasks (`options.scaleout`); the same files as
    `train_ensembles`.

    The device, XLA and steps per call are decided by each task on its worker
    (see `training.device`); each member's segments record what it got. Fused: see
    `resolve_ray_fused`. Returns each dropout rate's errors at the last checkpoint.
    """
    scaleout = options.scaleout
    check_ray_device(options.device, options.jit_compile, scaleout)
    ray = import_ray()
    fused = resolve_ray_fused(options.fused, config, scaleout)
    run = RunDir.of(run)
    check_run_dir_shared(run.path)
    # The driver trains nothing, but takes the tasks' thread count: config.json records it with the versions.
    configure_threads(scaleout.task_threads)
    runtime = {"device": options.device, "jit_compile": options.jit_compile, "steps_per_call": options.steps_per_call,
               "decided": "per task on its worker (history/segments_model_<i>.jsonl)"}
    # config.json keeps the runtime a local run recorded last: a Ray run's is decided per task.
    with open_session(run, config, data, options, scheduler="ray", runtime=runtime, record_runtime=False,
                      fused=fused, ray=scaleout.ray_address, threads=scaleout.task_threads,
                      gpus_per_member=scaleout.gpus_per_member) as session:
        init_ray(ray, scaleout)
        try:
            resources = ray.cluster_resources()
            log.info("ray: %d node(s), %g CPUs, %g GPUs; %d thread(s) per task", len(ray.nodes()),
                     resources.get("CPU", 0), resources.get("GPU", 0), scaleout.task_threads)
            _Driver(ray, session, fused).drive()
        finally:
            ray.shutdown()
        return {d: find_last_errors(run, session.config, d) for d in session.config.dropouts}


def train_and_evaluate_on_ray(config: TrainConfig, run_dir, source: DataSource | None = None,
                              options: TrainOptions | None = None) -> TrainedRun:
    """`train_and_evaluate` with the members trained as Ray tasks (`options.scaleout`; see the module's
    docstring)."""
    options = options or TrainOptions()
    check_ray_device(options.device, options.jit_compile, options.scaleout)
    run = RunDir.of(run_dir)  # the caller's, with config.json already read
    check_run_dir_shared(run.path)
    check_compatible(run, config, options.fixed_lr)
    import_ray()  # before loading data: a missing extra is a one-line error, not a late failure
    data = load_training_data(config, source or DataSource())
    errors = train_ensembles_on_ray(config, run, data, options)
    return TrainedRun(run, run.read_config(), data, errors)
