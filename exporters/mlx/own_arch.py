"""A transformers model pruned by whole blocks as its own mlx-lm architecture: the HF config with
``num_hidden_layers`` and the per-layer lists renumbered over the kept layers, and the kept layers' tensors
under their new numbers (HF names, which mlx-lm's own models read through their ``sanitize``).

For families whose structure mlx-lm's ``nemotron-nas`` cannot express (q/k norms, post-norms, layers
without rotary embedding): removing a block there is removing a layer, which every mlx-lm model can hold;
removing an attention sublayer alone is not (their spec refuses it). Refitted down projections (healing's
folds) are ordinary weights of the kept layers and go as they are.
"""

from __future__ import annotations

import re

import numpy as np
from torch import nn

from exporters.mlx.families import MlxSpec
from gatenorm.architectures import Architecture
from gatenorm.architectures.layers import IdentityLayer

_LAYER = re.compile(r"^(.*\.layers\.)(\d+)\.(.+)$")
#: HF config keys holding one entry per layer
PER_LAYER_KEYS = ("layer_types", "no_rope_layers")


def kept_layers(model: nn.Module, arch: type[Architecture]) -> list[int]:
    """Source indices of the layers `model` (pruned in PyTorch) still runs."""
    return [i for i, layer in enumerate(arch.decoder_layers(model)) if not isinstance(layer, IdentityLayer)]


def layout(
    model: nn.Module, arch: type[Architecture], spec: type[MlxSpec], config: dict
) -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json, tensors) of `model` as its own mlx-lm architecture, the removed blocks left out."""
    kept = kept_layers(model, arch)
    number = {old: new for new, old in enumerate(kept)}
    tensors = {}
    for name, value in model.state_dict().items():
        if match := _LAYER.match(name):
            prefix, index, rest = match.groups()
            name = f"{prefix}{number[int(index)]}.{rest}"
        tensors[name] = value.detach().float().cpu().numpy()
    out = {k: v for k, v in config.items() if k not in ("dtype", "torch_dtype", "transformers_version")}
    out["num_hidden_layers"] = len(kept)
    for key in PER_LAYER_KEYS:
        if isinstance(config.get(key), list):
            out[key] = [config[key][i] for i in kept]
    return spec.own_config(out), tensors
