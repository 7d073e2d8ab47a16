"""The structured-config schema: one dataclass per config group option, checked at start-up.

Hydra composes YAML from ``conf/``; each YAML option extends the dataclass registered here
(Hydra's "extending configs" pattern), so command-line overrides are type-checked while they
are applied. :func:`load` then turns the composed config into plain dataclasses and checks the
things a type cannot say (a negative learning rate, a zero batch size, an unknown key added
with ``+key=value``), raising :class:`ConfigError` with one line that names the bad value.
Each dataclass checks its own fields in its ``check`` method; :func:`check` runs them in order,
together with the few rules that compare two sections.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dtrain.errors import ConfigError

# ---------------------------------------------------------------------------------------------
# Checking helpers: each raises ConfigError with one line that names the key and its value.


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _positive(key: str, value: float | int | None, allow_none: bool = False, allow_zero: bool = False) -> None:
    if value is None and allow_none:
        return
    ok = value is not None and math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    what = "non-negative" if allow_zero else "positive"
    tail = " or null" if allow_none else ""
    _require(ok, f"{key}={value!r} must be a {what} number{tail}")


def _one_of(key: str, value: str, options: tuple[str, ...]) -> None:
    _require(value in options, f"{key}={value!r} is not one of: {', '.join(options)}")


def _fraction(key: str, value: float) -> None:
    _require(0.0 <= value < 1.0, f"{key}={value!r} must be in [0, 1)")


# ---------------------------------------------------------------------------------------------
# model/

ACTIVATIONS = ("relu", "tanh", "sigmoid", "gelu", "silu")


@dataclass
class PolynomialConfig:
    """A sum of per-input powers: for each input, coefficients of x^degree .. x^1, then a constant."""

    name: str = "polynomial"
    degree: int = 2
    init: list[float] | None = None  # explicit initial coefficients c0..cN; None draws them
    init_scale: float = 1.0  # coefficients drawn uniformly from [-init_scale, init_scale]

    def check(self) -> None:
        _require(self.degree >= 1, f"model.degree={self.degree} must be at least 1")
        _positive("model.init_scale", self.init_scale, allow_zero=True)


@dataclass
class MLPConfig:
    name: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [64, 64])
    width: int | None = None  # every hidden layer this wide (a scalar a sweeper can tune); None keeps hidden's
    activation: str = "relu"
    layer_norm: bool = False
    dropout: float = 0.0
    activation_checkpointing: bool = False

    def check(self) -> None:
        _require(all(h >= 1 for h in self.hidden), f"model.hidden={self.hidden} must hold positive sizes")
        _positive("model.width", self.width, allow_none=True)
        _one_of("model.activation", self.activation, ACTIVATIONS)
        _require(0.0 <= self.dropout < 1.0, f"model.dropout={self.dropout} must be in [0, 1)")


@dataclass
class GraphModelConfig:
    """dtrain's own autodiff engine: the polynomial or the MLP built as an engine graph."""

    name: str = "graph"
    graph: str = "polynomial"  # polynomial | mlp
    degree: int = 2  # polynomial
    init: list[float] | None = None  # polynomial
    init_scale: float = 1.0  # polynomial
    hidden: list[int] = field(default_factory=lambda: [64, 64])  # mlp
    activation: str = "tanh"  # mlp: relu | tanh | sigmoid

    def check(self) -> None:
        """The engine's own fields; what it needs of the trainer is in :func:`_check_model_fits_trainer`."""
        _one_of("model.graph", self.graph, ("polynomial", "mlp"))
        _require(self.degree >= 1, f"model.degree={self.degree} must be at least 1")
        _require(all(h >= 1 for h in self.hidden), f"model.hidden={self.hidden} must hold positive sizes")
        _one_of("model.activation", self.activation, ("relu", "tanh", "sigmoid"))


_DOTTED = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+")


def _dotted(key: str, value: Any, example: str = "mypkg.module.Name") -> None:
    _require(
        isinstance(value, str) and _DOTTED.fullmatch(value) is not None,
        f"{key}={value!r} must be a dotted import path such as {example}",
    )


@dataclass
class UserTargetConfig:
    """A user's own object: ``_target_`` (an importable class or function) and the arguments beside it, Hydra's
    ``instantiate`` vocabulary (docs/your-model.md). Written back as that mapping (:func:`section_plain`)."""

    target: str
    args: dict[str, Any] = field(default_factory=dict)
    name: str = "custom"

    section: ClassVar[str]
    example: ClassVar[str]

    def check(self) -> None:
        """The target's form only: importing it, and calling it with the arguments, happen when it is built."""
        _dotted(f"{self.section}._target_", self.target, self.example)


@dataclass
class UserModelConfig(UserTargetConfig):
    """A user's own ``torch.nn.Module`` class, or a function that returns one."""

    section: ClassVar[str] = "model"
    example: ClassVar[str] = "mypkg.models.MyNet"


