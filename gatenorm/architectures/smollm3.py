"""SmolLM3: llama layout whose every 4th layer has no rotary embedding (``no_rope_layers``)."""

from __future__ import annotations

from torch import nn

from gatenorm.architectures.base import register
from gatenorm.architectures.llama import Llama
from gatenorm.errors import GatenormError


@register("SmolLM3ForCausalLM")
class SmolLM3(Llama):
    """SmolLM3: llama (llama.cpp converts its q/k rows as llama's) with no-rope layers by index."""

    name = "smollm3"
    gguf_arch = "smollm3"
    deci_exportable = False
    deci_refusal = "smollm3's no-rope layers are fixed by layer index in llama.cpp, which deci does not have"
    gguf_block_removal = True
    gguf_works = (
        "drop-block plans that keep each kept layer's index mod 4 (e.g. 4 consecutive blocks) as a smollm3 "
        "GGUF, or PyTorch for every action"
    )

    @classmethod
    def check_block_removal(cls, kept: list[int]) -> None:
        moved = [layer for new, layer in enumerate(kept) if new % 4 != layer % 4]
        if moved:
            raise GatenormError(
                f"cannot export smollm3 with drop-block to GGUF: llama.cpp picks the no-rope layers by index "
                f"((il + 1) % 4); removing these blocks moves layers {moved} to another index mod 4, which "
                f"silently changes which layers use rope; what works: {cls.gguf_works}"
            )

    @classmethod
    def rotary_module(cls, model: nn.Module, attention: nn.Module) -> nn.Module | None:
        return model.model.rotary_emb if attention.use_rope else None
