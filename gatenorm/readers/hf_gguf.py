"""transformers' reading of a GGUF's metadata, done once per file and process.

transformers turns a GGUF's metadata into its config and tokenizer fields with
``load_gguf_checkpoint(path, return_tensors=False)``, which opens the file with gguf-py's ``GGUFReader``: a
numpy view per metadata item, about 10 s for a 128k-token vocabulary. The config, the tokenizer's model
type, the model loader and `CheckpointTensors` each ran it. `parsed_gguf` runs it once per file (path,
size, modification time) and process, on `ScannedReader`, a stand-in for ``GGUFReader`` built from
gatenorm's own checked header scan (`ScannedGGUF`: the same keys and values in a fraction of a second;
tests/test_hf_gguf.py checks the two give equal results); `shared_gguf_parse` hands that one parse to every
transformers call made inside it, and has transformers' tensor-name mapping (``get_gguf_hf_weights_map``,
which recurses over the model's modules and built gguf-py's ``TensorNameMap`` afresh in each: 423 times for
a 32-layer llama, 16 s of an 8B-shaped `plan` on 2 loaded cores) build that map once.
"""

from __future__ import annotations

import contextlib
import functools
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import gguf

from gatenorm.quiet import quiet_transformers
from gatenorm.readers.gguf_check import ScannedGGUF, ScannedTensor

#: Parsed files kept per process (a command reads one or two models).
KEPT = 4
_PARSED: OrderedDict[tuple[str, int, int], dict] = OrderedDict()


@dataclass
class _Field:
    """One metadata key as transformers reads a ``ReaderField``: ``parts[i]`` for each ``i`` in ``data``
    is one value (a 1-item list for a number, the bytes of a string), ``types`` gguf-py's value types."""

    name: str
    types: list[gguf.GGUFValueType]
    parts: list
    data: range


def _field(name: str, types: list[gguf.GGUFValueType], value) -> _Field:
    items = value if types[0] is gguf.GGUFValueType.ARRAY else [value]
    parts = [item.encode() if isinstance(item, str) else [item] for item in items]
    return _Field(name, types, parts, range(len(parts)))


class ScannedReader:
    """What transformers' metadata parse reads of a ``GGUFReader`` (``fields``, tensor names), from the
    checked header scan of `path`."""

    def __init__(self, path: str | Path):
        scanned = ScannedGGUF(path)
        T = gguf.GGUFValueType
        counts = {  # the header's own numbers, which gguf-py lists as fields first
            "GGUF.version": (T.UINT32, scanned.version),
            "GGUF.tensor_count": (T.UINT64, len(scanned.tensors)),
            "GGUF.kv_count": (T.UINT64, len(scanned.fields)),
        }
        self.fields = {name: _field(name, [vtype], value) for name, (vtype, value) in counts.items()}
        self.fields |= {name: _field(name, f.types, f.contents()) for name, f in scanned.fields.items()}
        self.tensors: list[ScannedTensor] = scanned.tensors


def _key(path: str | Path) -> tuple[str, int, int]:
    path = Path(path).resolve()
    stat = path.stat()
    return str(path), stat.st_size, stat.st_mtime_ns


def _copy(value):
    """A copy of a parse a caller may change (dicts and lists copied; strings and numbers shared)."""
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) if isinstance(v, dict | list) else v for v in value]
    return value


def _parse(path: str | Path) -> dict:
    """transformers' ``load_gguf_checkpoint(path, return_tensors=False)`` on `ScannedReader`."""
    from transformers import modeling_gguf_pytorch_utils as hf

    load = getattr(hf.load_gguf_checkpoint, "__wrapped__", hf.load_gguf_checkpoint)
    # transformers imports the reader from gguf at each call
    with mock.patch.object(gguf, "GGUFReader", ScannedReader), quiet_transformers():
        return load(str(path), return_tensors=False)


def parsed_gguf(path: str | Path) -> dict:
    """``load_gguf_checkpoint(path, return_tensors=False)`` (keys config, tokenizer, tokenizer_config),
    parsed once per version of the file and process; each call gets its own copy."""
    key = _key(path)
    if key not in _PARSED:
        _PARSED[key] = _parse(path)
        while len(_PARSED) > KEPT:
            _PARSED.popitem(last=False)
    _PARSED.move_to_end(key)
    return _copy(_PARSED[key])


@contextlib.contextmanager
def shared_gguf_parse() -> Iterator[None]:
    """transformers' metadata parses (``load_gguf_checkpoint`` without tensors: its config and tokenizer
    loading) answered by `parsed_gguf` while the block runs, a read of the tensors going to transformers;
    gguf-py's tensor-name maps built once per (architecture, blocks) in the block (module doc)."""
    from transformers import modeling_gguf_pytorch_utils as hf

    original = hf.load_gguf_checkpoint
    if hasattr(original, "__wrapped__"):  # already inside the block
        yield
        return

    def shared(gguf_checkpoint_path, return_tensors=False, **kwargs):
        if return_tensors:
            return original(gguf_checkpoint_path, return_tensors, **kwargs)
        return parsed_gguf(gguf_checkpoint_path)

    shared.__wrapped__ = original
    one_name_map = functools.cache(gguf.get_tensor_name_map)  # transformers imports it at each call
    with (
        mock.patch.object(hf, "load_gguf_checkpoint", shared),
        mock.patch.object(gguf, "get_tensor_name_map", one_name_map),
    ):
        yield
