"""GGUF in -> pruned GGUF out: rewrite a model as llama.cpp's ``deci`` architecture, tensor by tensor.

``deci`` reads per-layer ``attention.head_count`` / ``head_count_kv`` / ``feed_forward_length`` arrays
(llama.cpp ``src/models/deci.cpp``). Each plan action is one per-layer setting:

- keep: the source's head counts, every tensor;
- drop-attention: 0 heads, so no attention and no KV cache (``h + ffn(ffn_norm(h))``), attention tensors
  (``attn_norm`` included) omitted;
- linearize: 0 KV heads, "linear attention" ``h + attn_output @ attn_norm(h)``, with ``attn_output`` the
  fused HARP matrix (`exporters.gguf.linearize`) and q/k/v omitted; no KV cache;
- drop-block: the layer is not written at all; later layers are renumbered and ``block_count`` shrinks;
- a healed layer (a fitted repair ``W``, `gatenorm.heal`): linear attention with ``attn_output = s * W`` (s:
  the residual multiplier deci folds into tensors, the GGUF spec's `deci_scales`) and q/k/v omitted, the
  MLP as the action leaves it; a healed dropped block is linear attention ``W`` plus an FFN of width
  `HEALED_BLOCK_FFN` whose ``ffn_down`` is all zeros (it adds exactly 0: deci skips a layer without FFN
  before its residual add, which would discard the repair).

llama.cpp rejects extra tensors, so omitted means absent. Every other tensor's bytes and every metadata
value (tokenizer, chat template) are copied unchanged, apart from the ``{arch}.*`` -> ``deci.*`` rename.
The ``gatenorm.*`` keys keep the plan with its source layer numbers and name the tensors whose values were
computed rather than copied (``gatenorm.changed_tensors``).
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import gguf
import numpy as np

from exporters.gguf.families import DeciTensors, GgufFamily, gguf_family
from exporters.gguf.fold import folded_bytes, folded_nbytes, folded_type
from exporters.gguf.header import ScannedGGUF, encode_kv, encode_raw_kv, encode_tensor_info
from exporters.gguf.linearize import (
    fused_nbytes,
    fused_type,
    fused_value_output_bytes,
    repair_bytes,
    repair_type,
)
from exporters.gguf.metadata import plan_metadata, pruned_name
from exporters.keys import Keys
from gatenorm.architectures import get_architecture, gguf_tensor, model_arch
from gatenorm.errors import GatenormError
from gatenorm.heal.store import check_weights, load_refits, load_repairs
from gatenorm.plan import LayerAction, LayerPlan, Plan
from gatenorm.readers import Checkpoint
from gatenorm.readers.base import ModelShape
from gatenorm.readers.gguf_file import GGUFCheckpoint
from gatenorm.recover.store import load_overrides

if TYPE_CHECKING:
    import torch

DECI = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.DECI]
MT = gguf.MODEL_TENSOR
#: Keys that become per-layer arrays in ``deci``.
HEAD_COUNT, HEAD_COUNT_KV = "attention.head_count", "attention.head_count_kv"
FFN_LENGTH = "feed_forward_length"
BLOCK_COUNT = "block_count"
#: First component of every per-layer GGUF tensor name (``blk.{i}.attn_q.weight``).
BLOCK = "blk"
#: FFN width of a healed dropped block: 32, the smallest block of llama.cpp's quant types (Q8_0, Q4_0), so
#: its all-zero ``ffn_down`` rows split into blocks; F32 (zeros: exact whatever the quantizer picks later).
HEALED_BLOCK_FFN = 32


def recovered_tensors(ckpt: Checkpoint, plan: Plan) -> dict[str, torch.Tensor]:
    """Source GGUF tensor name -> a recovered plan's merged weight (`gatenorm.recover`) in the GGUF's
    layout (q/k rows in llama.cpp's order); {} for a plan without recovery."""
    overrides = load_overrides(plan)
    if not overrides:
        return {}
    arch, shape = ckpt.arch, ckpt.shape
    names = gguf.get_tensor_name_map(model_arch(arch.gguf_arch), shape.n_layers)
    rotary = {arch.hf_tensors[part].format(i=i): part for i in range(shape.n_layers) for part in ("q", "k")}
    out = {}
    for name, value in overrides.items():
        source = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if source is None or not ckpt.has_tensor(source):
            raise GatenormError(f"recovered tensor {name} has no GGUF tensor in {ckpt.path.name}")
        if (part := rotary.get(name)) is not None:
            value = arch.hf_to_gguf_rows(part, value, shape.n_head, shape.n_head_kv)
        out[source] = value
    return out


def recovered_outputs(ckpt: Checkpoint, plan: Plan) -> list[str]:
    """The written names of a recovered plan's merged tensors (for the quantizer: Q8_0 or better)."""
    index = written_layers(deci_plan(plan)) if plan.changed else {}
    return [renamed(name, layer_of(name), index) for name in recovered_tensors(ckpt, plan)]


def keeps_source_architecture(spec: GgufFamily, plan: Plan) -> bool:
    """Whether the export is written as the source's own architecture rather than ``deci``: a plan that
    changes no layer (quantize or copy), or drop-block only on a family ``deci`` cannot run."""
    if not plan.changed:
        return True
    return not spec.deci_exportable and plan.actions <= {LayerAction.KEEP, LayerAction.DROP_BLOCK}


def check_deci_plan(ckpt: Checkpoint, plan: Plan) -> None:
    """Refuse, with one line naming the family, the action, the reason and what works, the plans that stock
    llama.cpp could not run as written."""
    arch, spec = ckpt.arch, gguf_family(ckpt.arch)
    spec.check_plan(ckpt.fixed_layers, plan)  # layers a deci source has already changed
    if not plan.changed:
        return
    if plan.healing is not None:
        check_healed_plan(ckpt, plan)
    if LayerAction.KEEP not in plan.actions:
        raise GatenormError(
            f"cannot export a plan that keeps no attention of this {arch.name} model to GGUF: llama.cpp "
            "creates no context without a KV cache; keep at least one layer's attention"
        )
    if reason := spec.refusal(ckpt):
        actions = sorted(a.value for a in plan.actions - {LayerAction.KEEP})
        if set(actions) <= spec.host_actions:
            return  # another llama.cpp architecture hosts them (the spec's `host_layout`)
        if actions == [LayerAction.DROP_BLOCK.value] and spec.block_removal:
            spec.check_block_removal(
                [lp.layer for lp in plan.layers if lp.action is not LayerAction.DROP_BLOCK]
            )
            return
        raise GatenormError(
            f"cannot export {arch.name} with {', '.join(actions)} to GGUF: {reason}; what works: {spec.works}"
        )
    repaired = set(plan.repaired)  # a repair replaces W_o W_v and their biases
    biased = [i for i in plan.linearized if i not in repaired and ckpt.has_attention_bias(i, ("v", "o"))]
    if biased:
        raise GatenormError(
            f"cannot linearize layers {biased} of this {arch.name} model in GGUF: llama.cpp's deci linear "
            "attention adds no bias, and these layers have v/o biases (use drop-attention or ONNX)"
        )


def check_healed_plan(ckpt: Checkpoint, plan: Plan) -> None:
    """Refuse, with one line naming the layer, a healed plan whose repairs stock llama.cpp cannot run as
    written: a repair with a bias (deci's linear attention adds none), a family or source that is not
    exported as ``deci`` (the source's own architecture or another host has no linear attention), and a
    weights file that does not match the plan's hashes (`gatenorm.heal.store.check_weights`)."""
    arch, first = ckpt.arch, (plan.repaired or plan.refitted)[0]
    biased = [lp.layer for lp in plan.layers if lp.repair is not None and lp.repair.bias]
    if biased:
        raise GatenormError(
            f"cannot export the repair of layer {biased[0]} to GGUF: it has a bias, and llama.cpp's linear "
            "attention adds no bias; fit with bias off (or export to ONNX)"
        )
    reason = gguf_family(arch).refusal(ckpt)
    if ckpt.fixed_layers or ckpt.arch.gguf_arch == DECI:
        reason = "the source is already a deci file (heal the plan of the model it was pruned from)"
    if reason:
        raise GatenormError(
            f"cannot export the repair of layer {first} of this {arch.name} model to GGUF: a healed plan is "
            f"written for llama.cpp's deci graph, and {reason}; what works: export the plan unhealed, or "
            "--to onnx"
        )
    check_weights(plan)  # the weights file matches the plan's hashes, before anything is written


def _healed_block(lp: LayerPlan) -> bool:
    return lp.action is LayerAction.DROP_BLOCK and lp.repair is not None


def deci_plan(plan: Plan) -> Plan:
    """The plan as the ``deci`` file writes it: a dropped attention in the first written layer becomes
    linear attention with an all-zero ``attn_output`` (alpha 0: ``h + 0 @ attn_norm(h)``, exactly the
    dropped attention), since llama.cpp reads the head size from the first layer."""
    first = next(lp for lp in plan.layers if lp.action is not LayerAction.DROP_BLOCK or _healed_block(lp))
    if first.action is not LayerAction.DROP_ATTENTION or first.repair is not None:
        return plan  # a repaired layer is linear attention already
    doc = plan.model_dump(mode="json")
    doc["layers"][first.layer].update(action=LayerAction.LINEARIZE.value, alpha=0.0)
    return Plan.model_validate(doc)


def layer_of(name: str) -> int | None:
    """The layer index of a per-layer GGUF tensor (``blk.{i}.<part>.<kind>``), None for a global one."""
    head, _, rest = name.partition(".")
    index, _, _ = rest.partition(".")
    return int(index) if head == BLOCK and index.isdigit() else None


def renamed(name: str, layer: int, new_index: dict[int, int]) -> str:
    """`name` of a tensor of `layer` under the layer's index in the written file."""
    return f"{BLOCK}.{new_index[layer]}.{name.split('.', 2)[2]}"


def written_layers(plan: Plan) -> dict[int, int]:
    """Source layer -> layer index in the written file: dropped blocks are left out (healed ones stay:
    linear attention), later ones move up."""
    kept = [lp.layer for lp in plan.layers if lp.action is not LayerAction.DROP_BLOCK or _healed_block(lp)]
    return {layer: i for i, layer in enumerate(kept)}


def removed_tensor_names(spec: GgufFamily, plan: Plan) -> set[str]:
    """Attention tensors (weights and biases) that the plan removes from the layers it writes.

    A linearized or repaired layer keeps ``attn_norm`` and ``attn_output`` (with new contents; a repaired
    one loses its ``attn_output`` bias, which deci's linear attention would not add); dropped blocks lose
    every tensor and are not listed here (a healed one keeps only its attention norm and output).
    """
    arch, removed = spec.arch, set()
    for lp in plan.layers:
        i = lp.layer
        if lp.repair is not None:
            kept = (arch.gguf_tensors["norm"].format(i=i), arch.gguf_tensors["o"].format(i=i))
            weights = [w for w in spec.attention_tensors(i) if w not in kept]
            removed |= {kept[1].removesuffix("weight") + "bias"}
        elif lp.action is LayerAction.DROP_ATTENTION:
            weights = spec.attention_tensors(i)
        elif lp.action is LayerAction.LINEARIZE:
            weights = [arch.gguf_tensors[part].format(i=i) for part in ("q", "k", "v")]
        else:
            continue
        removed |= {w.removesuffix("weight") + suffix for w in weights for suffix in ("weight", "bias")}
    return removed


def deci_layer_hparams(
    plan: Plan, shape: ModelShape, counts: list[tuple[int, int, int]]
) -> dict[str, list[int]]:
    """The per-layer ``deci`` arrays (head_count, head_count_kv, feed_forward_length) of the written layers,
    from the source's per-layer `counts` (head_count, head_count_kv, feed_forward_length).

    Dropped blocks are not written at all (`written_layers`): deci's own identity layer (0 heads, 0
    feed-forward length) aborts llama.cpp (``GGML_ASSERT(buffer)``) when it is the last layer.
    """
    rows = []
    for lp in plan.layers:
        heads, kv, ffn = counts[lp.layer]
        if lp.repair is not None:  # linear attention; a healed block's FFN adds zero
            rows.append((heads or shape.n_head, 0, HEALED_BLOCK_FFN if _healed_block(lp) else ffn))
        elif lp.action is LayerAction.KEEP:
            rows.append((heads, kv, ffn))
        elif lp.action is LayerAction.DROP_ATTENTION:
            rows.append((0, 0, ffn))
        elif lp.action is LayerAction.LINEARIZE:
            rows.append((heads or shape.n_head, 0, ffn))
    return {key: [row[k] for row in rows] for k, key in enumerate((HEAD_COUNT, HEAD_COUNT_KV, FFN_LENGTH))}


def deci_metadata(
    header: ScannedGGUF,
    shape: ModelShape,
    plan: Plan,
    written: Plan | None = None,
    target: str = DECI,
    own_keys: dict | None = None,
    changed_tensors: list[str] | None = None,
) -> list[bytes]:
    """The encoded key/value pairs of the pruned file: the source's, renamed to `target`, plus per-layer
    (``deci`` only: `written` is the plan as written, `deci_plan`) and plan keys; `own_keys` (suffix ->
    (value, type, item type) or None to drop) are the family's own (its GGUF spec's `own_arch_rewrite`);
    `changed_tensors` the written tensors whose values were computed."""
    t = gguf.GGUFValueType
    source_arch = header.fields["general.architecture"].contents()
    prefix = f"{source_arch}."
    ffn_field = header.fields.get(prefix + FFN_LENGTH)
    ffn = ffn_field.contents() if ffn_field else None
    if target == DECI and source_arch != DECI and (not isinstance(ffn, int) or ffn <= 0):
        raise GatenormError(f"GGUF {header.path} has no usable {prefix}{FFN_LENGTH}")
    source = get_architecture(source_arch)
    counts = source.gguf_layer_counts(header.fields, shape)
    per_layer = deci_layer_hparams(written or plan, shape, counts) if target == DECI else {}
    n_written = len(written_layers(written or plan))
    spec = gguf_family(source)
    recorded = spec.recorded_plan(header.fields, plan)  # deci: against its source
    own_keys = dict(own_keys or {})
    name = header.fields.get("general.name")
    kv = [
        encode_kv("general.architecture", target, t.STRING),
        encode_kv("general.name", pruned_name(name.contents() if name else None, recorded), t.STRING),
    ]
    dropped = {prefix + s for s in spec.deci_metadata_dropped()} if target == DECI else ()
    for key, field in header.fields.items():
        if key in ("general.architecture", "general.name") or key.startswith(Keys.PREFIX) or key in dropped:
            continue
        if key.startswith(prefix):
            key = f"{target}.{key.removeprefix(prefix)}"
            if (suffix := key.removeprefix(f"{target}.")) in per_layer:
                kv.append(encode_kv(key, per_layer.pop(suffix), t.ARRAY, t.INT32))
                continue
            if suffix == BLOCK_COUNT:
                kv.append(encode_kv(key, n_written, field.types[0]))
                continue
            if suffix in own_keys:
                if (value := own_keys.pop(suffix)) is not None:
                    kv.append(encode_kv(key, *value))
                continue
        kv.append(encode_raw_kv(key, field.raw_value))
    for suffix, values in per_layer.items():  # head_count_kv may be implicit in the source
        kv.append(encode_kv(f"{target}.{suffix}", values, t.ARRAY, t.INT32))
    if target == DECI:  # keys deci needs that the source family's GGUF does without (phi3's longrope)
        for suffix, value in spec.deci_metadata_defaults(header).items():
            if f"{prefix}{suffix}" not in header.fields:
                kv.append(encode_kv(f"{DECI}.{suffix}", value, t.STRING))
    kv += [encode_kv(f"{target}.{suffix}", *value) for suffix, value in own_keys.items() if value is not None]
    plan_keys = plan_metadata(recorded, changed_tensors)
    kv += [encode_kv(key, value, vtype, sub) for key, (value, vtype, sub) in plan_keys.items()]
    return kv


@dataclass(frozen=True)
class _OutTensor:
    """One tensor of the output file: its info, and how its bytes get written."""

    name: str
    ne: list[int]
    ggml_type: gguf.GGMLQuantizationType
    n_bytes: int
    write: Callable[[BinaryIO], None]
    #: its values are computed here (fused, repaired, rescaled, generated), not the source's bytes
    changed: bool = False


def _output_tensors(
    ckpt: GGUFCheckpoint,
    header: ScannedGGUF,
    plan: Plan,
    src_fd: int,
    exact: bool,
    to_deci: bool = True,
    factors: dict[str, float] | None = None,
):
    """The output tensors in source order: kernel copies, fused linear attention, the repaired layers'
    fitted ``attn_output`` (and a healed block's zero FFN after its tensors), refitted ``ffn_down``
    weights, F32 tensors multiplied by `factors` (source name -> factor), and what a deci file changes in
    the family's tensors (its GGUF spec's `DeciTensors`: scaled, split, q/k rows reordered)."""
    factors = factors or {}
    spec, d = gguf_family(ckpt.arch), ckpt.shape.d_model
    deci = spec.deci_tensors(header, ckpt.shape, partial(_ffn_of, header)) if to_deci else _NO_DECI
    removed, new_index = removed_tensor_names(spec, plan), written_layers(plan)
    fixed = ckpt.fixed_layers  # already linear in the source (deci): copied as they are, unless zeroed
    output = ckpt.arch.gguf_tensors["o"]
    fused = {
        output.format(i=lp.layer): lp
        for lp in plan.layers
        if lp.action is LayerAction.LINEARIZE and (lp.layer not in fixed or lp.alpha == 0.0)
    }
    repairs = load_repairs(plan)
    repaired = {output.format(i=layer): layer for layer in repairs}
    refits = {gguf_tensor(MT.FFN_DOWN).format(i=layer): w for layer, w in load_refits(plan).items()}
    recovered = recovered_tensors(ckpt, plan)
    healed_blocks = {lp.layer for lp in plan.layers if _healed_block(lp)}
    block_kept = {ckpt.arch.gguf_tensors[p].format(i=i) for i in healed_blocks for p in ("norm", "o")}
    yield from _zero_linear_tensors(ckpt, header, plan, new_index, exact)
    yield from _tied_output(ckpt, header, deci.scales, exact)
    for t in header.tensors:
        layer = layer_of(t.name)
        if t.name in removed or (layer is not None and layer not in new_index):
            continue
        if layer in healed_blocks and t.name not in block_kept:
            continue  # a healed block: its attention norm and the repair, then `_zero_ffn_tensors`
        name = t.name if layer is None else renamed(t.name, layer, new_index)
        ne, scale = [int(n) for n in t.shape], deci.scales.get(t.name, 1.0)
        if t.name in repaired:
            # h + s * W norm(h) as apply_plan computes it: s (granite's residual multiplier) on the repair
            # of a dropped or linearized attention, none on a healed block's
            i, qtype = repaired[t.name], repair_type(t.tensor_type, d, exact)
            scale = 1.0 if i in healed_blocks else scale
            yield _fitted(name, [d, d], qtype, fused_nbytes(qtype, d), repairs[i].weight, scale)
            if i in healed_blocks:
                yield from _zero_ffn_tensors(new_index[i], d)
        elif t.name in recovered:  # like a refit: Q8_0 or better, the residual multiplier on it
            if t.name in deci.splits or t.name in deci.rotary:
                raise GatenormError(
                    f"cannot write the recovered {t.name} of this {ckpt.arch.name} model to GGUF"
                )
            qtype = folded_type(t.tensor_type, ne[0], exact)
            yield _fitted(name, ne, qtype, folded_nbytes(qtype, ne), recovered[t.name], scale)
        elif t.name in refits:  # Q8_0 or better, the residual multiplier (granite) on it as on the source's
            qtype = folded_type(t.tensor_type, ne[0], exact)
            yield _fitted(name, ne, qtype, folded_nbytes(qtype, ne), refits[t.name], scale)
        elif t.name in fused:
            yield _fused(ckpt, name, fused[t.name], fused_type(t.tensor_type, d, exact), scale)
        elif t.name in deci.scales:
            qtype = folded_type(t.tensor_type, ne[0], exact)
            write = partial(_write_folded, ckpt, t.name, scale, qtype)
            yield _OutTensor(name, ne, qtype, folded_nbytes(qtype, ne), write, changed=True)
        elif t.name in deci.splits:
            yield from _split_tensor(ckpt, spec, t, deci.splits[t.name], layer, new_index)
        elif t.name in factors:
            yield _factored(ckpt, name, t, factors[t.name])
        elif (part := deci.rotary.get(t.name)) is not None:
            write = partial(_write_rotary, ckpt, spec, t, part)
            yield _OutTensor(name, ne, t.tensor_type, t.n_bytes, write)
        else:
            write = partial(_copy_bytes, src_fd, t.data_offset, t.n_bytes)
            yield _OutTensor(name, ne, t.tensor_type, t.n_bytes, write)


#: No change to the family's tensors (a file not written as deci).
_NO_DECI = DeciTensors({}, {}, {})


def _fitted(name: str, ne: list[int], qtype, n_bytes: int, weight, scale: float) -> _OutTensor:
    """A fitted weight (a repair or a refit) times `scale`, as `qtype`."""
    write = lambda fout: fout.write(repair_bytes(weight.numpy(), scale, qtype))  # noqa: E731
    return _OutTensor(name, ne, qtype, n_bytes, write, changed=True)


def _fused(ckpt: GGUFCheckpoint, name: str, lp: LayerPlan, qtype, scale: float) -> _OutTensor:
    """The fused ``attn_output`` of a linearized layer (alpha times `scale`, granite's residual multiplier);
    all zeros for a zero first layer written over a source without v / o."""
    d = ckpt.shape.d_model

    def write(fout):
        if lp.layer in ckpt.fixed_layers:
            fout.write(b"\0" * fused_nbytes(qtype, d))
        else:
            fout.write(fused_value_output_bytes(ckpt, lp.layer, lp.alpha * scale, qtype))

    return _OutTensor(name, [d, d], qtype, fused_nbytes(qtype, d), write, changed=True)


def _factored(ckpt: GGUFCheckpoint, name: str, t, factor: float) -> _OutTensor:
    """An F32 source tensor multiplied by `factor` (refused for another type)."""
    if t.tensor_type is not gguf.GGMLQuantizationType.F32:
        raise GatenormError(f"cannot rescale {t.name}: it is {t.tensor_type.name}, not F32")

    def write(fout):
        values = np.frombuffer(ckpt.read_raw(t.name), dtype="<f4")
        fout.write((values * np.float32(factor)).astype("<f4").tobytes())

    return _OutTensor(name, [int(n) for n in t.shape], t.tensor_type, t.n_bytes, write, changed=True)


def _write_folded(ckpt: GGUFCheckpoint, source: str, factor: float, qtype, fout: BinaryIO) -> None:
    fout.write(folded_bytes(ckpt, source, factor, qtype))


def _write_rotary(ckpt: GGUFCheckpoint, spec: GgufFamily, t, part: str, fout: BinaryIO) -> None:
    """`t`'s raw rows (any quant type) in deci's NORM rope order."""
    n_rows = int(np.prod(t.shape[1:])) if len(t.shape) > 1 else int(t.shape[0])
    rows = np.frombuffer(ckpt.read_raw(t.name), dtype=np.uint8).reshape(n_rows, -1)
    fout.write(spec.to_deci_rows(part, rows, ckpt.shape.n_head, ckpt.shape.n_head_kv).tobytes())


def _ffn_of(header: ScannedGGUF, layer: int) -> int:
    """The source's feed-forward length of `layer` (scalar or per-layer key)."""
    arch = header.fields["general.architecture"].contents()
    value = header.fields[f"{arch}.{FFN_LENGTH}"].contents()
    return int(value[layer] if isinstance(value, list) else value)


def _split_tensor(ckpt: GGUFCheckpoint, spec: GgufFamily, t, pieces, layer: int, new_index: dict[int, int]):
    """The row blocks of a fused source tensor as separate output tensors (raw rows: any quant type), q/k
    rows put in deci's NORM rope order."""
    ne = [int(n) for n in t.shape]
    n_rows = int(np.prod(ne[1:])) if len(ne) > 1 else ne[0]  # a bias: one "row" per element
    row_bytes = int(t.n_bytes) // n_rows
    s = ckpt.shape
    for name, rows, part in pieces:
        count = rows.stop - rows.start

        def write(fout, rows=rows, part=part):
            raw = np.frombuffer(ckpt.read_raw(t.name), dtype=np.uint8).reshape(n_rows, -1)[rows]
            if part is not None:
                raw = spec.to_deci_rows(part, raw, s.n_head, s.n_head_kv)
            fout.write(np.ascontiguousarray(raw).tobytes())

        out_ne = [ne[0], count] if len(ne) > 1 else [count]
        yield _OutTensor(renamed(name, layer, new_index), out_ne, t.tensor_type, count * row_bytes, write)


def _tied_output(ckpt: GGUFCheckpoint, header: ScannedGGUF, scales: dict[str, float], exact: bool):
    """An LM head of its own when the source ties it to the embedding table and the two are scaled
    differently (granite's embedding multiplier and logit scale)."""
    embed, output = gguf_tensor(MT.TOKEN_EMBD), gguf_tensor(MT.OUTPUT)
    stored = {t.name: t for t in header.tensors}
    if output in stored or output not in scales or embed not in stored:
        return
    t = stored[embed]
    ne = [int(n) for n in t.shape]
    qtype = folded_type(t.tensor_type, ne[0], exact)
    yield _OutTensor(
        output,
        ne,
        qtype,
        folded_nbytes(qtype, ne),
        lambda f: f.write(folded_bytes(ckpt, embed, scales[output], qtype)),
        changed=True,
    )


def _zero_linear_tensors(ckpt: GGUFCheckpoint, header: ScannedGGUF, plan: Plan, new_index, exact: bool):
    """The ``attn_norm`` (ones) and all-zero ``attn_output`` of a zero linear first layer (`deci_plan`) whose
    source layer has none: a deci source's attention-free layer that becomes the first written layer."""
    lp = next(lp for lp in plan.layers if lp.action is not LayerAction.DROP_BLOCK)
    if lp.action is not LayerAction.LINEARIZE or lp.alpha != 0.0 or lp.layer not in ckpt.fixed_layers:
        return
    d, stored = ckpt.shape.d_model, {t.name for t in header.tensors}
    norm, out = (ckpt.arch.gguf_tensors[part].format(i=lp.layer) for part in ("norm", "o"))
    i = new_index[lp.layer]
    if norm not in stored:
        ones = np.ones(d, dtype=np.float32).tobytes()
        name = renamed(norm, lp.layer, new_index)
        yield _OutTensor(name, [d], gguf.GGMLQuantizationType.F32, 4 * d, lambda f: f.write(ones), True)
    if out not in stored:
        qtype = (
            gguf.GGMLQuantizationType.F32 if exact else fused_type(gguf.GGMLQuantizationType.F16, d, exact)
        )
        n = fused_nbytes(qtype, d)
        yield _OutTensor(
            f"{BLOCK}.{i}.{out.split('.', 2)[2]}", [d, d], qtype, n, lambda f: f.write(b"\0" * n), True
        )


def _zero_ffn_tensors(index: int, d: int):
    """The FFN of a healed block written as layer `index`: ``ffn_norm`` ones, ``ffn_gate`` / ``ffn_up`` /
    ``ffn_down`` all-zero F32 of width `HEALED_BLOCK_FFN` (``down(silu(0) * 0) = 0``: the layer adds exactly
    its linear attention)."""
    f32, n = gguf.GGMLQuantizationType.F32, HEALED_BLOCK_FFN
    ones = np.ones(d, dtype="<f4").tobytes()
    yield _OutTensor(gguf_tensor(MT.FFN_NORM).format(i=index), [d], f32, 4 * d, lambda f: f.write(ones), True)
    zeros = b"\0" * (4 * d * n)
    for tensor, ne in ((MT.FFN_GATE, [d, n]), (MT.FFN_UP, [d, n]), (MT.FFN_DOWN, [n, d])):
        name = gguf_tensor(tensor).format(i=index)
        yield _OutTensor(name, ne, f32, len(zeros), lambda f: f.write(zeros), True)


def _hosted_tensors(ckpt: GGUFCheckpoint, header: ScannedGGUF, host, new_index: dict[int, int], src_fd: int):
    """The output tensors of a `gguf_layout.HostLayout`: kernel copies, rows of a source tensor (all-zero
    rows where the layout says -1), new F32 tensors."""
    sources = {t.name: t for t in header.tensors}
    for ht in host.tensors:
        layer = layer_of(ht.name)
        name = ht.name if layer is None else renamed(ht.name, layer, new_index)
        if ht.values is not None:
            data = np.ascontiguousarray(ht.values, dtype="<f4").tobytes()
            ne = [int(n) for n in reversed(ht.values.shape)]
            yield _OutTensor(
                name, ne, gguf.GGMLQuantizationType.F32, len(data), lambda f, data=data: f.write(data), True
            )
            continue
        t = sources[ht.source]
        if ht.rows is None:
            yield _OutTensor(
                name,
                [int(n) for n in t.shape],
                t.tensor_type,
                t.n_bytes,
                lambda fout, t=t: _copy_bytes(src_fd, t.data_offset, t.n_bytes, fout),
            )
            continue
        row_bytes = t.n_bytes // int(np.prod(t.shape[1:]))

        def write(fout, t=t, rows=ht.rows, row_bytes=row_bytes):
            src = np.frombuffer(ckpt.read_raw(t.name), dtype=np.uint8).reshape(-1, row_bytes)
            zero = np.zeros(row_bytes, dtype=np.uint8)  # 0 in every ggml type (block scales 0)
            fout.write(b"".join((src[r] if r >= 0 else zero).tobytes() for r in rows))

        yield _OutTensor(
            name, [int(t.shape[0]), len(ht.rows)], t.tensor_type, row_bytes * len(ht.rows), write
        )


def prune_gguf(ckpt: GGUFCheckpoint, plan: Plan, out: Path, fused_exact: bool = False) -> None:
    """Write `ckpt` pruned by `plan` as a ``deci`` GGUF at `out`.

    Kept tensors are copied byte for byte by the kernel, one at a time; only the q/k rows of architectures
    whose GGUF stores NEOX rope order are reordered (as raw rows, so quantized tensors stay as they are).
    A linearized layer's fused ``attn_output`` is computed when written: F32 with `fused_exact` (a
    quantizer runs next), else as `fused_type` says (float and Q8_0 sources' type, else Q8_0); a repaired
    layer's likewise (`repair_type`; `repaired_outputs` names them for the quantizer, which keeps them at
    Q8_0 or better).
    """
    check_deci_plan(ckpt, plan)
    header = ckpt.reader if isinstance(ckpt.reader, ScannedGGUF) else ScannedGGUF(ckpt.path)
    own_keys, factors, host = {}, {}, None
    spec = gguf_family(ckpt.arch)
    if keeps_source_architecture(spec, plan):
        written, target = plan, header.fields["general.architecture"].contents()
        kept = [lp.layer for lp in plan.layers if lp.action is not LayerAction.DROP_BLOCK]
        own_keys, factors = spec.own_arch_rewrite(header.fields, kept)
    elif (host := spec.host_layout(header, plan)) is not None:
        written, target, own_keys = plan, host.arch, host.keys
    else:
        written, target = deci_plan(plan), DECI
    if host is not None and plan.recovery is not None:
        raise GatenormError(f"cannot export a recovered plan of {ckpt.arch.name} to GGUF yet (host layout)")
    align = header.alignment
    with _open_for_writing(out) as fout, open(ckpt.path, "rb") as src:
        if host is not None:
            tensors = list(_hosted_tensors(ckpt, header, host, written_layers(plan), src.fileno()))
        else:
            tensors = list(
                _output_tensors(ckpt, header, written, src.fileno(), fused_exact, target == DECI, factors)
            )
        changed = [t.name for t in tensors if t.changed]
        kv = deci_metadata(header, ckpt.shape, plan, written, target, own_keys, changed)
        infos, offset = [], 0
        for t in tensors:
            infos.append(encode_tensor_info(t.name, t.ne, t.ggml_type, offset))
            offset += -(-t.n_bytes // align) * align
        fout.write(struct.pack("<IIQQ", gguf.GGUF_MAGIC, gguf.GGUF_VERSION, len(tensors), len(kv)))
        fout.write(b"".join(kv))
        fout.write(b"".join(infos))
        for t in tensors:
            fout.write(b"\0" * (-fout.tell() % align))
            start = fout.tell()
            t.write(fout)
            if fout.tell() - start != t.n_bytes:
                raise GatenormError(
                    f"internal error: wrote {fout.tell() - start} bytes of {t.name}, not {t.n_bytes}"
                )
        fout.write(b"\0" * (-fout.tell() % align))


def _open_for_writing(path: Path) -> BinaryIO:
    """`path` opened for writing from byte 0, without O_TRUNC on an existing empty file.

    ext4 flushes a file on close when it was truncated to zero on open (its "replace via truncate"
    safeguard), which costs about half a plain copy on a 7B file; the temporary file `atomic_path` made is
    empty already, so it is opened as is.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    if os.fstat(fd).st_size:
        os.ftruncate(fd, 0)
    return os.fdopen(fd, "wb")


def _copy_bytes(src_fd: int, offset: int, n_bytes: int, fout: BinaryIO) -> None:
    """Append `n_bytes` of the source file at `offset` to `fout`, copied by the kernel.

    The bytes never pass through Python: no page of the tensor is mapped or buffered here.
    """
    fout.flush()
    dst_fd = fout.fileno()
    while n_bytes:
        try:
            copied = os.copy_file_range(src_fd, dst_fd, n_bytes, offset)
        except OSError as e:
            if e.errno not in _NO_KERNEL_COPY:
                raise
            copied = _plain_copy(src_fd, offset, n_bytes, fout)
        if copied == 0:
            raise GatenormError(f"source GGUF ended early while copying tensor bytes at {offset}")
        offset += copied
        n_bytes -= copied
    fout.seek(0, os.SEEK_END)


#: copy_file_range cannot copy here (another file system, an old kernel, a file system without it).
_NO_KERNEL_COPY = frozenset({errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL})


def _plain_copy(src_fd: int, offset: int, n_bytes: int, fout: BinaryIO, chunk: int = 16 * 2**20) -> int:
    """Copy up to `n_bytes` at `offset` through a buffer; the bytes copied (0 at the end of the source)."""
    done = 0
    while done < n_bytes:
        data = os.pread(src_fd, min(chunk, n_bytes - done), offset + done)
        if not data:
            break
        fout.write(data)
        done += len(data)
    fout.flush()
    return done


def repaired_outputs(plan: Plan) -> list[str]:
    """The written names of the tensors a healed plan fitted (the repaired layers' ``attn_output``, the
    refitted ``ffn_down``) in the ``deci`` file of `plan`."""
    index = written_layers(deci_plan(plan)) if plan.changed else {}
    return [gguf_tensor(MT.ATTN_OUT).format(i=index[i]) for i in plan.repaired] + [
        gguf_tensor(MT.FFN_DOWN).format(i=index[i]) for i in plan.refitted
    ]