# ---------------------------------------------------------------------------------------------
# loss/ and metrics

LOSSES = ("auto", "mse", "l1", "huber", "cross_entropy", "bce_with_logits")


@dataclass
class LossConfig:
    """A built-in loss; ``auto`` follows the data set's task: mse for regression, cross_entropy for classes."""

    name: str = "auto"
    delta: float = 1.0  # huber: where the quadratic turns linear
    label_smoothing: float = 0.0  # cross_entropy

    def check(self) -> None:
        _one_of("loss.name", self.name, LOSSES)
        _positive("loss.delta", self.delta)
        _fraction("loss.label_smoothing", self.label_smoothing)


@dataclass
class UserLossConfig(UserTargetConfig):
    """A user's own loss: a callable ``(prediction, target) -> scalar tensor``, or a class (an ``nn.Module`` loss
    such as ``torch.nn.SmoothL1Loss``) built with the arguments and then called."""

    section: ClassVar[str] = "loss"
    example: ClassVar[str] = "torch.nn.SmoothL1Loss"


# ---------------------------------------------------------------------------------------------
# data/


@dataclass
class Poly2dConfig:
    """The original example's surface: y = c0 x1^2 + c1 x1 + c2 x2^2 + c3 x2 + c4 + noise."""

    name: str = "poly2d"
    grid_size: int = 30
    low: float = -2.0
    high: float = 2.0
    coefficients: list[float] = field(default_factory=lambda: [1.5, -0.5, 0.0, -1.0, 2.0])
    noise: float = 0.2
    val_fraction: float = 0.2

    def check(self) -> None:
        _fraction("data.val_fraction", self.val_fraction)
        _require(self.grid_size >= 2, f"data.grid_size={self.grid_size} must be at least 2")
        _require(len(self.coefficients) == 5, "data.coefficients must hold 5 values (c0..c4)")
        _require(self.low < self.high, f"data.low={self.low} must be below data.high={self.high}")
        _positive("data.noise", self.noise, allow_zero=True)


@dataclass
class Poly1dConfig:
    """y = k0 + k1 x + ... + k_degree x^degree + noise."""

    name: str = "poly1d"
    degree: int = 5
    coefficients: list[float] | None = None  # k0..k_degree; None draws them from the seed in [-1, 1]
    num_points: int = 1000
    low: float = -1.5
    high: float = 1.5
    noise: float = 0.1
    val_fraction: float = 0.2

    def check(self) -> None:
        _fraction("data.val_fraction", self.val_fraction)
        _require(self.degree >= 1, f"data.degree={self.degree} must be at least 1")
        _require(
            self.coefficients is None or len(self.coefficients) == self.degree + 1,
            f"data.coefficients has {len(self.coefficients or [])} values; data.degree={self.degree} needs "
            f"{self.degree + 1} (k0..k{self.degree})",
        )
        _positive("data.num_points", self.num_points)
        _positive("data.noise", self.noise, allow_zero=True)


@dataclass
class SineConfig:
    """A noisy sine; training points inside [low, high], extrapolation points out to the outer range."""

    name: str = "sine"
    num_points: int = 2000
    low: float = -math.pi
    high: float = math.pi
    outer_low: float = -2 * math.pi
    outer_high: float = 2 * math.pi
    outer_fraction: float = 0.25  # share of points drawn in the outer (extrapolation) range
    frequency: float = 1.0
    noise: float = 0.1
    val_fraction: float = 0.2

    def check(self) -> None:
        _fraction("data.val_fraction", self.val_fraction)
        _require(
            self.outer_low <= self.low < self.high <= self.outer_high,
            "data ranges must nest: outer_low <= low < high <= outer_high",
        )
        _fraction("data.outer_fraction", self.outer_fraction)
        _positive("data.num_points", self.num_points)
        _positive("data.noise", self.noise, allow_zero=True)


@dataclass
class MoonsConfig:
    """Two interleaving half circles, two classes."""

    name: str = "moons"
    num_points: int = 1000
    noise: float = 0.1
    val_fraction: float = 0.2

    def check(self) -> None:
        _fraction("data.val_fraction", self.val_fraction)
        _positive("data.num_points", self.num_points)
        _positive("data.noise", self.noise, allow_zero=True)


