"""Quantize a GGUF with llama.cpp's own quantizer (``llama_model_quantize`` through llama-cpp-python)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import gguf

from gatenorm.errors import GatenormError

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


def quantize_gguf(src: Path, dst: Path, quant: str, threads: int | None = None) -> None:
    """Write `src` quantized to `quant` (a `FILE_TYPES` name) at `dst`, with llama.cpp's type mixes."""
    import llama_cpp  # loads libllama; keep the import off the CLI's start-up path

    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads or os.cpu_count() or 1
    params.ftype = int(FILE_TYPES[quant])
    params.allow_requantize = True  # a quantized source asked to become another type
    log = logging.getLogger("llama-cpp-python")  # llama.cpp's log goes through this logger
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    finally:
        log.setLevel(level)
    if rc != 0:
        raise GatenormError(f"llama.cpp could not quantize {src} to {quant} (llama_model_quantize: {rc})")
