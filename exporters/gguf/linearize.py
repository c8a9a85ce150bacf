"""HARP's fused value-output matrix of a linearized layer, as the ``attn_output`` tensor of a ``deci`` GGUF.

llama.cpp's ``deci`` runs a layer with ``head_count > 0`` and ``head_count_kv == 0`` as "linear attention":
``h + wo @ attn_norm(h)`` with a ``{n_embd, n_embd}`` ``attn_output`` and no bias, q/k/v or KV cache. So the
layer keeps its ``attn_norm``, and ``attn_output`` becomes ``alpha * W_o @ repeat_kv(W_v)``, computed in
float64 from the dequantized v/o tensors (which llama's converter stores unpermuted, in HF layout).
"""

from __future__ import annotations

import gguf
import numpy as np

from gatenorm.harp import fuse_value_output
from gatenorm.readers import Checkpoint

Q = gguf.GGMLQuantizationType
#: Source types a fused weight keeps; from any lower-bit type it becomes `LOW_BIT_FUSED`.
KEPT_TYPES = frozenset({Q.F32, Q.F16, Q.BF16, Q.Q8_0})
LOW_BIT_FUSED = Q.Q8_0


def fused_type(source: Q, d_model: int, exact: bool) -> Q:
    """The type of a fused ``d x d`` weight that replaces an ``attn_output`` of type `source`.

    `exact` (llama.cpp's quantizer runs afterwards and picks the final type): F32. Otherwise float and
    Q8_0 sources keep their type; lower-bit ones (Q4_1, K-quants, ...) give Q8_0, since the fused matrix
    already carries the rounding of two quantized ones: on SmolLM2 Q4_1 with two layers linearized, a
    Q4_1 fused weight added KL 0.012 against PyTorch where Q8_0 added none (0.0027, F16: 0.0031).
    """
    if exact:
        return Q.F32
    chosen = source if source in KEPT_TYPES else LOW_BIT_FUSED
    return chosen if d_model % gguf.GGML_QUANT_SIZES[chosen][0] == 0 else Q.F16


def fused_nbytes(ggml_type: Q, d_model: int) -> int:
    """Bytes of a ``d x d`` tensor of `ggml_type`."""
    block, size = gguf.GGML_QUANT_SIZES[ggml_type]
    return d_model * d_model // block * size


def fused_value_output_bytes(ckpt: Checkpoint, layer: int, alpha: float, ggml_type: Q) -> bytes:
    """The stored bytes of `layer`'s ``alpha * W_o @ repeat_kv(W_v)`` (rows = outputs) as `ggml_type`."""
    s = ckpt.shape
    w = ckpt.read_attention(layer, ("v", "o"))
    weight, _ = fuse_value_output(w.v, w.o, s.n_head, s.n_head_kv, alpha)
    return gguf.quants.quantize(weight.numpy().astype(np.float32), ggml_type).tobytes()


def repair_type(source: Q, d_model: int, exact: bool) -> Q:
    """The type of a repaired layer's ``attn_output`` (its fitted ``d x d`` map), whose source was `source`.

    `exact` (llama.cpp's quantizer runs afterwards): F32, and the quantizer is told to store it as Q8_0
    (`exporters.gguf.quantize.quantize_gguf`'s overrides), so it ends at Q8_0 or better whatever the file
    type; otherwise as `fused_type` (F32/F16/BF16/Q8_0 sources keep their type, lower-bit ones give Q8_0,
    F16 where the rows do not split into blocks)."""
    return fused_type(source, d_model, exact)


def repair_bytes(weight: np.ndarray, scale: float, ggml_type: Q) -> bytes:
    """The stored bytes of a repair's ``scale * W`` (float32 ``d x d``, rows = outputs) as `ggml_type`."""
    value = np.ascontiguousarray(weight, dtype=np.float32) * np.float32(scale)
    return gguf.quants.quantize(value, ggml_type).tobytes()
