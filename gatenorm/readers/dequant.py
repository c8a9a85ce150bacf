"""Dequantization of GGUF tensor bytes to float32: ggml's own (the ``to_float`` of its type traits, in the
libggml-base that llama-cpp-python ships), row blocks on a few threads, where it loads; gguf-py's numpy
path otherwise. Both give the same bits (tests/test_sequential.py); ggml is ~2.5x faster per thread on
Q4_K (16.7M weights: 0.43 s against 1.08 s), which is most of a layer-at-a-time pass over a Q4_K file."""

from __future__ import annotations

import ctypes
import functools
import os
from concurrent.futures import ThreadPoolExecutor

import gguf
import numpy as np

_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)
#: Threads one tensor is split over (ctypes releases the GIL during each call).
THREADS = max(1, min(4, os.cpu_count() or 1))


class _Traits(ctypes.Structure):
    """ggml.h's ``struct ggml_type_traits``."""

    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


@functools.cache
def _ggml():
    """libggml-base of llama-cpp-python, or None where it is not installed or does not load."""
    try:
        import llama_cpp

        lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
        lib.ggml_get_type_traits.restype = ctypes.POINTER(_Traits)
        lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    except (ImportError, OSError, AttributeError):
        return None
    return lib


@functools.cache
def ggml_to_float(qtype: gguf.GGMLQuantizationType):
    """ggml's dequantizer of `qtype`, or None (no ggml, or its traits do not match gguf-py's sizes)."""
    lib = _ggml()
    if lib is None:
        return None
    traits = lib.ggml_get_type_traits(int(qtype)).contents
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    name = (traits.type_name or b"").decode()
    if name.lower() != qtype.name.lower() or (traits.blck_size, traits.type_size) != (block, size):
        return None
    return _TO_FLOAT(traits.to_float) if traits.to_float else None


def dequantize(raw: np.ndarray, qtype: gguf.GGMLQuantizationType, rows: int, cols: int) -> np.ndarray:
    """float32 [rows, cols] of quantized bytes `raw` (uint8, whole rows)."""
    fn = ggml_to_float(qtype)
    if fn is None:
        return gguf.quants.dequantize(raw.reshape(rows, -1), qtype).reshape(rows, cols)
    raw = np.ascontiguousarray(raw).reshape(rows, -1)
    out = np.empty((rows, cols), dtype=np.float32)
    step = max(1, -(-rows // THREADS))

    def part(start: int) -> None:
        stop = min(start + step, rows)
        dest = out[start:stop].ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        fn(raw[start:stop].ctypes.data, dest, (stop - start) * cols)

    if rows <= step:
        part(0)
    else:
        with ThreadPoolExecutor(THREADS) as pool:
            list(pool.map(part, range(0, rows, step)))
    return out
