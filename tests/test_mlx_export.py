"""MLX export (``--to mlx``): mlx-lm runs the folder as it is and computes the pruned PyTorch model."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf_helpers import wiki_text

from exporters.export import export
from gatenorm.apply import apply_plan, load_model
from gatenorm.plan import LayerAction
from gatenorm.readers import open_checkpoint
from gatenorm.validate.runtimes.mlx import kv_bytes
from tests.conftest import SMOLLM2_MIXED_ACTIONS, SMOLLM2_MIXED_ALPHAS, mixed_plan, tiny_hf
from tests.test_bad_inputs import assert_one_line_exit_2, cli
from tests.test_families import FAMILIES as FAMILY_OVERRIDES
from tests.test_families import IDS

mx = pytest.importorskip("mlx.core")
mlx_lm = pytest.importorskip("mlx_lm")

A = LayerAction
#: the tiny families written as nemotron-nas (model_type -> config overrides, test_families' own; Mistral
#: without its 6-token sliding window, which nemotron-nas cannot express and the exporter refuses)
FAMILIES = {name: FAMILY_OVERRIDES[name] for name in ("llama", "qwen2", "phi3", "granite")} | {"mistral": {}}
#: every action, layer 0's attention dropped (mlx-lm's mask comes from layer 0's cache)
TINY_ACTIONS = {0: A.DROP_ATTENTION, 1: A.LINEARIZE, 3: A.DROP_BLOCK, 4: A.LINEARIZE}
TINY_ALPHAS = {1: 0.7, 4: 1.3}


def mlx_logits(model, ids: list[int], cache=None) -> np.ndarray:
    out = model(mx.array([ids]), cache=cache).astype(mx.float32)
    return np.array(out)[0]


def torch_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def cached_logits(model, ids: list[int], prefill: int, n_decode: int) -> tuple[np.ndarray, list]:
    """Logits of `ids` run as two prefill chunks, then `n_decode` one-token steps, with mlx-lm's cache."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    half = prefill // 2
    parts = [mlx_logits(model, ids[:half], cache), mlx_logits(model, ids[half:prefill], cache)]
    parts += [mlx_logits(model, [t], cache) for t in ids[prefill : prefill + n_decode]]
    return np.concatenate(parts), cache


