"""What a validation runtime is, and the table of them: every runtime module (`pytorch`, `llamacpp`, `ort`)
declares its class with `@register_runtime`, saying which paths it claims (`claim`), and the validator
picks the runtime that claims a model most strongly.

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
from typing import ClassVar, Protocol, runtime_checkable

import numpy as np

from gatenorm.errors import GatenormError
from gatenorm.models import resolve_model
from gatenorm.validate.text import hf_bos_id, hf_tokenize

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
        return hf_tokenize(self.tokenizer)(text)

    def _set_bos(self) -> None:
        """BOS is the tokenizer's when encoding with special tokens puts it first."""
        self.bos_id = hf_bos_id(self.tokenizer)

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


#: How strongly a runtime claims a path: not at all, runs it when asked, runs it by default, runs it over
#: another default (an ONNX folder also holds an HF config.json), the only one that can (a plan to apply).
#: The validator runs a model in the strongest claimant.
NO, CAN, DEFAULT, PREFERRED, REQUIRED = 0, 1, 2, 3, 4


@runtime_checkable
class RuntimeClass(Protocol):
    """What a registered runtime class declares besides the `Runtime` methods."""

    name: ClassVar[str]
    #: applies a plan file to the model it loads (`--candidate-plan`)
    applies_plans: ClassVar[bool]

    @classmethod
    def claim(cls, path: Path, plan: Path | None) -> int:
        """NO, CAN, DEFAULT, PREFERRED or REQUIRED (see above)."""

    @classmethod
    def refusal(cls, path: Path) -> str | None:
        """Why it cannot run `path` (one line), or None."""


#: runtime name -> class; `register_runtime` adds one. The runtime modules are imported by the package.
RUNTIMES: dict[str, Callable[..., Runtime]] = {}


def register_runtime(cls):
    """Class decorator: add a runtime (its `name`, `claim`, `refusal`, `applies_plans`) to `RUNTIMES`."""
    if cls.name in RUNTIMES:
        raise GatenormError(f"runtime {cls.name!r} is registered twice")
    RUNTIMES[cls.name] = cls
    return cls


def unregister_runtime(name: str) -> None:
    """Remove a runtime (tests that register a throw-away one)."""
    RUNTIMES.pop(name, None)


def detect_runtime(path: Path, plan: Path | None = None) -> str:
    """The default runtime of a model: the registered runtime that claims it most strongly (torch for HF
    folders and any model with a plan, llama.cpp for GGUF files, onnx for gatenorm ONNX export folders)."""
    claims = {name: cls.claim(path, plan) for name, cls in RUNTIMES.items()}
    best = max(claims, key=claims.__getitem__, default=None)
    if best is not None and claims[best] >= DEFAULT:
        return best
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
    runtime_class = RUNTIMES[name]
    if plan is not None and not runtime_class.applies_plans:
        appliers = ", ".join(n for n, c in RUNTIMES.items() if c.applies_plans)
        raise GatenormError(f"a plan can only be applied in the {appliers} runtime, not {name}")
    if (why := runtime_class.refusal(path)) is not None:
        raise GatenormError(why)
    return ModelSpec(path, name, plan)


def open_runtime(
    spec: ModelSpec, threads: int = 2, n_ctx: int = 2048, flash_attn: bool = True, timing: bool = False
) -> Runtime:
    """Load the model of `spec` in its runtime (`flash_attn`: llama.cpp only). With `timing`, exactly as
    the runtime's users load it, whatever that costs in memory (llama.cpp: its repacked weights)."""
    threads = threads or os.cpu_count() or 1
    return RUNTIMES[spec.runtime](
        spec.path, plan=spec.plan, threads=threads, n_ctx=n_ctx, flash_attn=flash_attn, timing=timing
    )
