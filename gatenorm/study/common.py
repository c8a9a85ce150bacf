"""What the study's stages and its report share."""

from __future__ import annotations

from gatenorm.methods import METHODS
from gatenorm.plan import Plan


def study_methods() -> list[str]:
    """Every registered method the study takes (`MethodSpec.in_study`), in registry order."""
    return [name for name, spec in METHODS.items() if spec.in_study]


def combo(plan: Plan) -> str:
    """A plan's mix of actions, e.g. ``d3-l1-b0`` (dropped attentions, linearized layers, dropped blocks)."""
    return f"d{len(plan.dropped)}-l{len(plan.linearized)}-b{len(plan.blocks_dropped)}"
