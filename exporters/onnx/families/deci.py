"""A deci GGUF: not exported to ONNX yet."""

from __future__ import annotations

from exporters.onnx.families.base import OnnxFamily, register_onnx_family


@register_onnx_family("deci")
class DeciOnnx(OnnxFamily):
    """deci: attention-free and linear layers the graph does not build yet."""

    refusal = "a deci file's attention-free and linear layers are not exported to onnxruntime yet"
