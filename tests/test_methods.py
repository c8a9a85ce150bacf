"""Pruning methods: hook statistics against brute force, HARP's alpha search and data-free rule, the mixed
plan's budgets, the plan contract, held-out calibration text, and the command line."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from exporters.source_check import verify_plan_source
from gatenorm.errors import GatenormError
from gatenorm.methods import Method, MethodOptions, make_method_plan, rank_layers, score_checkpoint
from gatenorm.methods.calibration import SYNTHETIC, Calibration, TailRunner, layer_statistics
from gatenorm.methods.cost import cost_model
from gatenorm.methods.data_free import linearize_threshold
from gatenorm.methods.harp_alpha import (
    calibrate_alphas,
    data_free_alpha,
    golden_section,
    head_self_weights,
    shared_energy,
)
from gatenorm.plan import LayerAction, Plan
from gatenorm.readers import AttentionWeights, open_checkpoint
from gatenorm.validate.text import WIKI_HELDOUT, wiki_articles, window_chars


@pytest.fixture(scope="module")
def tiny_model(tiny_llama_dir):
    from gatenorm.apply import load_model

    return load_model(tiny_llama_dir)


@pytest.fixture(scope="module")
def tiny_windows():
    return np.random.default_rng(0).integers(0, 128, size=(3, 24))


@pytest.fixture(scope="module")
def smollm2_ckpt(smollm2_gguf):
    return open_checkpoint(smollm2_gguf)


@pytest.fixture(scope="module")
def mixed(smollm2_ckpt):
    """The mixed ranking of SmolLM2 at a 256-token context (read once: every data-free statistic)."""
    return rank_layers(smollm2_ckpt, "mixed", MethodOptions(ctx=256))


def _brute_force(model, windows):
    """Per layer, by hand: mean cos(X, X + Attn(norm X)), cos(X, layer(X)), ||Attn|| / ||X||, and for the
    linearized attention L = o_proj(repeat_kv(v_proj(norm X))): the least-squares alpha and the mean
    cos(X + Attn, X + alpha L)."""
    ids = torch.from_numpy(windows)
    t = ids.shape[1]
    mask = torch.full((t, t), float("-inf")).triu(1)[None, None]
    cos = torch.nn.functional.cosine_similarity
    with torch.no_grad():
        h = model.model.embed_tokens(ids)
        pe = model.model.rotary_emb(h, torch.arange(t)[None])
        out = []
        for layer in model.model.layers:
            attn = layer.self_attn
            normed = layer.input_layernorm(h)
            a = attn(normed, position_embeddings=pe, attention_mask=mask)[0]
            v = attn.v_proj(normed).unflatten(-1, (attn.config.num_key_value_heads, attn.head_dim))
            lin = attn.o_proj(v.repeat_interleave(attn.num_key_value_groups, dim=2).flatten(-2))
            alpha = float((lin.double() * a.double()).sum() / lin.double().pow(2).sum())
            nxt = layer(h, attention_mask=mask, position_embeddings=pe)
            nxt = nxt[0] if isinstance(nxt, tuple) else nxt
            out.append(
                (
                    float(cos(h, h + a, dim=-1).mean()),
                    float(cos(h, nxt, dim=-1).mean()),
                    float((a.norm(dim=-1) / h.norm(dim=-1)).mean()),
                    alpha,
                    float(cos((h + a).double(), (h + alpha * lin).double(), dim=-1).mean()),
                )
            )
            h = nxt
    return out


def test_hook_statistics_match_brute_force(tiny_model, tiny_windows):
    stats = layer_statistics(tiny_model, tiny_windows, batch=2)
    expected = _brute_force(tiny_model, tiny_windows)
    assert stats.tokens == tiny_windows.size
    for i, (att, block, ratio, alpha, lin) in enumerate(expected):
        assert stats.attention_cosine[i] == pytest.approx(att, abs=1e-5)
        assert stats.block_cosine[i] == pytest.approx(block, abs=1e-5)
        assert stats.attention_ratio[i] == pytest.approx(ratio, rel=1e-4)
        assert stats.linear_alpha[i] == pytest.approx(alpha, rel=1e-4, abs=1e-6)
        assert stats.linear_cosine[i] == pytest.approx(lin, abs=1e-5)
    assert min(stats.attention_cosine) < 0.999  # attention matters in this model: the check is not vacuous


def test_tail_runner_matches_full_forward(tiny_model, tiny_windows):
    runner = TailRunner(tiny_model, tiny_windows, keep_from=0, batch=2)
    ids = torch.from_numpy(tiny_windows)
    with torch.no_grad():
        logits = tiny_model(ids).logits[:, :-1]
    full = float(torch.nn.functional.cross_entropy(logits.reshape(-1, 128), ids[:, 1:].reshape(-1)))
    for start in (0, 2, 3):
        assert runner.nll(start) == pytest.approx(full, rel=1e-5)


def test_golden_section_finds_minimum():
    x, seen = golden_section(lambda a: (a - 0.77) ** 2, (0.0, 0.5, 1.0, 1.5), refine=12)
    assert x == pytest.approx(0.77, abs=0.01)
    assert len(seen) <= 4 + 2 + 12  # the grid, the two golden points, one point per step


def test_calibrated_alpha_beats_alpha_one_and_restores_model(tiny_model, tiny_windows):
    from gatenorm.apply import apply_plan
    from gatenorm.plan import LayerPlan, Source

    layers = [2, 3]
    runner = TailRunner(tiny_model, tiny_windows, keep_from=min(layers))
    before = runner.nll(0) if 0 in runner.inputs else None
    alphas = calibrate_alphas(runner, layers)
    assert not any(type(layer).__name__ == "LinearAttentionLayer" for layer in tiny_model.model.layers)

    def nll_with(values: dict[int, float]) -> float:
        import copy

        source = Source(path="x", format="safetensors", architecture="llama", n_layers=4, sha256="0",
                        hashed="shape")  # fmt: skip
        plan = Plan(
            method="harp",
            budget=len(values),
            source=source,
            layers=[
                LayerPlan(layer=i, score=0.0, action=LayerAction.LINEARIZE, alpha=values[i])
                if i in values
                else LayerPlan(layer=i, score=0.0, action=LayerAction.KEEP)
                for i in range(4)
            ],
        )
        model = apply_plan(copy.deepcopy(tiny_model), plan)
        probe = TailRunner(model, tiny_windows, keep_from=0)
        return probe.nll(0)

    calibrated, ones = nll_with(alphas), nll_with(dict.fromkeys(layers, 1.0))
    assert calibrated < ones
    assert before is None


def _weights(q: torch.Tensor, k: torch.Tensor) -> AttentionWeights:
    return AttentionWeights(0, n_head=1, n_head_kv=1, head_dim=q.shape[0], q=q, k=k)


def test_self_weight_rule_on_constructed_heads():
    dh, d, ctx = 8, 16, 16
    gain = torch.ones(d)
    zero = _weights(torch.zeros(dh, d), torch.randn(dh, d))
    # no Q/K coupling: uniform attention over i + 1 tokens, so the mean self weight is H_ctx / ctx
    harmonic = sum(1.0 / (i + 1) for i in range(ctx)) / ctx
    assert head_self_weights(zero, gain, ctx)[0] == pytest.approx(harmonic, rel=1e-12)
    # q = k = s * (a dh-row projector), s^2 = sqrt(dh): self logit dh / 2 above the others' log-normal mean
    s = dh**0.25
    proj = torch.eye(d)[:dh] * s
    strong = head_self_weights(_weights(proj, proj), gain, ctx)[0]
    assert strong == pytest.approx(np.mean([1 / (1 + i * math.exp(-dh / 2)) for i in range(ctx)]), rel=1e-9)
    assert strong > 0.85 > harmonic


def test_shared_energy_and_alpha_rule():
    fused = torch.randn(6, 6, dtype=torch.float64)
    x = torch.randn(1, 6)
    assert shared_energy(fused, torch.ones(6), x.repeat(5, 1)) == pytest.approx(1.0)  # identical tokens
    assert shared_energy(fused, torch.ones(6), torch.cat([x, -x])) == pytest.approx(0.0, abs=1e-12)
    assert data_free_alpha(0.0, 0.4) == pytest.approx(0.4)
    assert data_free_alpha(1.0, 0.4) == pytest.approx(1.0)
    assert data_free_alpha(0.5, 0.5) == pytest.approx(0.75)


def test_cost_model_orders_actions(smollm2_ckpt):
    model = cost_model(smollm2_ckpt, ctx=256)
    one = [LayerAction.KEEP] * 29

    def speed(action):
        return model.speedup([*one, action])

    assert (
        speed(LayerAction.DROP_BLOCK) > speed(LayerAction.DROP_ATTENTION) > speed(LayerAction.LINEARIZE) > 1
    )
    assert model.speedup([LayerAction.KEEP] * 30) == 1.0
    assert cost_model(smollm2_ckpt, ctx=4096).speedup([*one, LayerAction.DROP_ATTENTION]) > speed(
        LayerAction.DROP_ATTENTION
    )  # attention's share grows with the context
    with pytest.raises(GatenormError):
        cost_model(smollm2_ckpt, ctx=0)


def test_data_free_plans_on_smollm2(smollm2_ckpt, mixed):
    options = MethodOptions(ctx=256)
    gate_ranking = rank_layers(smollm2_ckpt, "gate-norm")
    gate = make_method_plan(smollm2_ckpt, "gate-norm", 6, ranking=gate_ranking)
    threshold = linearize_threshold(smollm2_ckpt, 256)
    assert 0 < threshold < 1
    for budget in (1, 6, 16):
        plan = make_method_plan(smollm2_ckpt, "mixed", budget, options=options, ranking=mixed)
        assert plan.budget == budget and plan.method == "mixed" and 0 not in plan.changed
        same = make_method_plan(smollm2_ckpt, "gate-norm", budget, ranking=gate_ranking)
        assert set(plan.changed) == set(same.changed)
        for lp in plan.layers:
            assert (lp.alpha is not None) == (lp.action is LayerAction.LINEARIZE)
            if lp.action is LayerAction.LINEARIZE:
                assert lp.alpha > threshold
            elif lp.action is LayerAction.DROP_ATTENTION:
                assert mixed.extra["alpha"][lp.layer] <= threshold
        assert Plan.from_json(plan.to_json()) == plan
    # same content hash as Gate-Norm's plan: the exporters' source check accepts it
    assert plan.source == gate.source
    verify_plan_source(plan, smollm2_ckpt)
    free = make_method_plan(smollm2_ckpt, "harp-free", 4, options=options)
    assert free.linearized == [26, 27, 28, 29] and free.source == gate.source
    assert [free.layers[i].alpha for i in free.linearized] == [
        mixed.extra["alpha"][i] for i in free.linearized
    ]


def test_speedup_budget_is_met_minimally(smollm2_ckpt, mixed):
    options, ranking = MethodOptions(ctx=256), mixed
    model = cost_model(smollm2_ckpt, 256)
    plan = make_method_plan(smollm2_ckpt, "mixed", speedup=1.06, options=options, ranking=ranking)
    actions = [lp.action for lp in plan.layers]
    assert model.speedup(actions) >= 1.06
    fewer = make_method_plan(smollm2_ckpt, "mixed", plan.budget - 1, options=options, ranking=ranking)
    assert model.speedup([lp.action for lp in fewer.layers]) < 1.06
    with pytest.raises(GatenormError, match="at most"):
        make_method_plan(smollm2_ckpt, "mixed", speedup=5.0, options=options, ranking=ranking)
    with pytest.raises(GatenormError, match="exactly one"):
        make_method_plan(smollm2_ckpt, "mixed", 2, 1.1, options=options, ranking=ranking)


def test_every_method_plans_the_tiny_model(tiny_llama_dir, tiny_model, tiny_windows, monkeypatch):
    """Each registry method on the 4-layer model (calibration windows of random ids: it has no tokenizer)."""
    from gatenorm.methods import METHODS, data_driven

    monkeypatch.setattr(data_driven, "_windows", lambda ckpt, options: tiny_windows)
    ckpt = open_checkpoint(tiny_llama_dir)
    options = MethodOptions(calib=Calibration(WIKI_HELDOUT, 3, 24), ctx=16)
    synthetic = MethodOptions(calib=Calibration(SYNTHETIC, 3, 24), ctx=16)
    gate = make_method_plan(ckpt, "gate-norm", 2)
    expected = {
        "block-influence": {LayerAction.DROP_BLOCK},
        "harp": {LayerAction.LINEARIZE},
        "harp-free": {LayerAction.LINEARIZE},
        "mixed-synthetic": {LayerAction.DROP_ATTENTION, LayerAction.LINEARIZE, LayerAction.DROP_BLOCK},
    }
    for method, info in METHODS.items():
        own = synthetic if method == "mixed-synthetic" else options
        plan = make_method_plan(ckpt, method, 2, options=own)
        assert plan.method == method and plan.budget == 2 and 0 not in plan.changed
        allowed = expected.get(method, {LayerAction.DROP_ATTENTION, LayerAction.LINEARIZE})
        assert plan.actions - {LayerAction.KEEP} <= allowed
        assert plan.actions - {LayerAction.KEEP} <= info.actions  # the spec declares what it emits
        assert all((lp.alpha is not None) == (lp.action is LayerAction.LINEARIZE) for lp in plan.layers)
        assert Plan.from_json(plan.to_json()) == plan
        if info.data or method not in ("random", "last"):
            assert plan.source == gate.source  # the exporters' source check accepts every such plan
    assert make_method_plan(ckpt, "harp", 2, options=options).linearized == [2, 3]
    with pytest.raises(GatenormError, match="needs calibration text"):
        make_method_plan(ckpt, "attention-cosine", 1)
    with pytest.raises(GatenormError, match="generates"):
        make_method_plan(ckpt, "mixed-synthetic", 1, options=options)


def test_mixed_synthetic_rule(tiny_llama_dir, tiny_model, tiny_windows, monkeypatch):
    """Each layer takes the action with the smallest damage per saved FLOP, at the least-squares alpha."""
    from gatenorm.methods import data_driven, data_free

    monkeypatch.setattr(data_driven, "_windows", lambda ckpt, options: tiny_windows)
    ckpt = open_checkpoint(tiny_llama_dir)
    stats = layer_statistics(tiny_model, tiny_windows)
    real = data_free.saved_flops(ckpt, 16)
    drop = real[LayerAction.DROP_ATTENTION]
    assert 0 < real[LayerAction.LINEARIZE] < drop < real[LayerAction.DROP_BLOCK]
    chosen = set()
    # at its real costs the tiny model drops blocks and attention: also price blocks barely above a dropped
    # attention and a linearization barely below it, to see every action chosen
    dearer_blocks = {**real, LayerAction.DROP_BLOCK: 1.01 * drop}
    cheap_linear = {**dearer_blocks, LayerAction.LINEARIZE: 0.99 * drop}
    for saved in (real, dearer_blocks, cheap_linear):
        monkeypatch.setattr(data_free, "saved_flops", lambda ckpt, ctx, phase, saved=saved: saved)
        ranking = rank_layers(ckpt, "mixed-synthetic", MethodOptions(ctx=16))
        for i in range(4):
            damage = {
                LayerAction.DROP_ATTENTION: 1 - stats.attention_cosine[i],
                LayerAction.LINEARIZE: (1 - stats.linear_cosine[i]) * drop / saved[LayerAction.LINEARIZE],
                LayerAction.DROP_BLOCK: (1 - stats.block_cosine[i]) * drop / saved[LayerAction.DROP_BLOCK],
            }
            best = min(damage.values())
            assert ranking.scores.scores[i] == pytest.approx(best, rel=1e-6)
            assert damage[ranking.actions[i]] == pytest.approx(best, rel=1e-6)
            chosen.add(ranking.actions[i])
            linearize = ranking.actions[i] is LayerAction.LINEARIZE
            assert ranking.alphas.get(i) == (pytest.approx(stats.linear_alpha[i]) if linearize else None)
    assert len(chosen) == 3, chosen


def test_mixed_methods_price_actions_for_the_target_phase(
    tiny_llama_dir, tiny_model, tiny_windows, monkeypatch
):
    """`--speedup-for decode` prices each action by its decode cost at depth `ctx`, not a prompt's."""
    from gatenorm.methods import data_driven, data_free

    ckpt = open_checkpoint(tiny_llama_dir)
    prefill, decode = (data_free.saved_flops(ckpt, 4096, phase) for phase in ("prefill", "decode"))
    assert prefill != decode
    assert data_free.linearize_threshold(ckpt, 4096, "decode") != data_free.linearize_threshold(ckpt, 4096)
    monkeypatch.setattr(data_driven, "_windows", lambda ckpt, options: tiny_windows)
    asked = []
    real = data_free.saved_flops
    monkeypatch.setattr(
        data_free, "saved_flops", lambda c, ctx, phase: asked.append((ctx, phase)) or real(c, ctx, phase)
    )
    for method in ("mixed", "mixed-synthetic"):
        rank_layers(ckpt, method, MethodOptions(ctx=4096, speedup_for="decode"))
    assert asked == [(4096, "decode")] * 2


