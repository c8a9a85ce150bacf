"""The weights of a built ONNX graph: appended one tensor at a time to its external-data file, each
quantized to the export's precision as it is written (int4: onnxruntime's own MatMulNBits block quantizer,
per tensor), so neither the float32 model nor the graph's weights are ever held whole."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx

#: Byte alignment of large tensors in the data file (a page: onnxruntime can map them in place).
PAGE = 4096
#: Tensors from this many bytes on start on a page boundary; smaller ones on 64 bytes.
PAGE_ALIGNED_FROM = 1 << 20


def quantize_int4(weight: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """`weight` [N, K] (rows are outputs, HF layout) as MatMulNBits' B [N, K/block, block/2] (uint8, two
    4-bit values a byte, low nibble first, zero point 8) and scales [N, K/block] (float32).

    This is what ``onnxruntime.quantization.matmul_nbits_quantizer`` does to a MatMul weight (its
    ``DefaultWeightOnlyQuantizer.qbits_block_quant``: symmetric blocks along K, K padded to whole blocks,
    through onnxruntime's ``quantize_matmul_4bits``), on one tensor.
    """
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    cols, rows = weight.shape  # N, K: the MatMul weight is its transpose [K, N]
    blocks = (rows + block_size - 1) // block_size
    kn = np.ascontiguousarray(weight.T, dtype=np.float32)
    if rows % block_size:
        kn = np.pad(kn, ((0, blocks * block_size - rows), (0, 0)))
    packed = np.zeros((cols, blocks, block_size // 2), dtype=np.uint8)
    scales = np.zeros((cols, blocks), dtype=np.float32)
    zero_points = np.zeros((cols, (blocks + 1) // 2), dtype=np.uint8)
    quantize_matmul_4bits(packed, kn, scales, zero_points, block_size, cols, rows, True)
    return packed, scales


class ExternalData:
    """The external-data file of a model being built: tensors appended at offsets written here, each
    initializer proto only naming its place (``data_location`` EXTERNAL)."""

    def __init__(self, path: Path):
        self.path = path
        self._file = path.open("wb")
        self.offset = 0

    def close(self) -> None:
        self._file.close()

    def _align(self, size: int) -> None:
        step = PAGE if size >= PAGE_ALIGNED_FROM else 64
        pad = -self.offset % step
        if pad:
            self._file.write(b"\0" * pad)
            self.offset += pad

    def tensor(self, name: str, array: np.ndarray) -> onnx.TensorProto:
        """Append `array` and return its initializer."""
        return self.stream(name, array.dtype, array.shape, [array])

    def stream(
        self, name: str, dtype: np.dtype, shape: tuple[int, ...], chunks: Iterable[np.ndarray]
    ) -> onnx.TensorProto:
        """Append the tensor `name` of `shape` from `chunks` (its C-order bytes, in order, each freed once
        written) and return its initializer."""
        dtype = np.dtype(dtype)
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        self._align(size)
        start = self.offset
        for chunk in chunks:
            data = np.ascontiguousarray(chunk, dtype=dtype.newbyteorder("<")).tobytes()
            self._file.write(data)
            self.offset += len(data)
        if self.offset - start != size:
            raise ValueError(f"{name}: wrote {self.offset - start} bytes, its shape {shape} needs {size}")
        proto = onnx.TensorProto(name=name, data_type=onnx.helper.np_dtype_to_tensor_dtype(dtype))
        proto.dims.extend(int(d) for d in shape)
        proto.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", start), ("length", size)):
            entry = proto.external_data.add()
            entry.key, entry.value = key, str(value)
        return proto
