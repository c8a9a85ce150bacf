"""Gate-Norm against brute force, HF-vs-GGUF invariance, the readers against transformers."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest

from gatenorm.methods import Method, score_checkpoint
from gatenorm.readers import ContentHash, open_checkpoint
from gatenorm.scoring import gate_norm, gate_norm_head
from tests.conftest import TINY_LLAMA, make_tiny_model
from tests.reference_gguf import write_llama_gguf


def brute_force(q: np.ndarray, k: np.ndarray, n_head: int, n_kv: int) -> tuple[float, float]:
    """Whole-layer and per-head Gate-Norm in float64 with explicit d x d products and repeat_kv."""
    q, k = q.astype(np.float64), k.astype(np.float64)
    dh = q.shape[0] // n_head
    k_rep = np.repeat(k.reshape(n_kv, dh, -1), n_head // n_kv, axis=0).reshape(n_head * dh, -1)
    whole = np.linalg.norm(q.T @ k_rep)  # W_q W_k^T with W_q = q^T, W_k = repeat_kv(k)^T
    per_head = 0.0
    for h in range(n_head):
        qh = q[h * dh : (h + 1) * dh]
        kh = k_rep[h * dh : (h + 1) * dh]
        per_head += np.linalg.norm(qh.T @ kh) ** 2
    return float(whole), float(np.sqrt(per_head))


# GQA (Gram route: 2 * n_kv * dh < d) and MHA (direct d x d route).
SHAPES = {
    "gqa": dict(num_attention_heads=8, num_key_value_heads=2),
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
}


@pytest.fixture(scope="module", params=sorted(SHAPES))
def tiny_pair(request, tmp_path_factory):
    """(HF folder, GGUF F32 file, config) of one tiny random llama."""
    folder = tmp_path_factory.mktemp(f"tiny-{request.param}")
    model = make_tiny_model(folder, seed=3, **SHAPES[request.param])
    config = model.config.to_dict()
    gguf_path = folder / "model-f32.gguf"
    write_llama_gguf(folder, gguf_path, config)
    return folder, gguf_path, config


def test_gate_norm_matches_brute_force(tiny_pair):
    folder, _, config = tiny_pair
    ckpt = open_checkpoint(folder)
    whole = score_checkpoint(ckpt, Method.GATE_NORM).scores
    head = score_checkpoint(ckpt, Method.GATE_NORM_HEAD).scores
    for layer in range(config["num_hidden_layers"]):
        w = ckpt.read_attention(layer)
        ref_whole, ref_head = brute_force(
            w.q.numpy(), w.k.numpy(), config["num_attention_heads"], config["num_key_value_heads"]
        )
        assert whole[layer] == pytest.approx(ref_whole, rel=1e-5)
        assert head[layer] == pytest.approx(ref_head, rel=1e-5)
        assert gate_norm(w) == pytest.approx(ref_whole, rel=1e-5)
        assert gate_norm_head(w) == pytest.approx(ref_head, rel=1e-5)
    # with GQA the whole-layer and the per-head scores differ (cross-head terms), which checks the grouping
    assert whole != pytest.approx(head, rel=1e-3)


def test_gguf_reader_undoes_llama_cpp_permutation(tiny_pair):
    folder, gguf_path, config = tiny_pair
    hf, gg = open_checkpoint(folder), open_checkpoint(gguf_path)
    assert hf.shape == gg.shape
    for layer in range(config["num_hidden_layers"]):
        a = hf.read_attention(layer, ("q", "k", "v", "o"))
        b = gg.read_attention(layer, ("q", "k", "v", "o"))
        for part in "qkvo":
            np.testing.assert_array_equal(getattr(a, part).numpy(), getattr(b, part).numpy())


@pytest.mark.parametrize("method", [Method.GATE_NORM, Method.GATE_NORM_HEAD])
def test_scores_do_not_depend_on_format(tiny_pair, method):
    folder, gguf_path, _ = tiny_pair
    hf = score_checkpoint(open_checkpoint(folder), method).scores
    gg = score_checkpoint(open_checkpoint(gguf_path), method).scores
    np.testing.assert_allclose(gg, hf, rtol=1e-6)


@pytest.mark.parametrize(
    ("qtype", "rtol"), [(gguf.GGMLQuantizationType.F16, 2e-3), (gguf.GGMLQuantizationType.Q8_0, 2e-2)]
)
def test_quantized_gguf_scores_close_to_full_precision(tiny_llama_dir, tmp_path, qtype, rtol):
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    path = tmp_path / f"tiny-{qtype.name}.gguf"
    write_llama_gguf(tiny_llama_dir, path, config, qtype)
    ref = score_checkpoint(open_checkpoint(tiny_llama_dir), Method.GATE_NORM).scores
    got = score_checkpoint(open_checkpoint(path), Method.GATE_NORM).scores
    np.testing.assert_allclose(got, ref, rtol=rtol)
    assert got != ref  # really dequantized, not read from elsewhere


def test_content_hash_tracks_weights(tiny_pair, tmp_path):
    folder, gguf_path, _ = tiny_pair
    a = score_checkpoint(open_checkpoint(gguf_path), Method.GATE_NORM)
    b = score_checkpoint(open_checkpoint(gguf_path), Method.GATE_NORM_HEAD)
    assert a.content_sha256 == b.content_sha256 and a.hashed == "attention-tensors"
    digest = ContentHash()
    for _ in open_checkpoint(folder).iter_attention(("q", "k"), digest):
        pass
    assert digest.tensors == 2 * TINY_LLAMA["num_hidden_layers"]
    assert digest.hexdigest() != a.content_sha256  # F32 bytes in another row order


def test_baselines(tiny_llama_dir):
    ckpt = open_checkpoint(tiny_llama_dir)
    n = TINY_LLAMA["num_hidden_layers"]
    last = score_checkpoint(ckpt, Method.LAST)
    assert last.ranks() == [n - i for i in range(n)]  # deepest layer is rank 1
    r1, r2, r3 = (score_checkpoint(ckpt, Method.RANDOM, seed=s).scores for s in (1, 1, 2))
    assert r1 == r2 and r1 != r3
    assert last.hashed == "shape"


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "mistral"])
def test_other_architectures_score(tmp_path, model_type):
    extra = {"head_dim": 16} if model_type == "qwen3" else {}
    make_tiny_model(tmp_path, model_type, **extra)
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.arch.name == model_type
    assert ckpt.shape.head_dim == (16 if model_type == "qwen3" else 8)
    w = ckpt.read_attention(1)
    ref_whole, ref_head = brute_force(w.q.numpy(), w.k.numpy(), 8, 2)
    assert gate_norm(w) == pytest.approx(ref_whole, rel=1e-5)
    assert gate_norm_head(w) == pytest.approx(ref_head, rel=1e-5)


def test_smollm2_reader_matches_transformers(smollm2_gguf, smollm2_model):
    ckpt = open_checkpoint(smollm2_gguf)
    s = ckpt.shape
    assert (s.n_layers, s.d_model, s.n_head, s.n_head_kv, s.head_dim) == (30, 576, 9, 3, 64)
    for layer in (0, 17, 29):
        w = ckpt.read_attention(layer, ("q", "k", "v", "o"))
        attn = smollm2_model.model.layers[layer].self_attn
        for part in "qkvo":
            ref = getattr(attn, f"{part}_proj").weight.detach().numpy()
            np.testing.assert_array_equal(getattr(w, part).numpy(), ref)


def test_smollm2_gate_norm_ranking(smollm2_gguf):
    """The lowest 8 non-first layers, as measured independently in the methods issue."""
    scores = score_checkpoint(open_checkpoint(smollm2_gguf), Method.GATE_NORM).scores
    lowest = sorted(range(1, 30), key=lambda i: scores[i])[:8]
    assert lowest == [29, 28, 27, 19, 26, 25, 7, 24]


def test_smollm2_hf_copy_scores_like_gguf(smollm2_gguf, smollm2_hf):
    gg = score_checkpoint(open_checkpoint(smollm2_gguf), Method.GATE_NORM_HEAD).scores
    hf = score_checkpoint(open_checkpoint(smollm2_hf), Method.GATE_NORM_HEAD).scores
    np.testing.assert_allclose(hf, gg, rtol=1e-6)


@pytest.mark.parametrize("heads", [1, 3, 8])
def test_llama_row_order_matches_llama_cpp_converter(heads):
    from gatenorm.architectures import Llama, Qwen2
    from tests.reference_gguf import llama_cpp_permute

    w = np.random.default_rng(heads).standard_normal((heads * 16, 7))
    stored = Llama.hf_to_gguf_rows("k", w, 8, heads)
    np.testing.assert_array_equal(stored, llama_cpp_permute(w, heads))
    np.testing.assert_array_equal(Llama.gguf_to_hf_rows("k", stored, 8, heads), w)
    assert Qwen2.hf_to_gguf_rows("k", w, 8, heads) is w  # NEOX rope: HF order kept
