"""One typed configuration for a run: augmentation, model, training; and the named presets."""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["EMNIST_DIGITS_MEAN", "EMNIST_DIGITS_STD", "IMAGE_SIDE", "DATASETS", "DEFAULT_DATASET", "PRECISIONS",
           "PRESETS", "FLAGS", "FILL_MODES", "INTERPOLATIONS", "RESUMABLE_CHANGES", "RECIPES", "Recipe",
           "AugmentConfig", "ModelConfig", "TrainConfig", "ScaleOutConfig", "SearchSettings", "MLFLOW_SCHEMES",
           "TrackingConfig", "TrainOptions", "DataSource"]

# EMNIST Digits training-set pixel statistics in [0, 1], as hard-coded by the reference.
EMNIST_DIGITS_MEAN = 0.17325132
EMNIST_DIGITS_STD = 0.3316614

# Every image of every dataset is IMAGE_SIDE x IMAGE_SIDE pixels, and every model takes that shape.
IMAGE_SIDE = 28

# The dataset a new run, a command and the notebooks use unless told another.
DEFAULT_DATASET = "emnist-digits"

DATASETS = (
    DEFAULT_DATASET,
    "emnist-mnist",
    "emnist-letters",
    "emnist-balanced",
    "emnist-byclass",
    "emnist-bymerge",
    "mnist",
)


