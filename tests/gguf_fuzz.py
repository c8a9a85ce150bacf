"""A seeded GGUF mutator and the command runner of the fuzz test and of ``scripts/fuzz_gguf.py``.

A case is ``(base, seed)``: the seed picks one or more mutations of a shipped GGUF (bit flips and random
bytes in the header, lying string/array counts, retyped, duplicated or corrupted keys, bad alignment,
wrong tensor types, dimensions, offsets or names, hyper-parameters that disagree with the tensors, deep
arrays, non-UTF-8 text, truncation at record boundaries), so any crash is reproduced from its seed alone.
Each case then runs ``gatenorm score``, ``inspect`` and ``export --to gguf`` in-process through the CLI's
typer app; the outcome of a run is ``ok``, ``GatenormError`` or the class and place of anything else.
"""

from __future__ import annotations

import contextlib
import functools
import io
import random
import signal
import struct
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import gguf

from gatenorm.readers.gguf_check import ScannedGGUF

T = gguf.GGUFValueType
HPARAMS = (
    "block_count",
    "embedding_length",
    "attention.head_count",
    "attention.head_count_kv",
    "attention.key_length",
    "feed_forward_length",
)
HUGE = (2**64 - 1, 2**63, 2**62 + 7, 2**40, 2**32 + 1, 10**12)


