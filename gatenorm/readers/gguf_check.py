"""The one GGUF header reader and validator: a bounded scan that every gatenorm GGUF read starts with.

A GGUF file is untrusted input. `scan_gguf` reads the header with `struct` inside a memory map and checks,
before it allocates or loops, every count and length against the bytes left in the header (which is
capped at `HEADER_CAP`); keys and strings must be UTF-8, keys unique, value types known, arrays flat (no
nesting: nothing recurses on depth the file controls); tensors need unique names, 1 to 4 dimensions, a
type gguf-py knows, rows a whole number of blocks, and the data offsets llama.cpp's loader insists on
(in file order, each aligned, inside the file); ``general.alignment`` is a UINT32 power of two. Then
`check_hparams` checks the types and ranges of the hyper-parameters gatenorm reads, and
`check_tensor_shapes` the attention tensors against them. Anything wrong is a `GatenormError` naming the
file, the key or tensor, and what is wrong.

Numeric arrays are skipped in one step and string arrays by their lengths, so SmolLM2's 100k tokenizer
strings take a few tens of ms (gguf-py's ``GGUFReader`` builds a numpy view per item: about 2 s). Each
field keeps the bytes of its value so exporters can copy it unchanged. Types, sizes and constants come
from gguf-py.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from gatenorm.errors import GatenormError

GGUF_MAGIC = b"GGUF"
#: Most bytes of metadata and tensor table read from one file (SmolLM2's header: 1.8 MB).
HEADER_CAP = 256 * 2**20
#: ggml's limits (GGML_MAX_DIMS; GGML_MAX_NAME counts the terminating zero).
MAX_DIMS = 4
MAX_TENSOR_NAME = 63
#: Largest key, and largest value gatenorm accepts for a count-like hyper-parameter (int32, as llama.cpp).
MAX_KEY = 65535
MAX_HPARAM = 2**31 - 1

T = gguf.GGUFValueType
SCALAR_FORMATS = {
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
_SCALAR_SIZES = {vtype: struct.calcsize("<" + fmt) for vtype, fmt in SCALAR_FORMATS.items()}
NUMPY_TYPES = {
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
INTEGER_TYPES = frozenset({T.UINT8, T.INT8, T.UINT16, T.INT16, T.UINT32, T.INT32, T.UINT64, T.INT64})
_VALUE_TYPES = {int(v): v for v in T}
_TENSOR_TYPES = {int(q): q for q in gguf.GGMLQuantizationType if q in gguf.GGML_QUANT_SIZES}
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")
_MIN_KV_BYTES = 8 + 1 + 4 + 1  # key length, a 1-byte key, type tag, a 1-byte value
_MIN_TENSOR_BYTES = 8 + 1 + 4 + 8 + 4 + 8  # name length, name, n_dims, one dim, type, offset


@dataclass
class ScannedField:
    """One metadata key: its types and the bytes of its value (type tag onwards) in the file."""

    name: str
    types: list[gguf.GGUFValueType]
    raw_value: bytes  # type tag + value, exactly as stored

    def contents(self):
        """The decoded value, like gguf-py's ``ReaderField.contents()`` (strings decoded, arrays as lists)."""
        return _decode(self.raw_value, self.types)

    @property
    def count(self) -> int:
        """Items of an array value (1 for a scalar or a string)."""
        return _U64.unpack_from(self.raw_value, 8)[0] if self.types[0] is T.ARRAY else 1


@dataclass
class ScannedTensor:
    """One tensor's info, with the attribute names of gguf-py's ``ReaderTensor`` that readers use."""

    name: str
    shape: np.ndarray  # ggml order (ne0 first)
    tensor_type: gguf.GGMLQuantizationType
    n_elements: int
    n_bytes: int
    data_offset: int  # absolute, in the file


class _Corrupt(Exception):
    """Raised inside the scan; becomes a GatenormError naming the file."""


