"""Llama (SmolLM, SmolLM2) and Mistral (through its adapter's ancestor): the base layout as it is (Mistral
only without a sliding window shorter than its context: `MlxSpec.config_refusal`)."""

from exporters.mlx.families.base import MlxSpec, register_mlx_family


@register_mlx_family("llama")
class LlamaSpec(MlxSpec):
    """The base layout as it is."""
