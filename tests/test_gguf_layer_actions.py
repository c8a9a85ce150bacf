"""GGUF export of the linearize (HARP) and drop-block (ShortGPT) actions, checked against PyTorch."""

from __future__ import annotations

import copy
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf_helpers import agreement, kv_state_bytes, llama_cpp_logits, torch_logits
from typer.testing import CliRunner

from exporters.export import export_gguf
from exporters.gguf import read_gguf_metadata, read_plan_metadata
from gatenorm.apply import apply_plan, load_model
from gatenorm.cli import app
from gatenorm.errors import GatenormError
from gatenorm.plan import LayerAction, Plan
from gatenorm.readers import open_checkpoint
from tests.conftest import SMOLLM2_MIXED_ACTIONS, SMOLLM2_MIXED_ALPHAS, mixed_plan, tiny_hf

A = LayerAction


def with_alphas(plan: Plan, alphas: dict[int, float]) -> Plan:
    doc = plan.model_dump(mode="json")
    for lp in doc["layers"]:
        lp["alpha"] = alphas.get(lp["layer"], lp["alpha"])
    return Plan.model_validate(doc)


@pytest.fixture(scope="module")
def smollm2_mixed(tmp_path_factory, smollm2_scored) -> tuple[Path, Plan]:
    """SmolLM2 pruned by the mixed plan, its tensors kept as Q4_1 (the fused ones written as Q8_0)."""
    plan = mixed_plan(smollm2_scored[0], SMOLLM2_MIXED_ACTIONS, SMOLLM2_MIXED_ALPHAS, smollm2_scored[1])
    out = tmp_path_factory.mktemp("smollm2-mixed") / "mixed.gguf"
    return export_gguf(smollm2_scored[0], plan, out), plan


def test_mixed_plan_file_layout_kv_cache_and_generation(smollm2_gguf, smollm2_mixed, smollm2_tokens):
    from llama_cpp import Llama

    out, plan = smollm2_mixed
    reader = gguf.GGUFReader(out)
    fields = {key: reader.fields[key].contents() for key in reader.fields if key.startswith("deci.")}
    written = [i for i in range(30) if i not in (26, 29)]  # dropped blocks are left out, the rest renumbered
    assert fields["deci.block_count"] == 28
    assert fields["deci.attention.head_count"] == [0 if i in (5, 7, 8) else 9 for i in written]
    assert fields["deci.attention.head_count_kv"] == [0 if i in (5, 7, 8, 17, 25) else 3 for i in written]
    assert fields["deci.feed_forward_length"] == [1536] * 28
    tensors = {t.name: t for t in reader.tensors}
    for new, old in enumerate(written):
        parts = {name.split(".")[2] for name in tensors if name.startswith(f"blk.{new}.")}
        attention = {"attn_norm", "attn_q", "attn_k", "attn_v", "attn_output"}
        expected = (
            {"attn_norm", "attn_output"} if old in (17, 25) else set() if old in (5, 7, 8) else attention
        )
        assert parts - {"ffn_norm", "ffn_gate", "ffn_up", "ffn_down"} == expected, old
    fused = tensors["blk.17.attn_output.weight"]  # source layer 17 keeps its index: nothing before it dropped
    assert list(fused.shape) == [576, 576] and fused.tensor_type == gguf.GGMLQuantizationType.Q8_0
    meta = read_gguf_metadata(out)
    assert meta["gatenorm.dropped_layers"] == [5, 7, 8]
    assert meta["gatenorm.linearized_layers"] == [17, 25]
    assert meta["gatenorm.linearize_alphas"] == pytest.approx([0.6, 1.4])
    assert meta["gatenorm.dropped_blocks"] == [26, 29]
    assert "pruned 7 of 30 layers" in meta["general.name"]
    assert read_plan_metadata(out) == plan
    # only the 23 kept layers own a K and V cache (flash attention on)
    ratio = kv_state_bytes(out, smollm2_tokens[:64]) / kv_state_bytes(smollm2_gguf, smollm2_tokens[:64])
    assert ratio == pytest.approx(23 / 30, abs=0.01)
    llm = Llama(str(out), n_ctx=256, n_threads=2, flash_attn=True, verbose=False)
    try:
        reply = llm.create_chat_completion(
            [{"role": "user", "content": "What is the capital of France?"}], max_tokens=16, temperature=0
        )
    finally:
        llm.close()
    assert len(reply["choices"][0]["message"]["content"].split()) >= 3