def test_synthetic_calibration_text(smollm2_gguf, monkeypatch, tmp_path):
    """llama.cpp samples full windows (BOS, no end of generation inside), seeded, the same however the
    windows are grouped into llama.cpp batches, cached per model and settings."""
    from gatenorm.apply import load_tokenizer
    from gatenorm.methods import synthetic
    from gatenorm.validate.text import hf_bos_id

    monkeypatch.setenv("GATENORM_CACHE", str(tmp_path))
    tokenizer = load_tokenizer(smollm2_gguf)
    calib = Calibration(SYNTHETIC, samples=3, length=16)
    windows = calib.windows(tokenizer, smollm2_gguf, seed=1)
    # the tokenizer's BOS first where it adds one (SmolLM2's GGUF says add_bos_token false, which transformers
    # 5 follows as llama.cpp does; transformers 4 added one)
    bos = hf_bos_id(tokenizer)
    assert windows.shape == (3, 16) and (bos is None or (windows[:, 0] == bos).all())
    assert not np.isin(windows[:, 1:], tokenizer.all_special_ids).any()  # no BOS/EOS inside: full windows
    assert len({tuple(row) for row in windows}) == 3
    assert len(list((tmp_path / "synthetic").glob("*.npy"))) == 1
    _, kv_bytes = synthetic._gguf_facts(smollm2_gguf)
    prefixes = windows[:, : 1 if bos is None else 2]  # (BOS and) the first token
    monkeypatch.setattr(synthetic, "KV_BUDGET", kv_bytes * 16)  # one window per llama.cpp batch
    assert (synthetic.llama_windows(smollm2_gguf, prefixes, 16, 1, kv_bytes) == windows).all()
    assert (synthetic.llama_windows(smollm2_gguf, prefixes, 16, 2, kv_bytes) != windows).any()
    monkeypatch.setattr(synthetic, "llama_windows", lambda *a: pytest.fail("not read from the cache"))
    assert (calib.windows(tokenizer, smollm2_gguf, seed=1) == windows).all()
    with pytest.raises(GatenormError, match="needs the model"):
        calib.windows(tokenizer)


