"""Gemma-2's GGUF recipe (llama.cpp ``src/models/gemma2.cpp``, ``gemma3.cpp``): the file is the family's own
architecture; drop-block is its only pruning action. llama.cpp picks three things the file must pin down:

- which layers slide: by layer index (``il % n_pattern < n_pattern - 1``) unless
  ``{arch}.attention.sliding_window_pattern`` is a per-layer array (read as is, its length unchecked), so a
  pruned file always writes the array of the kept layers;
- gemma2 always builds the sliding-window KV cache and asserts that some layer slides (``is_swa_any``);
  gemma3 does so only when ``{arch}.attention.sliding_window`` is set;
- the attention scale: no key sets it; it is ``1/sqrt(n_embd / n_head)`` when ``block_count`` is the
  27B's (46 / 62 layers), else ``1/sqrt(head_dim)``. HF's is ``query_pre_attn_scalar ** -0.5``. Where they
  differ the writer folds the ratio into a weight the scale passes through unchanged otherwise
  (`scale_tensors`).
"""

from __future__ import annotations

import math
from typing import ClassVar

from exporters.gguf.families.base import MT, GgufFamily, V, register_gguf_family
from gatenorm.errors import GatenormError

SLIDING = "sliding_attention"
NO_ATTENTION_FREE_HOST = (
    "no llama.cpp architecture has an attention-free layer with Gemma's sandwich norms (deci has no "
    "post-norms; gemma2/3/3n/4 and olmo2 attend in every layer; plamo2's mamba layers pair them with a "
    "SwiGLU FFN and no embedding scale)"
)


