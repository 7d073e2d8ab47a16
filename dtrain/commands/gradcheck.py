"""``dtrain gradcheck``: verify any configured model's gradients by central finite differences.

The model and data are composed from the same Hydra overrides as training. On a small batch in
float64, each parameter's analytic gradient (torch.autograd for the torch models, the engine's own
backward for ``model=graph``) is compared with central differences; the worst relative error per
parameter is printed, and the exit status is 1 if any exceeds the tolerance.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

from dtrain.compose import compose_config
from dtrain.config import Config, TrainerConfig
from dtrain.data.registry import build_training_data
from dtrain.dist import DistEnv
from dtrain.graph.gradcheck import central_differences, relative_error
from dtrain.models import build_model, model_sizes
from dtrain.train.objective import LossFn, build_loss
from dtrain.train.strategy import build_strategy


def analytic_grads(model: nn.Module, loss: LossFn, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """d(loss)/d(parameter) as training computes it: through the model's own strategy on one process
    (torch.autograd, or the engine's backward for ``model=graph``)."""
    one_process = DistEnv(rank=0, world_size=1, local_rank=0, device=x.device, backend=None)
    strategy = build_strategy(model, one_process, TrainerConfig(precision="float64"), loss)
    model.zero_grad(set_to_none=True)
    strategy.forward_backward([(x, y)], step=1)
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def numeric_grads(
    model: nn.Module, loss: LossFn, x: torch.Tensor, y: torch.Tensor, eps: float
) -> dict[str, torch.Tensor]:
    """Central differences of the loss, one parameter element at a time."""
    return central_differences(model.named_parameters(), lambda: loss(model(x), y).item(), eps)


def check_gradients(config: Config, samples: int, eps: float) -> dict[str, float]:
    """Worst relative error per parameter of the configured model on ``samples`` training points."""
    torch.manual_seed(config.seed)
    data = build_training_data(config.data, config.seed)[0].to(torch.device("cpu"), torch.float64)
    model = build_model(config.model, model_sizes(config, data)).to(torch.float64)
    model.eval()  # no dropout: the loss must be a deterministic function of the parameters
    loss = build_loss(config.loss, data.task, data.num_classes).fn
    x, y = data.train.head(samples)
    analytic = analytic_grads(model, loss, x, y)
    numeric = numeric_grads(model, loss, x, y, eps)
    return {name: relative_error(analytic[name], numeric[name]) for name in analytic}


def main(argv: list[str]) -> int:
    """``dtrain gradcheck [--samples N] [--eps E] [--tolerance T] [hydra overrides]``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="dtrain gradcheck", description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16, help="training points in the batch (default 16)")
    parser.add_argument("--eps", type=float, default=1e-6, help="finite-difference step (default 1e-6)")
    parser.add_argument("--tolerance", type=float, default=1e-6, help="largest relative error that passes")
    args, overrides = parser.parse_known_args(argv)
    config = compose_config(overrides)
    errors = check_gradients(config, args.samples, args.eps)
    width = max(len(name) for name in errors)
    model = getattr(config.model, "target", config.model.name)  # a user's model by its _target_
    print(f"gradcheck: model={model} data={config.data.name}, {args.samples} samples, float64")
    for name, error in errors.items():
        verdict = "ok" if error <= args.tolerance else "FAIL"
        print(f"  {name:<{width}}  {error:.2e}  {verdict}")
    failed = [name for name, error in errors.items() if error > args.tolerance]
    worst = max(errors.values())
    if failed:
        print(f"gradcheck failed: {len(failed)} parameter(s) above tolerance {args.tolerance:g}", file=sys.stderr)
        return 1
    print(f"gradcheck passed: worst relative error {worst:.2e} <= {args.tolerance:g}")
    return 0
