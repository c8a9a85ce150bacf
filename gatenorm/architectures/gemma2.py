"""Gemma-2: sandwich norms (input, post-attention, pre- and post-feed-forward RMSNorm, gains stored as
``w`` for ``1 + w``), soft-capped attention and final logits, alternating sliding / global layers.

GGUF recipe (llama.cpp ``src/models/gemma2.cpp``, ``gemma3.cpp``): the file is the family's own
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

import gguf
import torch
from torch import nn

from gatenorm.architectures.base import MT, Architecture, register
from gatenorm.errors import GatenormError

V = gguf.GGUFValueType
SLIDING = "sliding_attention"
NO_ATTENTION_FREE_HOST = (
    "no llama.cpp architecture has an attention-free layer with Gemma's sandwich norms (deci has no "
    "post-norms; gemma2/3/3n/4 and olmo2 attend in every layer; plamo2's mamba layers pair them with a "
    "SwiGLU FFN and no embedding scale)"
)


@register("Gemma2ForCausalLM")
class Gemma2(Architecture):
    """Gemma-2: a dropped attention leaves ``h + post_ffw(mlp(pre_ffw(h)))``."""

    name = "gemma2"
    gguf_arch = "gemma2"
    norm_plus_one = True
    hf_post_attention_norm = "post_attention_layernorm"
    hf_mlp_norm = "pre_feedforward_layernorm"
    hf_post_mlp_norm = "post_feedforward_layernorm"
    layer_returns_tuple = True
    #: transformers' SDPA path drops attention soft-capping without a word; eager applies it.
    hf_attn_implementation = "eager"
    gguf_attention_sublayer = (*Architecture.gguf_attention_sublayer, MT.ATTN_POST_NORM)
    deci_exportable = False
    deci_refusal = NO_ATTENTION_FREE_HOST
    gguf_block_removal = True
    gguf_works = "drop-block plans (--method block-influence) as a gemma2 GGUF, or PyTorch for every action"
    #: llama.cpp's layer count of the 27B, whose attention scale it sets to 1/sqrt(n_embd / n_head).
    llama_cpp_27b_layers: ClassVar[int] = 46
    #: llama.cpp's default sliding pattern (``load_swa_pattern``): layer il slides if il % n < n - 1.
    llama_cpp_swa_pattern: ClassVar[int] = 2
    #: llama.cpp builds the sliding-window cache without ``attention.sliding_window`` (and asserts a layer).
    llama_cpp_always_swa: ClassVar[bool] = True

    @classmethod
    def logits(cls, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().logits(model, hidden)
        cap = getattr(model.config, "final_logit_softcapping", None)
        return logits if not cap else torch.tanh(logits / cap) * cap

    @classmethod
    def attention_softcap(cls, attention: nn.Module) -> float:
        return float(getattr(attention.config, "attn_logit_softcapping", None) or 0.0)

    # ---- GGUF recipe -----------------------------------------------------------------------------------

    @classmethod
    def llama_cpp_attention_scale(cls, n_layers: int, d_model: int, n_head: int, head_dim: int) -> float:
        """The query scale llama.cpp's graph multiplies q by (no GGUF key sets it)."""
        if n_layers == cls.llama_cpp_27b_layers:
            return 1.0 / math.sqrt(float(d_model // n_head))
        return 1.0 / math.sqrt(float(head_dim))

    @classmethod
    def scale_tensors(cls, fmt: str, ratio: float, layers: list[int]) -> dict[str, float]:
        """Tensors of `layers` (format `fmt`) and their factors that multiply q . k by `ratio`.

        Gemma-2: the attention input norm's gain times sqrt(ratio) scales q, k and v by it; the
        post-attention norm removes the scale of the output (exact up to its eps, which becomes
        eps / ratio)."""
        template = cls.tensor_template(fmt, "norm")
        return {template.format(i=i): math.sqrt(ratio) for i in layers}

    @classmethod
    def hf_sliding_layers(cls, config: dict) -> list[bool]:
        """Which layers of an HF config use the sliding window (``layer_types``, else transformers' rule)."""
        n = int(config["num_hidden_layers"])
        types = config.get("layer_types")
        if types:
            return [t == SLIDING for t in types[:n]]
        every = int(config.get("sliding_window_pattern") or cls.llama_cpp_swa_pattern)
        return [bool((i + 1) % every) for i in range(n)]

    @classmethod
    def hf_attention_scale(cls, config: dict) -> float:
        return float(config.get("query_pre_attn_scalar") or config.get("head_dim") or 256) ** -0.5

    @classmethod
    def _hf_refusal(cls, ckpt) -> str | None:
        c = ckpt.config
        if not c.get("attn_logit_softcapping") or not c.get("final_logit_softcapping"):
            return "llama.cpp's gemma2 always soft-caps attention and final logits, this config does not"
        if "lm_head.weight" in ckpt.weight_map:
            return "llama.cpp's gemma2 reads the output projection from token_embd, this model has an lm_head"
        return None

    @classmethod
    def _check_hf(cls, ckpt) -> None:
        """One line naming why llama.cpp's graph cannot run this config (`_hf_refusal`), if it cannot."""
        if reason := cls._hf_refusal(ckpt):
            raise GatenormError(
                f"cannot export {cls.name} from {ckpt.path} to GGUF: {reason}; what works: PyTorch"
            )

    @classmethod
    def gguf_hf_metadata(cls, ckpt) -> dict[str, tuple]:
        c = ckpt.config
        cls._check_hf(ckpt)
        keys = {
            "attn_logit_softcapping": (float(c["attn_logit_softcapping"]), V.FLOAT32, None),
            "final_logit_softcapping": (float(c["final_logit_softcapping"]), V.FLOAT32, None),
        }
        return keys | cls._hf_sliding_keys(ckpt, float(c.get("rope_theta", 10000.0)))

    @classmethod
    def _hf_sliding_keys(cls, ckpt, swa_base: float) -> dict[str, tuple]:
        c, sliding = ckpt.config, cls.hf_sliding_layers(ckpt.config)
        if not any(sliding) or not c.get("sliding_window"):
            if cls.llama_cpp_always_swa:
                raise GatenormError(
                    f"cannot export {cls.name} from {ckpt.path} to GGUF: no layer uses the sliding window, "
                    f"and llama.cpp's {cls.gguf_arch} asserts one; what works: PyTorch"
                )
            return {}
        return {
            "attention.sliding_window": (int(c["sliding_window"]), V.UINT32, None),
            "attention.sliding_window_pattern": (sliding, V.ARRAY, V.BOOL),
            "rope.freq_base_swa": (swa_base, V.FLOAT32, None),
        }

    @classmethod
    def gguf_hf_factors(cls, ckpt) -> dict[str, float]:
        shape = ckpt.shape
        llama_cpp = cls.llama_cpp_attention_scale(shape.n_layers, shape.d_model, shape.n_head, shape.head_dim)
        ratio = cls.hf_attention_scale(ckpt.config) / llama_cpp
        if abs(ratio - 1.0) < 1e-12:
            return {}
        return cls.scale_tensors("safetensors", ratio, list(range(shape.n_layers)))

    @classmethod
    def gguf_sliding_layers(cls, fields: dict) -> list[bool] | None:
        """Which layers of a GGUF of this architecture slide in llama.cpp (None: no sliding window)."""

        def value(key: str, default=None):
            field = fields.get(f"{cls.gguf_arch}.{key}")
            return default if field is None else field.contents()

        n = int(value("block_count"))
        if not cls.llama_cpp_always_swa and not value("attention.sliding_window", 0):
            return None
        pattern = value("attention.sliding_window_pattern", cls.llama_cpp_swa_pattern)
        if isinstance(pattern, list):
            return [bool(p) for p in pattern[:n]] + [False] * (n - len(pattern))
        every = int(pattern)
        return [every == 0 or i % every < every - 1 for i in range(n)]

    @classmethod
    def gguf_own_arch_rewrite(cls, fields: dict, kept: list[int]) -> tuple[dict, dict[str, float]]:
        def value(key: str, default=None):
            field = fields.get(f"{cls.gguf_arch}.{key}")
            return default if field is None else field.contents()

        n_src = int(value("block_count"))
        if kept == list(range(n_src)):
            return {}, {}
        keys: dict[str, tuple | None] = {}
        sliding = cls.gguf_sliding_layers(fields)
        if sliding is not None:
            kept_sliding = [sliding[i] for i in kept]
            if any(kept_sliding):
                keys["attention.sliding_window_pattern"] = (kept_sliding, V.ARRAY, V.BOOL)
            elif cls.llama_cpp_always_swa:
                raise GatenormError(
                    f"cannot export {cls.name} with drop-block to GGUF: the plan keeps no sliding-window "
                    f"layer, and llama.cpp's {cls.gguf_arch} asserts one; what works: keep one of layers "
                    f"{[i for i, s in enumerate(sliding) if s]}, or PyTorch"
                )
            else:  # every kept layer is global: no sliding window at all
                keys["attention.sliding_window"] = keys["attention.sliding_window_pattern"] = None
        d_model, n_head = int(value("embedding_length")), int(value("attention.head_count"))
        head_dim = int(value("attention.key_length", d_model // n_head))
        source = cls.llama_cpp_attention_scale(n_src, d_model, n_head, head_dim)
        written = cls.llama_cpp_attention_scale(len(kept), d_model, n_head, head_dim)
        factors = {} if source == written else cls.scale_tensors("gguf", source / written, kept)
        return keys, factors
