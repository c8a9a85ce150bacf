"""Shared fixtures: the shipped SmolLM2 GGUF, an HF-folder copy of it, and tiny random llama/qwen models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gatenorm.models import smollm2, tiny

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


def make_tiny_model(folder: Path, model_type: str = "llama", seed: int = 0, **overrides):
    """Save a randomly initialised tiny causal LM of `model_type` as an HF safetensors folder."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **{**TINY_LLAMA, **overrides})
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # default init is tiny (std 0.02): make attention matter in the forward pass
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                p.normal_(0.0, 0.15)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(folder, safe_serialization=True)
    return model


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return smollm2()


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
