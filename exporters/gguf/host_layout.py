"""A GGUF written as another llama.cpp architecture that hosts a family's pruned layers (Qwen3 as
``qwen35``): the target architecture, its keys and every tensor, named with source layer numbers (the
writer, `exporters.gguf.from_gguf`, renumbers them past dropped blocks)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class HostTensor:
    """One tensor of the hosted file: `source`'s bytes (all, or the rows `rows` in order, -1 an all-zero
    row), or new F32 `values` (numpy shape, i.e. GGUF dimensions reversed)."""

    name: str
    source: str | None = None
    rows: tuple[int, ...] | None = None
    values: np.ndarray | None = field(default=None, compare=False)


@dataclass(frozen=True)
class HostLayout:
    """The hosted file: `arch` (``general.architecture``), keys after ``{arch}.`` to set ((value, GGUF
    type, item type or None)) or drop (None), and the tensors in file order."""

    arch: str
    keys: dict
    tensors: list[HostTensor]
