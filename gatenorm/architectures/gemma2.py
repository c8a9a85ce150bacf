"""Gemma-2: sandwich norms (input, post-attention, pre- and post-feed-forward RMSNorm, gains stored as
``w`` for ``1 + w``), soft-capped attention and final logits, alternating sliding / global layers.

GGUF: `exporters.gguf.families.gemma2`; ONNX: `exporters.onnx.families.gemma2`.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from gatenorm.architectures.base import Architecture, register


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
    #: transformers' SDPA path drops attention soft-capping without a word; eager applies it.
    hf_attn_implementation = "eager"
    #: The default sliding pattern, transformers' and llama.cpp's (``load_swa_pattern``): layer il slides
    #: if il % n < n - 1.
    llama_cpp_swa_pattern: ClassVar[int] = 2

    @classmethod
    def logits(cls, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().logits(model, hidden)
        cap = getattr(model.config, "final_logit_softcapping", None)
        return logits if not cap else torch.tanh(logits / cap) * cap
