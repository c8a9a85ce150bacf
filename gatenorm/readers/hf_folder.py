"""Lazy reader of Hugging Face model folders: config.json plus one or more *.safetensors shards."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from gatenorm.architectures import get_architecture
from gatenorm.errors import GatenormError
from gatenorm.readers import hf_check
from gatenorm.readers.base import Checkpoint, ModelShape
from gatenorm.readers.hf_check import SAFETENSORS_INDEX

__all__ = ["SAFETENSORS_INDEX", "HFCheckpoint", "hf_architecture_name", "read_hf_config"]


def read_hf_config(folder: Path) -> dict:
    """The parsed config.json of `folder` (a JSON object), with transformers 4's rope keys
    (`with_rope_keys`)."""
    return with_rope_keys(hf_check.read_config(folder))


def _rope_scaling(params: dict) -> dict | None:
    if params.get("rope_type", "default") == "default":
        return None
    return {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}


def with_rope_keys(config: dict) -> dict:
    """`config` with ``rope_theta``, ``rope_scaling`` (and Gemma-3's ``rope_local_base_freq``,
    ``partial_rotary_factor``) where transformers 5 wrote them as ``rope_parameters`` only (flat, or one entry
    per layer type), so that readers and exporters read one set of keys from either version's folders."""
    params = config.get("rope_parameters")
    if not isinstance(params, dict) or "rope_theta" in config:
        return config
    config = dict(config)
    per_type = "full_attention" in params and isinstance(params["full_attention"], dict)
    main = params["full_attention"] if per_type else params
    if "rope_theta" in main:
        config["rope_theta"] = main["rope_theta"]
    if per_type and "rope_theta" in params.get("sliding_attention", {}):
        config["rope_local_base_freq"] = params["sliding_attention"]["rope_theta"]
    if "partial_rotary_factor" in main:
        config.setdefault("partial_rotary_factor", main["partial_rotary_factor"])
    if "rope_scaling" not in config and (scaling := _rope_scaling(main)) is not None:
        config["rope_scaling"] = scaling
    return config


def hf_architecture_name(config: dict, folder: Path = Path("")) -> str:
    """The registry key of an HF config: its model_type, else its first architectures entry."""
    return hf_check.architecture_name(config, folder)


class HFCheckpoint(Checkpoint):
    """An HF folder with safetensors weights, sharded (with an index) or not."""

    format = "safetensors"

    def __init__(self, folder: Path):
        self.path = folder
        self.config = read_hf_config(folder)
        self.arch = get_architecture(hf_architecture_name(self.config, folder))
        self.shape = self._shape()
        self.weight_map = self._weight_map()
        hf_check.check_hf_tensors(folder, self.shape, self.arch.hf_tensors, self._tensors)

    def _shape(self) -> ModelShape:
        c, folder = self.config, self.path
        n_head = hf_check.config_int(c, "num_attention_heads", folder)
        d_model = hf_check.config_int(c, "hidden_size", folder)
        try:
            return ModelShape(
                architecture=self.arch.name,
                n_layers=hf_check.config_int(c, "num_hidden_layers", folder),
                d_model=d_model,
                n_head=n_head,
                n_head_kv=hf_check.config_int(c, "num_key_value_heads", folder, n_head),
                head_dim=hf_check.config_int(c, "head_dim", folder, max(d_model // n_head, 1)),
            )
        except GatenormError as e:
            raise GatenormError(f"config.json in {folder}: {e}") from None

    def _weight_map(self) -> dict[str, Path]:
        self._tensors = hf_check.shard_tensors(self.path)
        return {name: shard for name, (shard, _, _) in self._tensors.items()}

    def tensor_name(self, part: str, layer: int) -> str:
        return self.arch.hf_tensors[part].format(i=layer)

    def has_tensor(self, name: str) -> bool:
        return name in self.weight_map

    def _stored(self, name: str, rows: slice | None = None) -> torch.Tensor:
        shard = self.weight_map.get(name)
        if shard is None:
            raise GatenormError(f"{self.path} has no tensor {name}")
        try:
            with safe_open(shard, framework="pt") as f:
                return f.get_tensor(name) if rows is None else f.get_slice(name)[rows]
        except (SafetensorError, OSError) as e:
            raise GatenormError(f"unreadable tensor {name} in {shard}: {e}") from None

    def rows(self, name: str) -> int:
        return int(self._tensors[name][2][0])

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._stored(name, slice(start, stop)).float()

    def _read(self, name: str) -> tuple[memoryview, torch.Tensor]:
        stored = self._stored(name)
        raw = stored.contiguous().view(-1).view(torch.uint8).numpy().data
        return raw, stored.float()
