"""Weight precision of an exported graph: fp32 and int4 (MatMulNBits) as the builder writes them, fp16 and
int8 (dynamic) converted from the built fp32 graph."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import onnx

from gatenorm.quiet import quiet

#: Weight bytes past which a model keeps its weights in an external data file (protobuf stops at 2 GB).
EXTERNAL_DATA_THRESHOLD = 2**31 - 1 - 64 * 2**20


class Precision(str, Enum):
    """Weight precision of the exported model."""

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"
    INT4 = "int4"


def initializer_bytes(model: onnx.ModelProto, skip: frozenset[str] = frozenset()) -> int:
    """Bytes of `model`'s initializers (weights), leaving out those named in `skip`."""
    total = 0
    for t in model.graph.initializer:
        if t.name in skip:
            continue
        n = 1
        for d in t.dims:
            n *= d
        total += n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return total


def needs_external_data(model: onnx.ModelProto) -> bool:
    """Whether `model` is too big for one protobuf file (and for passes that serialize it whole)."""
    return initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Save `model` at `path`; weights go to ``<name>_data`` beside it when the file would pass 2 GB."""
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=needs_external_data(model),
        all_tensors_to_one_file=True,
        location=f"{path.name}_data",  # model.onnx_data: the name transformers.js and optimum use
        size_threshold=1024,
    )


def convert_precision(model: onnx.ModelProto, precision: Precision) -> onnx.ModelProto:
    """A copy of the fp32 `model` with its weights in fp16 or int8; inputs and outputs stay float32 (fp32
    and int4 weights are written by the builder as it goes).

    fp16 converts every float tensor (inputs and outputs keep float32 via Cast nodes); int8 is
    onnxruntime's dynamic quantization of MatMul weights (per channel).
    """
    with quiet("onnxruntime"):
        if precision is Precision.FP16:
            from onnxruntime.transformers.float16 import convert_float_to_float16

            return convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)
        if precision is Precision.INT8:
            return _quantize_int8(model)
    raise ValueError(f"convert_precision converts to fp16 or int8, not {precision.value}")


def _quantize_int8(model: onnx.ModelProto) -> onnx.ModelProto:
    import tempfile

    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="gatenorm-int8-") as tmp:
        src, dst = Path(tmp, "fp32.onnx"), Path(tmp, "int8.onnx")
        save_model(model, src)
        quantize_dynamic(
            src,
            dst,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul"],
            per_channel=True,
            # 7-bit weights: onnxruntime's u8 x s8 kernels on x86 CPUs without VNNI sum pairs of products
            # in int16, which full-range weights saturate (a tiny llama on such a CPU: relative logit error
            # 0.198, over tests/test_onnx_export.py's 0.15)
            reduce_range=True,
            use_external_data_format=needs_external_data(model),
            # onnx's shape inference has no types past onnxruntime's fused norms: they are float
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
        return onnx.load(str(dst))
