"""Llama (SmolLM, SmolLM2) and Mistral: the base layout as it is (Mistral only without a sliding window
shorter than its context: `MlxSpec.config_refusal`)."""

from exporters.mlx.families.base import MlxSpec, register_spec


@register_spec
class LlamaSpec(MlxSpec):
    families = ("llama", "mistral")
