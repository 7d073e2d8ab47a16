"""Checkpoint files: written atomically, found, verified and matched against the run's config.

Layout of ``<run dir>/checkpoints``::

    step-00000120.pt     the training state (``torch.save`` of tensors and plain values)
    step-00000120.json   its manifest: dtrain version, config hash, world size, step, time, size, SHA-256
    latest               JSON naming the newest complete checkpoint (with its size and SHA-256)

Saving writes the state, then the manifest, then ``latest``, each through :func:`write_atomic` (temporary
name, flush, fsync, rename, fsync of the directory), and only then deletes checkpoints beyond the last K.
A process killed at any instant therefore leaves ``latest`` naming a complete file whose hash matches.
Loading checks the hash, because ``torch.load`` reads a file with flipped bytes without complaint.

What goes into the state, and how it is restored, is the trainer's business (``dtrain/train/state.py``);
this module only moves bytes and compares configs.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import io
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dtrain import __version__
from dtrain.atomic import remove_stale_temporaries, write_atomic
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
    """A checkpoint file and what its manifest promises about it (None where there is no manifest)."""

    path: Path
    step: int | None
    sha256: str | None
    size: int | None


def checkpoint_name(step: int) -> str:
    """``step-00000120.pt``: zero-padded, so names sort in step order."""
    return f"step-{step:08d}.pt"


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
    manifest = manifest | {
        "file": path.name,
        "step": step,
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "dtrain_version": __version__,
    }
    text = (json.dumps(manifest, indent=2) + "\n").encode()
    write_atomic(path, data)
    write_atomic(path.with_suffix(".json"), text)
    write_atomic(directory / POINTER, text)
    prune(directory, keep_last)
    return path


def prune(directory: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints (never the one ``latest`` names)."""
    current = latest(directory)
    files = sorted(directory.glob("step-*.pt"))
    for old in files[: max(0, len(files) - keep_last)]:
        if current is not None and old.name == current.path.name:
            continue
        old.unlink(missing_ok=True)
        old.with_suffix(".json").unlink(missing_ok=True)


def latest(directory: Path) -> Found | None:
    """The checkpoint ``directory/latest`` names, or None if there is none yet."""
    pointer = directory / POINTER
    if not pointer.is_file():
        return None
    try:
        return _read_manifest(pointer)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{pointer} is unreadable ({exc}); resume=PATH with one of the step-*.pt files") from None


def _read_manifest(manifest: Path) -> Found:
    """The checkpoint a manifest (``step-N.json`` or ``latest``, which is a copy of one) describes."""
    info = json.loads(manifest.read_text())
    return Found(manifest.parent / info["file"], int(info["step"]), str(info["sha256"]), int(info["size"]))


def has_checkpoints(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds checkpoints of an earlier run."""
    directory = run_dir / DIR_NAME
    return directory.is_dir() and any(directory.glob("step-*.pt"))


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
    if path.is_dir():
        for directory in (path / DIR_NAME, path):
            found = latest(directory)
            if found is not None:
                return found
        raise CheckpointError(f"resume={resume}: that directory holds no checkpoint (no {DIR_NAME}/{POINTER} in it)")
    if path.is_file():
        manifest = path.with_suffix(".json")
        if manifest.is_file():
            try:
                return _read_manifest(manifest)
            except (OSError, ValueError, KeyError, TypeError):
                pass  # an unreadable manifest: load unverified, as a file without one
        return Found(path, None, None, None)
    raise CheckpointError(
        f"resume={resume}: no such file or directory; use auto, never, a run directory or a checkpoint file"
    )


def load(found: Found) -> dict[str, Any]:
    """Read and verify a checkpoint; raise :class:`CheckpointError` if it is truncated, corrupt or foreign."""
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


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
