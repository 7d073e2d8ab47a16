"""A trained model as one self-describing file (``model.pt``, ``model_best.pt``), and :func:`load` to use it again.

The file holds what rebuilding the model needs without the data or an internal class: the model's config (a
built-in option, or the user's ``_target_`` and arguments), its sizes and task, the loss (which says how outputs
become probabilities), the dtype of its weights and of the inputs it was trained on, the weights, and the
data's standardisation it was trained with, which :func:`load` puts in front of (and, for a regression's target,
behind) the module. Plain data and tensors only, so ``torch.load(..., weights_only=True)`` reads it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dtrain.atomic import write_atomic
from dtrain.config import Config, loss_section, model_section, section_plain
from dtrain.data.standardize import Standardized, Standardizer
from dtrain.errors import UserError, first_line
from dtrain.models.sizes import ModelSizes

FORMAT = "dtrain.model/1"
FINAL, BEST = "model.pt", "model_best.pt"


def model_record(
    config: Config,
    sizes: ModelSizes,
    dtype: torch.dtype,
    preprocessing: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What rebuilding the model needs besides its weights: the model and loss configs, sizes and task, dtypes,
    and the data's preprocessing. ``model.pt`` holds it with the weights; a sharded checkpoint beside its shards."""
    return {
        "format": FORMAT,
        "model": section_plain(config.model),
        "loss": section_plain(config.loss),
        "sizes": sizes.to_dict(),
        "dtype": str(dtype).removeprefix("torch."),
        "input_dtype": str(dtype).removeprefix("torch."),  # the data is cast to the weights' dtype for training
        "preprocessing": preprocessing,  # applied again by load(), predict and report
    }


def model_bytes(
    weights: dict[str, torch.Tensor],
    config: Config,
    sizes: ModelSizes,
    step: int,
    metrics: dict[str, float] | None = None,
    preprocessing: dict[str, Any] | None = None,
) -> bytes:
    """A model's ``weights`` (its whole state dict, :meth:`Strategy.full_state`) with everything :func:`load` needs,
    as the bytes of one ``torch.save`` file; ``preprocessing``: the data's standardisation
    (:meth:`dtrain.data.standardize.Standardizer.state`), None where there is none."""
    state = {k: v.detach().cpu() for k, v in weights.items()}
    dtype = next((v.dtype for v in state.values() if v.is_floating_point()), torch.float32)
    record = model_record(config, sizes, dtype, preprocessing) | {
        "step": step,
        "metrics": dict(metrics or {}),
        "state_dict": state,
    }
    buffer = io.BytesIO()
    torch.save(record, buffer)
    return buffer.getvalue()


def save_model(
    path: Path,
    weights: dict[str, torch.Tensor],
    config: Config,
    sizes: ModelSizes,
    step: int,
    metrics: Any = None,
    preprocessing: dict[str, Any] | None = None,
) -> None:
    """Write :func:`model_bytes` to ``path`` atomically (a reader never sees half a file)."""
    write_atomic(path, model_bytes(weights, config, sizes, step, metrics, preprocessing))


@dataclass
class TrainedModel:
    """A model read back from its file: the module (eval mode) and what it was trained as."""

    module: nn.Module
    sizes: ModelSizes
    loss: Any  # dtrain.train.objective.Loss
    dtype: torch.dtype
    record: dict[str, Any]

    @property
    def task(self) -> str:
        return self.sizes.task

    @property
    def preprocessing(self) -> dict[str, Any]:
        """What the data went through before the model (standardisation, remapped classes, a table's columns)."""
        return self.record.get("preprocessing") or {}


def model_path(source: str | Path, best: bool = False) -> Path:
    """The model file of a run directory (``model.pt``, or ``model_best.pt`` with ``best``), or ``source`` itself."""
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / (BEST if best else FINAL)
        if not path.is_file():
            if best:
                raise UserError(f"{path} does not exist: the run kept no best model (that needs checkpoint.save_best)")
            raise UserError(f"{path} does not exist: the run has not finished, or it diverged (see its metrics.json)")
    elif not path.is_file():
        raise UserError(f"{source}: no such run directory or model file")
    return path


