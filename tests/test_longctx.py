"""Long context: depths clipped to the context, KV-cache bytes measured from the torch and onnxruntime
adapters (kept layers only), and the runtime's context length."""

from __future__ import annotations

import pytest
from conftest import tiny_hf

from gatenorm.methods import Method, score_checkpoint
from gatenorm.plan import make_plan
from gatenorm.readers import open_checkpoint
from gatenorm.validate.bench import BenchConfig, clip_depths, kv_key, tg_key
from gatenorm.validate.runtimes import model_spec, open_runtime


def test_clip_depths():
    assert clip_depths([8192, 0, 2048], 128, 8192) == [0, 2048, 8192 - 129]
    assert clip_depths([0, 2048, 8192], 128, 2048) == [0, 2048 - 129]
    assert clip_depths([0, 4096, 4096], 16, None) == [0, 4096]
    assert tg_key(128, 0) == "tg128_tok_s" and tg_key(16, 2048) == "tg16_d2048_tok_s"
    assert kv_key(0) == "kv_d0_mib"


def test_bench_config_is_strict():
    with pytest.raises(ValueError):
        BenchConfig(depths=[-1])
    with pytest.raises(ValueError):
        BenchConfig(long_prompt=5)  # the old key is an error, not ignored
    assert BenchConfig().depths == [0, 2048, 8192] and BenchConfig().flash_attn


@pytest.fixture(scope="module")
def tiny_pruned(tmp_path_factory, tokenizer_dir):
    folder = tiny_hf(tmp_path_factory.mktemp("tiny") / "hf", tokenizer_dir, "llama", num_hidden_layers=4)
    ckpt = open_checkpoint(folder)
    plan = make_plan(ckpt, score_checkpoint(ckpt, Method.GATE_NORM, 0), drop=2)
    path = folder.parent / "plan.json"
    plan.save(path)
    return folder, path, ckpt.shape


def test_torch_kv_bytes_count_kept_layers(tiny_pruned):
    folder, plan, shape = tiny_pruned
    per_layer_token = 2 * shape.n_head_kv * shape.head_dim * 4  # K and V, float32
    full = open_runtime(model_spec(str(folder)), threads=1)
    pruned = open_runtime(model_spec(str(folder), plan=plan), threads=1)
    assert full.max_context > 0
    t_full, t_pruned = full.generate(list(range(10, 40)), 5), pruned.generate(list(range(10, 40)), 5)
    assert t_full.kv_bytes == shape.n_layers * 34 * per_layer_token
    assert t_pruned.kv_bytes == (shape.n_layers - 2) * 34 * per_layer_token


def test_onnx_kv_bytes_count_kept_layers(tiny_pruned, tmp_path):
    from exporters import onnx as onnx_export
    from gatenorm.plan import Plan

    folder, plan, shape = tiny_pruned
    out = onnx_export.export_onnx(folder, Plan.load(plan), tmp_path / "onnx")
    rt = open_runtime(model_spec(str(out)), threads=1)
    t = rt.generate(list(range(10, 40)), 5)
    assert t.kv_bytes == (shape.n_layers - 2) * 34 * 2 * shape.n_head_kv * shape.head_dim * 4


