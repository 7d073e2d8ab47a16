"""Determinism on CPU: the same seed and config give bitwise-identical results; 1, 2 and 4 gloo ranks agree.

Every run goes through the real command line (``python -m dtrain`` or ``torchrun --standalone``). A launch
costs seconds of start-up (importing torch; with 4 ranks on the 2-core CI machine, 4 such imports plus
gloo's rendezvous), so each run is keyed, launched at most once per module, shared between the tests that
compare it, and started before its tests ask for it, two launches at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tests.conftest import TIMING_METRICS, Run, assert_ok, run_dtrain
from tests.tb import scalars

pytestmark = pytest.mark.multiprocess

# Mini-batches from a fresh permutation every epoch (not the full batch), a few epochs, logged every 2 steps.
# Every global batch is a multiple of 4, so 1, 2 and 4 ranks see the same samples at every step.
COMMON = ("trainer.device=cpu", "trainer.precision=float64", "trainer.max_epochs=3", "trainer.log_every=2")
CASES: dict[str, tuple[str, ...]] = {
    # DDP. sine: 400 points, 300 inside [-pi, pi], 240 of them for training: 6 steps an epoch.
    "mlp": (
        "model=mlp",
        "model.hidden=[16,16]",
        "model.activation=tanh",
        "data=sine",
        "data.num_points=400",
        "optim=adam",
        "optim.lr=1e-2",
        "trainer.batch_size=40",
    ),
    # The engine's MLP, its gradients all-reduced by dtrain itself; cross-entropy on moons, 320 for training.
    "graph": (
        "model=graph",
        "model.graph=mlp",
        "model.hidden=[8,8]",
        "data=moons",
        "data.num_points=400",
        "optim=adam",
        "optim.lr=1e-2",
        "trainer.batch_size=40",
    ),
    # DDP. poly2d's 30 x 30 grid, 720 points for training: 15 steps an epoch.
    "polynomial": (
        "model=polynomial",
        "data=poly2d",
        "optim=sgd",
        "optim.lr=0.05",
        "optim.momentum=0.9",
        "trainer.batch_size=48",
    ),
}
# The MLP with dropout: masks come from torch's generator, seeded per rank by dtrain.
CASES["mlp_dropout"] = (*CASES["mlp"], "model.dropout=0.2")
STEPS = {
    "mlp": 3 * (240 // 40),
    "mlp_dropout": 3 * (240 // 40),
    "graph": 3 * (320 // 40),
    "polynomial": 3 * (720 // 48),
}


# Across world sizes only the order of the gradient sums differs, so the parameters (of order 0.01 to 2)
# differ by a few float64 ulps: at most 4.4e-16 absolute and 7e-13 relative, measured on these cases.
# rtol=1e-10 is the bound. atol only keeps a parameter that ends near zero, where a relative bound
# means nothing, from failing on rounding alone: 1e-12 leaves ~2000x headroom over the rounding seen, and a
# wrong sample, a missed rank or a wrong average moves parameters by many orders of magnitude more.
ATOL = 1e-12

RunKey = tuple[str, int, int]  # (case, nproc, copy): nproc=0 is one plain process; copy tells repeats apart


class Runs:
    """Launch each keyed run once, two at a time (the CI machine has two cores), and hand out the results."""

    def __init__(self, root: Path, pool: ThreadPoolExecutor) -> None:
        self.root = root
        self.pool = pool
        self.started: dict[RunKey, Future[Run]] = {}

    def start(self, *keys: RunKey) -> list[Future[Run]]:
        """Launch the runs of ``keys`` that are not launched yet (in the pool); their futures, in order."""
        for key in keys:
            if key not in self.started:
                case, nproc, copy = key
                run_dir = self.root / f"{case}-n{nproc}-{copy}"
                # Processes of their own: the point is separate processes, two at a time.
                args = (run_dtrain, run_dir, *COMMON, *CASES[case])
                self.started[key] = self.pool.submit(*args, nproc=nproc, own_process=True)
        return [self.started[key] for key in keys]

    def get(self, *keys: RunKey) -> list[Run]:
        """The finished runs of ``keys``, each checked for exit status 0."""
        return [assert_ok(future.result()) for future in self.start(*keys)]


def same_seed_runs() -> list[RunKey]:
    """Two separate processes with dropout, and the same run without dropout as a control."""
    return [("mlp_dropout", 0, 0), ("mlp_dropout", 0, 1), ("mlp", 0, 0)]


def world_size_runs(case: str, nproc: int) -> list[RunKey]:
    """One process, and ``nproc`` ranks with the same global batch."""
    return [(case, 0, 0), (case, nproc, 0)]


def repeat_runs() -> list[RunKey]:
    """Two launches of the same config on 2 ranks, with dropout: each rank draws from its own seeded stream."""
    return [("mlp_dropout", 2, 0), ("mlp_dropout", 2, 1)]


# Per test of this module: the runs it compares, given its parameters. The fixture starts them all up front.
PLAN: dict[str, Callable[..., list[RunKey]]] = {
    "test_same_seed_and_config_in_two_processes_is_bitwise_identical": same_seed_runs,
    "test_ranks_with_the_same_global_batch_agree_to_float64_rounding": world_size_runs,
    "test_two_launches_on_two_ranks_are_bitwise_identical": repeat_runs,
}


@pytest.fixture(scope="module")
def runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runs]:
    """Shared runs; those of every selected test of this module are launched now, in test order."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        shared = Runs(tmp_path_factory.mktemp("determinism"), pool)
        for item in request.session.items:
            if isinstance(item, pytest.Function) and item.module is request.module and item.originalname in PLAN:
                callspec = getattr(item, "callspec", None)
                shared.start(*PLAN[item.originalname](**(callspec.params if callspec else {})))
        yield shared
        pool.shutdown(cancel_futures=True)  # a test that failed early leaves runs nobody will read


