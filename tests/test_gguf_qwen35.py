"""Qwen3 with dropped attention as llama.cpp's ``qwen35`` (dense Qwen3.5): kept layers are gated attention
layers with the gate held open, dropped ones all-zero recurrent layers; llama.cpp's logits against the
pruned PyTorch model (from HF, from an F32 GGUF and from a Q8_0 GGUF, whose q rows move as raw rows)."""

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
#: layer 0's attention dropped (qwen35 reads head sizes from the hparams, not layer 0), a block dropped
ACTIONS = {0: A.DROP_ATTENTION, 2: A.DROP_ATTENTION, 3: A.DROP_BLOCK}


def _check(label: str, reference: np.ndarray, other: np.ndarray, max_kl: float, min_top1=0.95) -> None:
    kl, top1 = agreement(reference, other)
    print(f"{label}: max |dlogit| {np.abs(reference - other).max():.2e}, KL {kl:.2e}, top-1 {top1:.3f}")
    assert kl < max_kl and top1 > min_top1, (label, kl, top1)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory, tokenizer_dir):
    folder = tiny_hf(tmp_path_factory.mktemp("qwen3") / "hf", tokenizer_dir, "qwen3", head_dim=16)
    plan = mixed_plan(open_checkpoint(folder), ACTIONS, {})
    return folder, plan, torch_logits(apply_plan(load_model(folder), plan), TOKENS)


def test_qwen3_drop_attention_as_qwen35_from_hf(tmp_path, qwen3):
    folder, plan, reference = qwen3
    out = export_gguf(folder, plan, tmp_path / "out.gguf", quant="F32")
    reader = gguf.GGUFReader(out)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.architecture"] == "qwen35" and fields["qwen35.block_count"] == 3
    assert fields["qwen35.attention.recurrent_layers"] == [1, 0, 1]
    assert fields["qwen35.rope.dimension_sections"] == [1, 1, 1, 0]
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    assert not tensors["blk.0.ssm_out.weight"].any() and "blk.0.attn_q.weight" not in tensors
    q = tensors["blk.1.attn_q.weight"].reshape(8, 2, 16, -1)  # per head: 16 q rows, then 16 gate rows
    assert q[:, 0].any() and not q[:, 1].any()
    _check("qwen3 as qwen35 (HF)", reference, llama_cpp_logits(out, TOKENS), 1e-5)


@pytest.mark.parametrize("quant", ["F32", "Q8_0"])
def test_qwen3_drop_attention_as_qwen35_from_gguf(tmp_path, qwen3, quant):
    folder, _, reference = qwen3
    source = export_gguf(
        folder, mixed_plan(open_checkpoint(folder), {}, {}), tmp_path / "src.gguf", quant=quant
    )
    plan = mixed_plan(open_checkpoint(source), ACTIONS, {})
    out = export_gguf(source, plan, tmp_path / "out.gguf")
    assert gguf.GGUFReader(out).fields["general.architecture"].contents() == "qwen35"
    _check(
        f"qwen3 as qwen35 (GGUF {quant})",
        reference,
        llama_cpp_logits(out, TOKENS),
        *((1e-5, 0.95) if quant == "F32" else (1e-3, 0.0)),  # Q8_0 against the F32 model: rounding (1.4e-5)
    )


def test_qwen3_linearize_refused(tmp_path, qwen3):
    folder, _, _ = qwen3
    plan = mixed_plan(open_checkpoint(folder), {1: A.LINEARIZE}, {1: 0.5})
    with pytest.raises(GatenormError, match=r"qwen3 with linearize to GGUF: .*qwen35.*SiLU.*what works"):
        export_gguf(folder, plan, tmp_path / "out.gguf")
    assert list(tmp_path.iterdir()) == []