@dataclass
class FileDataConfig:
    """A user's data from disk (docs/data.md): ``.csv``/``.csv.gz``/``.parquet`` with a named target column,
    ``.npz`` with arrays ``x`` and the target, or memory-mapped ``x.npy`` and the target's ``.npy``."""

    name: str = "file"
    path: str = "???"
    target: str = "y"  # the target column of a table; the target array of a .npz, or its file (y.npy) beside x.npy
    features: list[str] | None = None  # a table's input columns; None: every column but the target and `drop`
    drop: list[str] = field(default_factory=list)  # a table's columns that are not inputs (ids, dates)
    task: str | None = None  # regression | classification; None: regression, warning where y looks like classes
    val_fraction: float = 0.2
    num_workers: int = 0  # DataLoader worker processes for memory-mapped .npy (tables are held in memory)
    standardize: Any = True  # true: inputs and a regression's target | features: inputs only | false
    labels: str = "indices"  # classification: indices (the labels are 0..K-1) | remap (any values, renumbered)

    def check(self) -> None:
        """The file itself is opened (and a missing one reported) when the dataset is built."""
        _fraction("data.val_fraction", self.val_fraction)
        if self.task is not None:
            _one_of("data.task", self.task, ("regression", "classification"))
        _require(
            self.features is None or not self.drop,
            f"data.features={self.features} and data.drop={self.drop}: give one of them (the inputs, or what to leave "
            "out)",
        )
        _positive("data.num_workers", self.num_workers, allow_zero=True)
        _standardize_choice(self.standardize)
        _one_of("data.labels", self.labels, ("indices", "remap"))


def _standardize_choice(value: Any) -> None:
    _require(
        value in (True, False, "features"),
        f"data.standardize={value!r} must be true (inputs and a regression's target), features, or false",
    )


@dataclass
class UserDataConfig(UserTargetConfig):
    """A user's own data set: a function or class (``data._target_``) that returns tensors or ``Dataset``s
    (docs/data.md). The keys below are dtrain's own; every other key beside ``_target_`` is an argument."""

    val_fraction: float = 0.2  # held out for validation when the function returns no validation data
    task: str | None = None  # regression | classification; None: classification for integer targets
    num_classes: int | None = None  # a Dataset's classes where it has no `classes` attribute
    num_workers: int = 0  # DataLoader worker processes for a Dataset (tensors need none)
    standardize: Any = False  # true: inputs and a regression's target | features: inputs only | false

    section: ClassVar[str] = "data"
    example: ClassVar[str] = "mypkg.data.make_data"

    def check(self) -> None:
        super().check()
        _fraction("data.val_fraction", self.val_fraction)
        if self.task is not None:
            _one_of("data.task", self.task, ("regression", "classification"))
        _positive("data.num_classes", self.num_classes, allow_none=True)
        _positive("data.num_workers", self.num_workers, allow_zero=True)
        _standardize_choice(self.standardize)


# ---------------------------------------------------------------------------------------------
# optim/

OPTIMIZERS = ("sgd", "adam", "adamw", "adagrad", "rmsprop")


@dataclass
class OptimConfig:
    """One schema for every torch.optim optimizer we build; fields an optimizer lacks are ignored."""

    name: str = "sgd"
    lr: float = 0.01
    weight_decay: float = 0.0
    momentum: float = 0.0  # sgd, rmsprop
    nesterov: bool = False  # sgd
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adam, adamw
    eps: float = 1e-8  # adam, adamw, rmsprop, adagrad
    alpha: float = 0.99  # rmsprop smoothing constant
    lr_decay: float = 0.0  # adagrad

    def check(self) -> None:
        """Every field, also those the chosen optimizer ignores."""
        _one_of("optim.name", self.name, OPTIMIZERS)
        _positive("optim.lr", self.lr)
        _positive("optim.weight_decay", self.weight_decay, allow_zero=True)
        _positive("optim.momentum", self.momentum, allow_zero=True)
        _require(
            len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
            f"optim.betas={self.betas} must hold two values in [0, 1)",
        )
        _positive("optim.eps", self.eps)
        _positive("optim.lr_decay", self.lr_decay, allow_zero=True)
        _require(0.0 <= self.alpha <= 1.0, f"optim.alpha={self.alpha} must be in [0, 1]")
        _require(
            not (self.nesterov and self.momentum == 0),
            "optim.nesterov=true needs optim.momentum > 0 (Nesterov momentum without momentum is undefined)",
        )


# ---------------------------------------------------------------------------------------------
# schedule/

SCHEDULES = ("constant", "exp_decay", "step", "cosine")


@dataclass
class ScheduleConfig:
    """LR multiplier over time; ``interval`` says whether time counts optimizer steps or epochs."""

    name: str = "constant"  # constant | exp_decay | step | cosine
    interval: str = "step"  # step | epoch
    warmup: int = 0  # linear warmup length (in intervals) before the schedule proper
    decay: float = 0.999  # exp_decay: lr = max(min_lr, lr0 * decay^t)
    min_lr: float = 0.0  # exp_decay and cosine floor
    step_size: int = 100  # step: multiply by gamma every step_size intervals
    gamma: float = 0.1

    def check(self, lr: float | None = None) -> None:
        """The schedule's own fields; given the optimizer's (checked) ``lr``, also that the floor is not above it.

        The one rule here that reads another section: it has always come before ``step_size`` and ``gamma``, and
        where two values are bad the same one must still be named, so it cannot wait until after this check.
        """
        _one_of("schedule.name", self.name, SCHEDULES)
        _one_of("schedule.interval", self.interval, ("step", "epoch"))
        _positive("schedule.warmup", self.warmup, allow_zero=True)
        _require(0.0 < self.decay <= 1.0, f"schedule.decay={self.decay} must be in (0, 1]")
        _positive("schedule.min_lr", self.min_lr, allow_zero=True)
        if lr is not None:
            _require(
                self.min_lr <= lr,
                f"schedule.min_lr={self.min_lr:g} is above optim.lr={lr:g}; the floor would raise the rate",
            )
        _positive("schedule.step_size", self.step_size)
        _positive("schedule.gamma", self.gamma)


