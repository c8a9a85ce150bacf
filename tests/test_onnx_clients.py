"""gatenorm ONNX folders in the clients mobile and web apps ship, opened as exported: onnxruntime-genai,
optimum's ORTModelForCausalLM and transformers.js (node). Greedy tokens must equal OnnxRunner's over
32 tokens on SmolLM2 int4, unpruned and pruned by the mixed plan (dropped attention, linearized layers,
dropped blocks); the tokenizers agree with transformers' on the shipped Wikipedia text."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import SMOLLM2_MIXED_ACTIONS, SMOLLM2_MIXED_ALPHAS, mixed_plan

from exporters.onnx import OnnxRunner, export_onnx
from gatenorm.plan import make_plan

NEW_TOKENS = 32
PROMPT = "The history of the city of Paris begins"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
REPO = Path(__file__).resolve().parents[1]
#: where `npm install --prefix .node @huggingface/transformers` puts transformers.js (.ci/run does)
NODE_DIR = Path(os.environ.get("GATENORM_NODE_DIR", REPO / ".node"))
#: a Python with optimum-onnx (which needs transformers 4.x): .ci/run makes .venv-optimum for it
OPTIMUM_ENV = "GATENORM_OPTIMUM_PYTHON"


@pytest.fixture(scope="module", params=["drop0", "mixed"])
def smollm2_int4(request, smollm2_scored, tmp_path_factory):
    ckpt, scores = smollm2_scored
    if request.param == "drop0":
        plan = make_plan(ckpt, scores, 0)
    else:
        plan = mixed_plan(ckpt, SMOLLM2_MIXED_ACTIONS, SMOLLM2_MIXED_ALPHAS, scores)
    out = export_onnx(ckpt.path, plan, tmp_path_factory.mktemp("clients") / request.param, "int4")
    runner = OnnxRunner(out)
    prompt = runner.tokenizer.encode(PROMPT)
    yield out, plan, prompt, runner.generate(prompt, NEW_TOKENS, stop_at_eos=False)
    shutil.rmtree(out)


def test_folder_is_what_the_clients_read(smollm2_int4):
    out, plan, _, _ = smollm2_int4
    config = json.loads((out / "config.json").read_text())
    genai = json.loads((out / "genai_config.json").read_text())
    kept = plan.kv_layers
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == len(kept)
    assert config["gatenorm"]["kv_layers"] == kept
    assert genai["model"]["decoder"]["num_hidden_layers"] == len(kept)
    assert genai["model"]["decoder"]["filename"] == "onnx/model_q4.onnx"
    assert (out / "onnx/model_q4.onnx").is_file() and (out / "generation_config.json").is_file()
    # the source GGUF's special tokens: EOS <|im_end|> (2), BOS not added
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["eos_token"] == "<|im_end|>" and not tok_config.get("add_bos_token")
    assert config["eos_token_id"] == genai["model"]["eos_token_id"] == 2
    assert "<|im_start|>" in tok_config["chat_template"] and not (out / "chat_template.jinja").exists()
    spec = json.loads((out / "tokenizer.json").read_text())
    assert spec["decoder"]["type"] == "ByteLevel"
    post = spec["post_processor"]  # adds no BOS: ByteLevel, or the template transformers 5 writes for it
    assert post["type"] == "ByteLevel" or (
        post["type"] == "TemplateProcessing"
        and post["single"] == [{"Sequence": {"id": "A", "type_id": 0}}]
        and not post["special_tokens"]
    ), post


def test_onnxruntime_genai_greedy_matches_runner(smollm2_int4):
    og = pytest.importorskip("onnxruntime_genai")
    out, _, prompt, expected = smollm2_int4
    model = og.Model(str(out))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + NEW_TOKENS, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    got = []
    while not generator.is_done():
        generator.generate_next_token()
        got.append(int(generator.get_next_tokens()[0]))
    assert got == expected
    tokenizer = og.Tokenizer(model)
    assert list(tokenizer.encode(PROMPT)) == prompt
    assert tokenizer.decode(got) == OnnxRunner(out).tokenizer.decode(got)


def optimum_python() -> str:
    """$GATENORM_OPTIMUM_PYTHON, else this Python if it has optimum-onnx; skip without one (fail under CI)."""
    if python := os.environ.get(OPTIMUM_ENV):
        return python
    import importlib.util

    if importlib.util.find_spec("optimum") and importlib.util.find_spec("optimum.onnxruntime"):
        return sys.executable
    why = f"optimum-onnx is not installed here and {OPTIMUM_ENV} is not set (see .ci/run: .venv-optimum)"
    if os.environ.get("CI"):  # .ci/run makes that client: the tests run there, never skip
        pytest.fail(why)
    pytest.skip(why)


def run_optimum(folder: Path, file_name: str, prompt: list[int]) -> subprocess.CompletedProcess:
    """optimum's ORTModelForCausalLM greedy over NEW_TOKENS tokens, in optimum's own Python."""
    script = REPO / "tests/clients/optimum_generate.py"
    cmd = [optimum_python(), str(script), str(folder), file_name, str(NEW_TOKENS), json.dumps(prompt)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def optimum_greedy(folder: Path, file_name: str, prompt: list[int]) -> list[int]:
    done = run_optimum(folder, file_name, prompt)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_optimum_greedy_matches_runner(smollm2_int4):
    out, _, prompt, expected = smollm2_int4
    assert optimum_greedy(out, "model_q4.onnx", prompt) == expected


def run_transformers_js(folder: Path, dtype: str, text: str) -> dict:
    if shutil.which("node") is None:
        pytest.skip("node is not installed (transformers.js runs in node)")
    if not (NODE_DIR / "node_modules/@huggingface/transformers").is_dir():
        pytest.skip(f"transformers.js is not installed in {NODE_DIR} (see .ci/run: npm install --prefix)")
    script = REPO / "tests/js/generate.mjs"
    cmd = ["node", str(script), str(NODE_DIR), str(folder), dtype, str(NEW_TOKENS), text]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_transformers_js_greedy_matches_runner(smollm2_int4):
    out, _, prompt, expected = smollm2_int4
    result = run_transformers_js(out, "q4", PROMPT)
    assert result["prompt"] == prompt
    assert result["new"] == expected


def test_tokenizers_agree_on_wikipedia(smollm2_int4):
    """onnxruntime-genai's tokenizer (its own implementation) gives transformers' ids on the shipped
    Wikipedia text and decodes them back to the same text."""
    og = pytest.importorskip("onnxruntime_genai")
    from gatenorm.validate.text import wiki_articles

    out, plan, _, _ = smollm2_int4
    if plan.dropped:  # the tokenizer files are the same for every plan
        pytest.skip("checked on the unpruned folder")
    tokenizer = og.Tokenizer(og.Model(str(out)))
    reference = OnnxRunner(out).tokenizer
    articles = [text for _, text in wiki_articles("wiki", max_chars=60_000)]
    assert len(articles) > 10
    for text in articles:
        ids = reference.encode(text)
        assert list(tokenizer.encode(text)) == ids
        assert tokenizer.decode(np.asarray(ids, dtype=np.int32)) == reference.decode(ids) == text


# ---------------------------------------------------------------- every family, fp32, tiny random models

#: tiny configs (4 layers, d 64) shaped as the real models' attention: Phi-3-mini / 3.5 and OLMo-2 have as
#: many KV heads as heads, Gemma-2 / Gemma-3 / Granite / SmolLM3 fewer
CLIENT_FAMILIES = {
    "mistral": {"sliding_window": 5},
    "phi3": {"num_key_value_heads": 8},
    "granite": {"embedding_multiplier": 2.0, "attention_multiplier": 0.2, "residual_multiplier": 0.5},
    "olmo2": {"num_key_value_heads": 8},
    "smollm3": {"num_attention_heads": 4, "no_rope_layer_interval": 2},
    "gemma2": {"head_dim": 16, "sliding_window": 5, "attn_logit_softcapping": 20.0},  # 2 KV heads
    "gemma3_text": {"head_dim": 16, "num_key_value_heads": 1, "sliding_window": 5},
}
#: optimum-onnx 0.1's ORTModelForCausalLM feeds these model types an empty cache with as many KV heads as
#: attention heads and head size hidden / heads (its list of GQA model types leaves them out): it runs only
#: their checkpoints of that shape (Phi-3-mini / 3.5, OLMo-2; not Gemma-2, Phi-4-mini)
OPTIMUM_MHA_ONLY = ("gemma2", "phi3", "olmo2")
#: every action on 4 layers: 0 linearized, 1 without attention, 2 kept, 3 dropped whole
FAMILY_ACTIONS = {0: "linearize", 1: "drop-attention", 3: "drop-block"}


@pytest.fixture(scope="module", params=list(CLIENT_FAMILIES))
def family_fp32(request, tokenizer_dir, tmp_path_factory):
    """(folder, prompt, OnnxRunner's greedy tokens) of one family pruned by every action, fp32."""
    from conftest import tiny_hf

    from gatenorm.readers import open_checkpoint

    name = request.param
    root = tmp_path_factory.mktemp(name)
    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = tiny_hf(root / "hf", tokenizer_dir, name, **ids, **CLIENT_FAMILIES[name])
    plan = mixed_plan(open_checkpoint(model), FAMILY_ACTIONS, {0: 0.5})
    out = export_onnx(model, plan, root / "onnx")
    runner = OnnxRunner(out)
    prompt = runner.tokenizer.encode(PROMPT)
    yield name, out, prompt, runner.generate(prompt, NEW_TOKENS, stop_at_eos=False)
    shutil.rmtree(root)


def _genai_greedy(folder: Path, prompt: list[int]) -> list[int]:
    og = pytest.importorskip("onnxruntime_genai")
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + NEW_TOKENS, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    got = []
    while not generator.is_done():
        generator.generate_next_token()
        got.append(int(generator.get_next_tokens()[0]))
    return got


def test_family_fp32_onnxruntime_genai(family_fp32):
    _, out, prompt, expected = family_fp32
    assert _genai_greedy(out, prompt) == expected


def test_family_fp32_optimum(family_fp32):
    name, out, prompt, expected = family_fp32
    config = json.loads((out / "config.json").read_text())
    if name in OPTIMUM_MHA_ONLY and config["num_key_value_heads"] != config["num_attention_heads"]:
        refused = run_optimum(out, "model.onnx", prompt)
        assert refused.returncode != 0
        assert re.search(
            r"(?s)past_key_values.*index: 1 Got: 8 Expected: 2", refused.stderr
        )  # optimum's cache
        return
    assert optimum_greedy(out, "model.onnx", prompt) == expected


def test_family_fp32_transformers_js(family_fp32):
    _, out, prompt, expected = family_fp32
    result = run_transformers_js(out, "fp32", PROMPT)
    assert result["prompt"] == prompt
    assert result["new"] == expected


# ---------------------------------------------------------------- SmolLM2 fp32, pruned by every action


@pytest.fixture(scope="module")
def smollm2_fp32(smollm2_scored, tmp_path_factory):
    ckpt, scores = smollm2_scored
    plan = mixed_plan(ckpt, SMOLLM2_MIXED_ACTIONS, SMOLLM2_MIXED_ALPHAS, scores)
    out = export_onnx(ckpt.path, plan, tmp_path_factory.mktemp("clients") / "fp32")
    runner = OnnxRunner(out)
    prompt = runner.tokenizer.encode(PROMPT)
    yield out, prompt, runner.generate(prompt, NEW_TOKENS, stop_at_eos=False)
    shutil.rmtree(out)


@pytest.mark.slow
def test_smollm2_fp32_pruned_in_every_client(smollm2_fp32):
    """The fp32 folder (onnx/model.onnx) of the mixed plan: the three clients' greedy tokens equal
    OnnxRunner's (slow: a 0.5 GB export loaded four times)."""
    out, prompt, expected = smollm2_fp32
    assert _genai_greedy(out, prompt) == expected
    assert optimum_greedy(out, "model.onnx", prompt) == expected
    result = run_transformers_js(out, "fp32", PROMPT)
    assert result["prompt"] == prompt and result["new"] == expected
