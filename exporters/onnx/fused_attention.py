"""Export kept attention layers as onnxruntime's fused ``RotaryEmbedding`` + ``GroupQueryAttention``.

Traced transformers attention becomes ~100 small ONNX nodes per layer (shape arithmetic, rotary,
repeat_kv, mask slicing, softmax); on a CPU those nodes, not the weights, dominate decode time. During
the export, ``fused_attention`` swaps each kept layer's attention forward for projections + two
``com.microsoft::RotaryEmbedding`` (driven by the ``position_ids`` input, cos/sin tables taken from the
model's own rotary module, so any RoPE scaling carries over) + one ``com.microsoft::GroupQueryAttention``
that appends to the layer's cache and attends causally (sliding window where the architecture has one).
The torch forwards below give the same values, so the trace sees a consistent model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from gatenorm.architectures import Architecture
from gatenorm.errors import GatenormError


class _Rotary(torch.autograd.Function):
    """Rotate-half RoPE on [batch, seq, heads*head_dim] at `position_ids`, from cos/sin tables."""

    @staticmethod
    def forward(ctx, x, position_ids, cos_table, sin_table):
        batch, seq, _ = x.shape
        half = cos_table.shape[1]
        x = x.view(batch, seq, -1, 2 * half)
        cos, sin = cos_table[position_ids].unsqueeze(2), sin_table[position_ids].unsqueeze(2)
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).view(batch, seq, -1)

    @staticmethod
    def symbolic(g, x, position_ids, cos_table, sin_table):
        out = g.op("com.microsoft::RotaryEmbedding", x, position_ids, cos_table, sin_table, interleaved_i=0)
        out.setType(x.type())
        return out


class _GroupQueryAttention(torch.autograd.Function):
    """Causal GQA over [past; new] keys/values; returns the output and the grown cache (BNSH)."""

    @staticmethod
    def forward(ctx, q, k, v, past_k, past_v, seqlens_k, total_length, num_heads, kv_heads, scale, window):
        batch, seq, _ = q.shape
        head_dim = past_k.shape[-1]
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
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        out = (probs @ values).transpose(1, 2).reshape(batch, seq, num_heads * head_dim)
        return out, present_k, present_v

    @staticmethod
    def symbolic(g, q, k, v, past_k, past_v, seqlens_k, total_length, num_heads, kv_heads, scale, window):
        out, present_k, present_v = g.op(
            "com.microsoft::GroupQueryAttention",
            q,
            k,
            v,
            past_k,
            past_v,
            seqlens_k,
            total_length,
            num_heads_i=num_heads,
            kv_num_heads_i=kv_heads,
            scale_f=scale,
            local_window_size_i=window,
            outputs=3,
        )
        out.setType(q.type())
        present_k.setType(past_k.type())
        present_v.setType(past_v.type())
        return out, present_k, present_v


def _rope_tables(model: nn.Module, rotary: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [max_positions, head_dim/2] from one of the model's rotary modules (scaling included)."""
    config = model.config
    positions = torch.arange(config.max_position_embeddings)[None]
    probe = torch.zeros(1, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = rotary(probe, positions)
    half = cos.shape[-1] // 2
    return cos[0, :, :half].float().contiguous(), sin[0, :, :half].float().contiguous()


def _fused_forward(attention: nn.Module, arch: type[Architecture], config, tables, graph_inputs: dict):
    """A replacement forward for one transformers attention module (see the module docstring); the
    family's pieces (q/k/v projections and norms, window, rotary tables) come from the adapter."""
    num_heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    window = arch.sliding_window(attention, config)
    local_window = -1 if window is None else window  # both count the token itself in the window
    if arch.attention_softcap(attention):
        raise GatenormError(f"{arch.name}: ONNX export of soft-capped attention is not supported yet")
    if tables is None:
        raise GatenormError(f"{arch.name}: ONNX export of layers without rotary is not supported yet")

    def forward(hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **_):
        q, k, v = arch.project_qkv(attention, hidden_states)
        positions = graph_inputs["position_ids"]
        q = _Rotary.apply(q, positions, *tables)
        k = _Rotary.apply(k, positions, *tables)
        cache = past_key_values.layers[attention.layer_idx]
        out, cache.keys, cache.values = _GroupQueryAttention.apply(
            q,
            k,
            v,
            cache.keys,
            cache.values,
            graph_inputs["seqlens_k"],
            graph_inputs["total_length"],
            num_heads,
            kv_heads,
            float(attention.scaling),
            local_window,
        )
        return attention.o_proj(out), None

    return forward


@contextlib.contextmanager
def fused_attention(model: nn.Module, arch: type[Architecture]) -> Iterator[None]:
    """While active, every kept attention module of `model` traces to ORT's fused ops."""
    config = model.config
    if arch.onnx_refusal:
        raise GatenormError(
            f"cannot export {arch.name} to ONNX: {arch.onnx_refusal}; what works: apply the plan in PyTorch "
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
    for attention in attentions:
        rotary_tables = tables[id(arch.rotary_module(model, attention))]
        attention.forward = _fused_forward(attention, arch, config, rotary_tables, graph_inputs)
    try:
        yield
    finally:
        hook.remove()
        for attention in attentions:
            del attention.forward  # back to the class's forward
