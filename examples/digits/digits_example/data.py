"""Write scikit-learn's bundled 8x8 digits (1797 images, no download) as dtrain data files.

    python -m digits_example.data OUT_DIR [--held-out 200]

writes ``OUT_DIR/digits.npz`` (training; dtrain holds ``data.val_fraction`` of it out for validation) and
``OUT_DIR/new_digits.npz`` (the last ``--held-out`` rows, never trained on: for ``dtrain predict``). Each has
``x`` ``[N, 64]`` float32 pixels scaled to [0, 1] and ``y`` ``[N]`` int64 labels 0..9.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def load(held_out: int = 200) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(training arrays, held-out arrays), each ``{"x": ..., "y": ...}``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)  # pixel values 0..16
    y = digits.target.astype(np.int64)
    if not 0 < held_out < len(x):
        raise ValueError(f"--held-out {held_out} must be between 1 and {len(x) - 1}")
    cut = len(x) - held_out
    return {"x": x[:cut], "y": y[:cut]}, {"x": x[cut:], "y": y[cut:]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m digits_example.data", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="where to write digits.npz and new_digits.npz")
    parser.add_argument("--held-out", type=int, default=200, help="rows kept out of training (default 200)")
    args = parser.parse_args(argv)
    try:
        train, new = load(args.held_out)
    except ValueError as exc:
        parser.error(str(exc))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, arrays in (("digits.npz", train), ("new_digits.npz", new)):
        np.savez(args.out_dir / name, **arrays)
        print(f"{args.out_dir / name}: x {list(arrays['x'].shape)}, y {list(arrays['y'].shape)}")


if __name__ == "__main__":
    main()
