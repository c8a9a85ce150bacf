"""Granite (dense): its multipliers as llama.cpp's ``granite`` keys, folded into the weights of a deci file
(which reads none of them)."""

from __future__ import annotations

import math

from exporters.gguf.families.base import MT, register_gguf_family
from exporters.gguf.families.llama import LlamaGguf
from gatenorm.architectures import gguf_tensor

#: HF config multiplier -> the ``granite.*`` key llama.cpp's converter writes it as
SCALE_KEYS = {
    "attention_multiplier": "attention.scale",
    "embedding_multiplier": "embedding_scale",
    "residual_multiplier": "residual_scale",
    "logits_scaling": "logit_scale",
}


@register_gguf_family("granite")
class GraniteGguf(LlamaGguf):
    """Granite 3.x dense as ``granite`` (unchanged, written from HF) or deci (the multipliers folded)."""

    rope_types = ()  # llama's llama3 rope_freqs: not checked for granite

    def hparams(self, config: dict) -> dict[str, float]:
        """The multipliers as llama.cpp's ``granite`` keys (suffix -> value)."""
        return {key: float(config[name]) for name, key in SCALE_KEYS.items() if config.get(name)}

    def deci_scales(self, fields, shape) -> dict[str, float]:
        """deci reads none of granite's multipliers: each becomes a factor on the weights it scales (GGUF
        name -> factor): the embedding table, q (the attention scale over deci's 1/sqrt(head size)), each
        sublayer's output projection (the residual multiplier) and the LM head (1 / logit scale)."""

        def get(key: str) -> float:
            field = fields.get(f"{self.arch.gguf_arch}.{key}")
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

    def deci_metadata_dropped(self) -> tuple[str, ...]:
        return tuple(SCALE_KEYS.values())  # folded into the weights
