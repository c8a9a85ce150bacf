"""OLMo-2: q/k RMSNorm over whole projections; onnxruntime-genai runs it as ``olmo``."""

from __future__ import annotations

import torch
from torch import nn

from exporters.onnx.families.base import OnnxFamily, register_onnx_family


@register_onnx_family("olmo2")
class Olmo2Onnx(OnnxFamily):
    """OLMo-2: q and k normed over the whole projection, not per head."""

    genai_model_type = "olmo"  # onnxruntime-genai 0.18 refuses "olmo2"; its decoder-only "olmo" runs it

    def has_qk_norms(self) -> bool:
        return True

    def normed_qk(self, attention: nn.Module, q: torch.Tensor, k: torch.Tensor):
        return attention.q_norm(q), attention.k_norm(k)  # over the whole projection, not per head
