"""A transformers model pruned by a plan (`gatenorm.apply.apply_plan`) as mlx-lm's ``nemotron-nas``
layout: its config.json and its tensors (float32 numpy arrays, mlx-lm's names).

Each source layer becomes one nemotron-nas layer, read from the module the plan put there:

- kept: ``attention: {n_heads_in_group}``, q/k/v/o and the input norm;
- drop-attention (`AttentionFreeLayer`): ``attention: {no_op}``, no tensors at all (the norm goes too);
- linearize and a healed map (`LinearAttentionLayer`): ``attention: {replace_with_linear}``, the input norm
  and ``self_attn.linear`` = the fitted or fused ``d x d`` matrix (its scale and the residual one in it);
- drop-block (`IdentityLayer`): attention and FFN ``no_op``; healed (`LinearBlockLayer`): the linear map
  as attention, FFN ``no_op``.

mlx-lm derives the FFN width from ``ffn_mult`` (``int(2 * mult * d / 3)`` rounded up to 256): the MLP is
padded with zero rows of gate/up and zero columns of down to that width, which adds exactly nothing
(``silu(0) * 0``). Head size is always ``d / heads``; families where it is not are refused by their spec.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from exporters.mlx.families import MlxSpec, Scales
from gatenorm.architectures import Architecture
from gatenorm.architectures.layers import (
    AttentionFreeLayer,
    IdentityLayer,
    LinearAttentionLayer,
    LinearBlockLayer,
)

MODEL_TYPE = "nemotron-nas"
FFN_ROUND = 256


def ffn_mult(width: int, d_model: int) -> tuple[float, int]:
    """(ffn_mult, the width mlx-lm derives from it): the smallest width >= `width` it can express."""
    padded = -(-width // FFN_ROUND) * FFN_ROUND
    mult = round(1.5 * padded / d_model, 6)
    derived = int(2 * mult * d_model / 3)
    derived = -(-derived // FFN_ROUND) * FFN_ROUND
    return mult, derived


def _np(value: torch.Tensor, factor: float = 1.0) -> np.ndarray:
    array = value.detach().to(torch.float64).cpu().numpy() * factor
    return array.astype(np.float32)


def _padded_mlp(weights: dict[str, torch.Tensor], width: int, residual: float) -> dict[str, np.ndarray]:
    gate, up, down = (weights[f"{n}_proj.weight"] for n in ("gate", "up", "down"))
    pad = width - gate.shape[0]
    return {
        "gate_proj.weight": np.pad(_np(gate), ((0, pad), (0, 0))),
        "up_proj.weight": np.pad(_np(up), ((0, pad), (0, 0))),
        "down_proj.weight": np.pad(_np(down, residual), ((0, 0), (0, pad))),
    }


def _norm(module: nn.Module) -> np.ndarray:
    return _np(module.weight)


def _mlp_parts(layer: nn.Module, arch: type[Architecture]) -> tuple[nn.Module, nn.Module]:
    """(MLP, its input norm) of a stock layer or an attention-free / linear-attention one."""
    if isinstance(layer, AttentionFreeLayer):  # LinearAttentionLayer too
        return layer._part("mlp"), layer._part("mlp_norm")
    parts = arch.layer_parts(layer)
    return parts.mlp, parts.mlp_norm


def layout(
    model: nn.Module, arch: type[Architecture], spec: type[MlxSpec], config: dict
) -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json, tensors) of `model` (pruned in PyTorch) as nemotron-nas; `config` is its HF config."""
    d_model, n_head = int(config["hidden_size"]), int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_head)
    scales: Scales = spec.scales(config)
    blocks, tensors = [], {}
    mult = width = None
    for i, layer in enumerate(arch.decoder_layers(model)):
        prefix = f"model.layers.{i}."
        attention, ffn = {"no_op": True}, {"no_op": True}
        if isinstance(layer, LinearAttentionLayer | LinearBlockLayer):
            attention = {"replace_with_linear": True}
            factor = getattr(layer, "scale", 1.0) * getattr(layer, "residual_scale", 1.0)
            tensors[prefix + "input_layernorm.weight"] = _norm(layer._part("attention_norm"))
            tensors[prefix + "self_attn.linear.weight"] = _np(layer.fused_attention.weight, factor)
            if layer.fused_attention.bias is not None:
                tensors[prefix + "self_attn.linear.bias"] = _np(layer.fused_attention.bias, factor)
        elif not isinstance(layer, AttentionFreeLayer | IdentityLayer):  # a stock layer: attention kept
            parts = arch.layer_parts(layer)
            attention = {"n_heads_in_group": n_head // n_kv}
            tensors[prefix + "input_layernorm.weight"] = _norm(parts.attention_norm)
            factors = {"q_proj": scales.query, "o_proj": scales.residual}
            for name, value in spec.attention_weights(parts.attention).items():
                tensors[prefix + "self_attn." + name] = _np(value, factors.get(name.split(".")[0], 1.0))
        if not isinstance(layer, IdentityLayer | LinearBlockLayer):  # the MLP stays
            mlp, mlp_norm = _mlp_parts(layer, arch)
            weights = spec.mlp_weights(mlp)
            if mult is None:
                mult, width = ffn_mult(weights["gate_proj.weight"].shape[0], d_model)
            ffn = {"ffn_mult": mult}
            tensors[prefix + "post_attention_layernorm.weight"] = _norm(mlp_norm)
            for name, value in _padded_mlp(weights, width, scales.residual).items():
                tensors[prefix + "mlp." + name] = value
        blocks.append({"attention": attention, "ffn": ffn})
    bias = any(name.endswith("bias") for name in tensors)
    if bias:  # nemotron-nas: every attention projection and linear map has one or none does
        _zero_biases(tensors, blocks)
    embed = model.get_input_embeddings().weight
    tensors["model.embed_tokens.weight"] = _np(embed, scales.embedding)
    tensors["model.norm.weight"] = _norm(model.model.norm)
    tied = bool(config.get("tie_word_embeddings")) and scales.embedding == 1.0 and scales.logits == 1.0
    if not tied:
        tensors["lm_head.weight"] = _np(model.get_output_embeddings().weight, scales.logits)
    return _config(config, blocks, tied, bias), tensors


def _zero_biases(tensors: dict[str, np.ndarray], blocks: list[dict]) -> None:
    """A zero bias for each attention projection and linear map without one (Qwen2's o_proj)."""
    for i, block in enumerate(blocks):
        prefix = f"model.layers.{i}.self_attn."
        names = ("linear",) if block["attention"].get("replace_with_linear") else ()
        if "n_heads_in_group" in block["attention"]:
            names = ("q_proj", "k_proj", "v_proj", "o_proj")
        for name in names:
            rows = tensors[f"{prefix}{name}.weight"].shape[0]
            tensors.setdefault(f"{prefix}{name}.bias", np.zeros(rows, dtype=np.float32))


def _config(source: dict, blocks: list[dict], tied: bool, bias: bool) -> dict:
    scaling = source.get("rope_scaling")
    if scaling:
        scaling = {**scaling, "rope_type": scaling.get("rope_type", scaling.get("type"))}
    config = {
        "architectures": ["DeciLMForCausalLM"],
        "model_type": MODEL_TYPE,
        "hidden_size": int(source["hidden_size"]),
        "num_hidden_layers": len(blocks),
        "num_attention_heads": int(source["num_attention_heads"]),
        "rms_norm_eps": float(source.get("rms_norm_eps", 1e-6)),
        "vocab_size": int(source["vocab_size"]),
        "block_configs": blocks,
        "hidden_act": source.get("hidden_act", "silu"),
        "attention_bias": bias,
        "mlp_bias": False,
        "rope_theta": float(source.get("rope_theta", 10000.0)),
        "max_position_embeddings": int(source.get("max_position_embeddings", 2048)),
        "tie_word_embeddings": tied,
    }
    if scaling:  # absent, not null: transformers 5 warns about a null rope_scaling
        config["rope_scaling"] = scaling
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if source.get(key) is not None:
            config[key] = source[key]
    return config
