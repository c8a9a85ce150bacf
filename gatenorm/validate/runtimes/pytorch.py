"""PyTorch through transformers: HF folders (and GGUFs, dequantized, when asked), plans applied on load."""

from __future__ import annotations

import copy
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from gatenorm.plan import Plan
from gatenorm.sequential import SequentialModel
from gatenorm.validate.runtimes.base import (
    CAN,
    DEFAULT,
    NO,
    REQUIRED,
    BatchLogitsRuntime,
    Request,
    continuation_scores,
    register_runtime,
)
from gatenorm.validate.text import windows_sha256

#: open torch runtimes: one layer-at-a-time pass serves every one of the same checkpoint
_OPEN: weakref.WeakSet = weakref.WeakSet()


#: the engine of each checkpoint open in a torch runtime (by resolved path), shared by its runtimes
_ENGINES: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def _engine(ckpt, plan: Plan | None) -> SequentialModel:
    """The engine of `ckpt`; a recovered plan reads its merged weights, so it gets an engine of its own."""
    recovered = plan is not None and plan.recovery is not None
    key = str(Path(ckpt.path).resolve()) + (f"#{plan.recovery.weights}" if recovered else "")
    engine = _ENGINES.get(key)
    if engine is None:
        engine = _ENGINES[key] = SequentialModel(ckpt, plan if recovered else None)
    return engine


