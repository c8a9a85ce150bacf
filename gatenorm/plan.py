"""The pruning plan: a small, typed, JSON-serializable object that every later stage takes as is."""

from __future__ import annotations

import math
import os
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gatenorm import __version__
from gatenorm.errors import GatenormError
from gatenorm.io import atomic_write_text, read_text_file

if TYPE_CHECKING:  # annotations only: the plan is below the readers (architectures read plans)
    from gatenorm.readers import Checkpoint
    from gatenorm.scoring import LayerScores

PLAN_SCHEMA_VERSION = 2
#: Bounds on what a plan file may claim (a hostile plan cannot make gatenorm allocate or loop much).
MAX_PLAN_LAYERS = 100_000
MAX_PLAN_BYTES = 64 * 2**20


class LayerAction(str, Enum):
    """What happens to one decoder layer."""

    KEEP = "keep"
    #: skip the input norm and attention; keep the MLP and its norm: ``h + mlp(post_norm(h))``
    DROP_ATTENTION = "drop-attention"
    #: HARP: no Q/K (each token attends to itself only), the rest rescaled by the layer's alpha:
    #: ``h + alpha * o_proj(repeat_kv(v_proj(norm(h))))``, one fused d x d matmul, no KV cache
    LINEARIZE = "linearize"
    #: the whole block (attention and MLP) is the identity: ShortGPT's block removal
    DROP_BLOCK = "drop-block"


class Source(BaseModel):
    """The checkpoint a plan was made for."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    format: Literal["gguf", "safetensors"]
    architecture: str
    n_layers: int = Field(ge=1, le=MAX_PLAN_LAYERS)
    sha256: str
    hashed: Literal["attention-tensors", "shape"]


class LayerPlan(BaseModel):
    """One layer's score and action."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layer: int
    score: float
    action: LayerAction
    #: HARP's rescaling of a linearized attention sublayer; set exactly when action is linearize.
    alpha: float | None = None

    @model_validator(mode="after")
    def _alpha(self) -> LayerPlan:
        if (self.alpha is not None) != (self.action is LayerAction.LINEARIZE):
            raise ValueError(f"layer {self.layer}: alpha goes with action 'linearize' and only with it")
        if self.alpha is not None and not math.isfinite(self.alpha):
            raise ValueError(f"layer {self.layer}: alpha must be finite")
        if not math.isfinite(self.score):
            raise ValueError(f"layer {self.layer}: score must be finite, not {self.score}")
        return self


class Plan(BaseModel):
    """Which attention sublayers to remove, why, and from which checkpoint."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1, 2] = PLAN_SCHEMA_VERSION  # 1: keep / drop-attention only
    tool_version: str = __version__
    method: str
    seed: int | None = None
    budget: int
    source: Source
    layers: list[LayerPlan]

    @model_validator(mode="after")
    def _consistent(self) -> Plan:
        n = self.source.n_layers
        if len(self.layers) != n or any(lp.layer != i for i, lp in enumerate(self.layers)):
            raise ValueError(f"layers must list 0..{n - 1} in order ({len(self.layers)} listed)")
        if n and all(lp.action is LayerAction.DROP_BLOCK for lp in self.layers):
            raise ValueError("every layer is drop-block: a plan must keep at least one block")
        if len(self.changed) != self.budget:
            raise ValueError(f"budget {self.budget} but {len(self.changed)} layers changed")
        if self.schema_version == 1 and self.actions - {LayerAction.KEEP, LayerAction.DROP_ATTENTION}:
            raise ValueError("schema_version 1 plans only keep or drop-attention")
        return self

    def with_action(self, action: LayerAction) -> list[int]:
        """Indices of the layers the plan gives `action`."""
        return [lp.layer for lp in self.layers if lp.action is action]

    @property
    def dropped(self) -> list[int]:
        """Indices of the layers whose attention sublayer is removed (the MLP stays)."""
        return self.with_action(LayerAction.DROP_ATTENTION)

    @property
    def linearized(self) -> list[int]:
        """Indices of the layers whose attention becomes HARP's rescaled value-output matmul."""
        return self.with_action(LayerAction.LINEARIZE)

    @property
    def linearize_alphas(self) -> list[float]:
        """The alpha of each linearized layer, in the order of `linearized`."""
        return [float(lp.alpha) for lp in self.layers if lp.action is LayerAction.LINEARIZE]

    @property
    def blocks_dropped(self) -> list[int]:
        """Indices of the layers removed whole (attention and MLP)."""
        return self.with_action(LayerAction.DROP_BLOCK)

    @property
    def changed(self) -> list[int]:
        """Indices of every layer that is not kept as is: the budget spent."""
        return [lp.layer for lp in self.layers if lp.action is not LayerAction.KEEP]

    @property
    def actions(self) -> set[LayerAction]:
        """The actions the plan uses."""
        return {lp.action for lp in self.layers}

    @property
    def kv_layers(self) -> list[int]:
        """Indices of the layers that keep full attention, hence a KV-cache entry."""
        return self.with_action(LayerAction.KEEP)

    def describe(self) -> str:
        """One line naming what the plan changes, e.g. ``dropped attention of layers [3, 7]``."""
        parts = [
            f"{label} {layers}"
            for label, layers in (
                ("dropped attention of layers", self.dropped),
                ("linearized the attention of layers", self.linearized),
                ("dropped whole blocks", self.blocks_dropped),
            )
            if layers
        ]
        return "; ".join(parts) or "kept every layer"

    def require(self, supported: set[LayerAction], what: str) -> None:
        """Raise a GatenormError if the plan uses an action `what` (e.g. "the GGUF exporter") cannot do."""
        missing = sorted(a.value for a in self.actions - supported)
        if missing:
            raise GatenormError(f"{what} cannot apply plan action(s) {', '.join(missing)} yet")

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
        if path.stat().st_size > MAX_PLAN_BYTES:
            raise GatenormError(f"{path} is {path.stat().st_size} bytes: too big for a plan file")
        try:
            return cls.from_json(read_text_file(path, "plan file"))
        except GatenormError as e:
            raise GatenormError(f"{path}: {e}") from None