# ---------------------------------------------------------------------------------------------
# trainer/ and dist

PRECISIONS = ("float32", "float64", "bf16-mixed")


@dataclass
class EarlyStoppingConfig:
    """Stop when ``objective.metric`` has not improved by ``min_delta`` for ``patience`` evaluations in a row.

    Every rank sees the same reduced validation metrics, so every rank stops at the same step.
    """

    patience: int = 0  # evaluations without improvement before stopping; 0 = never stop early
    min_delta: float = 0.0  # an improvement smaller than this does not count

    def check(self) -> None:
        _positive("trainer.early_stopping.patience", self.patience, allow_zero=True)
        _positive("trainer.early_stopping.min_delta", self.min_delta, allow_zero=True)


@dataclass
class FsdpConfig:
    """How ``trainer.strategy=fsdp`` shards the model (FSDP2's ``fully_shard``; docs/cluster.md).

    ``wrap`` says which submodules become units of their own, each all-gathered just before its forward and
    freed after it: ``blocks`` (each top-level child that holds parameters: a transformer's blocks, an MLP's
    layers), or a list of module class names (``[TransformerBlock]``, ``[Linear]``). The root is always one.
    """

    wrap: Any = "blocks"  # blocks | [ClassName, ...]
    reshard_after_forward: bool = True  # free each unit's gathered weights after its forward (less memory)
    cpu_offload: bool = False  # keep the sharded parameters, gradients and optimizer state in host memory

    def check(self) -> None:
        wrap = self.wrap
        names = list(wrap) if isinstance(wrap, (list, tuple)) or _is_list_config(wrap) else None
        _require(
            wrap == "blocks" or (names is not None and len(names) > 0 and all(isinstance(n, str) and n for n in names)),
            f"trainer.fsdp.wrap={wrap!r} is not blocks or a list of module class names (such as [TransformerBlock])",
        )


def _is_list_config(value: Any) -> bool:
    from omegaconf import ListConfig

    return isinstance(value, ListConfig)


STRATEGIES = ("ddp", "fsdp")


@dataclass
class TrainerConfig:
    max_epochs: int = 100
    max_steps: int | None = None  # stop after this many optimizer steps, if sooner
    batch_size: int | None = None  # global samples per optimizer step; None = the whole training set
    grad_accum_steps: int = 1  # micro-batches per optimizer step (gradients all-reduced once)
    precision: str = "float32"  # float32 | float64 | bf16-mixed
    device: str = "auto"  # auto | cpu | cuda
    clip_grad_norm: float | None = None  # clip the global gradient norm (after the all-reduce)
    clip_grad_value: float | None = None  # clip each gradient element to +/- this value
    log_every: int = 10  # optimizer steps between logged (host-synced) metrics
    eval_every: int = 0  # optimizer steps between evaluations; 0 = at the end of each epoch
    compile: bool = False  # torch.compile the model
    progress: str = "auto"  # auto | bar | lines | off
    histogram_every: int = 0  # steps between weight and gradient histograms (at logging steps); 0 = none
    figures: bool = True  # the model's picture (surface, extrapolation, decision boundary) at each evaluation
    on_nonfinite: str = "stop"  # stop | skip: what a non-finite loss or gradient does
    max_skipped_steps: int = 5  # on_nonfinite=skip: stop after this many skipped steps in a row
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    strategy: str = "ddp"  # ddp: every rank a full replica | fsdp: parameters, gradients, optimizer state sharded
    fsdp: FsdpConfig = field(default_factory=FsdpConfig)  # trainer.strategy=fsdp's settings

    def check(self) -> None:
        """The trainer's own fields; a batch larger than the training set is found when the data is loaded."""
        _positive("trainer.max_epochs", self.max_epochs)
        _positive("trainer.max_steps", self.max_steps, allow_none=True)
        _positive("trainer.batch_size", self.batch_size, allow_none=True)
        _positive("trainer.grad_accum_steps", self.grad_accum_steps)
        _one_of("trainer.precision", self.precision, PRECISIONS)
        _one_of("trainer.device", self.device, ("auto", "cpu", "cuda"))
        _positive("trainer.clip_grad_norm", self.clip_grad_norm, allow_none=True)
        _positive("trainer.clip_grad_value", self.clip_grad_value, allow_none=True)
        _positive("trainer.log_every", self.log_every)
        _positive("trainer.eval_every", self.eval_every, allow_zero=True)
        _one_of("trainer.progress", self.progress, ("auto", "bar", "lines", "off"))
        _positive("trainer.histogram_every", self.histogram_every, allow_zero=True)

        _one_of("trainer.on_nonfinite", self.on_nonfinite, ("stop", "skip"))
        _positive("trainer.max_skipped_steps", self.max_skipped_steps)
        self.early_stopping.check()
        _one_of("trainer.strategy", self.strategy, STRATEGIES)
        self.fsdp.check()


