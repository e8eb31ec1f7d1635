"""Several processes through ``torch.distributed``: NCCL on GPUs, gloo on CPUs.

Launch with ``torchrun --nproc_per_node=N -m masktune run ...``: :func:`session` reads torchrun's
environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``) and starts the process group. Every helper
here is a no-op in a single process, so the same code runs with and without torchrun.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, Subset

from .errors import DeviceError, MaskTuneError

T = TypeVar("T")


def active() -> bool:
    """Whether a process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 in a single process)."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """The number of processes (1 in a single process)."""
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Whether this is rank 0, the process that writes files and shows progress."""
    return rank() == 0


def note(message: str, progress: bool = True) -> None:
    """Print ``masktune: <message>`` on standard error, from rank 0 only, unless ``progress`` is off."""
    if progress and is_main():
        print(f"masktune: {message}", file=sys.stderr)


def launched_world_size() -> int:
    """The number of processes torchrun started (``WORLD_SIZE``; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_device(name: str) -> torch.device:
    """The device called ``name`` (``cpu``, ``cuda``, ``cuda:N``, ``mps``), checked to be usable.

    Under torchrun with several processes, ``cuda`` means the GPU of this process's local rank.
    """
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise DeviceError(f"unknown device {name!r}; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cpu":
        return device
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError("device 'mps' is not available (no Apple GPU visible to PyTorch); use --device cpu")
        return device
    if device.type != "cuda":
        raise DeviceError(f"device type {device.type!r} is not supported; use cpu, cuda, cuda:N or mps")
    if not torch.cuda.is_available():
        raise DeviceError(
            f"device {name!r} is not available (no CUDA GPU visible to PyTorch); use --device cpu, or check "
            "CUDA_VISIBLE_DEVICES and that the installed PyTorch is a CUDA build"
        )
    count = torch.cuda.device_count()
    if launched_world_size() > 1:
        if device.index is not None:
            raise DeviceError(f"under torchrun pass --device cuda, not {name!r}: each process uses the GPU of "
                              "its local rank")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index >= count:
        raise DeviceError(
            f"device cuda:{index} is not available: {count} GPU(s) visible (cuda:0 to cuda:{count - 1}); "
            "pass one of those, or start fewer processes per node"
        )
    return torch.device("cuda", index)


@contextmanager
def session(device: str = "cpu") -> Iterator[None]:
    """Start the process group when launched by torchrun with several processes (NCCL for a CUDA
    ``device``, else gloo) and end it on exit; inside a running group, or without torchrun, do nothing."""
    if launched_world_size() <= 1 or (dist.is_available() and dist.is_initialized()):
        yield
        return
    resolved = resolve_device(device)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    dist.init_process_group("nccl" if resolved.type == "cuda" else "gloo",
                            device_id=resolved if resolved.type == "cuda" else None)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _comm_device() -> torch.device:
    """Where tensors must be for collectives: the current GPU under NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def barrier() -> None:
    """Wait until every process gets here."""
    if active():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over all processes (``tensor`` itself in a single process)."""
    if not active():
        return tensor
    total = tensor.to(_comm_device())
    dist.all_reduce(total)
    return total.to(tensor.device)


def broadcast_buffers(model: nn.Module) -> None:
    """Copy rank 0's buffers (e.g. BatchNorm running statistics, which each process updates on its
    own part of the batch) to every process, so that all hold the same model."""
    if not active():
        return
    for buffer in model.buffers():
        synced = buffer.to(_comm_device())
        dist.broadcast(synced, 0)
        buffer.copy_(synced)


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel when several processes run, else ``model`` itself."""
    if not active():
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a ``torch.compile`` and a DistributedDataParallel wrapper (see :func:`wrap`),
    or ``model`` itself."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def shard_range(n: int, shard: int | None = None, shards: int | None = None) -> range:
    """The contiguous part of ``range(n)`` that process ``shard`` of ``shards`` handles (default: this one)."""
    shard = rank() if shard is None else shard
    shards = world_size() if shards is None else shards
    return range(n * shard // shards, n * (shard + 1) // shards)


def gather_in_order(local: torch.Tensor) -> torch.Tensor:
    """Concatenate every process's ``local`` tensor in rank order (sizes along dim 0 may differ)."""
    if not active():
        return local
    metas: list[Any] = [None] * world_size()
    dist.all_gather_object(metas, (tuple(local.shape), local.dtype) if len(local) else None)
    known = [meta for meta in metas if meta is not None]
    if not known:
        return local
    shape, dtype = known[0]
    local = local if len(local) else torch.empty((0, *shape[1:]), dtype=dtype)
    longest = max(meta[0][0] if meta else 0 for meta in metas)
    wire = torch.uint8 if dtype == torch.bool else dtype  # gloo has no bool collectives
    padded = torch.zeros((longest, *shape[1:]), dtype=wire, device=_comm_device())
    padded[: len(local)] = local.to(padded.device, wire)
    parts = [torch.empty_like(padded) for _ in metas]
    dist.all_gather(parts, padded)
    return torch.cat([part[: meta[0][0] if meta else 0] for part, meta in zip(parts, metas)]).to(local.device, dtype)


def map_shards(fn: Callable[[Dataset], torch.Tensor], dataset: Dataset) -> torch.Tensor:
    """``fn`` of the whole ``dataset``, computed by each process on its contiguous shard and gathered
    in dataset order (``fn`` must return one row per sample, e.g. logits or masks)."""
    if not active():
        return fn(dataset)
    part = shard_range(len(dataset))
    local = fn(Subset(dataset, part)) if len(part) else torch.empty(0)
    return gather_in_order(local)


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and hand its result, or the :class:`MaskTuneError` it raised, to
    every process (so a refusal on rank 0 stops all of them instead of leaving them waiting)."""
    if not active():
        return fn()
    box: list[Any] = [None]
    if is_main():
        try:
            box[0] = ("ok", fn())
        except MaskTuneError as error:
            box[0] = ("error", error)
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise value
    return value
