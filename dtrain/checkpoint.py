"""Checkpoint files: written atomically, found, verified and matched against the run's config.

Layout of ``<run dir>/checkpoints``::

    step-00000120.pt     the training state (``torch.save`` of tensors and plain values)
    step-00000120.json   its manifest: dtrain version, config hash, world size, step, time, size, SHA-256
    latest               JSON naming the newest complete checkpoint (with its size and SHA-256)

A sharded run (``trainer.strategy=fsdp``) writes a directory in place of the ``.pt`` file::

    step-00000120/       torch.distributed.checkpoint's files: every rank writes its own shards
                         (``__<rank>_0.distcp``), rank 0 the ``.metadata`` and ``trainer.pt`` (the rest)
    step-00000120.json   its manifest, with each file's size and SHA-256

Saving writes the state, then the manifest, then ``latest``, each through :func:`write_atomic` (temporary
name, flush, fsync, rename, fsync of the directory), and only then deletes checkpoints beyond the last K.
A sharded checkpoint is written into ``.step-00000120.partial/`` and renamed once every rank's files are in.
A process killed at any instant therefore leaves ``latest`` naming a complete checkpoint whose hashes match.
Loading checks the hash, because ``torch.load`` reads a file with flipped bytes without complaint.

What goes into the state, and how it is restored, is the trainer's business (``dtrain/train/state.py``);
this module only moves bytes and compares configs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import io
import json
import math
import os
import random
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dtrain import __version__
from dtrain.atomic import fsync_dir, remove_stale_temporaries, write_atomic
from dtrain.config import CHANGEABLE_ON_RESUME, DATASETS, Config, to_plain
from dtrain.errors import UserError, first_line

FORMAT = 1  # bumped when the state's layout changes
DIR_NAME = "checkpoints"
POINTER = "latest"
# Config keys that do not shape the trajectory: they may differ freely between a checkpoint and its resume.
# Keys whose absence from an older checkpoint means something other than today's default: runs from before
# data.standardize trained on the data as given.
ABSENT_MEANS = {"data.standardize": False}
FINGERPRINT = "data.fingerprint"  # not a config key: run.py adds it to the config the checkpoint keeps
FREE_ON_RESUME = (
    "trainer.log_every",
    "trainer.eval_every",
    "trainer.progress",
    "trainer.device",
    "trainer.compile",
    "trainer.fsdp",  # how the shards are laid out: the checkpoint reshards to any layout
    "dist",
    "checkpoint",
    "resume",
    "objective",
    "fault",
)


class CheckpointError(UserError):
    """A checkpoint that cannot be used: missing, corrupt, from another model, or from another config."""


@dataclass(frozen=True)
class Found:
    """A checkpoint (a file, or a sharded checkpoint's directory) and what its manifest promises about it
    (None where there is no manifest; ``files``: a sharded checkpoint's files, name -> size and SHA-256)."""

    path: Path
    step: int | None
    sha256: str | None
    size: int | None
    files: dict[str, dict[str, Any]] | None = None

    @property
    def sharded(self) -> bool:
        return self.path.is_dir()


def checkpoint_name(step: int, sharded: bool = False) -> str:
    """``step-00000120.pt`` (``step-00000120`` for a sharded checkpoint): zero-padded, so names sort in step order."""
    return f"step-{step:08d}" if sharded else f"step-{step:08d}.pt"


SHARDED_MARK = ".metadata"  # torch.distributed.checkpoint's index: a directory holding one is a sharded checkpoint
TRAINER_FILE = "trainer.pt"  # in a sharded checkpoint: what is not sharded (progress, schedule, config...)


def _checkpoints(directory: Path) -> list[Path]:
    """The checkpoints in ``directory``, files and sharded directories, oldest first."""
    found = [p for p in directory.glob("step-*") if p.suffix == ".pt" or (p.is_dir() and p.suffix == "")]
    return sorted(found, key=lambda p: p.name.removesuffix(".pt"))


def config_hash(config: dict[str, Any]) -> str:
    """SHA-256 of the config's canonical JSON (sorted keys): equal configs, equal hashes."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def save(directory: Path, state: dict[str, Any], step: int, keep_last: int, manifest: dict[str, Any]) -> Path:
    """Write ``state`` as the checkpoint of ``step``, point ``latest`` at it, keep the last ``keep_last``."""
    directory.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(directory)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    path = directory / checkpoint_name(step)
    text = _manifest_text(path, step, len(data), hashlib.sha256(data).hexdigest(), manifest).encode()
    write_atomic(path, data)
    write_atomic(path.with_suffix(".json"), text)
    write_atomic(directory / POINTER, text)
    prune(directory, keep_last)
    return path


def prune(directory: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints (never the one ``latest`` names)."""
    current = latest(directory)
    files = _checkpoints(directory)
    for old in files[: max(0, len(files) - keep_last)]:
        if current is not None and old.name == current.path.name:
            continue
        old.with_name(old.name.removesuffix(".pt") + ".json").unlink(missing_ok=True)  # the manifest first
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def start_sharded(directory: Path, step: int) -> Path:
    """Rank 0, before a sharded save: the empty directory every rank writes ``step``'s shards into, and the
    partial ones of interrupted saves removed. It becomes a checkpoint only by :func:`finish_sharded`'s rename."""
    directory.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(directory)
    for stale in directory.glob(".step-*.partial"):
        shutil.rmtree(stale, ignore_errors=True)
    partial = partial_path(directory, step)
    partial.mkdir()
    return partial


def partial_path(directory: Path, step: int) -> Path:
    """Where ``step``'s sharded checkpoint is written before it is complete (every rank knows it)."""
    return directory / f".{checkpoint_name(step, sharded=True)}.partial"


def write_shards(partial: Path, tensors: dict[str, Any], process_group: Any = None) -> None:
    """Every rank writes its part of ``tensors`` (nested dicts of tensors and DTensors) into ``partial`` with
    torch.distributed.checkpoint, each file fsynced; a tensor that several ranks hold under one name is written
    once. A collective on ``process_group`` where there is one."""
    import torch.distributed as torch_dist
    import torch.distributed.checkpoint as dcp

    writer = dcp.FileSystemWriter(str(partial), sync_files=True)
    alone = not torch_dist.is_initialized()
    with _quiet_when_alone():
        dcp.save(tensors, storage_writer=writer, process_group=process_group, no_dist=alone)


@contextlib.contextmanager
def _quiet_when_alone() -> Iterator[None]:
    """DCP warns that it reads or writes in a single process whenever there is no process group: for a
    one-process run and for ``dtrain.load`` that is the point, not something to warn about."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _indexed_files(path: Path) -> set[str]:
    """The files a sharded checkpoint's ``.metadata`` says its tensors are in."""
    from torch.distributed.checkpoint import FileSystemReader

    storage = FileSystemReader(str(path)).read_metadata().storage_data or {}
    return {str(info.relative_path) for info in storage.values()}


def _file_digest(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def _listing_hash(files: dict[str, dict[str, Any]]) -> str:
    """One SHA-256 for a sharded checkpoint: of its files' names, sizes and hashes (``latest`` quotes it)."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def shard_digests(partial: Path, rank: int) -> dict[str, dict[str, Any]]:
    """The size and SHA-256 of each file ``rank`` wrote into ``partial`` (``__<rank>_<i>.distcp``): every rank
    hashes its own, so no rank reads another's and the manifest does not depend on what rank 0 can see."""
    return {f.name: _file_digest(f) for f in sorted(partial.glob(f"__{rank}_*.distcp"))}


def finish_sharded(
    partial: Path,
    state: dict[str, Any],
    step: int,
    keep_last: int,
    manifest: dict[str, Any],
    shards: dict[str, dict[str, Any]],
) -> Path:
    """Rank 0, once every rank's shards are in ``partial`` (``shards``: their digests, every rank's
    :func:`shard_digests`): add ``state`` (what is not sharded) as ``trainer.pt``, check that every file the
    shards' index names is listed, rename the directory to ``step-N``, then write the manifest and ``latest``
    and keep the last ``keep_last`` checkpoints, as :func:`save` does for one file."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_atomic(partial / TRAINER_FILE, buffer.getvalue())
    files = dict(shards) | {name: _file_digest(partial / name) for name in (SHARDED_MARK, TRAINER_FILE)}
    missing = sorted(_indexed_files(partial) - set(files))
    if missing:
        raise CheckpointError(
            f"{missing[0]} of step {step}'s checkpoint was written by its rank but is not listed: put the run "
            f"directory on storage every rank shares"
        )
    files = dict(sorted(files.items()))
    directory = partial.parent
    path = directory / checkpoint_name(step, sharded=True)
    if path.exists():  # a save of this step whose manifest was never written (killed between the two)
        shutil.rmtree(path)
    os.replace(partial, path)
    fsync_dir(directory)
    text = _manifest_text(path, step, sum(f["size"] for f in files.values()), _listing_hash(files), manifest, files)
    write_atomic(path.with_suffix(".json"), text.encode())
    write_atomic(directory / POINTER, text.encode())
    prune(directory, keep_last)
    return path


def latest(directory: Path) -> Found | None:
    """The checkpoint ``directory/latest`` names, or None if there is none yet."""
    pointer = directory / POINTER
    if not pointer.is_file():
        return None
    try:
        return _read_manifest(pointer)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"{pointer} is unreadable ({exc}); resume=PATH with one of the step-* checkpoints"
        ) from None


def _read_manifest(manifest: Path) -> Found:
    """The checkpoint a manifest (``step-N.json`` or ``latest``, which is a copy of one) describes."""
    info = json.loads(manifest.read_text())
    path = manifest.parent / info["file"]
    return Found(path, int(info["step"]), str(info["sha256"]), int(info["size"]), info.get("files"))


def has_checkpoints(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds checkpoints of an earlier run."""
    directory = run_dir / DIR_NAME
    return directory.is_dir() and bool(_checkpoints(directory))


def remove_all(run_dir: Path) -> None:
    """Delete ``run_dir``'s checkpoints (``checkpoint.overwrite=true`` with ``resume=never``)."""
    shutil.rmtree(run_dir / DIR_NAME, ignore_errors=True)


def find(resume: str, run_dir: Path) -> Found | None:
    """The checkpoint that ``resume`` asks for: auto (``run_dir``'s latest, or None), never (None), or a path
    to a checkpoint file, a ``checkpoints`` directory or a run directory."""
    if resume == "never":
        return None
    if resume == "auto":
        return latest(run_dir / DIR_NAME)
    path = Path(resume).expanduser()
    if path.is_file() or (path / SHARDED_MARK).is_file():  # a checkpoint file, or a sharded one's directory
        manifest = path.with_suffix(".json")
        if manifest.is_file():
            try:
                return _read_manifest(manifest)
            except (OSError, ValueError, KeyError, TypeError):
                pass  # an unreadable manifest: load unverified, as a checkpoint without one
        return Found(path, None, None, None)
    if path.is_dir():
        for directory in (path / DIR_NAME, path):
            found = latest(directory)
            if found is not None:
                return found
        raise CheckpointError(f"resume={resume}: that directory holds no checkpoint (no {DIR_NAME}/{POINTER} in it)")
    raise CheckpointError(
        f"resume={resume}: no such file or directory; use auto, never, a run directory or a checkpoint file"
    )


def verify_sharded(found: Found) -> None:
    """Check every file of a sharded checkpoint against its manifest (size, then SHA-256): a missing, truncated
    or corrupt shard is named. Reads the whole checkpoint; one rank does it."""
    for name, promised in (found.files or {}).items():
        path = found.path / name
        if not path.is_file():
            raise CheckpointError(
                f"checkpoint {found.path} is incomplete: {name} is missing; resume from an earlier one with resume=PATH"
            )
        actual = _file_digest(path)
        if actual["size"] != promised["size"]:
            raise CheckpointError(
                f"checkpoint {found.path} is truncated: {name} has {actual['size']} bytes, its manifest says "
                f"{promised['size']}; resume from an earlier one with resume=PATH"
            )
        if actual["sha256"] != promised["sha256"]:
            raise CheckpointError(
                f"checkpoint {found.path} is corrupt: the SHA-256 of {name} does not match its manifest; "
                f"resume from an earlier one with resume=PATH"
            )


def load(found: Found, verify_shards: bool = True) -> dict[str, Any]:
    """Read and verify a checkpoint; raise :class:`CheckpointError` if it is truncated, corrupt or foreign.

    Of a sharded checkpoint this reads ``trainer.pt`` (its ``"sharded"`` key is the directory to read the
    shards from, :func:`read_shards`); ``verify_shards`` also checks every shard's hash.
    """
    if found.sharded:
        if not (found.path / SHARDED_MARK).is_file():
            raise CheckpointError(f"{found.path} is not a checkpoint: a sharded one holds {SHARDED_MARK}")
        if verify_shards:
            verify_sharded(found)
        promised = (found.files or {}).get(TRAINER_FILE, {})
        trainer = Found(found.path / TRAINER_FILE, found.step, promised.get("sha256"), promised.get("size"))
        return load(trainer) | {"sharded": str(found.path)}
    path = found.path
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    if found.size is not None and len(data) != found.size:
        raise CheckpointError(
            f"checkpoint {path} is truncated: {len(data)} bytes, its manifest says {found.size}; "
            f"resume from an earlier one with resume=PATH"
        )
    if found.sha256 is not None and hashlib.sha256(data).hexdigest() != found.sha256:
        raise CheckpointError(
            f"checkpoint {path} is corrupt: its SHA-256 does not match its manifest; "
            f"resume from an earlier one with resume=PATH"
        )
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, pickle errors, EOFError... for a damaged file
        first = first_line(exc)
        raise CheckpointError(f"checkpoint {path} is unreadable, truncated or not a checkpoint: {first}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} is not a dtrain checkpoint of format {FORMAT} (format: {got})")
    return state


def shard_names(path: Path) -> dict[str, tuple[list[int], torch.dtype]]:
    """The tensors a sharded checkpoint holds: name -> whole shape and dtype (from its ``.metadata``)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(str(path)).read_metadata()
    return {
        name: (list(item.size), item.properties.dtype)
        for name, item in metadata.state_dict_metadata.items()
        if isinstance(item, TensorStorageMetadata)
    }


def read_shards(path: Path, tensors: dict[str, Any], process_group: Any = None, alone: bool = False) -> None:
    """Fill ``tensors`` (name -> tensor or sharded DTensor, flat) in place from the sharded checkpoint at ``path``,
    whatever the world size that wrote it (torch.distributed.checkpoint reshards). A collective on ``process_group``
    where there is a process group, unless ``alone``: then this process reads by itself (whole tensors)."""
    import torch.distributed as torch_dist
    import torch.distributed.checkpoint as dcp

    alone = alone or not torch_dist.is_initialized()
    with _quiet_when_alone():
        dcp.load(tensors, storage_reader=dcp.FileSystemReader(str(path)), process_group=process_group, no_dist=alone)


def _manifest_text(
    path: Path, step: int, size: int, sha256: str, manifest: dict[str, Any], files: dict[str, Any] | None = None
) -> str:
    manifest = manifest | {
        "file": path.name,
        "step": step,
        "size": size,
        "sha256": sha256,
        "time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "dtrain_version": __version__,
    }
    if files is not None:
        manifest["files"] = files
    return json.dumps(manifest, indent=2) + "\n"


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat |= _flatten(value, f"{prefix}{key}.")
        return flat
    return {prefix[:-1]: tree}


def _under(key: str, prefixes: tuple[str, ...] | list[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def config_changes(
    saved: dict[str, Any], current: dict[str, Any], saved_world: int, world: int, allowed: list[str], path: Path
) -> list[str]:
    """The keys where ``current`` differs from the checkpoint's config and the user allowed it.

    Raises :class:`CheckpointError` naming the first difference that is not allowed, and saying whether
    ``checkpoint.allow_changes`` could allow it.
    """
    # A key added to the config since the checkpoint was written counts as its default there; the data's
    # fingerprint, which checkpoints before it do not have, is compared only where the checkpoint has one.
    new = _flatten(current)
    defaults = _flatten(to_plain(Config()))
    data_schema = DATASETS.get(str(current.get("data", {}).get("name")))
    if data_schema is not None:  # the data option's own keys (Config() has the default data set's)
        defaults |= {f"data.{k}": v for k, v in dataclasses.asdict(data_schema()).items()} | ABSENT_MEANS
    defaults = {k: v for k, v in defaults.items() if k in new}
    absent = {k: v for k, v in defaults.items() if k not in _flatten(saved)}  # what an older checkpoint lacks
    old = defaults | _flatten(saved)
    if FINGERPRINT not in old:
        new.pop(FINGERPRINT, None)
    file_data = old.get("data.name") == new.get("data.name") == "file"  # a user function's own `path` is its own
    if file_data and isinstance(old.get("data.path"), str) and old["data.path"] != "???":
        # Compared resolved: checkpoints before paths were stored resolved hold them as typed.
        old["data.path"] = str(Path(old["data.path"]).expanduser().resolve())
    differences = [
        (k, old.get(k, "<absent>"), new.get(k, "<absent>"))
        for k in sorted(set(old) | set(new))
        if not _under(k, FREE_ON_RESUME) and old.get(k, "<absent>") != new.get(k, "<absent>")
    ]
    if saved_world != world:
        differences.insert(0, ("world_size", saved_world, world))
    changes = []
    for key, was, now in differences:
        if _under(key, allowed):
            changes.append(key)
            continue
        what = f"checkpoint {path} does not match this run: {key} was {was!r}, now {now!r}"
        if key == FINGERPRINT:
            what = f"checkpoint {path} was saved training on other data: then {was}; now {now}"
        if key in ABSENT_MEANS and key in absent:
            raise CheckpointError(
                f"checkpoint {path} was saved before {key} existed, by a run that trained with {key}="
                f"{str(was).lower()}: add {key}={str(was).lower()} to resume it"
            )
        if _under(key, CHANGEABLE_ON_RESUME):
            short = next(p for p in CHANGEABLE_ON_RESUME if _under(key, (p,)))
            raise CheckpointError(f"{what}; to resume with the new value add checkpoint.allow_changes=[{short}]")
        raise CheckpointError(
            f"{what}; {key} cannot change on resume: start a fresh run (another run directory, or resume=never)"
        )
    return changes


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's random generators: torch's CPU generator, the device's CUDA generator, Python's."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def rng_tensors(device: torch.device) -> dict[str, torch.Tensor]:
    """:func:`rng_state` as tensors only (Python's generator as its 625 words and the cached Gaussian, NaN for
    none), so that a sharded checkpoint holds nothing that must be unpickled to load."""
    state = rng_state(device)
    version, internal, gauss = state.pop("python")
    state["python"] = torch.tensor([version, *internal], dtype=torch.int64)
    state["python_gauss"] = torch.tensor(math.nan if gauss is None else gauss, dtype=torch.float64)
    return state


def set_rng_tensors(tensors: dict[str, torch.Tensor], device: torch.device) -> None:
    """Restore what :func:`rng_tensors` captured."""
    words = [int(w) for w in tensors["python"].tolist()]
    gauss = float(tensors["python_gauss"])
    state = {k: v for k, v in tensors.items() if k not in ("python", "python_gauss")}
    state["python"] = (words[0], tuple(words[1:]), None if math.isnan(gauss) else gauss)
    set_rng_state(state, device)


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"].to(torch.uint8))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