@dataclass
class DistConfig:
    backend: str = "auto"  # auto (nccl with CUDA, gloo otherwise) | nccl | gloo
    timeout_s: float = 600.0  # a collective that waits longer fails, naming the rank and the operation
    checkpoint_timeout_s: float = 1800.0  # the same around saving and loading checkpoints (rank 0 writes)

    def check(self) -> None:
        _one_of("dist.backend", self.backend, ("auto", "nccl", "gloo"))
        _positive("dist.timeout_s", self.timeout_s)
        _positive("dist.checkpoint_timeout_s", self.checkpoint_timeout_s)


# What may differ between a checkpoint's config and the resuming run's, when checkpoint.allow_changes says so.
# Whole sections mean any key in them. Everything else that shapes the trajectory (model, data, seed, batch
# size, precision, optimizer kind) must match; settings that do not (logging, devices, timeouts) may always.
CHANGEABLE_ON_RESUME = (
    "world_size",
    "data.fingerprint",  # the data file changed since the checkpoint (dtrain.data.fingerprint)
    "data.num_workers",  # a DataLoader's processes: the batches do not depend on them
    "optim.lr",
    "optim.momentum",
    "optim.weight_decay",
    "optim.betas",
    "optim.eps",
    "schedule",
    "trainer.max_epochs",
    "trainer.max_steps",
    "trainer.clip_grad_norm",
    "trainer.clip_grad_value",
    "trainer.grad_accum_steps",
)


@dataclass
class CheckpointConfig:
    """Full training state under ``<run dir>/checkpoints``, written by rank 0 (docs/reliability.md)."""

    every_n_steps: int = 500  # also saved at the end, and on preemption; 0 = only those
    keep_last: int = 3  # older checkpoints are deleted
    overwrite: bool = False  # resume=never in a run directory that holds checkpoints: allowed only with this
    allow_changes: list[str] = field(default_factory=list)  # keys that may differ from the checkpoint's config
    signal_check_every: int = 100  # logging steps agree on a stop signal for free; this bounds the wait between them
    save_best: bool = False  # keep the model of the best objective.metric as model_best.pt

    def check(self) -> None:
        _positive("checkpoint.every_n_steps", self.every_n_steps, allow_zero=True)
        _positive("checkpoint.keep_last", self.keep_last)
        _positive("checkpoint.signal_check_every", self.signal_check_every)
        for key in self.allow_changes:
            _require(
                key in CHANGEABLE_ON_RESUME,
                f"checkpoint.allow_changes: {key!r} cannot change on resume; "
                f"these can: {', '.join(CHANGEABLE_ON_RESUME)}",
            )


@dataclass
class FaultConfig:
    """A fault injected on purpose, to test recovery. Off unless ``kind`` is set."""

    kind: str = "none"  # none | kill (SIGKILL itself) | exit (exit status 1) | hang (stop answering) | nan (loss)
    step: int = 1  # kill/exit/hang: once this many steps are done; nan: this step's loss
    rank: int = 0  # the rank it happens on
    attempts: str = "first"  # first: only before any torchrun restart | every: on every attempt

    def check(self) -> None:
        _one_of("fault.kind", self.kind, ("none", "kill", "exit", "hang", "nan"))
        _positive("fault.step", self.step)
        _positive("fault.rank", self.rank, allow_zero=True)
        _one_of("fault.attempts", self.attempts, ("first", "every"))


@dataclass
class ObjectiveConfig:
    """The number a sweep or a population ranks runs by: a final metric from ``metrics.json``."""

    metric: str = "auto"  # auto: val/loss where there is a validation split, else train/loss
    mode: str = "min"  # min | max

    def check(self) -> None:
        _one_of("objective.mode", self.mode, ("min", "max"))
        _require(
            self.metric == "auto" or "/" in self.metric,
            f"objective.metric={self.metric!r} must be auto or a metric tag such as val/loss or val/accuracy",
        )


# A per-member value: None (every member uses the run's own value), a list with one value per member
# (or per grid point), or a string "logspace:LO:HI[:N]", "linspace:LO:HI[:N]", "loguniform:LO:HI",
# "uniform:LO:HI" (see dtrain/population/members.py).
MemberValues = Any


@dataclass
class PopulationOptimValues:
    lr: MemberValues = None
    momentum: MemberValues = None
    weight_decay: MemberValues = None
    beta1: MemberValues = None
    beta2: MemberValues = None
    eps: MemberValues = None


