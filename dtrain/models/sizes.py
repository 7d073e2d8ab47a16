"""What a model is sized by: the data's features and the outputs the loss needs. Saved with a trained model, so
``dtrain.load`` rebuilds it without the data."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class ModelSizes:
    """The model's input features, its outputs (targets per row, classes, or 1 binary logit) and its task."""

    num_inputs: int
    num_outputs: int
    task: str  # regression | classification
    num_classes: int = 0  # classification: the classes (num_outputs is 1 where one logit decides two)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
