"""Scale factors folded into a tensor's values for a ``deci`` file (Granite's multipliers, which deci does
not read): the tensor dequantized, multiplied in float32 and stored again."""

from __future__ import annotations

import gguf
import numpy as np

from exporters.gguf.linearize import KEPT_TYPES, LOW_BIT_FUSED
from gatenorm.readers import Checkpoint

Q = gguf.GGMLQuantizationType


def folded_type(source: Q, row_length: int, exact: bool) -> Q:
    """The type a scaled tensor is stored as: F32 when a quantizer runs next (`exact`), else the source's
    float or Q8_0 type, Q8_0 for lower-bit sources (as fused weights, `exporters.gguf.linearize`), F16 where
    the rows do not split into blocks."""
    if exact:
        return Q.F32
    chosen = source if source in KEPT_TYPES else LOW_BIT_FUSED
    return chosen if row_length % gguf.GGML_QUANT_SIZES[chosen][0] == 0 else Q.F16


def folded_nbytes(qtype: Q, ne: list[int]) -> int:
    """Bytes of a tensor of dims `ne` (ggml order) stored as `qtype`."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(ne)) // block * size


def folded_bytes(ckpt: Checkpoint, name: str, factor: float, qtype: Q) -> bytes:
    """The stored bytes of tensor `name` times `factor`, as `qtype`."""
    value = ckpt._read(name)[1].numpy().astype(np.float32) * np.float32(factor)
    return gguf.quants.quantize(value, qtype).tobytes()
