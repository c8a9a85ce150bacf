"""Granite: nemotron-nas reads none of its multipliers, so each becomes a factor on the weights it scales
(as for llama.cpp's deci): embeddings, q (attention multiplier over 1/sqrt(head size)), each sublayer's
output projection (residual multiplier) and the LM head (1 / logits scaling)."""

from __future__ import annotations

import math

from exporters.mlx.families.base import MlxSpec, Scales, register_mlx_family


@register_mlx_family("granite")
class GraniteSpec(MlxSpec):
    @classmethod
    def scales(cls, config: dict) -> Scales:
        head_dim = int(config["hidden_size"]) // int(config["num_attention_heads"])
        attention = config.get("attention_multiplier")
        return Scales(
            embedding=float(config.get("embedding_multiplier") or 1.0),
            query=float(attention) * math.sqrt(head_dim) if attention else 1.0,
            residual=float(config.get("residual_multiplier") or 1.0),
            logits=1.0 / float(config.get("logits_scaling") or 1.0),
        )
