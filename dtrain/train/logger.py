"""Where metrics go: TensorBoard and the console, from rank 0 only.

Values arrive here already reduced across ranks (the trainer does that); this module only
writes them. Other ranks get a logger that records nothing.
"""

from __future__ import annotations

import functools
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

log = logging.getLogger("dtrain")


class ProgressLine:
    """A one-line progress bar for terminals, rewritten in place with a carriage return."""

    def __init__(self, total_steps: int, stream: TextIO) -> None:
        self.total = total_steps
        self.stream = stream
        self.started = time.perf_counter()

    def update(self, step: int, epoch: int, values: dict[str, float]) -> None:
        done = step / max(1, self.total)
        width = 24
        filled = int(done * width)
        elapsed = time.perf_counter() - self.started
        eta = elapsed / done - elapsed if done > 0 else 0.0
        bar = "#" * filled + "-" * (width - filled)
        text = (
            f"\r[{bar}] step {step}/{self.total} epoch {epoch} "
            f"loss {values.get('train/loss', math.nan):.4g} lr {values.get('lr', math.nan):.3g} "
            f"{values.get('perf/samples_per_sec', 0.0):,.0f} samples/s ETA {_clock(eta)}"
        )
        self.stream.write(text.ljust(100))
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


@functools.cache  # once a process: every run logger of a population calls it
def use_fast_event_checksums() -> None:
    """Give TensorBoard's event writer a C CRC32C (google-crc32c) in place of its pure-Python one.

    Without TensorFlow, tensorboard checksums every record in Python: about 0.3 ms for a logging step's
    event, on the writer thread, holding the GIL the training loop needs, so a small model's steps slowed
    by 10-30% (docs/benchmarks.md). The records are the same bytes (tests/test_train_parts.py checks it).
    """
    try:
        import google_crc32c
    except ImportError:  # the pure-Python checksum still writes correct files, only slower
        return
    from tensorboard.summary.writer import record_writer

    def masked_crc32c(data: bytes) -> int:
        crc = google_crc32c.value(data)  # TFRecord's masking, as tensorboard's own function applies it
        return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    record_writer.masked_crc32c = masked_crc32c


# Scalars are handed to TensorBoard's writer in batches, at most this often: each hand-over wakes its
# writer thread, which then competes with the training loop for the GIL (measured on the default run's
# 0.25 ms step, logging every 10 steps: +0.043 ms a step handing over each event, +0.017 in batches).
HAND_OVER_EVERY_S = 2.0