@register_runtime
class TorchRuntime(BatchLogitsRuntime):
    """PyTorch through transformers: an HF folder or a GGUF (dequantized to fp32), optionally with a plan."""

    name = "torch"
    applies_plans = True

    @classmethod
    def claim(cls, path: Path, plan: Path | None) -> int:
        """Required for a plan, the default for an HF folder; it can also run a GGUF (dequantized)."""
        if plan is not None:
            return REQUIRED
        if path.is_dir() and (path / "config.json").is_file():
            return DEFAULT
        return CAN if path.is_file() else NO

    @classmethod
    def refusal(cls, path: Path) -> str | None:
        return None

    def __init__(self, path: Path, plan: Path | None = None, threads: int = 2, **_: object):
        import torch

        from gatenorm.apply import load_tokenizer
        from gatenorm.readers import open_checkpoint

        torch.set_num_threads(threads)
        self.path = path
        self.plan = None if plan is None else Plan.load(plan)
        ckpt = open_checkpoint(path)
        #: window logits (the agreement) run a layer at a time; a deci GGUF (gatenorm's own loader) and
        #: the rest (zero-shot, retrieval, latency) use the whole model, loaded on first use
        self.engine = None if ckpt.arch.name == "deci" else _engine(ckpt, self.plan)
        self._model = None
        self._final: dict[str, object] = {}  # windows -> last hidden states a shared pass left here
        self._served: set[str] = set()
        self.tokenizer = load_tokenizer(path)
        config = self.engine.config if self.engine is not None else self.model.config
        self.vocab_size = self.engine.vocab_size if self.engine is not None else self._whole_vocab()
        self.max_len = int(getattr(config, "max_position_embeddings", 2048) or 2048)
        self.max_context = self.max_len
        self._set_bos()
        _OPEN.add(self)

    @property
    def model(self):
        """The whole model (float32), the plan applied, loaded on first use."""
        if self._model is None:
            from gatenorm.apply import apply_plan, load_model

            self._model = load_model(self.path)
            if self.plan is not None:
                apply_plan(self._model, self.plan)
        return self._model

    @model.setter
    def model(self, model) -> None:
        self._model = model

    def _whole_vocab(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    def window_logits(self, windows: np.ndarray, first: int) -> Iterator[np.ndarray]:
        """Layer at a time: every window through each layer, which is read once for this runtime and every
        other open torch runtime of the same checkpoint (the reference and the candidate of a validation),
        then the LM head window by window."""
        if self.engine is None or self._model is not None:
            yield from super().window_logits(windows, first)
            return
        key = windows_sha256(windows)
        if key not in self._final:
            peers = [self] + [rt for rt in _OPEN if rt is not self and rt._waits_for(self, key)]
            states = self.engine.forward_many(windows, [rt.plan for rt in peers])
            for rt, state in zip(peers, states, strict=True):
                rt._final[key] = state.hidden
        hidden = self._final.pop(key)
        self._served.add(key)
        yield from self.engine.window_logits(hidden, first)

    def with_plan(self, plan: Plan) -> TorchRuntime:
        """This runtime's model as `plan` makes it: a new runtime sharing the checkpoint, its layer-at-a-time
        engine and tokenizer (no copy of a model)."""
        other = copy.copy(self)
        other.plan, other._model, other._final, other._served = plan, None, {}, set()
        _OPEN.add(other)
        return other

    def _waits_for(self, other: TorchRuntime, key: str) -> bool:
        """Whether a pass of `other` over windows `key` should serve this runtime too: same engine, not
        switched to the whole model, and not served these windows yet."""
        return (
            self.engine is other.engine
            and self._model is None
            and key not in self._final
            and key not in self._served
        )

    def batch_logits(self, ids: np.ndarray, keep: int) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = self.model(torch.from_numpy(ids), use_cache=False, logits_to_keep=keep)
        return out.logits.float().numpy()

    def close(self) -> None:
        _OPEN.discard(self)
        self._final.clear()
        self._served.clear()
        self._model = None

    def loglikelihoods(self, requests: Sequence[Request]) -> list[tuple[float, bool]]:
        """Adjacent requests with the same context (the choices of one question) run the context once and
        the continuations as one batch on copies of its KV cache; the rest go through padded batches."""
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        singles: list[int] = []
        start = 0
        while start < len(requests):
            end = start + 1
            while end < len(requests) and list(requests[end][0]) == list(requests[start][0]):
                end += 1
            ctx = list(requests[start][0])
            conts = [list(requests[i][1]) for i in range(start, end)]
            if end - start > 1 and len(ctx) + max(map(len, conts)) <= self.max_len:
                out[start:end] = self._shared_context(ctx, conts)
            else:
                singles.extend(range(start, end))
            start = end
        for i, result in zip(singles, super().loglikelihoods([requests[i] for i in singles]), strict=True):
            out[i] = result
        return out  # type: ignore[return-value]

    def _shared_context(self, ctx: list[int], conts: list[list[int]]) -> list[tuple[float, bool]]:
        import torch

        with torch.inference_mode():
            head = self.model(torch.tensor([ctx]), use_cache=True, logits_to_keep=1)
            cache = head.past_key_values
            cache.batch_repeat_interleave(len(conts))
            ids = torch.zeros((len(conts), max(map(len, conts))), dtype=torch.long)
            for row, cont in enumerate(conts):
                ids[row, : len(cont)] = torch.tensor(cont)
            tail = self.model(ids, past_key_values=cache, use_cache=True).logits.float().numpy()
        last_ctx = head.logits[0, -1:].float().numpy()
        return [
            continuation_scores(np.concatenate([last_ctx, tail[row, : len(cont) - 1]]), cont)
            for row, cont in enumerate(conts)
        ]

    def prefill(self, prompt: list[int]) -> tuple[list, np.ndarray]:
        import torch

        with torch.inference_mode():
            out = self.model(torch.tensor([prompt]), use_cache=True, logits_to_keep=1)
        return [out.past_key_values], out.logits[0, -1].float().numpy()

    def decode(self, state: list, token: int) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = self.model(torch.tensor([[token]]), past_key_values=state[0], use_cache=True)
        state[0] = out.past_key_values
        return out.logits[0, -1].float().numpy()

    def state_bytes(self, state: list) -> int:
        """The cache's key and value tensors (a layer whose attention was dropped holds none)."""
        cache = state[0]
        tensors = [t for layer in getattr(cache, "layers", []) for t in (layer.keys, layer.values)]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None and hasattr(t, "numel"))
