"""Reading a numeric CSV: dtrain's reader (pandas' C parser) against Python's csv module (dtrain's reader before),
numpy's ``loadtxt``, ``pandas.read_csv`` called directly and, where installed, pyarrow's parser.

The file is generated once (``--rows`` x ``--features`` floats and a target column, seeded). Each reader runs in
a fresh process, so its imports and its peak resident memory are its own; the readers are interleaved over
``--repeats`` rounds and the table gives medians, and each reader's time over dtrain's in the same round.

Usage, from the repository root::

    python benchmarks/csv_loading.py [--rows 1000000] [--features 20] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

# name -> (imports, not timed; the read, timed). Peak memory is the process's, imports included: the
# "imported" column gives what the imports alone hold, so that the read's own share can be told.
READERS = {
    "dtrain": ("from dtrain.data.files import _read_csv_table as read; import pandas", "x = read(PATH)"),
    # What data=file does before training: read, check, split into train/val, standardise (float64 tensors).
    "dtrain data=file": (
        "from dtrain.config import FileDataConfig; from dtrain.data.registry import build_training_data; import pandas",
        "data, _ = build_training_data(FileDataConfig(path=str(PATH)), 0); x = data.train.x",
    ),
    "python csv (before)": ("from dtrain.data.files import _read_csv_slowly as read", "x = read(PATH, ',')"),
    "numpy.loadtxt": ("import numpy as np", "x = np.loadtxt(PATH, delimiter=',', skiprows=1)"),
    "pandas.read_csv": ("import pandas as pd", "x = pd.read_csv(PATH).to_numpy()"),
    "pyarrow.csv": (
        "import numpy as np, pyarrow.csv as pc",
        "t = pc.read_csv(PATH); x = np.column_stack([c.to_numpy() for c in t.columns])",
    ),
}

TIMED = """
import resource, sys, time
from pathlib import Path
PATH = Path(sys.argv[1])
{imports}
imported_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
start = time.perf_counter()
{read}
seconds = time.perf_counter() - start
peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print({{"seconds": seconds, "peak_mb": peak_mb, "imported_mb": imported_mb, "shape": list(x.shape)}})
"""


def write_csv(path: Path, rows: int, features: int, seed: int = 0) -> None:
    """``rows`` lines of ``features`` standard-normal floats and a target, with a header."""
    rng = np.random.default_rng(seed)
    header = ",".join([f"x{i}" for i in range(features)] + ["y"])
    with path.open("w") as handle:
        handle.write(header + "\n")
        for lo in range(0, rows, 100_000):
            block = rng.standard_normal((min(100_000, rows - lo), features + 1))
            np.savetxt(handle, block, delimiter=",", fmt="%.6f")


def available(name: str) -> bool:
    """pyarrow (a dependency since Parquet, but kept optional here): its row only where it is installed."""
    if not name.startswith("pyarrow"):
        return True
    return subprocess.run([sys.executable, "-c", "import pyarrow"], capture_output=True).returncode == 0


def run_one(reader: tuple[str, str], path: Path) -> dict:
    imports, read = reader
    script = TIMED.format(imports=imports, read=read)
    proc = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1].replace("'", '"'))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--features", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    readers = {name: reader for name, reader in READERS.items() if available(name)}
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "data.csv"
        write_csv(path, args.rows, args.features)
        size_mb = path.stat().st_size / 1e6
        results: dict[str, list[dict]] = {name: [] for name in readers}
        for round_ in range(args.repeats):
            for name, body in readers.items():
                results[name].append(run_one(body, path))
            print(f"round {round_ + 1}/{args.repeats} done", file=sys.stderr)
    reference = results["dtrain"]
    machine = f"{platform.processor() or platform.machine()}, Python {platform.python_version()}"
    print(
        f"{args.rows:,} rows x {args.features + 1} columns, {size_mb:.0f} MB; {args.repeats} interleaved rounds, "
        f"one fresh process per read; {machine}"
    )
    print()
    print("| reader | read seconds (median) | peak MB | of which imports | read / dtrain's read (median) |")
    print("|---|---:|---:|---:|---:|")
    for name, runs in results.items():
        seconds = statistics.median(r["seconds"] for r in runs)
        peak = statistics.median(r["peak_mb"] for r in runs)
        imported = statistics.median(r["imported_mb"] for r in runs)
        ratio = statistics.median(r["seconds"] / ref["seconds"] for r, ref in zip(runs, reference, strict=True))
        print(f"| {name} | {seconds:.2f} | {peak:.0f} | {imported:.0f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
