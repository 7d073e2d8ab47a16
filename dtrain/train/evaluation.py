"""Evaluation: validation metrics over every rank's slice of each split, and the model's figures.

Metrics are sums over rows reduced across ranks in one collective, so shards of any size give the
exact mean; each slice is evaluated ``chunk`` rows at a time, so evaluation needs no more memory than
training, and every rank runs the same number of forwards (a sharded model's forward gathers weights).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from dtrain.data.dataset import AnySplit, DataSet
from dtrain.data.loader import shard_bounds
from dtrain.dist import DistEnv, all_reduce_sum
from dtrain.train.metrics import ValMetrics
from dtrain.train.objective import Loss, metric_sums, val_tag

Predict = Callable[[torch.Tensor], torch.Tensor]


def evaluate(
    model: nn.Module,
    predict: Predict,
    val: dict[str, AnySplit],
    loss: Loss,
    metrics: ValMetrics,
    env: DistEnv,
    chunk: int,
    lockstep: bool = False,
) -> dict[str, float]:
    """Validation metrics (``val/loss``, ``val/accuracy``, ``val/f1``, ``val/loss_outer``...) of ``predict``
    (``model``'s forward, run in eval mode) over every rank's disjoint slice of each split.

    The loss and the counted accuracy are sums reduced in one all-reduce; torchmetrics reduces its own
    metrics. Collectives and a host sync: call it on every rank. ``lockstep``: a forward is itself a collective
    (a sharded model), so every rank runs as many as the largest slice needs.
    """
    if not val:
        return {}
    was_training = model.training
    model.eval()
    parts: list[torch.Tensor] = []
    layout: list[tuple[str, list[str]]] = []
    library: dict[str, float] = {}
    with torch.no_grad():
        for suffix, split in val.items():
            start, stop = shard_bounds(len(split), env.rank, env.world_size)
            # With lockstep every rank runs as many forwards as the largest slice needs, those past its own rows
            # on no rows. An empty slice still yields zero sums.
            largest = shard_bounds(len(split), 0, env.world_size)[1] if lockstep else stop - start
            rounds = max(1, -(-largest // chunk))
            sums: dict[str, torch.Tensor] = {}
            metrics.reset()
            for lo in range(start, start + rounds * chunk, chunk):
                lo = min(lo, stop)
                hi = min(lo + chunk, stop)
                x, target = split.rows(lo, hi)
                output = predict(x)
                for name, value in metric_sums(loss, output, target, metrics.counts_accuracy).items():
                    sums[name] = sums.get(name, 0) + value.to(torch.float64)
                if hi > lo:
                    metrics.update(output, target)
            library.update({val_tag(name, suffix): value for name, value in metrics.compute().items()})
            layout.append((suffix, list(sums)))
            parts.extend(sums.values())
            parts.append(torch.tensor(float(stop - start), dtype=torch.float64, device=env.device))
    model.train(was_training)
    totals = all_reduce_sum(torch.stack(parts), env).tolist()
    results: dict[str, float] = {}
    i = 0
    for suffix, names in layout:
        count = totals[i + len(names)]
        for name in names:
            results[val_tag(name, suffix)] = totals[i] / count
            i += 1
        i += 1
    return results | library


def draw_figures(
    model: nn.Module, data: DataSet, device: torch.device, chunk: int, loss: Loss
) -> dict[str, np.ndarray]:
    """The model's figures (:mod:`dtrain.train.figures`) as RGB images, the model run in eval mode in chunks."""
    from dtrain.train.figures import figure_to_rgb, model_figures

    def predict(x: torch.Tensor) -> torch.Tensor:
        outputs = [model(x[i : i + chunk].to(device)).float().cpu() for i in range(0, len(x), chunk)]
        output = torch.cat(outputs)
        return loss.class_logits(output) if data.task == "classification" else output

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return {tag: figure_to_rgb(figure) for tag, figure in model_figures(predict, data).items()}
    finally:
        model.train(was_training)
