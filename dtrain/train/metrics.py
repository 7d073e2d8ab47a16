"""The validation metrics beside the loss: torchmetrics objects built from ``metrics=[...]`` and reduced across
ranks by torchmetrics itself.

``accuracy`` is counted by dtrain (correct rows summed with the loss in one all-reduce, the same number as
torchmetrics' micro-averaged accuracy): importing torchmetrics costs about 2 s of start-up (it pulls in scipy),
and the default classification run needs nothing else. Any other metric imports it.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import torch

from dtrain.data.dataset import AnySplit
from dtrain.errors import ConfigError, first_line
from dtrain.models.sizes import ModelSizes
from dtrain.train.objective import Loss

CLASSIFICATION = ("accuracy", "f1", "precision", "recall", "auroc")
REGRESSION = ("mae", "mse", "rmse", "r2")
COUNTED = "accuracy"  # counted by dtrain itself (see the module's docstring)


def default_metrics(task: str) -> list[Any]:
    """What ``metrics: null`` means: accuracy for classification; regression has ``val/loss`` only."""
    return ["accuracy"] if task == "classification" else []


class ValMetrics:
    """A run's validation metrics beside the loss, by tag name (``val/<name>``)."""

    def __init__(self, specs: list[Any] | None, sizes: ModelSizes, loss: Loss) -> None:
        specs = default_metrics(sizes.task) if specs is None else specs
        self.sizes, self.loss = sizes, loss
        self.counts_accuracy = False
        self.library: dict[str, Any] = {}  # name -> torchmetrics.Metric
        for spec in specs:
            if spec == COUNTED:
                if sizes.task != "classification":
                    raise ConfigError(_wrong_task(spec, sizes.task))
                self.counts_accuracy = True
                continue
            name, metric = _build(spec, sizes, loss)
            if name in self.library or name in ("loss", COUNTED):
                raise ConfigError(f"metrics: two metrics are named {name!r}; give one a name: ... key")
            self.library[name] = metric

    @property
    def names(self) -> list[str]:
        """Every metric's name, as logged under ``val/``: the counted accuracy first."""
        return ([COUNTED] if self.counts_accuracy else []) + list(self.library)

    def check(self, val: dict[str, AnySplit], world_size: int, rows: int = 8) -> None:
        """Refuse, before training, a metric that cannot work on this data: each is tried on a copy, unsynced, with
        predictions of the right shape for the first validation rows; and every rank needs rows to update with
        (torchmetrics' classification states cannot gather an empty rank's)."""
        if not self.library or not val:
            return
        smallest = min(len(split) for split in val.values())
        if smallest < world_size:
            raise ConfigError(
                f"metrics={list(self.library)}: a validation split has {smallest} row(s) for {world_size} ranks; "
                "each rank needs at least one (raise data.val_fraction)"
            )
        split = next(iter(val.values()))
        x, target = split.head(rows)
        target = target.cpu()
        if self.sizes.task == "classification":
            output = torch.zeros(len(target), 1 if self.loss.binary else self.sizes.num_outputs, dtype=x.dtype)
        else:
            output = torch.zeros_like(target)
        for name, metric in self.library.items():
            trial = metric.clone().cpu()
            trial._to_sync = False  # a dry run on this rank alone
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # e.g. "no positive samples" on a constant prediction
                    trial.update(*self._inputs(output, target))
                    value = trial.compute()
            except (RuntimeError, TypeError, ValueError, IndexError) as exc:
                first = first_line(exc)
                raise ConfigError(f"metrics entry {name!r} fails on this data: {type(exc).__name__}: {first}") from None
            _one_number(name, value)

    def to(self, device: torch.device, dtype: torch.dtype) -> ValMetrics:
        for metric in self.library.values():
            metric.to(device)
            if dtype == torch.float64:
                metric.set_dtype(dtype)
        return self

    def reset(self) -> None:
        for metric in self.library.values():
            metric.reset()

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        if not self.library:
            return
        prediction, target = self._inputs(output, target)
        for metric in self.library.values():
            metric.update(prediction, target)

    def compute(self) -> dict[str, float]:
        """Each library metric over every rank's updates: torchmetrics all-gathers the states (a collective)."""
        return {name: _one_number(name, metric.compute()) for name, metric in self.library.items()}

    def _inputs(self, output: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What torchmetrics expects: probabilities and class indices, or values flattened to one per target."""
        if self.sizes.task == "classification":
            probabilities = self.loss.probabilities(output)
            return (probabilities[:, 1] if self.loss.binary else probabilities), target
        if output.ndim > 1 and output.shape[1] == 1:
            return output.reshape(-1), target.reshape(-1)
        return output, target


def _one_number(name: str, value: Any) -> float:
    """A metric's value as a float, or a one-line error for one that computes several (a confusion matrix)."""
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        shape = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ConfigError(f"metrics entry {name!r} computes {shape}, not one number")
    return float(value)


def _wrong_task(name: str, task: str) -> str:
    valid = CLASSIFICATION if task == "classification" else REGRESSION
    return f"metrics entry {name!r} does not apply to {task}; for {task} use: {', '.join(valid)} (or a _target_)"


def _build(spec: Any, sizes: ModelSizes, loss: Loss) -> tuple[str, Any]:
    """One torchmetrics object and its name, from a name or a ``{_target_: ..., name: ..., args...}`` mapping."""
    import torchmetrics.classification as tc
    import torchmetrics.regression as tr

    classes = max(sizes.num_classes, 2)
    if isinstance(spec, str):
        if spec not in (CLASSIFICATION if sizes.task == "classification" else REGRESSION):
            raise ConfigError(_wrong_task(spec, sizes.task))
        if spec in REGRESSION:
            made = {
                "mae": tr.MeanAbsoluteError,
                "mse": tr.MeanSquaredError,
                "rmse": lambda: tr.MeanSquaredError(squared=False),
                "r2": tr.R2Score,  # several outputs: their uniform average (R2Score's default multioutput)
            }
            return spec, made[spec]()
        if loss.binary:
            binary = {"f1": tc.BinaryF1Score, "precision": tc.BinaryPrecision, "recall": tc.BinaryRecall}
            return spec, binary.get(spec, tc.BinaryAUROC)()
        multiclass = {"f1": tc.MulticlassF1Score, "precision": tc.MulticlassPrecision, "recall": tc.MulticlassRecall}
        if spec == "auroc":
            return spec, tc.MulticlassAUROC(num_classes=classes)
        return spec, multiclass[spec](num_classes=classes, average="macro")

    from torchmetrics import Metric

    from dtrain.user_code import call_with, import_target

    args = {k: v for k, v in spec.items() if k not in ("_target_", "name")}
    target = spec["_target_"]
    cls = import_target(target, "metrics entry _target_")
    try:
        parameters = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        parameters = {}
    if sizes.task == "classification":
        if "num_classes" in parameters and "num_classes" not in args:
            args["num_classes"] = classes
        if "task" in parameters and "task" not in args:
            args["task"] = "binary" if loss.binary else "multiclass"
    metric = call_with(cls, args, "metrics entry _target_", target)
    if not isinstance(metric, Metric):
        kind = type(metric).__name__
        raise ConfigError(f"metrics entry _target_={target!r} is not a torchmetrics.Metric (it is a {kind})")
    name = str(spec.get("name") or target.rsplit(".", 1)[-1].lower())
    return name, metric
