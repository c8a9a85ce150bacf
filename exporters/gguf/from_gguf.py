"""GGUF in -> pruned GGUF out: rewrite a model as llama.cpp's ``deci`` architecture, tensor by tensor.

``deci`` reads per-layer ``attention.head_count`` / ``head_count_kv`` / ``feed_forward_length`` arrays
(llama.cpp ``src/models/deci.cpp``). Each plan action is one per-layer setting:

- keep: the source's head counts, every tensor;
- drop-attention: 0 heads, so no attention and no KV cache (``h + ffn(ffn_norm(h))``), attention tensors
  (``attn_norm`` included) omitted;
- linearize: 0 KV heads, "linear attention" ``h + attn_output @ attn_norm(h)``, with ``attn_output`` the
  fused HARP matrix (`exporters.gguf.linearize`) and q/k/v omitted; no KV cache;
- drop-block: the layer is not written at all; later layers are renumbered and ``block_count`` shrinks.

llama.cpp rejects extra tensors, so omitted means absent. Every other tensor's bytes and every metadata
value (tokenizer, chat template) are copied unchanged, apart from the ``{arch}.*`` -> ``deci.*`` rename.
The ``gatenorm.*`` keys keep the plan with its source layer numbers.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import gguf
import numpy as np

from exporters.gguf.header import ScannedGGUF, encode_kv, encode_raw_kv, encode_tensor_info
from exporters.gguf.linearize import fused_nbytes, fused_type, fused_value_output_bytes
from exporters.gguf.metadata import plan_metadata, pruned_name
from exporters.keys import Keys
from gatenorm.architectures import Architecture, gguf_tensor
from gatenorm.errors import GatenormError
from gatenorm.plan import LayerAction, Plan
from gatenorm.readers import Checkpoint
from gatenorm.readers.base import ModelShape
from gatenorm.readers.gguf_file import GGUFCheckpoint

DECI = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.DECI]
#: Keys that become per-layer arrays in ``deci``.
HEAD_COUNT, HEAD_COUNT_KV = "attention.head_count", "attention.head_count_kv"
FFN_LENGTH = "feed_forward_length"
BLOCK_COUNT = "block_count"
#: First component of every per-layer GGUF tensor name (``blk.{i}.attn_q.weight``).
BLOCK = "blk"


def keeps_source_architecture(arch: type[Architecture], plan: Plan) -> bool:
    """Whether the export is written as the source's own architecture rather than ``deci``: a plan that
    changes no layer (quantize or copy), or drop-block only on a family ``deci`` cannot run."""
    if not plan.changed:
        return True
    return not arch.deci_exportable and plan.actions <= {LayerAction.KEEP, LayerAction.DROP_BLOCK}


def check_deci_plan(ckpt: Checkpoint, plan: Plan) -> None:
    """Refuse, with one line naming the family, the action, the reason and what works, the plans that stock
    llama.cpp could not run as written."""
    arch = ckpt.arch
    if not plan.changed:
        return
    if LayerAction.KEEP not in plan.actions:
        raise GatenormError(
            f"cannot export a plan that keeps no attention of this {arch.name} model to GGUF: llama.cpp "
            "creates no context without a KV cache; keep at least one layer's attention"
        )
    if not arch.deci_exportable:
        actions = sorted(a.value for a in plan.actions - {LayerAction.KEEP})
        if actions == [LayerAction.DROP_BLOCK.value] and arch.gguf_block_removal:
            arch.check_block_removal(
                [lp.layer for lp in plan.layers if lp.action is not LayerAction.DROP_BLOCK]
            )
            return
        raise GatenormError(
            f"cannot export {arch.name} with {', '.join(actions)} to GGUF: {arch.deci_refusal}; what works: "
            f"{arch.gguf_works}"
        )
    biased = [i for i in plan.linearized if ckpt.has_attention_bias(i, ("v", "o"))]
    if biased:
        raise GatenormError(
            f"cannot linearize layers {biased} of this {arch.name} model in GGUF: llama.cpp's deci linear "
            "attention adds no bias, and these layers have v/o biases (use drop-attention or ONNX)"
        )


def deci_plan(plan: Plan) -> Plan:
    """The plan as the ``deci`` file writes it: a dropped attention in the first written layer becomes
    linear attention with an all-zero ``attn_output`` (alpha 0: ``h + 0 @ attn_norm(h)``, exactly the
    dropped attention), since llama.cpp reads the head size from the first layer."""
    first = next(lp for lp in plan.layers if lp.action is not LayerAction.DROP_BLOCK)
    if first.action is not LayerAction.DROP_ATTENTION:
        return plan
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
    """Source layer -> layer index in the written file: dropped blocks are left out, later ones move up."""
    kept = [lp.layer for lp in plan.layers if lp.action is not LayerAction.DROP_BLOCK]
    return {layer: i for i, layer in enumerate(kept)}


def removed_tensor_names(arch: type[Architecture], plan: Plan) -> set[str]:
    """Attention tensors (weights and biases) that the plan removes from the layers it writes.

    A linearized layer keeps ``attn_norm`` and ``attn_output`` (with new contents); dropped blocks lose
    every tensor and are not listed here.
    """
    removed = set()
    for lp in plan.layers:
        i = lp.layer
        if lp.action is LayerAction.DROP_ATTENTION:
            weights = [gguf_tensor(t).format(i=i) for t in arch.gguf_attention_sublayer]
        elif lp.action is LayerAction.LINEARIZE:
            weights = [arch.gguf_tensors[part].format(i=i) for part in ("q", "k", "v")]
        else:
            continue
        removed |= {w.removesuffix("weight") + suffix for w in weights for suffix in ("weight", "bias")}
    return removed


def deci_layer_hparams(plan: Plan, shape: ModelShape, ffn: int) -> dict[str, list[int]]:
    """The per-layer ``deci`` arrays (head_count, head_count_kv, feed_forward_length) of the written layers.

    Dropped blocks are not written at all (`written_layers`): deci's own identity layer (0 heads, 0
    feed-forward length) aborts llama.cpp (``GGML_ASSERT(buffer)``) when it is the last layer.
    """
    per_action = {
        LayerAction.KEEP: (shape.n_head, shape.n_head_kv, ffn),
        LayerAction.DROP_ATTENTION: (0, 0, ffn),
        LayerAction.LINEARIZE: (shape.n_head, 0, ffn),
    }
    rows = [per_action[lp.action] for lp in plan.layers if lp.action is not LayerAction.DROP_BLOCK]
    return {key: [row[k] for row in rows] for k, key in enumerate((HEAD_COUNT, HEAD_COUNT_KV, FFN_LENGTH))}


def rotary_tensor_parts(arch: type[Architecture], n_layers: int) -> dict[str, str]:
    """GGUF name -> 'q' / 'k' for every q/k weight and bias, the tensors whose rows carry rope order."""
    parts = {}
    for i in range(n_layers):
        for part in ("q", "k"):
            weight = arch.gguf_tensors[part].format(i=i)
            parts[weight] = part
            parts[weight.removesuffix(".weight") + ".bias"] = part
    return parts


def deci_metadata(
    header: ScannedGGUF, shape: ModelShape, plan: Plan, written: Plan | None = None, target: str = DECI
) -> list[bytes]:
    """The encoded key/value pairs of the pruned file: the source's, renamed to `target`, plus per-layer
    (``deci`` only: `written` is the plan as written, `deci_plan`) and plan keys."""
    t = gguf.GGUFValueType
    source_arch = header.fields["general.architecture"].contents()
    prefix = f"{source_arch}."
    ffn_field = header.fields.get(prefix + FFN_LENGTH)
    ffn = ffn_field.contents() if ffn_field else None
    if target == DECI and (not isinstance(ffn, int) or ffn <= 0):
        raise GatenormError(f"GGUF {header.path} has no usable {prefix}{FFN_LENGTH}")
    per_layer = deci_layer_hparams(written or plan, shape, ffn) if target == DECI else {}
    n_written = len(written_layers(plan))
    name = header.fields.get("general.name")
    kv = [
        encode_kv("general.architecture", target, t.STRING),
        encode_kv("general.name", pruned_name(name.contents() if name else None, plan), t.STRING),
    ]
    for key, field in header.fields.items():
        if key in ("general.architecture", "general.name") or key.startswith(Keys.PREFIX):
            continue
        if key.startswith(prefix):
            key = f"{target}.{key.removeprefix(prefix)}"
            if (suffix := key.removeprefix(f"{target}.")) in per_layer:
                kv.append(encode_kv(key, per_layer.pop(suffix), t.ARRAY, t.INT32))
                continue
            if suffix == BLOCK_COUNT:
                kv.append(encode_kv(key, n_written, field.types[0]))
                continue
        kv.append(encode_raw_kv(key, field.raw_value))
    for suffix, values in per_layer.items():  # head_count_kv may be implicit in the source
        kv.append(encode_kv(f"{target}.{suffix}", values, t.ARRAY, t.INT32))
    kv += [encode_kv(key, value, vtype, sub) for key, (value, vtype, sub) in plan_metadata(plan).items()]
    return kv


@dataclass(frozen=True)
class _OutTensor:
    """One tensor of the output file: its info, and how its bytes get written."""

    name: str
    ne: list[int]
    ggml_type: gguf.GGMLQuantizationType
    n_bytes: int
    write: Callable[[BinaryIO], None]


def _output_tensors(
    ckpt: GGUFCheckpoint, header: ScannedGGUF, plan: Plan, src_fd: int, exact: bool, to_deci: bool = True
):
    """The output tensors in source order: kernel copies, reordered q/k rows, fused linear attention."""
    arch, shape = ckpt.arch, ckpt.shape
    removed = removed_tensor_names(arch, plan)
    new_index = written_layers(plan)
    # q/k rows move only where the source GGUF keeps NEOX order and deci is written; elsewhere every
    # tensor is a kernel copy
    rotary = {} if arch.gguf_qk_permuted or not to_deci else rotary_tensor_parts(arch, shape.n_layers)
    fused = {
        arch.gguf_tensors["o"].format(i=lp.layer): lp
        for lp in plan.layers
        if lp.action is LayerAction.LINEARIZE
    }
    d = shape.d_model
    for t in header.tensors:
        layer = layer_of(t.name)
        if t.name in removed or (layer is not None and layer not in new_index):
            continue
        name = t.name if layer is None else renamed(t.name, layer, new_index)
        ne = [int(n) for n in t.shape]
        if t.name in fused:
            lp, qtype = fused[t.name], fused_type(t.tensor_type, d, exact)

            def write(fout, lp=lp, qtype=qtype):
                fout.write(fused_value_output_bytes(ckpt, lp.layer, lp.alpha, qtype))

            yield _OutTensor(name, [d, d], qtype, fused_nbytes(qtype, d), write)
        elif (part := rotary.get(t.name)) is not None:

            def write(fout, t=t, part=part):
                n_rows = int(np.prod(t.shape[1:])) if len(t.shape) > 1 else int(t.shape[0])
                rows = np.frombuffer(ckpt.read_raw(t.name), dtype=np.uint8).reshape(n_rows, -1)
                fout.write(arch.gguf_to_deci_rows(part, rows, shape.n_head, shape.n_head_kv).tobytes())

            yield _OutTensor(name, ne, t.tensor_type, t.n_bytes, write)
        else:
            yield _OutTensor(
                name,
                ne,
                t.tensor_type,
                t.n_bytes,
                lambda fout, t=t: _copy_bytes(src_fd, t.data_offset, t.n_bytes, fout),
            )


def prune_gguf(ckpt: GGUFCheckpoint, plan: Plan, out: Path, fused_exact: bool = False) -> None:
    """Write `ckpt` pruned by `plan` as a ``deci`` GGUF at `out`.

    Kept tensors are copied byte for byte by the kernel, one at a time; only the q/k rows of architectures
    whose GGUF stores NEOX rope order are reordered (as raw rows, so quantized tensors stay as they are).
    A linearized layer's fused ``attn_output`` is computed when written: F32 with `fused_exact` (a
    quantizer runs next), else as `fused_type` says (float and Q8_0 sources' type, else Q8_0).
    """
    check_deci_plan(ckpt, plan)
    header = ckpt.reader if isinstance(ckpt.reader, ScannedGGUF) else ScannedGGUF(ckpt.path)
    if keeps_source_architecture(ckpt.arch, plan):
        written, target = plan, header.fields["general.architecture"].contents()
    else:
        written, target = deci_plan(plan), DECI
    kv = deci_metadata(header, ckpt.shape, plan, written, target)
    align = header.alignment
    with _open_for_writing(out) as fout, open(ckpt.path, "rb") as src:
        tensors = list(_output_tensors(ckpt, header, written, src.fileno(), fused_exact, target == DECI))
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
