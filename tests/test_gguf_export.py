"""GGUF exporter: pruned files that stock llama.cpp runs, checked against the source and against PyTorch."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf_helpers import (
    agreement,
    kv_state_bytes,
    llama_cpp_logits,
    llama_cpp_tokens,
    torch_logits,
    wiki_text,
)
from typer.testing import CliRunner

from exporters.export import export, export_gguf
from exporters.gguf import read_plan_metadata
from gatenorm.apply import apply_plan, load_model, load_tokenizer
from gatenorm.cli import app
from gatenorm.errors import GatenormError
from gatenorm.methods import score_checkpoint
from gatenorm.plan import Plan, make_plan
from gatenorm.readers import Checkpoint, open_checkpoint
from gatenorm.scoring import LayerScores
from tests.conftest import tiny_hf


def plan_for(model: Path | Checkpoint, drop: int, scores: LayerScores | None = None) -> Plan:
    ckpt = model if isinstance(model, Checkpoint) else open_checkpoint(model)
    return make_plan(ckpt, scores or score_checkpoint(ckpt, "gate-norm"), drop)


def only_plan_keeping(plan: Plan, dropped: list[int]) -> Plan:
    """`plan` with exactly `dropped` dropped (for tests that need particular layers)."""
    doc = plan.model_dump(mode="json")
    for lp in doc["layers"]:
        lp["action"] = "drop-attention" if lp["layer"] in dropped else "keep"
    doc["budget"] = len(dropped)
    return Plan.model_validate(doc)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def smollm2_pruned(tmp_path_factory, smollm2_scored) -> tuple[Path, Plan]:
    """SmolLM2 with 8 attention sublayers removed by Gate-Norm, its tensors kept as Q4_1."""
    plan = plan_for(smollm2_scored[0], 8, smollm2_scored[1])
    out = tmp_path_factory.mktemp("smollm2-pruned") / "smollm2-d8.gguf"
    export_gguf(smollm2_scored[0], plan, out)
    return out, plan


# --- GGUF in -> GGUF out, on the real SmolLM2 ---------------------------------------------------------


def test_unpruned_export_is_logit_identical_and_copies_bytes(
    tmp_path, smollm2_scored, smollm2_gguf, smollm2_tokens
):
    out = export_gguf(
        smollm2_scored[0], plan_for(smollm2_scored[0], 0, smollm2_scored[1]), tmp_path / "d0.gguf"
    )
    src, dst = gguf.GGUFReader(smollm2_gguf), gguf.GGUFReader(out)
    assert dst.fields["general.architecture"].contents() == "llama"  # no layer changed: source architecture
    assert [t.name for t in dst.tensors] == [t.name for t in src.tensors]
    for a, b in zip(src.tensors, dst.tensors, strict=True):
        assert a.tensor_type == b.tensor_type and np.array_equal(a.data, b.data), a.name
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.chat_template"):
        assert dst.fields[key].contents() == src.fields[key].contents()
    tokens = smollm2_tokens[:128]
    assert np.array_equal(llama_cpp_logits(smollm2_gguf, tokens), llama_cpp_logits(out, tokens))


def test_pruned_export_drops_tensors_and_kv_cache(smollm2_gguf, smollm2_pruned, smollm2_tokens):
    out, plan = smollm2_pruned
    reader = gguf.GGUFReader(out)
    heads = reader.fields["deci.attention.head_count"].contents()
    assert heads == [0 if i in plan.dropped else 9 for i in range(30)]
    assert reader.fields["deci.attention.head_count_kv"].contents() == [0 if h == 0 else 3 for h in heads]
    assert reader.fields["deci.feed_forward_length"].contents() == [1536] * 30
    names = {t.name for t in reader.tensors}
    for i in range(30):
        for part in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output"):
            assert (f"blk.{i}.{part}.weight" in names) == (i not in plan.dropped)
        assert f"blk.{i}.ffn_down.weight" in names
    assert "gatenorm" in reader.fields["general.name"].contents()
    assert read_plan_metadata(out) == plan
    # the dropped layers own no K or V cache (flash attention on): the state shrinks by 8/30
    source_kv = kv_state_bytes(smollm2_gguf, smollm2_tokens[:256])
    pruned_kv = kv_state_bytes(out, smollm2_tokens[:256])
    assert pruned_kv / source_kv == pytest.approx(22 / 30, abs=0.01)


def test_pruned_export_generates_with_flash_attention(smollm2_pruned):
    from llama_cpp import Llama

    llm = Llama(str(smollm2_pruned[0]), n_ctx=256, n_threads=2, flash_attn=True, verbose=False)
    try:
        reply = llm.create_chat_completion(
            [{"role": "user", "content": "What is the capital of France?"}], max_tokens=16, temperature=0
        )
    finally:
        llm.close()
    text = reply["choices"][0]["message"]["content"]
    assert len(text.split()) >= 3


def test_f32_export_matches_pytorch_pruned_model(
    tmp_path, smollm2_scored, smollm2_model, smollm2_pruned, smollm2_tokens
):
    _, plan = smollm2_pruned
    out = export_gguf(smollm2_scored[0], plan, tmp_path / "d8-f32.gguf", quant="F32")
    types = {gguf.GGMLQuantizationType(t.tensor_type).name for t in gguf.GGUFReader(out).tensors}
    assert types == {"F32"}
    reference = torch_logits(apply_plan(copy.deepcopy(smollm2_model), plan), smollm2_tokens)
    kl, top1 = agreement(reference, llama_cpp_logits(out, smollm2_tokens, flash_attn=True))
    assert kl < 1e-3 and top1 > 0.99, (kl, top1)


def test_quantized_export_with_llama_cpp_quantizer(tmp_path, smollm2_scored, smollm2_pruned, smollm2_tokens):
    out = export_gguf(smollm2_scored[0], smollm2_pruned[1], tmp_path / "d8-q8.gguf", quant="Q8_0")
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    assert read_plan_metadata(out) == smollm2_pruned[1]
    kl, top1 = agreement(
        llama_cpp_logits(smollm2_pruned[0], smollm2_tokens[:64]), llama_cpp_logits(out, smollm2_tokens[:64])
    )
    assert kl < 0.05 and top1 > 0.8, (kl, top1)  # Q4_1 -> Q8_0: requantized, close to the Q4_1 file


def test_header_scanner_reads_what_gguf_py_reads(smollm2_gguf, tiny_gguf):
    from exporters.gguf.header import ScannedGGUF

    for path in (smollm2_gguf, tiny_gguf):
        scanned, reader = ScannedGGUF(path), gguf.GGUFReader(path)
        assert list(scanned.fields) == [k for k in reader.fields if not k.startswith("GGUF.")]
        for key, field in scanned.fields.items():
            theirs = reader.fields[key]
            assert (field.types, field.contents()) == (theirs.types, theirs.contents())

        def table(tensors):
            return [(t.name, list(t.shape), t.tensor_type, t.data_offset, t.n_bytes) for t in tensors]

        assert table(scanned.tensors) == table(reader.tensors)


def test_truncated_source_refused(tmp_path, smollm2_gguf):
    from exporters.export import open_model

    truncated = tmp_path / "cut.gguf"
    with open(smollm2_gguf, "rb") as f:
        truncated.write_bytes(f.read(50_000_000))
    with pytest.raises(GatenormError, match="truncated"):
        open_model(truncated)
    truncated.write_bytes(truncated.read_bytes()[:100_000])  # inside the tokenizer metadata
    with pytest.raises(GatenormError, match="corrupt or truncated"):
        open_model(truncated)


# --- refusals and atomic writes -----------------------------------------------------------------------


def test_plan_for_another_model_refused(tmp_path, smollm2_scored, tiny_gguf):
    with pytest.raises(GatenormError, match="2-layer"):
        export_gguf(smollm2_scored[0], plan_for(tiny_gguf, 1), tmp_path / "out.gguf")
    tampered = plan_for(smollm2_scored[0], 2, smollm2_scored[1]).model_dump(mode="json")
    tampered["source"]["sha256"] = "0" * 64
    with pytest.raises(GatenormError, match="made for"):
        export_gguf(smollm2_scored[0], Plan.model_validate(tampered), tmp_path / "out.gguf")
    assert leftovers(tmp_path) == []


def test_failed_write_leaves_nothing(tmp_path, monkeypatch, tiny_gguf):
    import exporters.gguf.from_gguf as from_gguf

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(from_gguf, "_copy_bytes", broken)
    (tmp_path / "out.gguf").write_bytes(b"previous")
    with pytest.raises(GatenormError, match=f"^cannot write {tmp_path / 'out.gguf'}: No space left"):
        export_gguf(tiny_gguf, plan_for(tiny_gguf, 1), tmp_path / "out.gguf")
    assert leftovers(tmp_path) == ["out.gguf"] and (tmp_path / "out.gguf").read_bytes() == b"previous"


def test_quantizer_fallbacks_are_one_warning(tmp_path, tiny_gguf, capfd, caplog):
    """llama.cpp warns per tensor whose width the mix's type cannot take (all of tiny's 16-wide ones):
    collected into one warning line, and llama-cpp-python's own log callback is back afterwards."""
    import llama_cpp

    out = export_gguf(tiny_gguf, plan_for(tiny_gguf, 1), tmp_path / "q4.gguf", quant="Q4_K_M")
    err = capfd.readouterr().err
    assert "not divisible" not in err and "falling back" not in err, err
    [record] = [r for r in caplog.records if r.name == "gatenorm.export"]
    assert record.levelname == "WARNING" and "fell back from the Q4_K_M mix" in record.getMessage()
    llama_cpp.Llama(str(out), verbose=True, n_ctx=16)  # llama.cpp's log reaches the console again
    assert "llama_model_loader" in capfd.readouterr().err


