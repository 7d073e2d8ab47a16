"""Time one full-batch training step of the same model three ways: dtrain's graph engine, torch.autograd (on
dtrain's torch models, and on the engine's own operations), and a scalar-valued engine of the micrograd kind.

A step is forward + backward + SGD update + zero_grad, on the whole data set at once:

``engine``
    dtrain's tensor-valued engine (``dtrain/graph``): a graph from ``builders.polynomial`` or ``builders.mlp``,
    ``loss.forward(x=..., y=...)``, ``loss.backward()``, then ``torch.optim.SGD.step`` and ``zero_grad`` on
    the parameter tensors.
``torch``
    ``dtrain.models.Polynomial`` / ``dtrain.models.MLP`` with the same weights, ``F.mse_loss``,
    ``loss.backward()`` through torch.autograd, the same SGD step and ``zero_grad``.
``torch-ops``
    torch.autograd on the engine graph's own operations, written out by hand with the same weights: for
    poly2d ``x[:, i:i+1]`` columns, ``c * column**p`` terms and a chain of additions (``dtrain.models.Polynomial``
    instead stacks the powers and multiplies by a coefficient vector); for the MLP ``h @ w.T + b`` (``nn.Linear``
    fuses the two into ``addmm``). It tells apart what the engine costs and what the model's formulation costs.
``scalar``
    :class:`Value` below: one graph node per number, built anew at every forward, backward by topological
    sort, in the manner of Karpathy's micrograd (a minimal reimplementation, so nothing is installed; with
    ``__slots__``, tuples for the inputs and an iterative sort it ran 1.1-2.5x faster than micrograd 0.1.0).
    It is very slow, so it is timed for a few steps only, at the small sizes and at poly2d's 10^5 points (there
    and for the MLP at 64 points with the collector paused only: see below); its numbers are Python floats
    (64-bit), so one timing serves both dtypes.

The models: ``poly2d``, the original example's ``c0 x1^2 + c1 x1 + c2 x2^2 + c3 x2 + c4`` (5 scalar parameters),
and ``mlp``, 2 -> 64 -> 64 -> 1 with tanh (4,353 parameters). The data: at 900 points, dtrain's ``poly2d`` data
set (the 30 x 30 grid on [-2, 2]^2, train and validation together); at other sizes, that surface with the
same coefficients and noise at points drawn uniformly from [-2, 2]^2.

Before timing, each case runs one step of every variant from the same weights and checks that they agree
(loss and updated parameters). The timing: a warm-up, then ``--repeats`` blocks of steps per variant,
interleaved (engine, torch, torch-ops, engine, ...), each block about ``--block-seconds`` long; the figure is
the median over blocks of the time per step. Python's cyclic garbage collector is paused during every timed
block (and run between blocks, untimed), as ``timeit`` does. That matters for the scalar engine only: each of
its nodes holds a closure that refers back to the node, so every step leaves tens of thousands of reference
cycles, and in a process that has imported torch the collections they trigger multiply its step time by 7-9.
Its step is therefore timed both ways: ``scalar`` (collector paused: the engine's own cost, the conservative
figure for the scalar / engine ratio) and ``scalar+gc`` (collector on, steady state: what a user of such an
engine sees in this process). The script waits for the CPU to go quiet before each case and times a block
again (at most 3 attempts) if other processes used more than 0.2 of a core while it ran
(the guard of ``ddp_throughput.py``). torch runs on ``--threads`` intra-op threads (default 1).

Usage, from the repository root (about 3 minutes on a 2-core CPU)::

    python benchmarks/graph_step.py [--dtypes float32 float64] [--repeats 5] [--threads 1] [--out table.md]
    python benchmarks/graph_step.py --profile poly2d:100000:float64   # torch.profiler tables for one case
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parent.parent
# This checkout's dtrain (whatever else is installed) and its sibling ddp_throughput.py, however this is started.
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

from ddp_throughput import OTHER_LOAD_LIMIT, machine, machine_cpu_seconds, wait_until_quiet  # noqa: E402

from dtrain.config import Poly2dConfig  # noqa: E402
from dtrain.data import build_dataset  # noqa: E402
from dtrain.graph import builders  # noqa: E402
from dtrain.models import MLP, Polynomial  # noqa: E402

VARIANTS = ("engine", "torch", "torch-ops", "scalar", "scalar+gc")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
HIDDEN = [64, 64]
LR = 0.01
MAX_ATTEMPTS = 3  # timings of one block, if other processes disturb it
ENGINE_TARGET = 1.5  # engine / torch, at 10^5 points and above
ENGINE_TARGET_POINTS = 100_000
SCALAR_TARGET = 1000.0  # scalar / engine

Step = Callable[[], object]  # one training step; returns the loss (a tensor or a Python float)


@dataclass(frozen=True)
class Case:
    """One model at one data size; ``scalar`` says whether the scalar engine is timed too, ``scalar_gc`` whether
    also with the garbage collector on (7-9x slower: only at the smallest sizes)."""

    model: str  # poly2d | mlp
    num_points: int
    scalar: bool = False
    scalar_gc: bool = False

    @property
    def label(self) -> str:
        """The model's name in the report."""
        return "poly2d" if self.model == "poly2d" else f"mlp 2-{'-'.join(map(str, HIDDEN))}-1 tanh"