@dataclass
class PopulationTrainerValues:
    clip_grad_norm: MemberValues = None


@dataclass
class PopulationScheduleValues:
    decay: MemberValues = None
    gamma: MemberValues = None
    min_lr: MemberValues = None


@dataclass
class PopulationConfig:
    """Many members of one model trained at once in one process (docs/tuning.md).

    Members share the model, the data and the batches; they differ in the values given below.
    """

    size: int = 1  # members; 1 = an ordinary run (or as many as a list below gives, or the grid's points)
    grid: bool = False  # false: lists/ranges give member i its i-th value; true: every combination
    draw_seed: int = 0  # the random draws of loguniform/uniform
    chunk: int = 0  # members fused in one forward/backward; 0 = measured at start-up
    init_seed: MemberValues = None  # per-member initial weights: a list of seeds, or "each" (seed + member index)
    optim: PopulationOptimValues = field(default_factory=PopulationOptimValues)
    trainer: PopulationTrainerValues = field(default_factory=PopulationTrainerValues)
    schedule: PopulationScheduleValues = field(default_factory=PopulationScheduleValues)

    def check(self) -> None:
        """The size only: the member values are expanded, and each member checked as a run, in population/."""
        _require(self.size >= 1, f"population.size={self.size} must be at least 1")


@dataclass
class Config:
    """The whole run. Group sections hold one of the option dataclasses above."""

    seed: int = 0
    init_seed: int | None = None  # the model's initial weights; None = seed (data, batch order keep seed)
    model: Any = None
    data: Any = None
    loss: Any = None  # a LossConfig or UserLossConfig; None (a config built in Python) is auto
    metrics: Any = None  # validation metrics by name or {_target_: ...}; null = the task's defaults
    optim: Any = None
    schedule: Any = None
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    resume: str = "auto"  # auto: the run directory's latest checkpoint, if any | never | a path
    fault: FaultConfig = field(default_factory=FaultConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    population: PopulationConfig = field(default_factory=PopulationConfig)

    def __post_init__(self) -> None:
        # Not a schema default: Hydra must be free to put a user's open loss/custom mapping here.
        if self.loss is None:
            self.loss = LossConfig()


MODELS: dict[str, type] = {"polynomial": PolynomialConfig, "mlp": MLPConfig, "graph": GraphModelConfig}
DATASETS: dict[str, type] = {
    "poly2d": Poly2dConfig,
    "poly1d": Poly1dConfig,
    "sine": SineConfig,
    "moons": MoonsConfig,
    "file": FileDataConfig,
}


def register_configs() -> None:
    """Register the schemas in Hydra's ConfigStore as ``base_<option>`` in each group."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for name, schema in MODELS.items():
        cs.store(group="model", name=f"base_{name}", node=schema)
    for name, schema in DATASETS.items():
        cs.store(group="data", name=f"base_{name}", node=schema)
    cs.store(group="loss", name="base_loss", node=LossConfig)
    # A user's own model, loss or data: an open mapping (no schema), so the arguments beside _target_ are set as
    # model.width=64, not +model.width=64. `model._target_=X` alone selects it (dtrain.overrides).
    for group, schema in (("model", UserModelConfig), ("loss", UserLossConfig), ("data", UserDataConfig)):
        open_node = OmegaConf.create({"_target_": "???", **_own_defaults(schema)})
        OmegaConf.set_struct(open_node, False)
        cs.store(group=group, name="custom", node=open_node)
    cs.store(group="optim", name="base_optim", node=OptimConfig)
    cs.store(group="schedule", name="base_schedule", node=ScheduleConfig)
    cs.store(group="trainer", name="base_trainer", node=TrainerConfig)


# ---------------------------------------------------------------------------------------------
# Loading and checking


def load(cfg: DictConfig) -> Config:
    """Turn a composed config into a checked :class:`Config`, or raise :class:`ConfigError`."""
    raw = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    assert isinstance(raw, dict)
    raw.pop("hydra", None)
    sections: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "model":
            sections[key] = _model(value)
        elif key == "loss":
            sections[key] = _loss(value)
        elif key == "metrics":
            sections[key] = _metric_specs(value)
        elif key == "data":
            sections[key] = _with_target(value, UserDataConfig) or _build(key, value, _pick(key, value, DATASETS))
        elif key == "optim":
            sections[key] = _build(key, value, OptimConfig)
        elif key == "schedule":
            sections[key] = _build(key, value, ScheduleConfig)
        elif key == "trainer":
            sections[key] = _build(key, value, TrainerConfig)
        elif key == "dist":
            sections[key] = _build(key, value, DistConfig)
        elif key == "checkpoint":
            sections[key] = _build(key, value, CheckpointConfig)
        elif key == "fault":
            sections[key] = _build(key, value, FaultConfig)
        elif key == "objective":
            sections[key] = _build(key, value, ObjectiveConfig)
        elif key == "population":
            sections[key] = _build(key, value, PopulationConfig)
        elif key == "resume":
            sections[key] = str(_typed("resume", value, str))
        elif key == "seed":
            sections[key] = _typed("seed", value, int)
        elif key == "init_seed":
            sections[key] = None if value is None else _typed("init_seed", value, int)
        else:
            valid = ", ".join(f.name for f in dataclasses.fields(Config))
            raise ConfigError(f"unknown config key '{key}'; valid top-level keys: {valid}")
    sections.setdefault("loss", LossConfig())  # configs written before the loss group existed (old checkpoints)
    optional = ("init_seed", "metrics")
    missing = [f.name for f in dataclasses.fields(Config) if sections.get(f.name) is None and f.name not in optional]
    if missing:
        raise ConfigError(f"config is missing section(s): {', '.join(missing)}")
    config = Config(**sections)
    if isinstance(config.data, FileDataConfig) and config.data.path not in ("???", ""):
        # Stored resolved: a report, predict or resume from another directory finds the same file.
        config.data.path = str(Path(config.data.path).expanduser().resolve())
    check(config)
    return config


def _own_defaults(schema: type[UserTargetConfig]) -> dict[str, Any]:
    """The keys dtrain reads itself beside a user's ``_target_`` (a data set's ``val_fraction``...), with defaults."""
    base = {f.name for f in dataclasses.fields(UserTargetConfig)}
    return {f.name: f.default for f in dataclasses.fields(schema) if f.name not in base}


def _with_target(value: Any, schema: type[UserTargetConfig]) -> UserTargetConfig | None:
    """``schema(target, args)`` for a mapping with ``_target_`` (a user's own class); None for a built-in option."""
    if not isinstance(value, dict) or "_target_" not in value:
        return None
    section = schema.section
    if value["_target_"] == "???":
        raise ConfigError(f"{section}._target_ is required: set it with {section}._target_=mypkg.module.Name")
    own = _own_defaults(schema)
    args = {k: v for k, v in value.items() if k != "_target_" and k not in own}
    return schema(target=value["_target_"], args=args, **{k: value.get(k, d) for k, d in own.items()})


def _model(value: Any) -> Any:
    """The ``model`` section: a user's ``_target_``, or the built-in option its ``name`` picks."""
    return _with_target(value, UserModelConfig) or _build("model", value, _pick("model", value, MODELS))


def _loss(value: Any) -> Any:
    """The ``loss`` section: a user's ``_target_``, or a built-in loss."""
    return _with_target(value, UserLossConfig) or _build("loss", value, LossConfig)


METRIC_NAMES = ("accuracy", "f1", "precision", "recall", "auroc", "mae", "mse", "rmse", "r2")


def _metric_specs(value: Any) -> list[Any] | None:
    """``metrics``: null (the task's defaults), or a list of names and ``{_target_: ..., name: ...}`` mappings."""
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise ConfigError(f"metrics={value!r} must be a list such as [accuracy,f1] or null for the task's defaults")
    for spec in value:
        if isinstance(spec, dict):
            _require("_target_" in spec, f"metrics entry {spec!r} needs a _target_ (a torchmetrics.Metric class)")
            _dotted("metrics entry _target_", spec["_target_"], "torchmetrics.classification.MulticlassCohenKappa")
        else:
            _require(
                spec in METRIC_NAMES,
                f"metrics entry {spec!r} is not one of: {', '.join(METRIC_NAMES)} (or a mapping with _target_)",
            )
    return value


def _pick(section: str, value: Any, options: dict[str, type]) -> type:
    name = value.get("name") if isinstance(value, dict) else None
    if name not in options:
        raise ConfigError(f"{section}.name={name!r} is not one of: {', '.join(options)}")
    return options[name]


def _build(section: str, value: Any, schema: type) -> Any:
    """Build ``schema`` from a plain dict, naming the first unknown key or badly typed value."""
    if not isinstance(value, dict):
        raise ConfigError(f"{section} must be a mapping, got {value!r}")
    fields = {f.name for f in dataclasses.fields(schema)}
    unknown = sorted(set(value) - fields)
    if unknown:
        raise ConfigError(
            f"unknown key '{section}.{unknown[0]}' for {section}={value.get('name', section)}; "
            f"valid keys: {', '.join(sorted(fields))}"
        )
    missing = [k for k, v in value.items() if v == "???"]
    if missing:
        raise ConfigError(f"{section}.{missing[0]} is required: set it with {section}.{missing[0]}=...")
    try:
        node = OmegaConf.merge(OmegaConf.structured(schema), value)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        first_line = str(exc).splitlines()[0]
        raise ConfigError(f"{section}.{key}: {first_line}") from None
    return OmegaConf.to_object(node)


def _typed(key: str, value: Any, kind: type) -> Any:
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} must be of type {kind.__name__}")
    return value


