"""Checkpoint directories: written under a temporary name and renamed when complete, a ``latest``
pointer updated last, every file written whole or not at all, and one-line errors for bad ones."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from omegaconf import DictConfig, OmegaConf


FORMAT = 1
LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the model; the message is one line."""


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def temporary(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def save_torch(obj, path: Path) -> None:
    """torch.save through a temporary file and a rename, so a file is complete or absent. A failed
    write raises OSError naming the file (see write_failure)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Through a Python file, not a path: torch's own file writer reports a full disk as a C++
        # "iostream error"; a Python file raises OSError with its errno and strerror (which torch's
        # clean-up may bury under a RuntimeError of its own: hence the search of the chain).
        with open(tmp, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        cause = _os_error_in(e)
        if cause is None:
            raise
        raise OSError(cause.errno, cause.strerror, str(tmp)) from None


def _os_error_in(error: Optional[BaseException]) -> Optional[OSError]:
    while error is not None and not isinstance(error, OSError):
        error = error.__cause__ or error.__context__
    return error


def write_failure(error: OSError, checkpoint_root: Path) -> str:
    """The one line for a checkpoint that could not be written (a full disk, a quota, an I/O error)."""
    previous = latest(checkpoint_root)
    kept = f"previous checkpoint {previous.name} is intact" if previous else "no earlier checkpoint to resume from"
    reason = error.strerror or str(error)
    return f"{reason[:1].lower()}{reason[1:]}: {error.filename or checkpoint_root}, {kept}"


def load_torch(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file missing: {path}") from None
    except Exception as e:  # a truncated or corrupt file raises a zoo of pickle / zip errors
        raise CheckpointError(f"checkpoint file unreadable: {path} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def write_meta(directory: Path, cfg: DictConfig, meta: Dict) -> None:
    OmegaConf.save(cfg, directory / "config.yaml")
    (directory / "meta.json").write_text(json.dumps({"format": FORMAT, **meta}, indent=1))


def read_meta(directory: Path) -> Tuple[Dict, DictConfig]:
    directory = Path(directory)
    try:
        meta = json.loads((directory / "meta.json").read_text())
        cfg = OmegaConf.load(directory / "config.yaml")
    except FileNotFoundError as e:
        raise CheckpointError(f"not a megaclip checkpoint: {directory} ({Path(e.filename).name} missing)") from None
    except (json.JSONDecodeError, ValueError) as e:
        raise CheckpointError(f"checkpoint metadata unreadable in {directory}: {e}") from None
    return meta, cfg


def commit(directory: Path) -> None:
    """Rename the finished temporary directory into place, then point ``latest`` at it."""
    final = Path(directory)
    if final.exists():
        shutil.rmtree(final)
    os.replace(temporary(final), final)
    pointer = final.parent / LATEST
    tmp = pointer.with_name(LATEST + ".tmp")
    tmp.write_text(final.name + "\n")
    os.replace(tmp, pointer)


def latest(checkpoint_root: Path) -> Optional[Path]:
    """The newest complete checkpoint directory under ``checkpoint_root``, or None."""
    pointer = Path(checkpoint_root) / LATEST
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if path.is_dir() else None




def resolve(path) -> Path:
    """A step directory, given it or a checkpoint root (whose ``latest`` is followed)."""
    path = Path(path)
    if (path / "meta.json").is_file():
        return path
    found = latest(path)
    if found is None:
        raise CheckpointError(f"no checkpoint at {path} (no meta.json and no '{LATEST}' pointer)")
    return found
