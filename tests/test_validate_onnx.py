"""The onnxruntime adapter on a real ONNX export of SmolLM2."""

from __future__ import annotations

from exporters import onnx as onnx_export
from gatenorm.methods import Method, score_checkpoint
from gatenorm.plan import make_plan
from gatenorm.readers import open_checkpoint
from gatenorm.validate.gates import Gates
from gatenorm.validate.run import Settings, validate
from gatenorm.validate.runtimes import model_spec


def test_onnx_export_agrees_with_pytorch_plan(smollm2_hf, tmp_path):
    """The pruned ONNX export matches PyTorch with the same plan; validated against itself it gives KLD 0."""
    ckpt = open_checkpoint(smollm2_hf)
    plan = make_plan(ckpt, score_checkpoint(ckpt, Method.GATE_NORM, 0), drop=2)
    plan.save(tmp_path / "plan.json")
    folder = onnx_export.export_onnx(smollm2_hf, plan, tmp_path / "onnx")
    onnx = model_spec(str(folder))
    assert onnx.runtime == "onnx"
    settings = Settings(ctx=256, max_tokens=256, tasks=["arc_easy"], limit=4, threads=1)

    torch_pruned = model_spec(str(smollm2_hf), plan=tmp_path / "plan.json")
    report = validate(torch_pruned, onnx, settings, Gates())
    a = report.agreement
    assert a.kld_mean < 1e-4 and a.top1 > 0.99 and abs(a.ppl_ratio - 1) < 1e-3
    task = report.zeroshot.tasks["arc_easy"]
    assert task.reference.acc == task.candidate.acc

    self_report = validate(onnx, onnx, Settings(ctx=256, max_tokens=256, tasks=[], threads=1), Gates())
    assert self_report.agreement.kld_mean == 0 and self_report.agreement.top1 == 1
