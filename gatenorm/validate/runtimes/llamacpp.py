"""llama.cpp through llama-cpp-python: GGUF files (also the `deci` GGUFs of pruned exports)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from gatenorm.errors import GatenormError
from gatenorm.llamacpp import weights_in_place
from gatenorm.readers.gguf_file import is_gguf
from gatenorm.validate.runtimes.base import (
    DEFAULT,
    NO,
    Request,
    Timing,
    continuation_scores,
    register_runtime,
    truncate_left,
)


@register_runtime
class LlamaCppRuntime:
    """llama.cpp through llama-cpp-python: a GGUF file, logits of every position, flash attention on (off
    in llama-cpp-python's default; without it a layer whose attention was dropped still holds a V cache)."""

    name = "llama.cpp"
    applies_plans = False

    @classmethod
    def claim(cls, path: Path, plan: Path | None) -> int:
        """The default runtime of a GGUF file."""
        return DEFAULT if path.is_file() and (path.suffix == ".gguf" or is_gguf(path)) else NO

    @classmethod
    def refusal(cls, path: Path) -> str | None:
        return None if path.is_file() else f"llama.cpp runs GGUF files; {path} is a folder"

    def __init__(
        self,
        path: Path,
        threads: int = 2,
        n_ctx: int = 2048,
        flash_attn: bool = True,
        timing: bool = False,
        **_: object,
    ):
        """`timing`: loaded as stock llama.cpp loads it, its repacked copy of the weights included (the speed
        users get); else without that copy (`gatenorm.llamacpp`: about the file's size resident)."""
        from llama_cpp import Llama

        from gatenorm.readers.gguf_check import check_gguf

        check_gguf(path)  # llama.cpp aborts the process on some corrupt headers
        self.path = path
        self.n_ctx = n_ctx
        try:
            with contextlib.nullcontext() if timing else weights_in_place():
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
