"""The architecture adapter: the structure of one decoder family, one class per family.

An architecture says how its tensors are named in a Hugging Face checkpoint and in a GGUF file (GGUF names
through gguf-py's ``MODEL_TENSOR`` / ``TENSOR_NAMES``; the readers read both), which rows of a fused tensor
hold q/k/v, how llama.cpp's converter orders q/k rows and stores norm gains, the MLP width and FLOPs, what
a GGUF's per-layer keys say about its layers, and, for a loaded transformers model, its decoder layers,
their sublayers and norms (`LayerParts`), the rotary tables each layer uses and the module that replaces a
layer for each plan action: what readers, scoring, methods, apply, heal and validate need. What an exporter
needs beyond that (which llama.cpp architecture runs a plan, the keys a writer adds, the ONNX graph's
pieces) is that exporter's per-family spec (``exporters/<format>/families/``).
"""

from __future__ import annotations

import functools
from importlib.metadata import version
from typing import ClassVar, TypeVar

import gguf
import numpy as np
import torch
from torch import nn

from gatenorm.architectures.layers import (
    AttentionFreeLayer,
    IdentityLayer,
    LayerParts,
    LinearAttentionLayer,
    LinearBlockLayer,
    linear_module,
)
from gatenorm.errors import GatenormError

ATTENTION_PARTS = ("q", "k", "v", "o")
MT = gguf.MODEL_TENSOR

T = TypeVar("T", np.ndarray, torch.Tensor)

_REGISTRY: dict[str, type[Architecture]] = {}


@functools.cache
def transformers_major() -> int:
    """The installed transformers' major version (4 or 5: their decoder layers and model loops differ)."""
    return int(version("transformers").split(".")[0])


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


def unregister(name: str) -> None:
    """Remove the architecture registered as `name`, under every name it has (a test's dummy)."""
    cls = _REGISTRY.get(name)
    for key in [key for key, value in _REGISTRY.items() if value is cls]:
        del _REGISTRY[key]


def get_architecture(name: str) -> type[Architecture]:
    """The architecture registered under `name`, or a GatenormError naming it as unsupported."""
    try:
        return _REGISTRY[name]
    except KeyError:
        supported = ", ".join(sorted({cls.name for cls in _REGISTRY.values()}))
        raise GatenormError(f"unsupported architecture {name!r} (supported: {supported})") from None


def gguf_tensor(tensor: gguf.MODEL_TENSOR, suffix: str = "weight") -> str:
    """gguf-py's name of `tensor` as a template (``{i}`` the layer index), with `suffix`."""
    return gguf.TENSOR_NAMES[tensor].replace("{bid}", "{i}") + (f".{suffix}" if suffix else "")


def model_arch(name: str) -> gguf.MODEL_ARCH:
    """gguf-py's MODEL_ARCH of a GGUF ``general.architecture`` value."""
    for arch, arch_name in gguf.MODEL_ARCH_NAMES.items():
        if arch_name == name:
            return arch
    raise GatenormError(f"gguf-py does not know the architecture {name!r}")


