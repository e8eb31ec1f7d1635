"""Per-epoch metrics of a run as they happen: JSON lines in the run directory, and optionally TensorBoard."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ._io import atomic_write_bytes
from .errors import MaskTuneError


class MetricsLog:
    """Log each epoch's metrics to ``run_dir/metrics.jsonl`` and, with ``tensorboard``, as
    TensorBoard scalars ``<stage>/<metric>`` in ``run_dir/tensorboard``.

    Call it with one epoch's metrics (a dict with ``stage`` and ``epoch``, as :func:`~masktune.train_erm`
    passes to ``on_epoch``); ``metrics.jsonl`` gets the dict plus ``elapsed_s`` (seconds since the
    log was opened) as one line. The file is rewritten atomically after each epoch, so it is always
    complete; a resumed run keeps the lines already there and appends its own.
    """

    def __init__(self, run_dir: str | Path, *, tensorboard: bool = False) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise MaskTuneError(
                    "--tensorboard needs the tensorboard package; install it with "
                    "`pip install 'masktune[tensorboard]'` or run without --tensorboard"
                ) from error
            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        self.lines: list[str] = self.path.read_text().splitlines() if self.path.is_file() else []
        self.started = time.perf_counter()

    def __call__(self, metrics: dict) -> None:
        """Record one epoch."""
        self.lines.append(json.dumps({**metrics, "elapsed_s": round(time.perf_counter() - self.started, 3)}))
        atomic_write_bytes(self.path, "".join(line + "\n" for line in self.lines).encode())
        if self.writer is not None:
            for key, value in metrics.items():
                if key not in ("stage", "epoch") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{metrics['stage']}/{key}", value, metrics["epoch"])
            self.writer.flush()

    def close(self) -> None:
        """Close the TensorBoard writer, if any."""
        if self.writer is not None:
            self.writer.close()
