"""The project's own loss: cross-entropy against targets smoothed towards the uniform distribution.

dtrain calls it as ``smoothed_cross_entropy(prediction, target, **args)``, with the arguments of
``conf/loss/smoothed_ce.yaml`` (or ``loss.smoothing=...`` on the command line) bound after the first two.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def smoothed_cross_entropy(prediction: torch.Tensor, target: torch.Tensor, smoothing: float = 0.1) -> torch.Tensor:
    """Mean over rows of ``-sum_k q_k log p_k``, q = (1 - smoothing) * one_hot(target) + smoothing / K.

    ``prediction``: logits ``[N, K]``; ``target``: class indices ``[N]`` (0..K-1). Returns a scalar tensor.
    """
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing={smoothing} must be in [0, 1)")
    log_p = F.log_softmax(prediction, dim=-1)
    nll = -log_p.gather(-1, target.long().unsqueeze(-1)).squeeze(-1)
    uniform = -log_p.mean(dim=-1)
    return ((1.0 - smoothing) * nll + smoothing * uniform).mean()
