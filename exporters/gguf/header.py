"""GGUF header records for the exporters: the checked scan of `gatenorm.readers.gguf_check`, and encoders.

The scan (`ScannedGGUF`) keeps each field's value bytes so the GGUF -> GGUF exporter copies them unchanged;
the encoders write new key/value pairs and tensor infos. Types, sizes and constants come from gguf-py.
"""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np

from gatenorm.readers.gguf_check import NUMPY_TYPES as _NUMPY_TYPES
from gatenorm.readers.gguf_check import SCALAR_FORMATS as _SCALAR_FORMATS
from gatenorm.readers.gguf_check import ScannedField, ScannedGGUF, ScannedTensor
from gatenorm.readers.gguf_file import GGUFCheckpoint

__all__ = ["ScannedField", "ScannedGGUF", "ScannedGGUFCheckpoint", "ScannedTensor", "encode_kv"]

T = gguf.GGUFValueType


def encode_kv(
    key: str, value, vtype: gguf.GGUFValueType, sub_type: gguf.GGUFValueType | None = None
) -> bytes:
    """A metadata key/value pair as GGUF stores it (little endian)."""
    return _encode_string(key) + struct.pack("<I", vtype) + _encode_value(value, vtype, sub_type)


def encode_raw_kv(key: str, raw_value: bytes) -> bytes:
    """A key/value pair whose value (type tag onwards) is copied as stored, e.g. under a new key."""
    return _encode_string(key) + raw_value


def _encode_string(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def _encode_value(value, vtype: gguf.GGUFValueType, sub_type: gguf.GGUFValueType | None) -> bytes:
    if vtype in _SCALAR_FORMATS:
        return struct.pack("<" + _SCALAR_FORMATS[vtype], value)
    if vtype is T.STRING:
        return _encode_string(value)
    if sub_type in _NUMPY_TYPES:
        items = np.asarray(value, dtype=np.dtype(_NUMPY_TYPES[sub_type]).newbyteorder("<"))
        return struct.pack("<IQ", sub_type, len(value)) + items.tobytes()
    return struct.pack("<IQ", sub_type, len(value)) + b"".join(
        _encode_value(v, sub_type, None) for v in value
    )


def encode_tensor_info(name: str, ne: list[int], ggml_type: gguf.GGMLQuantizationType, offset: int) -> bytes:
    """A tensor info record: name, dimensions in ggml order, type, offset within the data section."""
    return _encode_string(name) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, ggml_type, offset)


class ScannedGGUFCheckpoint(GGUFCheckpoint):
    """A `GGUFCheckpoint` (which reads its header with `ScannedGGUF`: no token decoding)."""

    reader: ScannedGGUF

    def _open_reader(self, path: Path) -> ScannedGGUF:
        return ScannedGGUF(path)
