"""Qwen2: q/k/v biases. nemotron-nas's ``attention_bias`` gives every attention projection and linear
replacement a bias, so o_proj (and a linear map without one) gets a zero bias, which changes nothing."""

from exporters.mlx.families.base import MlxSpec, register_mlx_family


@register_mlx_family("qwen2")
class Qwen2Spec(MlxSpec):
    """The base layout, with attention biases."""
