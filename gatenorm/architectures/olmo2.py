"""OLMo-2: post-norm only (``h + post_norm(attn(h))``, no input norm), q/k RMSNorm over whole projections."""

from __future__ import annotations

from typing import ClassVar

from gatenorm.architectures.base import Architecture, register


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
