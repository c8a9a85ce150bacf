"""Gemma-2 (and Gemma-3 through it): attention soft-capping, GroupQueryAttention's ``softcap``."""

from __future__ import annotations

from torch import nn

from exporters.onnx.families.base import OnnxFamily, register_onnx_family


@register_onnx_family("gemma2")
class Gemma2Onnx(OnnxFamily):
    """Gemma-2: soft-capped attention logits where the config sets them (Gemma-3 does not)."""

    def attention_softcap(self, attention: nn.Module) -> float:
        return float(getattr(attention.config, "attn_logit_softcapping", None) or 0.0)