def _check(ok: bool, flag: str, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{flag} {rule}, got {value!r}")


FILL_MODES = ("nearest", "constant", "reflect", "wrap")
INTERPOLATIONS = ("bilinear", "nearest")


@dataclass(frozen=True)
class AugmentConfig:
    """The reference's Keras 2.0.8 ImageDataGenerator settings, one affine warp per image."""

    enabled: bool = True  # warp every training image (false: train on the images as they are)
    rotation_deg: float = 12.0  # max rotation, degrees, drawn uniformly in [-r, r]
    shift_frac: float = 0.1  # max shift, fraction of width (x) and of height (y), drawn separately
    shear_rad: float = 0.3  # max shear angle, radians (Keras 2.0.x unit; Keras >= 2.1 read it as degrees)
    zoom_min: float = 0.9  # scale factor range, drawn separately for x and y
    zoom_max: float = 1.1  # the range's upper end
    fill_mode: str = "nearest"  # how pixels outside the source are filled
    # The reference resampled with order-0 (nearest) splines; bilinear keeps strokes smooth.
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        # Named as config.json (and the Python API) spell them: the augmentation has no flags.
        _check(self.rotation_deg >= 0, "augment.rotation_deg", "must be >= 0 degrees", self.rotation_deg)
        _check(0 <= self.shift_frac < 1, "augment.shift_frac", "must be in [0, 1)", self.shift_frac)
        _check(0 <= self.shear_rad < math.pi / 2, "augment.shear_rad", "must be in [0, pi/2) radians",
               self.shear_rad)
        _check(0 < self.zoom_min <= self.zoom_max, "augment.zoom_min and zoom_max", "need 0 < min <= max",
               (self.zoom_min, self.zoom_max))
        _check(self.fill_mode in FILL_MODES, "augment.fill_mode", "must be nearest, constant, reflect or wrap",
               self.fill_mode)
        _check(self.interpolation in INTERPOLATIONS, "augment.interpolation", "must be bilinear or nearest",
               self.interpolation)


PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")


@dataclass(frozen=True)
class ModelConfig:
    """The reference CNN's fixed hyperparameters (dropout is set per ensemble)."""

    leaky_slope: float = 0.3  # LeakyReLU negative slope
    bn_momentum: float = 0.99  # BatchNormalization moving-average momentum (Keras default)
    bn_epsilon: float = 1e-3  # BatchNormalization epsilon (Keras default)
    # Compute dtype policy: "float32"; "mixed_bfloat16" (bfloat16 math, float32 weights; faster on CPUs
    # with AVX-512 BF16 and on GPUs from Ampere on); "mixed_float16" (float16 math with dynamic loss
    # scaling, float32 weights: the usual GPU choice, tensor cores from Volta on; slow on a CPU).
    precision: str = "float32"

    @property
    def loss_scaling(self) -> bool:
        """float16 compute needs its loss scaled (dynamically) to keep small gradients from underflowing."""
        return self.precision == "mixed_float16"

    def __post_init__(self) -> None:
        _check(self.precision in PRECISIONS, "--precision", f"must be one of {', '.join(PRECISIONS)}",
               self.precision)


@dataclass(frozen=True)
class Recipe:
    """How members are optimised (Adam throughout); the CNN, its augmentation and the ensemble never change."""

    lr_scale: float = 1.0  # peak learning rate, as a multiple of TrainConfig.lr
    warmup_frac: float = 0.0  # share of the run's steps rising linearly from 0.1x to the peak rate
    decay: str = "constant"  # after warm-up: "constant", or "linear" to zero at the run's last step
    label_smoothing: float = 0.0  # weight of the uniform distribution mixed into the one-hot targets
    # Images per optimizer step of a new run that does not set --batch-size; None: the preset's (or 512).
    batch_size: int | None = None

    def __post_init__(self) -> None:
        _check(self.lr_scale > 0, "lr_scale", "must be > 0", self.lr_scale)
        _check(self.batch_size is None or self.batch_size >= 1, "batch_size", "must be >= 1", self.batch_size)
        _check(0 <= self.warmup_frac < 1, "warmup_frac", "must be in [0, 1)", self.warmup_frac)
        _check(self.decay in ("constant", "linear"), "decay", "must be constant or linear", self.decay)
        _check(0 <= self.label_smoothing < 1, "label_smoothing", "must be in [0, 1)", self.label_smoothing)

    @property
    def scheduled(self) -> bool:
        """True when the rate depends on the step, so the run's length is part of the schedule."""
        return self.warmup_frac > 0 or self.decay != "constant"


# Named recipes for --recipe. "fast" was chosen on the validation split only: of the candidates in
# benchmarks/recipes.py (schedule, peak rate 1x/3x/5x, label smoothing 0/0.1, batch 128/64) it had the lowest
# members' validation error; label smoothing did not help there (README, Recipes).
RECIPES: dict[str, Recipe] = {
    # The reference's protocol: Adam at a constant rate, at the preset's batch size.
    "reference": Recipe(),
    # Warm-up over the first 10% of steps to 3x the base rate, then linearly to zero at the last step; 64
    # images per step (twice the steps per epoch of the quick preset's 128, about as fast per epoch on a CPU).
    "fast": Recipe(lr_scale=3.0, warmup_frac=0.1, decay="linear", batch_size=64),
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines an experiment; stored as RUN/config.json."""

    dataset: str = DEFAULT_DATASET  # whose images and labels the members train and are tested on
    dropouts: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5)  # one ensemble per dropout rate
    models: int = 10  # ensemble members per dropout rate
    epochs: int = 256  # total epochs per member (raise it to continue a finished run)
    checkpoint_every: int = 16  # epochs between weight checkpoints and ensemble evaluations
    batch_size: int = 512  # images per optimizer step
    lr: float = 1e-3  # Adam base learning rate (the reference used Adam's default); the recipe scales it
    recipe: str = "reference"  # how members are optimised: Adam at a constant rate, or the fast schedule
    val_fraction: float = 0.1  # held out of the training set for every choice; 0 = reference protocol
    seed: int = 0  # seeds the split, every member's init, shuffling, augmentation and dropout
    limit_train: int | None = None  # stratified subset of the training set (before the validation split)
    # Images used to recompute BatchNormalization statistics before every evaluation
    # and checkpoint; 0 keeps Keras' moving averages (the reference's behaviour).
    bn_recalibration_images: int = 10_000
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)

    def __post_init__(self) -> None:
        _check(self.dataset in DATASETS, "--dataset", f"must be one of {', '.join(DATASETS)}", self.dataset)
        _check(len(self.dropouts) > 0, "--dropout", "needs at least one rate", self.dropouts)
        for d in self.dropouts:
            _check(0 <= d < 1, "--dropout", "must be in [0, 1)", d)
        _check(len(set(self.dropouts)) == len(self.dropouts), "--dropout", "has a repeated rate", self.dropouts)
        _check(self.models >= 1, "--models", "must be >= 1", self.models)
        _check(self.epochs >= 1, "--epochs", "must be >= 1", self.epochs)
        _check(self.checkpoint_every >= 1, "--checkpoint-every", "must be >= 1", self.checkpoint_every)
        _check(self.batch_size >= 1, "--batch-size", "must be >= 1", self.batch_size)
        _check(self.lr > 0 and math.isfinite(self.lr), "--lr", "must be a positive number", self.lr)
        _check(self.recipe in RECIPES, "--recipe", f"must be one of {', '.join(RECIPES)}", self.recipe)
        _check(0 <= self.val_fraction < 1, "--val-fraction", "must be in [0, 1)", self.val_fraction)
        _check(self.seed >= 0, "--seed", "must be >= 0", self.seed)
        _check(self.limit_train is None or self.limit_train >= 10, "--limit-train", "must be >= 10",
               self.limit_train)
        _check(self.bn_recalibration_images >= 0, "--bn-recalibration", "must be >= 0",
               self.bn_recalibration_images)
        # Loss scaling skips the steps that overflow, and the schedule is indexed by the steps taken.
        _check(not (self.recipe_spec.scheduled and self.model.loss_scaling), "--precision",
               f"mixed_float16 does not work with the {self.recipe} recipe's step schedule yet (loss scaling skips "
               "steps); use mixed_bfloat16 or float32", self.model.precision)

    def find_dropout(self, dropout: float) -> float:
        """The run's own rate equal to `dropout` (as typed, 0.20 is 0.2), else a ConfigError listing them."""
        for d in self.dropouts:
            if abs(d - dropout) < 1e-9:
                return d
        rates = ", ".join(f"{d:g}" for d in self.dropouts)
        raise ConfigError(f"--dropout {dropout:g} is not in this run (it has {rates})")

    @property
    def recipe_spec(self) -> Recipe:
        return RECIPES[self.recipe]

    def checkpoint_epochs(self) -> list[int]:
        """Epochs at which weights are saved and the ensemble evaluated (always the last)."""
        epochs = list(range(self.checkpoint_every, self.epochs + 1, self.checkpoint_every))
        if not epochs or epochs[-1] != self.epochs:
            epochs.append(self.epochs)
        return epochs

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["dropouts"] = list(self.dropouts)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"config has unknown settings: {', '.join(sorted(unknown))}")
        d["augment"] = AugmentConfig(**d.get("augment", {}))
        d["model"] = ModelConfig(**d.get("model", {}))
        d["dropouts"] = tuple(float(x) for x in d.get("dropouts", ()))
        return cls(**d)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def new_run(cls, preset: str | None, **changes: Any) -> "TrainConfig":
        """A new run's config: the defaults, the preset (if any), then `changes`; without a batch size in
        `changes`, the recipe's batch size (if it has one) replaces the preset's."""
        if preset is not None and preset not in PRESETS:
            raise ConfigError(f"--preset must be one of {', '.join(sorted(PRESETS))}, got {preset!r}")
        config = cls(**{**PRESETS.get(preset or "", {}), **changes})
        batch = config.recipe_spec.batch_size
        return config if "batch_size" in changes or batch is None else config.replace(batch_size=batch)

    @classmethod
    def from_preset(cls, name: str, **changes: Any) -> "TrainConfig":
        """The named preset (see PRESETS) with `changes` applied on top, as a new run takes it (`new_run`)."""
        return cls.new_run(name, **changes)


# The one table of experiment settings and the train/run flags that set them. Settings without a flag are set
# in a config file (--config FILE) or the Python API. --lr is not "lr": it sets a fixed rate for the epochs one
# command trains (TrainOptions.fixed_lr).
FLAGS = {
    "dataset": "--dataset",
    "dropouts": "--dropout",
    "models": "--models",
    "epochs": "--epochs",
    "checkpoint_every": "--checkpoint-every",
    "batch_size": "--batch-size",
    "recipe": "--recipe",
    "val_fraction": "--val-fraction",
    "seed": "--seed",
    "limit_train": "--limit-train",
    "bn_recalibration_images": "--bn-recalibration",
    "augment.enabled": "--augment",
    "model.precision": "--precision",
}


@dataclass(frozen=True)
class ScaleOutConfig:
    """Where a run's members train and with how many threads; not part of the experiment."""

    ray_address: str | None = None  # None: in this process; "local", "auto" or "HOST:PORT": Ray tasks
    threads: int | None = None  # backend threads per training process; None: one per core (1 on Ray)
    gpus_per_member: float = 0.0  # GPUs a member's Ray task reserves; 0.25 packs four members on a GPU
    max_retries: int = 3  # times Ray reruns a member task whose worker or node died
    lock_timeout: float = 600.0  # seconds a retried task waits for a stale attempt to release its members

    def __post_init__(self) -> None:
        _check(self.threads is None or self.threads >= 1, "--threads", "must be >= 1", self.threads)
        _check(0 <= self.gpus_per_member and math.isfinite(self.gpus_per_member), "--gpus-per-member",
               "must be >= 0", self.gpus_per_member)
        _check(self.max_retries >= 0, "--max-retries", "must be >= 0", self.max_retries)
        if self.ray_address is None:
            _check(self.gpus_per_member == 0, "--gpus-per-member", "needs --ray", self.gpus_per_member)
        else:
            _check(bool(self.ray_address.strip()), "--ray", "needs local, auto or HOST:PORT", self.ray_address)

    @property
    def task_threads(self) -> int:
        """Threads (and CPUs reserved) per Ray task: pinned, so results do not follow a node's core count."""
        return self.threads or 1


@dataclass(frozen=True)
class SearchSettings:
    """How `emnist-cnn tune` searches: trials, their length, and ASHA's successive halving."""

    trials: int = 16  # configurations sampled from the space, each a run directory
    max_epochs: int = 16  # epochs a trial that is never stopped trains
    grace_epochs: int = 2  # epochs every trial trains before ASHA may stop it
    reduction_factor: int = 3  # ASHA keeps the best 1/reduction_factor of the trials at each rung
    members_per_trial: int = 1  # ensemble members per trial; the trial reports their ensemble's val error
    concurrent: int = 1  # trials training at once (each with its own threads and process)
    seed: int = 0  # seeds the sampling of configurations (a trial's own training uses the base seed)

    def __post_init__(self) -> None:
        _check(self.trials >= 1, "--trials", "must be >= 1", self.trials)
        _check(self.max_epochs >= 1, "--max-epochs", "must be >= 1", self.max_epochs)
        _check(1 <= self.grace_epochs <= self.max_epochs, "--grace-epochs", "must be in [1, --max-epochs]",
               self.grace_epochs)
        _check(self.reduction_factor >= 2, "--reduction-factor", "must be >= 2", self.reduction_factor)
        _check(self.members_per_trial >= 1, "--members-per-trial", "must be >= 1", self.members_per_trial)
        _check(self.concurrent >= 1, "--concurrent", "must be >= 1", self.concurrent)
        _check(self.seed >= 0, "--search-seed", "must be >= 0", self.seed)


# MLflow tracking URIs accepted by --mlflow: a tracking server, or a store MLflow opens itself.
MLFLOW_SCHEMES = ("http", "https", "file", "sqlite", "postgresql", "mysql", "mssql", "databricks")


@dataclass(frozen=True)
class TrackingConfig:
    """Where a run's progress is sent while it trains; not part of the experiment."""

    tensorboard: bool = True  # event files under RUN/tensorboard/
    mlflow_uri: str | None = None  # an MLflow tracking URI; None: no MLflow
    mlflow_experiment: str = "emnist-cnn"  # MLflow experiment the run's MLflow run is created in
    request_timeout: float = 5.0  # seconds an MLflow request may take before it counts as an outage
    retry_after: float = 30.0  # seconds between attempts while the MLflow server is unreachable
    parent_run_id: str | None = None  # an MLflow run a new run's MLflow run is created under (a search's trials)

    def __post_init__(self) -> None:
        if self.mlflow_uri is not None:
            scheme = self.mlflow_uri.split(":", 1)[0].lower() if ":" in self.mlflow_uri else ""
            _check(scheme in MLFLOW_SCHEMES, "--mlflow", "needs a tracking URI (http://HOST:PORT, https://... "
                   "or sqlite:///PATH)", self.mlflow_uri)
        _check(bool(self.mlflow_experiment.strip()), "--mlflow-experiment", "must not be empty",
               self.mlflow_experiment)
        _check(self.request_timeout > 0, "request_timeout", "must be > 0 seconds", self.request_timeout)
        _check(self.retry_after >= 0, "retry_after", "must be >= 0 seconds", self.retry_after)


@dataclass(frozen=True)
class TrainOptions:
    """How one command trains a run; not part of the experiment (each command may choose again)."""

    fixed_lr: float | None = None  # learning rate of every step this command trains; None: the recipe's
    # Members of a dropout rate in one compiled step (same results as one at a time). None: where they train on
    # a GPU: this machine's locally; on Ray, when tasks reserve GPUs (--gpus-per-member). Never mixed_float16.
    fused: bool | None = None
    device: str = "auto"  # cpu, gpu, or auto (a GPU when there is one); on Ray, each task's own
    jit_compile: str = "auto"  # XLA for every compiled function: auto (on with a GPU), on, off
    steps_per_call: int | None = None  # training steps per compiled call; None: 16 on a GPU, 1 on a CPU
    verbose: int = 1  # 1: a progress bar per member-epoch on a terminal; 0: log lines only
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # TensorBoard, and MLflow if asked
    scaleout: ScaleOutConfig = field(default_factory=ScaleOutConfig)  # threads; Ray tasks instead of this process

    def __post_init__(self) -> None:
        _check(self.fixed_lr is None or (self.fixed_lr > 0 and math.isfinite(self.fixed_lr)), "--lr",
               "must be a positive number", self.fixed_lr)


@dataclass(frozen=True, eq=False)
class DataSource:
    """Where a run's data comes from: a folder (else the cache, else a download), or a dataset already loaded."""

    data_dir: Any = None  # folder of NIST or MNIST files; None: $EMNIST_CNN_DATA, a resumed run's own, the cache
    mirror: str | None = None  # base URL to download EMNIST from instead of NIST's
    download: bool = True  # False: fail instead of downloading a missing dataset
    dataset: Any = None  # an io.datasets.Dataset already loaded; then nothing is read


# Settings that may change when a run is resumed; everything else defines the experiment.
RESUMABLE_CHANGES = ("epochs", "checkpoint_every")


def _load_presets() -> dict[str, dict[str, Any]]:
    """The presets in the package's presets/ folder, one TOML file each, named by the file (checked against
    TrainConfig's keys and types by the tests)."""
    from importlib import resources

    out: dict[str, dict[str, Any]] = {}
    for entry in sorted(resources.files(__package__).joinpath("presets").iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".toml"):
            settings = tomllib.loads(entry.read_text(encoding="utf-8"))
            if "dropouts" in settings:
                settings["dropouts"] = tuple(float(d) for d in settings["dropouts"])
            out[entry.name.removesuffix(".toml")] = settings
    return out


# Named starting points for `run`, `config show` and the notebooks (src/emnist_cnn/presets/NAME.toml);
# explicit settings override them.
PRESETS: dict[str, dict[str, Any]] = _load_presets()
