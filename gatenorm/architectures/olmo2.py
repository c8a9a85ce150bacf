"""OLMo-2: post-norm only (``h + post_norm(attn(h))``, no input norm), q/k RMSNorm over whole projections."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from gatenorm.architectures.base import MT, Architecture, register


@register("Olmo2ForCausalLM")
class Olmo2(Architecture):
    """OLMo-2: attention and MLP read the raw residual stream; their outputs are normed before they join
    it, so a dropped attention leaves exactly ``h``."""

    name = "olmo2"
    gguf_arch = "olmo2"
    hf_tensors: ClassVar[dict[str, str | None]] = {**Architecture.hf_tensors, "norm": None}
    gguf_tensors: ClassVar[dict[str, str | None]] = {**Architecture.gguf_tensors, "norm": None}
    hf_attention_norm = None
    hf_post_attention_norm = "post_attention_layernorm"
    hf_mlp_norm = None
    hf_post_mlp_norm = "post_feedforward_layernorm"
    gguf_attention_sublayer = (MT.ATTN_Q, MT.ATTN_K, MT.ATTN_V, MT.ATTN_OUT, MT.ATTN_Q_NORM, MT.ATTN_K_NORM)
    gguf_attention_sublayer += (MT.ATTN_POST_NORM,)
    deci_exportable = False
    genai_model_type = "olmo"  # onnxruntime-genai 0.18 refuses "olmo2"; its decoder-only "olmo" runs it
    deci_refusal = "olmo2 is post-norm with q/k norms, which llama.cpp's deci graph cannot run"
    gguf_block_removal = True
    gguf_works = "drop-block plans (--method block-influence) as an olmo2 GGUF, or PyTorch for every action"

    @classmethod
    def has_qk_norms(cls) -> bool:
        return True

    @classmethod
    def normed_qk(cls, attention: nn.Module, q: torch.Tensor, k: torch.Tensor):
        return attention.q_norm(q), attention.k_norm(k)  # over the whole projection, not per head
