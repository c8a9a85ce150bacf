"""OLMo-2: post-norm with q/k norms, which deci cannot run: written as ``olmo2``, whole blocks left out."""

from __future__ import annotations

from exporters.gguf.families.base import MT, GgufFamily, register_gguf_family


@register_gguf_family("olmo2")
class Olmo2Gguf(GgufFamily):
    """OLMo-2: no attention input norm; q/k norms and the post-attention norm belong to the sublayer."""

    attention_sublayer = (MT.ATTN_Q, MT.ATTN_K, MT.ATTN_V, MT.ATTN_OUT, MT.ATTN_Q_NORM, MT.ATTN_K_NORM)
    attention_sublayer += (MT.ATTN_POST_NORM,)
    deci_exportable = False
    deci_refusal = "olmo2 is post-norm with q/k norms, which llama.cpp's deci graph cannot run"
    block_removal = True
    works = "drop-block plans (--method block-influence) as an olmo2 GGUF, or PyTorch for every action"
