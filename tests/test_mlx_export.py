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


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_tiny_family_every_action_matches_pytorch(tmp_path, tokenizer_dir, model_type):
    folder = tiny_hf(
        tmp_path / model_type, tokenizer_dir, model_type, num_hidden_layers=6, **IDS, **FAMILIES[model_type]
    )
    plan = mixed_plan(open_checkpoint(folder), TINY_ACTIONS, TINY_ALPHAS)
    out = export(folder, plan, tmp_path / "mlx", "mlx", quant="fp32")
    model, _ = mlx_lm.load(str(out))
    ids = list(range(300, 364))
    reference = torch_logits(apply_plan(load_model(folder), plan), ids)
    assert np.abs(mlx_logits(model, ids) - reference).max() < 1e-3
    cached, cache = cached_logits(model, ids, 48, 16)
    assert np.abs(cached - reference).max() < 1e-3
    assert [kv_bytes(c) > 0 for c in cache] == kept_per_cache(plan, cache)  # linear attention: empty


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

    def refused(model_type: str, action: LayerAction, *words: str, **overrides) -> None:
        folder = tiny_hf(tmp_path / model_type, tokenizer_dir, model_type, **IDS, **overrides)
        plan_path = tmp_path / f"{model_type}.json"
        alphas = {1: 1.0} if action is A.LINEARIZE else {}
        mixed_plan(open_checkpoint(folder), {1: action}, alphas).save(plan_path)
        capsys.readouterr()  # the set-up's output (transformers 5's save_pretrained shows a progress bar)
        args = ["export", folder, "--plan", plan_path, "--to", "mlx", "-o", tmp_path / "out"]
        assert_one_line_exit_2(*cli(monkeypatch, capsys, *args)[::2], *words)
        assert not (tmp_path / "out").exists()

    refused("qwen3", A.DROP_ATTENTION, "qwen3", "drop-attention", "norms q and k", head_dim=16)
    refused("mistral", A.LINEARIZE, "mistral", "linearize", "sliding window", sliding_window=6)
    monkeypatch.setitem(sys.modules, "mlx_lm", None)  # the extra missing
    refused("llama", A.DROP_ATTENTION, "gatenorm[mlx]")
