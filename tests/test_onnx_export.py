"""ONNX export: graph structure, metadata, parity with PyTorch (prefill + 16 decode steps), precisions,
ORT-format packaging, CLI and failure handling. Tiny random models for every architecture; one pruned
SmolLM2 export (fp32, --mobile) and one int4 SmolLM2 export in the default run."""

from __future__ import annotations

import json
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import SMOLLM2_MIXED_ACTIONS, SMOLLM2_MIXED_ALPHAS, make_tiny_model, mixed_plan

from exporters.keys import Keys
from exporters.onnx import OnnxRunner, Precision, export_onnx
from exporters.onnx.metadata import CONFIG_NAME, OnnxExportConfig
from gatenorm.apply import apply_plan, load_model
from gatenorm.architectures import get_architecture
from gatenorm.errors import GatenormError
from gatenorm.methods import score_checkpoint
from gatenorm.plan import LayerAction, Plan, make_plan
from gatenorm.readers import open_checkpoint

DECODE_STEPS = 16
TOL = 1e-3
TINY_ARCHS = {
    "llama": {},
    "llama-head16": {"num_attention_heads": 4},  # GroupQueryAttention applies the rotary (do_rotary)
    "mistral": {"sliding_window": 5},  # shorter than the test prompts: the window matters
    "qwen2": {},
    "qwen3": {"head_dim": 8},
}


def plan_for(model_path: Path, drop: int, allow_first_layer: bool = False) -> Plan:
    ckpt = open_checkpoint(model_path)
    return make_plan(ckpt, score_checkpoint(ckpt, "gate-norm"), drop, allow_first_layer)


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits.float().numpy()


