"""What the GGUF exporter needs from each family, one spec per family (`base.GgufFamily`), one module per
family, registered by family name; a family without its own spec gets its nearest ancestor's (Mistral:
llama's), else the base (a llama-like family that llama.cpp's ``deci`` graph runs)."""

from exporters.gguf.families.base import (
    DeciTensors,
    GgufFamily,
    gguf_family,
    register_gguf_family,
    unregister_gguf_family,
)
from exporters.gguf.families.deci import DeciGguf
from exporters.gguf.families.gemma2 import Gemma2Gguf
from exporters.gguf.families.gemma3 import Gemma3Gguf
from exporters.gguf.families.granite import GraniteGguf
from exporters.gguf.families.llama import LlamaGguf
from exporters.gguf.families.olmo2 import Olmo2Gguf
from exporters.gguf.families.phi3 import Phi3Gguf
from exporters.gguf.families.qwen3 import Qwen3Gguf
from exporters.gguf.families.smollm3 import SmolLM3Gguf

__all__ = [
    "DeciGguf",
    "DeciTensors",
    "Gemma2Gguf",
    "Gemma3Gguf",
    "GgufFamily",
    "GraniteGguf",
    "LlamaGguf",
    "Olmo2Gguf",
    "Phi3Gguf",
    "Qwen3Gguf",
    "SmolLM3Gguf",
    "gguf_family",
    "register_gguf_family",
    "unregister_gguf_family",
]
