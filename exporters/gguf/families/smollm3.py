"""SmolLM3: its no-rope layers are fixed by layer index in llama.cpp, so it is written as ``smollm3`` with
whole blocks left out, where the kept layers keep their index mod 4."""

from __future__ import annotations

from exporters.gguf.families.base import register_gguf_family
from exporters.gguf.families.llama import LlamaGguf
from gatenorm.errors import GatenormError


@register_gguf_family("smollm3")
class SmolLM3Gguf(LlamaGguf):
    """SmolLM3: block removal as its own architecture; deci has no no-rope layers."""

    deci_exportable = False
    deci_refusal = "smollm3's no-rope layers are fixed by layer index in llama.cpp, which deci does not have"
    block_removal = True
    works = (
        "drop-block plans that keep each kept layer's index mod 4 (e.g. 4 consecutive blocks) as a smollm3 "
        "GGUF, or PyTorch for every action"
    )

    def check_block_removal(self, kept: list[int]) -> None:
        moved = [layer for new, layer in enumerate(kept) if new % 4 != layer % 4]
        if moved:
            raise GatenormError(
                f"cannot export smollm3 with drop-block to GGUF: llama.cpp picks the no-rope layers by index "
                f"((il + 1) % 4); removing these blocks moves layers {moved} to another index mod 4, which "
                f"silently changes which layers use rope; what works: {self.works}"
            )
