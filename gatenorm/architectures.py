"""What gatenorm knows about each decoder architecture, one class per architecture.

An architecture says how its attention tensors are named in a Hugging Face checkpoint and in a GGUF file,
how llama.cpp's converter reorders q/k rows, and which transformers modules make up a decoder layer.
Everything architecture-specific lives here; readers, scorers and exporters only ask the registry.
"""

from __future__ import annotations

from typing import ClassVar, TypeVar

import numpy as np
import torch

from gatenorm.errors import GatenormError

ATTENTION_PARTS = ("q", "k", "v", "o")

T = TypeVar("T", np.ndarray, torch.Tensor)

_REGISTRY: dict[str, type[Architecture]] = {}


def register(*names: str):
    """Class decorator: make an architecture findable by each of `names`.

    Names are HF ``model_type`` values, HF class names (``LlamaForCausalLM``) and GGUF
    ``general.architecture`` values.
    """

    def wrap(cls: type[Architecture]) -> type[Architecture]:
        for name in (cls.name, *names):
            _REGISTRY[name] = cls
        return cls

    return wrap


def get_architecture(name: str) -> type[Architecture]:
    """The architecture registered under `name`, or a GatenormError naming it as unsupported."""
    try:
        return _REGISTRY[name]
    except KeyError:
        supported = ", ".join(sorted({cls.name for cls in _REGISTRY.values()}))
        raise GatenormError(f"unsupported architecture {name!r} (supported: {supported})") from None


class Architecture:
    """Base: a llama-like decoder (RMSNorm, rotary q/k, GQA, gated MLP)."""

    name: ClassVar[str]
    gguf_arch: ClassVar[str]
    #: HF tensor names, ``{i}`` is the layer index.
    hf_tensors: ClassVar[dict[str, str]] = {
        "q": "model.layers.{i}.self_attn.q_proj.weight",
        "k": "model.layers.{i}.self_attn.k_proj.weight",
        "v": "model.layers.{i}.self_attn.v_proj.weight",
        "o": "model.layers.{i}.self_attn.o_proj.weight",
        "norm": "model.layers.{i}.input_layernorm.weight",  # the attention's input RMSNorm gain
        "embed": "model.embed_tokens.weight",
    }
    #: GGUF tensor names, ``{i}`` is the layer index.
    gguf_tensors: ClassVar[dict[str, str]] = {
        "q": "blk.{i}.attn_q.weight",
        "k": "blk.{i}.attn_k.weight",
        "v": "blk.{i}.attn_v.weight",
        "o": "blk.{i}.attn_output.weight",
        "norm": "blk.{i}.attn_norm.weight",
        "embed": "token_embd.weight",
    }
    #: llama.cpp's converter interleaves q/k rows of each head (NORM rope) for this architecture.
    gguf_qk_permuted: ClassVar[bool] = False
    #: Attribute names of a transformers decoder layer: the attention, its input norm, the MLP and its norm.
    hf_attention_module: ClassVar[str] = "self_attn"
    hf_attention_norm: ClassVar[str] = "input_layernorm"
    hf_mlp_module: ClassVar[str] = "mlp"
    hf_mlp_norm: ClassVar[str] = "post_attention_layernorm"
    #: Attribute names of the value and output projections inside the attention module.
    hf_value_proj: ClassVar[str] = "v_proj"
    hf_output_proj: ClassVar[str] = "o_proj"
    #: Per-head RMSNorm modules applied to q and k before the rotary embedding, if any.
    hf_qk_norms: ClassVar[tuple[str, str] | None] = None

    @classmethod
    def sliding_window(cls, attention, config) -> int | None:
        """Tokens a transformers attention module looks back over (itself included), None if unlimited."""
        return getattr(attention, "sliding_window", None)

    #: Per-layer GGUF tensors (``blk.{i}.<part>.weight`` / ``.bias``) that make up the attention sublayer:
    #: a layer whose attention is dropped loses all of them (its input norm included).
    gguf_attention_sublayer: ClassVar[tuple[str, ...]] = (
        "attn_norm",
        "attn_q",
        "attn_k",
        "attn_v",
        "attn_output",
    )
    #: llama.cpp's ``deci`` graph (per-layer head counts) can run this architecture's layers.
    deci_exportable: ClassVar[bool] = True
    deci_refusal: ClassVar[str] = ""

    @classmethod
    def gguf_to_hf_rows(cls, part: str, weight: T, n_head: int, n_head_kv: int) -> T:
        """Undo the row order llama.cpp's converter gave a q/k tensor, giving the HF layout back."""
        return cls._reorder_qk(part, weight, n_head, n_head_kv, to_gguf=False)

    @classmethod
    def hf_to_gguf_rows(cls, part: str, weight: T, n_head: int, n_head_kv: int) -> T:
        """The row order llama.cpp's converter writes for a q/k tensor in HF layout."""
        return cls._reorder_qk(part, weight, n_head, n_head_kv, to_gguf=True)

    @classmethod
    def _reorder_qk(cls, part: str, weight: T, n_head: int, n_head_kv: int, to_gguf: bool) -> T:
        """Within each head, HF keeps the two rotary halves apart; llama.cpp (NORM rope) interleaves them."""
        if not cls.gguf_qk_permuted or part not in ("q", "k"):
            return weight
        return reorder_rotary_rows(weight, n_head if part == "q" else n_head_kv, to_norm=to_gguf)

    @classmethod
    def gguf_to_deci_rows(cls, part: str, rows: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
        """Rows of this architecture's GGUF q/k weight or bias in the order ``deci`` (NORM rope) expects.

        `rows` may be raw bytes, one row of a quantized tensor per first-axis entry: only rows move.
        """
        if cls.gguf_qk_permuted or part not in ("q", "k"):
            return rows  # already NORM order, or not a rotary tensor
        return reorder_rotary_rows(rows, n_head if part == "q" else n_head_kv, to_norm=True)


def reorder_rotary_rows(weight: T, heads: int, to_norm: bool) -> T:
    """Interleave each head's two rotary halves (HF / NEOX order -> NORM order), or undo it, by rows."""
    half = weight.shape[0] // heads // 2
    split = (heads, 2, half) if to_norm else (heads, half, 2)
    return weight.reshape(*split, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


@register("LlamaForCausalLM")
class Llama(Architecture):
    """Llama 1/2/3, SmolLM, and Mistral checkpoints converted as ``llama``."""

    name = "llama"
    gguf_arch = "llama"
    gguf_qk_permuted = True


@register("MistralForCausalLM")
class Mistral(Llama):
    """Mistral: llama layout (llama.cpp converts it as ``llama``, with the q/k permutation)."""

    name = "mistral"

    @classmethod
    def sliding_window(cls, attention, config) -> int | None:
        return getattr(config, "sliding_window", None)  # every Mistral layer uses the config's window


@register("Qwen2ForCausalLM")
class Qwen2(Architecture):
    """Qwen2 / Qwen2.5: q/k/v biases, NEOX rope (llama.cpp keeps HF row order; deci export permutes it)."""

    name = "qwen2"
    gguf_arch = "qwen2"


@register("Qwen3ForCausalLM")
class Qwen3(Architecture):
    """Qwen3: per-head q/k RMSNorm, explicit head_dim, NEOX rope (HF row order in GGUF)."""

    name = "qwen3"
    gguf_arch = "qwen3"
    hf_qk_norms = ("q_norm", "k_norm")
    deci_exportable = False
    deci_refusal = "qwen3 has per-head q/k norms, which llama.cpp's deci graph cannot run"
