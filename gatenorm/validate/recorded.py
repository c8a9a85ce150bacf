"""A runtime's answers kept after its model is freed, so that a validation holds one model at a time: the
reference answers everything first (window logits to a temporary file, log-likelihoods in memory), is
closed, and replays its answers to the comparison while the candidate runs.

The logits are the bulk: windows x scored positions x vocabulary, as the runtime gave them (float32: 1.9 GiB
for the default 40 windows of 255 scored tokens of SmolLM2's 49k vocabulary), so they stay in memory only
up to `MEMORY_BYTES` and go to a temporary file beyond; replaying holds one window at a time, as the live
comparison does. They are kept exact (not llama-perplexity's 16-bit log-probabilities), so the figures
equal those of both models run side by side.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence

import numpy as np

from gatenorm.validate.runtimes import Request, Runtime

#: logits kept in memory up to this many bytes, then in a temporary file
MEMORY_BYTES = 256 * 2**20
#: what the validator reads of a runtime besides its answers: its context limits
LIMITS = ("max_context", "max_len", "n_ctx")


def _key(requests: Sequence[Request]) -> tuple:
    return tuple((tuple(ctx), tuple(cont)) for ctx, cont in requests)


class RecordedRuntime:
    """`runtime`'s name, vocabulary, BOS id and context limits, its tokenizer while it is open, and the
    answers recorded with `record_windows` / `record_requests`, replayed by `window_logits` and
    `loglikelihoods` (the `Runtime` protocol) after `release` has freed the model."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime: Runtime | None = runtime
        self.name, self.path, self.vocab_size = runtime.name, runtime.path, runtime.vocab_size
        self.bos_id = runtime.bos_id
        for limit in LIMITS:
            setattr(self, limit, getattr(runtime, limit, None))
        # closed by close(), which validate() calls in its finally
        self._logits = tempfile.SpooledTemporaryFile(max_size=MEMORY_BYTES, prefix="gatenorm-logits-")  # noqa: SIM115
        self._windows: np.ndarray | None = None
        self._first = 0
        self._index: list[tuple[int, tuple[int, ...], np.dtype]] = []
        self._answers: dict[tuple, list[tuple[float, bool]]] = {}

    @property
    def live(self) -> Runtime:
        if self._runtime is None:
            raise RuntimeError(f"{self.name} model of {self.path} was released; only its answers are kept")
        return self._runtime

    def tokenize(self, text: str) -> list[int]:
        return self.live.tokenize(text)

    def record_windows(self, windows: np.ndarray, first: int) -> None:
        """Keep the runtime's logits of `windows` (`Runtime.window_logits`)."""
        for logits in self.live.window_logits(windows, first):
            logits = np.ascontiguousarray(logits)
            self._index.append((self._logits.tell(), logits.shape, logits.dtype))
            self._logits.write(memoryview(logits).cast("B"))
        self._windows, self._first = windows, first

    def record_requests(self, *request_lists: Sequence[Request]) -> None:
        """Keep the runtime's answers to each list of requests (`Runtime.loglikelihoods`)."""
        for requests in request_lists:
            self._answers[_key(requests)] = self.live.loglikelihoods(requests)

    def release(self) -> None:
        """Free the model; the recorded answers stay."""
        if self._runtime is not None:
            self._runtime.close()
            self._runtime = None

    def window_logits(self, windows: np.ndarray, first: int) -> Iterator[np.ndarray]:
        """The recorded logits, one window at a time (the windows must be the recorded ones)."""
        if self._windows is None or first != self._first or not np.array_equal(windows, self._windows):
            raise ValueError("these windows were not recorded")
        for offset, shape, dtype in self._index:
            self._logits.seek(offset)
            size = int(np.prod(shape)) * dtype.itemsize
            yield np.frombuffer(self._logits.read(size), dtype=dtype).reshape(shape)

    def loglikelihoods(self, requests: Sequence[Request]) -> list[tuple[float, bool]]:
        """The recorded answers to exactly these requests."""
        try:
            return self._answers[_key(requests)]
        except KeyError:
            raise ValueError("these requests were not recorded") from None

    def close(self) -> None:
        """Free the model and the recorded logits."""
        self.release()
        self._logits.close()
