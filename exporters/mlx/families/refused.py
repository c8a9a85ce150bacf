"""Families the MLX exporter cannot write, each with the reason (the MLX target refuses every action on
them, one line naming family, action and reason)."""

from exporters.mlx.families.base import Refused, register_mlx_family


@register_mlx_family("gemma2")
class Gemma2Spec(Refused):
    refusal = (
        "its post-norms are not part of nemotron-nas, and mlx-lm's own gemma2 model has no sliding window "
        "(it attends to the whole context), so it would not compute the model"
    )


@register_mlx_family("deci")
class DeciSpec(Refused):
    refusal = "export the source model the deci GGUF was made from instead"
