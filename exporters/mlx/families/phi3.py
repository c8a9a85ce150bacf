"""Phi-3: the fused ``qkv_proj`` split into q/k/v rows, ``gate_up_proj`` into gate (first half) and up."""

from __future__ import annotations

import torch
from torch import nn

from exporters.mlx.families.base import MlxSpec, register_mlx_family


@register_mlx_family("phi3")
class Phi3Spec(MlxSpec):
    @classmethod
    def attention_weights(cls, attention: nn.Module) -> dict[str, torch.Tensor]:
        c = attention.config
        q = c.num_attention_heads * attention.head_dim
        kv = c.num_key_value_heads * attention.head_dim
        rows = {"q_proj": slice(0, q), "k_proj": slice(q, q + kv), "v_proj": slice(q + kv, q + 2 * kv)}
        out = {}
        for name, part in rows.items():
            out[f"{name}.weight"] = attention.qkv_proj.weight.detach()[part]
            if attention.qkv_proj.bias is not None:
                out[f"{name}.bias"] = attention.qkv_proj.bias.detach()[part]
        out["o_proj.weight"] = attention.o_proj.weight.detach()
        return out

    @classmethod
    def mlp_weights(cls, mlp: nn.Module) -> dict[str, torch.Tensor]:
        gate, up = mlp.gate_up_proj.weight.detach().chunk(2, dim=0)
        return {"gate_proj.weight": gate, "up_proj.weight": up, "down_proj.weight": mlp.down_proj.weight}