def test_decode_cost_model_by_hand(smollm2_gguf):
    """Decode at depth d: FLOPs + flops_per_byte * bytes, with the K/V cache read by kept layers only and
    the LM head counted; the speedup of dropped attention grows with the depth."""
    from gatenorm.methods.cost import KV_BYTES, Q8_0_BYTES, cost_model
    from gatenorm.plan import LayerAction as A

    ckpt = open_checkpoint(smollm2_gguf)
    m = cost_model(ckpt, 4096, "decode")
    d, f, kv, q = 576, 1536, 3 * 64, 9 * 64
    proj, mlp = d * (2 * q + 2 * kv), 3 * d * f
    keep = (
        2 * proj
        + 2 * mlp
        + 4 * q * 4097
        + m.flops_per_byte * ((proj + mlp) * Q8_0_BYTES + 2 * kv * KV_BYTES * 4097)
    )
    drop = 2 * mlp + m.flops_per_byte * mlp * Q8_0_BYTES
    head = 2 * 49152 * d + m.flops_per_byte * 49152 * d * Q8_0_BYTES
    assert m.layer(A.KEEP) == pytest.approx(keep) and m.layer(A.DROP_ATTENTION) == pytest.approx(drop)
    actions = [A.DROP_ATTENTION] * 8 + [A.KEEP] * 22
    assert m.speedup(actions) == pytest.approx((30 * keep + head) / (8 * drop + 22 * keep + head))
    by_depth = [cost_model(ckpt, depth, "decode").speedup(actions) for depth in (0, 2048, 8192)]
    assert by_depth == sorted(by_depth) and by_depth[0] < 1.07 < by_depth[2]
    # prefill at ctx N is unchanged: attention to (N + 1) / 2 keys on average, no head, no bytes
    p = cost_model(ckpt, 4096)
    assert p.layer(A.KEEP) == pytest.approx(2 * proj + 2 * mlp + 4 * q * 4097 / 2) and p.head == 0


def test_speedup_for_decode_in_cli_and_recipes(smollm2_gguf, tmp_path):
    """--speedup-for decode at a depth needs fewer layers than at depth 0; recipes' targets take it too."""
    from gatenorm.methods.registry import MethodOptions, make_method_plan
    from gatenorm.recipes.schema import Target

    ckpt = open_checkpoint(smollm2_gguf)
    deep = make_method_plan(ckpt, "gate-norm", None, 1.2, MethodOptions(ctx=8192, speedup_for="decode"))
    shallow = make_method_plan(ckpt, "gate-norm", None, 1.1, MethodOptions(ctx=0, speedup_for="decode"))
    assert 0 < deep.budget < shallow.budget
    t = Target.model_validate({"min_speedup": 1.3, "speedup_for": "decode", "ctx": 4096})
    assert t.kind == "min_speedup" and t.label == "min_speedup=1.3@decode4096"
    with pytest.raises(ValueError, match="go with min_speedup"):
        Target.model_validate({"max_kld": 0.3, "speedup_for": "decode"})


def test_passkey_prompts_are_seeded_and_hide_the_key(smollm2_gguf):
    from gatenorm.validate.passkey import PasskeyConfig, build_prompts

    rt = open_runtime(model_spec(str(smollm2_gguf)), threads=1, n_ctx=1100)
    cfg = PasskeyConfig(lengths=[512, 1024, 99999], depths=3, trials=2, seed=1)
    prompts = build_prompts("passkey_multi", cfg, rt.tokenize, rt.bos_id, 1100)
    assert prompts == build_prompts("passkey_multi", cfg, rt.tokenize, rt.bos_id, 1100)
    assert prompts != build_prompts(
        "passkey_multi", cfg.model_copy(update={"seed": 2}), rt.tokenize, rt.bos_id, 1100
    )
    assert {p["length"] for p in prompts} == {512, 1024, 1092} and len(prompts) == 3 * 3 * 2
    for p in prompts:
        ctx, key = p["request"]
        assert len(ctx) + len(key) == p["length"] and (rt.bos_id is None or ctx[0] == rt.bos_id)
        text = rt.llm.detokenize(ctx).decode()
        digits = rt.llm.detokenize(key).decode().strip()
        assert len(digits) == 5 and digits.isdigit() and text.count(f"is {digits}.") == 1
        assert text.count("The pass key of the") == 3 + 1 and text.rstrip().endswith("door is")
    first = [p for p in build_prompts("passkey", cfg, rt.tokenize, rt.bos_id, 1100) if p["length"] == 512]
    positions = []
    for p in first[::2]:
        text = rt.llm.detokenize(p["request"][0]).decode()
        positions.append(text.index("The pass key is") / len(text))
    assert positions == sorted(positions) and positions[0] < 0.15 and positions[-1] > 0.85
    rt.close()


