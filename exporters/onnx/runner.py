"""Run a gatenorm ONNX export with onnxruntime (CPU EP): full-window logits, prefill/decode, greedy generate.

Public API (what the validator and the benchmark use)::

    runner = OnnxRunner(folder, threads=2)          # ort_format=True loads model.ort instead
    runner.plan                                     # the Plan, read back from the model's metadata_props
    runner.config                                   # gatenorm_onnx.json (precision, kept layers' KV names)
    runner.tokenizer                                # the tokenizer saved in the folder
    runner.logits(ids)                              # float32 [batch, T, vocab], one pass, no cache
    state = runner.prefill(ids)                     # KV cache of the prompt; state.logits: [batch, vocab]
    runner.decode(state, next_ids)                  # one step per row, cache updated in place; [batch, vocab]
    runner.generate(ids, max_new_tokens)            # greedy, batch 1: list of new token ids (stops at EOS)

Rows of a batch have the same length (no padding: the fused attention takes each row's cache as
contiguous from position 0). The KV cache stays in onnxruntime's memory: each step binds the previous
step's ``present.*`` outputs as the next ``past_key_values.*`` inputs (IO binding), so no cache tensor
is copied through numpy. Layers whose attention was pruned have no cache entry at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import onnxruntime as ort

from exporters.onnx.metadata import OnnxExportConfig, plan_from_metadata
from gatenorm.errors import GatenormError
from gatenorm.plan import Plan

_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass
class KVState:
    """A decoding state: the kept layers' cache (onnxruntime values), its length, the last logits."""

    past: list[ort.OrtValue]
    length: int  # tokens in the cache (the same for every row)
    logits: np.ndarray = field(repr=False)  # float32 [batch, vocab] at the last position


class OnnxRunner:
    """An onnxruntime session over an exported folder; see the module docstring for the API."""

    def __init__(self, folder: str | Path, threads: int = 2, ort_format: bool = False):
        self.folder = Path(folder)
        self.config = OnnxExportConfig.load(self.folder)
        name = self.config.ort_model if ort_format else self.config.model
        if name is None:
            raise GatenormError(f"{self.folder} has no ORT-format model (export it with --mobile)")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        self.session = ort.InferenceSession(
            str(self.folder / name), options, providers=["CPUExecutionProvider"]
        )
        inputs = {i.name: i for i in self.session.get_inputs()}
        self._past_names = [n for k in self.config.kv_cache for n in (k.past_key, k.past_value)]
        self._present_names = [n for k in self.config.kv_cache for n in (k.present_key, k.present_value)]
        self._kv_dtype = _NUMPY_TYPES[inputs[self._past_names[0]].type]

    @cached_property
    def plan(self) -> Plan:
        """The plan the model was pruned with, read from the model's own metadata."""
        return plan_from_metadata(self.session.get_modelmeta().custom_metadata_map)

    @cached_property
    def tokenizer(self):
        """The tokenizer saved in the folder (transformers AutoTokenizer)."""
        from transformers import AutoTokenizer

        if not self.config.tokenizer:
            raise GatenormError(f"{self.folder} has no tokenizer: its source model had none")
        return AutoTokenizer.from_pretrained(self.folder)

    def _empty_past(self, batch: int) -> list[ort.OrtValue]:
        shape = (batch, self.config.num_key_value_heads, 0, self.config.head_dim)
        empty = np.zeros(shape, self._kv_dtype)
        return [ort.OrtValue.ortvalue_from_numpy(empty) for _ in self._past_names]

    def _step(
        self, ids: np.ndarray, past_length: int, past: list[ort.OrtValue], all_logits: bool
    ) -> tuple[np.ndarray, list[ort.OrtValue]]:
        """One forward pass over `ids` after `past_length` cached tokens; returns logits and the new cache."""
        batch, length = ids.shape
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(ids, dtype=np.int64))
        binding.bind_cpu_input("attention_mask", np.ones((batch, past_length + length), np.int64))
        positions = np.broadcast_to(np.arange(past_length, past_length + length), (batch, length))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(positions, dtype=np.int64))
        for name, value in zip(self._past_names, past, strict=True):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in self._present_names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        logits = outputs[0].numpy()
        logits = logits if all_logits else logits[:, -1]
        return logits.astype(np.float32, copy=False), list(outputs[1:])

    @staticmethod
    def _as_batch(ids: np.ndarray | Sequence[int]) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise GatenormError(f"input_ids must be [batch, T] with T >= 1, got shape {ids.shape}")
        return ids

    def logits(self, input_ids: np.ndarray | Sequence[int]) -> np.ndarray:
        """float32 logits [batch, T, vocab] of every position, in one pass with an empty cache."""
        ids = self._as_batch(input_ids)
        return self._step(ids, 0, self._empty_past(ids.shape[0]), all_logits=True)[0]

    def prefill(self, input_ids: np.ndarray | Sequence[int]) -> KVState:
        """Run the prompt rows (same length, no padding) and return the cache after them."""
        ids = self._as_batch(input_ids)
        logits, past = self._step(ids, 0, self._empty_past(ids.shape[0]), all_logits=False)
        return KVState(past=past, length=ids.shape[1], logits=logits)

    def decode(self, state: KVState, next_ids: np.ndarray | Sequence[int]) -> np.ndarray:
        """Feed one token per row after `state`; updates `state` and returns logits [batch, vocab]."""
        ids = np.asarray(next_ids, dtype=np.int64).reshape(-1, 1)
        state.logits, state.past = self._step(ids, state.length, state.past, all_logits=False)
        state.length += 1
        return state.logits

    def generate(
        self, input_ids: np.ndarray | Sequence[int], max_new_tokens: int, stop_at_eos: bool = True
    ) -> list[int]:
        """Greedy decoding of one prompt: the new token ids (without the prompt), ending at EOS if met."""
        ids = self._as_batch(input_ids)
        if ids.shape[0] != 1:
            raise GatenormError("generate takes one prompt; use prefill/decode for batches")
        eos = set(self.config.eos_token_id) if stop_at_eos else set()
        state = self.prefill(ids)
        new: list[int] = []
        while len(new) < max_new_tokens:
            token = int(state.logits[0].argmax())
            new.append(token)
            if token in eos or len(new) == max_new_tokens:
                break
            self.decode(state, [token])
        return new
