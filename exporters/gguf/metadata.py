"""The ``gatenorm.*`` keys a pruned GGUF carries, and reading them (and the plan) back."""

from __future__ import annotations

from pathlib import Path

import gguf

from gatenorm import __version__
from gatenorm.errors import GatenormError
from gatenorm.plan import Plan
from gatenorm.readers.gguf_check import check_gguf

PREFIX = "gatenorm."
KEY_PLAN = "gatenorm.plan"


def plan_metadata(plan: Plan) -> dict[str, tuple[object, gguf.GGUFValueType, gguf.GGUFValueType | None]]:
    """The ``gatenorm.*`` key/value pairs describing `plan`: key -> (value, type, array item type)."""
    t = gguf.GGUFValueType
    keys: dict[str, tuple[object, gguf.GGUFValueType, gguf.GGUFValueType | None]] = {
        "gatenorm.tool_version": (__version__, t.STRING, None),
        KEY_PLAN: (plan.to_json(), t.STRING, None),
        "gatenorm.method": (plan.method, t.STRING, None),
        "gatenorm.budget": (plan.budget, t.UINT32, None),
        "gatenorm.scores": ([float(s) for s in plan.scores], t.ARRAY, t.FLOAT32),
        "gatenorm.source.path": (plan.source.path, t.STRING, None),
        "gatenorm.source.format": (plan.source.format, t.STRING, None),
        "gatenorm.source.sha256": (plan.source.sha256, t.STRING, None),
        "gatenorm.source.hashed": (plan.source.hashed, t.STRING, None),
    }
    # gguf-py cannot read back an empty array: a key is written only when the plan uses its action
    if plan.dropped:
        keys["gatenorm.dropped_layers"] = (plan.dropped, t.ARRAY, t.INT32)
    if plan.linearized:
        keys["gatenorm.linearized_layers"] = (plan.linearized, t.ARRAY, t.INT32)
        keys["gatenorm.linearize_alphas"] = (plan.linearize_alphas, t.ARRAY, t.FLOAT32)
    if plan.blocks_dropped:
        keys["gatenorm.dropped_blocks"] = (plan.blocks_dropped, t.ARRAY, t.INT32)
    return keys


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
    found = {key: field.contents() for key, field in fields.items() if key.startswith(PREFIX)}
    if not found:
        raise GatenormError(f"{path} has no gatenorm metadata: it is not a gatenorm export")
    for key in ("general.name", "general.architecture"):
        found[key] = fields[key].contents() if key in fields else None
    return found


def read_plan_metadata(path: str | Path) -> Plan:
    """The plan stored in a gatenorm GGUF export."""
    meta = read_gguf_metadata(path)
    if KEY_PLAN not in meta:
        raise GatenormError(f"{path} has gatenorm keys but no {KEY_PLAN}")
    return Plan.from_json(str(meta[KEY_PLAN]))
