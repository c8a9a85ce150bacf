"""Tokenizer files of an ONNX export that every client reads the same way as the source model.

transformers derives a tokenizer from a GGUF that is right for transformers' own use but not as files for
other readers: for a byte-level BPE vocabulary (``tokenizer.ggml.model`` gpt2) its decoder is
``Sequence[ByteFallback, Fuse, Replace, ByteLevel]`` (onnxruntime-genai's tokenizer then maps every
``Ġ``-initial token to -1 and decodes ``Ġ``/``Ċ`` literally), it names BOS as EOS and turns on BOS where the
GGUF's ``tokenizer.ggml.add_bos_token`` is false. Here a byte-level vocabulary gets the plain ``ByteLevel``
decoder and a post-processor that adds no BOS where the GGUF adds none (``ByteLevel``; transformers 5 writes
it as a template of the text alone), and no byte fallback, of a GPT-2 tokenizer, and special tokens and
``add_bos_token`` are taken from the GGUF's own keys. The chat template is written inside
``tokenizer_config.json`` (transformers.js does not read ``chat_template.jinja``).
"""

from __future__ import annotations

import json
from pathlib import Path

_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
_GGUF_SPECIAL = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}


def _is_byte_level(spec: dict) -> bool:
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return spec.get("model", {}).get("type") == "BPE" and any(p.get("type") == "ByteLevel" for p in parts)


def _fixed_backend(tokenizer, add_bos: bool):
    """The fast tokenizer's backend with a byte-level vocabulary's own decoder and post-processor."""
    from tokenizers import Tokenizer

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if not _is_byte_level(spec):
        return None
    spec["decoder"] = dict(_BYTE_LEVEL)
    spec["model"]["byte_fallback"] = False
    if spec.get("normalizer") == {"type": "Sequence", "normalizers": []}:
        spec["normalizer"] = None
    if not add_bos:
        spec["post_processor"] = dict(_BYTE_LEVEL)
    return Tokenizer.from_str(json.dumps(spec))


def _gguf_tokenizer_keys(path: Path) -> dict:
    from exporters.gguf.header import ScannedGGUF

    fields = ScannedGGUF(path).fields
    keys = [*_GGUF_SPECIAL.values(), "tokenizer.ggml.model", "tokenizer.ggml.add_bos_token"]
    return {k: fields[k].contents() for k in keys if k in fields}


def client_tokenizer(model_path: str | Path, tokenizer):
    """The tokenizer to ship with an export of `model_path` (see the module docstring); may be `tokenizer`."""
    from transformers import GPT2TokenizerFast

    path = Path(model_path)
    if not tokenizer.is_fast:
        return tokenizer
    if not path.is_file():  # HF folder: its own files, only a byte-level decoder fixed if needed
        spec = json.loads(tokenizer.backend_tokenizer.to_str())
        decoder = spec.get("decoder") or {}
        if _is_byte_level(spec) and decoder.get("type") == "Sequence":
            backend = _fixed_backend(tokenizer, add_bos=True)
            tokenizer.backend_tokenizer.decoder = backend.decoder
        return tokenizer
    keys = _gguf_tokenizer_keys(path)
    add_bos = bool(keys.get("tokenizer.ggml.add_bos_token", False))
    backend = _fixed_backend(tokenizer, add_bos) if keys.get("tokenizer.ggml.model") == "gpt2" else None
    if backend is None:
        return tokenizer
    vocab_size = backend.get_vocab_size()
    special = {
        name: backend.id_to_token(int(keys[key]))
        for name, key in _GGUF_SPECIAL.items()
        if key in keys and 0 <= int(keys[key]) < vocab_size
    }
    fixed = GPT2TokenizerFast(
        tokenizer_object=backend, add_prefix_space=False, add_bos_token=add_bos, **special
    )
    fixed.chat_template = tokenizer.chat_template
    fixed.model_max_length = tokenizer.model_max_length
    return fixed


def save_tokenizer(tokenizer, folder: Path) -> None:
    """Save in the fast format only (a GGUF-loaded tokenizer would copy the whole GGUF as its vocab file),
    the chat template inside tokenizer_config.json."""
    tokenizer.save_pretrained(
        folder, legacy_format=False if tokenizer.is_fast else None, save_jinja_files=False
    )
