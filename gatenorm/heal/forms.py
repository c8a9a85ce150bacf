"""Which changed layers of a healed plan get a fitted map, by healing form, from the plan's actions alone:
what `gatenorm.heal.fit` fits and what a speedup target counts (`gatenorm.methods.registry`)."""

from __future__ import annotations

from collections.abc import Sequence

from gatenorm.plan import HealForm, LayerAction

#: Actions whose layers are healed, and whether the repair stands for the whole block.
HEALED_ACTIONS = {
    LayerAction.DROP_ATTENTION: False,
    LayerAction.LINEARIZE: False,
    LayerAction.DROP_BLOCK: True,
}


def mapped_layers(actions: Sequence[LayerAction], form: HealForm) -> set[int]:
    """The changed layers that apply a fitted ``d x d`` map (a run-time matmul). In form ``fold`` those are
    the linearized layers and the changed layers with no MLP below them to fold into (below: the closest
    layer that is not a removed block; a block replaced by a map has no MLP)."""
    if form == "linear":
        return {i for i, a in enumerate(actions) if a in HEALED_ACTIONS}
    mapped: set[int] = set()
    mlp_below = False
    for i, action in enumerate(actions):
        if action in HEALED_ACTIONS and (action is LayerAction.LINEARIZE or not mlp_below):
            mapped.add(i)
        if action is not LayerAction.DROP_BLOCK:
            mlp_below = True
        elif i in mapped:
            mlp_below = False
    return mapped