@register_gguf_family("gemma2")
class Gemma2Gguf(GgufFamily):
    """Gemma-2 as ``gemma2``: soft-capping and sliding-window keys, the attention scale pinned down."""

    attention_sublayer = (*GgufFamily.attention_sublayer, MT.ATTN_POST_NORM)
    deci_exportable = False
    deci_refusal = NO_ATTENTION_FREE_HOST
    block_removal = True
    works = "drop-block plans (--method block-influence) as a gemma2 GGUF, or PyTorch for every action"
    #: llama.cpp's layer count of the 27B, whose attention scale it sets to 1/sqrt(n_embd / n_head).
    llama_cpp_27b_layers: ClassVar[int] = 46
    #: llama.cpp builds the sliding-window cache without ``attention.sliding_window`` (and asserts a layer).
    llama_cpp_always_swa: ClassVar[bool] = True

    def llama_cpp_attention_scale(self, n_layers: int, d_model: int, n_head: int, head_dim: int) -> float:
        """The query scale llama.cpp's graph multiplies q by (no GGUF key sets it)."""
        if n_layers == self.llama_cpp_27b_layers:
            return 1.0 / math.sqrt(float(d_model // n_head))
        return 1.0 / math.sqrt(float(head_dim))

    def scale_tensors(self, fmt: str, ratio: float, layers: list[int]) -> dict[str, float]:
        """Tensors of `layers` (format `fmt`) and their factors that multiply q . k by `ratio`.

        Gemma-2: the attention input norm's gain times sqrt(ratio) scales q, k and v by it; the
        post-attention norm removes the scale of the output (exact up to its eps, which becomes
        eps / ratio)."""
        template = self.arch.tensor_template(fmt, "norm")
        return {template.format(i=i): math.sqrt(ratio) for i in layers}

    def hf_sliding_layers(self, config: dict) -> list[bool]:
        """Which layers of an HF config use the sliding window (``layer_types``, else transformers' rule)."""
        n = int(config["num_hidden_layers"])
        types = config.get("layer_types")
        if types:
            return [t == SLIDING for t in types[:n]]
        every = int(config.get("sliding_window_pattern") or self.arch.llama_cpp_swa_pattern)
        return [bool((i + 1) % every) for i in range(n)]

    @staticmethod
    def hf_attention_scale(config: dict) -> float:
        return float(config.get("query_pre_attn_scalar") or config.get("head_dim") or 256) ** -0.5

    def hf_refusal(self, ckpt) -> str | None:
        """Why llama.cpp's graph cannot run this HF config (None: it can)."""
        c = ckpt.config
        if not c.get("attn_logit_softcapping") or not c.get("final_logit_softcapping"):
            return "llama.cpp's gemma2 always soft-caps attention and final logits, this config does not"
        if "lm_head.weight" in ckpt.weight_map:
            return "llama.cpp's gemma2 reads the output projection from token_embd, this model has an lm_head"
        return None

    def check_hf(self, ckpt) -> None:
        """One line naming why llama.cpp's graph cannot run this config (`hf_refusal`), if it cannot."""
        if reason := self.hf_refusal(ckpt):
            raise GatenormError(
                f"cannot export {self.arch.name} from {ckpt.path} to GGUF: {reason}; what works: PyTorch"
            )

    def hf_metadata(self, ckpt) -> dict[str, tuple]:
        c = ckpt.config
        self.check_hf(ckpt)
        keys = {
            "attn_logit_softcapping": (float(c["attn_logit_softcapping"]), V.FLOAT32, None),
            "final_logit_softcapping": (float(c["final_logit_softcapping"]), V.FLOAT32, None),
        }
        return keys | self.hf_sliding_keys(ckpt, float(c.get("rope_theta", 10000.0)))

    def hf_sliding_keys(self, ckpt, swa_base: float) -> dict[str, tuple]:
        c, sliding = ckpt.config, self.hf_sliding_layers(ckpt.config)
        if not any(sliding) or not c.get("sliding_window"):
            if self.llama_cpp_always_swa:
                raise GatenormError(
                    f"cannot export {self.arch.name} from {ckpt.path} to GGUF: no layer uses the sliding "
                    f"window, and llama.cpp's {self.arch.gguf_arch} asserts one; what works: PyTorch"
                )
            return {}
        return {
            "attention.sliding_window": (int(c["sliding_window"]), V.UINT32, None),
            "attention.sliding_window_pattern": (sliding, V.ARRAY, V.BOOL),
            "rope.freq_base_swa": (swa_base, V.FLOAT32, None),
        }

    def hf_factors(self, ckpt) -> dict[str, float]:
        s = ckpt.shape
        llama_cpp = self.llama_cpp_attention_scale(s.n_layers, s.d_model, s.n_head, s.head_dim)
        ratio = self.hf_attention_scale(ckpt.config) / llama_cpp
        if abs(ratio - 1.0) < 1e-12:
            return {}
        return self.scale_tensors("safetensors", ratio, list(range(s.n_layers)))

    def gguf_sliding_layers(self, fields: dict) -> list[bool] | None:
        """Which layers of a GGUF of this architecture slide in llama.cpp (None: no sliding window)."""
        n = int(self.value(fields, "block_count"))
        if not self.llama_cpp_always_swa and not self.value(fields, "attention.sliding_window", 0):
            return None
        pattern = self.value(fields, "attention.sliding_window_pattern", self.arch.llama_cpp_swa_pattern)
        if isinstance(pattern, list):
            return [bool(p) for p in pattern[:n]] + [False] * (n - len(pattern))
        every = int(pattern)
        return [every == 0 or i % every < every - 1 for i in range(n)]

    def own_arch_rewrite(self, fields: dict, kept: list[int]) -> tuple[dict, dict[str, float]]:
        n_src = int(self.value(fields, "block_count"))
        if kept == list(range(n_src)):
            return {}, {}
        keys: dict[str, tuple | None] = {}
        sliding = self.gguf_sliding_layers(fields)
        if sliding is not None:
            kept_sliding = [sliding[i] for i in kept]
            if any(kept_sliding):
                keys["attention.sliding_window_pattern"] = (kept_sliding, V.ARRAY, V.BOOL)
            elif self.llama_cpp_always_swa:
                raise GatenormError(
                    f"cannot export {self.arch.name} with drop-block to GGUF: the plan keeps no "
                    f"sliding-window layer, and llama.cpp's {self.arch.gguf_arch} asserts one; what works: "
                    f"keep one of layers {[i for i, s in enumerate(sliding) if s]}, or PyTorch"
                )
            else:  # every kept layer is global: no sliding window at all
                keys["attention.sliding_window"] = keys["attention.sliding_window_pattern"] = None
        d_model, n_head, head_dim = self.attention_dims(fields)
        source = self.llama_cpp_attention_scale(n_src, d_model, n_head, head_dim)
        written = self.llama_cpp_attention_scale(len(kept), d_model, n_head, head_dim)
        factors = {} if source == written else self.scale_tensors("gguf", source / written, kept)
        return keys, factors
