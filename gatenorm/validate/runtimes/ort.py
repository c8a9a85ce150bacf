"""onnxruntime: folders written by gatenorm's ONNX exporter, run by `exporters.onnx.OnnxRunner`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from gatenorm.errors import GatenormError
from gatenorm.validate.runtimes.base import NO, PREFERRED, BatchLogitsRuntime, register_runtime


def is_onnx_folder(path: Path) -> bool:
    """A gatenorm ONNX export (``gatenorm_onnx.json``; ``onnx/model*.onnx`` or, written by older versions,
    ``model.onnx``)."""
    return path.is_dir() and ((path / "gatenorm_onnx.json").is_file() or (path / "model.onnx").is_file())


@register_runtime
class OnnxRuntime(BatchLogitsRuntime):
    """onnxruntime: a folder exported by gatenorm's ONNX exporter (model.onnx, its JSON config, tokenizer)."""

    name = "onnx"
    max_batch_tokens = 1024  # the runner returns logits of every position
    applies_plans = False

    @classmethod
    def claim(cls, path: Path, plan: Path | None) -> int:
        """onnxruntime runs a gatenorm ONNX folder (over torch: the folder also holds an HF config.json)."""
        return PREFERRED if is_onnx_folder(path) else NO

    @classmethod
    def refusal(cls, path: Path) -> str | None:
        return None  # OnnxRunner names what a folder lacks

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
    for name in ("config.json", "gatenorm_onnx.json"):
        try:
            value = json.loads((path / name).read_text()).get("max_position_embeddings")
        except (OSError, ValueError, AttributeError):
            continue
        if value:
            return int(value)
    return None
