"""A deci GGUF as the source (Nemotron-NAS, gatenorm's own exports): its layers without attention keep
their state, and a re-export records the plan against the model the file was pruned from."""

from __future__ import annotations

from collections.abc import Mapping

from exporters.gguf.families.base import register_gguf_family
from exporters.gguf.families.llama import LlamaGguf
from gatenorm.architectures.deci import DROP_ATTENTION, DROP_BLOCK, LINEARIZE, combined_plan, stored_plan
from gatenorm.errors import GatenormError


@register_gguf_family("deci")
class DeciGguf(LlamaGguf):
    """deci: read from GGUF only (no HF checkpoint of it); layers the file has already changed stay so."""

    from_hf = False

    def recorded_plan(self, fields: Mapping, plan):
        stored = stored_plan(fields)
        return plan if stored is None else combined_plan(stored, plan)

    def check_plan(self, fixed: Mapping[int, tuple[str, float | None]], plan) -> None:
        """Refuse a plan that gives a layer the file has already changed an action it cannot take (its
        q/k/v are gone): such a layer keeps its state, or loses more (attention, block)."""
        for layer, (action, alpha) in fixed.items():
            lp = plan.layers[layer]
            new = lp.action.value
            allowed = {action, DROP_BLOCK} | ({DROP_ATTENTION} if action == LINEARIZE else set())
            if new not in allowed or (new == LINEARIZE == action and lp.alpha != alpha):
                raise GatenormError(
                    f"cannot give layer {layer} of this deci file {new}"
                    f"{'' if lp.alpha is None else f' (alpha {lp.alpha})'}: it is already {action} "
                    f"(q/k/v are not in the file); what works: {' or '.join(sorted(allowed))} for that layer"
                )
