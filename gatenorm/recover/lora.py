"""Low-rank adapters on a model's linear modules, and their merge into the weights.

An adapter adds ``scale * B A x`` to its linear module's output (``scale = alpha / rank``; A starts uniform
in +-1/sqrt(d_in) from a seeded generator, B at zero, so training starts at the model as it is); merging
writes ``W + scale * B @ A`` (float32). Written here rather than taken from PEFT: the merge has to be ours
anyway (its bytes are hashed into the plan), and the wrapper is a few lines.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LoraLinear(nn.Module):
    """`base` (frozen) plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        out_features, in_features = base.weight.shape
        bound = 1.0 / math.sqrt(in_features)
        a = torch.empty(rank, in_features).uniform_(-bound, bound, generator=generator)
        self.a = nn.Parameter(a.to(base.weight.device))
        self.b = nn.Parameter(torch.zeros(out_features, rank, device=base.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.a.T @ self.b.T) * self.scale

    def merged(self) -> torch.Tensor:
        """The merged weight ``W + scale * B @ A``, float32 on the CPU."""
        with torch.no_grad():
            base = self.base.weight.detach().float().cpu()
            return base + self.scale * (self.b.detach().float().cpu() @ self.a.detach().float().cpu())

    def changed(self) -> bool:
        """Whether merging changes any of the base weight's values."""
        return not torch.equal(self.merged(), self.base.weight.detach().float().cpu())


def attach(parent: nn.Module, path: str, rank: int, alpha: float, generator: torch.Generator) -> LoraLinear:
    """Replace the linear module at `path` under `parent` by a `LoraLinear` around it; return that."""
    owner, _, leaf = path.rpartition(".")
    holder = parent.get_submodule(owner) if owner else parent
    adapter = LoraLinear(getattr(holder, leaf), rank, alpha, generator)
    setattr(holder, leaf, adapter)
    return adapter