def test_sampling_follows_the_softmax_without_banned_tokens():
    """Temperature 1, no top-k / top-p: each token at its softmax probability; banned ids never."""
    from gatenorm.methods.synthetic import _sample_token

    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    rng = np.random.default_rng(0)
    draws = np.bincount([_sample_token(logits, np.array([3]), rng) for _ in range(20000)], minlength=4)
    assert draws[3] == 0
    assert draws[:3] / draws.sum() == pytest.approx(np.array([0.5, 0.3, 0.15]) / 0.95, abs=0.015)


def test_synthetic_text_of_an_hf_folder_and_the_plan_records_it(tokenizer_dir, monkeypatch, tmp_path):
    """An HF folder is sampled through a temporary F16 GGUF (gatenorm's writer; nothing left behind), and
    a mixed-synthetic plan records its calibration and what sampled it."""
    from gatenorm.methods.synthetic import sampler_id
    from tests.conftest import tiny_hf

    folder = tiny_hf(
        tmp_path / "tiny", tokenizer_dir, "llama", pad_token_id=0, bos_token_id=1, eos_token_id=2
    )
    cache = tmp_path / "cache"
    monkeypatch.setenv("GATENORM_CACHE", str(cache))
    ckpt = open_checkpoint(folder)
    options = MethodOptions(calib=Calibration(SYNTHETIC, 2, 12), ctx=16, seed=3)
    plan = make_method_plan(ckpt, "mixed-synthetic", 1, options=options)
    record = plan.calibration
    assert record is not None and record.source == SYNTHETIC and (record.samples, record.length) == (2, 12)
    assert record.seed == 3 and record.generator == sampler_id() and "llama.cpp" in record.generator
    assert Plan.from_json(plan.to_json()) == plan
    assert [p.suffix for p in (cache / "synthetic").iterdir()] == [".npy"]  # the F16 GGUF is gone
    wiki = MethodOptions(calib=Calibration(WIKI_HELDOUT, 2, 12))
    wiki = make_method_plan(ckpt, "attention-cosine", 1, options=wiki)
    assert wiki.calibration.source == WIKI_HELDOUT and wiki.calibration.generator is None


