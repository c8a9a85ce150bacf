"""GGUF in -> pruned GGUF out: rewrite a model as llama.cpp's ``deci`` architecture, tensor by tensor.

``deci`` reads per-layer ``attention.head_count`` / ``head_count_kv`` arrays; a layer with 0 heads has no
attention and no KV cache (``h + ffn(ffn_norm(h))``). So the dropped layers get 0 heads and lose their
attention tensors (llama.cpp rejects extra tensors); every other tensor's bytes and every metadata key
(tokenizer, chat template) are copied unchanged, apart from the ``{arch}.*`` -> ``deci.*`` rename.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

import gguf
import numpy as np

from exporters.gguf.metadata import plan_metadata, pruned_name
from gatenorm.architectures import Architecture
from gatenorm.errors import GatenormError
from gatenorm.plan import Plan
from gatenorm.readers.gguf_file import GGUFCheckpoint, field_value

DECI = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.DECI]
#: Keys that become per-layer arrays in ``deci``; the first two are 0 on a layer without attention.
HEAD_COUNT, HEAD_COUNT_KV = "attention.head_count", "attention.head_count_kv"
FFN_LENGTH = "feed_forward_length"


def check_deci_plan(arch: type[Architecture], plan: Plan) -> None:
    """Refuse, with one clear line, plans that llama.cpp could not run as a ``deci`` GGUF."""
    if not arch.deci_exportable:
        raise GatenormError(f"cannot export {arch.name} to GGUF: {arch.deci_refusal}")
    if 0 in plan.dropped:
        raise GatenormError(
            "the plan drops layer 0's attention, which a GGUF export cannot do: llama.cpp reads the head "
            "size from layer 0 (make the plan without --allow-first-layer)"
        )


def dropped_tensor_names(arch: type[Architecture], dropped: list[int]) -> set[str]:
    """Names of the attention-sublayer tensors (weights and biases) of the `dropped` layers."""
    return {
        f"blk.{i}.{part}.{suffix}"
        for i in dropped
        for part in arch.gguf_attention_sublayer
        for suffix in ("weight", "bias")
    }


def rotary_tensor_parts(arch: type[Architecture], n_layers: int) -> dict[str, str]:
    """GGUF name -> 'q' / 'k' for every q/k weight and bias, the tensors whose rows carry rope order."""
    parts = {}
    for i in range(n_layers):
        for part in ("q", "k"):
            weight = arch.gguf_tensors[part].format(i=i)
            parts[weight] = part
            parts[weight.removesuffix(".weight") + ".bias"] = part
    return parts


def _metadata(ckpt: GGUFCheckpoint, plan: Plan, writer: gguf.GGUFWriter) -> None:
    reader, shape = ckpt.reader, ckpt.shape
    prefix = f"{field_value(reader, 'general.architecture')}."
    dropped = set(plan.dropped)
    ffn = field_value(reader, prefix + FFN_LENGTH)
    if not isinstance(ffn, int) or ffn <= 0:
        raise GatenormError(f"GGUF {ckpt.path} has no usable {prefix}{FFN_LENGTH}")
    per_layer = {
        HEAD_COUNT: [0 if i in dropped else shape.n_head for i in range(shape.n_layers)],
        HEAD_COUNT_KV: [0 if i in dropped else shape.n_head_kv for i in range(shape.n_layers)],
        FFN_LENGTH: [ffn] * shape.n_layers,  # 0 on a layer that keeps attention is broken upstream
    }
    t = gguf.GGUFValueType
    writer.add_name(pruned_name(field_value(reader, "general.name"), plan))
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.name"):
            continue
        if key.startswith(prefix):
            key = f"{DECI}.{key.removeprefix(prefix)}"
            suffix = key.removeprefix(f"{DECI}.")
            if suffix in per_layer:
                writer.add_key_value(key, per_layer.pop(suffix), t.ARRAY, t.INT32)
                continue
        if key == gguf.Keys.General.ALIGNMENT:
            writer.data_alignment = int(field.contents())
        sub_type = field.types[-1] if field.types[0] == t.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type)
    for suffix, values in per_layer.items():  # head_count_kv may be implicit in the source
        writer.add_key_value(f"{DECI}.{suffix}", values, t.ARRAY, t.INT32)
    for key, (value, vtype, sub_type) in plan_metadata(plan).items():
        writer.add_key_value(key, value, vtype, sub_type)


def prune_gguf(ckpt: GGUFCheckpoint, plan: Plan, out: Path) -> None:
    """Write `ckpt` without the plan's dropped attention sublayers, as a ``deci`` GGUF at `out`.

    Kept tensors are copied byte for byte, one at a time, except the q/k rows of architectures whose GGUF
    stores NEOX rope order, which are reordered (as raw rows, so quantized tensors stay as they are).
    """
    arch, shape = ckpt.arch, ckpt.shape
    check_deci_plan(arch, plan)
    skip = dropped_tensor_names(arch, plan.dropped)
    rotary = rotary_tensor_parts(arch, shape.n_layers)
    kept = [t for t in ckpt.reader.tensors if t.name not in skip]
    writer = gguf.GGUFWriter(out, DECI)
    try:
        _metadata(ckpt, plan, writer)
        for t in kept:
            ne = [int(n) for n in t.shape]
            writer.add_tensor_info(t.name, ne[::-1], np.dtype(np.float32), int(t.n_bytes), t.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with open(ckpt.path, "rb") as src:
            (fout,) = writer.fout
            for t in kept:
                writer.write_padding(fout, fout.tell())
                part = rotary.get(t.name)
                if part is None:
                    _copy_bytes(src.fileno(), int(t.data_offset), int(t.n_bytes), fout)
                else:
                    n_rows = int(np.prod(t.shape[1:])) if len(t.shape) > 1 else int(t.shape[0])
                    rows = np.ascontiguousarray(t.data).view(np.uint8).reshape(n_rows, -1)
                    fout.write(arch.gguf_to_deci_rows(part, rows, shape.n_head, shape.n_head_kv).tobytes())
                writer.write_padding(fout, int(t.n_bytes))
    finally:
        writer.close()


def _copy_bytes(src_fd: int, offset: int, n_bytes: int, fout: BinaryIO) -> None:
    """Append `n_bytes` of the source file at `offset` to `fout`, copied by the kernel.

    The tensor data section is written like ``GGUFWriter.write_tensor_data`` lays it out (the caller
    pads), but the bytes never pass through Python: no page of the tensor is mapped or buffered here.
    """
    fout.flush()
    dst_fd = fout.fileno()
    while n_bytes:
        copied = os.copy_file_range(src_fd, dst_fd, n_bytes, offset)
        if copied == 0:
            raise GatenormError(f"source GGUF ended early while copying tensor bytes at {offset}")
        offset += copied
        n_bytes -= copied
    fout.seek(0, os.SEEK_END)
