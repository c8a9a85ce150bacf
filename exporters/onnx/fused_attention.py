"""Export kept attention layers as one projection + onnxruntime's fused ``GroupQueryAttention``.

Traced transformers attention becomes ~100 small ONNX nodes per layer (shape arithmetic, rotary,
repeat_kv, mask slicing, softmax); on a CPU those nodes, not the weights, dominate decode time. During
the export, ``fused_attention`` swaps each kept layer's attention forward for one concatenated q/k/v
projection (``qkv_proj``, one MatMul) + one ``com.microsoft::GroupQueryAttention`` that applies the rotary
embedding itself (``do_rotary``, cos/sin tables taken from the layer's own rotary module, so any RoPE
scaling and Gemma-3's local/global tables carry over; off for layers without rotary), appends to the
layer's cache and attends causally (the family's scale, sliding window and soft-cap as node attributes);
layers with q/k norms split the projection first and norm q and k. Every RMSNorm
traces as onnxruntime's ``SimplifiedLayerNormalization`` (then fused with the residual Add into
``SkipSimplifiedLayerNormalization`` on the ONNX graph). This is the graph onnxruntime-genai's own builder
writes. The torch forwards below give the same values, so the trace sees a consistent model.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator

import torch
from torch import nn

from exporters.onnx.families import OnnxFamily, onnx_family
from gatenorm.architectures import Architecture
from gatenorm.errors import GatenormError


def _rotate(x: torch.Tensor, positions: torch.Tensor, cos_table, sin_table, head_dim: int) -> torch.Tensor:
    """Rotate-half RoPE on [batch, seq, heads*head_dim] at `positions` [batch, seq], from cos/sin tables
    [positions, rotary_dim/2]; a head's dimensions past rotary_dim pass unchanged (partial rotary)."""
    batch, seq, _ = x.shape
    half = cos_table.shape[1]
    x = x.view(batch, seq, -1, head_dim)
    cos, sin = cos_table[positions].unsqueeze(2), sin_table[positions].unsqueeze(2)
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1).view(batch, seq, -1)


class _Rotary(torch.autograd.Function):
    """``_rotate`` as ``com.microsoft::RotaryEmbedding``: for head sizes GroupQueryAttention's own rotary
    does not take (not a multiple of 16)."""

    @staticmethod
    def forward(ctx, x, position_ids, cos_table, sin_table, head_dim, heads, rotary_dim):
        return _rotate(x, position_ids, cos_table, sin_table, head_dim)

    @staticmethod
    def symbolic(g, x, position_ids, cos_table, sin_table, head_dim, heads, rotary_dim):
        out = g.op(
            "com.microsoft::RotaryEmbedding",
            x,
            position_ids,
            cos_table,
            sin_table,
            interleaved_i=0,
            num_heads_i=heads,
            rotary_embedding_dim_i=rotary_dim,
        )
        out.setType(x.type())
        return out