CASES = (
    Case("poly2d", 900, scalar=True, scalar_gc=True),
    Case("poly2d", 100_000, scalar=True),  # about 4 s a scalar step and 0.5 GB of Values
    Case("poly2d", 1_000_000),
    Case("mlp", 16, scalar=True, scalar_gc=True),
    Case("mlp", 64, scalar=True),  # about 1.7 s a scalar step
    Case("mlp", 4096),
    Case("mlp", 100_000),
)


# ---------------------------------------------------------------------------------------------
# A scalar-valued engine of the micrograd kind: one node per number


def _leaf_backward() -> None:
    """A leaf's backward rule: nothing to pass on."""


class Value:
    """A scalar in a graph of scalars; ``backward`` pushes ``grad`` to every Value it depends on."""

    __slots__ = ("_backward", "_prev", "data", "grad")

    def __init__(self, data: float, prev: tuple[Value, ...] = ()) -> None:
        self.data = data
        self.grad = 0.0
        self._prev = prev
        self._backward: Callable[[], None] = _leaf_backward

    def __add__(self, other: Value | float) -> Value:
        other = other if isinstance(other, Value) else Value(other)
        out = Value(self.data + other.data, (self, other))

        def _backward() -> None:
            self.grad += out.grad
            other.grad += out.grad

        out._backward = _backward
        return out

    def __mul__(self, other: Value | float) -> Value:
        other = other if isinstance(other, Value) else Value(other)
        out = Value(self.data * other.data, (self, other))

        def _backward() -> None:
            self.grad += other.data * out.grad
            other.grad += self.data * out.grad

        out._backward = _backward
        return out

    def __pow__(self, exponent: float) -> Value:
        out = Value(self.data**exponent, (self,))

        def _backward() -> None:
            self.grad += exponent * self.data ** (exponent - 1) * out.grad

        out._backward = _backward
        return out

    def tanh(self) -> Value:
        """tanh of this Value, a new node."""
        t = math.tanh(self.data)
        out = Value(t, (self,))

        def _backward() -> None:
            self.grad += (1 - t * t) * out.grad

        out._backward = _backward
        return out

    def relu(self) -> Value:
        """max(0, this Value), a new node."""
        out = Value(self.data if self.data > 0 else 0.0, (self,))

        def _backward() -> None:
            self.grad += (out.data > 0) * out.grad

        out._backward = _backward
        return out

    def __neg__(self) -> Value:
        return self * -1.0

    def __sub__(self, other: Value | float) -> Value:
        return self + (-other)

    def __radd__(self, other: float) -> Value:
        return self + other

    def __rmul__(self, other: float) -> Value:
        return self * other

    def backward(self) -> None:
        """Topological order of the graph (iterative: a 900-point sum is deeper than Python's recursion limit),
        then each node's local rule in reverse."""
        order: list[Value] = []
        seen: set[int] = set()
        stack: list[tuple[Value, bool]] = [(self, False)]
        while stack:
            node, expanded = stack.pop()
            if expanded:
                order.append(node)
                continue
            if id(node) in seen:
                continue
            seen.add(id(node))
            stack.append((node, True))
            stack.extend((p, False) for p in node._prev if id(p) not in seen)
        self.grad = 1.0
        for node in reversed(order):
            node._backward()


