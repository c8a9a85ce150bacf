"""GGUF per family: what stock llama.cpp (the pinned llama-cpp-python) runs, checked on its logits against
transformers (F32, tiny random models written by gatenorm's HF -> GGUF writer), and the one-line refusals
of the rest (exit 2, nothing written)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf_helpers import agreement, llama_cpp_logits, torch_logits

from exporters.export import export_gguf
from gatenorm.apply import apply_plan, load_model
from gatenorm.errors import GatenormError
from gatenorm.plan import LayerAction
from gatenorm.readers import open_checkpoint
from tests.conftest import mixed_plan, tiny_hf

A = LayerAction
TOKENS = list(range(300, 364))
#: families whose GGUF keeps their own architecture, with block removal only; config overrides
BLOCK_REMOVAL = {
    "qwen3": {"head_dim": 16},
    "olmo2": {},
    "smollm3": {"num_hidden_layers": 8, "pad_token_id": 0},
}


def _arch(path) -> str:
    return gguf.GGUFReader(path).fields["general.architecture"].contents()


def _report(label: str, reference: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    kl, top1 = agreement(reference, other)
    print(f"{label}: max |dlogit| {np.abs(reference - other).max():.2e}, KL {kl:.2e}, top-1 {top1:.3f}")
    return kl, top1


@pytest.mark.parametrize("model_type", sorted(BLOCK_REMOVAL))
def test_block_removal_family_in_llama_cpp(tmp_path, tokenizer_dir, model_type):
    folder = tiny_hf(tmp_path / model_type, tokenizer_dir, model_type, **BLOCK_REMOVAL[model_type])
    ckpt, model = open_checkpoint(folder), load_model(folder)
    n = ckpt.shape.n_layers
    unchanged = export_gguf(folder, mixed_plan(ckpt, {}, {}), tmp_path / "same.gguf", quant="F32")
    assert _arch(unchanged) == model_type  # no layer changed: the source architecture is kept
    kl, top1 = _report(
        f"{model_type} unpruned", torch_logits(model, TOKENS), llama_cpp_logits(unchanged, TOKENS)
    )
    assert kl < 1e-5 and top1 > 0.95
    blocks = [4, 5, 6, 7] if model_type == "smollm3" else [1, 2]  # smollm3: indices mod 4 kept
    plan = mixed_plan(ckpt, dict.fromkeys(blocks, A.DROP_BLOCK), {})
    out = export_gguf(folder, plan, tmp_path / "blocks.gguf", quant="F32")
    reader = gguf.GGUFReader(out)
    assert _arch(out) == model_type and reader.fields[f"{model_type}.block_count"].contents() == n - len(
        blocks
    )
    reference = torch_logits(apply_plan(load_model(folder), plan), TOKENS)
    kl, top1 = _report(f"{model_type} drop-block", reference, llama_cpp_logits(out, TOKENS))
    assert kl < 1e-5 and top1 > 0.95
    refused = A.LINEARIZE if model_type == "qwen3" else A.DROP_ATTENTION  # qwen3: qwen35 hosts drop-attention
    with pytest.raises(
        GatenormError, match=f"cannot export {model_type} with {refused.value} to GGUF: .*what works"
    ):
        export_gguf(folder, mixed_plan(ckpt, {1: refused}, {1: 0.5}), tmp_path / "no.gguf")
    assert not (tmp_path / "no.gguf").exists()


def test_smollm3_block_removal_that_moves_no_rope_layers_refused(tmp_path, tokenizer_dir):
    folder = tiny_hf(tmp_path / "smollm3", tokenizer_dir, "smollm3", num_hidden_layers=8, pad_token_id=0)
    plan = mixed_plan(open_checkpoint(folder), {2: A.DROP_BLOCK}, {})
    with pytest.raises(
        GatenormError, match=r"smollm3 with drop-block.*\(il \+ 1\) % 4.*layers \[3, 4, 5, 6, 7\]"
    ):
        export_gguf(folder, plan, tmp_path / "out.gguf")
    assert list(tmp_path.glob("*.gguf")) == []


def test_first_layer_dropped_attention_is_zero_linear_attention(tmp_path, tokenizer_dir):
    """deci reads the head size from layer 0: a dropped attention there is written as linear attention
    with an all-zero attn_output, which adds exactly 0."""
    folder = tiny_hf(tmp_path / "llama", tokenizer_dir, "llama")
    ckpt = open_checkpoint(folder)
    plan = mixed_plan(ckpt, {0: A.DROP_ATTENTION, 2: A.DROP_ATTENTION}, {})
    out = export_gguf(folder, plan, tmp_path / "out.gguf", quant="F32")
    reader = gguf.GGUFReader(out)
    assert reader.fields["deci.attention.head_count"].contents() == [8, 8, 0, 8]
    assert reader.fields["deci.attention.head_count_kv"].contents() == [0, 2, 0, 2]
    zero = {t.name: t for t in reader.tensors}["blk.0.attn_output.weight"]
    assert not np.asarray(zero.data).any()
    reference = torch_logits(apply_plan(load_model(folder), plan), TOKENS)
    kl, top1 = _report("llama layer-0 drop-attention", reference, llama_cpp_logits(out, TOKENS))
    assert kl < 1e-5 and top1 > 0.95