def read_model(source: str | Path, best: bool = False, device: str | torch.device = "cpu") -> TrainedModel:
    """The trained model of ``source`` (a run directory, a model file, or a checkpoint: a ``step-N.pt`` file or a
    sharded checkpoint's ``step-N`` directory), rebuilt and on ``device``."""
    from dtrain import checkpoint
    from dtrain.models import build_model
    from dtrain.train.objective import build_loss

    given = Path(source).expanduser()
    if (given / checkpoint.SHARDED_MARK).is_file():
        record = _checkpoint_record(given)
        weights = None  # read from the shards once the module exists
    else:
        path = model_path(source, best)
        try:
            record = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a truncated or foreign file: say which, in one line
            raise UserError(f"{path} is not a model file dtrain can read: {first_line(exc)}") from None
        if isinstance(record, dict) and record.get("format") == checkpoint.FORMAT and "model" in record:
            record = _checkpoint_record(path)  # a checkpoint file: verified against its manifest, then read
        elif not isinstance(record, dict) or record.get("format") != FORMAT:
            raise UserError(f"{path} is not a dtrain model file (format {FORMAT}); was it written by an older dtrain?")
        weights = record["state_dict"]
    sizes = ModelSizes(**record["sizes"])
    module = build_model(model_section(dict(record["model"])), sizes)
    dtype = getattr(torch, record["dtype"])
    module = module.to(dtype)
    if weights is None:  # a sharded checkpoint: its shards, whatever the world size that wrote them, into one module
        weights = module.state_dict()
        checkpoint.read_shards(given, {"model": weights}, alone=True)  # even inside a user's own distributed job
    module.load_state_dict(weights)
    standardizer = Standardizer.from_state(record.get("preprocessing"))
    if standardizer is not None:  # inputs and predictions in the user's units, as the data came
        module = Standardized(module, standardizer).to(dtype)
    module = module.to(device).eval()
    loss = build_loss(loss_section(record["loss"]), sizes.task, sizes.num_classes)
    return TrainedModel(module, sizes, loss, dtype, record)


def _checkpoint_record(path: Path) -> dict[str, Any]:
    """A training checkpoint read as a model record: verified against its manifest; a file's weights under
    ``state_dict``, a sharded checkpoint's left in its shards."""
    from dtrain import checkpoint

    found = checkpoint.find(str(path), path.parent)
    assert found is not None
    state = checkpoint.load(found)
    record = state.get("model_record")
    if record is None:
        raise UserError(
            f"{path} is a checkpoint from before checkpoints described their model; use its run's model.pt, "
            f"or resume the run to write a new checkpoint"
        )
    step = int(state["progress"]["step"])
    return dict(record) | {
        "step": step,
        "metrics": dict(state["progress"].get("metrics", {})),
        "state_dict": state.get("model"),
    }


def load(source: str | Path, best: bool = False, device: str | torch.device = "cpu") -> nn.Module:
    """A run's trained model, ready for inference: ``dtrain.load(RUN_DIR)``.

    ``source`` is a run directory (its ``model.pt``; ``best=True`` for ``model_best.pt``), a model file, or a
    training checkpoint (``checkpoints/step-N.pt``, or a sharded run's ``checkpoints/step-N`` directory). The
    module is in eval mode on ``device``, in the dtype it was trained in (feed it inputs of that dtype, its
    parameters' dtype). A model trained on standardised data comes wrapped with its standardisation
    (:class:`~dtrain.data.standardize.Standardized`, the model itself as ``.model``): it takes inputs and gives
    predictions in the data's own units. A user's model is imported by its ``_target_``: its package must be
    importable.
    """
    return read_model(source, best, device).module
