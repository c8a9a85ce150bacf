"""A checkpoint's tensors under the names of a transformers model's state dict, read one at a time.

An HF folder stores them under those names already (safetensors, read lazily). A GGUF stores them under
llama.cpp's names and layouts: transformers' own GGUF loader maps the names (`get_gguf_hf_weights_map`) and
undoes the converter's changes (its per-family tensor processors, e.g. llama's q/k row order); here the same
two pieces are applied to one dequantized tensor at a time instead of to the whole file at once, so the
values are those `gatenorm.apply.load_model` loads.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch
from torch import nn

from gatenorm.errors import GatenormError
from gatenorm.plan import Plan
from gatenorm.readers import Checkpoint
from gatenorm.readers.hf_gguf import parsed_gguf, shared_gguf_parse
from gatenorm.recover.store import load_overrides


class CheckpointTensors:
    """Tensors of `ckpt` by the state-dict name of `skeleton` (a transformers model of the checkpoint's
    config, on the meta device), float32 in the model's layout; with `plan`, a recovered plan's merged
    tensors (`gatenorm.recover.store.load_overrides`) overlay the checkpoint's under the same names."""

    def __init__(self, ckpt: Checkpoint, skeleton: nn.Module, plan: Plan | None = None):
        self.ckpt = ckpt
        #: state-dict name -> the value read instead of the checkpoint's (a recovered plan's)
        self.overrides = load_overrides(plan)
        self.names: dict[str, str] = {}  # state-dict name -> checkpoint name
        self._processor = None
        if ckpt.format == "gguf":
            self._gguf_names(skeleton)
        else:
            self.names = {name: name for name in skeleton.state_dict() if ckpt.has_tensor(name)}

    def _gguf_names(self, skeleton: nn.Module) -> None:
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
        )

        parsed = parsed_gguf(self.ckpt.path)
        architecture = self.ckpt.reader.fields["general.architecture"].contents()
        self._parsed = parsed
        self._processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(
            config=parsed.get("config", {})
        )
        # transformers 5 takes the tensor processor (its renames), 4 finds names without it
        extra = (
            (self._processor,) if "processor" in inspect.signature(get_gguf_hf_weights_map).parameters else ()
        )
        with shared_gguf_parse():
            self._mapping = get_gguf_hf_weights_map(skeleton, *extra)
        self.names = {hf: name for name, hf in self._mapping.items() if self.ckpt.has_tensor(name)}

    def has(self, name: str) -> bool:
        """Whether the checkpoint stores the state-dict tensor `name`."""
        return name in self.names

    def source(self, name: str) -> str:
        """The checkpoint's name of state-dict tensor `name`."""
        try:
            return self.names[name]
        except KeyError:
            raise GatenormError(f"{self.ckpt.path} has no tensor for {name}") from None

    def read(self, name: str) -> torch.Tensor:
        """State-dict tensor `name`, float32, as transformers would load it (a recovered plan's merged value
        where it has one)."""
        if name in self.overrides:
            return self.overrides[name].clone()
        source = self.source(name)
        value = self.ckpt._read(source)[1]
        if self._processor is None:
            return value
        t = self.ckpt.tensors[source]
        weights = value.numpy().reshape(tuple(reversed([int(x) for x in t.shape])))
        result = self._processor.process(
            weights=weights, name=source, tensor_key_mapping=self._mapping, parsed_parameters=self._parsed
        )
        # `value` is this read's own memory (dequantized, or the bytes read): no copy unless reordered
        return torch.from_numpy(np.ascontiguousarray(result.weights))

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows start..stop-1 of a vocabulary table (embedding or LM head), float32."""
        if name in self.overrides:
            return self.overrides[name][start:stop].clone()
        return self.ckpt.read_rows(self.source(name), start, stop)

    def rows(self, name: str) -> int:
        """Rows of a vocabulary table."""
        return self.ckpt.rows(self.source(name))


def materialize(module: nn.Module, prefix: str, tensors: CheckpointTensors) -> None:
    """Give `module`'s meta parameters (state-dict names `prefix` + their own) their checkpoint values,
    in place."""
    for name, param in list(module.named_parameters()):
        if not param.is_meta:
            continue
        value = tensors.read(prefix + name)
        if tuple(value.shape) != tuple(param.shape):
            value = value.reshape(param.shape)
        owner, _, leaf = name.rpartition(".")
        setattr(module.get_submodule(owner), leaf, nn.Parameter(value, requires_grad=False))


def release(module: nn.Module) -> None:
    """Put `module`'s parameters back on the meta device, freeing their memory."""
    for name, param in list(module.named_parameters()):
        if not param.is_meta:
            owner, _, leaf = name.rpartition(".")
            setattr(module.get_submodule(owner), leaf, nn.Parameter(param.to("meta"), requires_grad=False))
