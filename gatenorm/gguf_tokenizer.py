"""A GGUF's tokenizer, converted by transformers once per model and kept on disk.

transformers builds a fast tokenizer from a GGUF's vocabulary on every load (its BPE model, merges and
pre-tokenizer: seconds for a 128k-token vocabulary). The converted tokenizer is saved (``save_pretrained``)
under the user cache (`gatenorm.io.cache_dir`) in ``tokenizers/<key>``, `key` the sha256 of the file's
metadata (every key and value, not the tensors), of the tokenizer class asked for and of transformers' and
tokenizers' versions. The folder is written atomically with the sha256 of its files (``.content-sha256``);
an entry whose files do not match it, or that does not load, is rebuilt, never used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import struct
from collections.abc import Callable
from pathlib import Path

from gatenorm.errors import GatenormError
from gatenorm.io import atomic_dir, cache_dir, content_sha256
from gatenorm.readers.gguf_check import ScannedField

#: Bumped when what an entry holds changes: older entries are then not reused.
SCHEMA = 1
DIGEST = ".content-sha256"


def tokenizer_key(fields: dict[str, ScannedField], generic: bool) -> str:
    """The cache key of a GGUF's tokenizer: its metadata (`fields`, every key and raw value), whether the
    generic fast tokenizer is asked for (`generic`) instead of transformers' choice, and the versions."""
    import tokenizers
    import transformers

    digest = hashlib.sha256()
    versions = {"schema": SCHEMA, "generic": generic, "transformers": transformers.__version__}
    digest.update(json.dumps(versions | {"tokenizers": tokenizers.__version__}, sort_keys=True).encode())
    for name, field in fields.items():
        for part in (name.encode(), field.raw_value):
            digest.update(struct.pack("<Q", len(part)) + part)
    return digest.hexdigest()


def _load(entry: Path, generic: bool):
    """The tokenizer stored in `entry`, or None when it is missing, altered or does not load."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        if (entry / DIGEST).read_text().strip() != content_sha256(entry):
            return None
        # the backend as converted: a class's own __init__ would rebuild it from the vocabulary with the
        # pre-tokenizer of its hub checkpoints (Qwen2Tokenizer's regex), not the one the GGUF load gives
        backend = Tokenizer.from_file(str(entry / "tokenizer.json"))
        loader = PreTrainedTokenizerFast if generic else AutoTokenizer
        return loader.from_pretrained(entry, tokenizer_object=backend)
    except Exception:  # whatever a damaged entry makes transformers raise: rebuilt
        return None


def cached_tokenizer(
    path: Path, fields: dict[str, ScannedField], generic: bool, convert: Callable[[], object]
):
    """The tokenizer of GGUF `path` (metadata `fields`): from the cache, else `convert()`'s, then stored.
    `generic` names which conversion `convert` does (part of the key)."""
    entry = cache_dir() / "tokenizers" / tokenizer_key(fields, generic)
    tokenizer = _load(entry, generic) if entry.is_dir() else None
    if tokenizer is None:  # none yet, or a damaged one: converted afresh and (re)written
        tokenizer = convert()
        with contextlib.suppress(OSError, GatenormError), atomic_dir(entry, overwrite=True) as tmp:
            tokenizer.save_pretrained(tmp)
            (tmp / DIGEST).write_text(content_sha256(tmp) + "\n")
    tokenizer.name_or_path = str(path.parent)  # what a load from the file gives
    return tokenizer
