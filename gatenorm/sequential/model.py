"""A checkpoint run one decoder layer at a time (the layer-sequential pattern of GPTQ / llm-compressor).

`SequentialModel` holds a transformers model of the checkpoint's config on the meta device (no weights) and
the checkpoint opened lazily. `embed` runs the calibration windows through the model's own forward up to the
first decoder layer, with a table of only the token rows they use, and records, per batch and layer, the
arguments the model hands each layer (attention masks of its type, rotary tables, positions). `build` gives
one layer its weights (only those its plan action keeps) and its module for that action (the architecture
adapter's `attention_free` / `linearized` / `identity` / `repaired`); `Windows.run` runs every window
through it; `release` frees it. `head` holds the final norm and the LM head for `logits`. The windows' hidden
states are the only activations held: a pass peaks at about one layer's float32 weights plus those.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gatenorm.architectures import get_architecture
from gatenorm.errors import GatenormError
from gatenorm.plan import LayerAction, LayerPlan, Plan
from gatenorm.quiet import quiet_transformers
from gatenorm.readers import Checkpoint, open_checkpoint
from gatenorm.readers.hf_gguf import shared_gguf_parse
from gatenorm.sequential.weights import CheckpointTensors, materialize, release

#: glibc's mallopt parameter of the size above which an allocation gets its own mapping.
M_MMAP_THRESHOLD = -3
#: Float32 bytes read per chunk of a vocabulary table (embedding rows, LM head rows).
CHUNK_BYTES = 1 << 26


def _return_freed_memory() -> None:
    """Have glibc's malloc hand every allocation over 1 MiB straight back to the system when freed (its
    default threshold grows to 32 MiB, so freed layer weights would stay in the heap and in the RSS)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 1 << 20)


class _Stop(Exception):
    """Raised by the last recorder: the model's forward has handed every layer its arguments."""


class _Recorder(nn.Module):
    """Stands in for decoder layer `index` during `embed`: records its arguments, passes the input on."""

    def __init__(self, index: int, calls: dict, last: bool, attention_type: str | None, returns_tuple: bool):
        super().__init__()
        self.index, self.calls, self.last, self.returns_tuple = index, calls, last, returns_tuple
        if attention_type is not None:
            self.attention_type = attention_type  # the model picks the layer's mask by it

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        self.calls[self.index] = (hidden_states, args, kwargs)
        if self.last:
            raise _Stop
        return (hidden_states,) if self.returns_tuple else hidden_states