def onnx_decode_logits(runner: OnnxRunner, prompt: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy prefill + `steps` cached decode steps; returns all tokens and the logits of each step."""
    state = runner.prefill(prompt)
    tokens, logits = [], [state.logits]
    for _ in range(steps):
        tokens.append(int(state.logits[0].argmax()))
        logits.append(runner.decode(state, [tokens[-1]]).copy())
    return np.concatenate([prompt[0], tokens]), np.stack([x[0] for x in logits])


def assert_matches_torch(runner: OnnxRunner, model, prompt: np.ndarray) -> None:
    """Full-window logits and each cached decode step agree with the PyTorch model within TOL."""
    ref = torch_logits(model, prompt)
    np.testing.assert_allclose(runner.logits(prompt), ref, atol=TOL, rtol=0)
    tokens, step_logits = onnx_decode_logits(runner, prompt, DECODE_STEPS)
    ref_all = torch_logits(model, tokens[None])[0]  # one uncached pass over the same tokens
    np.testing.assert_allclose(step_logits, ref_all[prompt.shape[1] - 1 :], atol=TOL, rtol=0)


def runner_model(folder: Path) -> str:
    """The model file of an export, relative to its folder (``onnx/model*.onnx``)."""
    return OnnxExportConfig.load(folder).model


def layer_ops(model: onnx.ModelProto, layer: int, module: str) -> Counter:
    """Op types of the nodes the exporter scoped under ``/model/layers.{layer}/{module}/``."""
    scope = f"/model/layers.{layer}/{module}/"
    return Counter(n.op_type for n in model.graph.node if n.name.startswith(scope))


def assert_graph_follows_plan(folder: Path, plan: Plan) -> None:
    """Inputs/outputs carry exactly the kept layers' cache; each layer has the nodes its action leaves.

    keep: one q/k/v MatMul and the o MatMul, one GroupQueryAttention (rotary inside it, or two
    RotaryEmbedding for head sizes it does not take); drop-attention: no attention or input norm;
    linearize: the input norm and one fused MatMul; drop-block: no node at all.
    """
    model = onnx.load(str(folder / OnnxExportConfig.load(folder).model), load_external_data=False)
    arch = get_architecture(plan.source.architecture)
    kept = plan.kv_layers
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    kv_in = [f"past_key_values.{s}.{p}" for s in range(len(kept)) for p in ("key", "value")]
    kv_out = [f"present.{s}.{p}" for s in range(len(kept)) for p in ("key", "value")]
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["gatenorm.kv_layers"]) == kept
    assert sorted(inputs) == sorted(["input_ids", "attention_mask", "position_ids", *kv_in])
    assert outputs == ["logits", *kv_out]
    for value in (*model.graph.input, *model.graph.output):
        if value.name.startswith(("past_key_values.", "present.")):
            dims = value.type.tensor_type.shape.dim
            assert dims[0].dim_param == "batch_size" and dims[2].dim_param, value.name
    attention_matmuls = 0
    for lp in plan.layers:
        i = lp.layer
        attn = layer_ops(model, i, arch.hf_attention_module)
        fused = layer_ops(model, i, "fused_attention")
        # a kept layer's input norm keeps the family's name, a linearized layer's is `attention_norm`
        norm = layer_ops(model, i, arch.hf_attention_norm) + layer_ops(model, i, "attention_norm")
        matmuls = sum(attn[op] + fused[op] for op in ("MatMul", "MatMulNBits", "MatMulInteger"))
        if lp.action is LayerAction.DROP_BLOCK:
            everything = [n for n in model.graph.node if n.name.startswith(f"/model/layers.{i}/")]
            assert not everything, f"layer {i} was dropped whole but has nodes"
            continue
        if lp.action is LayerAction.KEEP:
            assert matmuls == 2 and not fused, f"layer {i}: {attn}"
            assert attn["GroupQueryAttention"] == 1, f"{i}: {attn}"
            gqa = next(
                n
                for n in model.graph.node
                if n.name.startswith(f"/model/layers.{i}/") and n.op_type == "GroupQueryAttention"
            )
            do_rotary = next(a.i for a in gqa.attribute if a.name == "do_rotary")
            # rotary inside GroupQueryAttention (head and rotary sizes multiples of 16), or two
            # RotaryEmbedding before it, or none (a layer without rotary: SmolLM3's no-rope layers)
            assert (do_rotary, attn["RotaryEmbedding"]) in ((1, 0), (0, 2), (0, 0)), f"{i}: {attn}"
            if OnnxExportConfig.load(folder).head_dim % 16:
                assert not do_rotary, f"layer {i}: do_rotary with head size not a multiple of 16"
        elif lp.action is LayerAction.LINEARIZE:
            has_norm = norm or arch.hf_attention_norm is None  # OLMo-2 has no input norm
            assert matmuls == 1 and not attn and has_norm, f"layer {i}: {fused} {attn}"
        else:
            assert not attn and not fused and not norm, f"layer {i} was dropped but has attention nodes"
        assert layer_ops(model, i, arch.hf_mlp_module), f"layer {i} lost its MLP"
        attention_matmuls += matmuls
    assert attention_matmuls == 2 * len(kept) + len(plan.linearized)
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["GroupQueryAttention"] == len(kept) and ops["Softmax"] == 0


# ---------------------------------------------------------------- tiny models, every architecture


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-archs")
    folders = {}
    for arch, overrides in TINY_ARCHS.items():
        folders[arch] = root / arch
        make_tiny_model(folders[arch], arch.split("-")[0], seed=1, **overrides)
    return folders


@pytest.mark.parametrize("drop", [0, 2])
@pytest.mark.parametrize("arch", list(TINY_ARCHS))
def test_tiny_fp32_export_matches_pytorch(tiny_models, tmp_path, arch, drop):
    plan = plan_for(tiny_models[arch], drop)
    out = export_onnx(tiny_models[arch], plan, tmp_path / "onnx")
    assert_graph_follows_plan(out, plan)
    runner = OnnxRunner(out)
    assert runner.plan == plan
    reference = apply_plan(load_model(tiny_models[arch]), plan)
    prompt = np.random.default_rng(0).integers(0, 128, (1, 11))
    assert_matches_torch(runner, reference, prompt)
    # batched full-window logits too
    batch = np.random.default_rng(1).integers(0, 128, (3, 9))
    np.testing.assert_allclose(runner.logits(batch), torch_logits(reference, batch), atol=TOL, rtol=0)


def test_tiny_first_layer_dropped_and_metadata(tiny_models, tmp_path):
    plan = plan_for(tiny_models["llama"], 3, allow_first_layer=True)
    out = export_onnx(tiny_models["llama"], plan, tmp_path / "onnx")
    assert_graph_follows_plan(out, plan)
    model = onnx.load(str(out / "onnx/model.onnx"))
    props = {p.key: p.value for p in model.metadata_props}
    assert Plan.from_json(props["gatenorm.plan"]) == plan
    assert json.loads(props["gatenorm.dropped_layers"]) == plan.dropped
    assert props["gatenorm.method"] == "gate-norm"
    assert props[Keys.Source.SHA256] == plan.source.sha256  # the GGUF spelling (older: source_sha256)
    assert props["gatenorm.tool_version"] == plan.tool_version
    config = json.loads((out / CONFIG_NAME).read_text())
    kept = [lp.layer for lp in plan.layers if lp.layer not in plan.dropped]
    assert [k["layer"] for k in config["kv_cache"]] == kept
    assert config["kv_cache"][0]["past_key"] == "past_key_values.0.key"
    assert config["kv_cache"][-1]["present_value"] == f"present.{len(kept) - 1}.value"
    assert config["dropped_layers"] == plan.dropped
    assert Plan.load(out / "plan.json") == plan
    reference = apply_plan(load_model(tiny_models["llama"]), plan)
    assert_matches_torch(OnnxRunner(out), reference, np.arange(5, 17)[None])


#: 4 tiny layers: layer 0 linearized, 1 without attention, 2 kept, 3 (the last) dropped whole.
TINY_MIXED = {0: "linearize", 1: "drop-attention", 3: "drop-block"}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_mixed_plan_matches_pytorch(tiny_models, tmp_path, arch):
    """Linearized (alpha; qwen2: v bias folded in), no-attention and dropped layers: graph, cache, logits."""
    ckpt = open_checkpoint(tiny_models[arch])
    plan = mixed_plan(ckpt, TINY_MIXED, {0: 0.5})
    out = export_onnx(tiny_models[arch], plan, tmp_path / "onnx", mobile=arch == "llama")
    assert_graph_follows_plan(out, plan)
    runner = OnnxRunner(out)
    assert runner.plan == plan and [k.layer for k in runner.config.kv_cache] == [2]
    config = runner.config
    assert (config.linearized_layers, config.linearize_alphas, config.dropped_blocks) == ([0], [0.5], [3])
    props = runner.session.get_modelmeta().custom_metadata_map
    assert json.loads(props["gatenorm.linearize_alphas"]) == [0.5]
    assert json.loads(props["gatenorm.dropped_blocks"]) == [3]
    prompt = np.random.default_rng(2).integers(0, 128, (1, 11))
    assert_matches_torch(runner, apply_plan(load_model(tiny_models[arch]), plan), prompt)
    wrong = apply_plan(load_model(tiny_models[arch]), mixed_plan(ckpt, TINY_MIXED, {0: 1.0}))
    assert np.abs(runner.logits(prompt) - torch_logits(wrong, prompt)).max() > 10 * TOL  # alpha matters
    if arch == "llama":
        ort_logits = OnnxRunner(out, ort_format=True).logits(prompt)
        np.testing.assert_allclose(ort_logits, runner.logits(prompt), atol=1e-4, rtol=0)


IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
ALTERNATING = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
LONGROPE = {
    "type": "longrope",
    "short_factor": [1.0 + i / 8 for i in range(4)],
    "long_factor": [2.0 + i for i in range(4)],
}
#: every family beyond llama / qwen, tiny (4 layers, d 64), with what makes it differ from llama switched on
FAMILY_ARCHS = {
    "mistral": {"sliding_window": 5},
    # fused qkv / gate_up; one KV head; partial rotary (Phi-4-mini) inside GroupQueryAttention; LongRoPE
    "phi3": {
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "partial_rotary_factor": 0.5,
        "original_max_position_embeddings": 64,
        "rope_scaling": LONGROPE,
    },
    "phi3-head8": {"partial_rotary_factor": 0.5},  # partial rotary through RotaryEmbedding (head size 8)
    "granite": {
        "embedding_multiplier": 2.0,
        "attention_multiplier": 0.2,
        "residual_multiplier": 0.5,
        "logits_scaling": 4.0,
    },
    "olmo2": {},
    "smollm3": {"num_attention_heads": 4, "no_rope_layer_interval": 2},  # layers 1 and 3 without rope
    "gemma2": {
        "head_dim": 16,
        "query_pre_attn_scalar": 12,
        "sliding_window": 5,
        "layer_types": ALTERNATING,
        "attn_logit_softcapping": 20.0,
        "final_logit_softcapping": 10.0,
    },
    "gemma3_text": {
        "head_dim": 16,
        "num_key_value_heads": 1,
        "query_pre_attn_scalar": 12,
        "sliding_window": 5,
        "layer_types": ALTERNATING,
        "rope_local_base_freq": 100.0,
    },
}


@pytest.fixture(scope="module")
def family_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-families")
    folders = {}
    for name, overrides in FAMILY_ARCHS.items():
        folders[name] = root / name
        make_tiny_model(folders[name], name.split("-")[0], seed=1, **IDS, **overrides)
    return folders


def mean_kl(reference: np.ndarray, got: np.ndarray) -> float:
    """Mean over positions of KL(reference || got) of the next-token distributions."""
    ref = torch.as_tensor(reference, dtype=torch.float64).log_softmax(-1)
    new = torch.as_tensor(got, dtype=torch.float64).log_softmax(-1)
    return float((ref.exp() * (ref - new)).sum(-1).mean())


def gqa_nodes(folder: Path) -> dict[int, onnx.NodeProto]:
    """layer -> its GroupQueryAttention node."""
    model = onnx.load(str(folder / runner_model(folder)), load_external_data=False)
    nodes = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    return {int(n.name.split("/")[2].split(".")[1]): n for n in nodes}


def attribute(node: onnx.NodeProto, name: str):
    return next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name)


@pytest.mark.parametrize("plan_kind", ["keep", "mixed"])
@pytest.mark.parametrize("name", list(FAMILY_ARCHS))
def test_family_export_matches_pytorch(family_models, tmp_path, name, plan_kind):
    """Every family, every action (keep-all; linearize + drop-attention + keep + drop-block): graph, cache,
    prefill and 16 cached decode steps against the pruned PyTorch model (max |dlogit| < 1e-3, mean KL <
    1e-3), and the family's attention settings on each GroupQueryAttention node."""
    folder = family_models[name]
    ckpt = open_checkpoint(folder)
    plan = plan_for(folder, 0) if plan_kind == "keep" else mixed_plan(ckpt, TINY_MIXED, {0: 0.5})
    out = export_onnx(folder, plan, tmp_path / "onnx")
    assert_graph_follows_plan(out, plan)
    runner = OnnxRunner(out)
    reference = apply_plan(load_model(folder), plan)
    prompt = np.random.default_rng(2).integers(3, 128, (1, 11))  # longer than the sliding windows
    assert_matches_torch(runner, reference, prompt)
    tokens, steps = onnx_decode_logits(runner, prompt, DECODE_STEPS)
    assert mean_kl(torch_logits(reference, tokens[None])[0, prompt.shape[1] - 1 :], steps) < TOL
    model = onnx.load(str(out / runner_model(out)), load_external_data=False)
    assert "ReduceMean" not in {n.op_type for n in model.graph.node}  # every RMSNorm is one fused node
    config = reference.config
    for layer, node in gqa_nodes(out).items():
        attention = reference.model.layers[layer].self_attn
        assert attribute(node, "scale") == pytest.approx(attention.scaling)
        window = get_architecture(name.split("-")[0]).sliding_window(attention, config)
        assert attribute(node, "local_window_size") == (window or -1)
        assert attribute(node, "softcap") == pytest.approx(getattr(config, "attn_logit_softcapping", 0) or 0)
        if name == "smollm3":
            assert attribute(node, "do_rotary") == int(bool(attention.use_rope)), layer
    if name == "gemma3_text" and plan_kind == "keep":  # local and global layers read their own tables
        tables = {layer: tuple(node.input[7:9]) for layer, node in gqa_nodes(out).items()}
        assert tables[0] == tables[2] != tables[1] == tables[3]


def test_gemma2_loads_with_attention_softcapping(family_models):
    """transformers' default sdpa attention skips Gemma-2's soft-capping; gatenorm loads it eager."""
    assert load_model(family_models["gemma2"]).config._attn_implementation == "eager"


@pytest.mark.parametrize("precision", [Precision.FP16, Precision.INT8, Precision.INT4])
def test_tiny_mixed_plan_quantized(tiny_models, tmp_path, precision):
    """Each quantizer also takes the linearized layer's fused MatMul (int4: MatMulNBits)."""
    plan = mixed_plan(open_checkpoint(tiny_models["llama"]), TINY_MIXED, {0: 0.5})
    out = export_onnx(tiny_models["llama"], plan, tmp_path / "onnx", precision, block_size=16)
    assert_graph_follows_plan(out, plan)
    fused = layer_ops(onnx.load(str(out / runner_model(out))), 0, "fused_attention")
    expected_op = {Precision.FP16: "MatMul", Precision.INT8: "MatMulInteger", Precision.INT4: "MatMulNBits"}
    assert fused[expected_op[precision]] == 1, fused
    prompt = np.arange(3, 15)[None]
    reference = torch_logits(apply_plan(load_model(tiny_models["llama"]), plan), prompt)
    got = OnnxRunner(out).logits(prompt)
    relative = np.linalg.norm(got - reference) / np.linalg.norm(reference)
    assert relative < {Precision.FP16: 0.01, Precision.INT8: 0.15, Precision.INT4: 0.5}[precision]


@pytest.mark.parametrize("precision", [Precision.FP16, Precision.INT8, Precision.INT4])
def test_tiny_quantized_exports_run_close_to_fp32(tiny_models, tmp_path, precision):
    plan = plan_for(tiny_models["llama"], 1)
    out = export_onnx(tiny_models["llama"], plan, tmp_path / "onnx", precision, mobile=True, block_size=16)
    assert_graph_follows_plan(out, plan)
    ops = Counter(n.op_type for n in onnx.load(str(out / runner_model(out))).graph.node)
    expected_op = {Precision.FP16: "Cast", Precision.INT8: "MatMulInteger", Precision.INT4: "MatMulNBits"}
    assert ops[expected_op[precision]] > 0
    if precision is Precision.INT4:
        assert ops["GatherBlockQuantized"] == 1  # the embedding table is int4 too
    runner = OnnxRunner(out)
    reference = torch_logits(apply_plan(load_model(tiny_models["llama"]), plan), np.arange(3, 15)[None])
    got = runner.logits(np.arange(3, 15)[None])
    assert got.dtype == np.float32 and np.isfinite(got).all()
    relative = np.linalg.norm(got - reference) / np.linalg.norm(reference)
    assert relative < {Precision.FP16: 0.01, Precision.INT8: 0.15, Precision.INT4: 0.5}[precision]
    ort_runner = OnnxRunner(out, ort_format=True)
    np.testing.assert_allclose(ort_runner.logits(np.arange(3, 15)[None]), got, atol=1e-4, rtol=0)
    assert ort_runner.generate([3, 4, 5], 6, stop_at_eos=False) == runner.generate([3, 4, 5], 6, False)


@pytest.mark.parametrize("precision", [Precision.FP32, Precision.INT4])
def test_external_data_past_the_threshold(tiny_models, tmp_path, monkeypatch, precision):
    """Models past 2 GB keep their weights in onnx/model.onnx_data (threshold lowered to test it)."""
    import exporters.onnx.precision as precision_module

    monkeypatch.setattr(precision_module, "EXTERNAL_DATA_THRESHOLD", 0)
    plan = plan_for(tiny_models["qwen2"], 1)
    out = export_onnx(tiny_models["qwen2"], plan, tmp_path / "onnx", precision, mobile=True, block_size=16)
    model_file = out / runner_model(out)
    assert model_file.with_name(model_file.name + "_data").stat().st_size > model_file.stat().st_size
    runner = OnnxRunner(out)
    prompt = np.arange(7, 20)[None]
    reference = apply_plan(load_model(tiny_models["qwen2"]), plan)
    if precision is Precision.FP32:
        assert_matches_torch(runner, reference, prompt)
    else:  # the builder quantizes the embedding table past 2 GB too
        ops = Counter(n.op_type for n in onnx.load(str(out / runner_model(out))).graph.node)
        assert ops["MatMulNBits"] > 0 and ops["GatherBlockQuantized"] == 1
    ort_logits = OnnxRunner(out, ort_format=True).logits(prompt)
    np.testing.assert_allclose(ort_logits, runner.logits(prompt), atol=1e-4, rtol=0)


# ---------------------------------------------------------------- failures leave nothing behind


def assert_nothing_left(parent: Path) -> None:
    assert sorted(p.name for p in parent.iterdir()) == []


def test_plan_for_other_model_fails_cleanly(tiny_models, tmp_path):
    plan = plan_for(tiny_models["llama"], 1)
    out_parent = tmp_path / "exports"
    out_parent.mkdir()
    with pytest.raises(GatenormError, match="plan is for llama"):
        export_onnx(tiny_models["qwen2"], plan, out_parent / "onnx")
    assert_nothing_left(out_parent)


def test_failure_mid_export_leaves_nothing(tiny_models, tmp_path, monkeypatch):
    import exporters.onnx.export as export_module

    def broken(*args, **kwargs):
        raise GatenormError("quantizer exploded")

    monkeypatch.setattr(export_module, "build_onnx", broken)
    out_parent = tmp_path / "exports"
    out_parent.mkdir()
    with pytest.raises(GatenormError, match="quantizer exploded"):
        export_onnx(tiny_models["llama"], plan_for(tiny_models["llama"], 1), out_parent / "onnx")
    assert_nothing_left(out_parent)


def test_existing_output_needs_overwrite(tiny_models, tmp_path):
    plan = plan_for(tiny_models["llama"], 1)
    out = tmp_path / "onnx"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(GatenormError, match="already exists"):
        export_onnx(tiny_models["llama"], plan, out)
    assert (out / "keep.txt").read_text() == "mine"
    export_onnx(tiny_models["llama"], plan, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "onnx/model.onnx").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]