def source_of(ckpt: Checkpoint, scores: LayerScores) -> Source:
    """The `Source` of a plan made from `scores` of `ckpt`."""
    return Source(
        path=str(ckpt.path),
        format=ckpt.format,
        architecture=ckpt.arch.name,
        n_layers=ckpt.shape.n_layers,
        sha256=scores.content_sha256,
        hashed=scores.hashed,
    )


def plan_from_actions(
    ckpt: Checkpoint,
    scores: LayerScores,
    actions: list[LayerAction],
    alphas: dict[int, float] | None = None,
    method: str | None = None,
) -> Plan:
    """A plan giving layer i `actions[i]` (and `alphas[i]` where it linearizes), with `scores` recorded."""
    alphas = dict(alphas or {})
    actions = list(actions)
    for layer, (action, alpha) in ckpt.fixed_layers.items():  # already changed in the file: stays so,
        if actions[layer] in (LayerAction.KEEP, LayerAction(action)):  # unless given more (drop-block)
            actions[layer] = LayerAction(action)
            if alpha is not None:
                alphas[layer] = alpha
    return Plan(
        method=method or scores.method,
        seed=scores.seed,
        budget=sum(a is not LayerAction.KEEP for a in actions),
        source=source_of(ckpt, scores),
        layers=[
            LayerPlan(layer=i, score=s, action=a, alpha=alphas.get(i) if a is LayerAction.LINEARIZE else None)
            for i, (s, a) in enumerate(zip(scores.scores, actions, strict=True))
        ],
    )


def lowest_scored(
    ckpt: Checkpoint, scores: LayerScores, n: int, allow_first_layer: bool = False
) -> list[int]:
    """The `n` lowest-scored layers (ties: deeper first), never layer 0 unless `allow_first_layer`.

    Raises a GatenormError naming the problem if `n` is out of range or the scores hold NaN.
    """
    fixed = ckpt.fixed_layers  # layers without attention already (deci): not candidates, not counted
    total = ckpt.shape.n_layers - len(fixed)
    candidates = [i for i in range(ckpt.shape.n_layers) if (i > 0 or allow_first_layer) and i not in fixed]
    if not 0 <= n < total:
        left = f" with attention left ({len(fixed)} already without)" if fixed else ""
        raise GatenormError(
            f"--drop {n} out of range: the model has {total} layers{left}, so use 0..{total - 1}"
        )
    if n > len(candidates):
        raise GatenormError(f"--drop {n} out of range: only {len(candidates)} layers may be dropped")
    if any(s != s for s in scores.scores):
        raise GatenormError(f"{scores.method} produced NaN scores; the checkpoint weights are invalid")
    return sorted(candidates, key=lambda i: (scores.scores[i], -i))[:n]


def make_plan(
    ckpt: Checkpoint,
    scores: LayerScores,
    drop: int,
    allow_first_layer: bool = False,
    action: LayerAction = LayerAction.DROP_ATTENTION,
) -> Plan:
    """Give the `drop` lowest-scored layers `action` (ties: deeper first; default: drop their attention).

    Layer 0 is never changed unless `allow_first_layer` (llama.cpp reads the head size from layer 0).
    A linearize action gets alpha 1 (HARP without rescaling).
    """
    chosen = set(lowest_scored(ckpt, scores, drop, allow_first_layer))
    actions = [action if i in chosen else LayerAction.KEEP for i in range(ckpt.shape.n_layers)]
    return plan_from_actions(ckpt, scores, actions, dict.fromkeys(chosen, 1.0))
