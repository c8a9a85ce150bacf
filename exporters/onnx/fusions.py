"""Graph fusions onnxruntime's transformer optimizer does on the traced fp32 graph, before quantization.

The trace writes each residual Add apart from the RMSNorm that follows it and leaves float->float Casts
of transformers' norms; onnxruntime's ``FusionSkipSimplifiedLayerNormalization`` turns Add +
``SimplifiedLayerNormalization`` into one ``SkipSimplifiedLayerNormalization`` (whose extra output carries
the residual sum on), and ``remove_useless_cast_nodes`` drops the Casts. onnxruntime does neither at
session start, so each saves nodes at every step in every client.
"""

from __future__ import annotations

import onnx

from gatenorm.quiet import quiet


def fuse_norms(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with residual Adds fused into the following RMSNorms and no-op Casts removed."""
    from onnxruntime.transformers.fusion_simplified_layernorm import FusionSkipSimplifiedLayerNormalization
    from onnxruntime.transformers.onnx_model import OnnxModel

    norms = [n for n in model.graph.node if n.op_type == "SimplifiedLayerNormalization"]
    norm_names = {n.output[0]: n.name for n in norms}
    with quiet("onnxruntime", "fusion", "onnx_model"):
        graph = OnnxModel(model)
        graph.remove_useless_cast_nodes()
        FusionSkipSimplifiedLayerNormalization(graph).apply()
        graph.prune_graph()
    for node in graph.model.graph.node:  # the fused node keeps the norm's output: give it the norm's name
        if node.op_type == "SkipSimplifiedLayerNormalization" and node.output[0] in norm_names:
            node.name = norm_names[node.output[0]]
    return graph.model
