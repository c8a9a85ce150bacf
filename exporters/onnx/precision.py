"""Weight precision of an exported graph: fp32 as traced, fp16, int8 (dynamic) or int4 (MatMulNBits)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import numpy as np
import onnx

from gatenorm.quiet import quiet

#: Weight bytes past which a model keeps its weights in an external data file (protobuf stops at 2 GB).
EXTERNAL_DATA_THRESHOLD = 2**31 - 1 - 64 * 2**20
#: Opset of int4 exports: int4 tensors need 21.
INT4_OPSET = 21


class Precision(str, Enum):
    """Weight precision of the exported model."""

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"
    INT4 = "int4"

    @property
    def quantizes_matmuls(self) -> bool:
        """Whether MatMul weights get replaced by quantized ones (int8, int4)."""
        return self in (Precision.INT8, Precision.INT4)


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


def convert_precision(model: onnx.ModelProto, precision: Precision, block_size: int = 32) -> onnx.ModelProto:
    """A copy of the fp32 `model` with its weights in `precision`; inputs and outputs stay float32.

    fp16 converts every float tensor (inputs and outputs keep float32 via Cast nodes); int8 is
    onnxruntime's dynamic quantization of MatMul weights (per channel); int4 is onnxruntime's
    weight-only MatMulNBits quantizer (symmetric, `block_size` weights per scale), which also turns the
    embedding lookup into GatherBlockQuantized.
    """
    with quiet("onnxruntime"):
        if precision is Precision.FP32:
            return model
        if precision is Precision.FP16:
            from onnxruntime.transformers.float16 import convert_float_to_float16

            return convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)
        if precision is Precision.INT8:
            return _quantize_int8(model)
        return _quantize_int4(model, block_size)


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
            use_external_data_format=needs_external_data(model),
            # onnx's shape inference has no types past onnxruntime's fused norms: they are float
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
        return onnx.load(str(dst))


def _quantize_int4(model: onnx.ModelProto, block_size: int) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    # The embedding table (Gather -> GatherBlockQuantized) needs opset 21 for its int4 tensor: the
    # quantizer would only relabel the opset, so convert the graph first. onnx's converter serializes
    # the model, so past 2 GB the table stays float32.
    quantize_embedding = not needs_external_data(model)
    if quantize_embedding:
        model = _convert_opset(model, INT4_OPSET)
    # accuracy_level 4: int8 activations in the MatMulNBits kernel (fast CPU path)
    quantizer = MatMulNBitsQuantizer(
        model,
        bits=4,
        block_size=block_size,
        is_symmetric=True,
        accuracy_level=4,
        op_types_to_quantize=("MatMul", "Gather") if quantize_embedding else ("MatMul",),
    )
    quantizer.process()
    return _share_tied_table(_pack_int4_gathers(quantizer.model.model))


#: onnxruntime operators in the default ONNX domain, unknown to onnx's version converter.
_ORT_DEFAULT_DOMAIN_OPS = frozenset({"SimplifiedLayerNormalization"})
_PARKED_DOMAIN = "gatenorm.parked"


def _convert_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """onnx's version converter, with onnxruntime's default-domain operators (no ONNX schema, nothing to
    convert) moved to a domain of their own while it runs."""
    from onnx import version_converter

    ours = _ORT_DEFAULT_DOMAIN_OPS
    parked = [n for n in model.graph.node if n.domain in ("", "ai.onnx") and n.op_type in ours]
    for node in parked:
        node.domain = _PARKED_DOMAIN
    if parked:
        model.opset_import.append(onnx.helper.make_opsetid(_PARKED_DOMAIN, 1))
    model = version_converter.convert_version(model, opset)
    for node in model.graph.node:
        if node.domain == _PARKED_DOMAIN:
            node.domain = ""
    kept = [o for o in model.opset_import if o.domain != _PARKED_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    return model


def _pack_int4_gathers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Store GatherBlockQuantized tables as uint8 (two 4-bit values a byte, zero point 8), not int4.

    The ORT format that ORT Mobile loads has no int4 tensor type; GatherBlockQuantized reads the same
    values from uint8 data packed along the last axis (low nibble first) with its ``bits`` attribute.
    """
    from onnx import numpy_helper

    initializers = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        table = initializers.get(node.input[0]) if node.op_type == "GatherBlockQuantized" else None
        if table is None or table.data_type != onnx.TensorProto.INT4 or len(node.input) > 3:
            continue
        values = numpy_helper.to_array(table).astype(np.int16) + 8  # signed int4 -> unsigned, zero point 8
        packed = (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)
        table.CopyFrom(numpy_helper.from_array(packed, table.name))
        kept = [attr for attr in node.attribute if attr.name != "bits"]
        del node.attribute[:]
        node.attribute.extend([*kept, onnx.helper.make_attribute("bits", 4)])
    return model


def _share_tied_table(model: onnx.ModelProto) -> onnx.ModelProto:
    """Store a tied embedding table once at int4: the lookup reads the LM head's MatMulNBits weight.

    Both quantizers turn the same matrix into the same 4-bit values and scales (checked, bit for bit):
    MatMulNBits keeps them as [vocab, blocks, block bytes], the lookup wants [vocab, hidden / 2], so the
    lookup gets a Reshape of the LM head's tensors (as onnxruntime-genai's builder does). Untied models, or
    tables that differ, are left as they are.
    """
    from onnx import numpy_helper

    initializers = {t.name: t for t in model.graph.initializer}
    gathers = [n for n in model.graph.node if n.op_type == "GatherBlockQuantized"]
    heads = [n for n in model.graph.node if n.op_type == "MatMulNBits" and n.input[1] in initializers]
    if len(gathers) != 1 or not heads or len(gathers[0].input) != 3:
        return model
    gather, head = gathers[0], heads[-1]  # the LM head is the graph's last MatMul
    if not all(name in initializers for name in (gather.input[0], gather.input[2], head.input[2])):
        return model
    table, table_scales = (numpy_helper.to_array(initializers[gather.input[i]]) for i in (0, 2))
    weight, weight_scales = (numpy_helper.to_array(initializers[head.input[i]]) for i in (1, 2))
    same = weight.size == table.size and weight_scales.size == table_scales.size
    if not same or len(head.input) > 3:
        return model
    if not (
        np.array_equal(weight.reshape(table.shape), table)
        and np.array_equal(weight_scales.reshape(table_scales.shape), table_scales)
    ):
        return model
    shape = numpy_helper.from_array(np.asarray(table.shape, np.int64), f"{gather.name}/shared_shape")
    scales_shape = numpy_helper.from_array(
        np.asarray(table_scales.shape, np.int64), f"{gather.name}/shared_scales_shape"
    )
    reshape = onnx.helper.make_node(
        "Reshape", [head.input[1], shape.name], [f"{gather.name}/shared_table"], name=f"{gather.name}/Reshape"
    )
    reshape_scales = onnx.helper.make_node(
        "Reshape",
        [head.input[2], scales_shape.name],
        [f"{gather.name}/shared_scales"],
        name=f"{gather.name}/ReshapeScales",
    )
    dropped = {gather.input[0], gather.input[2]}
    gather.input[0], gather.input[2] = reshape.output[0], reshape_scales.output[0]
    kept = [t for t in model.graph.initializer if t.name not in dropped]
    del model.graph.initializer[:]
    model.graph.initializer.extend([*kept, shape, scales_shape])
    position = list(model.graph.node).index(gather)
    model.graph.node.insert(position, reshape_scales)
    model.graph.node.insert(position, reshape)
    return model