def check(config: Config) -> None:
    """Check values a type cannot rule out; raise :class:`ConfigError` naming the first bad one.

    Each section checks its own fields, and the rules between sections run where they always have: of two
    bad values, the one named first depends on the order below, so keep it.
    """
    _require(0 <= config.seed < 2**63, f"seed={config.seed} must be in [0, 2^63)")
    if config.init_seed is not None:
        _require(0 <= config.init_seed < 2**63, f"init_seed={config.init_seed} must be in [0, 2^63)")
    config.model.check()
    config.loss.check()
    _check_model_fits_trainer(config)
    config.data.check()
    config.optim.check()
    config.schedule.check(lr=config.optim.lr)  # the floor may not be above the optimizer's rate
    config.trainer.check()
    config.dist.check()
    config.checkpoint.check()
    _require(config.resume.strip() != "", "resume='' is empty; use auto, never, or a checkpoint path")
    config.population.check()
    config.objective.check()
    _check_objective_watchers(config)
    config.fault.check()


def _check_model_fits_trainer(config: Config) -> None:
    """What a model needs of the trainer: the graph engine has no mixed precision and no torch.compile.

    Checked before the trainer's own fields, so an unsupported precision names the graph model.
    """
    if isinstance(config.model, GraphModelConfig):
        trainer = config.trainer
        _require(
            trainer.precision in ("float32", "float64"),
            f"trainer.precision={trainer.precision!r}: model=graph trains in float32 or float64",
        )
        _require(not trainer.compile, "trainer.compile=true does not apply to model=graph (it is not a torch graph)")
        loss = config.loss
        _require(
            isinstance(loss, LossConfig) and loss.name in ("auto", "mse", "cross_entropy") and not loss.label_smoothing,
            f"loss={getattr(loss, 'name', None) if isinstance(loss, LossConfig) else loss.target}: model=graph builds "
            "its own loss (mse for regression, cross_entropy for classes); other losses need a torch model",
        )