class Architecture:
    """Base: a llama-like pre-norm decoder (RMSNorm, rotary q/k, GQA, gated MLP, separate q/k/v/o)."""

    name: ClassVar[str]
    gguf_arch: ClassVar[str]
    #: HF tensor names, ``{i}`` is the layer index; "norm" is the attention's input norm (None: it has none).
    hf_tensors: ClassVar[dict[str, str | None]] = {
        "q": "model.layers.{i}.self_attn.q_proj.weight",
        "k": "model.layers.{i}.self_attn.k_proj.weight",
        "v": "model.layers.{i}.self_attn.v_proj.weight",
        "o": "model.layers.{i}.self_attn.o_proj.weight",
        "norm": "model.layers.{i}.input_layernorm.weight",
        "embed": "model.embed_tokens.weight",
    }
    #: GGUF tensor names (gguf-py's), ``{i}`` is the layer index.
    gguf_tensors: ClassVar[dict[str, str | None]] = {
        "q": gguf_tensor(MT.ATTN_Q),
        "k": gguf_tensor(MT.ATTN_K),
        "v": gguf_tensor(MT.ATTN_V),
        "o": gguf_tensor(MT.ATTN_OUT),
        "norm": gguf_tensor(MT.ATTN_NORM),
        "embed": gguf_tensor(MT.TOKEN_EMBD),
    }
    #: llama.cpp's converter interleaves q/k rows of each head (NORM rope) for this architecture.
    gguf_qk_permuted: ClassVar[bool] = False
    #: The stored norm gain is ``w`` and the norm multiplies by ``1 + w`` (Gemma); llama.cpp's converter
    #: stores ``1 + w`` in the GGUF.
    norm_plus_one: ClassVar[bool] = False
    #: Attribute names of a transformers decoder layer (None: the family has no such module).
    hf_attention_module: ClassVar[str] = "self_attn"
    hf_attention_norm: ClassVar[str | None] = "input_layernorm"
    hf_post_attention_norm: ClassVar[str | None] = None
    hf_mlp_module: ClassVar[str] = "mlp"
    hf_mlp_norm: ClassVar[str | None] = "post_attention_layernorm"
    hf_post_mlp_norm: ClassVar[str | None] = None
    #: Attribute name of the down projection inside the MLP module (what a healing fold refits).
    hf_down_proj: ClassVar[str] = "down_proj"
    #: Attribute names of the value and output projections inside the attention module.
    hf_value_proj: ClassVar[str] = "v_proj"
    hf_output_proj: ClassVar[str] = "o_proj"
    #: Per-head RMSNorm modules applied to q and k before the rotary embedding, if any.
    hf_qk_norms: ClassVar[tuple[str, str] | None] = None
    #: transformers attention implementation to load with (None: its default); Gemma-2 needs "eager", the
    #: one that applies its attention soft-capping (sdpa silently skips it).
    hf_attn_implementation: ClassVar[str | None] = None
    #: The model loop reads ``layer(...)[0]`` in transformers 4 (`returns_tuple`; 5's layers return tensors).
    layer_returns_tuple: ClassVar[bool] = False
    #: GGUF ``ffn_up`` rows per ``feed_forward_length`` (2: gate and up fused, Phi-3).
    gguf_ffn_up_factor: ClassVar[int] = 1

    # ---- checkpoint side -------------------------------------------------------------------------------

    @classmethod
    def tensor_template(cls, fmt: str, part: str) -> str | None:
        """The name template of `part` in a checkpoint of format `fmt` ("gguf" or "safetensors")."""
        return (cls.gguf_tensors if fmt == "gguf" else cls.hf_tensors)[part]

    @classmethod
    def fused_rows(cls, part: str, n_head: int, n_head_kv: int, head_dim: int) -> slice | None:
        """The rows of `part` inside the tensor `tensor_template` names, when it is fused (Phi-3's qkv)."""
        return None

    @classmethod
    def norm_gain(cls, fmt: str, stored: torch.Tensor) -> torch.Tensor:
        """The gain an RMSNorm multiplies by, from its stored weight in a checkpoint of format `fmt`."""
        return stored + 1 if cls.norm_plus_one and fmt != "gguf" else stored

    @classmethod
    def mlp_flops(cls, d_model: int, ffn: int) -> float:
        """Multiply-adds x 2 per token of one MLP (gated: gate, up, down)."""
        return 2.0 * 3 * d_model * ffn

    @classmethod
    def mlp_width(cls, ckpt) -> int | None:
        """The MLP's hidden width of `ckpt` (the largest, where it varies by layer)."""
        config = getattr(ckpt, "config", None)
        if config is not None:
            return config.get("intermediate_size")
        fields = getattr(ckpt.reader, "fields", {})
        field = fields.get(f"{fields['general.architecture'].contents()}.feed_forward_length")
        value = None if field is None else field.contents()
        if isinstance(value, list):
            value = max(value, default=None)
        if value:
            return int(value)
        down = ckpt.tensors.get(gguf_tensor(MT.FFN_DOWN).format(i=0))  # ne = (ffn, d)
        return None if down is None else int(down.shape[0])

    @classmethod
    def gguf_head_counts(cls, fields, path) -> tuple[int, int] | None:
        """(head_count, head_count_kv) of a GGUF that has them per layer (deci); None: scalar keys."""
        return None

    @classmethod
    def gguf_layer_counts(cls, fields, shape) -> list[tuple[int, int, int]]:
        """(head_count, head_count_kv, feed_forward_length) of every layer of a GGUF of this architecture."""
        ffn = fields[f"{fields['general.architecture'].contents()}.feed_forward_length"].contents()
        return [(shape.n_head, shape.n_head_kv, int(ffn))] * shape.n_layers

    @classmethod
    def gguf_fixed_layers(cls, fields) -> dict[int, tuple[str, float | None]]:
        """Layer -> (action, alpha) of the layers a GGUF has already changed (deci: no attention left)."""
        return {}

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

    # ---- loaded transformers model -----------------------------------------------------------------------

    @classmethod
    def decoder_layers(cls, model: nn.Module) -> nn.ModuleList:
        """The decoder layers of a transformers causal LM."""
        return model.model.layers

    @classmethod
    def layer_parts(cls, layer: nn.Module) -> LayerParts:
        """The sublayers and norms of a transformers decoder layer."""

        def get(name: str | None) -> nn.Module | None:
            return None if name is None else getattr(layer, name)

        return LayerParts(
            attention=getattr(layer, cls.hf_attention_module),
            attention_norm=get(cls.hf_attention_norm),
            post_attention_norm=get(cls.hf_post_attention_norm),
            mlp=getattr(layer, cls.hf_mlp_module),
            mlp_norm=get(cls.hf_mlp_norm),
            post_mlp_norm=get(cls.hf_post_mlp_norm),
            residual_scale=cls.residual_scale(layer),
            returns_tuple=cls.returns_tuple(),
            names={
                "attention_norm": cls.hf_attention_norm or "attention_norm",
                "post_attention_norm": cls.hf_post_attention_norm or "post_attention_norm",
                "mlp": cls.hf_mlp_module,
                "mlp_norm": cls.hf_mlp_norm or "mlp_norm",
                "post_mlp_norm": cls.hf_post_mlp_norm or "post_mlp_norm",
            },
        )

    @classmethod
    def down_projection(cls, layer: nn.Module) -> nn.Linear:
        """The MLP's down projection of a decoder layer (stock or pruned, which keep the MLP's name)."""
        return getattr(getattr(layer, cls.hf_mlp_module), cls.hf_down_proj)

    @classmethod
    def fold_refusal(cls) -> str:
        """Why a healing fold (a refitted down projection adding a lost output) cannot work here; empty
        where the MLP's output joins the residual stream linearly (no post-MLP norm)."""
        if cls.hf_post_mlp_norm is None:
            return ""
        return f"{cls.name} norms each MLP output before the residual add, so no down projection can add it"

    @classmethod
    def returns_tuple(cls) -> bool:
        """Whether the family's model loop reads ``layer(...)[0]`` from a decoder layer."""
        return cls.layer_returns_tuple and transformers_major() < 5

    @classmethod
    def residual_scale(cls, layer: nn.Module) -> float:
        """The factor each sublayer's output is scaled by before it joins the residual stream."""
        return 1.0

    @classmethod
    def value_output(cls, attention: nn.Module):
        """(v weight, v bias, o weight, o bias) of an attention module, HF layout (biases may be None)."""
        v, o = getattr(attention, cls.hf_value_proj), getattr(attention, cls.hf_output_proj)
        return v.weight, v.bias, o.weight, o.bias

    @classmethod
    def attention_update(cls, parts: LayerParts, output: torch.Tensor) -> torch.Tensor:
        """What a sublayer output `output` of the attention adds to the residual stream."""
        if parts.post_attention_norm is not None:
            output = parts.post_attention_norm(output)
        return output * parts.residual_scale

    @classmethod
    def linearized(cls, layer: nn.Module, alpha: float) -> LinearAttentionLayer:
        """`layer` with its attention folded into HARP's fused matmul (alpha inside it, or after a
        post-attention norm, which would remove it)."""
        from gatenorm.harp import fuse_value_output

        parts = cls.layer_parts(layer)
        config = parts.attention.config
        v_w, v_b, o_w, o_b = cls.value_output(parts.attention)
        inside = alpha if parts.post_attention_norm is None else 1.0
        weight, bias = fuse_value_output(
            v_w.detach(),
            o_w.detach(),
            config.num_attention_heads,
            config.num_key_value_heads,
            inside,
            None if v_b is None else v_b.detach(),
            None if o_b is None else o_b.detach(),
        )
        scale = 1.0 if parts.post_attention_norm is None else alpha
        return LinearAttentionLayer(
            parts, linear_module(weight, bias), scale, getattr(layer, "attention_type", None)
        )

    @classmethod
    def repaired(
        cls, layer: nn.Module, block: bool, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> LinearAttentionLayer | LinearBlockLayer:
        """`layer` healed (`gatenorm.heal`): its attention replaced by the fitted ``weight @ norm(h) + bias``
        (the MLP step after it), or with `block` the whole block replaced by it."""
        parts = cls.layer_parts(layer)
        dtype = next(parts.mlp.parameters()).dtype
        fused = linear_module(weight.to(dtype), None if bias is None else bias.to(dtype))
        attention_type = getattr(layer, "attention_type", None)
        if block:
            return LinearBlockLayer(parts, fused, attention_type)
        return LinearAttentionLayer(parts, fused, 1.0, attention_type)

    @classmethod
    def attention_free(cls, layer: nn.Module) -> AttentionFreeLayer:
        """`layer` without its attention sublayer: ``h + s * post_mlp(mlp(mlp_norm(h)))``."""
        return AttentionFreeLayer(cls.layer_parts(layer), getattr(layer, "attention_type", None))

    @classmethod
    def identity(cls, layer: nn.Module) -> IdentityLayer:
        """`layer` removed whole."""
        return IdentityLayer(getattr(layer, "attention_type", None), cls.returns_tuple())

    @classmethod
    def rotary_module(cls, model: nn.Module, attention: nn.Module) -> nn.Module | None:
        """The rotary module whose (cos, sin) `attention` uses; None for a layer without rotary."""
        return model.model.rotary_emb

    @classmethod
    def layer_kwargs(cls, model: nn.Module, hidden: torch.Tensor, positions: torch.Tensor) -> list[dict]:
        """Per decoder layer, the keyword arguments (position embeddings) to call it directly on `hidden`."""
        shared = {"position_embeddings": model.model.rotary_emb(hidden, positions)}
        return [shared] * len(cls.decoder_layers(model))

    @classmethod
    def logits(cls, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head's logits of last-layer hidden states (final norm, scaling, soft-capping)."""
        return model.lm_head(model.model.norm(hidden))

    @classmethod
    def sliding_window(cls, attention: nn.Module, config) -> int | None:
        """Tokens a transformers attention module looks back over (itself included), None if unlimited."""
        return getattr(attention, "sliding_window", None)


def reorder_rotary_rows(weight: T, heads: int, to_norm: bool) -> T:
    """Interleave each head's two rotary halves (HF / NEOX order -> NORM order), or undo it, by rows."""
    half = weight.shape[0] // heads // 2
    split = (heads, 2, half) if to_norm else (heads, half, 2)
    return weight.reshape(*split, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