def test_unsupported_architecture_is_a_clear_error(tiny_models, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(folder)
    with pytest.raises(GatenormError, match="unsupported architecture 'gpt2'"):
        export_onnx(folder, plan_for(tiny_models["llama"], 1), tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()


def test_runner_rejects_a_folder_that_is_no_export(tmp_path):
    with pytest.raises(GatenormError, match="not a gatenorm ONNX export"):
        OnnxRunner(tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{}")
    with pytest.raises(GatenormError, match="invalid"):
        OnnxRunner(tmp_path)


def test_head_size_not_a_multiple_of_8_is_refused(tmp_path):
    """onnxruntime's GroupQueryAttention fails at run time on such heads: the export refuses up front."""
    model = tmp_path / "hd4"
    make_tiny_model(model, hidden_size=32, num_attention_heads=8, num_key_value_heads=2)  # head size 4
    with pytest.raises(GatenormError, match="head size 4 is not a multiple of 8"):
        export_onnx(model, plan_for(model, 1), tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_bad_block_size(tiny_models, tmp_path):
    with pytest.raises(GatenormError, match="block-size 24"):
        export_onnx(
            tiny_models["llama"], plan_for(tiny_models["llama"], 1), tmp_path / "o", "int4", block_size=24
        )
    assert not (tmp_path / "o").exists()


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    from gatenorm.cli import main

    monkeypatch.setattr(sys, "argv", ["gatenorm", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_cli_export(tiny_models, tmp_path, monkeypatch, capsys):
    model = str(tiny_models["qwen3"])
    out = tmp_path / "cli-onnx"
    argv = ["export", model, "--to", "onnx", "--quant", "keep", "--drop", "2", "-o", str(out)]
    code, stdout, _ = run_cli(monkeypatch, capsys, *argv)
    stdout = " ".join(stdout.split())  # rich wraps long lines at the terminal width
    assert (
        code == 0
        and "dropped attention of layers" in stdout
        and str(plan_for(tiny_models["qwen3"], 2).dropped) in stdout
    )
    assert OnnxRunner(out).plan.dropped == plan_for(tiny_models["qwen3"], 2).dropped

    plan_path = tmp_path / "plan.json"
    plan_for(tiny_models["qwen3"], 1).save(plan_path)
    code, _, _ = run_cli(
        monkeypatch,
        capsys,
        "export",
        model,
        "--to",
        "onnx",
        "--plan",
        str(plan_path),
        "-o",
        str(tmp_path / "b"),
    )
    assert code == 0 and OnnxRunner(tmp_path / "b").plan == Plan.load(plan_path)

    for args, message in [
        (["--to", "onnx", "--quant", "int3", "--drop", "1"], "--quant 'int3'"),
        (["--to", "onnx", "--drop", "1", "--plan", str(plan_path)], "exactly one of --plan"),
        (["--to", "gguf", "--drop", "1", "--mobile"], "--mobile applies to --to onnx only"),
        (["--to", "onnx", "--drop", "1", "-o", str(out)], "already exists"),
    ]:
        argv = ["export", model, "-o", str(tmp_path / "c"), *args]
        code, _, stderr = run_cli(monkeypatch, capsys, *argv)
        assert code == 2 and message in stderr and stderr.count("\n") == 1, stderr
        assert not (tmp_path / "c").exists()


# ---------------------------------------------------------------- SmolLM2 end to end


@pytest.fixture(scope="module")
def smollm2_pruned(smollm2_gguf, tmp_path_factory):
    """SmolLM2 (GGUF source) pruned by the mixed plan (3 attention drops, 2 linearized layers with alpha
    != 1, 2 dropped blocks, the last among them), fp32, with the ORT Mobile package."""
    plan = mixed_plan(open_checkpoint(smollm2_gguf), SMOLLM2_MIXED_ACTIONS, SMOLLM2_MIXED_ALPHAS)
    out = export_onnx(smollm2_gguf, plan, tmp_path_factory.mktemp("smollm2-onnx") / "pruned", mobile=True)
    yield plan, out
    shutil.rmtree(out)


def test_smollm2_pruned_fp32_matches_pytorch(smollm2_pruned, smollm2_gguf):
    plan, out = smollm2_pruned
    assert (plan.dropped, plan.linearized, plan.blocks_dropped) == ([5, 7, 8], [17, 25], [26, 29])
    assert_graph_follows_plan(out, plan)
    runner = OnnxRunner(out)
    assert runner.plan == plan
    prompt = np.asarray([runner.tokenizer.encode("The quick brown fox jumps over the lazy dog because")])
    reference = apply_plan(load_model(smollm2_gguf), plan)
    assert_matches_torch(runner, reference, prompt)
    # the file holds each remaining weight once (tied LM head shares the embedding table), nothing else
    weights = 4 * sum(p.numel() for p in reference.parameters())  # parameters() lists a tied one once
    assert abs((out / "onnx/model.onnx").stat().st_size - weights) < 0.01 * weights
    assert (
        (out / "tokenizer.json").is_file()
        and not list(out.glob("*.gguf"))
        and not (out / "tokenizer.model").exists()
    )


def test_smollm2_ort_format_matches_onnx(smollm2_pruned):
    _, out = smollm2_pruned
    assert (out / "model.ort").stat().st_size > 100_000_000
    ops = (out / "required_operators.config").read_text()
    assert "ai.onnx;" in ops and "MatMul" in ops
    prompt = np.arange(100, 140)[None]
    onnx_runner, ort_runner = OnnxRunner(out), OnnxRunner(out, ort_format=True)
    np.testing.assert_allclose(ort_runner.logits(prompt), onnx_runner.logits(prompt), atol=1e-4, rtol=0)
    assert ort_runner.plan == onnx_runner.plan
    assert ort_runner.generate(prompt[0], 8) == onnx_runner.generate(prompt[0], 8)


def test_smollm2_int4_generates_coherent_text(smollm2_gguf, tmp_path):
    plan = plan_for(smollm2_gguf, 0)
    out = export_onnx(smollm2_gguf, plan, tmp_path / "int4", "int4")
    size = sum(p.stat().st_size for p in out.glob("onnx/model_q4.onnx*"))
    assert size < 120_000_000  # fp32: 540 MB; int4 MatMuls and embedding table
    runner = OnnxRunner(out)
    tok = runner.tokenizer
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)  # ids
    answer = tok.decode(runner.generate(prompt, 24))
    assert "Paris" in answer, answer
    shutil.rmtree(out)


@pytest.mark.slow
def test_smollm2_hf_folder_unpruned_fp32_matches_pytorch(smollm2_hf, tmp_path):
    """The 0-drop gate on the real model, from an HF safetensors folder (tokenizer files included)."""
    plan = plan_for(smollm2_hf, 0)
    out = export_onnx(smollm2_hf, plan, tmp_path / "onnx")
    assert_graph_follows_plan(out, plan)
    runner = OnnxRunner(out)
    prompt = np.asarray([runner.tokenizer.encode("Once upon a time, in a small village by the sea,")])
    assert_matches_torch(runner, load_model(smollm2_hf), prompt)
    shutil.rmtree(out)


def test_plan_of_another_checkpoint_is_refused_before_commit(tiny_models, tmp_path):
    """Through the common entry point, a plan whose content hash is not this model's leaves nothing."""
    from exporters.export import export

    twin = tmp_path / "twin"
    make_tiny_model(twin, "llama", seed=7)  # same shapes, other weights
    out_parent = tmp_path / "exports"
    out_parent.mkdir()
    with pytest.raises(GatenormError):
        export(twin, plan_for(tiny_models["llama"], 1), out_parent / "onnx", "onnx", "int8")
    assert_nothing_left(out_parent)
    out = export(twin, plan_for(twin, 1), out_parent / "onnx", "onnx", "int8", mobile=True)
    assert (out / "model.ort").is_file() and OnnxRunner(out).config.precision == "int8"


def test_folder_of_the_older_layout_still_runs(tiny_models, tmp_path):
    """Folders written before the client layout (model.onnx at the top, cache named by original layer) load
    in OnnxRunner and the validator: both follow gatenorm_onnx.json's file and cache names."""
    from gatenorm.validate.runtimes import detect_runtime

    plan = plan_for(tiny_models["llama"], 1)
    out = export_onnx(tiny_models["llama"], plan, tmp_path / "onnx")
    expected = OnnxRunner(out).logits(np.arange(3, 12)[None])
    model = onnx.load(str(out / "onnx/model.onnx"))
    config = json.loads((out / CONFIG_NAME).read_text())
    renames = {}
    for slot, entry in enumerate(config["kv_cache"]):  # the old names: past_key_values.{layer}.*
        for field in ("past_key", "past_value", "present_key", "present_value"):
            old = entry[field].replace(f".{slot}.", f".{entry['layer']}.")
            renames[entry[field]], entry[field] = old, old
    for value in (*model.graph.input, *model.graph.output):
        value.name = renames.get(value.name, value.name)
    for node in model.graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
    shutil.rmtree(out / "onnx")
    for name in ("config.json", "generation_config.json", "genai_config.json"):
        (out / name).unlink()
    onnx.save(model, str(out / "model.onnx"))
    config["model"] = "model.onnx"
    (out / CONFIG_NAME).write_text(json.dumps(config))
    assert detect_runtime(out) == "onnx"
    old_inputs = {f"past_key_values.{layer}.{part}" for layer in plan.kv_layers for part in ("key", "value")}
    assert old_inputs < {i.name for i in OnnxRunner(out).session.get_inputs()}
    np.testing.assert_allclose(OnnxRunner(out).logits(np.arange(3, 12)[None]), expected, atol=1e-6, rtol=0)
