"""Lazy reader of GGUF files: the checked header scan, tensor bytes by positional reads, one at a time."""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import torch

from gatenorm.architectures import get_architecture
from gatenorm.errors import GatenormError
from gatenorm.readers.base import Checkpoint, ModelShape
from gatenorm.readers.dequant import dequantize
from gatenorm.readers.gguf_check import GGUF_MAGIC, ScannedGGUF, check_gguf, check_gguf_tensors, check_hparams

_TORCH_DTYPES = {
    gguf.GGMLQuantizationType.F32: torch.float32,
    gguf.GGMLQuantizationType.F16: torch.float16,
    gguf.GGMLQuantizationType.BF16: torch.bfloat16,
}


def is_gguf(path: Path) -> bool:
    """True when `path` is a file that starts with the GGUF magic."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def open_gguf_reader(path: Path) -> gguf.GGUFReader:
    """gguf-py's reader for `path`, handed the file only once `check_gguf` passed it."""
    check_gguf(path)
    try:
        return gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError) as e:
        raise GatenormError(f"corrupt or truncated GGUF {path}: {e}") from None


def field_value(reader: ScannedGGUF | gguf.GGUFReader, key: str, default=None):
    """Value of metadata `key` (scalar, string or list), or `default` when absent."""
    f = reader.fields.get(key)
    return default if f is None else f.contents()


class GGUFCheckpoint(Checkpoint):
    """A GGUF file; q/k rows are returned in HF order whatever llama.cpp's converter did to them."""

    format = "gguf"

    def __init__(self, path: Path):
        self.path = path
        self.reader = self._open_reader(path)
        arch_name = check_hparams(self.reader)
        self.arch = get_architecture(arch_name)
        self.shape = self._shape(arch_name)
        self.fixed_layers = self.arch.gguf_fixed_layers(self.reader.fields)
        self.tensors = {t.name: t for t in self.reader.tensors}
        check_gguf_tensors(self)

    def _open_reader(self, path: Path) -> ScannedGGUF:
        """The checked metadata/tensor-table scan (gguf-py's reader is never handed an unchecked file)."""
        return ScannedGGUF(path)

    def _shape(self, prefix: str) -> ModelShape:
        def key(name: str, default=None):
            value = field_value(self.reader, f"{prefix}.{name}", default)
            if value is None:
                raise GatenormError(f"GGUF {self.path} lacks {prefix}.{name}")
            if isinstance(value, list):
                raise GatenormError(f"GGUF {self.path}: per-layer {prefix}.{name} is not supported here")
            return int(value)

        counts = self.arch.gguf_head_counts(self.reader.fields, self.path)  # per-layer arrays (deci)
        d_model = key("embedding_length")
        n_head, n_head_kv = counts or (key("attention.head_count"), None)
        try:
            return ModelShape(
                architecture=self.arch.name,
                n_layers=key("block_count"),
                d_model=d_model,
                n_head=n_head,
                n_head_kv=n_head_kv or key("attention.head_count_kv", n_head),
                head_dim=key("attention.key_length", d_model // n_head),
            )
        except GatenormError as e:
            raise GatenormError(f"GGUF {self.path}: {e}") from None

    def tensor_name(self, part: str, layer: int) -> str:
        return self.arch.gguf_tensors[part].format(i=layer)

    def has_tensor(self, name: str) -> bool:
        return name in self.tensors

    def read_raw(self, name: str) -> memoryview:
        t = self.tensors.get(name)
        if t is None:
            raise GatenormError(f"GGUF {self.path} has no tensor {name}")
        return self._pread(name, int(t.data_offset), int(t.n_bytes))

    def _pread(self, name: str, offset: int, n_bytes: int) -> memoryview:
        buf = bytearray(n_bytes)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            got = os.preadv(fd, [buf], offset)
        finally:
            os.close(fd)
        if got != n_bytes:
            raise GatenormError(f"truncated GGUF {self.path}: short read of {name}")
        return memoryview(buf)

    def rows(self, name: str) -> int:
        t = self.tensors[name]
        return int(np.prod(t.shape[1:]))

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        t = self.tensors[name]
        rows = self.rows(name)
        start, stop = max(start, 0), min(stop, rows)
        row_bytes = int(t.n_bytes) // rows
        buf = self._pread(name, int(t.data_offset) + start * row_bytes, (stop - start) * row_bytes)
        return _decode(buf, t.tensor_type, stop - start, int(t.shape[0]))

    def _read(self, name: str) -> tuple[memoryview, torch.Tensor]:
        buf = self.read_raw(name)
        t = self.tensors[name]
        return buf, _decode(buf, t.tensor_type, int(np.prod(t.shape[1:])), int(t.shape[0]))

    def _to_hf_layout(self, part: str, weight: torch.Tensor) -> torch.Tensor:
        s = self.shape
        return self.arch.gguf_to_hf_rows(part, weight, s.n_head, s.n_head_kv)


def _decode(buf: memoryview, tensor_type: int, rows: int, cols: int) -> torch.Tensor:
    """float32 [rows, cols] of a GGUF tensor's stored bytes (whole rows)."""
    qtype = gguf.GGMLQuantizationType(tensor_type)
    dtype = _TORCH_DTYPES.get(qtype)
    if dtype is not None:
        return torch.frombuffer(buf, dtype=dtype).view(rows, cols).float()
    return torch.from_numpy(dequantize(np.frombuffer(buf, dtype=np.uint8), qtype, rows, cols))
