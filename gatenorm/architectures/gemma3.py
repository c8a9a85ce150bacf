"""Gemma-3 (text; ``Gemma3ForCausalLM``, model_type ``gemma3_text``, GGUF ``gemma3``): Gemma-2's sandwich
norms plus per-head q/k norms, and local layers with their own rotary table (``rotary_emb_local``).

GGUF: `exporters.gguf.families.gemma3`.
"""

from __future__ import annotations

import torch
from torch import nn

from gatenorm.architectures.base import register, transformers_major
from gatenorm.architectures.gemma2 import Gemma2


@register("gemma3_text", "Gemma3ForCausalLM")
class Gemma3(Gemma2):
    """Gemma-3 text decoder (no attention soft-capping; q/k norms with ``1 + w`` gains)."""

    name = "gemma3"
    gguf_arch = "gemma3"
    hf_qk_norms = ("q_norm", "k_norm")
    hf_attn_implementation = None  # no attention soft-capping: SDPA is exact
    llama_cpp_swa_pattern = 6

    @classmethod
    def rotary_module(cls, model: nn.Module, attention: nn.Module) -> nn.Module | None:
        if transformers_major() < 5:
            return model.model.rotary_emb_local if attention.is_sliding else model.model.rotary_emb
        # transformers 5: one rotary module with a table per layer type, picked by an argument
        rotary = model.model.rotary_emb
        typed = rotary.__dict__.setdefault("gatenorm_typed", {})  # one stable wrapper per type
        kind = "sliding_attention" if attention.is_sliding else "full_attention"
        return typed.setdefault(kind, _TypedRotary(rotary, kind))

    @classmethod
    def layer_kwargs(cls, model: nn.Module, hidden: torch.Tensor, positions: torch.Tensor) -> list[dict]:
        n = len(cls.decoder_layers(model))
        if transformers_major() < 5:  # two rotary modules; each layer picks its table
            shared = {
                "position_embeddings_global": model.model.rotary_emb(hidden, positions),
                "position_embeddings_local": model.model.rotary_emb_local(hidden, positions),
            }
            return [shared] * n
        # one rotary module with a table per layer type; layer i takes that of config.layer_types[i]
        types = model.config.layer_types
        tables = {t: model.model.rotary_emb(hidden, positions, t) for t in set(types)}
        return [{"position_embeddings": tables[types[i]]} for i in range(n)]


class _TypedRotary(nn.Module):
    """transformers 5's Gemma-3 rotary module for one layer type, called as a plain rotary module."""

    def __init__(self, rotary: nn.Module, layer_type: str):
        super().__init__()
        self.__dict__["rotary"] = rotary  # not a submodule: the wrapper owns nothing
        self.layer_type = layer_type

    def forward(self, x: torch.Tensor, positions: torch.Tensor):
        return self.rotary(x, positions, self.layer_type)
