"""The original example's presets, with correct gradients, tell the true story (see docs/experiments.md)."""

from __future__ import annotations

import itertools

import torch

from dtrain.config import Poly2dConfig
from dtrain.data.synthetic import poly2d
from dtrain.models import Polynomial
from tests.presets_util import NOISE_FLOOR
from tests.presets_util import TRUE_COEFFICIENTS as TRUE
from tests.tb import scalars


def coefficients(run) -> list[float]:
    params = run.params()
    return [float(params[f"c{i}"]) for i in range(5)]


def test_poly2d_preset_recovers_the_five_coefficients(dtrain_run) -> None:
    run = dtrain_run("experiment=poly2d", "trainer.precision=float64")
    assert run.metrics["steps"] == 300
    for got, want in zip(coefficients(run), TRUE, strict=True):
        assert abs(got - want) <= 0.05


def test_seed_bad_converges_with_correct_gradients(dtrain_run) -> None:
    run = dtrain_run("experiment=seed_bad", "trainer.precision=float64")
    assert run.metrics["status"] == "completed"
    assert run.metrics["train/loss"] < 1.1 * NOISE_FLOOR
    for got, want in zip(coefficients(run), TRUE, strict=True):
        assert abs(got - want) <= 0.05


def test_seed_good_is_still_descending_at_epoch_300(dtrain_run) -> None:
    run = dtrain_run("experiment=seed_good", "trainer.precision=float64")
    loss = [v for _, v in scalars(run.run_dir)["train/loss"]]
    assert run.metrics["steps"] == 300
    assert all(b < a for a, b in itertools.pairwise(loss)), "loss should fall at every logged step"
    assert loss[-1] > 1.5 * NOISE_FLOOR  # far from converged
    errors = [abs(g - w) for g, w in zip(coefficients(run), TRUE, strict=True)]
    assert max(errors) >= 0.1


def test_diverge_preset_is_reported_as_diverged(dtrain_run) -> None:
    run = dtrain_run("experiment=diverge", check=False)
    assert run.returncode == 3
    assert run.metrics["status"] == "diverged"
    assert run.metrics["train/loss"] is None  # non-finite, written as null
    assert "training diverged" in run.stderr and "optim.lr=0.2" in run.stderr
    assert "Traceback" not in run.stderr
    assert not (run.run_dir / "model.pt").exists()


def test_gradient_descent_stability_limit_on_the_surface() -> None:
    """The documented numbers: largest Hessian eigenvalue 12.86, so GD is stable below lr = 2/12.86 ~ 0.155."""
    data = poly2d(Poly2dConfig(val_fraction=0.0), torch.Generator().manual_seed(0))
    x, y = data.train.x, data.train.y
    model = Polynomial(2, 2).double()

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(model, {f"c{i}": flat[i] for i in range(5)}, (x,))
        return torch.nn.functional.mse_loss(out, y)

    hessian = torch.autograd.functional.hessian(loss_of, torch.zeros(5, dtype=torch.float64))
    top = torch.linalg.eigvalsh(hessian).max().item()
    assert abs(top - 12.86) < 0.01
    assert abs(2 / top - 0.155) < 0.001

    def final_loss(lr: float, steps: int = 400) -> float:
        flat = torch.zeros(5, dtype=torch.float64, requires_grad=True)
        for _ in range(steps):
            (grad,) = torch.autograd.grad(loss_of(flat), flat)
            flat = (flat - lr * grad).detach().requires_grad_()
        return loss_of(flat).item()

    assert final_loss(0.15) < 1.1 * NOISE_FLOOR
    assert final_loss(0.16) > 1e3  # just past the limit the error grows every step