def test_unknown_quant_refused(tmp_path, tiny_gguf):
    with pytest.raises(GatenormError, match="unknown --quant"):
        export_gguf(tiny_gguf, plan_for(tiny_gguf, 1), tmp_path / "out.gguf", quant="Q3_X")


# --- HF folder in -> GGUF out -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model_type", "quant", "max_kl", "overrides"),
    [
        ("llama", "F32", 1e-5, {}),
        ("qwen2", "F32", 1e-5, {}),
        ("llama", "BF16", 2e-3, {"attention_bias": True, "tie_word_embeddings": True}),
    ],
    ids=["llama-f32", "qwen2-bias-neox-f32", "llama-bias-tied-bf16"],
)
def test_hf_export_matches_pytorch(tmp_path, tokenizer_dir, model_type, quant, max_kl, overrides):
    folder = tiny_hf(tmp_path / model_type, tokenizer_dir, model_type, **overrides)
    plan = plan_for(folder, 2)
    out = export_gguf(folder, plan, tmp_path / "out.gguf", quant=quant)
    weight_types = {t.tensor_type.name for t in gguf.GGUFReader(out).tensors if len(t.shape) > 1}
    assert weight_types == {quant}
    tokens = list(range(200, 328))
    reference = torch_logits(apply_plan(load_model(folder), plan), tokens)
    for flash_attn in (False, True):
        kl, top1 = agreement(reference, llama_cpp_logits(out, tokens, flash_attn))
        assert kl < max_kl and top1 > 0.95, (kl, top1)  # random weights: near-ties may flip
    assert read_plan_metadata(out) == plan


