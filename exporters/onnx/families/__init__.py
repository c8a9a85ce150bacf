"""What the ONNX exporter's graph needs from each family, one spec per family (`base.OnnxFamily`), one
module per family, registered by family name; a family without its own spec gets its nearest ancestor's
(Gemma-3: Gemma-2's), else the base."""

from exporters.onnx.families.base import OnnxFamily, onnx_family, packed_linear, register_onnx_family
from exporters.onnx.families.deci import DeciOnnx
from exporters.onnx.families.gemma2 import Gemma2Onnx
from exporters.onnx.families.granite import GraniteOnnx
from exporters.onnx.families.olmo2 import Olmo2Onnx
from exporters.onnx.families.phi3 import Phi3Onnx

__all__ = [
    "DeciOnnx",
    "Gemma2Onnx",
    "GraniteOnnx",
    "Olmo2Onnx",
    "OnnxFamily",
    "Phi3Onnx",
    "onnx_family",
    "packed_linear",
    "register_onnx_family",
]
