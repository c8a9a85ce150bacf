"""The pruning plan: a small, typed, JSON-serializable object that every later stage takes as is."""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from gatenorm import __version__
from gatenorm.errors import GatenormError
from gatenorm.io import atomic_write_text
from gatenorm.readers import Checkpoint
from gatenorm.scoring import LayerScores

PLAN_SCHEMA_VERSION = 1


class LayerAction(str, Enum):
    """What happens to one decoder layer."""

    KEEP = "keep"
    DROP_ATTENTION = "drop-attention"  # skip input norm and attention; keep the MLP and its norm


class Source(BaseModel):
    """The checkpoint a plan was made for."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    format: Literal["gguf", "safetensors"]
    architecture: str
    n_layers: int
    sha256: str
    hashed: Literal["attention-tensors", "shape"]


class LayerPlan(BaseModel):
    """One layer's score and action."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layer: int
    score: float
    action: LayerAction


class Plan(BaseModel):
    """Which attention sublayers to remove, why, and from which checkpoint."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = PLAN_SCHEMA_VERSION
    tool_version: str = __version__
    method: str
    seed: int | None = None
    budget: int
    source: Source
    layers: list[LayerPlan]

    @model_validator(mode="after")
    def _consistent(self) -> Plan:
        if [lp.layer for lp in self.layers] != list(range(self.source.n_layers)):
            raise ValueError(f"layers must list 0..{self.source.n_layers - 1} in order")
        if len(self.dropped) != self.budget:
            raise ValueError(f"budget {self.budget} but {len(self.dropped)} layers dropped")
        return self

    @property
    def dropped(self) -> list[int]:
        """Indices of the layers whose attention is removed."""
        return [lp.layer for lp in self.layers if lp.action is LayerAction.DROP_ATTENTION]

    @property
    def scores(self) -> list[float]:
        return [lp.score for lp in self.layers]

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            return cls.model_validate_json(text)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "plan"
            raise GatenormError(f"invalid plan: {where}: {first['msg']}") from None

    def save(self, path: str | os.PathLike) -> None:
        """Write the plan as JSON, atomically."""
        atomic_write_text(Path(path), self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        path = Path(path)
        if not path.is_file():
            raise GatenormError(f"no such plan file: {path}")
        return cls.from_json(path.read_text())


def make_plan(ckpt: Checkpoint, scores: LayerScores, drop: int, allow_first_layer: bool = False) -> Plan:
    """Drop the attention of the `drop` lowest-scored layers (ties: deeper first).

    Layer 0 is never dropped unless `allow_first_layer` (llama.cpp reads the head size from layer 0).
    """
    n = ckpt.shape.n_layers
    candidates = [i for i in range(n) if i > 0 or allow_first_layer]
    if not 0 <= drop < n:
        raise GatenormError(f"--drop {drop} out of range: the model has {n} layers, so use 0..{n - 1}")
    if drop > len(candidates):
        raise GatenormError(f"--drop {drop} out of range: only {len(candidates)} layers may be dropped")
    if any(s != s for s in scores.scores):
        raise GatenormError(f"{scores.method.value} produced NaN scores; the checkpoint weights are invalid")
    order = sorted(candidates, key=lambda i: (scores.scores[i], -i))
    dropped = set(order[:drop])
    return Plan(
        method=scores.method.value,
        seed=scores.seed,
        budget=drop,
        source=Source(
            path=str(ckpt.path),
            format=ckpt.format,
            architecture=ckpt.arch.name,
            n_layers=n,
            sha256=scores.content_sha256,
            hashed=scores.hashed,
        ),
        layers=[
            LayerPlan(
                layer=i,
                score=s,
                action=LayerAction.DROP_ATTENTION if i in dropped else LayerAction.KEEP,
            )
            for i, s in enumerate(scores.scores)
        ],
    )
