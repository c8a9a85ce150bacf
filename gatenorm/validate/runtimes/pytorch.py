"""PyTorch through transformers: HF folders (and GGUFs, dequantized, when asked), plans applied on load."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gatenorm.plan import Plan
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

        from gatenorm.apply import apply_plan, load_model, load_tokenizer

        torch.set_num_threads(threads)
        self.path = path
        self.model = load_model(path)
        if plan is not None:
            apply_plan(self.model, Plan.load(plan))
        self.tokenizer = load_tokenizer(path)
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self.max_len = int(getattr(self.model.config, "max_position_embeddings", 2048) or 2048)
        self.max_context = self.max_len
        self._set_bos()

    def batch_logits(self, ids: np.ndarray, keep: int) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = self.model(torch.from_numpy(ids), use_cache=False, logits_to_keep=keep)
        return out.logits.float().numpy()

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
