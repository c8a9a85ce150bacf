"""Gemma-2: sandwich norms (input, post-attention, pre- and post-feed-forward RMSNorm, gains stored as
``w`` for ``1 + w``), soft-capped attention and final logits, alternating sliding / global layers."""

from __future__ import annotations

import torch
from torch import nn

from gatenorm.architectures.base import MT, Architecture, register


@register("Gemma2ForCausalLM")
class Gemma2(Architecture):
    """Gemma-2: a dropped attention leaves ``h + post_ffw(mlp(pre_ffw(h)))``."""

    name = "gemma2"
    gguf_arch = "gemma2"
    norm_plus_one = True
    hf_post_attention_norm = "post_attention_layernorm"
    hf_mlp_norm = "pre_feedforward_layernorm"
    hf_post_mlp_norm = "post_feedforward_layernorm"
    layer_returns_tuple = True
    hf_attn_implementation = "eager"  # sdpa would drop the attention soft-capping
    gguf_attention_sublayer = (*Architecture.gguf_attention_sublayer, MT.ATTN_POST_NORM)
    deci_exportable = False
    gguf_from_hf = False
    deci_refusal = "gemma2's post-norms, soft-capping and sliding window do not exist in llama.cpp's deci"

    @classmethod
    def logits(cls, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().logits(model, hidden)
        cap = getattr(model.config, "final_logit_softcapping", None)
        return logits if not cap else torch.tanh(logits / cap) * cap

    @classmethod
    def attention_softcap(cls, attention: nn.Module) -> float:
        return float(getattr(attention.config, "attn_logit_softcapping", None) or 0.0)
