"""Helpers of the GGUF exporter tests: llama.cpp and PyTorch logits, and their agreement."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from gatenorm.validate.text import wiki_path


def wiki_text(n_articles: int = 4) -> str:
    """The lead sections of the first `n_articles` articles of the shipped offline Wikipedia."""
    articles = json.loads(wiki_path().read_text())
    return "\n\n".join(a["extract"] for a in list(articles.values())[:n_articles])


def llama_cpp_logits(
    path: Path, tokens: list[int], flash_attn: bool = False, f32_cache: bool = False
) -> np.ndarray:
    """Logits of every position of `tokens` in llama.cpp (llama-cpp-python), float32 (n, vocab); the KV
    cache is F16 (llama.cpp's default) or, with `f32_cache`, F32 (deep random models amplify F16 rounding)."""
    from llama_cpp import GGML_TYPE_F32, Llama

    cache = {"type_k": GGML_TYPE_F32, "type_v": GGML_TYPE_F32} if f32_cache else {}

    llm = Llama(
        str(path),
        n_ctx=max(64, len(tokens)),
        n_batch=512,
        n_threads=2,
        logits_all=True,
        flash_attn=flash_attn,
        verbose=False,
        **cache,
    )
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float32)
    finally:
        llm.close()


def llama_cpp_tokens(path: Path, text: str) -> list[int]:
    """`text` tokenized by llama.cpp with the vocabulary stored in the GGUF at `path` (no BOS)."""
    from llama_cpp import Llama

    llm = Llama(str(path), vocab_only=True, verbose=False)
    try:
        return llm.tokenize(text.encode(), add_bos=False, special=True)
    finally:
        llm.close()


def torch_logits(model, tokens: list[int]) -> np.ndarray:
    """Logits of a transformers causal LM for `tokens`, float32 (n, vocab)."""
    with torch.inference_mode():
        return model(torch.tensor([tokens])).logits[0].float().numpy()


def agreement(reference: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    """(mean KL(reference || other) per position, top-1 agreement) of two (n, vocab) logit arrays."""
    p = torch.log_softmax(torch.from_numpy(reference).double(), dim=-1)
    q = torch.log_softmax(torch.from_numpy(other).double(), dim=-1)
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    top1 = (reference.argmax(-1) == other.argmax(-1)).mean().item()
    return kl, top1


def kv_state_bytes(path: Path, tokens: list[int], flash_attn: bool = True) -> int:
    """Bytes of llama.cpp's saved context state (dominated by the KV cache) after evaluating `tokens`."""
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=max(64, len(tokens)), n_threads=2, flash_attn=flash_attn, verbose=False)
    try:
        llm.eval(tokens)
        return len(llm.save_state().llama_state)
    finally:
        llm.close()
