"""OLMo-2: q/k RMSNorm over whole projections; onnxruntime-genai runs it as ``olmo``."""

from __future__ import annotations

from exporters.onnx.families.base import OnnxFamily, register_onnx_family


@register_onnx_family("olmo2")
class Olmo2Onnx(OnnxFamily):
    """OLMo-2: q and k normed over the whole projection, not per head."""

    genai_model_type = "olmo"  # onnxruntime-genai 0.18 refuses "olmo2"; its decoder-only "olmo" runs it

    def has_qk_norms(self) -> bool:
        return True
