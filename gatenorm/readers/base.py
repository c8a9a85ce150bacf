"""Common types of the checkpoint readers: model shape, per-layer attention weights, the reader interface."""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gatenorm.architectures import ATTENTION_PARTS, Architecture
from gatenorm.errors import GatenormError


@dataclass(frozen=True)
class ModelShape:
    """The dimensions a scorer needs, read from checkpoint metadata."""

    architecture: str
    n_layers: int
    d_model: int
    n_head: int
    n_head_kv: int
    head_dim: int

    def __post_init__(self) -> None:
        if min(self.n_layers, self.d_model, self.n_head, self.n_head_kv, self.head_dim) <= 0:
            raise GatenormError(f"invalid model dimensions in metadata: {self}")
        if self.n_head % self.n_head_kv:
            raise GatenormError(f"n_head {self.n_head} is not a multiple of n_head_kv {self.n_head_kv}")


@dataclass
class AttentionWeights:
    """One layer's attention projections in HF layout (``out_features x in_features``), float32.

    q: (n_head*head_dim, d), k and v: (n_head_kv*head_dim, d), o: (d, n_head*head_dim).
    """

    layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    q: torch.Tensor | None = None
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    o: torch.Tensor | None = None

    @property
    def n_rep(self) -> int:
        """Query heads per KV head (GQA group size)."""
        return self.n_head // self.n_head_kv


@dataclass
class ContentHash:
    """sha256 over the raw bytes of the tensors a reader handed out, in reading order."""

    sha: hashlib._Hash = field(default_factory=hashlib.sha256)
    tensors: int = 0

    def update(self, name: str, raw: memoryview | bytes) -> None:
        self.sha.update(name.encode())
        self.sha.update(raw)
        self.tensors += 1

    def hexdigest(self) -> str:
        return self.sha.hexdigest()

    @classmethod
    def of_shape(cls, shape: ModelShape) -> ContentHash:
        """The hash recorded by methods that read no tensors: it covers the model's shape only."""
        digest = cls()
        digest.update("shape", repr(shape).encode())
        return digest


class Checkpoint(ABC):
    """A model file or folder opened for lazy, per-tensor reads; nothing is loaded up front."""

    format: str
    path: Path
    arch: type[Architecture]
    shape: ModelShape
    #: layer -> (action, alpha) of the layers the checkpoint has already changed (a deci GGUF's layers
    #: without attention): not scored, and kept so by every plan made for it
    fixed_layers: dict[int, tuple[str, float | None]] = {}  # noqa: RUF012  (never mutated)

    @abstractmethod
    def tensor_name(self, part: str, layer: int) -> str:
        """The checkpoint's name for attention `part` ('q', 'k', 'v', 'o') of `layer`."""

    @abstractmethod
    def _read(self, name: str) -> tuple[memoryview | bytes, torch.Tensor]:
        """Raw stored bytes of tensor `name` and its float32 value in the checkpoint's own layout."""

    def _to_hf_layout(self, part: str, weight: torch.Tensor) -> torch.Tensor:
        return weight

    @abstractmethod
    def has_tensor(self, name: str) -> bool:
        """Whether the checkpoint stores a tensor called `name`."""

    def has_attention_bias(self, layer: int, parts: Sequence[str] = ATTENTION_PARTS) -> bool:
        """Whether any of the attention projections `parts` of `layer` has a bias tensor."""
        return any(
            self.has_tensor(self.tensor_name(part, layer).removesuffix(".weight") + ".bias") for part in parts
        )

    def read_raw(self, name: str) -> memoryview | bytes:
        """The stored bytes of tensor `name`, as `ContentHash` sees them (readers may skip decoding)."""
        return self._read(name)[0]

    def attention_sha256(self, parts: Sequence[str] = ("q", "k")) -> str:
        """sha256 of the raw bytes of `parts` of every layer, in the order `iter_attention` reads them."""
        digest = ContentHash()
        for layer in range(self.shape.n_layers):
            if layer in self.fixed_layers:
                continue  # no q/k left
            for name in dict.fromkeys(self.tensor_name(part, layer) for part in parts):  # fused: once
                digest.update(name, self.read_raw(name))
        return digest.hexdigest()

    def read_attention(
        self,
        layer: int,
        parts: Sequence[str] = ("q", "k"),
        digest: ContentHash | None = None,
        hf_rows: bool = True,
    ) -> AttentionWeights:
        """Read the attention projections `parts` of `layer` as float32.

        With `hf_rows` (default) q/k rows are in HF order; without it they stay in the checkpoint's order,
        which differs from HF only by the same permutation inside every head of q and k (llama GGUF) and
        so leaves any q/k coupling score unchanged, at the cost of no copy.
        """
        if not 0 <= layer < self.shape.n_layers:
            raise GatenormError(f"layer {layer} out of range: model has {self.shape.n_layers} layers")
        s = self.shape
        weights = AttentionWeights(layer, s.n_head, s.n_head_kv, s.head_dim)
        if layer in self.fixed_layers:
            return weights  # already without attention: nothing to read (parts stay None)
        read: dict[str, torch.Tensor] = {}  # a fused tensor (Phi-3's qkv) is read and hashed once
        for part in parts:
            if part not in ATTENTION_PARTS:
                raise ValueError(f"unknown attention part {part!r}")
            name = self.tensor_name(part, layer)
            if name not in read:
                raw, read[name] = self._read(name)
                if digest is not None:
                    digest.update(name, raw)
            value = read[name]
            rows = self.arch.fused_rows(part, s.n_head, s.n_head_kv, s.head_dim)
            if rows is not None:
                value = value[rows]
            setattr(weights, part, self._to_hf_layout(part, value) if hf_rows else value)
        return weights

    def read_norm(self, layer: int) -> torch.Tensor:
        """The gain (d,) that `layer`'s attention input RMSNorm multiplies by, float32, the same from either
        format (Gemma's ``1 + w``; ones where the family has no input norm)."""
        if not 0 <= layer < self.shape.n_layers:
            raise GatenormError(f"layer {layer} out of range: model has {self.shape.n_layers} layers")
        if self.arch.tensor_template(self.format, "norm") is None:  # no input norm (OLMo-2)
            return torch.ones(self.shape.d_model)
        stored = self._read(self.tensor_name("norm", layer))[1].reshape(-1)
        return self.arch.norm_gain(self.format, stored)

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows start..stop-1 of the 2-D tensor `name` (its first axis in HF layout: a vocabulary table's
        tokens) as float32, reading only those rows."""
        return self._read(name)[1][start:stop]

    def rows(self, name: str) -> int:
        """The first-axis length (HF layout) of the 2-D tensor `name`."""
        return int(self._read(name)[1].shape[0])

    def read_embedding(self) -> torch.Tensor:
        """The token embedding table (vocab, d), float32."""
        return self._read(self.tensor_name("embed", 0))[1]

    def iter_attention(
        self, parts: Sequence[str] = ("q", "k"), digest: ContentHash | None = None, hf_rows: bool = True
    ) -> Iterator[AttentionWeights]:
        """Yield every layer's attention weights in order, reading layer l+1 while layer l is in use.

        At most two layers' tensors are alive at once; `digest` sees the raw bytes in layer order.
        """
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="gatenorm-read") as pool:
            pending = pool.submit(self.read_attention, 0, parts, digest, hf_rows)
            for layer in range(self.shape.n_layers):
                current = pending.result()
                if layer + 1 < self.shape.n_layers:
                    pending = pool.submit(self.read_attention, layer + 1, parts, digest, hf_rows)
                yield current
                del current