def deterministic_metrics(run: Run) -> dict:
    """``metrics.json`` without the timing fields (and it had them: nothing else is left out by mistake)."""
    metrics = run.metrics
    assert metrics.keys() >= set(TIMING_METRICS)
    return {k: v for k, v in metrics.items() if k not in TIMING_METRICS}


def deterministic_scalars(run: Run) -> dict[str, list[tuple[int, float]]]:
    """Every TensorBoard scalar series of ``run`` except those that measure time (``hparam/wall_time_s``, ...)."""
    series = scalars(run.run_dir)
    return {tag: values for tag, values in series.items() if not tag.endswith(TIMING_METRICS)}


def assert_params_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Same names, dtypes, shapes and bits."""
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), f"{name} differs: max |diff| {(a[name] - b[name]).abs().max():.3g}"


def test_same_seed_and_config_in_two_processes_is_bitwise_identical(runs: Runs) -> None:
    """Shuffled mini-batches and dropout: metrics, TensorBoard series and weights repeat bit for bit."""
    first, second, without_dropout = runs.get(*same_seed_runs())
    assert first.metrics["status"] == "completed" and first.metrics["steps"] == STEPS["mlp_dropout"]

    assert deterministic_metrics(first) == deterministic_metrics(second)
    assert_params_equal(first.params(), second.params())
    series, again = deterministic_scalars(first), deterministic_scalars(second)
    assert [step for step, _ in series["train/loss"]] == list(range(2, STEPS["mlp_dropout"] + 1, 2))
    assert series["train/loss"] == again["train/loss"]
    assert series.keys() > {"train/loss", "val/loss", "grad_norm/total", "hparam/val/loss"}
    assert series == again

    # Not vacuous: dropout draws from the generator and changes the trajectory, so its draws were repeated.
    control = without_dropout.params()
    assert any(not torch.equal(first.params()[name], control[name]) for name in control)


# The MLP (DDP) on 4 ranks, the largest change of reduction order; the engine's MLP (dtrain's own all-reduce) on
# 2. test_distributed.py adds the polynomial under DDP with gradient accumulation on 2 ranks.
@pytest.mark.parametrize(("case", "nproc"), [("mlp", 4), ("graph", 2)])
def test_ranks_with_the_same_global_batch_agree_to_float64_rounding(runs: Runs, case: str, nproc: int) -> None:
    """N gloo ranks (DDP, or dtrain's bucketed all-reduce for the engine) == one process, to rtol 1e-10."""
    single, ranks = runs.get(*world_size_runs(case, nproc))
    assert single.metrics["world_size"] == 1 and ranks.metrics["world_size"] == nproc
    assert single.metrics["steps"] == ranks.metrics["steps"] == STEPS[case]
    one, many = single.params(), ranks.params()
    assert one.keys() == many.keys() and len(one) > 0
    for name in one:
        assert many[name].dtype == one[name].dtype == torch.float64
        torch.testing.assert_close(many[name], one[name], rtol=1e-10, atol=ATOL, msg=lambda m, n=name: f"{n}: {m}")
    # The logged metrics are reduced across ranks before they are written, so they agree as well.
    for key in ("train/loss", "val/loss", "grad_norm/total"):
        assert ranks.metrics[key] == pytest.approx(single.metrics[key], rel=1e-9), key


def test_two_launches_on_two_ranks_are_bitwise_identical(runs: Runs) -> None:
    """With the world size fixed, so is the reduction order, and dropout's per-rank streams repeat too."""
    first, second = runs.get(*repeat_runs())
    assert first.metrics["world_size"] == second.metrics["world_size"] == 2
    assert first.metrics["steps"] == STEPS["mlp_dropout"]
    assert_params_equal(first.params(), second.params())
    assert deterministic_metrics(first) == deterministic_metrics(second)
