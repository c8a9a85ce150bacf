"""The ``gatenorm.*`` keys a pruned GGUF carries, and reading them (and the plan) back."""

from __future__ import annotations

from pathlib import Path

import gguf

from exporters.keys import Keys, canonical, plan_values
from gatenorm.errors import GatenormError
from gatenorm.plan import Plan
from gatenorm.readers.gguf_check import check_gguf

#: The GGUF value type (and array item type) of every plan key (`exporters.keys.plan_values`).
_T = gguf.GGUFValueType
TYPES: dict[str, tuple[gguf.GGUFValueType, gguf.GGUFValueType | None]] = {
    Keys.TOOL_VERSION: (_T.STRING, None),
    Keys.PLAN: (_T.STRING, None),
    Keys.METHOD: (_T.STRING, None),
    Keys.BUDGET: (_T.UINT32, None),
    Keys.SCORES: (_T.ARRAY, _T.FLOAT32),
    Keys.Source.PATH: (_T.STRING, None),
    Keys.Source.FORMAT: (_T.STRING, None),
    Keys.Source.SHA256: (_T.STRING, None),
    Keys.Source.HASHED: (_T.STRING, None),
    Keys.DROPPED_LAYERS: (_T.ARRAY, _T.INT32),
    Keys.LINEARIZED_LAYERS: (_T.ARRAY, _T.INT32),
    Keys.LINEARIZE_ALPHAS: (_T.ARRAY, _T.FLOAT32),
    Keys.DROPPED_BLOCKS: (_T.ARRAY, _T.INT32),
    Keys.REPAIRED_LAYERS: (_T.ARRAY, _T.INT32),
    Keys.REPAIR_SHA256: (_T.ARRAY, _T.STRING),
    Keys.REFITTED_LAYERS: (_T.ARRAY, _T.INT32),
    Keys.REFIT_SHA256: (_T.ARRAY, _T.STRING),
    Keys.HEAL_CALIB: (_T.STRING, None),
    Keys.HEAL_FORM: (_T.STRING, None),
    Keys.CHANGED_TENSORS: (_T.ARRAY, _T.STRING),
}


def plan_metadata(
    plan: Plan, changed_tensors: list[str] | None = None
) -> dict[str, tuple[object, gguf.GGUFValueType, gguf.GGUFValueType | None]]:
    """The ``gatenorm.*`` key/value pairs describing `plan` (and the tensors whose values the export
    computed, `exporters.keys.plan_values`): key -> (value, type, array item type)."""
    return {key: (value, *TYPES[key]) for key, value in plan_values(plan, changed_tensors).items()}


def pruned_name(name: str | None, plan: Plan) -> str:
    """``general.name`` of a pruned export: the source name, saying how many layers were pruned and how."""
    base = (name or Path(plan.source.path).stem).split(" (gatenorm: ")[0]  # a re-export: not nested
    changed = {
        "attention dropped": plan.dropped,
        "linearized": plan.linearized,
        "blocks dropped": plan.blocks_dropped,
    }
    counts = [f"{len(layers)} {label}" for label, layers in changed.items() if layers]
    detail = f": {', '.join(counts)}" if counts else ""
    return f"{base} (gatenorm: pruned {plan.budget} of {plan.source.n_layers} layers{detail})"


def read_gguf_metadata(path: str | Path) -> dict[str, object]:
    """Every ``gatenorm.*`` key of a GGUF file with its value; a GatenormError if it has none."""
    path = Path(path)
    if not path.is_file():
        raise GatenormError(f"no such file: {path}")
    fields = check_gguf(path).fields
    found = canonical({key: f.contents() for key, f in fields.items() if key.startswith(Keys.PREFIX)})
    if not found:
        raise GatenormError(f"{path} has no gatenorm metadata: it is not a gatenorm export")
    for key in ("general.name", "general.architecture"):
        found[key] = fields[key].contents() if key in fields else None
    return found


def read_plan_metadata(path: str | Path) -> Plan:
    """The plan stored in a gatenorm GGUF export."""
    meta = read_gguf_metadata(path)
    if Keys.PLAN not in meta:
        raise GatenormError(f"{path} has gatenorm keys but no {Keys.PLAN}")
    return Plan.from_json(str(meta[Keys.PLAN]))
