"""Gemma-3 (text; ``Gemma3ForCausalLM``, model_type ``gemma3_text``, GGUF ``gemma3``): Gemma-2's sandwich
norms plus per-head q/k norms, and local layers with their own rotary table (``rotary_emb_local``).

GGUF: Gemma-2's recipe (`gatenorm.architectures.gemma2`), with llama.cpp's gemma3 differences: final
soft-capping only when set, no attention soft-capping, the sliding window only when
``attention.sliding_window`` is set, ``rope.freq_base_swa`` the local rotary base, a 27B of 62 layers,
and the attention-scale ratio folded into the q norm's gain (exact).
"""

from __future__ import annotations

import torch
from torch import nn

from gatenorm.architectures.base import MT, gguf_tensor, register
from gatenorm.architectures.gemma2 import NO_ATTENTION_FREE_HOST, Gemma2, V

HF_Q_NORM = "model.layers.{i}.self_attn.q_norm.weight"


@register("gemma3_text", "Gemma3ForCausalLM")
class Gemma3(Gemma2):
    """Gemma-3 text decoder (no attention soft-capping; q/k norms with ``1 + w`` gains)."""

    name = "gemma3"
    gguf_arch = "gemma3"
    hf_qk_norms = ("q_norm", "k_norm")
    deci_refusal = NO_ATTENTION_FREE_HOST
    gguf_works = "drop-block plans (--method block-influence) as a gemma3 GGUF, or PyTorch for every action"
    hf_attn_implementation = None  # no attention soft-capping: SDPA is exact
    llama_cpp_27b_layers = 62
    llama_cpp_swa_pattern = 6
    llama_cpp_always_swa = False

    @classmethod
    def rotary_module(cls, model: nn.Module, attention: nn.Module) -> nn.Module | None:
        return model.model.rotary_emb_local if attention.is_sliding else model.model.rotary_emb

    @classmethod
    def layer_kwargs(cls, model: nn.Module, hidden: torch.Tensor, positions: torch.Tensor) -> dict:
        return {
            "position_embeddings_global": model.model.rotary_emb(hidden, positions),
            "position_embeddings_local": model.model.rotary_emb_local(hidden, positions),
        }

    @classmethod
    def scale_tensors(cls, fmt: str, ratio: float, layers: list[int]) -> dict[str, float]:
        """The q norm's gain times `ratio` (q is normed right before rope and the scale)."""
        template = gguf_tensor(MT.ATTN_Q_NORM) if fmt == "gguf" else HF_Q_NORM
        return {template.format(i=i): ratio for i in layers}

    @classmethod
    def _hf_refusal(cls, ckpt) -> str | None:
        c = ckpt.config
        if c.get("attn_logit_softcapping"):
            return "llama.cpp's gemma3 has no attention soft-capping, this config sets it"
        if c.get("use_bidirectional_attention"):
            return "llama.cpp's gemma3 attends causally, this config is bidirectional"
        return None

    @classmethod
    def gguf_hf_metadata(cls, ckpt) -> dict[str, tuple]:
        c = ckpt.config
        cls._check_hf(ckpt)
        keys = {}
        if c.get("final_logit_softcapping"):
            keys["final_logit_softcapping"] = (float(c["final_logit_softcapping"]), V.FLOAT32, None)
        return keys | cls._hf_sliding_keys(ckpt, float(c.get("rope_local_base_freq", 10000.0)))
