"""Quantize a GGUF with llama.cpp's own quantizer (``llama_model_quantize`` through llama-cpp-python)."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import gguf

from gatenorm.errors import GatenormError

logger = logging.getLogger("gatenorm.export")

KEEP = "keep"
#: ``--quant`` names -> llama.cpp file types: F32, F16, BF16, Q8_0, Q4_K_M, ...
FILE_TYPES: dict[str, gguf.LlamaFileType] = {
    ft.name.removeprefix("MOSTLY_").removeprefix("ALL_"): ft
    for ft in gguf.LlamaFileType
    if ft is not gguf.LlamaFileType.GUESSED
}
#: Types the HF converter writes itself (norms and biases stay F32 as llama.cpp expects).
FLOAT_TYPES = ("F32", "F16", "BF16")


def parse_quant(name: str) -> str:
    """The canonical ``--quant`` name (``keep`` or a key of `FILE_TYPES`), or a GatenormError."""
    canonical = name.upper()
    if name.lower() == KEEP:
        return KEEP
    if canonical not in FILE_TYPES:
        raise GatenormError(f"unknown --quant {name!r} (use keep or one of: {', '.join(FILE_TYPES)})")
    return canonical


#: The type a tensor named in `quantize_gguf`'s `at_least_q8` gets when the file type is quantized.
AT_LEAST_Q8 = gguf.GGMLQuantizationType.Q8_0


def quantize_gguf(
    src: Path, dst: Path, quant: str, threads: int | None = None, at_least_q8: Sequence[str] = ()
) -> None:
    """Write `src` quantized to `quant` (a `FILE_TYPES` name) at `dst`, with llama.cpp's type mixes; the
    tensors named in `at_least_q8` (a healed plan's fitted repairs) are stored as Q8_0 where the mix would
    quantize them (llama.cpp's per-tensor overrides; float file types leave them F32/F16/BF16)."""
    import llama_cpp  # loads libllama; keep the import off the CLI's start-up path

    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads or os.cpu_count() or 1
    params.ftype = int(FILE_TYPES[quant])
    params.allow_requantize = True  # a quantized source asked to become another type
    patterns = [f"^{re.escape(name)}$".encode() for name in at_least_q8]
    if patterns:  # kept alive until the call returns; a null pattern ends the array
        overrides = (llama_cpp.llama_model_tensor_override * (len(patterns) + 1))()
        for slot, pattern in zip(overrides, patterns, strict=False):
            slot.pattern, slot.type = pattern, int(AT_LEAST_Q8)
        params.tt_overrides = ctypes.cast(overrides, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    lines: list[str] = []
    with _llama_log(lines):
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    text = "".join(lines)
    if rc != 0:
        errors = [line for line in text.splitlines() if "error" in line.lower()]
        reason = f": {errors[-1].strip()}" if errors else ""
        raise GatenormError(
            f"llama.cpp could not quantize {src} to {quant} (llama_model_quantize: {rc}){reason}"
        )
    fallback = re.search(r"(\d+) of (\d+) tensor\(s\) required fallback quantization", text)
    if fallback:
        logger.warning(
            "llama.cpp: %s of %s tensors fell back from the %s mix to another type (their width is not a "
            "multiple of the type's block size)",
            fallback[1],
            fallback[2],
            quant,
        )


@contextlib.contextmanager
def _llama_log(lines: list[str]) -> Iterator[None]:
    """llama.cpp's log collected into `lines` instead of printed (the quantizer warns once per tensor it
    cannot give the mix's type), then llama-cpp-python's own callback back in place."""
    import llama_cpp
    import llama_cpp._logger as stock

    @llama_cpp.llama_log_callback
    def collect(_level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
        lines.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield
    finally:
        llama_cpp.llama_log_set(stock.llama_log_callback, ctypes.c_void_p(0))