def test_mixed_plan_f32_matches_pytorch_and_alpha_matters(
    tmp_path, smollm2_scored, smollm2_model, smollm2_mixed, smollm2_tokens
):
    _, plan = smollm2_mixed
    out = export_gguf(smollm2_scored[0], plan, tmp_path / "mixed-f32.gguf", quant="F32")
    assert {t.tensor_type.name for t in gguf.GGUFReader(out).tensors} == {"F32"}
    exported = llama_cpp_logits(out, smollm2_tokens, flash_attn=True)
    kl, top1 = agreement(
        torch_logits(apply_plan(copy.deepcopy(smollm2_model), plan), smollm2_tokens), exported
    )
    assert kl < 1e-3 and top1 > 0.99, (kl, top1)
    wrong = with_alphas(plan, {17: 1.0, 25: 1.0})  # HARP without rescaling: the gate must notice
    kl, _ = agreement(torch_logits(apply_plan(copy.deepcopy(smollm2_model), wrong), smollm2_tokens), exported)
    assert kl > 1e-3, kl


@pytest.mark.parametrize("model_type", ["llama", "mistral"])
def test_tiny_mixed_plan_matches_pytorch(tmp_path, tokenizer_dir, model_type):
    """Layer 0 dropped whole (the first written layer is linear attention), the last layer linearized."""
    folder = tiny_hf(tmp_path / model_type, tokenizer_dir, model_type, num_hidden_layers=6)
    actions = {0: A.DROP_BLOCK, 1: A.LINEARIZE, 2: A.DROP_ATTENTION, 4: A.DROP_BLOCK, 5: A.LINEARIZE}
    plan = mixed_plan(open_checkpoint(folder), actions, {1: 0.5, 5: 1.7})
    out = export_gguf(folder, plan, tmp_path / "out.gguf", quant="F32")
    tokens = list(range(200, 328))
    reference = torch_logits(apply_plan(load_model(folder), plan), tokens)
    for flash_attn in (False, True):
        kl, top1 = agreement(reference, llama_cpp_logits(out, tokens, flash_attn))
        assert kl < 1e-5 and top1 > 0.95, (kl, top1)  # random weights: near-ties may flip
    quantized = export_gguf(folder, plan, tmp_path / "q8.gguf", quant="Q8_0")  # llama.cpp's quantizer
    kl, _ = agreement(reference, llama_cpp_logits(quantized, tokens))
    assert kl < 1e-3, kl  # random weights give near-flat logits: top-1 means little after quantization


def test_qwen2_drop_block_exports_and_linearize_is_refused(tmp_path, tokenizer_dir):
    folder = tiny_hf(tmp_path / "qwen2", tokenizer_dir, "qwen2")
    ckpt = open_checkpoint(folder)
    plan = mixed_plan(ckpt, {1: A.DROP_BLOCK, 3: A.DROP_ATTENTION}, {})
    out = export_gguf(folder, plan, tmp_path / "out.gguf", quant="F32")
    tokens = list(range(300, 364))
    kl, top1 = agreement(
        torch_logits(apply_plan(load_model(folder), plan), tokens), llama_cpp_logits(out, tokens)
    )
    assert kl < 1e-5 and top1 > 0.95, (kl, top1)
    with pytest.raises(GatenormError, match=r"linearize layers \[2\].*adds no bias"):
        export_gguf(folder, mixed_plan(ckpt, {2: A.LINEARIZE}, {2: 1.0}), tmp_path / "lin.gguf")
    assert not (tmp_path / "lin.gguf").exists()


def test_plan_keeping_no_attention_refused(tmp_path, tiny_gguf):
    """The first written layer's dropped attention is fine (tests/test_gguf_families.py), a file without any
    KV cache is not: llama.cpp creates no context for it."""
    ckpt = open_checkpoint(tiny_gguf)
    plan = mixed_plan(ckpt, {0: A.DROP_BLOCK, 1: A.DROP_ATTENTION}, {})
    with pytest.raises(GatenormError, match="keeps no attention"):
        export_gguf(ckpt, plan, tmp_path / "out.gguf")
    assert list(tmp_path.iterdir()) == []


def test_cli_inspect_shows_alphas(tmp_path, tiny_gguf):
    ckpt = open_checkpoint(tiny_gguf)
    plan_path, out = tmp_path / "plan.json", tmp_path / "out.gguf"
    mixed_plan(ckpt, {1: A.LINEARIZE}, {1: 0.75}).save(plan_path)
    args = ["export", str(tiny_gguf), "--plan", str(plan_path), "-o", str(out)]
    assert CliRunner().invoke(app, args).exit_code == 0
    shown = CliRunner().invoke(app, ["inspect", str(out)])
    assert shown.exit_code == 0 and "linearize" in shown.output and "0.75" in shown.output, shown.output
    assert np.isfinite(llama_cpp_logits(out, [1, 5, 9, 200], flash_attn=True)).all()
