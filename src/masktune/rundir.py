"""What a run directory holds besides checkpoints: a lock against a second writer, the saved
configuration a resumed run must match, and masks saved chunk by chunk as they are computed."""

from __future__ import annotations

import fcntl
import json
import os
import socket
from pathlib import Path
from types import TracebackType
from typing import Any, Mapping

from .errors import MaskTuneError
from .masksets import MaskSet, MaskSetError

# Settings that do not change a run's results: a run may resume with other values.
RESUMABLE_CHANGES = ("out", "num_workers")


class RunDirError(MaskTuneError, RuntimeError):
    """The run directory is in use, or holds a run made with other settings."""


class RunLock:
    """An exclusive lock on a run directory (``run.lock``, which names the holder).

    The lock is an ``flock`` on the open file, which the kernel drops when the holder dies, even by
    SIGKILL, so a killed run never blocks its own resume. On release the lock file is removed, and
    the folder too when the lock created it and nothing else was written there.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / "run.lock"
        self._file = None
        self._created = False

    def __enter__(self) -> RunLock:
        self._created = not self.folder.exists()
        while True:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                file = open(self.path, "a+")
            except OSError as error:
                raise RunDirError(f"cannot write into {self.folder} ({error.strerror}); pass a writable --out") from None
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                file.seek(0)
                holder = file.read().strip() or "a process"
                file.close()
                raise RunDirError(
                    f"{self.folder} is being written by another masktune run ({holder}); wait for it to "
                    "finish, or pass another --out for this run"
                ) from None
            try:
                current = os.stat(self.path)
            except FileNotFoundError:
                current = None
            # the previous holder may have removed the file between our open and our flock
            if current is not None and os.path.samestat(current, os.fstat(file.fileno())):
                break
            file.close()
        file.truncate(0)
        file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        file.flush()
        self._file = file
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.path.unlink(missing_ok=True)
        self._file.close()
        if self._created and not any(self.folder.iterdir()):
            self.folder.rmdir()


def config_differences(saved: dict, current: dict) -> list[str]:
    """The settings in which two saved configurations (``config.json`` form) differ, as
    ``"key: saved X, now Y"``; settings in :data:`RESUMABLE_CHANGES` are ignored."""
    current = json.loads(json.dumps(current))  # tuples as lists, as they are saved
    return [f"{key}: saved {saved.get(key)!r}, now {current.get(key)!r}"
            for key in sorted(set(saved) | set(current))
            if key not in RESUMABLE_CHANGES and saved.get(key) != current.get(key)]


def check_saved_config(folder: Path, config: dict) -> bool:
    """Whether ``folder`` holds saved work of a run to continue; refuse it when that run was made
    with other settings. A ``config.json`` with nothing saved beside it (a run that stopped before
    its first checkpoint) holds nothing to continue, whatever its settings.

    ``config`` is the configuration of the new run, in the form ``config.json`` records.
    """
    path = folder / "config.json"
    saved_work = [p for p in folder.rglob("*") if p.is_file() and p.name not in ("config.json", "run.lock")]
    if not path.is_file() or not saved_work:
        return False
    differences = config_differences(json.loads(path.read_text()), config)
    if differences:
        raise RunDirError(
            f"{folder} holds a run made with other settings ({'; '.join(differences)}). To resume it, run the "
            "same command as before; for a new run, pass another --out (or delete the folder)"
        )
    return True


class MaskStore:
    """Masks of one method, saved as :class:`~masktune.MaskSet` chunks ``<start>-<stop>.pt`` of
    consecutive images, each written atomically once computed, so a killed masking stage resumes
    after its last chunk. Chunks stay bit-packed from computation to the finished set."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def _path(self, start: int, stop: int) -> Path:
        return self.folder / f"{start:09d}-{stop:09d}.pt"

    def save(self, start: int, stop: int, masks: MaskSet) -> None:
        """Save the masks of images ``start .. stop - 1``."""
        if len(masks) != stop - start:
            raise RunDirError(f"{len(masks)} masks given for images {start}..{stop - 1}")
        masks.save(self._path(start, stop))

    def load(self, start: int, stop: int, expect: Mapping[str, Any] | None = None) -> MaskSet | None:
        """The masks of images ``start .. stop - 1`` when that chunk was saved, else ``None``; a chunk
        whose metadata differs from ``expect`` (e.g. another model's masks) is refused."""
        path = self._path(start, stop)
        if not path.is_file():
            return None
        try:
            masks = MaskSet.load(path, expect=expect)
        except MaskSetError as error:
            raise RunDirError(f"{error}. The saved masks in {self.folder} cannot be used: delete that folder and "
                              "run the same command again to recompute them") from None
        if len(masks) != stop - start:
            raise RunDirError(f"{path} holds {len(masks)} masks, not {stop - start}; delete {self.folder} and run "
                              "the same command again to recompute them")
        return masks

    def load_all(self) -> MaskSet:
        """All saved masks in image order (the chunks must cover ``0 .. N - 1`` without gaps)."""
        spans = sorted(tuple(int(x) for x in path.stem.split("-")) for path in self.folder.glob("*-*.pt"))
        if not spans or spans[0][0] != 0 or any(a[1] != b[0] for a, b in zip(spans, spans[1:])):
            raise RunDirError(f"{self.folder} does not hold a complete set of masks; run the experiment to finish it")
        return MaskSet.concatenate([self.load(start, stop) for start, stop in spans])