def test_passkey_validation_gate_and_report(smollm2_gguf, tiny_pruned, tmp_path):
    """SmolLM2 against itself retrieves identically (change 0, the gate holds); the report has the grid."""
    from gatenorm.validate.gates import Gates
    from gatenorm.validate.passkey import PasskeyConfig
    from gatenorm.validate.report import to_markdown, write_png
    from gatenorm.validate.run import Settings, validate

    spec = model_spec(str(smollm2_gguf))
    settings = Settings(
        max_tokens=0,
        tasks=["passkey"],
        threads=2,
        passkey=PasskeyConfig(lengths=[256, 512], depths=2, trials=1),
    )
    report = validate(spec, spec, settings, Gates(min_retrieval=-5.0))
    r = report.retrieval.tasks["passkey"]
    assert r.reference == r.candidate and r.reference.n == 4
    assert r.reference.lengths == [256, 512] and r.reference.depths == [0.0, 1.0]
    assert r.reference.acc > 0  # SmolLM2 finds the key in short prompts
    assert "min_retrieval: retrieval accuracy change (points) = 0" in " ".join(report.gate_lines)
    assert "Long-range retrieval" in to_markdown(report)
    write_png(report, tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 1000


def test_passkey_in_torch_with_a_plan(tiny_pruned):
    """The retrieval tasks run in PyTorch too (here a tiny random model and its pruned plan)."""
    from gatenorm.validate.gates import Gates
    from gatenorm.validate.passkey import PasskeyConfig
    from gatenorm.validate.run import Settings, validate

    folder, plan, _ = tiny_pruned
    settings = Settings(
        max_tokens=0, tasks=["passkey_multi"], threads=1, passkey=PasskeyConfig(lengths=[200, 9999], trials=1)
    )
    report = validate(model_spec(str(folder)), model_spec(str(folder), plan=plan), settings, Gates())
    grid = report.retrieval.tasks["passkey_multi"].candidate
    assert grid.lengths == [200, 256 - 8] and len(grid.accuracy[0]) == 5 and grid.n == 10


def test_quant_ladder_is_for_the_unpruned_model_only():
    from gatenorm.recipes.batch import plan_batch
    from gatenorm.recipes.schema import Recipe

    recipe = Recipe.model_validate(
        {
            "models": ["tiny"],
            "budgets": [0, 1, {"min_speedup": 1.01, "speedup_for": "decode", "ctx": 128}],
            "exports": {"gguf": {"quants": ["Q8_0"], "ladder": ["Q6_K", "Q8_0", "Q2_K"]}},
            "validation": {"enabled": False},
        }
    )
    names = sorted(v.name for v in plan_batch(recipe, "t").variants)
    assert names == [
        "tiny-d00-gguf-Q2_K",
        "tiny-d00-gguf-Q6_K",
        "tiny-d00-gguf-Q8_0",
        "tiny-gate-norm-d01-gguf-Q8_0",
    ]


def test_frontier_names_pruned_variants_quantization_does_not_reach():
    from gatenorm.recipes.frontier import frontier_md

    def point(name, pruned, kld, speed):
        return {
            "name": name,
            "pruned": pruned,
            "quant": name,
            "method": "m",
            "dropped": 8 * pruned,
            "kld": kld,
            "speed": speed,
        }

    ladder = [
        point("Q8_0", False, 0.01, 1.0),
        point("Q4_K_M", False, 0.06, 1.02),
        point("Q2_K", False, 0.5, 1.2),
    ]
    at_depth = [*ladder, point("Q8_0", True, 0.2, 1.3)]  # faster than Q2_K at less KLD: on the front
    shallow = [*ladder, point("Q8_0", True, 0.2, 1.01)]  # Q4_K_M is faster at less KLD: not on the front
    md = "\n".join(frontier_md({"tg32 @ d4096": at_depth, "tg32 @ d0": shallow}))
    deep_row = next(line for line in md.splitlines() if line.startswith("| tg32 @ d4096"))
    shallow_row = next(line for line in md.splitlines() if line.startswith("| tg32 @ d0"))
    assert deep_row.endswith("| m-d08 Q8_0 |") and "Q2_K" not in deep_row.split("|")[2]
    assert shallow_row.endswith("| none |")