@dataclass
class ScalarModel:
    """The benchmark's models written with :class:`Value`: parameters in dtrain's order, data as Python floats."""

    model: str
    params: list[Value]
    x: list[list[float]]
    y: list[float]
    layers: list[tuple[list[list[Value]], list[Value]]] = field(default_factory=list)

    def predict(self, row: list[float]) -> Value:
        """The model's output for one data point, as a new graph of Values."""
        inputs = [Value(v) for v in row]  # data enters the graph as nodes, as micrograd wraps it
        if self.model == "poly2d":  # the engine's term order: c0 x1^2 + c1 x1 + c2 x2^2 + c3 x2 + c4
            c = self.params
            return c[0] * inputs[0] ** 2 + c[1] * inputs[0] + c[2] * inputs[1] ** 2 + c[3] * inputs[1] + c[4]
        h = inputs
        for i, (weight, bias) in enumerate(self.layers):
            h = [sum((w * v for w, v in zip(row_w, h, strict=True)), b) for row_w, b in zip(weight, bias, strict=True)]
            if i < len(self.layers) - 1:
                h = [v.tanh() for v in h]
        return h[0]

    def step(self) -> float:
        """Forward (building the graph), backward, SGD update and zero_grad; returns the loss."""
        total = sum(((self.predict(row) - target) ** 2 for row, target in zip(self.x, self.y, strict=True)), Value(0.0))
        loss = total * (1.0 / len(self.y))
        loss.backward()
        for p in self.params:
            p.data -= LR * p.grad
            p.grad = 0.0
        return loss.data


def scalar_model(case: Case, reference: nn.Module, x: torch.Tensor, y: torch.Tensor) -> ScalarModel:
    """The scalar version of ``reference`` (same weights) on the data (x, y)."""
    xs, ys = x.double().tolist(), y.double().reshape(-1).tolist()
    if case.model == "poly2d":
        return ScalarModel("poly2d", [Value(c) for c in reference.coefficients().tolist()], xs, ys)
    layers: list[tuple[list[list[Value]], list[Value]]] = []
    params: list[Value] = []
    for linear in [*(block.linear for block in reference.blocks), reference.head]:
        weight = [[Value(float(w)) for w in row] for row in linear.weight.tolist()]
        bias = [Value(float(b)) for b in linear.bias.tolist()]
        layers.append((weight, bias))
        params += [w for row in weight for w in row] + bias
    return ScalarModel("mlp", params, xs, ys, layers)


def scalar_parameters(model: ScalarModel) -> list[float]:
    """Parameters in dtrain's order: per layer the weight row by row, then the bias."""
    return [p.data for p in model.params]


# ---------------------------------------------------------------------------------------------
# Data, models and steps


