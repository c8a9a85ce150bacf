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


def heal_run_section(calib: str | None = None) -> str:
    """The results section of a heal run: ``heal`` for the study-wide calibration, ``heal:<calib>`` for a
    ``--heal-compare`` one; the text split records its articles under ``<section>_articles``."""
    return "heal" if calib is None else f"heal:{calib}"
