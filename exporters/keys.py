"""The ``gatenorm.*`` metadata keys every export format writes about its plan (GGUF key/values, ONNX
``metadata_props``), one spelling for both, like gguf-py's `Keys`; and the older spellings still read.

`plan_values` is what both writers write (a list only when the plan uses its action: gguf-py cannot read an
empty array back); `canonical` maps what a reader found to today's names.
"""

from __future__ import annotations

from collections.abc import Mapping

from gatenorm import __version__
from gatenorm.plan import Plan


class Keys:
    """Metadata key names."""

    PREFIX = "gatenorm."
    TOOL_VERSION = "gatenorm.tool_version"
    PLAN = "gatenorm.plan"  # the plan JSON: the one key readers need
    METHOD = "gatenorm.method"
    BUDGET = "gatenorm.budget"
    SCORES = "gatenorm.scores"
    DROPPED_LAYERS = "gatenorm.dropped_layers"
    LINEARIZED_LAYERS = "gatenorm.linearized_layers"
    LINEARIZE_ALPHAS = "gatenorm.linearize_alphas"
    DROPPED_BLOCKS = "gatenorm.dropped_blocks"
    # healed plans (`gatenorm.heal`)
    REPAIRED_LAYERS = "gatenorm.repaired_layers"  # source layers that apply a fitted repair
    REPAIR_SHA256 = "gatenorm.repair_sha256"  # each repair's sha256, in the order of REPAIRED_LAYERS
    REFITTED_LAYERS = "gatenorm.refitted_layers"  # source layers whose ffn_down was refitted (a fold)
    REFIT_SHA256 = "gatenorm.refit_sha256"  # each refit's sha256, in the order of REFITTED_LAYERS
    HEAL_CALIB = "gatenorm.heal.calib"  # the calibration text the repairs were fitted on
    HEAL_FORM = "gatenorm.heal.form"  # linear or fold
    CHANGED_TENSORS = "gatenorm.changed_tensors"  # tensors whose values gatenorm computed (not copied)

    class Source:
        PATH = "gatenorm.source.path"
        FORMAT = "gatenorm.source.format"
        SHA256 = "gatenorm.source.sha256"
        HASHED = "gatenorm.source.hashed"

    # ONNX only
    KV_LAYERS = "gatenorm.kv_layers"  # cache slot -> original layer
    PRECISION = "gatenorm.precision"


#: Names written by earlier versions -> today's (ONNX folders before the keys were shared).
LEGACY = {"gatenorm.source_sha256": Keys.Source.SHA256}

#: Keys that hold a list of layers or alphas.
LISTS = (
    Keys.DROPPED_LAYERS,
    Keys.LINEARIZED_LAYERS,
    Keys.LINEARIZE_ALPHAS,
    Keys.DROPPED_BLOCKS,
    Keys.REPAIRED_LAYERS,
    Keys.REPAIR_SHA256,
    Keys.REFITTED_LAYERS,
    Keys.REFIT_SHA256,
    Keys.CHANGED_TENSORS,
)


def plan_values(plan: Plan, changed_tensors: list[str] | None = None) -> dict[str, object]:
    """Every plan key of an export of `plan` with its value (lists only when non-empty).

    A healed plan adds its repaired layers, their hashes and calibration source; `changed_tensors` are the
    export's tensors (its own names: GGUF tensors, ONNX initializers) whose values the exporter computed
    rather than copied from the source (fitted repairs, fused or rescaled weights, generated zeros)."""
    values: dict[str, object] = {
        Keys.TOOL_VERSION: __version__,
        Keys.PLAN: plan.to_json(),
        Keys.METHOD: plan.method,
        Keys.BUDGET: plan.budget,
        Keys.SCORES: [float(s) for s in plan.scores],
        Keys.Source.PATH: plan.source.path,
        Keys.Source.FORMAT: plan.source.format,
        Keys.Source.SHA256: plan.source.sha256,
        Keys.Source.HASHED: plan.source.hashed,
    }
    lists = {
        Keys.DROPPED_LAYERS: plan.dropped,
        Keys.LINEARIZED_LAYERS: plan.linearized,
        Keys.LINEARIZE_ALPHAS: plan.linearize_alphas,
        Keys.DROPPED_BLOCKS: plan.blocks_dropped,
        Keys.REPAIRED_LAYERS: plan.repaired,
        Keys.REPAIR_SHA256: [lp.repair.sha256 for lp in plan.layers if lp.repair is not None],
        Keys.REFITTED_LAYERS: plan.refitted,
        Keys.REFIT_SHA256: [lp.refit.sha256 for lp in plan.layers if lp.refit is not None],
        Keys.CHANGED_TENSORS: sorted(changed_tensors or []),
    }
    if plan.healing is not None:
        values[Keys.HEAL_CALIB] = plan.healing.calib
        values[Keys.HEAL_FORM] = plan.healing.form
    return values | {key: value for key, value in lists.items() if value}


def canonical(found: Mapping[str, object]) -> dict[str, object]:
    """`found` with older key names renamed to today's (today's name wins if a file has both)."""
    out = dict(found)
    for old, new in LEGACY.items():
        if old in out:
            out.setdefault(new, out.pop(old))
    return out
