"""GGUF of the families that need more than a copy of their tensors to run in stock llama.cpp: Llama-3.x's
rope scaling (the generated ``rope_freqs`` tensor), Phi-3 (fused qkv / gate_up split for deci) and Granite
(its multipliers folded into the weights), each checked on llama.cpp's logits against transformers (F32,
tiny random models, a context past the scaled rope's original length)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from deci_helpers import rewritten
from gguf_helpers import agreement, llama_cpp_logits, torch_logits

from exporters.export import export_gguf
from gatenorm.apply import apply_plan, load_model
from gatenorm.errors import GatenormError
from gatenorm.plan import LayerAction
from gatenorm.readers import open_checkpoint
from tests.conftest import mixed_plan, tiny_hf

A = LayerAction
TOKENS = list(range(300, 428))  # 128 tokens: 8x the scaled rope's original context below
LLAMA3 = {
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    },
    "head_dim": 16,
    "num_attention_heads": 4,
}


def _report(label: str, reference: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    kl, _ = agreement(reference, other)
    delta = float(np.abs(reference - other).max())
    print(f"{label}: max |dlogit| {delta:.2e}, KL {kl:.2e}")
    return delta, kl


def test_llama3_rope_freqs_from_hf_unchanged_and_pruned(tmp_path, tokenizer_dir):
    folder = tiny_hf(tmp_path / "llama3", tokenizer_dir, "llama", **LLAMA3)
    ckpt = open_checkpoint(folder)
    model = load_model(folder)
    same = export_gguf(folder, mixed_plan(ckpt, {}, {}), tmp_path / "same.gguf", quant="F32")
    tensors = {t.name: t for t in gguf.GGUFReader(same).tensors}
    factors = np.asarray(tensors["rope_freqs.weight"].data)
    # wavelengths 2 pi / theta^(-2i/16) against 16/4 and 16/1: the first interpolated, the rest x8
    smooth = (16 / (2 * np.pi) - 1) / (4 - 1)  # the first wavelength, 2 pi, lies between 16/4 and 16/1
    assert factors[0] == pytest.approx(1 / ((1 - smooth) / 8 + smooth))
    assert factors[1:].tolist() == [8.0] * 7  # the others are longer than 16: divided by 8
    reference = torch_logits(model, TOKENS)
    delta, kl = _report("llama3 rope unchanged (llama)", reference, llama_cpp_logits(same, TOKENS))
    assert kl < 1e-6
    plain = dict(LLAMA3, rope_scaling=None)
    unscaled = torch_logits(load_model(tiny_hf(tmp_path / "plain", tokenizer_dir, "llama", **plain)), TOKENS)
    assert agreement(reference, unscaled)[0] > 100 * kl  # the scaling matters at this context
    plan = mixed_plan(ckpt, {0: A.DROP_ATTENTION, 2: A.LINEARIZE}, {2: 0.8})
    pruned = export_gguf(folder, plan, tmp_path / "pruned.gguf", quant="F32")
    assert "rope_freqs.weight" in {t.name for t in gguf.GGUFReader(pruned).tensors}
    reference = torch_logits(apply_plan(load_model(folder), plan), TOKENS)
    delta, kl = _report("llama3 rope pruned (deci)", reference, llama_cpp_logits(pruned, TOKENS))
    assert kl < 1e-6
    delta, kl = _report("llama3 rope deci in PyTorch", reference, torch_logits(load_model(pruned), TOKENS))
    assert delta < 1e-4


def _longrope(head_dim: int = 8) -> dict:
    rng = np.random.default_rng(0)
    half = head_dim // 2
    return {
        "rope_scaling": {
            "type": "longrope",
            "long_factor": (1 + 4 * rng.random(half)).tolist(),
            "short_factor": (1 + 0.5 * rng.random(half)).tolist(),
        },
        "original_max_position_embeddings": 32,
        "max_position_embeddings": 256,
    }


@pytest.mark.parametrize("rope", ["default", "longrope"])
def test_phi3_unchanged_as_phi3_and_pruned_as_deci(tmp_path, tokenizer_dir, rope):
    """llama.cpp's vocabulary loader special-cases models named phi3 (it looks up </s>): the folder is not."""
    overrides = _longrope() if rope == "longrope" else {}
    folder = tiny_hf(tmp_path / "tiny-p", tokenizer_dir, "phi3", **overrides)
    ckpt = open_checkpoint(folder)
    same = export_gguf(folder, mixed_plan(ckpt, {}, {}), tmp_path / "same.gguf", quant="F32")
    reader = gguf.GGUFReader(same)
    assert reader.fields["general.architecture"].contents() == "phi3"
    reference = torch_logits(load_model(folder), TOKENS)
    _, kl = _report(f"phi3 {rope} unchanged (phi3)", reference, llama_cpp_logits(same, TOKENS))
    assert kl < 1e-6
    if rope == "longrope":
        assert reader.fields["phi3.rope.scaling.type"].contents() == "longrope"
        plain = {k: v for k, v in overrides.items() if k != "rope_scaling"}
        unscaled = load_model(tiny_hf(tmp_path / "plain", tokenizer_dir, "phi3", **plain))
        assert agreement(reference, torch_logits(unscaled, TOKENS))[0] > 100 * kl  # the factors matter
    plan = mixed_plan(ckpt, {0: A.DROP_ATTENTION, 2: A.LINEARIZE, 3: A.DROP_BLOCK}, {2: 0.8})
    pruned = export_gguf(folder, plan, tmp_path / "pruned.gguf", quant="F32")
    reader = gguf.GGUFReader(pruned)
    names = {t.name for t in reader.tensors}
    assert {
        "blk.1.attn_q.weight",
        "blk.1.attn_k.weight",
        "blk.1.attn_v.weight",
        "blk.1.ffn_gate.weight",
    } <= names
    assert not any("attn_qkv" in n for n in names)
    assert {tuple(t.shape) for t in reader.tensors if t.name == "blk.1.ffn_up.weight"} == {(64, 96)}
    reference = torch_logits(apply_plan(load_model(folder), plan), TOKENS)
    _, kl = _report(f"phi3 {rope} pruned (deci)", reference, llama_cpp_logits(pruned, TOKENS))
    assert kl < 1e-6
    if rope == "longrope":  # llama.cpp's converter writes no rope.scaling.type for phi3: deci needs it
        bare = rewritten(same, tmp_path / "bare.gguf", ("phi3.rope.scaling.type",))
        bare_plan = mixed_plan(open_checkpoint(bare), {lp.layer: lp.action for lp in plan.layers}, {2: 0.8})
        from_bare = export_gguf(bare, bare_plan, tmp_path / "from-bare.gguf")
        assert gguf.GGUFReader(from_bare).fields["deci.rope.scaling.type"].contents() == "longrope"
        _, kl = _report(
            "phi3 longrope GGUF without the scaling type, pruned",
            reference,
            llama_cpp_logits(from_bare, TOKENS),
        )
        assert kl < 1e-6
    # a Q8_0 phi3 GGUF (llama.cpp's quantizer) split as raw quantized rows
    q8 = export_gguf(folder, mixed_plan(ckpt, {}, {}), tmp_path / "q8.gguf", quant="Q8_0")
    actions = {lp.layer: lp.action for lp in plan.layers}
    split = export_gguf(q8, mixed_plan(open_checkpoint(q8), actions, {2: 0.8}), tmp_path / "split.gguf")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(split).tensors}
    assert types["blk.1.attn_q.weight"] == types["blk.1.ffn_gate.weight"] == "Q8_0"
    _, kl = _report(f"phi3 {rope} Q8_0 GGUF pruned", reference, llama_cpp_logits(split, TOKENS))
    assert kl < 1e-3


