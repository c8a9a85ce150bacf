"""The architecture adapter: everything gatenorm knows about one decoder family, one class per family.

An architecture says how its tensors are named in a Hugging Face checkpoint and in a GGUF file (GGUF names
through gguf-py's ``MODEL_TENSOR`` / ``TENSOR_NAMES``), which rows of a fused tensor hold q/k/v, how
llama.cpp's converter reorders q/k rows and stores norm gains, the MLP width and FLOPs, and, for a loaded
transformers model, its decoder layers, their sublayers and norms (`LayerParts`), the rotary tables each
layer uses, the module that replaces a layer for each plan action, and the attention pieces the ONNX
exporter needs. Readers, methods and exporters only ask the adapter; a new family is one module here.
"""

from __future__ import annotations

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
    #: The model loop reads ``layer(...)[0]``.
    layer_returns_tuple: ClassVar[bool] = False
    #: Per-layer GGUF tensors that make up the attention sublayer: a layer whose attention is dropped loses
    #: all of them (weights and biases), its input norm included.
    gguf_attention_sublayer: ClassVar[tuple[gguf.MODEL_TENSOR, ...]] = (
        MT.ATTN_NORM,
        MT.ATTN_Q,
        MT.ATTN_K,
        MT.ATTN_V,
        MT.ATTN_OUT,
    )
    #: llama.cpp's ``deci`` graph (per-layer head counts) can run this architecture's layers.
    deci_exportable: ClassVar[bool] = True
    deci_refusal: ClassVar[str] = ""
    #: Where deci cannot run it: a GGUF of the source architecture with whole blocks left out runs in stock
    #: llama.cpp (checked against llama.cpp's logits by the tests).
    gguf_block_removal: ClassVar[bool] = False
    #: Plan actions (values) another llama.cpp architecture runs for this family (`gguf_host_layout`).
    gguf_host_actions: ClassVar[frozenset[str]] = frozenset()
    #: What a refused GGUF export can do instead (the end of the refusal line).
    gguf_works: ClassVar[str] = "apply the plan in PyTorch (gatenorm validate --candidate-plan)"
    #: Why the ONNX exporter does not take this family yet (empty: it does, checked against PyTorch).
    onnx_refusal: ClassVar[str] = ""
    #: genai_config.json's model type (None: the HF model_type) where onnxruntime-genai names the family
    #: otherwise or not at all (it runs any decoder-only graph; the type picks its decoder class).
    genai_model_type: ClassVar[str | None] = None
    #: `exporters.gguf.from_hf` writes this family's HF checkpoints as the GGUF llama.cpp's converter writes.
    gguf_from_hf: ClassVar[bool] = True
    #: GGUF ``ffn_up`` rows per ``feed_forward_length`` (2: gate and up fused, Phi-3).
    gguf_ffn_up_factor: ClassVar[int] = 1
    #: HF rope scaling types (besides none and linear) that `gguf_extra_tensors` writes for llama.cpp.
    gguf_rope_types: ClassVar[tuple[str, ...]] = ()

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
    def hf_to_gguf_tensor(cls, hf_name: str, value: torch.Tensor) -> torch.Tensor:
        """An HF tensor as llama.cpp's converter stores it (q/k row order is `hf_to_gguf_rows`'s)."""
        if cls.norm_plus_one and hf_name.endswith("norm.weight"):
            return value.float() + 1
        return value

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
    def gguf_extra_tensors(cls, config: dict, head_dim: int) -> dict[str, np.ndarray]:
        """Tensors llama.cpp's converter generates for an HF config (Llama-3.x's ``rope_freqs``): name ->
        float32 values."""
        return {}

    @classmethod
    def deci_unsupported(cls, ckpt) -> str:
        """Why `ckpt` (of a family deci hosts) cannot be written as deci ("" when it can)."""
        return ""

    @classmethod
    def deci_split(cls, name: str, shape, ffn: int) -> list[tuple[str, slice, str | None]] | None:
        """A fused GGUF tensor deci stores as several: (new name, its rows, 'q'/'k' for a rotary tensor in
        NEOX order); None for a tensor written as it is."""
        return None

    @classmethod
    def deci_metadata_defaults(cls, header) -> dict[str, str]:
        """``deci.*`` keys (suffix -> string value) a deci file of this family needs when its source lacks
        them."""
        return {}

    @classmethod
    def gguf_hparams(cls, config: dict) -> dict[str, float]:
        """Family-specific float keys (``{arch}.`` suffix -> value) the HF -> GGUF writer adds."""
        return {}

    @classmethod
    def deci_scales(cls, fields, shape) -> dict[str, float]:
        """GGUF tensor name -> factor its values are multiplied by in a deci file (scales deci lacks)."""
        return {}

    @classmethod
    def deci_metadata_dropped(cls) -> tuple[str, ...]:
        """``{arch}.`` key suffixes a deci file leaves out (folded into the weights)."""
        return ()

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
    def recorded_plan(cls, fields, plan):
        """The plan a re-export records: `plan` composed with the one the source file was made with."""
        return plan

    @classmethod
    def check_plan(cls, fixed, plan) -> None:
        """Refuse a plan that changes a layer the source has already changed (`gguf_fixed_layers`) in a
        way it cannot be changed."""

    @classmethod
    def check_block_removal(cls, kept: list[int]) -> None:
        """Refuse a block removal keeping source layers `kept` that the source architecture cannot run."""

    @classmethod
    def gguf_hf_metadata(cls, ckpt) -> dict[str, tuple]:
        """Family keys (after ``{arch}.``) the HF -> GGUF writer adds, as (value, GGUF type, item type or
        None), as llama.cpp's converter writes them; refuses a config llama.cpp cannot run."""
        return {}

    @classmethod
    def gguf_hf_factors(cls, ckpt) -> dict[str, float]:
        """HF tensors the HF -> GGUF writer multiplies by a factor (after `hf_to_gguf_tensor`)."""
        return {}

    @classmethod
    def gguf_own_arch_rewrite(cls, fields: dict, kept: list[int]) -> tuple[dict, dict[str, float]]:
        """A GGUF of this architecture written with only source layers `kept`: keys (after ``{arch}.``) to
        set, as (value, GGUF type, item type or None), or to remove (None), and the source tensors whose
        F32 values are multiplied by a factor; refuses what llama.cpp cannot run."""
        return {}, {}

    @classmethod
    def gguf_host_layout(cls, header, plan):
        """The `gguf_layout.HostLayout` of `plan` on the GGUF `header` (a scan of this architecture's file)
        as the architecture that hosts it, or None where the plan is written as deci or the source's own."""
        return None

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
            returns_tuple=cls.layer_returns_tuple,
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
        return IdentityLayer(getattr(layer, "attention_type", None), cls.layer_returns_tuple)

    @classmethod
    def rotary_module(cls, model: nn.Module, attention: nn.Module) -> nn.Module | None:
        """The rotary module whose (cos, sin) `attention` uses; None for a layer without rotary."""
        return model.model.rotary_emb

    @classmethod
    def layer_kwargs(cls, model: nn.Module, hidden: torch.Tensor, positions: torch.Tensor) -> dict:
        """Keyword arguments (position embeddings) to call a decoder layer directly on `hidden`."""
        return {"position_embeddings": model.model.rotary_emb(hidden, positions)}

    @classmethod
    def logits(cls, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head's logits of last-layer hidden states (final norm, scaling, soft-capping)."""
        return model.lm_head(model.model.norm(hidden))

    @classmethod
    def sliding_window(cls, attention: nn.Module, config) -> int | None:
        """Tokens a transformers attention module looks back over (itself included), None if unlimited."""
        return getattr(attention, "sliding_window", None)

    # ---- ONNX pieces ------------------------------------------------------------------------------------

    @classmethod
    def qkv_projection(cls, attention: nn.Module) -> nn.Module:
        """One projection whose output per token is [q; k; v] (ONNX: one MatMul for the three)."""
        return packed_linear([attention.q_proj, attention.k_proj, attention.v_proj])

    @classmethod
    def has_qk_norms(cls) -> bool:
        """Whether q and k are normed before the rotary embedding (`normed_qk` does it)."""
        return cls.hf_qk_norms is not None

    @classmethod
    def normed_qk(cls, attention: nn.Module, q: torch.Tensor, k: torch.Tensor):
        """q and k [batch, seq, heads*head_dim] after the family's per-head q/k norms, if any."""
        if cls.hf_qk_norms is None:
            return q, k
        batch, seq, _ = q.shape
        head_dim = attention.head_dim
        q_norm, k_norm = (getattr(attention, name) for name in cls.hf_qk_norms)
        q = q_norm(q.reshape(batch, seq, -1, head_dim)).view(batch, seq, -1)
        k = k_norm(k.reshape(batch, seq, -1, head_dim)).view(batch, seq, -1)
        return q, k

    @classmethod
    def attention_softcap(cls, attention: nn.Module) -> float:
        """Soft-capping of attention logits (``c * tanh(x / c)``), 0 for none."""
        return 0.0


def packed_linear(parts: list[nn.Linear]) -> nn.Linear:
    """One Linear computing the outputs of `parts` one after the other (weights and biases concatenated,
    the source's dtype; a part without a bias gets zeros)."""
    has_bias = any(p.bias is not None for p in parts)
    weight = torch.cat([p.weight for p in parts])
    packed = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, dtype=weight.dtype)
    with torch.no_grad():
        packed.weight.copy_(weight)
        if has_bias:
            biases = [p.bias if p.bias is not None else torch.zeros(p.out_features) for p in parts]
            packed.bias.copy_(torch.cat([b.to(weight.dtype) for b in biases]))
    return packed


def reorder_rotary_rows(weight: T, heads: int, to_norm: bool) -> T:
    """Interleave each head's two rotary halves (HF / NEOX order -> NORM order), or undo it, by rows."""
    half = weight.shape[0] // heads // 2
    split = (heads, 2, half) if to_norm else (heads, half, 2)
    return weight.reshape(*split, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
