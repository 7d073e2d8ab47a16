"""Where metrics go: TensorBoard and the console, from rank 0 only.

Values arrive here already reduced across ranks (the trainer does that); this module only
writes them. Other ranks get a logger that records nothing.
"""

from __future__ import annotations

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


class RunLogger:
    """TensorBoard scalars and hparams plus console progress; a silent no-op on ranks other than 0."""

    def __init__(self, run_dir: Path, enabled: bool, progress: str, purge_step: int | None = None) -> None:
        self.enabled = enabled
        self.writer: Any = None
        self.bar: ProgressLine | None = None
        self.progress = "off"
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard hides the events at and after this step from earlier files (a resumed run
        # logs those steps again).
        self.writer = SummaryWriter(log_dir=str(run_dir), purge_step=purge_step)
        if progress == "auto":
            progress = "bar" if sys.stdout.isatty() else "lines"
        self.progress = progress

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is None:
            return
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, global_step=step)

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
            shown = {k: v for k, v in values.items() if not k.startswith("grad_norm/") or k == "grad_norm/total"}
            log.info("step %d epoch %d %s", step, epoch, " ".join(f"{k}={v:.5g}" for k, v in shown.items()))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