def test_phi3_partial_rotary_refused_for_deci(tmp_path, tokenizer_dir):
    folder = tiny_hf(tmp_path / "tiny-p", tokenizer_dir, "phi3", partial_rotary_factor=0.5)
    plan = mixed_plan(open_checkpoint(folder), {1: A.DROP_ATTENTION}, {})
    with pytest.raises(
        GatenormError, match=r"phi3 with drop-attention to GGUF: its rope covers part.*what works"
    ):
        export_gguf(folder, plan, tmp_path / "out.gguf")
    assert list(tmp_path.glob("*.gguf")) == []


@pytest.mark.parametrize("tied", [False, True])
def test_granite_unchanged_as_granite_and_pruned_as_deci_with_folded_multipliers(
    tmp_path, tokenizer_dir, tied
):
    multipliers = dict(
        embedding_multiplier=2.0, attention_multiplier=0.2, residual_multiplier=0.5, logits_scaling=4.0
    )
    folder = tiny_hf(tmp_path / "granite", tokenizer_dir, "granite", tie_word_embeddings=tied, **multipliers)
    ckpt = open_checkpoint(folder)
    same = export_gguf(folder, mixed_plan(ckpt, {}, {}), tmp_path / "same.gguf", quant="F32")
    fields = gguf.GGUFReader(same).fields
    assert fields["general.architecture"].contents() == "granite"
    assert fields["granite.logit_scale"].contents() == 4.0 and fields[
        "granite.attention.scale"
    ].contents() == pytest.approx(0.2)
    reference = torch_logits(load_model(folder), TOKENS)
    _, kl = _report(f"granite tied={tied} unchanged (granite)", reference, llama_cpp_logits(same, TOKENS))
    assert kl < 1e-6
    plan = mixed_plan(ckpt, {0: A.DROP_ATTENTION, 2: A.LINEARIZE}, {2: 0.8})
    pruned = export_gguf(folder, plan, tmp_path / "pruned.gguf", quant="F32")
    reader = gguf.GGUFReader(pruned)
    assert not [key for key in reader.fields if key.startswith("deci.") and key.endswith("_scale")]
    assert "output.weight" in {t.name for t in reader.tensors}  # its own LM head: scaled unlike the embedding
    reference = torch_logits(apply_plan(load_model(folder), plan), TOKENS)
    pruned_logits = llama_cpp_logits(pruned, TOKENS)
    _, kl = _report(f"granite tied={tied} pruned (deci)", reference, pruned_logits)
    assert kl < 1e-6
    delta, _ = _report(
        f"granite tied={tied} deci in PyTorch", reference, torch_logits(load_model(pruned), TOKENS)
    )
    assert delta < 1e-4
    unfolded = torch_logits(
        apply_plan(
            load_model(tiny_hf(tmp_path / "plain", tokenizer_dir, "granite", tie_word_embeddings=tied)), plan
        ),
        TOKENS,
    )
    assert agreement(unfolded, pruned_logits)[0] > 100 * kl  # the multipliers matter
    quantized = export_gguf(folder, plan, tmp_path / "q8.gguf", quant="Q8_0")
    _, kl = _report(f"granite tied={tied} pruned Q8_0", reference, llama_cpp_logits(quantized, TOKENS))
    assert kl < 1e-3