def make_data(case: Case, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs [N, 2] and targets [N, 1] on the poly2d surface (dtrain's own grid at 900 points)."""
    cfg = Poly2dConfig()
    if case.num_points == cfg.grid_size**2:
        data = build_dataset(cfg, seed)
        x = torch.cat([data.train.x, data.val[""].x])
        y = torch.cat([data.train.y, data.val[""].y])
    else:
        gen = torch.Generator().manual_seed(seed)
        x = cfg.low + (cfg.high - cfg.low) * torch.rand(case.num_points, 2, generator=gen, dtype=torch.float64)
        c = cfg.coefficients
        clean = c[0] * x[:, 0] ** 2 + c[1] * x[:, 0] + c[2] * x[:, 1] ** 2 + c[3] * x[:, 1] + c[4]
        y = (clean + cfg.noise * torch.randn(clean.shape, generator=gen, dtype=torch.float64)).unsqueeze(1)
    return x.to(dtype).contiguous(), y.to(dtype).contiguous()


def torch_model(case: Case, dtype: torch.dtype, seed: int) -> nn.Module:
    """dtrain's torch model for the case, initialised from ``seed``."""
    torch.manual_seed(seed)
    model = Polynomial(2, 2) if case.model == "poly2d" else MLP(2, HIDDEN, 1, activation="tanh")
    return model.to(dtype)


def engine_graph(case: Case, reference: nn.Module) -> builders.Built:
    """The engine's graph of the same model, with copies of ``reference``'s weights."""
    if case.model == "poly2d":
        return builders.polynomial([c.detach().clone() for c in reference.coefficients()], 2, 2)
    named = {name: p.detach().clone() for name, p in reference.named_parameters()}
    layers = [(named[f"blocks.{i}.linear.weight"], named[f"blocks.{i}.linear.bias"]) for i in range(len(HIDDEN))]
    layers.append((named["head.weight"], named["head.bias"]))
    return builders.mlp(layers, "tanh", "regression")


def engine_step(built: builders.Built, x: torch.Tensor, y: torch.Tensor) -> Step:
    """forward, backward, SGD step, zero_grad, with the engine."""
    optimizer = torch.optim.SGD(built.loss.parameter_tensors(), lr=LR)

    def step() -> torch.Tensor:
        loss = built.loss.forward(x=x, y=y)
        built.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss

    return step


def torch_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Step:
    """forward, backward, SGD step, zero_grad, with torch.autograd."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)

    def step() -> torch.Tensor:
        loss = F.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.detach()

    return step


def torch_ops_step(
    case: Case, reference: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> tuple[Step, list[torch.Tensor]]:
    """The engine graph's operations, one for one, under torch.autograd (same weights as ``reference``).

    Returns the step and its parameters (copies of ``reference``'s, in dtrain's order)."""
    params = [p.detach().clone().requires_grad_() for p in reference.parameters()]  # dtrain's parameter order
    optimizer = torch.optim.SGD(params, lr=LR)

    def predict() -> torch.Tensor:
        if case.model == "poly2d":  # as builders.polynomial: terms in order, each added onto the sum so far
            c, columns = params, (x[:, 0:1], x[:, 1:2])
            terms = [c[0] * columns[0] ** 2, c[1] * columns[0], c[2] * columns[1] ** 2, c[3] * columns[1]]
            prediction = c[4]
            for term in terms:
                prediction = term + prediction
            return prediction
        h = x
        for i in range(0, len(params), 2):
            h = h @ params[i].transpose(-1, -2) + params[i + 1]
            if i < len(params) - 2:
                h = torch.tanh(h)
        return h

    def step() -> torch.Tensor:
        loss = F.mse_loss(predict(), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.detach()

    return step, params


def flat(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """The tensors' values as one float64 vector, for comparing parameters across variants."""
    return torch.cat([t.detach().double().reshape(-1) for t in tensors])


def build_steps(case: Case, dtype: torch.dtype, seed: int, with_scalar: bool) -> dict[str, Step]:
    """The case's step for each variant, all from the same weights, after checking that one step agrees."""
    x, y = make_data(case, dtype, seed)
    model = torch_model(case, dtype, seed)
    built = engine_graph(case, model)
    scalar = scalar_model(case, model, x, y) if with_scalar else None
    ops, ops_params = torch_ops_step(case, model, x, y)
    steps: dict[str, Step] = {"engine": engine_step(built, x, y), "torch": torch_step(model, x, y), "torch-ops": ops}

    # One step each from the same weights: the same loss, the same updated parameters.
    # float32: torch's Polynomial sums its coefficient gradients through a matmul that accumulates in float32
    # one point after another (relative error 5e-4 at 10^6 points, against 1e-7 for the engine's pairwise sums).
    tol = {"rtol": 2e-3, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-9, "atol": 1e-12}
    loss_engine, loss_torch = float(steps["engine"]()), float(steps["torch"]())
    params_engine, params_torch = flat(p.tensor for p in built.parameters), flat(model.parameters())
    if not math.isclose(loss_engine, loss_torch, rel_tol=tol["rtol"]):
        raise AssertionError(f"{case} {dtype}: engine loss {loss_engine} != torch loss {loss_torch}")
    torch.testing.assert_close(params_engine, params_torch, **tol)
    loss_ops = float(ops())
    if not math.isclose(loss_engine, loss_ops, rel_tol=tol["rtol"]):
        raise AssertionError(f"{case} {dtype}: engine loss {loss_engine} != torch-ops loss {loss_ops}")
    torch.testing.assert_close(params_engine, flat(ops_params), **tol)
    if scalar is not None:
        loss_scalar = scalar.step()
        if not math.isclose(loss_scalar, loss_engine, rel_tol=tol["rtol"]):
            raise AssertionError(f"{case}: scalar loss {loss_scalar} != engine loss {loss_engine}")
        torch.testing.assert_close(torch.tensor(scalar_parameters(scalar), dtype=torch.float64), params_engine, **tol)
        steps["scalar"] = scalar.step
    return steps


# ---------------------------------------------------------------------------------------------
# Timing


@dataclass
class Timing:
    """Seconds per step, one figure per timed block, and how often other processes got in the way."""

    per_step: list[float] = field(default_factory=list)
    retried: int = 0  # blocks timed again because other processes used the CPU
    disturbed: int = 0  # blocks that were disturbed in every attempt (kept anyway)

    @property
    def median_ms(self) -> float:
        """The median over blocks, in milliseconds per step."""
        return statistics.median(self.per_step) * 1e3


@contextmanager
def collector_paused(paused: bool = True) -> Iterator[None]:
    """Collect garbage now and keep Python's cyclic garbage collector off for the block; no-op if not ``paused``."""
    if not paused:  # leave the collector as training would: on, with the garbage of earlier steps pending
        yield
        return
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def time_block(step: Step, n: int) -> tuple[float, float]:
    """Run ``n`` steps; return seconds per step and the CPU cores other processes kept busy meanwhile."""
    machine_before, own_before, started = machine_cpu_seconds(), time.process_time(), time.perf_counter()
    for _ in range(n):
        step()
    elapsed = time.perf_counter() - started
    others = (machine_cpu_seconds() - machine_before - (time.process_time() - own_before)) / elapsed
    return elapsed / n, others


def timed_block(step: Step, n: int, timing: Timing, gc_paused: bool = True) -> None:
    """Time one block, again (up to ``MAX_ATTEMPTS`` in all) while other processes disturb it."""
    for attempt in range(1, MAX_ATTEMPTS + 1):
        with collector_paused(gc_paused):
            per_step, others = time_block(step, n)
        if others <= OTHER_LOAD_LIMIT:
            break
        if attempt < MAX_ATTEMPTS:
            timing.retried += 1
            wait_until_quiet(patience_s=3.0)
        else:
            timing.disturbed += 1
    timing.per_step.append(per_step)


def steps_per_block(step: Step, block_seconds: float) -> int:
    """Warm up for about half a block (at least two steps); return the steps that fill one block."""
    started, done = time.perf_counter(), 0
    while done < 2 or time.perf_counter() - started < block_seconds / 2:
        step()
        done += 1
    return max(1, round(block_seconds * done / (time.perf_counter() - started)))


def time_case(
    steps: dict[str, Step], repeats: int, block_seconds: float, scalar_steps: int, scalar_gc: bool
) -> dict[str, Timing]:
    """Interleaved blocks of the engine and the two torch steps, then single steps of the scalar engine if present
    (collector paused, then, if ``scalar_gc``, on: after one untimed step, so that the garbage of earlier steps is
    there as it would be in training)."""
    wait_until_quiet(patience_s=10.0)
    fast = VARIANTS[:3]
    sizes = {v: steps_per_block(steps[v], block_seconds) for v in fast}
    timings = {v: Timing() for v in fast}
    for _ in range(repeats):
        for variant in fast:
            timed_block(steps[variant], sizes[variant], timings[variant])
    if "scalar" in steps:
        timings["scalar"] = Timing()
        for _ in range(scalar_steps):
            timed_block(steps["scalar"], 1, timings["scalar"])
        if not scalar_gc:
            return timings
        timings["scalar+gc"] = Timing()
        steps["scalar"]()  # collector on from here: the next steps find this one's garbage, as in training
        for _ in range(scalar_steps):
            timed_block(steps["scalar"], 1, timings["scalar+gc"], gc_paused=False)
    return timings


# ---------------------------------------------------------------------------------------------
# Report


def git_commit() -> str:
    """``git rev-parse --short HEAD``, marked if dtrain/ has local changes; ``unknown`` outside git."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()

    try:
        dirty = git("status", "--porcelain", "--", "dtrain")
        return git("rev-parse", "--short", "HEAD") + (" +local changes in dtrain/" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cell(timing: Timing | None) -> str:
    """Median ms per step with the range over blocks, or a dash."""
    if timing is None:
        return "-"
    lo, hi = min(timing.per_step) * 1e3, max(timing.per_step) * 1e3
    return f"{ms(timing.median_ms)} ({ms(lo)}-{ms(hi)})"


def ms(value: float) -> str:
    """Three significant digits, without exponents: 0.519, 17.6, 276, 2,676."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def report(results: dict[tuple[Case, str], dict[str, Timing]], args: argparse.Namespace, commit: str) -> str:
    """Markdown: the table of median step times and ratios, the verdict on each target, the disturbances."""
    lines = [
        f"Machine: {machine()}; torch threads: {args.threads}. dtrain commit {commit}.",
        "",
        f"Full-batch SGD step (lr {LR}), median over {args.repeats} blocks of ~{args.block_seconds} s "
        f"(scalar engine: {args.scalar_steps} single steps each way); ms per step, range over blocks in brackets. "
        "Garbage collector paused while timing, except in the scalar+gc column.",
        "",
        "| model | points | dtype | engine ms | torch ms | torch-ops ms | scalar ms | scalar+gc ms "
        "| engine / torch | engine / torch-ops | scalar / engine | scalar+gc / engine |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    verdicts: list[str] = []
    for (case, dtype), timings in results.items():
        engine, torch_, scalar, scalar_gc = (timings.get(v) for v in ("engine", "torch", "scalar", "scalar+gc"))
        assert engine is not None and torch_ is not None
        ratio = engine.median_ms / torch_.median_ms
        ops_ratio = engine.median_ms / timings["torch-ops"].median_ms
        scalar_ratio = scalar.median_ms / engine.median_ms if scalar else None
        gc_ratio = scalar_gc.median_ms / engine.median_ms if scalar_gc else None
        lines.append(
            f"| {case.label} | {case.num_points:,} | {dtype} | {cell(engine)} | {cell(torch_)} | "
            f"{cell(timings['torch-ops'])} | {cell(scalar)} | {cell(scalar_gc)} | {ratio:.2f} | {ops_ratio:.2f} | "
            f"{f'{scalar_ratio:,.0f}x' if scalar_ratio else '-'} | {f'{gc_ratio:,.0f}x' if gc_ratio else '-'} |"
        )
        where = f"{case.model} {case.num_points:,} points {dtype}"
        if case.num_points >= ENGINE_TARGET_POINTS:
            met = "met" if ratio <= ENGINE_TARGET else "MISSED"
            verdicts.append(
                f"- engine / torch <= {ENGINE_TARGET} at {where}: {ratio:.2f}, {met} "
                f"(engine / torch-ops: {ops_ratio:.2f})"
            )
        if scalar_ratio is not None:
            met = "met" if scalar_ratio >= SCALAR_TARGET else "MISSED"
            with_gc = ""
            if gc_ratio is not None:
                met_gc = "met" if gc_ratio >= SCALAR_TARGET else "MISSED"
                with_gc = f" (with the garbage collector on: {gc_ratio:,.0f}x, {met_gc})"
            verdicts.append(
                f"- scalar / engine >= {SCALAR_TARGET:,.0f}x at {where}: {scalar_ratio:,.0f}x, {met}{with_gc}"
            )
    lines += ["", "Targets:", "", *verdicts]
    retried = sum(t.retried for ts in results.values() for t in ts.values())
    disturbed = sum(t.disturbed for ts in results.values() for t in ts.values())
    if retried:
        lines += ["", f"{retried} block(s) were disturbed by other processes and timed again."]
    if disturbed:
        lines += ["", f"Warning: {disturbed} block(s) shared the CPU with other processes in every attempt."]
    return "\n".join(lines) + "\n"


def profile_case(spec: str, seed: int) -> str:
    """torch.profiler tables (self CPU time per op) of the engine and the torch step for ``model:points:dtype``."""
    from torch.profiler import ProfilerActivity, profile

    model, points, dtype = spec.split(":")
    case = Case(model, int(points))
    steps = build_steps(case, DTYPES[dtype], seed, with_scalar=False)
    out = []
    for variant in VARIANTS[:3]:
        n = steps_per_block(steps[variant], 1.0)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(n):
                steps[variant]()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
        out.append(f"== {variant}: {case.label}, {case.num_points:,} points, {dtype}, {n} steps ==\n{table}")
    return "\n".join(out)


def main() -> None:
    """Parse the flags, time every case in every dtype, print (and optionally write) the report."""
    parser = argparse.ArgumentParser(description="One training step: dtrain's engine, torch.autograd, a scalar engine.")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["float32", "float64"])
    parser.add_argument("--repeats", type=int, default=5, help="timed blocks per variant; the median is reported")
    parser.add_argument("--block-seconds", type=float, default=0.25, help="length of one timed block")
    parser.add_argument("--scalar-steps", type=int, default=3, help="timed scalar-engine steps per case and GC mode")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the markdown report to this file")
    parser.add_argument(
        "--profile", metavar="MODEL:POINTS:DTYPE", help="profile one case instead, e.g. mlp:100000:float32"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.profile:
        print(profile_case(args.profile, args.seed))
        return

    commit, started = git_commit(), time.monotonic()
    results: dict[tuple[Case, str], dict[str, Timing]] = {}
    scalar_timings: dict[Case, dict[str, Timing]] = {}  # Python floats: the same in every dtype, timed once
    for dtype in args.dtypes:
        for case in CASES:
            with_scalar = case.scalar and case not in scalar_timings
            steps = build_steps(case, DTYPES[dtype], args.seed, with_scalar)
            timings = time_case(steps, args.repeats, args.block_seconds, args.scalar_steps, case.scalar_gc)
            if "scalar" in timings:
                scalar_timings[case] = {v: timings[v] for v in VARIANTS[3:] if v in timings}
            elif case in scalar_timings:
                timings |= scalar_timings[case]
            results[case, dtype] = timings
            summary = ", ".join(f"{v} {t.median_ms:.3f} ms" for v, t in timings.items())
            print(f"{case.model} {case.num_points:,} {dtype}: {summary}", file=sys.stderr, flush=True)
    if git_commit() != commit:  # dtrain changed while this ran
        commit = f"{commit}, changed to {git_commit()} during the run"
    table = report(results, args, commit) + f"\nTotal time {time.monotonic() - started:.0f} s.\n"
    print(table, end="")
    if args.out:
        args.out.write_text(table)


if __name__ == "__main__":
    main()
