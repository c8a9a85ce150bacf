"""The PyTorch modules that replace a transformers decoder layer for each plan action.

Every family's decoder layer is, per sublayer, ``h + s * post(sub(pre(h)))`` with `pre` an input norm (or
none: OLMo-2), `post` an output norm (Gemma-2/3, OLMo-2) or none, and `s` a residual multiplier (Granite)
or 1. An architecture names those pieces (`LayerParts`); the modules here are built from them, so a dropped
or linearized sublayer is exact for every family's norms.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class LayerParts:
    """The sublayers and norms of one transformers decoder layer (None: the family has no such norm)."""

    attention: nn.Module
    attention_norm: nn.Module | None
    post_attention_norm: nn.Module | None
    mlp: nn.Module
    mlp_norm: nn.Module | None
    post_mlp_norm: nn.Module | None
    residual_scale: float = 1.0
    #: the family's model loop reads ``layer(...)[0]`` (Gemma-2/3, Granite) rather than a tensor
    returns_tuple: bool = False
    #: role (a field above) -> the family's attribute name, kept by the pruned modules so that their
    #: parameter and ONNX node names are the stock layer's
    names: dict[str, str] = field(default_factory=dict)

    def keep(self, module: nn.Module, *roles: str) -> None:
        """Register `roles` on `module` under the family's names (roles the family lacks are None)."""
        names = {}
        for role in roles:
            name = self.names.get(role, role)
            names[role] = name
            part = getattr(self, role)
            if part is None:
                continue
            module.add_module(name, part)
        module._roles = {**getattr(module, "_roles", {}), **names}


def _apply(module: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    return x if module is None else module(x)


class _Pruned(nn.Module):
    def __init__(self, attention_type: str | None, returns_tuple: bool):
        super().__init__()
        self.returns_tuple = returns_tuple
        if attention_type is not None:
            self.attention_type = attention_type  # read by some models to pick the attention mask

    def _part(self, role: str) -> nn.Module | None:
        return self._modules.get(self._roles[role])

    def _out(self, hidden_states: torch.Tensor):
        return (hidden_states,) if self.returns_tuple else hidden_states


class AttentionFreeLayer(_Pruned):
    """A decoder layer whose attention sublayer was removed: ``h + s * post_mlp(mlp(mlp_norm(h)))``.

    It holds only the MLP and its norms, so the input norm and q/k/v/o weights are gone, and it never
    touches the KV cache.
    """

    def __init__(self, parts: LayerParts, attention_type: str | None = None):
        super().__init__(attention_type, parts.returns_tuple)
        parts.keep(self, "mlp_norm", "mlp", "post_mlp_norm")
        self.residual_scale = parts.residual_scale

    def mlp_step(self, hidden_states: torch.Tensor) -> torch.Tensor:
        mlp = self._part("mlp")
        update = _apply(self._part("post_mlp_norm"), mlp(_apply(self._part("mlp_norm"), hidden_states)))
        return hidden_states + self.residual_scale * update

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return self._out(self.mlp_step(hidden_states))


class LinearAttentionLayer(AttentionFreeLayer):
    """A decoder layer whose attention is HARP-linearized: ``h + s * scale * post(fused(norm(h)))``, then
    the MLP step.

    `fused` is the single ``d x d`` matmul ``o_proj(repeat_kv(v_proj(.)))`` (`gatenorm.harp`) times alpha
    where the family has no post-attention norm (`scale` 1); after a post-attention norm, which removes
    any scale, alpha is `scale`. The layer keeps no KV cache.
    """

    def __init__(
        self, parts: LayerParts, fused: nn.Linear, scale: float = 1.0, attention_type: str | None = None
    ):
        super().__init__(parts, attention_type)
        parts.keep(self, "attention_norm", "post_attention_norm")
        self.fused_attention = fused
        self.scale = scale

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        normed = _apply(self._part("attention_norm"), hidden_states)
        update = _apply(self._part("post_attention_norm"), self.fused_attention(normed))
        return self._out(self.mlp_step(hidden_states + self.residual_scale * self.scale * update))

    def without_attention(self) -> AttentionFreeLayer:
        """This layer with its linear attention removed too: the MLP step alone."""
        free = AttentionFreeLayer.__new__(AttentionFreeLayer)
        _Pruned.__init__(free, getattr(self, "attention_type", None), self.returns_tuple)
        free._roles = dict(self._roles)
        for role in ("mlp_norm", "mlp", "post_mlp_norm"):
            part = self._part(role)
            if part is not None:
                free.add_module(self._roles[role], part)
        free.residual_scale = self.residual_scale
        return free


class LinearBlockLayer(_Pruned):
    """A decoder block removed whole and healed (`gatenorm.heal`): ``h + fused(norm(h))``, one fitted
    ``d x d`` matmul on the block's input norm standing in for the whole block (no MLP, no KV cache)."""

    def __init__(self, parts: LayerParts, fused: nn.Linear, attention_type: str | None = None):
        super().__init__(attention_type, parts.returns_tuple)
        parts.keep(self, "attention_norm")
        self.fused_attention = fused

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        normed = _apply(self._part("attention_norm"), hidden_states)
        return self._out(hidden_states + self.fused_attention(normed))


def linear_module(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Linear:
    """An ``nn.Linear`` computing ``weight @ x + bias`` (HF layout, the weight's dtype)."""
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(weight)
        if bias is not None:
            fused.bias.copy_(bias)
    return fused


class IdentityLayer(_Pruned):
    """A decoder block removed whole (ShortGPT): the residual stream passes through unchanged."""

    def __init__(self, attention_type: str | None = None, returns_tuple: bool = False):
        super().__init__(attention_type, returns_tuple)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return self._out(hidden_states)


PRUNED_LAYERS = (AttentionFreeLayer, LinearAttentionLayer, LinearBlockLayer, IdentityLayer)