def mean_kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    p = torch.log_softmax(torch.from_numpy(p_logits).double(), -1)
    q = torch.log_softmax(torch.from_numpy(q_logits).double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def matches_pytorch(out, folder, plan, n_ids: int, prefill: int) -> list:
    """mlx-lm's logits of the folder `out` equal the pruned PyTorch model's (fp32, max |dlogit| < 1e-3), in
    one pass and as two prefill chunks plus 16 cached decode steps; returns mlx-lm's cache."""
    model, _ = mlx_lm.load(str(out))
    ids = list(range(300, 300 + n_ids))
    reference = torch_logits(apply_plan(load_model(folder), plan), ids)
    assert np.abs(mlx_logits(model, ids) - reference).max() < 1e-3
    cached, cache = cached_logits(model, ids, prefill, 16)
    assert np.abs(cached - reference).max() < 1e-3
    return cache


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_tiny_family_every_action_matches_pytorch(tmp_path, tokenizer_dir, model_type):
    folder = tiny_hf(
        tmp_path / model_type, tokenizer_dir, model_type, num_hidden_layers=6, **IDS, **FAMILIES[model_type]
    )
    plan = mixed_plan(open_checkpoint(folder), TINY_ACTIONS, TINY_ALPHAS)
    out = export(folder, plan, tmp_path / "mlx", "mlx", quant="fp32")
    cache = matches_pytorch(out, folder, plan, 64, 48)
    assert [kv_bytes(c) > 0 for c in cache] == kept_per_cache(plan, cache)  # linear attention: empty


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_tiny_family_healed_plan_matches_pytorch(tmp_path, tokenizer_dir, model_type):
    """Healed maps (drop-attention, linearize: a linear attention; drop-block: a linear attention and no
    FFN), with biases, and refitted down projections, as the healed PyTorch model computes them."""
    from tests.test_heal_export import _healed, _random_refits, _random_repairs

    folder = tiny_hf(
        tmp_path / "tiny", tokenizer_dir, model_type, num_hidden_layers=6, **IDS, **FAMILIES[model_type]
    )
    ckpt = open_checkpoint(folder)
    actions = {0: "drop-attention", 2: "linearize", 3: "drop-block", 4: "drop-block"}
    repairs = _random_repairs(ckpt.shape.d_model, (0, 2, 3), bias=True, seed=2)
    plan = _healed(tmp_path, ckpt, actions, repairs, refits=_random_refits(folder, (1, 2), seed=2))
    out = export(folder, plan, tmp_path / "mlx", "mlx", quant="fp32")
    blocks = json.loads((out / "config.json").read_text())["block_configs"]
    linear, kept = {"replace_with_linear": True}, {"n_heads_in_group": 4}
    assert [b["attention"] for b in blocks] == [linear, kept, linear, linear, {"no_op": True}, kept]
    assert [b["ffn"].get("no_op", False) for b in blocks] == [False, False, False, True, True, False]
    ids = list(range(300, 364))
    reference = torch_logits(apply_plan(load_model(folder), plan), ids)
    assert np.abs(mlx_logits(mlx_lm.load(str(out))[0], ids) - reference).max() < 1e-3


def test_validate_mlx_runtime_against_pytorch(tmp_path, tokenizer_dir):
    """`gatenorm validate` runs an MLX folder in the mlx runtime (detected), against the same plan applied
    in PyTorch: KLD ~0, top-1 1; its bench reports the KV cache of the kept layers only."""
    from gatenorm.validate.bench import BenchConfig
    from gatenorm.validate.gates import Gates
    from gatenorm.validate.run import Settings, validate
    from gatenorm.validate.runtimes import model_spec

    folder = tiny_hf(tmp_path / "llama", tokenizer_dir, "llama", num_hidden_layers=6, **IDS)
    plan = mixed_plan(open_checkpoint(folder), TINY_ACTIONS, TINY_ALPHAS)
    plan.save(tmp_path / "plan.json")
    out = export(folder, plan, tmp_path / "mlx", "mlx", quant="fp32")
    candidate = model_spec(str(out))
    assert candidate.runtime == "mlx"
    bench = BenchConfig(prompts=[32], depths=[64], generate=4, runs=1, warmup=0)
    settings = Settings(ctx=64, max_tokens=128, tasks=[], threads=1, bench=bench)
    report = validate(model_spec(str(folder), plan=tmp_path / "plan.json"), candidate, settings, Gates())
    assert report.agreement.kld_mean < 1e-6 and report.agreement.top1 == 1
    kv = {k: v for k, v in report.bench.candidate.items() if k.startswith("kv")}
    assert kv, report.bench
    # 2 of 6 layers keep attention: 2 layers x (K + V) x 2 KV heads x head size 8 x fp32 per token
    tokens = 64 + 4
    assert all(v * 2**20 == pytest.approx(2 * 2 * 2 * 8 * 4 * tokens, rel=0.05) for v in kv.values()), kv


#: the tiny families written as their own mlx-lm model with whole blocks removed (model_type -> blocks
#: dropped: gemma3's kept layers keep a sliding_window_pattern, smollm3's no-rope layer moves from 3 to 2)
OWN_ARCH = {"qwen3": (1,), "olmo2": (1,), "smollm3": (1,), "gemma3_text": (0, 1)}


@pytest.mark.parametrize("model_type", sorted(OWN_ARCH))
def test_own_architecture_without_blocks_matches_pytorch(tmp_path, tokenizer_dir, model_type):
    """Whole blocks removed, and the last layer's down projection refitted (a healing fold)."""
    from tests.test_heal_export import _healed, _random_refits

    folder = tiny_hf(tmp_path / model_type, tokenizer_dir, model_type, **IDS, **FAMILY_OVERRIDES[model_type])
    actions = dict.fromkeys(OWN_ARCH[model_type], A.DROP_BLOCK.value)
    refits = _random_refits(folder, (3,), seed=2)
    plan = _healed(tmp_path, open_checkpoint(folder), actions, {}, refits=refits)
    out = export(folder, plan, tmp_path / "mlx", "mlx", quant="fp32")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == model_type and config["num_hidden_layers"] == 4 - len(OWN_ARCH[model_type])
    cache = matches_pytorch(out, folder, plan, 40, 24)
    assert len(cache) == config["num_hidden_layers"]


def kept_per_cache(plan, cache: list) -> list[bool]:
    """Per mlx-lm cache, whether its layer keeps keys and values: mlx-lm >= 0.30.4 makes one cache per layer
    with attention (kept or linear), 0.29 one per layer."""
    with_attention = [lp for lp in plan.layers if lp.action in (A.KEEP, A.LINEARIZE)]
    layers = with_attention if len(cache) == len(with_attention) else plan.layers
    assert len(cache) == len(layers)
    return [lp.action is A.KEEP for lp in layers]


def client_python() -> str:
    """This interpreter, whose mlx-lm (gatenorm[mlx]: 0.32) runs ``mlx_lm generate`` on a folder with no-op
    attention; an older one (< 0.30.4: no nemotron-nas ``make_cache``, its cache for such a layer stays None)
    is a skip, and a failure under CI."""
    from mlx_lm.utils import _get_classes

    if hasattr(_get_classes({"model_type": "nemotron-nas"})[0], "make_cache"):
        return sys.executable
    why = (
        f"mlx-lm {mlx_lm.__version__} cannot generate with a no-op attention layer (its cache for it "
        "stays None); gatenorm[mlx] installs 0.32"
    )
    if os.environ.get("CI"):  # .ci/run installs gatenorm[mlx]: the test runs there, never skips
        pytest.fail(why)
    pytest.skip(why)


@pytest.fixture(scope="module")
def smollm2_mlx(tmp_path_factory, smollm2_scored, smollm2_model):
    """SmolLM2 pruned by the mixed plan: the PyTorch model, and its fp32 MLX export."""
    ckpt, scores = smollm2_scored
    plan = mixed_plan(ckpt, SMOLLM2_MIXED_ACTIONS, SMOLLM2_MIXED_ALPHAS, scores)
    out = tmp_path_factory.mktemp("smollm2-mlx") / "fp32"
    export(ckpt, plan, out, "mlx", quant="fp32", check_source=False)
    return plan, apply_plan(copy.deepcopy(smollm2_model), plan), out


def test_smollm2_mixed_fp32_logits_and_cache(smollm2_mlx):
    plan, pruned, out = smollm2_mlx
    assert {p.name for p in out.iterdir()} >= {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "plan.json",
    }
    model, tokenizer = mlx_lm.load(str(out))
    ids = tokenizer.encode(wiki_text(1))[:96]
    cached, cache = cached_logits(model, ids, 80, 16)
    assert np.abs(cached - torch_logits(pruned, ids)).max() < 1e-3
    kept = kept_per_cache(plan, cache)
    assert [kv_bytes(c) > 0 for c in cache] == kept and sum(kept) == 23  # of 30 layers


def test_smollm2_cli_generation_matches_pytorch(smollm2_mlx):
    """Greedy generation through the CLI, as a user runs it, gives PyTorch's first 16 tokens; mlx-lm's
    make_cache has one cache per layer with attention (kept or linear, the linear ones stay empty)."""
    python = client_python()
    plan, pruned, out = smollm2_mlx
    prompt = "The capital of France is"
    tokenizer = mlx_lm.load(str(out))[1]
    prompt_ids = tokenizer.encode(prompt)
    with torch.no_grad():
        generated = pruned.generate(
            torch.tensor([prompt_ids]), max_new_tokens=16, do_sample=False, eos_token_id=None
        )[0, len(prompt_ids) :]
    expected = tokenizer.decode(generated.tolist())
    command = ["generate", "--model", str(out), "--prompt", prompt, "--max-tokens", "16", "--temp", "0"]
    run = subprocess.run(
        [python, "-m", "mlx_lm", *command, "--ignore-chat-template"], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-2000:]
    # mlx-lm's streaming detokenizer drops the first token's leading space
    assert run.stdout.split("=" * 10)[1].strip() == expected.strip()
    count = "import sys, mlx_lm; print(len(mlx_lm.load(sys.argv[1])[0].make_cache()))"
    run = subprocess.run([python, "-c", count, str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    with_attention = [lp.action in (A.KEEP, A.LINEARIZE) for lp in plan.layers]
    assert int(run.stdout.strip()) == sum(with_attention) == 25


@pytest.mark.slow  # five SmolLM2 exports and mlx's CPU 4-bit kernels: study-sized
def test_smollm2_bf16_and_4bit(tmp_path, smollm2_scored, smollm2_mlx):
    """bf16: mean KL < 1e-3 against the pruned PyTorch model; 4-bit (mlx's quantizer) costs the pruned
    model no more than 1.1x what it costs the unpruned one, both against the unpruned bf16 export."""
    ckpt, scores = smollm2_scored
    plan, pruned, _ = smollm2_mlx
    keep = mixed_plan(ckpt, {}, {}, scores)
    folders = {}
    for name, p, quant in [
        ("bf16", plan, "bf16"),
        ("4bit", plan, "4bit"),
        ("base", keep, "bf16"),
        ("base4", keep, "4bit"),
    ]:
        folders[name] = export(ckpt, p, tmp_path / name, "mlx", quant=quant, check_source=False)
    tokenizer = mlx_lm.load(str(folders["bf16"]))[1]
    ids = tokenizer.encode(wiki_text(2))[:128]
    logits = {name: mlx_logits(mlx_lm.load(str(f))[0], ids) for name, f in folders.items()}
    assert mean_kl(torch_logits(pruned, ids), logits["bf16"]) < 1e-3
    pruning = mean_kl(logits["base"], logits["bf16"])
    quantization = mean_kl(logits["base"], logits["base4"])
    both = mean_kl(logits["base"], logits["4bit"])
    assert quantization > 0 and both - pruning <= 1.1 * quantization, (pruning, quantization, both)
    config = json.loads((folders["4bit"] / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": 4, "mode": "affine"}


def test_refusals_are_one_line(tmp_path, tokenizer_dir, monkeypatch, capsys):
    """A family or config nemotron-nas cannot express, and a missing extra: one line, exit 2, no output."""

    def refused(model_type: str, action: LayerAction, *words: str, layer: int = 1, **overrides) -> None:
        folder = tiny_hf(tmp_path / model_type, tokenizer_dir, model_type, **IDS, **overrides)
        plan_path = tmp_path / f"{model_type}.json"
        alphas = {layer: 1.0} if action is A.LINEARIZE else {}
        mixed_plan(open_checkpoint(folder), {layer: action}, alphas).save(plan_path)
        args = ["export", folder, "--plan", plan_path, "--to", "mlx", "-o", tmp_path / "out"]
        assert_one_line_exit_2(*cli(monkeypatch, capsys, *args)[::2], *words)
        assert not (tmp_path / "out").exists()

    refused("qwen3", A.DROP_ATTENTION, "qwen3", "drop-attention", "q and k", "whole blocks", head_dim=16)
    gemma3 = FAMILY_OVERRIDES["gemma3_text"]  # layers S F S F; without layer 2, S F F has no pattern
    refused("gemma3_text", A.DROP_BLOCK, "gemma3", "drop-block", "sliding_window_pattern", layer=2, **gemma3)
    refused("gemma2", A.DROP_BLOCK, "gemma2", "no sliding window", **FAMILY_OVERRIDES["gemma2"])
    refused("mistral", A.LINEARIZE, "mistral", "linearize", "sliding window", sliding_window=6)
    monkeypatch.setitem(sys.modules, "mlx_lm", None)  # the extra missing
    refused("llama", A.DROP_ATTENTION, "gatenorm[mlx]")
