"""Families nemotron-nas cannot express, each with the reason (the MLX target refuses every action on
them, one line naming family, action and reason)."""

from exporters.mlx.families.base import Refused, register_spec


@register_spec
class QkNormSpec(Refused):
    families = ("qwen3", "olmo2")
    refusal = "it norms q and k per head before the rotary embedding, which nemotron-nas does not"


@register_spec
class GemmaSpec(Refused):
    families = ("gemma2", "gemma3")
    refusal = "its post-attention and post-MLP norms (and soft-capping) are not part of nemotron-nas"


@register_spec
class SmolLM3Spec(Refused):
    families = ("smollm3",)
    refusal = "some of its layers have no rotary embedding (no_rope_layers), which nemotron-nas cannot say"


@register_spec
class DeciSpec(Refused):
    families = ("deci",)
    refusal = "export the source model the deci GGUF was made from instead"