def _check_objective_watchers(config: Config) -> None:
    """The best checkpoint and early stopping watch ``objective.metric`` at evaluations: it must be one."""
    watchers = [
        name
        for name, on in (
            ("checkpoint.save_best=true", config.checkpoint.save_best),
            (
                f"trainer.early_stopping.patience={config.trainer.early_stopping.patience}",
                config.trainer.early_stopping.patience > 0,
            ),
        )
        if on
    ]
    metric = config.objective.metric
    if watchers and not (metric == "auto" or metric.startswith("val/")):
        raise ConfigError(
            f"{watchers[0]} watches objective.metric at evaluations, but objective.metric={metric!r} is not a "
            "validation metric; use auto or a val/ tag such as val/loss"
        )
    if config.trainer.strategy == "fsdp" and config.population.size > 1:
        raise ConfigError(
            "trainer.strategy=fsdp shards one model across ranks; a population (population.size>1) trains its "
            "members side by side on each device: use trainer.strategy=ddp"
        )
    if watchers and config.population.size > 1:
        raise ConfigError(f"{watchers[0]} is for a single run; a population (population.size>1) keeps every member")


def section_plain(section: Any) -> Any:
    """One section as plain data: a user's model, loss or data as its ``_target_`` mapping, the rest as dicts."""
    if isinstance(section, UserTargetConfig):
        own = {k: getattr(section, k) for k in _own_defaults(type(section))}
        return {"_target_": section.target, **section.args, **own}
    return dataclasses.asdict(section) if dataclasses.is_dataclass(section) else section


def to_plain(config: Config) -> dict[str, Any]:
    """The config as nested plain dicts, for writing and for TensorBoard's hparams."""
    return {f.name: section_plain(getattr(config, f.name)) for f in dataclasses.fields(config)}


def model_section(value: dict[str, Any]) -> Any:
    """A model section (as :func:`to_plain` writes it) back as its checked config: for ``dtrain.load``."""
    model = _model(value)
    model.check()
    return model


def loss_section(value: dict[str, Any] | None) -> Any:
    """A loss section back as its checked config (a run written before the loss group: ``auto``)."""
    if value is None:
        return LossConfig()
    loss = _loss(value)
    loss.check()
    return loss


def as_yaml(config: Config) -> str:
    """The resolved config as YAML text."""
    return OmegaConf.to_yaml(OmegaConf.create(to_plain(config)))


__all__ = [
    "CHANGEABLE_ON_RESUME",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DistConfig",
    "EarlyStoppingConfig",
    "FaultConfig",
    "FileDataConfig",
    "GraphModelConfig",
    "LossConfig",
    "MLPConfig",
    "MoonsConfig",
    "ObjectiveConfig",
    "OptimConfig",
    "Poly1dConfig",
    "Poly2dConfig",
    "PolynomialConfig",
    "PopulationConfig",
    "ScheduleConfig",
    "SineConfig",
    "TrainerConfig",
    "UserDataConfig",
    "UserLossConfig",
    "UserModelConfig",
    "as_yaml",
    "check",
    "load",
    "register_configs",
]
