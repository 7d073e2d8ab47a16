"""A fingerprint of a data file, kept in the checkpoint: a run is not resumed on data that changed under it.

For each file (a table, a ``.npz``, or ``x.npy`` and the target's ``.npy``): its resolved path, size,
modification time and the SHA-256 of three 64 KiB samples (start, middle, end). Reading samples, not the
whole file, keeps it instant for data bigger than memory; a change in size or time alone is caught as well.
Generated data sets and a user's ``data._target_`` have none: their config is their identity.
"""

from __future__ import annotations

import datetime
import hashlib
from pathlib import Path

SAMPLE_BYTES = 64 * 1024


def data_fingerprint(cfg: object) -> str | None:
    """One line naming each of the data's files with its size, time and sample hash; None for data not read from
    files (or a path that does not exist: reading it fails with its own message)."""
    from dtrain.data.npy import npy_paths

    path_text = getattr(cfg, "path", None)
    if getattr(cfg, "name", None) != "file" or not path_text:
        return None
    path = Path(path_text).expanduser().resolve()
    arrays = npy_paths(path, getattr(cfg, "target", "y")) if path.exists() else None
    files = list(arrays) if arrays is not None else [path]
    if not all(f.is_file() for f in files):
        return None
    return "; ".join(_file_fingerprint(f) for f in files)


def _file_fingerprint(path: Path) -> str:
    stat = path.stat()
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for offset in sorted({0, max(0, stat.st_size // 2 - SAMPLE_BYTES // 2), max(0, stat.st_size - SAMPLE_BYTES)}):
            handle.seek(offset)
            digest.update(handle.read(SAMPLE_BYTES))
    when = datetime.datetime.fromtimestamp(stat.st_mtime, tz=datetime.UTC).strftime("%Y-%m-%d %H:%M:%S.%f UTC")
    return f"{path}: {stat.st_size} bytes, modified {when}, sample sha256 {digest.hexdigest()[:16]}"
