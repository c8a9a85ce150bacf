"""The structure of each decoder architecture: one adapter class per family (`base.Architecture`), one
module per family, registered by name (HF model_type and class name, GGUF architecture). What an exporter
needs beyond it is that exporter's per-family spec (`exporters.gguf.families`, `exporters.onnx.families`)."""

from gatenorm.architectures.base import (
    ATTENTION_PARTS,
    Architecture,
    get_architecture,
    gguf_tensor,
    model_arch,
    register,
    reorder_rotary_rows,
    unregister,
)
from gatenorm.architectures.deci import Deci
from gatenorm.architectures.gemma2 import Gemma2
from gatenorm.architectures.gemma3 import Gemma3
from gatenorm.architectures.granite import Granite
from gatenorm.architectures.layers import LayerParts
from gatenorm.architectures.llama import Llama, Mistral
from gatenorm.architectures.olmo2 import Olmo2
from gatenorm.architectures.phi3 import Phi3
from gatenorm.architectures.qwen2 import Qwen2
from gatenorm.architectures.qwen3 import Qwen3
from gatenorm.architectures.smollm3 import SmolLM3

__all__ = [
    "ATTENTION_PARTS",
    "Architecture",
    "Deci",
    "Gemma2",
    "Gemma3",
    "Granite",
    "LayerParts",
    "Llama",
    "Mistral",
    "Olmo2",
    "Phi3",
    "Qwen2",
    "Qwen3",
    "SmolLM3",
    "get_architecture",
    "gguf_tensor",
    "model_arch",
    "register",
    "reorder_rotary_rows",
    "unregister",
]
