"""``deci`` as an input: llama.cpp's per-layer-head-count llama (Nemotron-NAS, and gatenorm's own pruned
GGUF exports).

A deci file says per layer ``attention.head_count`` / ``head_count_kv`` / ``feed_forward_length``
(``src/models/deci.cpp``): head_count 0 is an attention-free layer (``h + ffn(ffn_norm(h))``), head_count_kv
0 with head_count > 0 is "linear attention" (``h + attn_output @ attn_norm(h)``, no q/k/v). This module is
the one place that reads what a file has already changed (`implied_layers`): those layers are not scored,
keep their state in any new plan, and are copied as they are by the GGUF writer; a gatenorm export's
``gatenorm.plan`` says what its layers were (a dropped first attention is stored as zero linear attention)
and is composed with a new plan (`combined_plan`), so a re-export records the plan against the original
model.
"""

from __future__ import annotations

from collections.abc import Mapping

from gatenorm.architectures.base import register
from gatenorm.architectures.llama import Llama
from gatenorm.errors import GatenormError

DECI = "deci"
#: Actions a file layer can already have (`gatenorm.plan.LayerAction` values; this module cannot import
#: the plan, which imports the readers).
DROP_ATTENTION, LINEARIZE, KEEP, DROP_BLOCK = "drop-attention", "linearize", "keep", "drop-block"
#: Families whose gatenorm deci exports load back into their own transformers class (others: llama).
HOST_FAMILIES = ("llama", "qwen2")


def _per_layer(fields: Mapping, key: str, n_layers: int, default: list[int] | None = None) -> list[int]:
    field = fields.get(f"{DECI}.{key}")
    if field is None:
        if default is None:
            raise GatenormError(f"deci GGUF lacks {DECI}.{key}")
        return list(default)
    value = field.contents()
    values = list(value) if isinstance(value, list) else [value] * n_layers
    if len(values) != n_layers:
        raise GatenormError(f"deci GGUF: {DECI}.{key} has {len(values)} entries for {n_layers} layers")
    return [int(v) for v in values]


def layer_counts(fields: Mapping) -> list[tuple[int, int, int]]:
    """(head_count, head_count_kv, feed_forward_length) of every layer of a deci file's metadata."""
    n = int(fields[f"{DECI}.block_count"].contents())
    heads = _per_layer(fields, "attention.head_count", n)
    kv = _per_layer(fields, "attention.head_count_kv", n, heads)
    ffn = _per_layer(fields, "feed_forward_length", n)
    return list(zip(heads, kv, ffn, strict=True))


def stored_plan(fields: Mapping):
    """The ``gatenorm.plan`` of a gatenorm export (None for other files, e.g. Nemotron-NAS)."""
    field = fields.get("gatenorm.plan")
    if field is None:
        return None
    from gatenorm.plan import Plan

    return Plan.from_json(str(field.contents()))


def file_layers(plan) -> list[int]:
    """Source layers of `plan` in the order its export writes them (dropped blocks left out, unless healed:
    those are linear attention with a zero FFN)."""
    return [lp.layer for lp in plan.layers if lp.action.value != DROP_BLOCK or lp.repair is not None]


def implied_layers(fields: Mapping) -> dict[int, tuple[str, float | None]]:
    """File layer -> (action, alpha) of every layer the file has already changed: attention-free layers are
    ``drop-attention``, linear-attention ones ``linearize`` (alpha as recorded by gatenorm, 1.0 otherwise:
    the stored matrix is the whole update; so for a healed layer, whose matrix is its repair). A gatenorm
    export's zero linear first layer is the dropped attention its plan says it is. Layers with full
    attention are not listed."""
    counts = layer_counts(fields)
    plan = stored_plan(fields)
    recorded = {}
    if plan is not None:
        written = file_layers(plan)
        if len(written) == len(counts):
            recorded = {j: plan.layers[src] for j, src in enumerate(written)}
    implied = {}
    for j, (heads, kv, _ffn) in enumerate(counts):
        if heads == 0:
            implied[j] = (DROP_ATTENTION, None)
        elif kv == 0:
            lp = recorded.get(j)
            if lp is not None and lp.repair is not None:
                implied[j] = (LINEARIZE, 1.0)
            elif lp is not None and lp.action.value == DROP_ATTENTION:
                implied[j] = (DROP_ATTENTION, None)
            else:
                implied[j] = (LINEARIZE, lp.alpha if lp is not None and lp.alpha is not None else 1.0)
    return implied


def attention_counts(counts: list[tuple[int, int, int]], path) -> tuple[int, int]:
    """The (head_count, head_count_kv) every full-attention layer shares; refused where they vary."""
    full = {(h, kv) for h, kv, _ in counts if h and kv}
    linear = {h for h, kv, _ in counts if h and not kv}
    if len(full) > 1:
        raise GatenormError(
            f"deci GGUF {path}: the attention layers have different head counts {sorted(full)} "
            "(Nemotron-NAS variable GQA), which gatenorm does not read yet"
        )
    if not full:
        raise GatenormError(f"deci GGUF {path} has no layer with attention (head_count_kv > 0)")
    heads, kv = full.pop()
    if linear - {heads}:
        raise GatenormError(
            f"deci GGUF {path}: linear-attention layers have head counts {sorted(linear)}, the attention "
            f"layers {heads}"
        )
    return heads, kv


def combined_plan(stored, plan):
    """`plan` (made for a gatenorm deci export) composed with the plan the export was made with (`stored`),
    against the original model: what a direct export of the original would need to write the same file."""
    from gatenorm.plan import LayerAction, LayerPlan, Plan

    written = file_layers(stored)
    if len(written) != plan.source.n_layers or stored.healing is not None:
        return plan  # a healed export's repairs are in the file, not in a plan of the original model
    layers = list(stored.layers)
    for j, src in enumerate(written):
        new, old = plan.layers[j], stored.layers[src]
        if new.action is old.action:
            continue  # unchanged: the stored action (and alpha) stays
        layers[src] = LayerPlan(layer=src, score=new.score, action=new.action, alpha=new.alpha)
    budget = sum(lp.action is not LayerAction.KEEP for lp in layers)
    method = stored.method if plan.method == stored.method else f"{stored.method}+{plan.method}"
    return Plan(method=method, seed=stored.seed, budget=budget, source=stored.source, layers=layers)


@register("DeciLMForCausalLM")
class Deci(Llama):
    """A deci GGUF: llama layers (NORM rope q/k rows, like llama's converter writes them) with per-layer head
    counts; layers without attention are `implied_layers`."""

    name = DECI
    gguf_arch = DECI

    @classmethod
    def gguf_layer_counts(cls, fields: Mapping, shape) -> list[tuple[int, int, int]]:
        return layer_counts(fields)

    @classmethod
    def gguf_fixed_layers(cls, fields: Mapping) -> dict[int, tuple[str, float | None]]:
        return implied_layers(fields)

    @classmethod
    def gguf_head_counts(cls, fields: Mapping, path) -> tuple[int, int] | None:
        return attention_counts(layer_counts(fields), path)
