"""What the MLX exporter needs from a family, and the table of families (`register_mlx_family`, `mlx_family`).

The base spec is the llama-like default: the family is written as mlx-lm's ``nemotron-nas`` model (the
Llama-3.x-Nemotron "DeciLM" layout), whose per-layer ``block_configs`` say for each layer's attention and
FFN whether it is kept (its own GQA group), a ``d x d`` linear map (``replace_with_linear``) or nothing
(``no_op``). A family subclass overrides how its tensors split into llama's (Phi-3's fused ones), the
scales folded into the weights (Granite's multipliers), or refuses what nemotron-nas cannot express.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from exporters.family_specs import FamilySpecs
from gatenorm.architectures import Architecture
from gatenorm.plan import LayerAction, Plan

#: nemotron-nas's activations (mlx-lm's ``_ACT2FN``), as HF names them
ACTIVATIONS = ("silu", "relu", "gelu", "gelu_new", "gelu_fast")
#: HF rope scaling types mlx-lm's ``initialize_rope`` builds as transformers does
ROPE_TYPES = (None, "default", "linear", "llama3")


@dataclass(frozen=True)
class Scales:
    """Factors folded into the weights: embeddings, q (over 1/sqrt(head size)), each sublayer's output
    (the residual multiplier) and the logits."""

    embedding: float = 1.0
    query: float = 1.0
    residual: float = 1.0
    logits: float = 1.0


class MlxSpec:
    """A llama-like family written as nemotron-nas: separate q/k/v/o, gated MLP, RMSNorm, no post-norms."""

    #: why the family cannot be written as nemotron-nas (empty: it can)
    refusal: ClassVar[str] = ""
    #: how its folder is laid out: mlx-lm's ``nemotron-nas`` (`exporters.mlx.nemotron_nas`) or ``own``, the
    #: family's own mlx-lm architecture with whole blocks removed (`exporters.mlx.own_arch`)
    layout: ClassVar[str] = "nemotron-nas"

    @classmethod
    def actions(cls) -> tuple[set[LayerAction], str]:
        """The plan actions written for this family, and why the others are not ("")."""
        if cls.refusal:
            return set(), cls.refusal
        return set(LayerAction), ""

    def __init__(self, arch: type[Architecture]):
        self.arch = arch

    @classmethod
    def config_refusal(cls, config: dict) -> str:
        """Why this checkpoint's config cannot be written as nemotron-nas ("" when it can)."""
        heads, hidden = int(config["num_attention_heads"]), int(config["hidden_size"])
        head_dim = config.get("head_dim")
        if head_dim and int(head_dim) != hidden // heads:
            return f"its head size {head_dim} is not hidden_size / heads, and nemotron-nas derives it so"
        if config.get("hidden_act", "silu") not in ACTIVATIONS:
            return f"nemotron-nas has no {config['hidden_act']} activation"
        scaling = config.get("rope_scaling") or {}
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind not in ROPE_TYPES:
            return f"mlx-lm's nemotron-nas does not build rope scaling {kind!r}"
        if float(config.get("partial_rotary_factor", 1.0)) != 1.0:
            return "its rope covers part of each head, and nemotron-nas rotates whole heads"
        window = config.get("sliding_window") if config.get("use_sliding_window", True) else None
        if window and int(window) < int(config.get("max_position_embeddings", 0)):
            return f"its attention looks back {window} tokens only, and nemotron-nas has no sliding window"
        if config.get("mlp_bias"):
            return "its MLP has biases, which nemotron-nas ties to its linear replacements"
        return ""

    @classmethod
    def plan_refusal(cls, config: dict, plan: Plan) -> str:
        """Why this plan of this checkpoint cannot be written ("" when it can), beyond its actions."""
        return ""

    @classmethod
    def own_config(cls, config: dict) -> dict:
        """An ``own`` layout's config.json from the renumbered HF config: what mlx-lm's model reads."""
        return config

    @classmethod
    def scales(cls, config: dict) -> Scales:
        return Scales()

    @classmethod
    def attention_weights(cls, attention: nn.Module) -> dict[str, torch.Tensor]:
        """q/k/v/o weights and biases of a stock attention module, as ``{q,k,v,o}_proj.{weight,bias}``."""
        return _linear_weights(attention, ("q_proj", "k_proj", "v_proj", "o_proj"))

    @classmethod
    def mlp_weights(cls, mlp: nn.Module) -> dict[str, torch.Tensor]:
        """gate/up/down weights of an MLP module, as ``{gate,up,down}_proj.weight``."""
        return _linear_weights(mlp, ("gate_proj", "up_proj", "down_proj"))


def _linear_weights(module: nn.Module, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    out = {}
    for name in names:
        linear = getattr(module, name)
        out[f"{name}.weight"] = linear.weight.detach()
        if linear.bias is not None:
            out[f"{name}.bias"] = linear.bias.detach()
    return out


class Refused(MlxSpec):
    """A family nemotron-nas cannot express (its `refusal` says why)."""


class Unregistered(Refused):
    """A family no MLX spec was registered for (nor for an ancestor of its adapter)."""

    refusal = "no MLX writer for this family yet"


#: the MLX spec of each family (an adapter's ``name``); a family without one gets its nearest registered
#: ancestor's (Mistral: llama's), else `Unregistered`
SPECS = FamilySpecs("MLX", Unregistered)
register_mlx_family = SPECS.register
mlx_family = SPECS.spec
