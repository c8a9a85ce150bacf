"""Gemma-3 (text): Gemma-2's recipe (`exporters.gguf.families.gemma2`), with llama.cpp's gemma3 differences:
final soft-capping only when set, no attention soft-capping, the sliding window only when
``attention.sliding_window`` is set, ``rope.freq_base_swa`` the local rotary base, a 27B of 62 layers, and
the attention-scale ratio folded into the q norm's gain (exact)."""

from __future__ import annotations

from exporters.gguf.families.base import MT, V, register_gguf_family
from exporters.gguf.families.gemma2 import Gemma2Gguf
from gatenorm.architectures import gguf_tensor

HF_Q_NORM = "model.layers.{i}.self_attn.q_norm.weight"


@register_gguf_family("gemma3")
class Gemma3Gguf(Gemma2Gguf):
    """Gemma-3 text decoder as ``gemma3``."""

    works = "drop-block plans (--method block-influence) as a gemma3 GGUF, or PyTorch for every action"
    llama_cpp_27b_layers = 62
    llama_cpp_always_swa = False

    def scale_tensors(self, fmt: str, ratio: float, layers: list[int]) -> dict[str, float]:
        """The q norm's gain times `ratio` (q is normed right before rope and the scale)."""
        template = gguf_tensor(MT.ATTN_Q_NORM) if fmt == "gguf" else HF_Q_NORM
        return {template.format(i=i): ratio for i in layers}

    def hf_refusal(self, ckpt) -> str | None:
        c = ckpt.config
        if c.get("attn_logit_softcapping"):
            return "llama.cpp's gemma3 has no attention soft-capping, this config sets it"
        if c.get("use_bidirectional_attention"):
            return "llama.cpp's gemma3 attends causally, this config is bidirectional"
        return None

    def hf_metadata(self, ckpt) -> dict[str, tuple]:
        c = ckpt.config
        self.check_hf(ckpt)
        keys = {}
        if c.get("final_logit_softcapping"):
            keys["final_logit_softcapping"] = (float(c["final_logit_softcapping"]), V.FLOAT32, None)
        return keys | self.hf_sliding_keys(ckpt, float(c.get("rope_local_base_freq", 10000.0)))
