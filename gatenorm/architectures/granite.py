"""Granite (dense): llama layout with embedding, attention, residual and logit multipliers."""

from __future__ import annotations

import torch
from torch import nn

from gatenorm.architectures.base import register
from gatenorm.architectures.llama import Llama


@register("GraniteForCausalLM")
class Granite(Llama):
    """Granite 3.x dense: each sublayer's output is scaled by ``residual_multiplier``, logits divided by
    ``logits_scaling`` (attention scale ``attention_multiplier``, embeddings ``embedding_multiplier``)."""

    name = "granite"
    gguf_arch = "granite"
    layer_returns_tuple = True

    @classmethod
    def residual_scale(cls, layer: nn.Module) -> float:
        return float(layer.residual_multiplier)

    @classmethod
    def logits(cls, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return super().logits(model, hidden) / model.config.logits_scaling
