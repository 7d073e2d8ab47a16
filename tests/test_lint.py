"""The code base stays ruff-clean (lint and format), as the project's standards ask."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def test_ruff_check_is_clean() -> None:
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
