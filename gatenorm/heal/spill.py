"""Float32 tensors kept in files while a heal fit runs, not in memory.

A fold's refitted down projections are ``d x d_ff`` float32 each (235 MB at Llama-3-8B's 4096 x 14336) and
a plan of four dropped attentions refits about eight of them, which the fit would otherwise hold to its
end beside the moments it is solving. Each is written when fitted and read back one at a time when the
weights file is written (`gatenorm.heal.store.save_repairs`) and the plan records its hash.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, MutableMapping
from pathlib import Path

import numpy as np
import torch


class SpilledTensors(MutableMapping[int, torch.Tensor]):
    """Layer -> float32 tensor, each in a file of a temporary folder under `folder` (removed with the
    mapping); reading a layer loads a fresh copy."""

    def __init__(self, folder: Path):
        Path(folder).mkdir(parents=True, exist_ok=True)
        self._folder = tempfile.TemporaryDirectory(prefix=".gatenorm-refits-", dir=folder)
        self._shapes: dict[int, tuple[int, ...]] = {}

    def _path(self, key: int) -> Path:
        return Path(self._folder.name) / f"{key}.f32"

    def __setitem__(self, key: int, value: torch.Tensor) -> None:
        values = value.detach().to(torch.float32).contiguous().numpy()
        values.tofile(self._path(key))
        self._shapes[key] = tuple(values.shape)

    def __getitem__(self, key: int) -> torch.Tensor:
        shape = self._shapes[key]
        return torch.from_numpy(np.fromfile(self._path(key), dtype=np.float32).reshape(shape))

    def __delitem__(self, key: int) -> None:
        del self._shapes[key]
        self._path(key).unlink()

    def __iter__(self) -> Iterator[int]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)
