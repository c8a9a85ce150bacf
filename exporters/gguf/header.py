"""A fast GGUF header scanner: where each metadata field and tensor lies, without decoding token arrays.

gguf-py's ``GGUFReader`` builds a numpy view per array item (about 2 s for SmolLM2's 100k tokenizer
strings, 50 times a plain copy of the file), so the GGUF -> GGUF exporter scans the header with `struct`
instead: numeric arrays are skipped in one step, string arrays by their lengths, and each field keeps the
byte span of its value so it can be copied to the output unchanged. The scanned file plugs into
`GGUFCheckpoint` through the same ``fields`` / ``tensors`` interface the checkpoint reads from
``GGUFReader``. Types, sizes and constants come from gguf-py.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from gatenorm.errors import GatenormError
from gatenorm.readers.gguf_file import GGUFCheckpoint, is_gguf

T = gguf.GGUFValueType
_SCALAR_FORMATS = {
    T.UINT8: "B",
    T.INT8: "b",
    T.UINT16: "H",
    T.INT16: "h",
    T.UINT32: "I",
    T.INT32: "i",
    T.FLOAT32: "f",
    T.UINT64: "Q",
    T.INT64: "q",
    T.FLOAT64: "d",
    T.BOOL: "?",
}
_NUMPY_TYPES = {
    T.UINT8: np.uint8,
    T.INT8: np.int8,
    T.UINT16: np.uint16,
    T.INT16: np.int16,
    T.UINT32: np.uint32,
    T.INT32: np.int32,
    T.FLOAT32: np.float32,
    T.UINT64: np.uint64,
    T.INT64: np.int64,
    T.FLOAT64: np.float64,
    T.BOOL: np.bool_,
}


@dataclass
class ScannedField:
    """One metadata key: its types and the bytes of its value (type tag onwards) in the file."""

    name: str
    types: list[gguf.GGUFValueType]
    raw_value: bytes  # type tag + value, exactly as stored

    def contents(self):
        """The decoded value, like ``ReaderField.contents()`` (strings decoded, arrays as lists)."""
        value, _ = _decode(self.raw_value, 4, self.types[0])
        return value


@dataclass
class ScannedTensor:
    """One tensor's info, with the attribute names of gguf-py's ``ReaderTensor`` that readers use."""

    name: str
    shape: np.ndarray  # ggml order (ne0 first)
    tensor_type: gguf.GGMLQuantizationType
    n_elements: int
    n_bytes: int
    data_offset: int  # absolute, in the file


class ScannedGGUF:
    """The header of a GGUF file: ``fields`` (key -> ScannedField) and ``tensors`` in file order."""

    def __init__(self, path: Path):
        if not is_gguf(path):
            raise GatenormError(f"not a GGUF file (bad magic): {path}")
        self.path = path
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            try:
                self._scan(buf, path.stat().st_size)
            except (struct.error, ValueError, IndexError, UnicodeDecodeError) as e:
                raise GatenormError(f"corrupt or truncated GGUF {path}: {e}") from None

    def _scan(self, buf: mmap.mmap, size: int) -> None:
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise GatenormError(f"unsupported GGUF version {version} in {self.path}")
        off = 24
        self.fields: dict[str, ScannedField] = {}
        for _ in range(n_kv):
            key, off = _read_string(buf, off)
            vtype = T(struct.unpack_from("<I", buf, off)[0])
            types = [vtype]
            if vtype is T.ARRAY:
                types.append(T(struct.unpack_from("<I", buf, off + 4)[0]))
            end = _skip_value(buf, off + 4, vtype)
            self.fields[key] = ScannedField(key, types, bytes(buf[off:end]))
            off = end
        infos = []
        for _ in range(n_tensors):
            name, off = _read_string(buf, off)
            (n_dims,) = struct.unpack_from("<I", buf, off)
            dims = struct.unpack_from(f"<{n_dims}Q", buf, off + 4)
            ggml_type, rel = struct.unpack_from("<IQ", buf, off + 4 + 8 * n_dims)
            off += 4 + 8 * n_dims + 12
            infos.append((name, dims, gguf.GGMLQuantizationType(ggml_type), rel))
        align_field = self.fields.get(gguf.Keys.General.ALIGNMENT)
        self.alignment = int(align_field.contents()) if align_field else gguf.GGUF_DEFAULT_ALIGNMENT
        data_start = -(-off // self.alignment) * self.alignment
        self.tensors: list[ScannedTensor] = []
        for name, dims, ggml_type, rel in infos:
            block_size, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
            n_elements = int(np.prod(dims))
            t = ScannedTensor(
                name,
                np.array(dims, dtype=np.uint64),
                ggml_type,
                n_elements,
                n_elements // block_size * type_size,
                data_start + rel,
            )
            if t.data_offset + t.n_bytes > size:
                raise GatenormError(
                    f"truncated GGUF {self.path}: tensor {name} ends at byte {t.data_offset + t.n_bytes}, "
                    f"file has {size}"
                )
            self.tensors.append(t)


def _read_string(buf, off: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", buf, off)
    return bytes(buf[off + 8 : off + 8 + n]).decode("utf-8"), off + 8 + n


def _skip_value(buf, off: int, vtype: gguf.GGUFValueType) -> int:
    """Offset just past a value of type `vtype` starting at `off` (after its type tag)."""
    if vtype in _SCALAR_FORMATS:
        return off + struct.calcsize(_SCALAR_FORMATS[vtype])
    if vtype is T.STRING:
        return off + 8 + struct.unpack_from("<Q", buf, off)[0]
    item_type, count = T(struct.unpack_from("<I", buf, off)[0]), struct.unpack_from("<Q", buf, off + 4)[0]
    off += 12
    if item_type in _SCALAR_FORMATS:
        return off + count * struct.calcsize(_SCALAR_FORMATS[item_type])
    unpack = struct.Struct("<Q").unpack_from
    for _ in range(count):  # strings, or nested arrays
        off = off + 8 + unpack(buf, off)[0] if item_type is T.STRING else _skip_value(buf, off, item_type)
    return off


def _decode(raw: bytes, off: int, vtype: gguf.GGUFValueType):
    """(value, next offset) of a value of type `vtype` at `off` in `raw`."""
    if vtype in _SCALAR_FORMATS:
        fmt = "<" + _SCALAR_FORMATS[vtype]
        return struct.unpack_from(fmt, raw, off)[0], off + struct.calcsize(fmt)
    if vtype is T.STRING:
        return _read_string(raw, off)
    item_type, count = T(struct.unpack_from("<I", raw, off)[0]), struct.unpack_from("<Q", raw, off + 4)[0]
    off += 12
    if item_type in _NUMPY_TYPES:
        values = np.frombuffer(raw, dtype=_NUMPY_TYPES[item_type], count=count, offset=off)
        return values.tolist(), off + values.nbytes
    items = []
    for _ in range(count):
        item, off = _decode(raw, off, item_type)
        items.append(item)
    return items, off


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
    """A `GGUFCheckpoint` whose metadata and tensor table come from `ScannedGGUF` (no token decoding)."""

    reader: ScannedGGUF

    def _open_reader(self, path: Path) -> ScannedGGUF:
        return ScannedGGUF(path)
