"""Each run's trained model, rebuilt on the CPU from ``config.yaml`` + ``model.pt`` with its data set, so the
report can draw it; where that cannot be (no ``model.pt``, a moved data file...), a sentence saying why."""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dtrain.errors import UserError, first_line
from dtrain.report.runs import RunData

if TYPE_CHECKING:
    from dtrain.data.dataset import DataSet


@dataclass
class RunModel:
    """A run's trained model and its data, or the reason there is none to show."""

    predict: Any = None  # Callable[[torch.Tensor], torch.Tensor] | None
    data: DataSet | None = None
    note: str = ""


def load_model(run: RunData) -> RunModel:
    """Rebuild the run's model from its config and trained weights; a reason instead where that cannot be."""
    weights = run.path / "model.pt"
    if not weights.is_file():
        reasons = {
            "diverged": "the run diverged (non-finite loss or gradient), so it saved no model.pt",
            "preempted": "the run was stopped before it finished, so it saved no model.pt yet "
            "(run the same command again to resume it from checkpoints/)",
        }
        return RunModel(note=reasons.get(run.status, "no model.pt: the run has not finished, or it was killed"))
    import torch
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from dtrain.config import load
    from dtrain.data import build_dataset
    from dtrain.model_file import read_model

    try:
        config = load(OmegaConf.create(run.config))
        trained = read_model(weights)
        # The weights' own precision (float64 runs save float64): the data and the grid follow it.
        data = build_dataset(config.data, config.seed).to(torch.device("cpu"), trained.dtype)
        model = trained.module
    except (UserError, OSError, RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError) as exc:
        first = first_line(exc)
        return RunModel(note=f"the model could not be rebuilt from config.yaml and model.pt: {first}")
    except OmegaConfBaseException as exc:
        return RunModel(note=f"config.yaml could not be loaded: {str(exc).splitlines()[0]}")
    model.eval()

    def predict(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            output = model(x)
        return trained.loss.class_logits(output) if trained.task == "classification" else output

    return RunModel(predict=predict, data=data)