def _s(text: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text


@dataclass
class Layout:
    """A GGUF split into records: (key, raw value) pairs, tensor infos, and the data section."""

    version: int
    kv: list[tuple[bytes, bytes]]
    tensors: list[list]  # [name bytes, dims, type, rel offset]
    data: bytes
    arch: str
    extra: list[bytes] = field(default_factory=list)  # raw bytes appended to the KV section

    @classmethod
    def of(cls, path: Path) -> Layout:
        h = ScannedGGUF(path)
        data_start = h.tensors[0].data_offset
        kv = [(k.encode(), f.raw_value) for k, f in h.fields.items()]
        tensors = [
            [t.name.encode(), [int(n) for n in t.shape], int(t.tensor_type), t.data_offset - data_start]
            for t in h.tensors
        ]
        with open(path, "rb") as f:
            f.seek(data_start)
            data = f.read()
        return cls(h.version, kv, tensors, data, h.fields["general.architecture"].contents())

    def copy(self) -> Layout:
        return Layout(
            self.version,
            list(self.kv),
            [list(t) for t in self.tensors],
            self.data,
            self.arch,
            list(self.extra),
        )

    def encode(self, n_kv: int | None = None, n_tensors: int | None = None) -> bytes:
        kv = b"".join(_s(k) + v for k, v in self.kv) + b"".join(self.extra)
        infos = b"".join(
            _s(name)
            + struct.pack(f"<I{len(dims)}QIQ", len(dims), *(d % 2**64 for d in dims), ttype, off % 2**64)
            for name, dims, ttype, off in self.tensors
        )
        n_kv = len(self.kv) + len(self.extra) if n_kv is None else n_kv
        n_tensors = len(self.tensors) if n_tensors is None else n_tensors
        head = b"GGUF" + struct.pack("<IQQ", self.version, n_tensors, n_kv) + kv + infos
        return head + b"\0" * (-len(head) % 32) + self.data

    def index(self, key: str) -> int | None:
        return next((i for i, (k, _) in enumerate(self.kv) if k == key.encode()), None)


def _scalar(vtype: T, value) -> bytes:
    fmt = {T.UINT32: "I", T.INT32: "i", T.UINT64: "Q", T.INT64: "q", T.FLOAT32: "f", T.UINT8: "B"}[vtype]
    return struct.pack("<I" + fmt, vtype, value)


def _value(rng: random.Random) -> bytes:
    """A random replacement value of a hyper-parameter."""
    kind = rng.randrange(6)
    if kind == 0:
        return _scalar(T.UINT32, rng.choice([0, 1, 2, 3, 5, 7, 8, 16, 64, 1000, 2**31, 2**32 - 1]))
    if kind == 1:
        return _scalar(T.FLOAT32, rng.choice([float("nan"), float("inf"), 9.0, -1.0]))
    if kind == 2:
        return struct.pack("<I", T.STRING) + _s(rng.choice([b"9", b"", b"\xff\xfe"]))
    if kind == 3:
        return _scalar(T.INT64, rng.choice([-1, -(2**63), 2**62]))
    if kind == 4:
        n = rng.choice([0, 1, 2, 30, 10**6])
        return struct.pack("<IIQ", T.ARRAY, T.UINT32, n) + struct.pack(f"<{min(n, 30)}I", *([9] * min(n, 30)))
    return struct.pack("<I", T.BOOL) + b"\x01"


def _bytes_mutation(raw: bytearray, rng: random.Random, header_end: int) -> None:
    kind = rng.randrange(3)
    if kind == 0:  # bit flips
        for _ in range(rng.randint(1, 8)):
            pos = rng.randrange(header_end)
            raw[pos] ^= 1 << rng.randrange(8)
    elif kind == 1:  # random bytes in the key-value section
        n = rng.randint(1, 16)
        pos = rng.randrange(24, max(25, header_end - n))
        raw[pos : pos + n] = rng.randbytes(n)
    else:  # an 8-byte field made huge at a random 8-aligned-ish place
        pos = rng.randrange(8, header_end - 8)
        raw[pos : pos + 8] = struct.pack("<Q", rng.choice(HUGE))


def _record_mutation(lay: Layout, rng: random.Random) -> str:
    """Mutate one record of `lay`; the name of the mutation."""
    a = lay.arch
    kind = rng.randrange(16)
    if kind == 0:  # a hyper-parameter changed, retyped or made an array
        i = lay.index(f"{a}.{rng.choice(HPARAMS)}")
        if i is not None:
            lay.kv[i] = (lay.kv[i][0], _value(rng))
        return "hparam"
    if kind == 1:  # a duplicate key
        key, value = rng.choice(lay.kv)
        if rng.random() < 0.5 and lay.index(f"{a}.attention.head_count") is not None:
            key, value = f"{a}.attention.head_count".encode(), _scalar(T.UINT32, 0)
        lay.kv.append((key, value))
        return "duplicate-key"
    if kind == 2:  # alignment
        value = rng.choice(
            [_scalar(T.UINT32, v) for v in (0, 1, 3, 24, 64, 2**31, 2**32 - 1)]
            + [_scalar(T.UINT64, 32), _scalar(T.FLOAT32, 32.0), struct.pack("<I", T.STRING) + _s(b"32")]
        )
        lay.kv.insert(rng.randrange(len(lay.kv) + 1), (b"general.alignment", value))
        return "alignment"
    if kind == 3:  # a string or array count that lies
        i = rng.randrange(len(lay.kv))
        key, raw = lay.kv[i]
        vtype = struct.unpack_from("<I", raw)[0]
        at = 4 if vtype == T.STRING else 8 if vtype == T.ARRAY else None
        if at is not None:
            raw = raw[:at] + struct.pack("<Q", rng.choice((*HUGE, len(raw), len(raw) * 2))) + raw[at + 8 :]
            lay.kv[i] = (key, raw)
        return "count"
    if kind == 4:  # a key retyped (value bytes kept)
        i = rng.randrange(len(lay.kv))
        key, raw = lay.kv[i]
        lay.kv[i] = (key, struct.pack("<I", rng.randrange(14)) + raw[4:])
        return "retype"
    if kind == 5:  # a deeply nested array, or an array of arrays
        depth = rng.choice([2, 3, 100, 5000])
        nested = struct.pack("<IQ", T.ARRAY, 1) * (depth - 1) + struct.pack("<IQ", T.UINT8, 1) + b"\x07"
        lay.kv.insert(rng.randrange(len(lay.kv) + 1), (b"fuzz.nested", struct.pack("<I", T.ARRAY) + nested))
        return "nested"
    if kind == 6:  # non-UTF-8 text in a name, the architecture or a key
        bad = rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80abc"])
        target = rng.choice(["general.name", "general.architecture", "key", "token"])
        if target == "key":
            i = rng.randrange(len(lay.kv))
            lay.kv[i] = (lay.kv[i][0] + bad, lay.kv[i][1])
        elif target == "token" and (i := lay.index("tokenizer.ggml.tokens")) is not None:
            key, raw = lay.kv[i]
            n = struct.unpack_from("<Q", raw, 16)[0]
            lay.kv[i] = (key, raw[:24] + bad[:1] * n + raw[24 + n :])
        elif (i := lay.index(target)) is not None:
            lay.kv[i] = (lay.kv[i][0], struct.pack("<I", T.STRING) + _s(b"llama" + bad))
        return "utf8"
    t = rng.choice(lay.tensors)
    if kind == 7:  # tensor type
        t[2] = rng.choice([0, 1, 2, 3, 8, 12, 14, 30, 4, 5, 31, 39, 99, 2**32 - 1])
        return "tensor-type"
    if kind == 8:  # tensor dims
        dims = t[1]
        choice = rng.randrange(6)
        if choice == 0:
            t[1] = list(reversed(dims))
        elif choice == 1:
            t[1] = [d * 2 for d in dims]
        elif choice == 2:
            t[1] = [*dims, rng.choice([0, 1, 2, 2**63])]
        elif choice == 3:
            t[1] = [0, *dims[1:]]
        elif choice == 4:
            t[1] = [rng.choice(HUGE), *dims[1:]]
        else:
            t[1] = dims * 3  # 6 dims, or 3
        return "tensor-dims"
    if kind == 9:  # tensor offset
        t[3] = rng.choice([t[3] + 32, t[3] - 32, 0, 2**63, len(lay.data), t[3] + 1])
        return "tensor-offset"
    if kind == 10:  # duplicate tensor name
        other = rng.choice(lay.tensors)
        t[0] = other[0]
        return "tensor-name"
    if kind == 11:  # dims that agree with the bytes but not with the hyper-parameters
        i = lay.index(f"{a}.{rng.choice(HPARAMS[:4])}")
        if i is not None:
            key, raw = lay.kv[i]
            if struct.unpack_from("<I", raw)[0] == T.UINT32:
                v = struct.unpack_from("<I", raw, 4)[0]
                lay.kv[i] = (key, _scalar(T.UINT32, rng.choice([v * 2, v + 1, max(v // 2, 1), v * 4])))
        return "shape-vs-hparams"
    if kind == 12:  # a key removed
        if lay.kv:
            lay.kv.pop(rng.randrange(len(lay.kv)))
        return "missing-key"
    if kind == 13:  # tensor removed or version changed
        if rng.random() < 0.5:
            lay.tensors.remove(t)
        else:
            lay.version = rng.choice([0, 1, 2, 4, 2**24 * 3])
        return "tensor-missing-or-version"
    if kind == 14:  # long tensor name or empty key
        if rng.random() < 0.5:
            t[0] = b"x" * rng.choice([64, 65, 1000])
        else:
            lay.kv.append((b"", _scalar(T.UINT32, 1)))
        return "names"
    return "none"


def mutate(base: Layout, seed: int) -> tuple[bytes, str]:
    """The bytes of case `seed` of `base`, and a short description of what was done."""
    rng = random.Random(seed)
    lay = base.copy()
    done = [_record_mutation(lay, rng) for _ in range(rng.choice([1, 1, 1, 2, 3]))]
    n_kv = n_tensors = None
    if rng.random() < 0.08:  # lying record counts
        n_kv = rng.choice([len(lay.kv) + 1, len(lay.kv) - 1, 2**63, 2**40])
        done.append("n_kv")
    elif rng.random() < 0.08:
        n_tensors = rng.choice([len(lay.tensors) + 1, len(lay.tensors) - 1, 2**64 - 1])
        done.append("n_tensors")
    raw = bytearray(lay.encode(n_kv, n_tensors))
    header_end = len(raw) - len(lay.data)
    if rng.random() < 0.35:
        _bytes_mutation(raw, rng, header_end)
        done.append("bytes")
    if rng.random() < 0.12:  # truncation at a boundary (or just around it)
        cuts = [4, 8, 16, 24, header_end - 1, header_end, header_end + 1, len(raw) - 1, len(raw) // 2]
        cuts += [rng.randrange(24, header_end)]
        cut = max(0, rng.choice(cuts) + rng.choice([-1, 0, 0, 1]))
        del raw[cut:]
        done.append(f"truncate@{cut}")
    return bytes(raw), "+".join(done)


class CaseTimeout(Exception):
    """A command ran past the per-case time limit."""


@contextlib.contextmanager
def _time_limit(seconds: float):
    def fire(signum, frame):
        raise CaseTimeout(f"over {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _place(exc: BaseException) -> str:
    """file:line of the innermost frame of `exc` inside the project (else the innermost frame)."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/gatenorm/" in f.filename or "/exporters/" in f.filename]
    f = (ours or frames or [None])[-1]
    return "?" if f is None else f"{Path(f.filename).parent.name}/{Path(f.filename).name}:{f.lineno}"


COMMANDS = ("score", "inspect", "export")


@functools.cache
def _cli():
    """The click command behind ``gatenorm`` (what ``app()`` builds on every call), built once."""
    import typer

    from gatenorm.cli import app

    return typer.main.get_command(app)


#: Wall-clock seconds after which a command counts as hung and is interrupted: a multiple of the CPU-time
#: limit, since on a loaded, shared machine wall time is mostly waiting for a core.
HANG_FACTOR = 6


def run_command(command: str, path: Path, out_dir: Path, limit: float) -> tuple[str, float]:
    """Run one CLI command on `path` in-process; (outcome, CPU seconds of this process).

    Outcome 'ok', 'GatenormError', 'leftover <names>' when a failed export left files behind, 'timeout'
    past `HANG_FACTOR` x `limit` wall seconds, or 'Class at place: message'."""
    from gatenorm.errors import GatenormError

    out = out_dir / "out.gguf"
    args = {
        "score": ["score", str(path)],
        "inspect": ["inspect", str(path)],
        "export": ["export", str(path), "--drop", "1", "-o", str(out)],
    }[command]
    start = time.process_time()
    outcome = "ok"
    sink = io.StringIO()
    try:
        quiet = contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink)
        with _time_limit(limit * HANG_FACTOR), quiet[0], quiet[1]:
            _cli().main(args, standalone_mode=False)
    except GatenormError:
        outcome = "GatenormError"
    except CaseTimeout:
        outcome = f"timeout over {limit * HANG_FACTOR} s wall"
    except Exception as e:  # what the fuzzer looks for
        outcome = f"{type(e).__name__} at {_place(e)}: {str(e)[:120]}"
    seconds = time.process_time() - start
    left = sorted(p.name for p in out_dir.iterdir())
    if command == "export" and left != (["out.gguf"] if outcome == "ok" else []):
        outcome = f"leftover {left} after {outcome}"
    for p in out_dir.iterdir():
        p.unlink()
    return outcome, seconds


def _set(lay: Layout, key: str, raw: bytes) -> Layout:
    i = lay.index(key)
    if i is None:
        lay.kv.append((key.encode(), raw))
    else:
        lay.kv[i] = (key.encode(), raw)
    return lay


def _append(lay: Layout, key: str, raw: bytes) -> bytes:
    lay.kv.append((key.encode(), raw))
    return lay.encode()


def _tensor(lay: Layout, suffix: str) -> list:
    return next(t for t in lay.tensors if t[0].endswith(suffix.encode()))


def _retyped_q(lay: Layout) -> Layout:
    _tensor(lay, "blk.0.attn_q.weight")[2] = int(gguf.GGMLQuantizationType.F32)
    return lay


def _string(text: bytes) -> bytes:
    return struct.pack("<I", T.STRING) + _s(text)


def _huge_count(lay: Layout, key: str, at: int) -> Layout:
    i = lay.index(key)
    k, raw = lay.kv[i]
    lay.kv[i] = (k, raw[:at] + struct.pack("<Q", 2**62) + raw[at + 8 :])
    return lay


def _nested(depth: int) -> bytes:
    inner = struct.pack("<IQ", T.ARRAY, 1) * (depth - 1) + struct.pack("<IQ", T.UINT8, 1) + b"\x07"
    return struct.pack("<I", T.ARRAY) + inner


#: The crash classes of issue 14 (and those the fuzzer found), each as a named, deterministic mutation of
#: the tiny GGUF (architecture llama, 2 layers, width 16, 4 heads of 4): name -> Layout -> bytes.
REGRESSIONS = {
    "alignment-zero": lambda a, lay: _set(lay, "general.alignment", _scalar(T.UINT32, 0)).encode(),
    "alignment-wrong-type": lambda a, lay: _set(lay, "general.alignment", _string(b"32")).encode(),
    "alignment-not-power-of-two": lambda a, lay: _set(
        lay, "general.alignment", _scalar(T.UINT32, 24)
    ).encode(),
    "name-not-utf8": lambda a, lay: _set(lay, "general.name", _string(b"tiny\xff")).encode(),
    "architecture-not-utf8": lambda a, lay: _set(
        lay, "general.architecture", _string(b"ll\xc3\x28")
    ).encode(),
    "huge-array-count": lambda a, lay: _huge_count(lay, "tokenizer.ggml.tokens", 8).encode(),
    "huge-string-length": lambda a, lay: _huge_count(lay, "general.name", 4).encode(),
    "nested-arrays": lambda a, lay: _set(lay, "fuzz.nested", _nested(5000)).encode(),
    "duplicate-head-count-zero": lambda a, lay: _append(
        lay, f"{a}.attention.head_count", _scalar(T.UINT32, 0)
    ),
    "head-count-nan": lambda a, lay: _set(
        lay, f"{a}.attention.head_count", _scalar(T.FLOAT32, float("nan"))
    ).encode(),
    "head-count-zero": lambda a, lay: _set(lay, f"{a}.attention.head_count", _scalar(T.UINT32, 0)).encode(),
    "head-count-vs-shapes": lambda a, lay: _set(
        lay, f"{a}.attention.head_count", _scalar(T.UINT32, 2)
    ).encode(),
    "kv-head-count-vs-shapes": lambda a, lay: _set(
        lay, f"{a}.attention.head_count_kv", _scalar(T.UINT32, 2)
    ).encode(),
    "width-vs-shapes": lambda a, lay: _set(lay, f"{a}.embedding_length", _scalar(T.UINT32, 32)).encode(),
    "block-count-huge": lambda a, lay: _set(lay, f"{a}.block_count", _scalar(T.UINT32, 2**31 - 1)).encode(),
    "tensor-type-vs-bytes": lambda a, lay: _retyped_q(lay).encode(),
    "tensor-dims-overflow": lambda a, lay: (
        _tensor(lay, "blk.0.attn_q.weight").__setitem__(1, [2**32, 2**32]) or lay.encode()
    ),
    "tensor-dims-vs-bytes": lambda a, lay: (
        _tensor(lay, "blk.0.ffn_up.weight").__setitem__(1, [16, 128]) or lay.encode()
    ),
    "tensor-unknown-type": lambda a, lay: (
        _tensor(lay, "blk.0.attn_k.weight").__setitem__(2, 99) or lay.encode()
    ),
    "tensor-offset-outside": lambda a, lay: lay.tensors[-1].__setitem__(3, 2**40) or lay.encode(),
    "duplicate-tensor-name": lambda a, lay: lay.tensors[3].__setitem__(0, lay.tensors[2][0]) or lay.encode(),
    "truncated-header": lambda a, lay: lay.encode()[: len(lay.encode()) - len(lay.data) - 100],
    "truncated-data": lambda a, lay: lay.encode()[:-1000],
    "version-1": lambda a, lay: setattr(lay, "version", 1) or lay.encode(),
}


def regression_case(base: Layout, name: str) -> bytes:
    """The bytes of regression case `name` made from `base`."""
    return REGRESSIONS[name](base.arch, base.copy())
