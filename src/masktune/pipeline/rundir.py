"""The run directory: a lock against a second writer, the saved configuration a resumed run must
match, resumable stages (each stage's output saved atomically once computed, loaded instead of
recomputed when a run starts again), masks saved chunk by chunk, and the per-epoch metrics log."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import Any, Callable, Mapping, TypeVar

from .. import distributed
from ..errors import MaskSetError, MaskTuneError, RunDirError, StorageError
from ..masks.maskset import MaskSet
from ..storage import atomic_write_bytes, read_json

T = TypeVar("T")

# Settings that do not change a run's results: a run may resume with other values.
RESUMABLE_CHANGES = ("out", "num_workers", "cache", "cache_dir")


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
            if key not in (*RESUMABLE_CHANGES, "checksum") and saved.get(key) != current.get(key)]


def other_run(path: Path, what: str) -> RunDirError:
    """The refusal of a saved stage output that another run made."""
    return RunDirError(f"{path} was made by a run with other {what} than this one; to continue that run, run its "
                       "command again; for a new run, pass another --out (or delete the folder)")


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
    refuse_other_settings(folder, read_json(path, error=RunDirError, fix=FIX_CONFIG), config)
    return True


FIX_CONFIG = "delete it to continue the run with the settings of this command"


def refuse_other_settings(folder: Path, saved: dict, config: dict) -> None:
    """Refuse the run directory ``folder`` when its ``saved`` configuration differs from ``config``."""
    differences = config_differences(saved, config)
    if differences:
        raise RunDirError(
            f"{folder} holds a run made with other settings ({'; '.join(differences)}). To resume it, run the "
            "same command as before; for a new run, pass another --out (or delete the folder)"
        )


class RunDir:
    """A run directory and its resumable stages.

    :meth:`stage` is the one resume mechanism of a run: a stage's output is loaded when it was saved
    before, else computed and saved. ``resumed`` says whether any output was loaded (or the run
    continued a saved ERM), i.e. whether this run continues an earlier one.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.resumed = False

    def claim(self, stack: ExitStack, config: dict) -> tuple[bool, dict | None]:
        """Lock the directory for this run (until ``stack`` closes) and check its saved configuration
        against ``config``; returns whether there is saved work to continue, and the results of a
        finished run (None when unfinished)."""
        stack.enter_context(RunLock(self.path))
        resuming = check_saved_config(self.path, config)
        path = self.path / "results.json"
        if not path.is_file():
            return resuming, None
        finished = read_json(path, error=RunDirError, fix="delete it and run the same command again to evaluate the "
                                                              "saved models anew")
        refuse_other_settings(self.path, finished.get("config", {}), config)
        return resuming, finished

    def stage(self, name: str, compute: Callable[[], T], save: Callable[[T, Path], None],
              load: Callable[[Path], T]) -> T:
        """The output of the stage saved as ``name`` (a path inside the run directory): ``load(path)``
        when it exists, else ``compute()``, saved by ``save(output, path)`` on rank 0 (atomically,
        the file at ``path`` last) before every process goes on."""
        path = self.path / name
        if path.is_file():
            self.resumed = True
            return load(path)
        output = compute()
        if distributed.is_main():
            save(output, path)
        distributed.barrier()
        return output


class MaskStore:
    """Masks of one method, saved as :class:`~masktune.MaskSet` chunks ``<start>-<stop>.pt`` of
    consecutive images, each written atomically once computed, so a killed masking stage resumes
    after its last chunk. Chunks stay bit-packed from computation to the finished set."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def path(self, start: int, stop: int) -> Path:
        """The file of the masks of images ``start .. stop - 1``."""
        return self.folder / f"{start:09d}-{stop:09d}.pt"

    def save(self, start: int, stop: int, masks: MaskSet) -> None:
        """Save the masks of images ``start .. stop - 1``."""
        if len(masks) != stop - start:
            raise RunDirError(f"{len(masks)} masks given for images {start}..{stop - 1}")
        masks.save(self.path(start, stop))

    def load(self, start: int, stop: int, expect: Mapping[str, Any] | None = None) -> MaskSet | None:
        """The masks of images ``start .. stop - 1`` when that chunk was saved, else ``None``; a chunk
        whose metadata differs from ``expect`` (e.g. another model's masks) is refused."""
        path = self.path(start, stop)
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


class MetricsLog:
    """Log each epoch's metrics to ``run_dir/metrics.jsonl`` and, with ``tensorboard``, as
    TensorBoard scalars ``<stage>/<metric>`` in ``run_dir/tensorboard``; a context manager.

    Call it with one epoch's metrics (a dict with ``stage`` and ``epoch``, as :func:`~masktune.train_erm`
    passes to ``on_epoch``); ``metrics.jsonl`` gets the dict plus ``elapsed_s`` (seconds since the
    log was opened) as one line. The file is rewritten atomically after each epoch, so it is always
    complete; a resumed run keeps the lines already there and appends its own. With ``enabled``
    false (processes other than rank 0) it records nothing.
    """

    def __init__(self, run_dir: str | Path, *, tensorboard: bool = False, enabled: bool = True) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.writer = None
        if tensorboard and enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise MaskTuneError(
                    "--tensorboard needs the tensorboard package; install it with "
                    "`pip install 'masktune[tensorboard]'` or run without --tensorboard"
                ) from error
            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        self.lines: list[str] = self._saved_lines() if enabled else []
        self.started = time.perf_counter()

    def _saved_lines(self) -> list[str]:
        if not self.path.is_file():
            return []
        try:
            lines = self.path.read_bytes().decode("utf-8").splitlines()
            for line in lines:
                json.loads(line)
        except (OSError, UnicodeDecodeError, ValueError) as error:
            raise StorageError(f"cannot read {self.path} ({' '.join(str(error).split())[:200]}); delete it (it "
                               "is a log: the run does not need it) and run the same command again") from None
        return lines

    def __call__(self, metrics: dict) -> None:
        """Record one epoch."""
        if not self.enabled:
            return
        self.lines.append(json.dumps({**metrics, "elapsed_s": round(time.perf_counter() - self.started, 3)}))
        atomic_write_bytes(self.path, "".join(line + "\n" for line in self.lines).encode())
        if self.writer is not None:
            for key, value in metrics.items():
                if key not in ("stage", "epoch") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{metrics['stage']}/{key}", value, metrics["epoch"])
            self.writer.flush()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the TensorBoard writer, if any."""
        if self.writer is not None:
            self.writer.close()
