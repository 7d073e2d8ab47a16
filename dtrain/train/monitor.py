"""What the dashboard shows about the optimizer step besides the loss.

Per logging step: gradient norms (total and per parameter, before clipping), the fraction of steps since
the last log whose gradients were clipped, each parameter's update-to-weight ratio ``||dp|| / ||p||``,
and, for models made of scalar parameters (the polynomials), the parameter values themselves. Every
``trainer.histogram_every`` steps, weight and gradient histograms. Between logging steps only the clipped
count is kept, on the device; everything else is computed at logging steps, so ordinary steps pay one
small device op for clipping statistics and nothing else.
"""

from __future__ import annotations

import torch
from torch import nn

from dtrain.train.grads import SumShards, clip_gradients, grad_norms, local, max_abs, whole_norms
from dtrain.train.logger import RunLogger

MAX_SCALAR_PARAMETERS = 32  # log parameter values when the model is at most this many scalars


class StepMonitor:
    """Collects the step statistics of one rank; the values are the same on every rank (the gradients
    are all-reduced before any of this runs), so they need no further reduction. Where each rank holds a
    shard of every parameter (``sum_shards`` given), each statistic is summed over the shards first, in
    one collective for all parameters, so the same tags mean the same numbers as under DDP."""

    def __init__(
        self,
        named_params: list[tuple[str, nn.Parameter]],
        clip_value: float | None,
        clip_norm: float | None,
        histogram_every: int,
        logger: RunLogger,
        device: torch.device,
        sum_shards: SumShards | None = None,
    ) -> None:
        self.named = named_params
        self.sum_shards = sum_shards
        self.params = [p for _, p in named_params]
        self.clip_value = clip_value
        self.clip_norm = clip_norm
        self.histogram_every = histogram_every
        self.logger = logger
        self.clipped = torch.zeros((), dtype=torch.float64, device=device)  # clipped steps since the last log
        few_scalars = len(self.params) <= MAX_SCALAR_PARAMETERS and all(p.numel() == 1 for p in self.params)
        self.scalar_model = sum_shards is None and few_scalars
        self._norms: torch.Tensor | None = None
        self._names: list[str] = []
        self._before: list[torch.Tensor] | None = None
        # Nothing to do between logging steps: the trainer skips the call (a few µs a step on small models).
        self.idle = clip_value is None and clip_norm is None and not histogram_every

    def clip(self, step: int, log_now: bool) -> None:
        """Before the optimizer step: at a logging step record the gradient norms (and histograms when due)
        and the weights; then clip, counting whether clipping acted."""
        if log_now:
            self._norms, self._names = grad_norms(self.named, self.sum_shards)
            self._before = [local(p.detach()).clone() for p in self.params]
        if self.histogram_every and step % self.histogram_every == 0:  # a host copy: only when asked for
            for name, p in self.named:
                self.logger.histogram(f"weights/{name}", whole(p.detach()), step)
                if p.grad is not None:
                    self.logger.histogram(f"grads/{name}", whole(p.grad), step)
        acted = None
        if self.clip_value is not None:
            grads = [p.grad for p in self.params if p.grad is not None]
            if grads:
                acted = max_abs(grads) > self.clip_value
                if self.sum_shards is not None:  # clipping acted if it acted on any rank's shard
                    acted = self.sum_shards(acted.to(torch.float64)) > 0
        total = clip_gradients(self.params, self.clip_value, self.clip_norm, self.sum_shards)
        if total is not None:
            over = total > self.clip_norm
            acted = over if acted is None else acted | over
        if acted is not None:
            self.clipped += acted

    def device_values(self) -> tuple[torch.Tensor, list[str]]:
        """After the optimizer step at a logging step: the statistics as one float64 device tensor (so the
        trainer fetches them in its one host copy) and their tags in the same order."""
        parts: list[torch.Tensor] = []
        tags: list[str] = []
        if self._norms is not None:
            parts.append(self._norms.to(torch.float64))
            tags += [f"grad_norm/{n}" for n in self._names]
        if self._before is not None:
            deltas = torch._foreach_sub([local(p.detach()) for p in self.params], self._before)
            if self.sum_shards is None:
                steps, weights = (
                    torch.stack(torch._foreach_norm(deltas)),
                    torch.stack(torch._foreach_norm(self._before)),
                )
                ratio = (steps / weights.clamp_min(1e-30)).to(torch.float64)
            else:  # the steps' norms and the weights' in one vector: one sum over the shards for both
                both = whole_norms([*deltas, *self._before], self.sum_shards)
                ratio = both[: len(deltas)] / both[len(deltas) :].clamp_min(1e-30)
            parts.append(ratio.to(self.clipped.device))
            tags += [f"update_ratio/{name}" for name, _ in self.named]
        if self.scalar_model:
            parts.append(torch.stack([p.detach().reshape(()) for p in self.params]).to(torch.float64))
            tags += [f"param/{name}" for name, _ in self.named]
        if self.clip_value is not None or self.clip_norm is not None:
            parts.append(self.clipped.reshape(1))
            tags.append("clipped_steps")
        self._norms, self._before = None, None
        empty = torch.zeros(0, dtype=torch.float64, device=self.clipped.device)
        return (torch.cat(parts) if parts else empty), tags

    def reset(self) -> None:
        """After a logging step: start counting clipped steps afresh."""
        self.clipped.zero_()


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` whole on every rank: a sharded tensor gathered (a collective), any other as it is. A shard
    offloaded to the host is gathered on its mesh's device."""
    if not hasattr(tensor, "full_tensor"):
        return tensor
    shard, mesh = tensor.to_local(), tensor.device_mesh
    if shard.device.type != mesh.device_type:
        from torch.distributed.tensor import DTensor

        index = torch.cuda.current_device() if mesh.device_type == "cuda" else None
        on_mesh = shard.to(torch.device(mesh.device_type, index))
        tensor = DTensor.from_local(on_mesh, mesh, tensor.placements, shape=tensor.shape, stride=tensor.stride())
    return tensor.full_tensor()


def custom_scalars_layout(monitor: StepMonitor, has_val: bool, on_gpu: bool) -> dict[str, dict[str, list]]:
    """TensorBoard's custom-scalars layout: which tags share a chart (regular expressions over tags)."""
    loss = ["train/loss", *([r"val/loss.*"] if has_val else [])]
    layout: dict[str, dict[str, list]] = {
        "training": {
            "loss (train and validation)": ["Multiline", loss],
            "learning rate": ["Multiline", ["lr"]],
            "gradient norms (total and per parameter)": ["Multiline", [r"grad_norm/.*"]],
            "update / weight ratio per parameter": ["Multiline", [r"update_ratio/.*"]],
        },
        "performance": {
            "samples per second": ["Multiline", ["perf/samples_per_sec"]],
            "step time (ms)": ["Multiline", ["perf/step_time_ms"]],
        },
    }
    if monitor.clip_value is not None or monitor.clip_norm is not None:
        layout["training"]["fraction of steps clipped"] = ["Multiline", ["train/clipped_fraction"]]
    if monitor.scalar_model:
        layout["training"]["parameter values"] = ["Multiline", [r"param/.*"]]
    if on_gpu:
        layout["performance"]["GPU memory (GB)"] = ["Multiline", [r"perf/gpu_memory.*"]]
    return layout
