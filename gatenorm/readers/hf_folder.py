"""Lazy reader of Hugging Face model folders: config.json plus one or more *.safetensors shards."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from gatenorm.architectures import get_architecture
from gatenorm.errors import GatenormError
from gatenorm.readers.base import Checkpoint, ModelShape

SAFETENSORS_INDEX = "model.safetensors.index.json"


def read_hf_config(folder: Path) -> dict:
    """The parsed config.json of `folder`."""
    path = folder / "config.json"
    if not path.is_file():
        raise GatenormError(f"not a model folder: {folder} has no config.json")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GatenormError(f"invalid config.json in {folder}: {e}") from None


def hf_architecture_name(config: dict) -> str:
    """The registry key of an HF config: its model_type, else its first architectures entry."""
    name = config.get("model_type") or next(iter(config.get("architectures") or []), None)
    if not name:
        raise GatenormError("config.json names no model_type or architectures")
    return name


class HFCheckpoint(Checkpoint):
    """An HF folder with safetensors weights, sharded (with an index) or not."""

    format = "safetensors"

    def __init__(self, folder: Path):
        self.path = folder
        self.config = read_hf_config(folder)
        self.arch = get_architecture(hf_architecture_name(self.config))
        self.shape = self._shape()
        self.weight_map = self._weight_map()

    def _shape(self) -> ModelShape:
        c = self.config
        try:
            n_head = int(c["num_attention_heads"])
            d_model = int(c["hidden_size"])
            return ModelShape(
                architecture=self.arch.name,
                n_layers=int(c["num_hidden_layers"]),
                d_model=d_model,
                n_head=n_head,
                n_head_kv=int(c.get("num_key_value_heads") or n_head),
                head_dim=int(c.get("head_dim") or d_model // n_head),
            )
        except KeyError as e:
            raise GatenormError(f"config.json in {self.path} lacks {e.args[0]}") from None

    def _weight_map(self) -> dict[str, Path]:
        index = self.path / SAFETENSORS_INDEX
        if index.is_file():
            try:
                mapping = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise GatenormError(f"invalid {SAFETENSORS_INDEX} in {self.path}: {e}") from None
            return {name: self.path / file for name, file in mapping.items()}
        shards = sorted(self.path.glob("*.safetensors"))
        if not shards:
            raise GatenormError(f"no *.safetensors files in {self.path}")
        weight_map = {}
        for shard in shards:
            try:
                with safe_open(shard, framework="pt") as f:
                    weight_map.update({name: shard for name in f.keys()})  # noqa: SIM118
            except (SafetensorError, OSError) as e:
                raise GatenormError(f"unreadable safetensors file {shard}: {e}") from None
        return weight_map

    def tensor_name(self, part: str, layer: int) -> str:
        return self.arch.hf_tensors[part].format(i=layer)

    def has_tensor(self, name: str) -> bool:
        return name in self.weight_map

    def _read(self, name: str) -> tuple[memoryview, torch.Tensor]:
        shard = self.weight_map.get(name)
        if shard is None:
            raise GatenormError(f"{self.path} has no tensor {name}")
        try:
            with safe_open(shard, framework="pt") as f:
                stored = f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise GatenormError(f"unreadable tensor {name} in {shard}: {e}") from None
        raw = stored.contiguous().view(-1).view(torch.uint8).numpy().data
        return raw, stored.float()