class _RMSNorm(torch.autograd.Function):
    """``weight * x / rms(x)`` in float32 over the last axis: ``SimplifiedLayerNormalization`` in ONNX."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
        return weight * normed.to(x.dtype)

    @staticmethod
    def symbolic(g, x, weight, eps):
        out = g.op("SimplifiedLayerNormalization", x, weight, axis_i=-1, epsilon_f=eps, stash_type_i=1)
        out.setType(x.type())
        return out


class _GroupQueryAttention(torch.autograd.Function):
    """Causal GQA with rotary over [past; new] keys/values; returns the output and the grown cache (BNSH).

    `q` holds the packed q/k/v projection when `k` and `v` are None. With `cos`/`sin` tables the rotary
    embedding is applied at `positions` (``do_rotary``); without, q and k come rotated.
    """

    @staticmethod
    def forward(
        ctx,
        q,
        k,
        v,
        past_k,
        past_v,
        seqlens_k,
        total,
        cos,
        sin,
        positions,
        heads,
        kv_heads,
        scale,
        window,
        softcap,
    ):
        batch, seq, _ = q.shape
        head_dim = past_k.shape[-1]
        if k is None:
            q, k, v = q.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
        num_heads = heads
        if cos is not None:
            q, k = _rotate(q, positions, cos, sin, head_dim), _rotate(k, positions, cos, sin, head_dim)
        present_k = torch.cat([past_k, k.view(batch, seq, kv_heads, head_dim).transpose(1, 2)], dim=2)
        present_v = torch.cat([past_v, v.view(batch, seq, kv_heads, head_dim).transpose(1, 2)], dim=2)
        groups = num_heads // kv_heads
        keys = present_k.repeat_interleave(groups, dim=1)
        values = present_v.repeat_interleave(groups, dim=1)
        total = present_k.shape[2]
        i = torch.arange(seq)[:, None] + (total - seq)
        j = torch.arange(total)[None, :]
        allowed = j <= i
        if window >= 0:
            allowed = allowed & (j > i - window)
        scores = q.view(batch, seq, num_heads, head_dim).transpose(1, 2) @ keys.transpose(-1, -2) * scale
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        out = (probs @ values).transpose(1, 2).reshape(batch, seq, num_heads * head_dim)
        return out, present_k, present_v

    @staticmethod
    def symbolic(
        g,
        q,
        k,
        v,
        past_k,
        past_v,
        seqlens_k,
        total,
        cos,
        sin,
        positions,
        heads,
        kv_heads,
        scale,
        window,
        softcap,
    ):
        none = g.op("prim::Constant")  # an absent optional input ("" in ONNX): packed q/k/v in `q`
        none.setType(torch._C.NoneType.get())
        kv = [none if k is None else k, none if v is None else v, past_k, past_v, seqlens_k, total]
        rotary = [] if cos is None else [cos, sin, positions]
        out, present_k, present_v = g.op(
            "com.microsoft::GroupQueryAttention",
            q,
            *kv,
            *rotary,
            num_heads_i=heads,
            kv_num_heads_i=kv_heads,
            scale_f=scale,
            local_window_size_i=window,
            softcap_f=softcap,
            do_rotary_i=int(cos is not None),
            rotary_interleaved_i=0,
            outputs=3,
        )
        out.setType(q.type())
        present_k.setType(past_k.type())
        present_v.setType(past_v.type())
        return out, present_k, present_v


def _rope_tables(model: nn.Module, rotary: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [max_positions, rotary_dim/2] from one of the model's rotary modules (scaling included).

    LongRoPE (Phi-3.5, Phi-4-mini) switches factors by sequence length: positions below
    ``original_max_position_embeddings`` get the short factors transformers uses for such sequences,
    later ones the long factors.
    """
    config = model.config
    end = config.max_position_embeddings
    bounds = [0, end]
    original = getattr(config, "original_max_position_embeddings", None)
    if getattr(rotary, "rope_type", None) == "longrope" and original and original < end:
        bounds = [0, original, end]
    probe = torch.zeros(1, dtype=torch.float32)
    parts = []
    with torch.no_grad():
        for start, stop in itertools.pairwise(bounds):
            parts.append(rotary(probe, torch.arange(start, stop)[None]))
    cos, sin = (torch.cat([part[i] for part in parts], dim=1) for i in (0, 1))
    half = cos.shape[-1] // 2
    return cos[0, :, :half].float().contiguous(), sin[0, :, :half].float().contiguous()


