"""Gemma-2 (and Gemma-3 through it): attention soft-capping (GroupQueryAttention's ``softcap``), final
logit soft-capping and the sqrt(d) embedding scale."""

from __future__ import annotations

import numpy as np
from torch import nn

from exporters.onnx.families.base import OnnxFamily, register_onnx_family


@register_onnx_family("gemma2")
class Gemma2Onnx(OnnxFamily):
    """Gemma-2: soft-capped attention logits where the config sets them (Gemma-3 does not)."""

    def attention_softcap(self, attention: nn.Module) -> float:
        return float(getattr(attention.config, "attn_logit_softcapping", None) or 0.0)

    def embedding_scale(self, config) -> float:
        return float(np.float32(config.hidden_size**0.5))  # Gemma's normalizer, a float32 tensor

    def logits_softcap(self, config) -> float:
        return float(getattr(config, "final_logit_softcapping", None) or 0.0)
