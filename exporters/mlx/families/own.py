"""Families written as their own mlx-lm architecture with whole blocks removed (`exporters.mlx.own_arch`):
their structure is beyond nemotron-nas (q/k norms, post-norms, layers without rotary embedding), and their
own mlx-lm model runs every layer's attention, so only keeping and removing whole blocks can be written."""

from __future__ import annotations

from typing import ClassVar

from exporters.mlx.families.base import MlxSpec, register_mlx_family
from gatenorm.plan import LayerAction, Plan

FULL, SLIDING = "full_attention", "sliding_attention"


class OwnArchSpec(MlxSpec):
    """A family mlx-lm hosts as its own model: keep and drop-block only."""

    layout = "own"
    #: why nemotron-nas cannot hold the family, hence why its attention cannot go alone
    structure: ClassVar[str]

    @classmethod
    def actions(cls) -> tuple[set[LayerAction], str]:
        why = f"{cls.structure}, so it is written as its own mlx-lm model, where only whole blocks can go"
        return {LayerAction.KEEP, LayerAction.DROP_BLOCK}, why

    @classmethod
    def config_refusal(cls, config: dict) -> str:
        window = config.get("sliding_window") if config.get("use_sliding_window") else None
        if window and int(window) < int(config.get("max_position_embeddings", 0)):
            return f"its attention looks back {window} tokens only, and mlx-lm's model has no sliding window"
        return ""

    @classmethod
    def plan_refusal(cls, config: dict, plan: Plan) -> str:
        if plan.repaired:
            return "its fitted maps need a linear layer, which its own mlx-lm model has no place for"
        return ""


@register_mlx_family("qwen3", "olmo2")
class QkNormSpec(OwnArchSpec):
    structure = "it norms q and k per head before the rotary embedding, which nemotron-nas does not"


@register_mlx_family("smollm3")
class SmolLM3Spec(OwnArchSpec):
    structure = "some of its layers have no rotary embedding (no_rope_layers), which nemotron-nas cannot say"


@register_mlx_family("gemma3")
class Gemma3Spec(OwnArchSpec):
    """mlx-lm's gemma3_text: a sliding window on every layer but each `sliding_window_pattern`-th."""

    structure = "its post-attention and post-MLP norms are not part of nemotron-nas"

    @classmethod
    def config_refusal(cls, config: dict) -> str:
        return ""  # its sliding layers are mlx-lm's own

    @classmethod
    def plan_refusal(cls, config: dict, plan: Plan) -> str:
        if why := super().plan_refusal(config, plan):
            return why
        types = config.get("layer_types") or []
        kept = [types[lp.layer] for lp in plan.layers if lp.action is not LayerAction.DROP_BLOCK and types]
        if types and _pattern(kept) is None:
            return (
                "mlx-lm's gemma3 places its global layers every sliding_window_pattern-th layer, and the "
                "kept layers' sliding and global attention do not follow such a pattern"
            )
        return ""

    @classmethod
    def own_config(cls, config: dict) -> dict:
        if pattern := _pattern(config.get("layer_types") or []):
            config["sliding_window_pattern"] = pattern
        return config


def _pattern(types: list[str]) -> int | None:
    """The `sliding_window_pattern` p for which mlx-lm's rule (layer i slides unless (i + 1) % p == 0) gives
    `types`, or None."""
    if FULL not in types:
        return None
    p = types.index(FULL) + 1
    ok = all((t == SLIDING) == ((i + 1) % p != 0) for i, t in enumerate(types))
    return p if ok else None
