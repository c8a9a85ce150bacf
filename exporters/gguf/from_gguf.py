"""GGUF in -> pruned GGUF out: rewrite a model as llama.cpp's ``deci`` architecture, tensor by tensor.

``deci`` reads per-layer ``attention.head_count`` / ``head_count_kv`` arrays; a layer with 0 heads has no
attention and no KV cache (``h + ffn(ffn_norm(h))``). So the dropped layers get 0 heads and lose their
attention tensors (llama.cpp rejects extra tensors); every other tensor's bytes and every metadata value
(tokenizer, chat template) are copied unchanged, apart from the ``{arch}.*`` -> ``deci.*`` rename.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import BinaryIO

import gguf
import numpy as np

from exporters.gguf.header import ScannedGGUF, encode_kv, encode_raw_kv, encode_tensor_info
from exporters.gguf.metadata import plan_metadata, pruned_name
from gatenorm.architectures import Architecture
from gatenorm.errors import GatenormError
from gatenorm.plan import Plan
from gatenorm.readers.base import ModelShape
from gatenorm.readers.gguf_file import GGUFCheckpoint

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


def deci_metadata(header: ScannedGGUF, shape: ModelShape, plan: Plan) -> list[bytes]:
    """The encoded key/value pairs of the pruned file: the source's, renamed, plus per-layer and plan keys."""
    t = gguf.GGUFValueType
    prefix = f"{header.fields['general.architecture'].contents()}."
    dropped = set(plan.dropped)
    ffn_field = header.fields.get(prefix + FFN_LENGTH)
    ffn = ffn_field.contents() if ffn_field else None
    if not isinstance(ffn, int) or ffn <= 0:
        raise GatenormError(f"GGUF {header.path} has no usable {prefix}{FFN_LENGTH}")
    per_layer = {
        HEAD_COUNT: [0 if i in dropped else shape.n_head for i in range(shape.n_layers)],
        HEAD_COUNT_KV: [0 if i in dropped else shape.n_head_kv for i in range(shape.n_layers)],
        FFN_LENGTH: [ffn] * shape.n_layers,  # 0 on a layer that keeps attention is broken upstream
    }
    name = header.fields.get("general.name")
    kv = [
        encode_kv("general.architecture", DECI, t.STRING),
        encode_kv("general.name", pruned_name(name.contents() if name else None, plan), t.STRING),
    ]
    for key, field in header.fields.items():
        if key in ("general.architecture", "general.name") or key.startswith("gatenorm."):
            continue
        if key.startswith(prefix):
            key = f"{DECI}.{key.removeprefix(prefix)}"
            if (suffix := key.removeprefix(f"{DECI}.")) in per_layer:
                kv.append(encode_kv(key, per_layer.pop(suffix), t.ARRAY, t.INT32))
                continue
        kv.append(encode_raw_kv(key, field.raw_value))
    for suffix, values in per_layer.items():  # head_count_kv may be implicit in the source
        kv.append(encode_kv(f"{DECI}.{suffix}", values, t.ARRAY, t.INT32))
    kv += [encode_kv(key, value, vtype, sub) for key, (value, vtype, sub) in plan_metadata(plan).items()]
    return kv


def prune_gguf(ckpt: GGUFCheckpoint, plan: Plan, out: Path) -> None:
    """Write `ckpt` without the plan's dropped attention sublayers, as a ``deci`` GGUF at `out`.

    Kept tensors are copied byte for byte by the kernel, one at a time; only the q/k rows of architectures
    whose GGUF stores NEOX rope order are reordered (as raw rows, so quantized tensors stay as they are).
    """
    arch, shape = ckpt.arch, ckpt.shape
    check_deci_plan(arch, plan)
    header = ckpt.reader if isinstance(ckpt.reader, ScannedGGUF) else ScannedGGUF(ckpt.path)
    skip = dropped_tensor_names(arch, plan.dropped)
    # q/k rows move only where the source GGUF keeps NEOX order; elsewhere every tensor is a kernel copy
    rotary = {} if arch.gguf_qk_permuted else rotary_tensor_parts(arch, shape.n_layers)
    kept = [t for t in header.tensors if t.name not in skip]
    kv = deci_metadata(header, shape, plan)
    align = header.alignment
    infos, offset = [], 0
    for t in kept:
        infos.append(encode_tensor_info(t.name, [int(n) for n in t.shape], t.tensor_type, offset))
        offset += -(-t.n_bytes // align) * align
    with _open_for_writing(out) as fout, open(ckpt.path, "rb") as src:
        fout.write(struct.pack("<IIQQ", gguf.GGUF_MAGIC, gguf.GGUF_VERSION, len(kept), len(kv)))
        fout.write(b"".join(kv))
        fout.write(b"".join(infos))
        for t in kept:
            fout.write(b"\0" * (-fout.tell() % align))
            part = rotary.get(t.name)
            if part is None:
                _copy_bytes(src.fileno(), t.data_offset, t.n_bytes, fout)
            else:
                n_rows = int(np.prod(t.shape[1:])) if len(t.shape) > 1 else int(t.shape[0])
                rows = np.frombuffer(ckpt.read_raw(t.name), dtype=np.uint8).reshape(n_rows, -1)
                fout.write(arch.gguf_to_deci_rows(part, rows, shape.n_head, shape.n_head_kv).tobytes())
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
        copied = os.copy_file_range(src_fd, dst_fd, n_bytes, offset)
        if copied == 0:
            raise GatenormError(f"source GGUF ended early while copying tensor bytes at {offset}")
        offset += copied
        n_bytes -= copied
    fout.seek(0, os.SEEK_END)