def _tiny_gemma2(tokenizer_dir, tmp_path):
    """A tiny Gemma-2 HF folder with an untied LM head (transformers 5's): llama.cpp cannot host it."""
    from tests.conftest import tiny_hf
    from tests.test_families import FAMILIES

    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return tiny_hf(tmp_path / "gemma2", tokenizer_dir, "gemma2", **ids, **FAMILIES["gemma2"])


def test_synthetic_text_where_llama_cpp_cannot_host_the_folder(tokenizer_dir, monkeypatch, tmp_path):
    """A folder llama.cpp cannot run is sampled by transformers with llama.cpp's rules: BOS, a uniform
    first token, softmax at temperature 1 without end-of-generation or special tokens, each window from its
    own seeded generator (the cached steps give the tokens a full forward per step gives); cached, and the
    plan records transformers as the generator."""
    from gatenorm.apply import load_model, load_tokenizer
    from gatenorm.methods import synthetic

    folder = _tiny_gemma2(tokenizer_dir, tmp_path)
    assert "lm_head" in synthetic.llama_cpp_refusal(folder)
    monkeypatch.setenv("GATENORM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(synthetic, "llama_windows", lambda *a: pytest.fail("llama.cpp cannot host it"))
    tokenizer = load_tokenizer(folder)
    windows = Calibration(SYNTHETIC, samples=3, length=10).windows(tokenizer, folder, seed=4)
    bos = 1 if windows[0, 0] == 1 else None
    assert windows.shape == (3, 10) and (bos is None or (windows[:, 0] == bos).all())
    banned = synthetic._banned(tokenizer, open_checkpoint(folder).config)
    assert 2 in banned and not np.isin(windows[:, 1 + (bos is not None) :], banned).any()
    model, first = load_model(folder), 1 + (bos is not None)
    for s, row in enumerate(windows):  # a full forward per step, no cache: the same tokens
        rng, ids = np.random.default_rng((4, s)), list(row[:first])
        with torch.no_grad():
            while len(ids) < 10:
                logits = model(torch.tensor([ids]), use_cache=False).logits[0, -1].float().numpy()
                ids.append(synthetic._sample_token(logits, banned, rng))
        assert ids == row.tolist()
    monkeypatch.setattr(synthetic, "torch_windows", lambda *a: pytest.fail("not read from the cache"))
    again = Calibration(SYNTHETIC, samples=3, length=10).windows(tokenizer, folder, seed=4)
    assert (again == windows).all()
    options = MethodOptions(calib=Calibration(SYNTHETIC, 3, 10), seed=4)
    plan = make_method_plan(open_checkpoint(folder), "mixed-synthetic", 1, options=options)
    assert plan.calibration.generator.startswith("transformers ")


def test_transformers_sampling_is_refused_above_max_memory(tokenizer_dir, tmp_path):
    """The transformers sampler loads the whole model: its step is estimated as such and a model that does
    not fit `--max-memory` is refused in one line before anything is loaded."""
    from gatenorm.sequential.budget import check, plan_steps
    from gatenorm.sequential.memory import MemorySettings

    ckpt = open_checkpoint(_tiny_gemma2(tokenizer_dir, tmp_path))
    steps = plan_steps(ckpt, "mixed-synthetic", Calibration(SYNTHETIC, 2, 16), 1, None)
    assert "with transformers (whole float32 model)" in steps[0].what
    with pytest.raises(GatenormError, match=r"sampling synthetic .* transformers.*--calib wiki-heldout") as e:
        check(ckpt, steps, MemorySettings(max_memory=0.01), lambda _: None)
    assert "\n" not in str(e.value)


def test_mixed_synthetic_beats_gate_norm_on_smollm2(smollm2_ckpt, smollm2_model):
    """The data-free plan from self-generated text loses far less than Gate-Norm's at the same estimated
    speedup (KLD on Wikipedia text; the study measures about 0.5 against 2.5 at 1.1x), mixing dropped
    attention with dropped blocks on SmolLM2."""
    import copy

    from gatenorm.apply import apply_plan, load_tokenizer
    from gatenorm.validate.agreement import AgreementAccumulator
    from gatenorm.validate.text import token_windows

    options = MethodOptions(calib=Calibration(SYNTHETIC, 4, 128), ctx=256)
    plan = make_method_plan(smollm2_ckpt, "mixed-synthetic", speedup=1.1, options=options)
    assert plan.method == "mixed-synthetic" and 0 not in plan.changed
    assert plan.dropped and plan.blocks_dropped
    verify_plan_source(plan, smollm2_ckpt)
    tokenizer = load_tokenizer(smollm2_ckpt.path)
    tokenize = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    windows = token_windows("wiki", tokenize, 256, 512, tokenizer.bos_token_id)
    ids = torch.from_numpy(windows)

    def kld(p: Plan) -> float:
        model = apply_plan(copy.deepcopy(smollm2_model), p)
        acc = AgreementAccumulator()
        with torch.inference_mode():
            ref, cand = smollm2_model(ids).logits, model(ids).logits
        for row, r, c in zip(windows, ref, cand, strict=True):
            acc.add(r[:-1].numpy(), c[:-1].numpy(), row[1:])
        return acc.result().kld_mean

    gate_plan = make_method_plan(smollm2_ckpt, "gate-norm", speedup=1.1, options=MethodOptions(ctx=256))
    gate, ours = kld(gate_plan), kld(plan)
    assert ours < 0.5 * gate, (ours, gate)


@pytest.mark.slow
def test_data_driven_plans_on_smollm2(smollm2_ckpt, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(a for _, a in wiki_articles(WIKI_HELDOUT, 4000)))
    options = MethodOptions(calib=Calibration(str(text), samples=2, length=32))
    gate = make_method_plan(smollm2_ckpt, "gate-norm", 4)
    cosine = rank_layers(smollm2_ckpt, "attention-cosine", options)
    plan = make_method_plan(smollm2_ckpt, "attention-cosine", 4, options=options, ranking=cosine)
    assert plan.dropped == sorted(plan.dropped) and len(plan.dropped) == 4 and plan.source == gate.source
    assert plan.scores == pytest.approx([1 - c for c in cosine.extra["attention_cosine"]])
    blocks = make_method_plan(smollm2_ckpt, "block-influence", 3, options=options)
    assert len(blocks.blocks_dropped) == 3 and blocks.actions == {LayerAction.KEEP, LayerAction.DROP_BLOCK}
    assert blocks.source == gate.source


@pytest.mark.slow
def test_harp_plan_on_smollm2(smollm2_ckpt):
    options = MethodOptions(calib=Calibration(WIKI_HELDOUT, samples=2, length=64))
    plan = make_method_plan(smollm2_ckpt, "harp", 2, options=options)
    assert plan.linearized == [28, 29] and all(0 <= lp.alpha <= 1.5 for lp in plan.layers if lp.alpha)


def test_calibration_text_is_held_out():
    # the study's and validate's defaults: evaluation from the start, calibration from the end of the leads
    for eval_tokens, ctx, calib_tokens in ((8 * 256, 256, 16 * 256), (20480, 512, 64 * 1024)):
        ev = {i for i, _ in wiki_articles("wiki", window_chars(eval_tokens, ctx))}
        cal = {i for i, _ in wiki_articles(WIKI_HELDOUT, window_chars(calib_tokens, 256))}
        assert ev and cal and not ev & cal
    with pytest.raises(GatenormError, match="evaluation text"):
        Calibration("wiki")
    with pytest.raises(GatenormError, match="no such"):
        Calibration("/nonexistent/calib.txt")
    with pytest.raises(GatenormError):
        Calibration(WIKI_HELDOUT, samples=0)


def test_score_checkpoint_refuses_registry_methods(smollm2_ckpt):
    with pytest.raises(GatenormError, match="rank_layers"):
        score_checkpoint(smollm2_ckpt, Method.MIXED)


def gatenorm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gatenorm.cli", *map(str, args)], capture_output=True, text=True
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (("plan", "smollm2", "--drop", "2", "--method", "attention-cosine"), "needs calibration text"),
        (("plan", "smollm2", "--drop", "2", "--method", "harp", "--calib", "/no/file"), "no such"),
        (("plan", "smollm2", "--drop", "2", "--budget-speedup", "1.1"), "exactly one"),
        (("plan", "smollm2", "--budget-speedup", "0.9"), "above 1"),
        (("score", "smollm2", "--method", "block-influence", "--calib", "wiki"), "evaluation text"),
        (("plan", "smollm2", "--drop", "2", "-m", "mixed-synthetic", "--calib", "wiki-heldout"), "generates"),
    ],
)
def test_cli_bad_method_input(tmp_path, args, message):
    out = gatenorm(*args, "-o", tmp_path / "p.json") if args[0] == "plan" else gatenorm(*args)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_cli_mixed_plan_by_speedup(tmp_path):
    out = gatenorm("plan", "smollm2", "--method", "mixed", "--budget-speedup", "1.05", "--ctx", "256",
                   "-o", tmp_path / "p.json")  # fmt: skip
    assert out.returncode == 0, out.stderr
    plan = Plan.load(tmp_path / "p.json")
    assert plan.method == "mixed" and plan.linearized
    assert "estimated speedup" in " ".join(out.stdout.split())  # rich wraps lines at the terminal width
    assert (
        cost_model(open_checkpoint(plan.source.path), 256).speedup([lp.action for lp in plan.layers]) >= 1.05
    )
