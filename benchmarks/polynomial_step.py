"""One training step of dtrain's ``Polynomial`` against the formulation it replaced, on the default run's data.

The default run (``python -m dtrain``) trains ``Polynomial(num_inputs=2, degree=2)`` on the 720 training
points of ``poly2d``, full batch, with SGD. Its step is small enough (a fraction of a millisecond) that the
model's own arithmetic shows in the trainer's throughput. Two formulations of the same model, with the
same named scalar coefficients ``c0..c4`` and the same initial values:

``stacked`` (before)
    ``torch.stack`` of the powers into ``[B, inputs, degree]``, flattened, a matmul with the stacked
    coefficients, then the constant added.
``cat+addmm`` (shipped, ``dtrain.models.Polynomial``)
    ``torch.cat`` of whole powers of ``x`` (``x`` itself for the first power), the coefficients stacked in
    that order, one ``torch.addmm`` with the constant.

Each is timed over ``--steps`` full training steps (forward, MSE, backward, SGD step, zero_grad) in one
process with one thread, the variants interleaved over ``--repeats`` rounds; the table gives the medians.

Usage, from the repository root (about 20 seconds)::

    python benchmarks/polynomial_step.py [--steps 2000] [--repeats 7]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from torch import nn

from dtrain.config import Poly2dConfig
from dtrain.data import build_dataset
from dtrain.models import Polynomial


class StackedPolynomial(Polynomial):
    """The formulation before: features stacked input-major, then a matmul and the constant added."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.coefficients()
        features = torch.stack([x**p for p in range(self.degree, 0, -1)], dim=-1).flatten(1)
        return features @ c[:-1].unsqueeze(1) + c[-1]


def time_steps(model_class: type[Polynomial], x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    """Microseconds per training step of a fresh model (seed 0) after 100 warm-up steps."""
    torch.manual_seed(0)
    model = model_class(num_inputs=2, degree=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def step() -> None:
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(100):
        step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return 1e6 * (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = build_dataset(Poly2dConfig(), seed=0).to(torch.device("cpu"), torch.float32)
    x, y = data.train.x, data.train.y
    variants = {"stacked": StackedPolynomial, "cat+addmm": Polynomial}
    # Same function: the two give the same outputs up to rounding.
    torch.manual_seed(0)
    reference = StackedPolynomial(2, 2)
    torch.manual_seed(0)
    shipped = Polynomial(2, 2)
    assert torch.allclose(reference(x), shipped(x), rtol=1e-5, atol=1e-6)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, model_class in variants.items():
            times[name].append(time_steps(model_class, x, y, args.steps))
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread, {args.repeats} rounds")
    print("| formulation | µs per step (median) | all rounds |")
    print("|---|---:|---|")
    for name, values in times.items():
        shown = ", ".join(f"{v:.0f}" for v in values)
        print(f"| {name} | {statistics.median(values):.0f} | {shown} |")
    ratios = [a / b for a, b in zip(times["stacked"], times["cat+addmm"], strict=True)]
    print(f"stacked / cat+addmm, median of per-round ratios: {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