def test_qwen2_gguf_source_quantized_rows_reordered(tmp_path, tokenizer_dir):
    """A qwen2 GGUF (NEOX rope, HF row order) with Q8_0 q/k: deci needs NORM order, moved as raw rows."""
    from exporters.gguf.from_hf import hf_to_gguf
    from exporters.gguf.quantize import quantize_gguf

    folder = tiny_hf(tmp_path / "qwen2", tokenizer_dir, "qwen2")
    hf_to_gguf(open_checkpoint(folder), tmp_path / "qwen2-f32.gguf", "F32")
    source = tmp_path / "qwen2-q8.gguf"
    quantize_gguf(tmp_path / "qwen2-f32.gguf", source, "Q8_0")
    ckpt = open_checkpoint(source)
    assert ckpt.tensors["blk.1.attn_q.weight"].tensor_type.name == "Q8_0"
    tokens = list(range(300, 364))
    reference = llama_cpp_logits(source, tokens)
    out = export_gguf(ckpt, plan_for(ckpt, 0), tmp_path / "deci.gguf")
    assert np.abs(llama_cpp_logits(out, tokens) - reference).max() < 1e-3
    pruned = export_gguf(ckpt, plan_for(ckpt, 2), tmp_path / "deci-d2.gguf")
    assert np.abs(llama_cpp_logits(pruned, tokens) - reference).max() > 1e-2  # pruning does change it


