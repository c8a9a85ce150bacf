"""Runtimes that run a model for validation: one adapter per format, picked from the file type.

Every runtime answers the same few questions on the same token ids: logits of text windows, log-likelihoods
of (context, continuation) pairs, and timed greedy generation. Adapters that can only compute logits of a
right-padded batch plus prefill/decode (PyTorch, onnxruntime) subclass `BatchLogitsRuntime`.
"""

from __future__ import annotations

import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from gatenorm.errors import GatenormError
from gatenorm.models import resolve_model
from gatenorm.plan import Plan
from gatenorm.readers.gguf_file import is_gguf

#: A log-likelihood request: context token ids, continuation token ids.
Request = tuple[list[int], list[int]]


@dataclass(frozen=True)
class ModelSpec:
    """What to run: a model path, the runtime to run it with, and an optional plan to apply (PyTorch only)."""

    path: Path
    runtime: str
    plan: Path | None = None

    @property
    def label(self) -> str:
        suffix = f" + {self.plan.name}" if self.plan else ""
        return f"{self.path.name}{suffix} [{self.runtime}]"


@dataclass(frozen=True)
class Timing:
    """One timed greedy generation: seconds to the first new token, seconds in all, tokens generated, and
    the bytes of the KV cache the runtime holds at the end (None where it cannot tell)."""

    first_token_s: float
    total_s: float
    n_new: int
    kv_bytes: int | None = None


