"""mlx-lm: folders written by gatenorm's MLX exporter (or any mlx-lm model folder), run by mlx-lm itself
(`mlx_lm.load`, the model's forward with mlx-lm's KV cache). mlx and mlx-lm: the extra ``gatenorm[mlx]``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from gatenorm.validate.runtimes.base import NO, PREFERRED, BatchLogitsRuntime, register_runtime


def is_mlx_folder(path: Path) -> bool:
    """A folder of mlx-lm weights: config.json and safetensors that mlx saved (``format: mlx``)."""
    if not (path.is_dir() and (path / "config.json").is_file()):
        return False
    shards = sorted(path.glob("model*.safetensors"))
    if not shards:
        return False
    from safetensors import safe_open

    with safe_open(shards[0], framework="numpy") as f:
        return (f.metadata() or {}).get("format") == "mlx"


@register_runtime
class MlxRuntime(BatchLogitsRuntime):
    """mlx-lm on mlx's default device (the GPU on Apple silicon, the CPU elsewhere)."""

    name = "mlx"
    applies_plans = False

    @classmethod
    def claim(cls, path: Path, plan: Path | None) -> int:
        """mlx-lm runs an mlx folder (over torch: the folder also holds an HF-style config.json)."""
        return PREFERRED if is_mlx_folder(path) else NO

    @classmethod
    def refusal(cls, path: Path) -> str | None:
        from exporters.mlx.writer import require_mlx
        from gatenorm.errors import GatenormError

        try:
            require_mlx()
        except GatenormError as e:
            return str(e).replace("the mlx target", "the mlx runtime")
        return None

    def __init__(self, path: Path, **_: object):
        import mlx.core as mx
        from mlx_lm import load

        self._mx = mx
        self.path = path
        self.model, wrapper = load(str(path))
        self.tokenizer = wrapper._tokenizer
        config = json.loads((path / "config.json").read_text())
        self.vocab_size = int(config["vocab_size"])
        self.max_len = int(config.get("max_position_embeddings") or self.max_len)
        self._set_bos()

    def _logits(self, ids, cache=None) -> np.ndarray:
        mx = self._mx
        out = self.model(mx.array(ids), cache=cache).astype(mx.float32)
        mx.eval(out)
        return np.array(out)

    def batch_logits(self, ids: np.ndarray, keep: int) -> np.ndarray:
        return self._logits(ids)[:, -keep:]

    def prefill(self, prompt: list[int]) -> tuple[object, np.ndarray]:
        from mlx_lm.models.cache import make_prompt_cache

        cache = make_prompt_cache(self.model)
        return cache, self._logits([prompt], cache)[0, -1]

    def decode(self, state: object, token: int) -> np.ndarray:
        return self._logits([[token]], state)[0, -1]

    def state_bytes(self, state: object) -> int:
        """Bytes of the keys and values the caches hold (an unused layer's cache holds none)."""
        return sum(kv_bytes(c) for c in state)


def kv_bytes(cache) -> int:
    """Bytes of the keys and values one mlx-lm cache holds up to its offset."""
    if getattr(cache, "keys", None) is None:
        return 0
    # mlx-lm >= 0.30: keys_and_values() (its state holds the whole allocated buffer and the offset);
    # 0.29: the state, sliced to the offset
    keys, values = cache.keys_and_values() if hasattr(cache, "keys_and_values") else cache.state
    return int(keys.nbytes + values.nbytes)
