"""The ONNX graph builder: every family x action (keep, mixed, healed) against the logits the traced
exporter gave (tests/data/onnx_traced_logits.npz, `onnx_reference`) and against the pruned PyTorch model
(prefill + 16 cached decode steps); its int4 weights against onnxruntime's quantizer; no model load."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx_reference import CASES, DATA, PLANS, build_checkpoint, build_plan, logits_of
from test_onnx_export import assert_graph_follows_plan, assert_matches_torch, layer_ops, runner_model

from exporters.onnx import OnnxRunner, export_onnx
from exporters.onnx.weights import quantize_int4
from gatenorm.apply import apply_plan, load_model

#: max |dlogit| between the built graph and the traced export's recorded logits (both fp32)
TRACED_TOL = 1e-4


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    with np.load(DATA) as data:
        return dict(data)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("builder-families")
    return {case: build_checkpoint(case, root / case) for case in CASES}


@pytest.mark.parametrize("kind", PLANS)
@pytest.mark.parametrize("case", list(CASES))
def test_built_graph_matches_traced_export_and_pytorch(checkpoints, reference, tmp_path, case, kind):
    folder = checkpoints[case]
    plan = build_plan(kind, folder, tmp_path)
    out = export_onnx(folder, plan, tmp_path / "onnx")
    if kind == "healed":  # each repaired layer: its one fitted matmul, nothing of attention
        model = onnx.load(str(out / runner_model(out)), load_external_data=False)
        for i in plan.repaired:
            assert layer_ops(model, i, "fused_attention")["MatMul"] == 1
            assert not [n for n in model.graph.node if f"/layers.{i}/" in n.name and "self_attn" in n.name]
    else:
        assert_graph_follows_plan(out, plan)
    got = logits_of(out)
    expected = reference[f"{case}/{kind}"]
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < TRACED_TOL, np.abs(got - expected).max()
    prompt = np.random.default_rng(2).integers(3, 128, (1, 11))
    assert_matches_torch(OnnxRunner(out), apply_plan(load_model(folder), plan), prompt)


def test_reference_data_covers_every_case(reference):
    assert sorted(reference) == sorted(f"{case}/{kind}" for case in CASES for kind in PLANS)
    assert DATA.stat().st_size < 2_000_000


def test_int4_weights_are_onnxruntimes_quantizer(tmp_path):
    """`quantize_int4` writes what onnxruntime's MatMulNBitsQuantizer writes for the same MatMul weight,
    bit for bit (K not a multiple of the block included)."""
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    for k, n, block in ((64, 48, 32), (80, 24, 32), (128, 16, 16)):
        w = np.random.default_rng(k).standard_normal((k, n)).astype(np.float32)  # the MatMul's [K, N]
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
            [numpy_helper.from_array(w, "w")],
        )
        quantizer = MatMulNBitsQuantizer(
            helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
            bits=4,
            block_size=block,
            is_symmetric=True,
        )
        quantizer.process()
        inits = {t.name: numpy_helper.to_array(t) for t in quantizer.model.model.graph.initializer}
        packed, scales = quantize_int4(w.T, block)
        assert np.array_equal(inits["w_Q4"], packed)
        assert np.array_equal(inits["w_scales"], scales)


def test_int4_export_reads_one_layer_at_a_time(checkpoints, tmp_path, monkeypatch):
    """An int4 export of a mixed plan never loads the model, builds each layer it keeps anything of once,
    quantizes the embedding table too and runs close to the fp32 export."""
    import gatenorm.apply
    from gatenorm.sequential import SequentialModel

    folder = checkpoints["tiny-llama"]
    plan = build_plan("mixed", folder, tmp_path)
    fp32 = logits_of(export_onnx(folder, plan, tmp_path / "fp32"))

    def never(*args, **kwargs):
        raise AssertionError("the export loaded the whole model")

    built = []
    build = SequentialModel.build
    monkeypatch.setattr(gatenorm.apply, "load_model", never)
    monkeypatch.setattr(SequentialModel, "build", lambda self, i, *a: built.append(i) or build(self, i, *a))
    out = export_onnx(folder, plan, tmp_path / "int4", "int4", block_size=16)
    assert built == [0, 1, 2]  # layer 3 is dropped whole: nothing read
    model = onnx.load(str(out / runner_model(out)))
    ops = Counter(n.op_type for n in model.graph.node)
    # linearized 3, no attention 2, kept 4, LM head 1; the (untied) embedding its own int4 table
    assert ops["MatMulNBits"] == 10 and ops["GatherBlockQuantized"] == 1
    got = logits_of(out)
    assert np.linalg.norm(got - fp32) / np.linalg.norm(fp32) < 0.5