@runtime_checkable
class Runtime(Protocol):
    """A loaded model that the validator can score and time."""

    name: str
    path: Path
    vocab_size: int
    #: BOS id that this model's tokenizer puts first, or None when it adds none.
    bos_id: int | None

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text`, without special tokens."""

    def window_logits(self, windows: np.ndarray, first: int) -> Iterator[np.ndarray]:
        """For each row of `windows` [n, T], float32 logits [T-1-first, vocab] at positions first..T-2."""

    def loglikelihoods(self, requests: Sequence[Request]) -> list[tuple[float, bool]]:
        """Per request: sum of log p(continuation | context) and whether greedy decoding reproduces it."""

    def generate(self, prompt: list[int], n_new: int) -> Timing:
        """Greedy-generate exactly `n_new` tokens after `prompt`, timed."""

    def close(self) -> None:
        """Free the model."""


def continuation_scores(logits: np.ndarray, continuation: Sequence[int]) -> tuple[float, bool]:
    """Sum of log-softmax(logits)[i, continuation[i]] and whether every continuation token is the argmax."""
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    logz = np.log(np.exp(shifted).sum(axis=-1))
    idx = np.arange(len(continuation))
    cont = np.asarray(continuation)
    logprob = float((shifted[idx, cont] - logz).sum())
    greedy = bool((logits.argmax(axis=-1) == cont).all())
    return logprob, greedy


def truncate_left(ctx: list[int], cont: list[int], max_len: int) -> tuple[list[int], list[int]]:
    """Drop context tokens from the left so that context + continuation fit in `max_len` (as lm-eval does)."""
    if len(cont) >= max_len:
        raise GatenormError(f"a continuation of {len(cont)} tokens does not fit a context of {max_len}")
    over = len(ctx) + len(cont) - max_len
    return (ctx[over:] if over > 0 else ctx), cont


class BatchLogitsRuntime(ABC):
    """A runtime built on one primitive: logits of a right-padded batch of token ids."""

    name: str
    path: Path
    vocab_size: int
    bos_id: int | None
    #: Upper bounds of one batch: tokens in (rows x length) and float32 logits out (rows x kept x vocab).
    max_batch_tokens = 4096
    max_batch_logits = 2048 * 49152
    max_len = 2048

    #: a transformers tokenizer (the adapters here all ship one); override `tokenize` otherwise
    tokenizer: object

    @abstractmethod
    def batch_logits(self, ids: np.ndarray, keep: int) -> np.ndarray:
        """float32 logits [B, keep, vocab] at the last `keep` positions of int64 ids [B, T]."""

    @abstractmethod
    def prefill(self, prompt: list[int]) -> tuple[object, np.ndarray]:
        """Run `prompt` with a KV cache: (decoding state, logits [vocab] of its last position)."""

    @abstractmethod
    def decode(self, state: object, token: int) -> np.ndarray:
        """Feed one token after `state` (updated in place or returned anew): logits [vocab]."""

    @abstractmethod
    def state_bytes(self, state: object) -> int:
        """Bytes of the KV cache tensors held in a decoding `state`."""

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def _set_bos(self) -> None:
        """BOS is the tokenizer's when encoding with special tokens puts it first."""
        probe = self.tokenizer("a").input_ids
        bos = self.tokenizer.bos_token_id
        self.bos_id = bos if bos is not None and probe and probe[0] == bos else None

    def generate(self, prompt: list[int], n_new: int) -> Timing:
        start = time.perf_counter()
        state, logits = self.prefill(prompt)
        token = int(np.argmax(logits))
        first = time.perf_counter() - start
        for _ in range(n_new - 1):
            token = int(np.argmax(self.decode(state, token)))
        return Timing(first, time.perf_counter() - start, n_new, self.state_bytes(state))

    def window_logits(self, windows: np.ndarray, first: int) -> Iterator[np.ndarray]:
        t = windows.shape[1]
        for row in windows:
            yield self.batch_logits(row[None, :].astype(np.int64), t - first)[0, :-1]

    def loglikelihoods(self, requests: Sequence[Request]) -> list[tuple[float, bool]]:
        fitted = [truncate_left(list(c), list(k), self.max_len) for c, k in requests]
        order = sorted(range(len(fitted)), key=lambda i: -(len(fitted[i][0]) + len(fitted[i][1])))
        out: list[tuple[float, bool]] = [(0.0, False)] * len(fitted)
        start = 0
        while start < len(order):
            t = len(fitted[order[start]][0]) + len(fitted[order[start]][1])
            batch = [order[start]]
            keep = len(fitted[order[start]][1]) + 1
            for i in order[start + 1 :]:
                ctx, cont = fitted[i]
                k = max(keep, t - len(ctx) + 1)
                if (len(batch) + 1) * t > self.max_batch_tokens or (
                    (len(batch) + 1) * k * self.vocab_size > self.max_batch_logits
                ):
                    break
                batch.append(i)
                keep = k
            ids = np.zeros((len(batch), t), dtype=np.int64)
            for row, i in enumerate(batch):
                seq = fitted[i][0] + fitted[i][1]
                ids[row, : len(seq)] = seq
            logits = self.batch_logits(ids, keep)
            for row, i in enumerate(batch):
                ctx, cont = fitted[i]
                lo = len(ctx) - 1 - (t - keep)  # logits index predicting the first continuation token
                out[i] = continuation_scores(logits[row, lo : lo + len(cont)], cont)
            start += len(batch)
        return out

    def close(self) -> None:  # noqa: B027 - nothing to free unless a subclass says so
        """Free the model (a no-op unless the subclass holds native resources)."""


class TorchRuntime(BatchLogitsRuntime):
    """PyTorch through transformers: an HF folder or a GGUF (dequantized to fp32), optionally with a plan."""

    name = "torch"

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


class OnnxRuntime(BatchLogitsRuntime):
    """onnxruntime: a folder exported by gatenorm's ONNX exporter (model.onnx, its JSON config, tokenizer)."""

    name = "onnx"
    max_batch_tokens = 1024  # the runner returns logits of every position

    def __init__(self, path: Path, threads: int = 2, **_: object):
        try:
            from exporters.onnx.runner import OnnxRunner
        except ImportError as e:
            raise GatenormError(
                f"the onnx runtime needs gatenorm's ONNX exporter and onnxruntime ({e})"
            ) from None
        self.path = path
        self.runner = OnnxRunner(path, threads=threads)
        self.tokenizer = self.runner.tokenizer
        self.vocab_size = int(self.runner.logits(np.zeros((1, 1), dtype=np.int64)).shape[-1])
        self.max_context = _onnx_max_context(path)
        self.max_len = self.max_context or self.max_len
        self._set_bos()

    def batch_logits(self, ids: np.ndarray, keep: int) -> np.ndarray:
        return self.runner.logits(ids)[:, -keep:]

    def prefill(self, prompt: list[int]) -> tuple[object, np.ndarray]:
        state = self.runner.prefill(np.asarray([prompt], dtype=np.int64))
        return state, state.logits[0]

    def decode(self, state: object, token: int) -> np.ndarray:
        return self.runner.decode(state, [token])[0]

    def state_bytes(self, state: object) -> int:
        """The present tensors onnxruntime returned last (kept layers only)."""
        return sum(int(np.prod(v.shape())) * np.dtype(self.runner._kv_dtype).itemsize for v in state.past)


def _onnx_max_context(path: Path) -> int | None:
    """max_position_embeddings of the model's config.json beside the ONNX file, if there is one."""
    import json

    for name in ("config.json", "gatenorm_onnx.json"):
        try:
            value = json.loads((path / name).read_text()).get("max_position_embeddings")
        except (OSError, ValueError, AttributeError):
            continue
        if value:
            return int(value)
    return None


class LlamaCppRuntime:
    """llama.cpp through llama-cpp-python: a GGUF file, logits of every position, flash attention on (off
    in llama-cpp-python's default; without it a layer whose attention was dropped still holds a V cache)."""

    name = "llama.cpp"

    def __init__(self, path: Path, threads: int = 2, n_ctx: int = 2048, flash_attn: bool = True, **_: object):
        from llama_cpp import Llama

        from gatenorm.readers.gguf_check import check_gguf

        check_gguf(path)  # llama.cpp aborts the process on some corrupt headers
        self.path = path
        self.n_ctx = n_ctx
        try:
            self.llm = Llama(
                str(path),
                n_ctx=n_ctx,
                n_batch=min(n_ctx, 512),
                logits_all=True,
                n_threads=threads,
                n_threads_batch=threads,
                flash_attn=flash_attn,
                verbose=False,
            )
        except ValueError as e:
            raise GatenormError(f"llama.cpp cannot load {path}: {e}") from None
        self.vocab_size = int(self.llm.n_vocab())
        self.max_context = int(self.llm._model.n_ctx_train()) or None
        bos = self.llm.tokenize(b"", add_bos=True)
        self.bos_id = bos[0] if bos else None

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=False, special=False)

    def _eval(self, tokens: Sequence[int], n_past: int, all_logits: bool) -> np.ndarray | None:
        """Evaluate `tokens` after the first `n_past` cached positions. With `all_logits` their logits land in
        ``llm.scores[n_past:]``; without, only the last position's logits are computed, and returned."""
        llm = self.llm
        if n_past + len(tokens) > self.n_ctx:
            raise GatenormError(f"{n_past + len(tokens)} tokens exceed llama.cpp's context of {self.n_ctx}")
        llm.n_tokens = n_past
        saved, llm._logits_all = llm._logits_all, all_logits  # llama-cpp-python reads this flag per eval
        try:
            llm.eval(tokens)
        finally:
            llm._logits_all = saved
        if all_logits:
            return None
        return np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(self.vocab_size,)).copy()

    def window_logits(self, windows: np.ndarray, first: int) -> Iterator[np.ndarray]:
        """The first half of a window runs without logits (they are not scored)."""
        t = windows.shape[1]
        for row in windows:
            tokens = [int(x) for x in row]
            self._eval(tokens[:first], 0, all_logits=False)
            self._eval(tokens[first:], first, all_logits=True)
            yield self.llm.scores[first : t - 1].copy()

    def loglikelihoods(self, requests: Sequence[Request]) -> list[tuple[float, bool]]:
        """Reuses the KV cache of the longest prefix shared with the previous request (choices share their
        context) and computes logits only where the continuation is scored."""
        out = []
        held: list[int] = []  # the tokens in the KV cache
        head_ctx: list[int] | None = None  # the last context evaluated, and the logits of its last token
        head = np.empty(0)
        for ctx, cont in requests:
            ctx, cont = truncate_left(list(ctx), list(cont), self.n_ctx)
            if ctx != head_ctx:  # a new context: evaluate what the cache lacks of it
                common = 0
                for a, b in zip(held, ctx, strict=False):
                    if a != b:
                        break
                    common += 1
                reuse = min(common, len(ctx) - 1)  # at least the last context token, for its logits
                head, head_ctx = self._eval(ctx[reuse:], reuse, all_logits=False), ctx
            # The same context reuses its logits rather than re-running its last token alone: llama.cpp's
            # numerics depend on the batch shape, and all choices of a question must see the same context.
            rows = [head[None]]
            if len(cont) > 1:
                self._eval(cont[:-1], len(ctx), all_logits=True)
                rows.append(self.llm.scores[len(ctx) : len(ctx) + len(cont) - 1])
            held = ctx + cont[:-1]
            out.append(continuation_scores(np.concatenate(rows), cont))
        return out

    def generate(self, prompt: list[int], n_new: int) -> Timing:
        """Logits of the last position only, as in serving."""
        if len(prompt) + n_new > self.n_ctx:
            raise GatenormError(f"{len(prompt) + n_new} tokens exceed llama.cpp's context of {self.n_ctx}")
        start = time.perf_counter()
        token = int(self._eval(prompt, 0, all_logits=False).argmax())
        first = time.perf_counter() - start
        for i in range(n_new - 1):
            token = int(self._eval([token], len(prompt) + i, all_logits=False).argmax())
        return Timing(first, time.perf_counter() - start, n_new, self.kv_bytes())

    def kv_bytes(self) -> int:
        """Bytes of the KV cache of sequence 0 as llama.cpp serializes it (llama_state_seq_get_size: the
        cached cells' K and V rows of every layer that has a cache, plus a few bytes of cell metadata)."""
        import llama_cpp

        return int(llama_cpp.llama_state_seq_get_size(self.llm._ctx.ctx, 0))

    def close(self) -> None:
        self.llm.close()


#: runtime name -> constructor(path, plan=..., threads=..., n_ctx=...); a new runtime is one more entry.
RUNTIMES: dict[str, Callable[..., Runtime]] = {
    "torch": TorchRuntime,
    "llama.cpp": LlamaCppRuntime,
    "onnx": OnnxRuntime,
}


def is_onnx_folder(path: Path) -> bool:
    """A gatenorm ONNX export (``gatenorm_onnx.json``; ``onnx/model*.onnx`` or, written by older versions,
    ``model.onnx``)."""
    return path.is_dir() and ((path / "gatenorm_onnx.json").is_file() or (path / "model.onnx").is_file())


def detect_runtime(path: Path, plan: Path | None = None) -> str:
    """The default runtime of a model: torch for HF folders (and any model with a plan), llama.cpp for GGUF
    files, onnx for gatenorm ONNX export folders."""
    if plan is not None:
        return "torch"
    if is_onnx_folder(path):
        return "onnx"
    if path.is_file() and (path.suffix == ".gguf" or is_gguf(path)):
        return "llama.cpp"
    if path.is_dir() and (path / "config.json").is_file():
        return "torch"
    raise GatenormError(
        f"cannot tell how to run {path}: expected a .gguf file, an HF folder or an ONNX folder"
    )


def model_spec(model: str, runtime: str | None = None, plan: Path | None = None) -> ModelSpec:
    """Resolve a model argument (path or shipped alias) and its runtime (`runtime` None or 'auto': detect)."""
    path = resolve_model(model)
    if not path.exists():
        raise GatenormError(f"no such file or folder: {path}")
    if plan is not None and not plan.is_file():
        raise GatenormError(f"no such plan file: {plan}")
    name = detect_runtime(path, plan) if runtime in (None, "auto") else runtime
    if name not in RUNTIMES:
        raise GatenormError(f"unknown runtime {name!r} (choose from auto, {', '.join(RUNTIMES)})")
    if plan is not None and name != "torch":
        raise GatenormError(f"a plan can only be applied in the torch runtime, not {name}")
    if name == "llama.cpp" and not path.is_file():
        raise GatenormError(f"llama.cpp runs GGUF files; {path} is a folder")
    return ModelSpec(path, name, plan)


def open_runtime(spec: ModelSpec, threads: int = 2, n_ctx: int = 2048, flash_attn: bool = True) -> Runtime:
    """Load the model of `spec` in its runtime (`flash_attn`: llama.cpp only)."""
    threads = threads or os.cpu_count() or 1
    return RUNTIMES[spec.runtime](
        spec.path, plan=spec.plan, threads=threads, n_ctx=n_ctx, flash_attn=flash_attn
    )