def _first(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@dataclass
class Windows:
    """Token windows [n, T] on their way through the model: their hidden states [n, T, d] (the input of
    the next layer to run) and, per batch of `batch` windows, the arguments each layer is called with."""

    ids: torch.Tensor
    hidden: torch.Tensor
    calls: list[list[tuple[tuple, dict]]]
    batch: int

    def batches(self) -> Iterator[tuple[int, slice]]:
        """(batch index, rows) of each batch."""
        for b, start in enumerate(range(0, len(self.ids), self.batch)):
            yield b, slice(start, start + self.batch)

    def call(self, layer: nn.Module, index: int, b: int, hidden: torch.Tensor) -> torch.Tensor:
        """`layer` (decoder layer `index`) on `hidden`, with the arguments batch `b` is given there."""
        args, kwargs = self.calls[b][index]
        return _first(layer(hidden, *args, **kwargs))

    def run(self, layer: nn.Module, index: int) -> None:
        """Every window through `layer` (decoder layer `index`), batch by batch, in place."""
        with torch.inference_mode():
            for b, rows in self.batches():
                self.hidden[rows] = self.call(layer, index, b, self.hidden[rows])


def _config(ckpt: Checkpoint):
    from transformers import AutoConfig

    with quiet_transformers(), shared_gguf_parse():
        if ckpt.format == "gguf":
            return AutoConfig.from_pretrained(ckpt.path.parent, gguf_file=ckpt.path.name)
        return AutoConfig.from_pretrained(ckpt.path)


class SequentialModel:
    """A checkpoint (HF folder or GGUF) whose decoder layers are built one at a time (see module doc)."""

    def __init__(self, path: str | Path | Checkpoint, plan: Plan | None = None):
        """`plan`: a recovered plan whose merged weights every read of this checkpoint sees instead of the
        source's (`CheckpointTensors`' overlay); None for the source's own weights."""
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        self.ckpt = path if isinstance(path, Checkpoint) else open_checkpoint(path)
        if self.ckpt.arch.name == "deci":
            raise GatenormError(
                f"{self.ckpt.path} is a deci GGUF: the layer-sequential engine reads stock families only"
            )
        self.config = _config(self.ckpt)
        attention = self.ckpt.arch.hf_attn_implementation
        options = {"attn_implementation": attention} if attention else {}
        with quiet_transformers(), init_empty_weights(include_buffers=False):
            self.skeleton = AutoModelForCausalLM.from_config(self.config, dtype=torch.float32, **options)
        self.skeleton.eval()
        self.arch = get_architecture(self.config.model_type)
        self.tensors = CheckpointTensors(self.ckpt, self.skeleton, plan)
        self.layers = self.arch.decoder_layers(self.skeleton)
        self.n_layers = len(self.layers)
        self._prefix = {id(m): name + "." for name, m in self.skeleton.named_modules()}
        self._embed_name = self._prefix[id(self.skeleton.get_input_embeddings())] + "weight"
        self._head_users = 0
        _return_freed_memory()

    @property
    def vocab_size(self) -> int:
        return int(self.skeleton.get_output_embeddings().weight.shape[0])

    def _table(self, name: str) -> str:
        """A vocabulary table's state-dict name: the LM head's own, or the embedding it is tied to."""
        return name if self.tensors.has(name) else self._embed_name

    def _rows(self, name: str, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Table `name` (float32), read in chunks of rows; with `keep` (sorted row ids) only those rows."""
        name = self._table(name)
        total = self.tensors.rows(name)
        d = self.config.hidden_size
        step = max(CHUNK_BYTES // (4 * d), 1)
        out = torch.empty((total if keep is None else len(keep), d))
        for start in range(0, total, step):
            stop = min(start + step, total)
            if keep is None:
                out[start:stop] = self.tensors.read_rows(name, start, stop)
                continue
            lo, hi = torch.searchsorted(keep, torch.tensor([start, stop]))
            if hi > lo:
                out[lo:hi] = self.tensors.read_rows(name, start, stop)[keep[lo:hi] - start]
        return out

    def embed(self, windows: np.ndarray, batch: int = 4) -> Windows:
        """The windows' input to layer 0 and every layer's arguments, from the model's own forward (its
        embedding scale, masks and rotary tables) run with recorders in place of the layers."""
        ids = torch.from_numpy(np.ascontiguousarray(windows)).long()
        used, compact = torch.unique(ids, return_inverse=True)
        embedding = self.skeleton.get_input_embeddings()
        embedding.weight = nn.Parameter(self._rows(self._embed_name, used), requires_grad=False)
        originals = list(self.layers)
        hidden = torch.empty((*ids.shape, self.config.hidden_size))
        calls_per_batch = []
        try:
            for start in range(0, len(ids), batch):
                calls: dict = {}
                for i, layer in enumerate(originals):
                    self.layers[i] = _Recorder(
                        i,
                        calls,
                        i == len(originals) - 1,
                        getattr(layer, "attention_type", None),
                        self.arch.returns_tuple(),
                    )
                with contextlib.suppress(_Stop), torch.inference_mode():
                    self.skeleton.model(input_ids=compact[start : start + batch], use_cache=False)
                hidden[start : start + batch] = calls[0][0]
                calls_per_batch.append([calls[i][1:] for i in range(len(originals))])
        finally:
            for i, layer in enumerate(originals):
                self.layers[i] = layer
            release(embedding)
        return Windows(ids, hidden, calls_per_batch, batch)

    def build(
        self,
        index: int,
        action: LayerPlan | None = None,
        repairs: dict | None = None,
        refits: dict | None = None,
    ) -> nn.Module:
        """Decoder layer `index` with its weights, as the module its plan entry `action` makes of it
        (`gatenorm.apply.planned_layer`; None: the stock layer), reading only the tensors that module keeps.
        `release(index)` frees it."""
        from gatenorm.apply import planned_layer, set_refit

        layer = self.layers[index]
        prefix = self._prefix[id(layer)]
        repairs, refits = repairs or {}, refits or {}
        if action is None or action.action is LayerAction.KEEP:
            materialize(layer, prefix, self.tensors)
            module = layer
        elif action.action is LayerAction.LINEARIZE and index not in repairs:  # fused from v and o
            materialize(layer, prefix, self.tensors)
            module = planned_layer(self.arch, layer, action, repairs)
        else:
            module = planned_layer(self.arch, layer, action, repairs)
            materialize(module, prefix, self.tensors)
        if index in refits:
            set_refit(self.arch, module, index, refits[index])
        return module

    def release(self, index: int) -> None:
        """Free the weights `build(index)` read."""
        release(self.layers[index])

    @contextlib.contextmanager
    def head(self) -> Iterator[None]:
        """The final norm and the LM head hold their weights inside the block (for `logits`); nested or
        interleaved blocks (a reference's and a candidate's logits) share one copy."""
        self._head_users += 1
        try:
            if self._head_users == 1:
                with self._head():
                    yield
            else:
                yield
        finally:
            self._head_users -= 1

    @contextlib.contextmanager
    def _head(self) -> Iterator[None]:
        head = self.skeleton.get_output_embeddings()
        outer = [
            (name, module)
            for name, module in self.skeleton.named_children()
            if module is not head and name != "model"
        ]
        rest = [m for n, m in self.skeleton.model.named_children() if n != "layers" and m is not None]
        try:
            for module in (*rest, *(m for _, m in outer)):
                if module is not self.skeleton.get_input_embeddings():
                    materialize(module, self._prefix[id(module)], self.tensors)
            head.weight = nn.Parameter(self._rows(self._prefix[id(head)] + "weight"), requires_grad=False)
            yield
        finally:
            for module in (*rest, *(m for _, m in outer), head):
                release(module)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of last-layer hidden states (inside `head`)."""
        with torch.inference_mode():
            return self.arch.logits(self.skeleton, hidden)

    def window_logits(self, hidden: torch.Tensor, first: int) -> Iterator[np.ndarray]:
        """Per window of last-layer hidden states [n, T, d], float32 logits at positions first..T-2 (the
        LM head held while the iterator runs)."""
        with self.head():
            for row in hidden:
                yield self.logits(row[None, first:-1])[0].float().numpy()

    def forward_many(self, windows: np.ndarray, plans: list[Plan | None], batch: int = 4) -> list[Windows]:
        """The windows through the model as each of `plans` makes it (None: unchanged), in one pass that
        reads each layer's weights once (none for a layer every plan removes whole); a `Windows` per plan."""
        from gatenorm.apply import check_plan_fits, planned_layer, set_refit
        from gatenorm.heal.store import load_refits, load_repairs

        for plan in plans:
            if plan is not None:
                check_plan_fits(plan, self.arch.name, self.n_layers)
        edits = [({}, {}) if p is None else (load_repairs(p), load_refits(p)) for p in plans]
        first = self.embed(windows, batch)
        states = [first] + [Windows(first.ids, first.hidden.clone(), first.calls, batch) for _ in plans[1:]]
        for i in range(self.n_layers):
            actions = [None if p is None else p.layers[i] for p in plans]
            if all(
                a is not None and a.action is LayerAction.DROP_BLOCK and i not in repairs
                for a, (repairs, _) in zip(actions, edits, strict=True)
            ):
                continue  # removed whole by every plan
            layer = self.layers[i]
            materialize(layer, self._prefix[id(layer)], self.tensors)
            for state, action, (repairs, refits) in zip(states, actions, edits, strict=True):
                module = layer if action is None else planned_layer(self.arch, layer, action, repairs)
                if i in refits:  # a copy: the stock layer's down projection serves the other plans
                    module = copy.deepcopy(module)
                    set_refit(self.arch, module, i, refits[i])
                state.run(module, i)
                del module
            self.release(i)
        return states

    def forward(
        self,
        windows: np.ndarray,
        plan: Plan | None = None,
        batch: int = 4,
        around: Callable[[int, nn.Module], Callable[[], None] | None] | None = None,
    ) -> Windows:
        """Every window through every layer (the plan's modules, with its repairs), each layer built, run
        and freed in turn; `around(index, module)` is called before a layer runs (to hook it) and what it
        returns after. Returns the windows holding the last layer's output."""
        from gatenorm.apply import check_plan_fits
        from gatenorm.heal.store import load_refits, load_repairs

        if plan is not None:
            check_plan_fits(plan, self.arch.name, self.n_layers)
        actions = None if plan is None else plan.layers
        repairs = {} if plan is None else load_repairs(plan)
        refits = {} if plan is None else load_refits(plan)
        state = self.embed(windows, batch)
        for i in range(self.n_layers):
            module = self.build(i, None if actions is None else actions[i], repairs, refits)
            done = around(i, module) if around is not None else None
            try:
                state.run(module, i)
            finally:
                if done is not None:
                    done()
                del module
                self.release(i)
        return state
