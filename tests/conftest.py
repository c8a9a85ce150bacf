"""Shared fixtures: the shipped SmolLM2 GGUF, an HF-folder copy of it, and tiny random llama/qwen models."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers.utils import logging as hf_logging

from gatenorm.models import smollm2, tiny

#: the set-up's own output (transformers 5's save_pretrained shows a progress bar) stays off what tests read
hf_logging.disable_progress_bar()

TINY_LLAMA = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)


#: SmolLM2 (30 layers): attention dropped in 5, 7, 8; 17, 25 linearized; blocks 26, 29 (the last) dropped.
SMOLLM2_MIXED_ACTIONS = {5: "drop-attention", 7: "drop-attention", 8: "drop-attention", 17: "linearize"}
SMOLLM2_MIXED_ACTIONS |= {25: "linearize", 26: "drop-block", 29: "drop-block"}
SMOLLM2_MIXED_ALPHAS = {17: 0.6, 25: 1.4}


@pytest.fixture(autouse=True, scope="session")
def _synthetic_text_cache(tmp_path_factory):
    """The cache of synthetic calibration text (`gatenorm.methods.synthetic`) in a session folder, not the
    user's (subprocesses inherit it)."""
    patch = pytest.MonkeyPatch()
    patch.setenv("GATENORM_CACHE", str(tmp_path_factory.mktemp("gatenorm-cache")))
    yield
    patch.undo()


def mixed_plan(ckpt, actions: dict[int, str], alphas: dict[int, float], scores=None):
    """A Gate-Norm-scored plan for `ckpt` giving layer i `actions[i]` (keep elsewhere) and `alphas`."""
    from gatenorm.methods import score_checkpoint
    from gatenorm.plan import LayerAction, plan_from_actions

    scores = scores or score_checkpoint(ckpt, "gate-norm")
    per_layer = [LayerAction(actions.get(i, "keep")) for i in range(ckpt.shape.n_layers)]
    return plan_from_actions(ckpt, scores, per_layer, alphas)


def make_tiny_model(folder: Path, model_type: str = "llama", seed: int = 0, **overrides):
    """Save a randomly initialised tiny causal LM of `model_type` as an HF safetensors folder."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **{**TINY_LLAMA, **overrides})
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # default init is tiny (std 0.02): make attention (and biases) matter
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                p.normal_(0.0, 0.15)
            elif name.endswith("proj.bias"):  # transformers initialises biases to 0: make them count
                p.normal_(0.0, 0.1)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(folder, safe_serialization=True)
    return model


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return smollm2()


@pytest.fixture(scope="session")
def smollm2_scored(smollm2_gguf):
    """SmolLM2 opened once (opening parses 100k tokenizer strings) and its Gate-Norm scores."""
    from gatenorm.methods import score_checkpoint
    from gatenorm.readers import open_checkpoint

    ckpt = open_checkpoint(smollm2_gguf)
    return ckpt, score_checkpoint(ckpt, "gate-norm")


@pytest.fixture(scope="session")
def tiny_gguf() -> Path:
    return tiny()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A 4-layer llama with GQA (8 heads, 2 KV heads), random weights, as an HF folder."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model(folder)
    return folder


@pytest.fixture(scope="session")
def smollm2_model(smollm2_gguf):
    """SmolLM2 loaded by transformers from the GGUF (fp32). Shared: deep-copy it before mutating."""
    from gatenorm.apply import load_model

    return load_model(smollm2_gguf)


@pytest.fixture(scope="session")
def smollm2_hf(tmp_path_factory, smollm2_gguf, smollm2_model) -> Path:
    """An HF safetensors folder with SmolLM2's dequantized (fp32) weights and tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("smollm2-hf")
    model = AutoModelForCausalLM.from_config(smollm2_model.config)
    model.load_state_dict(smollm2_model.state_dict())
    model.save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def smollm2_tokens(smollm2_gguf) -> list[int]:
    """320 tokens of the shipped Wikipedia text, tokenized by llama.cpp with SmolLM2's vocabulary."""
    from gguf_helpers import llama_cpp_tokens, wiki_text

    return llama_cpp_tokens(smollm2_gguf, wiki_text())[:320]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, smollm2_gguf) -> Path:
    """SmolLM2's vocabulary and merges as a GPT-2 style byte-level BPE tokenizer.json, for tiny HF models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from exporters.gguf.header import ScannedGGUF

    fields = ScannedGGUF(smollm2_gguf).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    merges = [tuple(m.split(" ")) for m in fields["tokenizer.ggml.merges"].contents()]
    bpe = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>"}
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe, **specials)
    fast.chat_template = fields["tokenizer.chat_template"].contents()
    folder = tmp_path_factory.mktemp("bpe-tokenizer")
    fast.save_pretrained(folder)
    return folder


def tiny_hf(folder: Path, tokenizer_dir: Path, model_type: str, **overrides) -> Path:
    """A tiny random `model_type` HF folder with SmolLM2's vocabulary size and `tokenizer_dir`'s files."""
    make_tiny_model(folder, model_type, vocab_size=49152, **overrides)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, folder / f.name)
    return folder
