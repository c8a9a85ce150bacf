"""Phi-3: q, k, v are already one projection (``qkv_proj``, rows q, k, v), gate and up too
(``gate_up_proj``)."""

from __future__ import annotations

import torch
from torch import nn

from exporters.onnx.families.base import OnnxFamily, register_onnx_family


@register_onnx_family("phi3")
class Phi3Onnx(OnnxFamily):
    """Phi-3: its fused ``qkv_proj`` is the packed projection as it is."""

    def qkv_projection(self, attention: nn.Module) -> nn.Module:
        return attention.qkv_proj  # rows q, k, v already

    def gate_up(self, mlp: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        return mlp.gate_up_proj.weight, mlp.gate_up_proj.bias  # rows gate, up already
