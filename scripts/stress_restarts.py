"""Run the kill-and-restart tests many times in a row and count how many finish.

Elastic restarts must be robust, not lucky: a worker is SIGKILLed (from outside, and from inside at a
configured step) during a 2-rank gloo run under ``torchrun --max-restarts=1``, and the restarted group
must resume from the latest checkpoint and end with bitwise the parameters of an uninterrupted run.

Usage, from the repository root::

    python scripts/stress_restarts.py [--trials 10]

Exit status 0 only if every trial passed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TESTS = [
    "tests/test_elastic.py::test_a_worker_killed_from_outside_is_restarted_and_resumes_bitwise",
    "tests/test_elastic.py::test_a_fault_injected_inside_is_restarted_and_resumes_bitwise",
]


def main() -> int:
    """Run the trials; print one line per trial and a summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    args = parser.parse_args()
    passed = 0
    for trial in range(1, args.trials + 1):
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
        )
        ok = proc.returncode == 0
        passed += ok
        tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
        print(f"trial {trial}: {'ok' if ok else 'FAILED'} ({time.monotonic() - started:.0f} s) {tail}", flush=True)
        if not ok:
            print(proc.stdout[-4000:], proc.stderr[-2000:], sep="\n", flush=True)
    print(f"{passed}/{args.trials} trials passed")
    return 0 if passed == args.trials else 1


if __name__ == "__main__":
    sys.exit(main())
