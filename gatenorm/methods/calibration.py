"""Calibration for the data-driven methods: held-out text windows, or text the model generates itself
(``synthetic``: no data at all, sampled by llama.cpp: `gatenorm.methods.synthetic`), and per-layer
statistics read by hooks on each decoder layer (one pass, no copy of the model or of its activations): on a
loaded transformers model, or a layer at a time on the layer-sequential engine (`gatenorm.sequential`),
which the methods use; HARP's tail runner likewise."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gatenorm.architectures import get_architecture
from gatenorm.errors import GatenormError
from gatenorm.plan import CalibrationRecord
from gatenorm.validate.text import WIKI_HELDOUT, hf_bos_id, hf_tokenize, token_windows

#: Calibration source: text sampled from the model itself (`gatenorm.methods.synthetic`), no external data.
SYNTHETIC = "synthetic"


@dataclass(frozen=True)
class Calibration:
    """Where calibration text comes from: ``wiki-heldout``, a UTF-8 file or ``synthetic`` (sampled from the
    model), `samples` windows of `length` tokens."""

    source: str
    samples: int = 16
    length: int = 256

    def __post_init__(self) -> None:
        if self.source == "wiki":
            raise GatenormError(
                f"--calib wiki is the evaluation text; calibrate on held-out text ({WIKI_HELDOUT} or a file)"
            )
        if self.source not in (WIKI_HELDOUT, SYNTHETIC) and not Path(self.source).is_file():
            raise GatenormError(f"no such calibration text file: {self.source}")
        if self.samples < 1 or self.length < 8:
            raise GatenormError(
                f"--calib-samples {self.samples} / --calib-len {self.length}: need >= 1 sample of >= 8 tokens"
            )

    def source_id(self) -> str:
        """The source as a plan records it: a name, or ``file:<sha256>`` of a text file."""
        if self.source in (WIKI_HELDOUT, SYNTHETIC):
            return self.source
        return "file:" + hashlib.sha256(Path(self.source).read_bytes()).hexdigest()

    def record(self, seed: int, model_path: str | Path | None = None) -> CalibrationRecord:
        """What a plan records of this calibration (`seed`: of the synthetic text, sampled from
        `model_path`)."""
        from gatenorm.methods.synthetic import sampler_id

        synthetic = self.source == SYNTHETIC
        return CalibrationRecord(
            source=self.source_id(),
            samples=self.samples,
            length=self.length,
            seed=seed if synthetic else None,
            generator=sampler_id(model_path) if synthetic else None,
        )

    def windows(
        self,
        tokenizer,
        model_path: str | Path | None = None,
        seed: int = 0,
        log: Callable[[str], None] = lambda _: None,
    ) -> np.ndarray:
        """Token ids [samples, length] of the text, BOS first when the tokenizer adds one (the
        ``synthetic`` text is sampled from `model_path` with `seed`: `gatenorm.methods.synthetic`)."""
        from gatenorm.methods.synthetic import synthetic_windows

        bos = hf_bos_id(tokenizer)
        if self.source == SYNTHETIC:
            if model_path is None:
                raise GatenormError("synthetic calibration text needs the model that generates it")
            return synthetic_windows(model_path, tokenizer, self.samples, self.length, bos, seed, log)
        return token_windows(
            self.source, hf_tokenize(tokenizer), self.length, self.samples * self.length, bos
        )


@dataclass
class LayerStatistics:
    """Per layer, means over calibration tokens: cos(X, X + Attn(norm X)) (attention cosine), cos(block input,
    block output) (ShortGPT), ||Attn(norm X)|| / ||X|| (the Gate-Norm paper's mechanism ratio), and for the
    attention linearized (HARP, `gatenorm.harp`) with output alpha * L, L = o_proj(repeat_kv(v_proj(norm X))):
    the least-squares alpha = sum <L, Attn> / sum ||L||^2 and cos(X + Attn, X + alpha * L) at that alpha."""

    attention_cosine: list[float]
    block_cosine: list[float]
    attention_ratio: list[float]
    linear_alpha: list[float]
    linear_cosine: list[float]
    tokens: int


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _first(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.double(), b.double()
    return _dot(a, b) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-30)


class _LinearFit:
    """Per-token dot products from which cos(X + A, X + alpha L) follows for any alpha, so the least-squares
    alpha (known only after the last token) and the cosine at it come out of one pass."""

    def __init__(self) -> None:
        self.parts: list[torch.Tensor] = []  # rows: <f,x>, <f,L>, |f|^2, |x|^2, <x,L>, |L|^2, <A,L>

    def add(self, x: torch.Tensor, attn: torch.Tensor, lin: torch.Tensor) -> None:
        x, attn, lin = x.double(), attn.double(), lin.double()
        f = x + attn
        pairs = ((f, x), (f, lin), (f, f), (x, x), (x, lin), (lin, lin), (attn, lin))
        self.parts.append(torch.stack([_dot(a, b).reshape(-1) for a, b in pairs]))

    def result(self) -> tuple[float, float]:
        """(alpha, mean cosine at alpha)."""
        fx, fl, ff, xx, xl, ll, al = torch.cat(self.parts, dim=1)
        alpha = float(al.sum() / ll.sum().clamp_min(1e-300))
        norm = (xx + 2 * alpha * xl + alpha**2 * ll).clamp_min(0).sqrt() * ff.sqrt()
        return alpha, float(((fx + alpha * fl) / norm.clamp_min(1e-30)).mean())


def _value_output(attn: nn.Module, arch, normed: torch.Tensor) -> torch.Tensor:
    """o_proj(repeat_kv(v_proj(normed))), biases included: the linearized attention at alpha 1, computed
    through the layer's own projection weights (no d x d product is formed)."""
    config = attn.config
    v_w, v_b, o_w, o_b = arch.value_output(attn)
    v = nn.functional.linear(normed, v_w, v_b).unflatten(-1, (config.num_key_value_heads, -1))
    v = v.repeat_interleave(config.num_attention_heads // config.num_key_value_heads, dim=-2)
    return nn.functional.linear(v.flatten(-2), o_w, o_b)


class _StatisticHooks:
    """The hooks of `layer_statistics` on one decoder layer at a time: around the layer, its attention and
    the attention's input; sums over tokens kept per layer index."""

    def __init__(self, arch, n: int):
        self.arch = arch
        self.sums = np.zeros((3, n))
        self.fits = [_LinearFit() for _ in range(n)]

    def attach(self, i: int, layer: nn.Module) -> Callable[[], None]:
        """Hook decoder layer `i` (a stock transformers layer); returns what removes the hooks."""
        arch, sums, fits = self.arch, self.sums, self.fits
        p = arch.layer_parts(layer)
        seen: dict[str, torch.Tensor] = {}

        def before_layer(_module, args, kwargs):
            seen["input"] = _hidden(args, kwargs)

        def before_attention(_module, args, kwargs):
            seen["normed"] = _hidden(args, kwargs)

        def after_attention(_module, _args, output):
            x, a = seen["input"], arch.attention_update(p, _first(output))
            sums[0, i] += float(_cosine(x, x + a).sum())
            ratio = a.double().norm(dim=-1) / x.double().norm(dim=-1).clamp_min(1e-30)
            sums[2, i] += float(ratio.sum())
            fits[i].add(x, a, arch.attention_update(p, _value_output(p.attention, arch, seen.pop("normed"))))

        def after_layer(_module, _args, _kwargs, output):
            sums[1, i] += float(_cosine(seen.pop("input"), _first(output)).sum())

        handles = [
            layer.register_forward_pre_hook(before_layer, with_kwargs=True),
            p.attention.register_forward_pre_hook(before_attention, with_kwargs=True),
            p.attention.register_forward_hook(after_attention),
            layer.register_forward_hook(after_layer, with_kwargs=True),
        ]

        def remove() -> None:
            for h in handles:
                h.remove()

        return remove

    def result(self, tokens: int) -> LayerStatistics:
        mean = self.sums / tokens
        alpha, cosine = zip(*(fit.result() for fit in self.fits), strict=True)
        cosines, blocks, ratios = (row.tolist() for row in mean)
        return LayerStatistics(cosines, blocks, ratios, list(alpha), list(cosine), tokens)


def layer_statistics(model: nn.Module, windows: np.ndarray, batch: int = 4) -> LayerStatistics:
    """One pass of the unpruned, loaded `model` over `windows` [n, T], hooks around each layer, its
    attention and the attention's input. The attention's output A is what it adds to the residual stream
    (after the family's post-attention norm and residual multiplier), and so is L. (A checkpoint too big to
    load: `sequential_layer_statistics`.)"""
    arch = get_architecture(model.config.model_type)
    layers = arch.decoder_layers(model)
    hooks = _StatisticHooks(arch, len(layers))
    removers = [hooks.attach(i, layer) for i, layer in enumerate(layers)]
    try:
        with torch.inference_mode():
            for start in range(0, len(windows), batch):
                ids = torch.from_numpy(np.ascontiguousarray(windows[start : start + batch]))
                model.model(input_ids=ids, use_cache=False)
    finally:
        for remove in removers:
            remove()
    return hooks.result(windows.size)


def sequential_layer_statistics(model, windows: np.ndarray, batch: int = 4) -> LayerStatistics:
    """`layer_statistics` of a `gatenorm.sequential.SequentialModel`: the same hooks, one layer built,
    run over every window and freed at a time."""
    hooks = _StatisticHooks(model.arch, model.n_layers)
    model.forward(windows, batch=batch, around=hooks.attach)
    return hooks.result(windows.size)


def direct_layer_inputs(model: nn.Module, ids: torch.Tensor) -> tuple[list[torch.Tensor], list[dict]]:
    """What calling `model`'s decoder layers one by one on windows like `ids` [n, T] needs: per layer an
    additive attention mask (causal, within the layer's sliding window if it has one) and the keyword
    arguments (position embeddings) it takes."""
    arch = get_architecture(model.config.model_type)
    t = ids.shape[1]
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    masks = []
    for layer in arch.decoder_layers(model):
        attention = getattr(layer, arch.hf_attention_module, None)  # none in a pruned layer
        window = None if attention is None else arch.sliding_window(attention, model.config)
        allowed = (j <= i) & (j > i - window) if window else j <= i
        masks.append(torch.zeros(t, t).masked_fill(~allowed, float("-inf"))[None, None])
    with torch.inference_mode():
        embeds = model.model.embed_tokens(ids[:1])
        kwargs = arch.layer_kwargs(model, embeds, torch.arange(t)[None])
    return masks, kwargs


class TailRunner:
    """Runs the layers from `start` upward (then the final norm and LM head) on cached layer inputs, so that a
    search over one layer's setting does not recompute the unchanged layers below it. `layers` are the
    model's decoder layers: a search swaps a layer there for its candidate module."""

    def __init__(self, model: nn.Module, windows: np.ndarray, keep_from: int, batch: int = 4):
        self.model = model
        self.arch = get_architecture(model.config.model_type)
        self.layers = self.arch.decoder_layers(model)
        self.n_layers = len(self.layers)
        self.batch = batch
        ids = torch.from_numpy(np.ascontiguousarray(windows))
        self.targets = ids[:, 1:]
        self.masks, self.layer_kwargs = direct_layer_inputs(model, ids)
        with torch.inference_mode():
            out = model.model(input_ids=ids, use_cache=False, output_hidden_states=True)
        #: hidden_states[l] is the input of layer l in the unpruned model
        self.inputs = {layer: h for layer, h in enumerate(out.hidden_states[:-1]) if layer >= keep_from}

    def _call(self, index: int, b: int, h: torch.Tensor) -> torch.Tensor:
        return _first(self.layers[index](h, attention_mask=self.masks[index], **self.layer_kwargs[index]))

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.arch.logits(self.model, h)

    def nll(self, start: int) -> float:
        """Mean next-token NLL with the current `layers` from `start` on, from layer `start`'s input."""
        total = 0.0
        with torch.inference_mode():
            for b, first in enumerate(range(0, len(self.targets), self.batch)):
                h = self.inputs[start][first : first + self.batch]
                for index in range(start, self.n_layers):
                    h = self._call(index, b, h)
                logits = self._logits(h)[:, :-1].float()
                targets = self.targets[first : first + self.batch]
                loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
                total += float(loss) * targets.numel()
        return total / self.targets.numel()


class SequentialTailRunner(TailRunner):
    """`TailRunner` of a `gatenorm.sequential.SequentialModel`: one layer-at-a-time pass below `keep_from`
    caches each tail layer's input, and the tail layers (and the LM head) stay built while it is open
    (`close` frees them), so the layers below are never held."""

    def __init__(self, model, windows: np.ndarray, keep_from: int, batch: int = 4):
        self.model, self.arch, self.batch, self.n_layers = model, model.arch, batch, model.n_layers
        self.inputs: dict[int, torch.Tensor] = {}
        self.layers: dict[int, nn.Module] = {}
        state = model.embed(windows, batch)
        self.targets = state.ids[:, 1:]
        self._state = state
        for i in range(model.n_layers):
            layer = model.build(i)
            if i >= keep_from:
                self.inputs[i] = state.hidden.clone()
                self.layers[i] = layer
            state.run(layer, i)
            if i < keep_from:
                model.release(i)
        state.hidden = torch.empty(0)
        self._head = model.head()
        self._head.__enter__()

    def _call(self, index: int, b: int, h: torch.Tensor) -> torch.Tensor:
        return self._state.call(self.layers[index], index, b, h)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.logits(h)

    def close(self) -> None:
        """Free the tail layers and the LM head."""
        self._head.__exit__(None, None, None)
        for i in self.layers:
            self.model.release(i)
        self.layers, self.inputs = {}, {}
