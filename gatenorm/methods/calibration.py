"""Calibration for the data-driven methods: held-out text windows and per-layer statistics read by hooks
on the transformers model (one forward pass, no copy of the model or of its activations)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gatenorm.errors import GatenormError
from gatenorm.validate.text import WIKI_HELDOUT, token_windows


@dataclass(frozen=True)
class Calibration:
    """Where calibration text comes from: ``wiki-heldout`` or a UTF-8 file, `samples` windows of `length`."""

    source: str
    samples: int = 16
    length: int = 256

    def __post_init__(self) -> None:
        if self.source == "wiki":
            raise GatenormError(
                f"--calib wiki is the evaluation text; calibrate on held-out text ({WIKI_HELDOUT} or a file)"
            )
        if self.source != WIKI_HELDOUT and not Path(self.source).is_file():
            raise GatenormError(f"no such calibration text file: {self.source}")
        if self.samples < 1 or self.length < 8:
            raise GatenormError(
                f"--calib-samples {self.samples} / --calib-len {self.length}: need >= 1 sample of >= 8 tokens"
            )

    def windows(self, tokenizer) -> np.ndarray:
        """Token ids [samples, length] of the text, BOS first when the tokenizer adds one."""
        probe = tokenizer("a").input_ids
        bos = tokenizer.bos_token_id if probe and probe[0] == tokenizer.bos_token_id else None

        def tokenize(text: str) -> list[int]:
            return list(tokenizer(text, add_special_tokens=False).input_ids)

        return token_windows(self.source, tokenize, self.length, self.samples * self.length, bos)


@dataclass
class LayerStatistics:
    """Per layer, means over calibration tokens: cos(X, X + Attn(norm X)) (attention cosine), cos(block input,
    block output) (ShortGPT) and ||Attn(norm X)|| / ||X|| (the Gate-Norm paper's mechanism ratio)."""

    attention_cosine: list[float]
    block_cosine: list[float]
    attention_ratio: list[float]
    tokens: int


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _first(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.double(), b.double()
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-30)


def layer_statistics(model: nn.Module, windows: np.ndarray, batch: int = 4) -> LayerStatistics:
    """One pass of the unpruned `model` over `windows` [n, T], hooks around each layer and its attention."""
    layers = model.model.layers
    n = len(layers)
    sums = np.zeros((3, n))
    inputs: dict[int, torch.Tensor] = {}
    handles = []

    def before_layer(i: int):
        def hook(_module, args, kwargs):
            inputs[i] = _hidden(args, kwargs)

        return hook

    def after_attention(i: int):
        def hook(_module, _args, output):
            x, a = inputs[i], _first(output)
            sums[0, i] += float(_cosine(x, x + a).sum())
            ratio = a.double().norm(dim=-1) / x.double().norm(dim=-1).clamp_min(1e-30)
            sums[2, i] += float(ratio.sum())

        return hook

    def after_layer(i: int):
        def hook(_module, _args, _kwargs, output):
            sums[1, i] += float(_cosine(inputs.pop(i), _first(output)).sum())

        return hook

    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(before_layer(i), with_kwargs=True))
        handles.append(layer.self_attn.register_forward_hook(after_attention(i)))
        handles.append(layer.register_forward_hook(after_layer(i), with_kwargs=True))
    try:
        with torch.inference_mode():
            for start in range(0, len(windows), batch):
                ids = torch.from_numpy(np.ascontiguousarray(windows[start : start + batch]))
                model.model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    tokens = windows.size
    mean = sums / tokens
    return LayerStatistics(mean[0].tolist(), mean[1].tolist(), mean[2].tolist(), tokens)


class TailRunner:
    """Runs the layers from `start` upward (then the final norm and LM head) on cached layer inputs, so that a
    search over one layer's setting does not recompute the unchanged layers below it."""

    def __init__(self, model: nn.Module, windows: np.ndarray, keep_from: int, batch: int = 4):
        self.model = model
        self.batch = batch
        ids = torch.from_numpy(np.ascontiguousarray(windows))
        self.targets = ids[:, 1:]
        t = ids.shape[1]
        self.mask = torch.full((t, t), float("-inf")).triu(1)[None, None]
        with torch.inference_mode():
            positions = torch.arange(t)[None]
            embeds = model.model.embed_tokens(ids[:1])
            self.position_embeddings = model.model.rotary_emb(embeds, positions)
            out = model.model(input_ids=ids, use_cache=False, output_hidden_states=True)
        #: hidden_states[l] is the input of layer l in the unpruned model
        self.inputs = {layer: h for layer, h in enumerate(out.hidden_states[:-1]) if layer >= keep_from}

    def nll(self, start: int) -> float:
        """Mean next-token NLL with the model's current layers from `start` on, from layer `start`'s input."""
        model, total = self.model, 0.0
        with torch.inference_mode():
            for b in range(0, len(self.targets), self.batch):
                h = self.inputs[start][b : b + self.batch]
                for layer in model.model.layers[start:]:
                    h = _first(
                        layer(h, attention_mask=self.mask, position_embeddings=self.position_embeddings)
                    )
                logits = model.lm_head(model.model.norm(h))[:, :-1].float()
                targets = self.targets[b : b + self.batch]
                loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
                total += float(loss) * targets.numel()
        return total / self.targets.numel()
