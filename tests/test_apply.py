"""Applying a plan in PyTorch: hand-written reference forward, KV cache, generation, SmolLM2."""

from __future__ import annotations

import copy

import pytest
import torch

from gatenorm.apply import (
    AttentionFreeLayer,
    IdentityLayer,
    LinearAttentionLayer,
    apply_plan,
    load_model,
    load_tokenizer,
)
from gatenorm.errors import GatenormError
from gatenorm.methods import Method, score_checkpoint
from gatenorm.plan import LayerAction, make_plan, plan_from_actions
from gatenorm.readers import open_checkpoint
from gatenorm.scoring import LayerScores
from tests.conftest import make_tiny_model


def plan_dropping(ckpt, layers: list[int]):
    """A plan for `ckpt` that drops exactly `layers` (scores rigged so they are the lowest)."""
    n = ckpt.shape.n_layers
    scores = [0.0 if i in layers else 1.0 + i for i in range(n)]
    s = LayerScores(Method.GATE_NORM, scores, "0" * 64, "attention-tensors", 0.0)
    return make_plan(ckpt, s, drop=len(layers), allow_first_layer=0 in layers)


def reference_logits(
    sd: dict,
    cfg,
    ids: torch.Tensor,
    dropped: set[int],
    linear: dict[int, float] | None = None,
    blocks: frozenset[int] = frozenset(),
) -> torch.Tensor:
    """Llama forward written out by hand (RMSNorm, rotate-half RoPE, causal GQA, SwiGLU), float64.

    Layers in `dropped` skip attention, those in `linear` attend each token to itself only with the output
    scaled by alpha (HARP), those in `blocks` are skipped whole.
    """
    linear = linear or {}
    sd = {k: v.double() for k, v in sd.items()}
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    dh = cfg.hidden_size // n_head
    t = ids.shape[0]

    def rms(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.rms_norm_eps) * w

    theta = getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]  # transformers 4 / 5
    inv = 1.0 / theta ** (torch.arange(0, dh, 2, dtype=torch.float64) / dh)
    ang = torch.arange(t, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

    def rope(x):  # x: (heads, t, dh)
        rot = torch.cat([-x[..., dh // 2 :], x[..., : dh // 2]], -1)
        return x * cos + rot * sin

    h = sd["model.embed_tokens.weight"][ids]
    mask = torch.full((t, t), float("-inf"), dtype=torch.float64).triu(1)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        if i in blocks:
            continue
        if i in linear:
            x = rms(h, sd[p + "input_layernorm.weight"])
            v = (x @ sd[p + "self_attn.v_proj.weight"].T).view(t, n_kv, dh)
            v = v.repeat_interleave(n_head // n_kv, 1).reshape(t, -1)  # softmax over itself alone is 1
            h = h + linear[i] * (v @ sd[p + "self_attn.o_proj.weight"].T)
        elif i not in dropped:
            x = rms(h, sd[p + "input_layernorm.weight"])
            q = (x @ sd[p + "self_attn.q_proj.weight"].T).view(t, n_head, dh).transpose(0, 1)
            k = (x @ sd[p + "self_attn.k_proj.weight"].T).view(t, n_kv, dh).transpose(0, 1)
            v = (x @ sd[p + "self_attn.v_proj.weight"].T).view(t, n_kv, dh).transpose(0, 1)
            q, k = rope(q), rope(k)
            k = k.repeat_interleave(n_head // n_kv, 0)
            v = v.repeat_interleave(n_head // n_kv, 0)
            att = torch.softmax(q @ k.transpose(1, 2) / dh**0.5 + mask, -1) @ v
            h = h + att.transpose(0, 1).reshape(t, -1) @ sd[p + "self_attn.o_proj.weight"].T
        x = rms(h, sd[p + "post_attention_layernorm.weight"])
        gate = torch.nn.functional.silu(x @ sd[p + "mlp.gate_proj.weight"].T)
        h = h + (gate * (x @ sd[p + "mlp.up_proj.weight"].T)) @ sd[p + "mlp.down_proj.weight"].T
    return rms(h, sd["model.norm.weight"]) @ sd["lm_head.weight"].T


def plan_with(ckpt, actions: dict[int, LayerAction], alphas: dict[int, float] | None = None):
    """A plan for `ckpt` giving the listed layers their action, the others keep."""
    scores = LayerScores(Method.GATE_NORM, [1.0] * ckpt.shape.n_layers, "0" * 64, "attention-tensors", 0.0)
    full = [actions.get(i, LayerAction.KEEP) for i in range(ckpt.shape.n_layers)]
    return plan_from_actions(ckpt, scores, full, alphas, method="mixed")


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return open_checkpoint(tiny_llama_dir), load_model(tiny_llama_dir)


IDS = torch.tensor([5, 17, 99, 3, 64, 12, 7, 120, 44, 1, 0, 77])


@pytest.mark.parametrize("dropped", [[], [2], [1, 3], [0, 2]])
def test_pruned_forward_matches_hand_written_reference(tiny, dropped):
    ckpt, base = tiny
    sd = {k: v.detach().clone() for k, v in base.state_dict().items()}
    model = apply_plan(copy.deepcopy(base), plan_dropping(ckpt, dropped))
    with torch.no_grad():
        got = model(IDS[None]).logits[0].double()
    ref = reference_logits(sd, base.config, IDS, set(dropped))
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4)
    if dropped:  # the pruning really changes the output
        assert (got - reference_logits(sd, base.config, IDS, set())).abs().max() > 1e-2


@pytest.mark.parametrize(
    ("linear", "blocks", "dropped"),
    [({2: 1.0}, set(), set()), ({1: 0.35, 3: -0.5}, set(), set()), ({3: 0.7}, {2}, {1}), ({}, {1, 3}, set())],
)
def test_linearized_and_dropped_blocks_match_hand_written_reference(tiny, linear, blocks, dropped):
    ckpt, base = tiny
    sd = {k: v.detach().clone() for k, v in base.state_dict().items()}
    actions = {i: LayerAction.LINEARIZE for i in linear}
    actions |= {i: LayerAction.DROP_BLOCK for i in blocks} | {i: LayerAction.DROP_ATTENTION for i in dropped}
    plan = plan_with(ckpt, actions, linear)
    model = apply_plan(copy.deepcopy(base), plan)
    with torch.no_grad():
        got = model(IDS[None]).logits[0].double()
        ref = reference_logits(sd, base.config, IDS, dropped, linear, frozenset(blocks))
        torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4)
        assert (got - reference_logits(sd, base.config, IDS, set())).abs().max() > 1e-2
    for i in linear:
        layer = model.model.layers[i]
        assert isinstance(layer, LinearAttentionLayer) and not hasattr(layer, "self_attn")
    assert all(isinstance(model.model.layers[i], IdentityLayer) for i in blocks)
    kept = [i for i in range(4) if i not in actions]
    assert [model.model.layers[i].self_attn.layer_idx for i in kept] == list(range(len(kept)))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(IDS[None, :5], use_cache=True, **kwargs)
        assert cached.tolist() == model.generate(IDS[None, :5], use_cache=False, **kwargs).tolist()


def test_linearized_qwen2_folds_the_value_bias(tmp_path):
    make_tiny_model(tmp_path, "qwen2")
    ckpt, base = open_checkpoint(tmp_path), load_model(tmp_path)
    layer = base.model.layers[1]
    assert layer.self_attn.v_proj.bias is not None
    with torch.no_grad():
        layer.self_attn.v_proj.bias.normal_()
        x = torch.randn(3, base.config.hidden_size)
        model = apply_plan(copy.deepcopy(base), plan_with(ckpt, {1: LayerAction.LINEARIZE}, {1: 0.5}))
        got = model.model.layers[1].fused_attention(x)
        n_rep = base.config.num_attention_heads // base.config.num_key_value_heads
        dh = base.config.hidden_size // base.config.num_attention_heads
        v = layer.self_attn.v_proj(x).view(3, -1, dh).repeat_interleave(n_rep, 1).reshape(3, -1)
        torch.testing.assert_close(got, 0.5 * layer.self_attn.o_proj(v), atol=1e-5, rtol=1e-5)


def test_dropped_layers_hold_no_attention_and_no_cache(tiny):
    ckpt, base = tiny
    model = apply_plan(copy.deepcopy(base), plan_dropping(ckpt, [1, 3]))
    for i in (1, 3):
        layer = model.model.layers[i]
        assert isinstance(layer, AttentionFreeLayer)
        assert not hasattr(layer, "self_attn") and not hasattr(layer, "input_layernorm")
        assert not any("proj" in n and "mlp" not in n for n, _ in layer.named_parameters())
    assert [model.model.layers[i].self_attn.layer_idx for i in (0, 2)] == [0, 1]
    n_params = sum(p.numel() for p in model.parameters())
    attn = base.model.layers[1].self_attn
    removed = sum(p.numel() for p in attn.parameters()) + base.model.layers[1].input_layernorm.weight.numel()
    assert n_params == sum(p.numel() for p in base.parameters()) - 2 * removed
    with torch.no_grad():
        out = model(IDS[None], use_cache=True)
    cache = out.past_key_values
    filled = [i for i, layer in enumerate(cache.layers) if getattr(layer, "keys", None) is not None]
    assert filled == [0, 1]  # two kept layers, two cache entries


@pytest.mark.parametrize("dropped", [[2, 3], [0, 1]])
def test_generate_with_cache_matches_full_recompute(tiny, dropped):
    ckpt, base = tiny
    model = apply_plan(copy.deepcopy(base), plan_dropping(ckpt, dropped))
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(IDS[None, :5], use_cache=True, **kwargs)
        recomputed = model.generate(IDS[None, :5], use_cache=False, **kwargs)
    assert cached.tolist() == recomputed.tolist()


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_apply_on_other_architectures(tmp_path, model_type):
    make_tiny_model(tmp_path, model_type)
    ckpt, base = open_checkpoint(tmp_path), load_model(tmp_path)
    model = apply_plan(copy.deepcopy(base), plan_dropping(ckpt, [1, 2]))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert (
            model.generate(IDS[None, :4], use_cache=True, **kwargs).tolist()
            == model.generate(IDS[None, :4], use_cache=False, **kwargs).tolist()
        )
        assert not torch.allclose(model(IDS[None]).logits, base(IDS[None]).logits)


def test_plan_must_fit_model(tiny, tmp_path):
    ckpt, base = tiny
    make_tiny_model(tmp_path, num_hidden_layers=3)
    other = load_model(tmp_path)
    with pytest.raises(GatenormError, match="plan is for 4 layers"):
        apply_plan(other, plan_dropping(ckpt, [1]))
    pruned = apply_plan(copy.deepcopy(base), plan_dropping(ckpt, [1]))
    with pytest.raises(GatenormError, match="already pruned"):
        apply_plan(pruned, plan_dropping(ckpt, [2]))


def test_smollm2_pruned_generates(smollm2_gguf, smollm2_model):
    ckpt = open_checkpoint(smollm2_gguf)
    plan = make_plan(ckpt, score_checkpoint(ckpt, Method.GATE_NORM), drop=4)
    model = apply_plan(copy.deepcopy(smollm2_model), plan)
    tok = load_tokenizer(smollm2_gguf)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        full = smollm2_model.generate(ids, max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0, ids.shape[1] :])
    assert len(out[0]) == ids.shape[1] + 8 and text.strip()
    assert "Paris" in tok.decode(full[0, ids.shape[1] :])  # the reference model itself is sane
    assert sum(isinstance(layer, AttentionFreeLayer) for layer in model.model.layers) == 4


def test_loading_a_gguf_keeps_transformers_quiet(capfd, tiny_gguf):
    """transformers' de-quantizing progress bar and load-time warnings stay off the console."""
    from gatenorm.apply import load_model, load_tokenizer

    load_model(tiny_gguf)
    load_tokenizer(tiny_gguf)
    out, err = capfd.readouterr()
    assert "de-quantizing" not in err + out and "legacy" not in err + out


def test_a_merge_less_gguf_vocabulary_gets_the_stock_merges():
    """The set-membership vocabulary that makes SentencePiece GGUFs load in seconds builds exactly the merges
    transformers builds, and transformers is left as it was (transformers 4: 5 has no such skeleton, and
    `_fast_gguf_merges` leaves it alone)."""
    from transformers.integrations import ggml

    if not hasattr(ggml, "GGUFTokenizerSkeleton"):
        pytest.skip("transformers 5 builds GGUF vocabularies without GGUFTokenizerSkeleton")
    from transformers.integrations.ggml import GGUFTokenizerSkeleton

    from gatenorm.apply import _fast_gguf_merges
    from gatenorm.quiet import quiet_transformers

    stock_init = GGUFTokenizerSkeleton.__init__
    tokens = ["<unk>", "▁", "a", "b", "c", "ab", "bc", "abc", "▁a", "▁ab", "▁abc", "ca", "cab"]
    vocab = {"tokens": tokens, "scores": [-float(i) for i in range(len(tokens))]}
    with quiet_transformers():
        stock = GGUFTokenizerSkeleton(dict(vocab))
        with _fast_gguf_merges():
            assert GGUFTokenizerSkeleton.__init__ is not stock_init
            fast = GGUFTokenizerSkeleton(dict(vocab))
    assert GGUFTokenizerSkeleton.__init__ is stock_init
    assert len(stock.merges) > 5 and fast.merges == stock.merges and list(fast.tokens) == tokens


@pytest.mark.parametrize(
    ("types", "kept"),
    [
        (["s", "f", "s", "f"], [1, 2, 3]),
        (["s", "f", "s", "f", "s", "f"], [3, 5]),
        (["s", "s", "f", "s", "s", "f"], [0, 2, 4]),
        (["f", "f", "f"], [2]),
    ],
)
def test_cache_slots_keep_each_layer_type(types, kept):
    """Kept layers fill slots 0..K-1, each slot typed as its layer (the cache's sliding/full layers), the
    first slot of each kept layer's type in use (masks are sized from it); on transformers 5 every kept
    layer's own entry stays (its mask is picked by position); on 4 the slots follow the layer order."""
    from gatenorm.apply import cache_slots
    from gatenorm.architectures.base import transformers_major

    slots, new = cache_slots(kept, len(types), types)
    k = len(kept)
    assert sorted(slots.values()) == list(range(k)) and sorted(slots) == kept
    assert all(new[slots[layer]] == types[layer] for layer in kept)
    assert all(new.index(types[layer]) < k for layer in kept)
    if transformers_major() >= 5:
        assert all(new[layer] == types[layer] for layer in kept)
    else:
        assert [slots[layer] for layer in kept] == list(range(k))
    assert cache_slots(kept, len(types), None) == ({layer: i for i, layer in enumerate(kept)}, None)
