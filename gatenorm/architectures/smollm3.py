"""SmolLM3: llama layout whose every 4th layer has no rotary embedding (``no_rope_layers``)."""

from __future__ import annotations

from torch import nn

from gatenorm.architectures.base import register
from gatenorm.architectures.llama import Llama


@register("SmolLM3ForCausalLM")
class SmolLM3(Llama):
    """SmolLM3: llama (llama.cpp converts its q/k rows as llama's) with no-rope layers by index."""

    name = "smollm3"
    gguf_arch = "smollm3"

    @classmethod
    def rotary_module(cls, model: nn.Module, attention: nn.Module) -> nn.Module | None:
        return model.model.rotary_emb if attention.use_rope else None
