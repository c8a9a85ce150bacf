"""Qwen2: q/k/v biases. nemotron-nas's ``attention_bias`` gives every attention projection and linear
replacement a bias, so o_proj (and a linear map without one) gets a zero bias, which changes nothing."""

from exporters.mlx.families.base import MlxSpec, register_spec


@register_spec
class Qwen2Spec(MlxSpec):
    families = ("qwen2",)
