"""Mask sets: the masks of a whole dataset, bit-packed, with the metadata that says where they came from.

A :class:`MaskSet` stores each mask as one bit per pixel (each image's row of bits padded to whole
bytes), so 48,000 MNIST masks take 4.7 MB and a million 224 x 224 masks 6.3 GB. Indexing unpacks
only the masks asked for. Saved sets carry their CAM method, layer, mask rule, size and a fingerprint
of the model weights; :meth:`MaskSet.check` refuses a set that does not fit a dataset or model.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from ..errors import MaskSetError
from ..storage import load_torch, save_torch

FORMAT = "masktune.maskset"
VERSION = 1
_BIT_VALUES = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_bits(masks: torch.Tensor) -> torch.Tensor:
    """Bool masks [N, H, W] as uint8 [N, ceil(H*W/8)]: pixels in row-major order, most significant bit first."""
    flat = masks.flatten(1).to(torch.uint8)
    flat = torch.nn.functional.pad(flat, (0, -flat.shape[1] % 8))
    return (flat.view(len(flat), -1, 8) * _BIT_VALUES.to(flat.device)).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`pack_bits`: uint8 [N, bytes] to bool [N, height, width]."""
    bits = (packed[..., None] & _BIT_VALUES.to(packed.device)).bool().flatten(-2)
    return bits[..., : height * width].reshape(*packed.shape[:-1], height, width)


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of the model's state dict (names, dtypes, shapes and bytes of every parameter and buffer)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class MaskSet:
    """The masks of every image of a dataset, bit-packed, with metadata.

    ``packed`` is uint8 [N, ceil(H*W/8)] (see :func:`pack_bits`). ``meta`` holds strings and
    numbers: ``cam_method``, ``layer``, ``rule`` and ``model_fingerprint`` for computed masks.
    ``masks[i]`` is a bool [H, W] mask, ``masks[indices]`` a bool [B, H, W] batch (True = masked).
    """

    def __init__(self, packed: torch.Tensor, height: int, width: int, meta: Mapping[str, Any] | None = None) -> None:
        if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != -(-height * width // 8):
            raise MaskSetError(
                f"packed masks must be uint8 [N, {-(-height * width // 8)}] for {height} x {width} masks, "
                f"got {packed.dtype} {tuple(packed.shape)}"
            )
        self.packed = packed
        self.height = height
        self.width = width
        self.meta = dict(meta or {})

    @classmethod
    def from_bool(cls, masks: torch.Tensor, **meta: Any) -> MaskSet:
        """Pack bool masks [N, H, W]; keyword arguments become metadata."""
        return cls(pack_bits(masks).cpu(), *masks.shape[-2:], meta)

    @classmethod
    def concatenate(cls, sets: Sequence[MaskSet]) -> MaskSet:
        """The masks of ``sets``, one set after another; all must have the same mask size and metadata."""
        if not sets:
            raise MaskSetError("there are no mask sets to concatenate")
        first = sets[0]
        for other in sets[1:]:
            if (other.height, other.width, other.meta) != (first.height, first.width, first.meta):
                raise MaskSetError(f"cannot concatenate mask sets of {first.height} x {first.width} masks "
                                   f"({first.meta}) and {other.height} x {other.width} masks ({other.meta})")
        return cls(torch.cat([s.packed for s in sets]), first.height, first.width, first.meta)

    def __len__(self) -> int:
        return len(self.packed)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(N, H, W)``."""
        return len(self), self.height, self.width

    def __getitem__(self, index: int | slice | list[int] | torch.Tensor) -> torch.Tensor:
        return unpack_bits(self.packed[index], self.height, self.width)

    def unpack(self) -> torch.Tensor:
        """All masks as one bool tensor [N, H, W] (8 times the packed size)."""
        return unpack_bits(self.packed, self.height, self.width)

    def __or__(self, other: MaskSet) -> MaskSet:
        """Pixels masked in either set (the metadata of ``other``, the newer set, is kept)."""
        if other.shape != self.shape:
            raise MaskSetError(f"cannot combine mask sets of shapes {self.shape} and {other.shape}")
        return MaskSet(self.packed | other.packed, self.height, self.width, other.meta)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, MaskSet) and self.shape == other.shape and self.meta == other.meta
                and torch.equal(self.packed, other.packed))

    def save(self, path: str | Path) -> None:
        """Write the set and its metadata to ``path`` atomically (a torch file)."""
        save_torch({"format": FORMAT, "version": VERSION, "height": self.height, "width": self.width,
                    "meta": self.meta, "packed": self.packed.cpu()}, path)

    @classmethod
    def load(cls, path: str | Path, *, dataset: Dataset | None = None, model: nn.Module | None = None,
             expect: Mapping[str, Any] | None = None) -> MaskSet:
        """Read a set written by :meth:`save` and :meth:`check` it against the arguments given."""
        path = Path(path)
        if not path.is_file():
            raise MaskSetError(f"mask set {path} does not exist; pass the masks/*.pt file of an earlier run")
        stored = load_torch(path, error=MaskSetError, fix="it is damaged or not a mask set; recompute the masks")
        if not isinstance(stored, dict) or stored.get("format") != FORMAT:
            raise MaskSetError(f"{path} is not a masktune mask set; pass a file written by MaskSet.save")
        if stored.get("version") != VERSION:
            raise MaskSetError(f"{path} is a version {stored.get('version')} mask set; this masktune reads "
                               f"version {VERSION}: recompute the masks")
        missing = [key for key in ("packed", "height", "width", "meta") if key not in stored]
        if missing or not isinstance(stored["meta"], dict) or not isinstance(stored["packed"], torch.Tensor):
            raise MaskSetError(f"{path} is an incomplete or malformed mask set (missing or wrong: "
                               f"{', '.join(missing) or 'meta or packed'}); recompute the masks")
        masks = cls(stored["packed"], stored["height"], stored["width"], stored["meta"])
        masks.check(dataset=dataset, model=model, expect=expect, source=str(path))
        return masks

    def check(self, *, dataset: Dataset | None = None, model: nn.Module | None = None,
              expect: Mapping[str, Any] | None = None, source: str = "the mask set") -> None:
        """Refuse (MaskSetError) a set that does not fit: ``dataset`` (its length and the height x
        width of its first image), ``model`` (the weights' fingerprint) or ``expect`` (metadata values)."""
        problems = []
        if dataset is not None:
            if len(dataset) != len(self):
                problems.append(f"it holds {len(self)} masks but the dataset has {len(dataset)} images")
            elif len(dataset) and tuple(dataset[0][0].shape[-2:]) != (self.height, self.width):
                problems.append(f"its masks are {self.height} x {self.width} but the dataset's images are "
                                f"{' x '.join(map(str, dataset[0][0].shape[-2:]))}")
        if model is not None and self.meta.get("model_fingerprint") != model_fingerprint(model):
            problems.append("it was computed with a model whose weights differ from this model's "
                            "(different model fingerprint: another seed, epoch count or training data?)")
        for key, value in (expect or {}).items():
            if self.meta.get(key) != value:
                problems.append(f"its {key} is {self.meta.get(key)!r}, not {value!r}")
        if problems:
            raise MaskSetError(f"{source} does not match: {'; '.join(problems)}. Recompute the masks, "
                               "or use the data, model and settings they were computed with")