class _Cursor:
    """Bounded reads of the header region of a memory map."""

    def __init__(self, buf: mmap.mmap, limit: int, capped: bool):
        self.buf, self.off, self.limit, self.capped = buf, 0, limit, capped

    def need(self, n: int, what: str) -> None:
        if n > self.limit - self.off:
            if self.capped:
                raise _Corrupt(f"{what}: the header goes past the {HEADER_CAP // 2**20} MiB cap")
            raise _Corrupt(f"{what} needs {n} bytes at byte {self.off}, only {self.limit - self.off} left")

    def u32(self, what: str) -> int:
        self.need(4, what)
        (v,) = _U32.unpack_from(self.buf, self.off)
        self.off += 4
        return v

    def u64(self, what: str) -> int:
        self.need(8, what)
        (v,) = _U64.unpack_from(self.buf, self.off)
        self.off += 8
        return v

    def string(self, what: str, max_len: int | None = None) -> str:
        n = self.u64(what)
        if max_len is not None and n > max_len:
            raise _Corrupt(f"{what}: length {n} over the limit of {max_len}")
        self.need(n, what)
        start, self.off = self.off, self.off + n
        try:
            return self.buf[start : self.off].decode("utf-8")
        except UnicodeDecodeError as e:
            raise _Corrupt(f"{what} is not UTF-8 (byte {start + e.start})") from None

    def value_type(self, what: str) -> gguf.GGUFValueType:
        code = self.u32(what)
        vtype = _VALUE_TYPES.get(code)
        if vtype is None:
            raise _Corrupt(f"{what}: unknown value type {code}")
        return vtype

    def skip_value(self, key: str, vtype: gguf.GGUFValueType) -> gguf.GGUFValueType | None:
        """Check and skip a value of `vtype` (after its type tag); the item type of an array."""
        if vtype is T.STRING:
            self.string(f"key {key!r}: string value")
            return None
        if vtype is not T.ARRAY:
            self.need(_SCALAR_SIZES[vtype], f"key {key!r}: {vtype.name} value")
            self.off += _SCALAR_SIZES[vtype]
            return None
        item = self.value_type(f"key {key!r}: array item type")
        if item is T.ARRAY:
            raise _Corrupt(f"key {key!r}: nested arrays are not supported")
        count = self.u64(f"key {key!r}: array count")
        what = f"key {key!r}: array of {count} {item.name}"
        if item is not T.STRING:
            self.need(count * _SCALAR_SIZES[item], what)
            self.off += count * _SCALAR_SIZES[item]
            return item
        self.need(count * 8, what)  # every string has at least its length
        buf, off, limit, unpack = self.buf, self.off, self.limit, _U64.unpack_from
        pieces = []
        for i in range(count):
            if off + 8 > limit:
                self.off = off
                self.need(8, f"{what}: item {i}")
            (n,) = unpack(buf, off)
            off += 8
            if n > limit - off:
                self.off = off
                self.need(n, f"{what}: item {i}")
            pieces.append(buf[off : off + n])
            off += n
        try:  # an ASCII separator neither completes nor continues a UTF-8 sequence: one decode checks all
            b"\0".join(pieces).decode("utf-8")
        except UnicodeDecodeError:
            bad = next(i for i, piece in enumerate(pieces) if not _is_utf8(piece))
            raise _Corrupt(f"{what}: item {bad} is not UTF-8") from None
        self.off = off
        return item


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class ScannedGGUF:
    """The checked header of a GGUF file: ``fields`` (key -> ScannedField) and ``tensors`` in file order.

    Raises a GatenormError on any structural fault (see the module docstring); hyper-parameters are
    checked by `check_hparams`.
    """

    def __init__(self, path: str | Path):
        self.path = path = Path(path)
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                if f.read(4) != GGUF_MAGIC:
                    raise GatenormError(f"not a GGUF file (bad magic): {path}")
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                    self._scan(buf, size)
        except _Corrupt as e:
            raise GatenormError(f"corrupt or truncated GGUF {path}: {e}") from None
        except (OSError, ValueError) as e:  # unreadable, or a file mmap refuses
            raise GatenormError(f"cannot read GGUF {path}: {e}") from None
        self.size = size

    def _scan(self, buf: mmap.mmap, size: int) -> None:
        cur = _Cursor(buf, min(size, HEADER_CAP), size > HEADER_CAP)
        cur.off = 4
        self.version = cur.u32("version")
        if self.version not in (2, 3):
            raise _Corrupt(f"unsupported GGUF version {self.version} (gatenorm reads 2 and 3, little endian)")
        n_tensors, n_kv = cur.u64("tensor count"), cur.u64("key count")
        left = cur.limit - cur.off
        if n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_BYTES > left:
            raise _Corrupt(f"{n_kv} keys and {n_tensors} tensors cannot fit in the {left} header bytes left")
        self.fields: dict[str, ScannedField] = {}
        for i in range(n_kv):
            key = cur.string(f"key {i}", MAX_KEY)
            if not key:
                raise _Corrupt(f"key {i} is empty")
            if key in self.fields:
                raise _Corrupt(f"duplicate key {key!r}")
            start = cur.off
            vtype = cur.value_type(f"key {key!r}: value type")
            item = cur.skip_value(key, vtype)
            types = [vtype] if item is None else [vtype, item]
            self.fields[key] = ScannedField(key, types, bytes(buf[start : cur.off]))
        self.alignment = self._alignment()
        infos = []
        names: set[str] = set()
        for i in range(n_tensors):
            name = cur.string(f"tensor {i}: name", MAX_TENSOR_NAME)
            if not name or name in names:
                raise _Corrupt(f"tensor {i}: {'empty' if not name else 'duplicate'} name {name!r}")
            names.add(name)
            n_dims = cur.u32(f"tensor {name!r}: dimension count")
            if not 1 <= n_dims <= MAX_DIMS:
                raise _Corrupt(f"tensor {name!r}: {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
            dims = [cur.u64(f"tensor {name!r}: dimension {j}") for j in range(n_dims)]
            code = cur.u32(f"tensor {name!r}: type")
            rel = cur.u64(f"tensor {name!r}: offset")
            infos.append((name, dims, code, rel))
        data_start = -(-cur.off // self.alignment) * self.alignment
        self.tensors: list[ScannedTensor] = []
        expected = 0  # llama.cpp's loader wants the tensors packed in order, each aligned
        for name, dims, code, rel in infos:
            t = _tensor(name, dims, code, data_start + rel)
            if rel != expected:
                raise _Corrupt(f"tensor {name!r}: data offset {rel}, expected {expected} (packed in order)")
            if t.data_offset + t.n_bytes > size:
                raise _Corrupt(
                    f"tensor {name!r} ends at byte {t.data_offset + t.n_bytes}, the file has {size} "
                    "(truncated?)"
                )
            expected += -(-t.n_bytes // self.alignment) * self.alignment
            self.tensors.append(t)

    def _alignment(self) -> int:
        field = self.fields.get(gguf.Keys.General.ALIGNMENT)
        if field is None:
            return gguf.GGUF_DEFAULT_ALIGNMENT
        if field.types != [T.UINT32]:
            raise _Corrupt(f"key {field.name!r} must be UINT32, not {_type_name(field.types)}")
        value = field.contents()
        if value <= 0 or value & (value - 1):
            raise _Corrupt(f"key {field.name!r}: alignment {value} is not a power of two")
        return value


def _tensor(name: str, dims: list[int], code: int, data_offset: int) -> ScannedTensor:
    qtype = _TENSOR_TYPES.get(code)
    if qtype is None:
        raise _Corrupt(f"tensor {name!r}: unknown tensor type {code}")
    if min(dims) < 1 or max(dims) >= 2**63:
        raise _Corrupt(f"tensor {name!r}: dimensions {dims} out of range")
    n_elements = 1
    for d in dims:  # Python ints: no overflow
        n_elements *= d
    if n_elements >= 2**63:
        raise _Corrupt(f"tensor {name!r}: {n_elements} elements is too many")
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if dims[0] % block_size:
        raise _Corrupt(
            f"tensor {name!r}: rows of {dims[0]} are not whole {qtype.name} blocks of {block_size}"
        )
    shape = np.array(dims, dtype=np.uint64)
    return ScannedTensor(name, shape, qtype, n_elements, n_elements // block_size * type_size, data_offset)


def _type_name(types: Sequence[gguf.GGUFValueType]) -> str:
    return types[0].name if len(types) == 1 else f"ARRAY of {types[1].name}"


def _decode(raw: bytes, types: Sequence[gguf.GGUFValueType]):
    """The value stored in `raw` (type tag onwards), already checked by the scan: flat, in bounds."""
    vtype = types[0]
    if vtype in SCALAR_FORMATS:
        return struct.unpack_from("<" + SCALAR_FORMATS[vtype], raw, 4)[0]
    if vtype is T.STRING:
        return raw[12:].decode("utf-8")
    item, count, off = types[1], _U64.unpack_from(raw, 8)[0], 16
    if item is not T.STRING:
        return np.frombuffer(raw, dtype=NUMPY_TYPES[item], count=count, offset=off).tolist()
    items = []
    for _ in range(count):
        (n,) = _U64.unpack_from(raw, off)
        items.append(raw[off + 8 : off + 8 + n].decode("utf-8"))
        off += 8 + n
    return items


#: Hyper-parameters (``{arch}.`` + suffix) that gatenorm reads: integers, or per-layer integer arrays.
COUNT_KEYS = (
    "block_count",
    "embedding_length",
    "feed_forward_length",
    "context_length",
    "vocab_size",
    "attention.head_count",
    "attention.head_count_kv",
    "attention.key_length",
    "attention.value_length",
)
#: Of those, the ones that must be at least 1 when scalar.
POSITIVE_KEYS = frozenset({"block_count", "embedding_length", "attention.head_count"})
#: Keys of fixed value type that gatenorm or the libraries it hands the file to read.
FIXED_TYPES: dict[str, list[gguf.GGUFValueType]] = {
    "general.architecture": [T.STRING],
    "general.name": [T.STRING],
    "gatenorm.plan": [T.STRING],
    "tokenizer.ggml.model": [T.STRING],
    "tokenizer.ggml.tokens": [T.ARRAY, T.STRING],
    "tokenizer.ggml.merges": [T.ARRAY, T.STRING],
    "tokenizer.ggml.scores": [T.ARRAY, T.FLOAT32],
    "tokenizer.ggml.token_type": [T.ARRAY, T.INT32],
}


def check_hparams(header: ScannedGGUF) -> str:
    """Check the types and ranges of the keys gatenorm reads; return ``general.architecture``."""
    path, fields = header.path, header.fields
    for key, types in FIXED_TYPES.items():
        if key in fields and fields[key].types != types:
            got = _type_name(fields[key].types)
            raise GatenormError(f"GGUF {path}: key {key!r} must be {_type_name(types)}, not {got}")
    tokens = fields.get("tokenizer.ggml.tokens")
    for key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        if tokens is not None and key in fields and fields[key].count != tokens.count:
            raise GatenormError(
                f"GGUF {path}: key {key!r} has {fields[key].count} items for {tokens.count} tokens"
            )
    if "general.architecture" not in fields:
        raise GatenormError(f"GGUF {path} has no general.architecture")
    arch = fields["general.architecture"].contents()
    for suffix in COUNT_KEYS:
        field = fields.get(f"{arch}.{suffix}")
        if field is None:
            continue
        if field.types[-1] not in INTEGER_TYPES:
            raise GatenormError(
                f"GGUF {path}: key {field.name!r} must be an integer, not {_type_name(field.types)}"
            )
        value = field.contents()
        values = value if isinstance(value, list) else [value]
        low = 1 if suffix in POSITIVE_KEYS and not isinstance(value, list) else 0
        bad = next((v for v in values if not low <= v <= MAX_HPARAM), None)
        if bad is not None:
            raise GatenormError(
                f"GGUF {path}: key {field.name!r} = {bad} is out of range {low}..{MAX_HPARAM}"
            )
    return arch


def check_gguf(path: str | Path) -> ScannedGGUF:
    """The checked header of the GGUF at `path` (structure and hyper-parameters); run before gguf-py."""
    header = ScannedGGUF(path)
    check_hparams(header)
    return header


#: Attention tensors whose shapes `check_tensor_shapes` knows, and their storage types gatenorm decodes.
_SHAPED_PARTS = ("q", "k", "v", "o", "norm", "embed")
DECODABLE_TYPES = frozenset(
    {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16}
) | frozenset(getattr(gguf.quants, "_type_traits", {}))


def expected_shapes(shape, v_rows: int | None) -> dict[str, tuple[int | None, ...]]:
    """HF-layout (out, in) shapes of the attention tensors of a model of `shape`; None matches any size.

    `v_rows` is the stored row count of v (n_head_kv x value head size), which may differ from q's head
    size; it fixes o's input width.
    """
    s = shape
    kv = s.n_head_kv * s.head_dim
    value_dim = v_rows if v_rows is not None and v_rows % s.n_head_kv == 0 else kv
    return {
        "q": (s.n_head * s.head_dim, s.d_model),
        "k": (kv, s.d_model),
        "v": (value_dim, s.d_model),
        "o": (s.d_model, s.n_head * (value_dim // s.n_head_kv)),
        "norm": (s.d_model,),
        "embed": (None, s.d_model),
    }


def check_tensor_shapes(
    where: str,
    shape,
    names: Mapping[str, str],
    stored: Mapping[str, tuple[int, ...]],
    n_tensors: int,
) -> None:
    """Check the stored (HF-layout) shapes of every layer's attention tensors against `shape`.

    `names` maps a part ('q', 'k', ...) to its name pattern (``{i}`` the layer), `stored` a tensor name to
    its shape. A missing tensor is left to the read that needs it (pruned exports lack some); a layer
    count beyond the number of tensors is refused first, so the loop is bounded by the file.
    """
    if shape.n_layers > n_tensors:
        raise GatenormError(f"{where}: {shape.n_layers} layers but only {n_tensors} tensors")
    # parts stored as row blocks of one tensor (Phi-3's fused qkv): that tensor holds their rows stacked
    fused = {part for part in ("q", "k", "v") if list(names.values()).count(names.get(part)) > 1}
    for layer in range(shape.n_layers):
        v_name = (names.get("v") or "").format(i=layer)
        v_shape = None if "v" in fused else stored.get(v_name)
        want = expected_shapes(shape, v_shape[0] if v_shape and len(v_shape) == 2 else None)
        seen = set()
        for part in _SHAPED_PARTS:
            if names.get(part) is None or (part == "embed" and layer):  # None: the family has none
                continue
            name = names[part].format(i=layer)
            got = stored.get(name)
            if got is None or name in seen:
                continue
            seen.add(name)
            expect = want[part]
            if part in fused:
                stacked = [p for p in ("q", "k", "v") if names.get(p) == names[part]]
                expect = (sum(want[p][0] for p in stacked), shape.d_model)
            if len(got) != len(expect) or any(
                e is not None and e != g for e, g in zip(expect, got, strict=True)
            ):
                shown = tuple("*" if e is None else e for e in expect)
                raise GatenormError(
                    f"{where}: tensor {name} has shape {tuple(got)}, the metadata ({shape.n_head} heads, "
                    f"{shape.n_head_kv} KV heads, head size {shape.head_dim}, width {shape.d_model}) "
                    f"says {shown}"
                )


def check_gguf_tensors(ckpt) -> None:
    """`check_tensor_shapes` and the decodable types of a GGUF checkpoint's attention tensors."""
    stored = {t.name: tuple(int(n) for n in reversed(t.shape)) for t in ckpt.reader.tensors}
    where = f"GGUF {ckpt.path}"
    names = {p: n for p, n in ckpt.arch.gguf_tensors.items() if p in _SHAPED_PARTS and n is not None}
    check_tensor_shapes(where, ckpt.shape, names, stored, len(stored))
    _check_block_tensors(where, ckpt.shape.d_model, ckpt.reader, stored, ckpt.arch.gguf_ffn_up_factor)
    for layer in range(ckpt.shape.n_layers):
        for pattern in names.values():
            t = ckpt.tensors.get(pattern.format(i=layer))
            if t is not None and gguf.GGMLQuantizationType(t.tensor_type) not in DECODABLE_TYPES:
                raise GatenormError(
                    f"{where}: tensor {t.name} has type {t.tensor_type.name}, which gatenorm cannot decode"
                )


#: gguf-py's names of the other per-layer and global tensors with a fixed relation to the model width:
#: name suffix -> (dimension index in HF layout (out, in) that is the width, number of dimensions).
_WIDTH_TENSORS = {
    "ffn_gate.weight": (1, 2),
    "ffn_up.weight": (1, 2),
    "ffn_down.weight": (0, 2),
    "ffn_norm.weight": (0, 1),
    "output_norm.weight": (0, 1),
    "output.weight": (1, 2),
}


def _check_block_tensors(
    where: str, d_model: int, header, stored: Mapping[str, tuple[int, ...]], up_factor: int = 1
) -> None:
    """MLP, norm and output tensors must be `d_model` wide (and as long as feed_forward_length; ``ffn_up``
    `up_factor` times that where it holds gate and up, Phi-3)."""
    arch = header.fields["general.architecture"].contents()
    ffn_field = header.fields.get(f"{arch}.feed_forward_length")
    ffn = ffn_field.contents() if ffn_field is not None else None
    for name, got in stored.items():
        suffix = name.split(".", 2)[-1] if name.startswith("blk.") else name
        rule = _WIDTH_TENSORS.get(suffix)
        if rule is None:
            continue
        axis, n_dims = rule
        bad = len(got) != n_dims or got[axis] != d_model
        if not bad and n_dims == 2 and isinstance(ffn, int) and suffix.startswith("ffn_"):
            bad = got[1 - axis] != ffn * (up_factor if suffix == "ffn_up.weight" else 1)
        if bad:
            raise GatenormError(
                f"{where}: tensor {name} has shape {got}, which does not fit width {d_model}"
                + (f" and feed_forward_length {ffn}" if isinstance(ffn, int) else "")
            )
