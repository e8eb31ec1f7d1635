"""Files masktune writes and reads back: atomic writes (a killed run never leaves a half-written file
that a later run trusts), checksums written with every file and checked when it is read back, the
one loader of torch files, and the data cache's location.

A torch file masktune writes starts with one line, ``masktune-sha256 <hex digest>``, followed by
what ``torch.save`` wrote; :func:`load_torch` checks the digest before it unpickles anything. A JSON
object masktune writes holds its own checksum under ``"checksum"`` (SHA-256 of the object's
canonical JSON without that key); :func:`read_json` checks it.
"""

from __future__ import annotations

import hashlib
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


TORCH_MAGIC = b"masktune-sha256 "


def save_torch(obj: Any, path: str | Path) -> None:
    """``torch.save`` made atomic, behind a checksum line (see the module's description)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    payload = buffer.getvalue()
    atomic_write_bytes(path, TORCH_MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)


def checksum(obj: dict) -> str:
    """SHA-256 of ``obj``'s canonical JSON (sorted keys, no spaces), leaving out its ``"checksum"``."""
    canonical = json.dumps({k: v for k, v in obj.items() if k != "checksum"}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def with_checksum(obj: dict) -> dict:
    """``obj`` (with JSON's types: tuples as lists) and its checksum under ``"checksum"``."""
    plain = json.loads(json.dumps({k: v for k, v in obj.items() if k != "checksum"}))
    return {**plain, "checksum": checksum(plain)}


def write_json(obj: dict, path: str | Path) -> None:
    """Write the object ``obj`` as indented JSON with its checksum, atomically."""
    atomic_write_bytes(path, (json.dumps(with_checksum(obj), indent=2) + "\n").encode())


def verified(obj: Any, source: str, error: type[Exception] = StorageError,
             fix: str = "delete it and run the same command again to recompute it") -> dict:
    """``obj`` (a parsed JSON object from ``source``) when its checksum matches, else ``error``."""
    if not isinstance(obj, dict) or obj.get("checksum") != checksum(obj):
        what = "no checksum" if not isinstance(obj, dict) or "checksum" not in obj else "a checksum that does not match"
        raise error(f"{source} has {what}: it was damaged, edited or not written by masktune; {fix}")
    return obj


def read_json(path: str | Path, *, error: type[Exception] = StorageError,
              fix: str = "delete it and run the same command again to recompute it") -> dict:
    """A JSON object written by :func:`write_json`, checked against its checksum; a missing,
    unreadable, malformed or altered file raises ``error`` naming it, what is wrong and ``fix``."""
    try:
        obj = json.loads(Path(path).read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise error(f"{path} does not exist; {fix}") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise error(f"cannot read {path} ({' '.join(str(exc).split())[:200]}); {fix}") from None
    return verified(obj, str(path), error, fix)


def load_torch(path: str | Path, *, map_location: torch.device | str = "cpu",
               error: type[Exception] = StorageError,
               fix: str = "delete it and run again to recompute it") -> Any:
    """A torch file written by :func:`save_torch`: its checksum checked, then tensors and plain Python
    values unpickled (never arbitrary objects: ``weights_only``).

    A missing, truncated, altered or foreign file raises ``error`` (a :class:`~masktune.errors.MaskTuneError`
    subclass) naming the file, what is wrong with it and ``fix``.
    """
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise error(f"cannot read {path} (it does not exist); {fix}") from None
    except OSError as exc:
        raise error(f"cannot read {path} ({exc.strerror}); {fix}") from None
    header, _, payload = raw.partition(b"\n")
    if not header.startswith(TORCH_MAGIC):
        raise error(f"cannot read {path} (it was not written by masktune: no checksum line); {fix}")
    if hashlib.sha256(payload).hexdigest().encode() != header[len(TORCH_MAGIC):]:
        raise error(f"cannot read {path} (its checksum does not match: the file is damaged); {fix}")
    try:
        return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    # torch raises many types for a truncated or foreign file (RuntimeError, EOFError, UnpicklingError, ...)
    except Exception as exc:
        text = " ".join(str(exc).split())
        if "Weights only load failed" in text:
            reason = "it holds Python objects other than tensors and plain values, which masktune does not load"
        else:
            reason = text[:200] or type(exc).__name__
        raise error(f"cannot read {path} ({reason}); {fix}") from None