def test_hf_export_tokenizer_and_quant(tmp_path, tokenizer_dir):

    folder = tiny_hf(tmp_path / "llama", tokenizer_dir, "llama")
    plan = plan_for(folder, 1)
    out = export_gguf(folder, plan, tmp_path / "out.gguf", quant="Q8_0")
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    assert reader.fields["tokenizer.chat_template"].contents().startswith("{% for message")
    text = wiki_text(1)
    assert llama_cpp_tokens(out, text) == load_tokenizer(folder)(text)["input_ids"]


# --- CLI ----------------------------------------------------------------------------------------------


def test_cli_export_plan_and_inspect(tmp_path, tiny_gguf):
    runner = CliRunner()
    plan_path, out = tmp_path / "plan.json", tmp_path / "tiny-pruned.gguf"
    assert runner.invoke(app, ["plan", str(tiny_gguf), "--drop", "1", "-o", str(plan_path)]).exit_code == 0
    args = ["export", str(tiny_gguf), "--plan", str(plan_path), "--to", "gguf", "-o", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert read_plan_metadata(out) == Plan.load(plan_path)
    shown = runner.invoke(app, ["inspect", str(out)])
    assert shown.exit_code == 0 and "drop-attention" in shown.output and "gatenorm.method" in shown.output


def test_cli_one_step_export(tmp_path, tiny_gguf):
    out = tmp_path / "tiny-d1.gguf"
    args = ["export", "tiny", "--drop", "1", "--method", "gate-norm", "-o", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert read_plan_metadata(out).dropped == [1]
    assert np.isfinite(llama_cpp_logits(out, [1, 5, 9, 200], flash_attn=True)).all()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--drop", "1", "--plan", "plan.json"], "exactly one of"),
        (["--plan", "missing.json"], "no such plan file"),
        (["--drop", "1", "--quant", "Q9"], "unknown --quant"),
    ],
)
def test_cli_export_errors_are_one_line(tmp_path, monkeypatch, args, message):

    monkeypatch.chdir(tmp_path)
    (tmp_path / "plan.json").write_text("{}")
    cmd = [sys.executable, "-m", "gatenorm.cli", "export", "tiny", "-o", "out.gguf", *args]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 2 and message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "out.gguf").exists()


def test_inspect_refuses_plain_gguf(smollm2_gguf):
    result = CliRunner().invoke(app, ["inspect", str(smollm2_gguf)])
    assert isinstance(result.exception, GatenormError) and "no gatenorm metadata" in str(result.exception)


def test_export_entry_point_dispatches_by_target(tmp_path, tiny_gguf):
    with pytest.raises(ValueError):
        export(tiny_gguf, plan_for(tiny_gguf, 1), tmp_path / "x", target="tflite")


@pytest.mark.slow
def test_smollm2_hf_folder_export_matches_gguf_export(tmp_path, smollm2_scored, smollm2_model, tokenizer_dir):
    """SmolLM2 as an HF folder (fp32 safetensors, GPT-2 BPE tokenizer) -> F32 GGUF: same as from the GGUF."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "smollm2-hf"
    model = AutoModelForCausalLM.from_config(smollm2_model.config)
    model.load_state_dict(smollm2_model.state_dict())
    model.save_pretrained(folder, safe_serialization=True)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, folder / f.name)
    plan_gguf = plan_for(smollm2_scored[0], 8, smollm2_scored[1])
    plan_hf = plan_for(folder, 8)
    assert plan_hf.dropped == plan_gguf.dropped  # Gate-Norm does not depend on the file format
    from_hf = export_gguf(folder, plan_hf, tmp_path / "from-hf.gguf", quant="F32")
    from_gguf = export_gguf(smollm2_scored[0], plan_gguf, tmp_path / "from-gguf.gguf", quant="F32")
    text = wiki_text(2)
    tokens = load_tokenizer(folder)(text)["input_ids"]  # this folder's GPT-2 tokenizer, not SmolLM2's own
    assert llama_cpp_tokens(from_hf, text) == tokens
    kl, top1 = agreement(llama_cpp_logits(from_gguf, tokens[:256]), llama_cpp_logits(from_hf, tokens[:256]))
    assert kl < 1e-6 and top1 > 0.99, (kl, top1)
