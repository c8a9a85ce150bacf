"""Granite (dense): llama layout with embedding, attention, residual and logit multipliers."""

from __future__ import annotations

import math

import torch
from torch import nn

from gatenorm.architectures.base import MT, gguf_tensor, register
from gatenorm.architectures.llama import Llama

#: HF config multiplier -> the ``granite.*`` key llama.cpp's converter writes it as
SCALE_KEYS = {
    "attention_multiplier": "attention.scale",
    "embedding_multiplier": "embedding_scale",
    "residual_multiplier": "residual_scale",
    "logits_scaling": "logit_scale",
}


@register("GraniteForCausalLM")
class Granite(Llama):
    """Granite 3.x dense: each sublayer's output is scaled by ``residual_multiplier``, logits divided by
    ``logits_scaling`` (attention scale ``attention_multiplier``, embeddings ``embedding_multiplier``)."""

    name = "granite"
    gguf_arch = "granite"
    layer_returns_tuple = True
    gguf_rope_types = ()  # llama's llama3 rope_freqs: not checked for granite

    @classmethod
    def gguf_hparams(cls, config: dict) -> dict[str, float]:
        """The multipliers as llama.cpp's ``granite`` keys (suffix -> value)."""
        return {key: float(config[name]) for name, key in SCALE_KEYS.items() if config.get(name)}

    @classmethod
    def deci_scales(cls, fields, shape) -> dict[str, float]:
        """deci reads none of granite's multipliers: each becomes a factor on the weights it scales (GGUF
        name -> factor): the embedding table, q (the attention scale over deci's 1/sqrt(head size)), each
        sublayer's output projection (the residual multiplier) and the LM head (1 / logit scale)."""

        def get(key: str) -> float:
            field = fields.get(f"{cls.gguf_arch}.{key}")
            return float(field.contents()) if field is not None and field.contents() else 0.0

        attention, residual = get("attention.scale"), get("residual_scale") or 1.0
        scales = {
            gguf_tensor(MT.TOKEN_EMBD): get("embedding_scale") or 1.0,
            gguf_tensor(MT.OUTPUT): 1.0 / (get("logit_scale") or 1.0),
        }
        per_layer = {
            MT.ATTN_Q: attention * math.sqrt(shape.head_dim) if attention else 1.0,
            MT.ATTN_OUT: residual,
            MT.FFN_DOWN: residual,
        }
        for i in range(shape.n_layers):
            for tensor, factor in per_layer.items():
                for suffix in ("weight", "bias"):
                    scales[gguf_tensor(tensor, suffix).format(i=i)] = factor
        return {name: factor for name, factor in scales.items() if factor != 1.0}

    @classmethod
    def deci_metadata_dropped(cls) -> tuple[str, ...]:
        return tuple(SCALE_KEYS.values())  # folded into the weights

    @classmethod
    def residual_scale(cls, layer: nn.Module) -> float:
        return float(layer.residual_multiplier)

    @classmethod
    def logits(cls, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return super().logits(model, hidden) / model.config.logits_scaling