def _fused_forward(attention: nn.Module, spec: OnnxFamily, config, tables, graph_inputs: dict):
    """A replacement forward for one transformers attention module (see the module docstring); the
    family's pieces come from the adapter (window, rotary tables) and its ONNX spec (packed q/k/v
    projection, q/k norms, soft-capping)."""
    arch = spec.arch
    num_heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = attention.head_dim
    window = arch.sliding_window(attention, config)
    local_window = -1 if window is None else window  # both count the token itself in the window
    softcap = spec.attention_softcap(attention)  # GroupQueryAttention's ``softcap`` attribute
    rotary_dim = 0 if tables is None else 2 * int(tables[0].shape[1])  # < head_dim: partial rotary (Phi-4)
    # GroupQueryAttention's do_rotary takes head and rotary sizes that are multiples of 16 (measured:
    # "cos_cache dimension 1 must be <= head_size / 2 and a multiple of 8"); other sizes rotate through
    # RotaryEmbedding first, and a layer without rotary (SmolLM3's no-rope layers) runs with do_rotary off
    rotary_in_attention = tables is not None and head_dim % 16 == 0 and rotary_dim % 16 == 0

    def forward(hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **_):
        positions = graph_inputs["position_ids"]
        q, k, v = attention.gatenorm_qkv(hidden_states), None, None  # packed unless q/k change first
        if spec.has_qk_norms() or (tables is not None and not rotary_in_attention):
            q, k, v = q.split([num_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
            q, k = spec.normed_qk(attention, q, k)
        rotary = (*tables, positions) if rotary_in_attention else (None, None, None)
        if tables is not None and not rotary_in_attention:
            q = _Rotary.apply(q, positions, *tables, head_dim, num_heads, rotary_dim)
            k = _Rotary.apply(k, positions, *tables, head_dim, kv_heads, rotary_dim)
        cache = past_key_values.layers[attention.layer_idx]
        out, cache.keys, cache.values = _GroupQueryAttention.apply(
            q,
            k,
            v,
            cache.keys,
            cache.values,
            graph_inputs["seqlens_k"],
            graph_inputs["total_length"],
            *rotary,
            num_heads,
            kv_heads,
            float(attention.scaling),
            local_window,
            softcap,
        )
        return attention.o_proj(out), None

    return forward


def _rms_norms(model: nn.Module, arch: type[Architecture]) -> list[tuple[nn.Module, torch.Tensor, float]]:
    """(module, gain, eps) of the model's RMSNorms ``gain * x / rms(x)``: the llama form (``weight``,
    ``variance_epsilon``) and, for families storing ``w`` for ``1 + w`` (Gemma), ``1 + weight`` (``eps``)."""
    norms = []
    for m in model.modules():
        if (
            not type(m).__name__.endswith("RMSNorm")
            or getattr(m, "weight", None) is None
            or m.weight.dim() != 1
        ):
            continue
        if hasattr(m, "variance_epsilon"):
            norms.append((m, m.weight, float(m.variance_epsilon)))
        elif arch.norm_plus_one and hasattr(m, "eps"):
            norms.append((m, (m.weight.detach().float() + 1).to(m.weight.dtype), float(m.eps)))
    return norms


def _norm_forward(gain: torch.Tensor, eps: float):
    return lambda hidden_states: _RMSNorm.apply(hidden_states, gain, eps)


@contextlib.contextmanager
def fused_attention(model: nn.Module, arch: type[Architecture]) -> Iterator[None]:
    """While active, every kept attention module of `model` traces to ORT's fused ops (and every RMSNorm
    to ``SimplifiedLayerNormalization``)."""
    config, spec = model.config, onnx_family(arch)
    if spec.refusal:
        raise GatenormError(
            f"cannot export {arch.name} to ONNX: {spec.refusal}; what works: apply the plan in PyTorch "
            "(gatenorm validate --candidate-plan)"
        )
    attentions = [
        getattr(layer, arch.hf_attention_module)
        for layer in arch.decoder_layers(model)
        if hasattr(layer, arch.hf_attention_module)
    ]
    if getattr(config, "rope_scaling", None) and config.rope_scaling.get("rope_type") == "dynamic":
        raise GatenormError(
            "dynamic RoPE scaling depends on the sequence length; ONNX export needs a fixed table"
        )
    tables: dict[int, tuple[torch.Tensor, torch.Tensor] | None] = {}  # per rotary module (local/global)
    for attention in attentions:
        rotary = arch.rotary_module(model, attention)
        if id(rotary) not in tables:
            tables[id(rotary)] = None if rotary is None else _rope_tables(model, rotary)
    graph_inputs: dict[str, torch.Tensor] = {}

    def capture(module, args, kwargs):
        mask, positions = kwargs.get("attention_mask"), kwargs.get("position_ids")
        if mask is None or positions is None or mask.dim() != 2:
            raise GatenormError("fused attention export needs a 2-D attention_mask and position_ids")
        graph_inputs["position_ids"] = positions
        graph_inputs["seqlens_k"] = (mask.sum(-1) - 1).to(torch.int32)
        graph_inputs["total_length"] = torch._shape_as_tensor(mask)[1].to(torch.int32)

    hook = model.model.register_forward_pre_hook(capture, with_kwargs=True)
    norms = _rms_norms(model, arch)
    for attention in attentions:
        attention.gatenorm_qkv = spec.qkv_projection(attention)
        rotary_tables = tables[id(arch.rotary_module(model, attention))]
        attention.forward = _fused_forward(attention, spec, config, rotary_tables, graph_inputs)
    for norm, gain, eps in norms:
        norm.forward = _norm_forward(gain, eps)
    try:
        yield
    finally:
        hook.remove()
        for attention in attentions:
            del attention.forward  # back to the class's forward
            del attention.gatenorm_qkv
        for norm, _, _ in norms:
            del norm.forward
