"""gatenorm ONNX folders in the clients mobile and web apps ship, opened as exported: onnxruntime-genai,
optimum's ORTModelForCausalLM and transformers.js (node). Greedy tokens must equal OnnxRunner's over
32 tokens on SmolLM2 int4, unpruned and pruned by the mixed plan (dropped attention, linearized layers,
dropped blocks); the tokenizers agree with transformers' on the shipped Wikipedia text."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
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
    assert spec["decoder"]["type"] == "ByteLevel" and spec["post_processor"]["type"] == "ByteLevel"


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


def test_optimum_greedy_matches_runner(smollm2_int4):
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    out, _, prompt, expected = smollm2_int4
    model = ORTModelForCausalLM.from_pretrained(out, subfolder="onnx", file_name="model_q4.onnx")
    ids = torch.tensor([prompt])
    new = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
    )
    assert new[0, len(prompt) :].tolist() == expected


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