class RunLogger:
    """TensorBoard scalars and hparams plus console progress; a silent no-op on ranks other than 0.

    A logging step's scalars become one event (one trip through the writer rather than one a scalar);
    events are handed to the writer every :data:`HAND_OVER_EVERY_S` seconds, before a checkpoint
    (:meth:`flush`: what a checkpoint holds is on disk before it) and at :meth:`close`.
    """

    def __init__(self, run_dir: Path, enabled: bool, progress: str, purge_step: int | None = None) -> None:
        self.enabled = enabled
        self.writer: Any = None
        self.bar: ProgressLine | None = None
        self.progress = "off"
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        use_fast_event_checksums()
        # purge_step: TensorBoard hides the events at and after this step from earlier files (a resumed run
        # logs those steps again).
        # max_queue: a batch handed over must not block on the writer's queue.
        self.writer = SummaryWriter(log_dir=str(run_dir), purge_step=purge_step, max_queue=1000)
        self._batch: list[tuple[int, Any]] = []  # (step, Summary) not yet handed to the writer
        self._handed_at = time.monotonic()
        if progress == "auto":
            progress = "bar" if sys.stdout.isatty() else "lines"
        self.progress = progress

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """``values`` at ``step``, as one event: a logging step's twenty-odd scalars cost one trip through the
        writer's queue and thread rather than one each (measured: 80 µs a scalar on a busy 2-core machine)."""
        if self.writer is None or not values:
            return
        from tensorboard.compat.proto.summary_pb2 import Summary

        summary = Summary(value=[Summary.Value(tag=tag, simple_value=float(v)) for tag, v in values.items()])
        self._batch.append((step, summary))
        if time.monotonic() - self._handed_at >= HAND_OVER_EVERY_S:
            self._hand_over()

    def _hand_over(self) -> None:
        """Give the batched events to TensorBoard's writer (its thread writes them)."""
        file_writer = self.writer._get_file_writer()
        for step, summary in self._batch:
            file_writer.add_summary(summary, global_step=step)
        self._batch.clear()
        self._handed_at = time.monotonic()

    def flush(self) -> None:
        """Every event so far on disk (before a checkpoint, so a run resumed from it has its curves)."""
        if self.writer is not None:
            self._hand_over()
            self.writer.flush()

    def histogram(self, tag: str, values: Any, step: int) -> None:
        """A histogram of a tensor's values (weights, gradients)."""
        if self.writer is not None:
            self.writer.add_histogram(tag, values.detach().float().cpu(), global_step=step)

    def custom_scalars(self, layout: dict[str, dict[str, list]]) -> None:
        """TensorBoard's custom-scalars layout (charts that combine tags), written once per run."""
        if self.writer is not None:
            self.writer.add_custom_scalars(layout)

    def images(self, step: int, images: dict[str, Any]) -> None:
        """RGB images (H, W, 3 uint8 arrays) in TensorBoard's Images tab."""
        if self.writer is not None:
            for tag, image in images.items():
                self.writer.add_image(tag, image, global_step=step, dataformats="HWC")

    def text(self, tag: str, text: str) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text)

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        """Write the run's hyperparameters and final metrics for TensorBoard's HParams dashboard."""
        if self.writer is None:
            return
        finite = {k: v for k, v in metrics.items() if isinstance(v, float) and math.isfinite(v)}
        self.writer.add_hparams(hparams, {f"hparam/{k}": v for k, v in finite.items()}, run_name=".")

    def progress_update(self, step: int, total_steps: int, epoch: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.progress == "bar":
            if self.bar is None:
                self.bar = ProgressLine(total_steps, sys.stdout)
            self.bar.update(step, epoch, values)
        elif self.progress == "lines":
            detail = ("grad_norm/", "update_ratio/", "param/")  # per-parameter: for TensorBoard, too long here
            shown = {k: v for k, v in values.items() if not k.startswith(detail) or k == "grad_norm/total"}
            log.info("step %d epoch %d %s", step, epoch, " ".join(f"{k}={v:.5g}" for k, v in shown.items()))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self._hand_over()
            self.writer.close()


SUMMARY_PREFIXES = ("train/", "val/")  # the metrics of the final table, besides lr and the total gradient norm


def summary_table(summary: dict[str, Any], run_dir: str) -> str:
    """The end-of-run table: how it ended, the final metrics, and where to look next."""
    head = (
        f"done: {summary['status']}, {summary['steps']} steps in {summary['wall_time_s']:.3g} s "
        f"({summary['samples_per_sec']:,.0f} samples/s, world size {summary['world_size']})"
    )
    rows = [
        (k, v)
        for k, v in summary.items()
        if isinstance(v, float) and (k.startswith(SUMMARY_PREFIXES) or k in ("lr", "grad_norm/total"))
    ]
    width = max([len(k) for k, _ in rows] + [len("tensorboard")])
    lines = [head, *(f"  {k:<{width}}  {v:.6g}" for k, v in rows)]
    lines += [
        f"  {'run directory':<{width}}  {run_dir}",
        f"  {'report':<{width}}  dtrain report {run_dir}  (writes {run_dir}/report.html)",
        f"  {'tensorboard':<{width}}  tensorboard --logdir {run_dir}",
    ]
    return "\n".join(lines)


def log_to_rank_file(run_dir: Path, rank: int) -> None:
    """Ranks other than 0 also log (at INFO) to ``<run dir>/logs/rank<N>.log``; stderr keeps their warnings."""
    directory = run_dir / "logs"
    directory.mkdir(exist_ok=True)
    handler = logging.FileHandler(directory / f"rank{rank}.log")
    handler.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(message)s"))
    logger = logging.getLogger("dtrain")
    for existing in logger.handlers:
        existing.setLevel(max(existing.level, logging.WARNING))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
