"""Families nemotron-nas cannot express, each with the reason (the MLX target refuses every action on
them, one line naming family, action and reason)."""

from exporters.mlx.families.base import Refused, register_mlx_family


@register_mlx_family("qwen3", "olmo2")
class QkNormSpec(Refused):
    refusal = "it norms q and k per head before the rotary embedding, which nemotron-nas does not"


@register_mlx_family("gemma2", "gemma3")
class GemmaSpec(Refused):
    refusal = "its post-attention and post-MLP norms (and soft-capping) are not part of nemotron-nas"


@register_mlx_family("smollm3")
class SmolLM3Spec(Refused):
    refusal = "some of its layers have no rotary embedding (no_rope_layers), which nemotron-nas cannot say"


@register_mlx_family("deci")
class DeciSpec(Refused):
    refusal = "export the source model the deci GGUF was made from instead"
