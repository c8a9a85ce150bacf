"""Checks of an HF model folder before anything is read from it: config.json, the shard index, the shards.

The safetensors library validates each shard's header (length vs file size, JSON, dtypes vs byte sizes,
offsets); here its errors get the file's name, the index must name existing files inside the folder and
exactly the tensors the shards hold, config.json must be a JSON object whose sizes are positive integers,
and the attention tensors must be floating point with the shapes the config implies.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError, safe_open

from gatenorm.errors import GatenormError
from gatenorm.io import read_text_file
from gatenorm.readers.gguf_check import MAX_HPARAM, check_tensor_shapes

SAFETENSORS_INDEX = "model.safetensors.index.json"
#: Stored types gatenorm decodes for the tensors it scores (safetensors' names).
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
_CHECKED_PARTS = ("q", "k", "v", "o", "norm", "embed")


def _json(path: Path, what: str):
    text = read_text_file(path, what)
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise GatenormError(f"invalid {what} {path}: {e}") from None


def read_config(folder: Path) -> dict:
    """The parsed config.json of `folder`: a JSON object."""
    path = folder / "config.json"
    if not path.is_file():
        raise GatenormError(f"not a model folder: {folder} has no config.json")
    config = _json(path, "config.json")
    if not isinstance(config, dict):
        raise GatenormError(
            f"invalid config.json in {folder}: a JSON object is needed, not {type(config).__name__}"
        )
    return config


def architecture_name(config: dict, folder: Path) -> str:
    """The registry key of an HF config: its model_type, else its first architectures entry."""
    name = config.get("model_type")
    if not name:
        archs = config.get("architectures")
        name = archs[0] if isinstance(archs, list) and archs else None
    if not name:
        raise GatenormError(f"config.json in {folder} names no model_type or architectures")
    if not isinstance(name, str):
        raise GatenormError(f"config.json in {folder}: model_type must be a string, not {name!r}"[:200])
    return name


def config_int(config: dict, key: str, folder: Path, default: int | None = None) -> int:
    """`config[key]` (or `default` where absent or null): an integer from 1 to 2**31 - 1."""
    value = config.get(key)
    if value is None:
        if default is None:
            raise GatenormError(f"config.json in {folder} lacks {key}")
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise GatenormError(f"config.json in {folder}: {key} must be an integer, not {value!r}"[:200])
    if not 1 <= value <= MAX_HPARAM:
        raise GatenormError(f"config.json in {folder}: {key} = {value} is out of range 1..{MAX_HPARAM}")
    return value


def shard_tensors(folder: Path) -> dict[str, tuple[Path, str, tuple[int, ...]]]:
    """Every tensor of the folder: name -> (shard, dtype, shape), every shard's header checked.

    With an index, it must be a JSON object whose ``weight_map`` maps names to shard files inside the
    folder, and those shards must hold exactly the tensors it names; without one, every
    ``*.safetensors`` file is a shard.
    """
    index = folder / SAFETENSORS_INDEX
    expected: dict[str, Path] | None = None
    if index.is_file():
        doc = _json(index, SAFETENSORS_INDEX)
        mapping = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(mapping, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()
        ):
            raise GatenormError(f"invalid {index}: weight_map must map tensor names to file names")
        expected = {}
        root = folder.resolve()
        for name, file in mapping.items():
            shard = (folder / file).resolve()
            if root not in shard.parents:
                raise GatenormError(f"invalid {index}: {file!r} (for {name}) is outside {folder}")
            if not shard.is_file():
                raise GatenormError(f"{index} names {file} for {name}, which does not exist")
            expected[name] = folder / file
        shards = sorted(set(expected.values()))
    else:
        shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise GatenormError(f"no *.safetensors files in {folder}")
    found: dict[str, tuple[Path, str, tuple[int, ...]]] = {}
    for shard in shards:
        try:
            with safe_open(shard, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118
                    if name in found:
                        raise GatenormError(f"tensor {name} is in both {found[name][0]} and {shard}")
                    piece = f.get_slice(name)
                    found[name] = (shard, piece.get_dtype(), tuple(piece.get_shape()))
        except (SafetensorError, OSError) as e:
            raise GatenormError(f"unreadable safetensors file {shard}: {e}") from None
    if expected is not None:
        missing = sorted(n for n, s in expected.items() if found.get(n, (None,))[0] != s)
        extra = sorted(set(found) - set(expected))
        if missing:
            raise GatenormError(f"{index} names {len(missing)} tensors its shards lack, e.g. {missing[0]}")
        if extra:
            raise GatenormError(f"{index} leaves out {len(extra)} tensors of its shards, e.g. {extra[0]}")
    return found


def check_hf_tensors(folder: Path, shape, names: dict[str, str], tensors: dict) -> None:
    """The attention tensors' shapes against the config, and their dtypes: floating point."""
    where = f"model folder {folder}"
    parts = {p: n for p, n in names.items() if p in _CHECKED_PARTS and n is not None}
    check_tensor_shapes(where, shape, parts, {n: t[2] for n, t in tensors.items()}, len(tensors))
    for layer in range(shape.n_layers):
        for pattern in parts.values():
            entry = tensors.get(pattern.format(i=layer))
            if entry is not None and entry[1] not in FLOAT_DTYPES:
                raise GatenormError(
                    f"{where}: tensor {pattern.format(i=layer)} is {entry[1]}; gatenorm reads floating point "
                    f"weights ({', '.join(sorted(FLOAT_DTYPES))})"
                )
