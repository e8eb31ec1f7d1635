"""Files masktune writes and reads back: atomic writes (a killed run never leaves a half-written file
that a later run trusts), the one loader of torch files, and the data cache's location."""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import StorageError


def masktune_home() -> Path:
    """Directory for cached data: ``$MASKTUNE_HOME``, or ``~/.cache/masktune``."""
    return Path(os.environ.get("MASKTUNE_HOME") or Path.home() / ".cache" / "masktune")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, fsync, then rename; the
    file's mode follows the user's umask."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a written file gets the user's umask
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_torch(obj: Any, path: str | Path) -> None:
    """``torch.save`` made atomic."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def write_json(obj: Any, path: str | Path) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def load_torch(path: str | Path, *, map_location: torch.device | str = "cpu",
               error: type[Exception] = StorageError,
               fix: str = "delete it and run again to recompute it") -> Any:
    """A torch file of tensors and plain Python values (never arbitrary objects: ``weights_only``).

    A missing, truncated or foreign file raises ``error`` (a :class:`~masktune.errors.MaskTuneError`
    subclass) naming the file, what is wrong with it and ``fix``.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    # torch raises many types for a truncated or foreign file (RuntimeError, EOFError, UnpicklingError, ...)
    except Exception as exc:
        text = " ".join(str(exc).split())
        if "Weights only load failed" in text:
            reason = "it holds Python objects other than tensors and plain values, which masktune does not load"
        elif isinstance(exc, FileNotFoundError):
            reason = "it does not exist"
        else:
            reason = text[:200] or type(exc).__name__
        raise error(f"cannot read {path} ({reason}); {fix}") from None
