"""The pruning plan: a small, typed, JSON-serializable object that every later stage takes as is."""

from __future__ import annotations

import math
import os
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer, model_validator

from gatenorm import __version__
from gatenorm.errors import GatenormError
from gatenorm.io import atomic_write_text, read_text_file

if TYPE_CHECKING:  # annotations only: the plan is below the readers (architectures read plans)
    from gatenorm.readers import Checkpoint
    from gatenorm.scoring import LayerScores

PLAN_SCHEMA_VERSION = 2
#: The schema of a plan whose changed layers carry fitted repairs (`Repair`, `Healing`).
HEALED_SCHEMA_VERSION = 3
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


class HubSource(BaseModel):
    """The Hugging Face hub repository (and GGUF file of it) that a plan's checkpoint was fetched from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    repo: str
    file: str | None = None
    #: the commit the cache held
    revision: str


class Source(BaseModel):
    """The checkpoint a plan was made for (`hub`: where it came from, for a model named by its hub id; absent
    from the JSON of a plan made from a local path)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    format: Literal["gguf", "safetensors"]
    architecture: str
    n_layers: int = Field(ge=1, le=MAX_PLAN_LAYERS)
    sha256: str
    hashed: Literal["attention-tensors", "shape"]
    hub: HubSource | None = None

    @model_serializer(mode="wrap")
    def _without_no_hub(self, handler) -> dict:
        data = handler(self)
        if self.hub is None:
            data.pop("hub", None)
        return data


#: How a plan is healed (`gatenorm.heal.forms`): fold (refitted down projections) or linear (fitted maps).
HealForm = Literal["fold", "linear"]


class Repair(BaseModel):
    """A fitted linear map that stands in for what a changed layer lost (`gatenorm.heal`).

    On a dropped or linearized attention the layer adds ``post(W @ norm(h) + b)`` where the attention was
    (its input norm kept, the MLP step after it: one ``d x d`` matmul, no KV cache); on a dropped block it
    adds ``W @ norm(h) + b`` alone. The weights live in the plan's weights file (`Healing.weights`) under
    ``blk.{layer}.weight`` / ``.bias``; `sha256` is that of their float32 bytes (`gatenorm.heal.store`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["linear"] = "linear"
    #: (outputs, inputs) of W: (d_model, d_model)
    shape: tuple[int, int]
    bias: bool = False
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Refit(BaseModel):
    """A layer's MLP down projection refitted so that its output also carries what the changed layers above
    it (only removed blocks between) lost: a fold (ReplaceMe-style), free at run time.

    The new weight (``d_model x d_ff``, float32) lives in the plan's weights file under
    ``blk.{layer}.ffn_down``; `sha256` is that of its float32 bytes. Any layer may carry one, kept ones too.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["ffn_down"] = "ffn_down"
    #: (outputs, inputs): (d_model, d_ff)
    shape: tuple[int, int]
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class CalibrationRecord(BaseModel):
    """The calibration text a calibrated method's statistics were measured on."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: 'synthetic', 'wiki-heldout' or 'file:<sha256>'
    source: str
    samples: int = Field(ge=1)
    length: int = Field(ge=2)
    #: the seed of synthetic text (None: data)
    seed: int | None = None
    #: what sampled the synthetic text: ``llama.cpp (llama-cpp-python <version>)`` (None: data)
    generator: str | None = None


class Healing(BaseModel):
    """How a healed plan's repairs were fitted, and where their weights are."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: ridge least squares of each changed layer's lost output on its normed input (linear) or on the
    #: down projections' inputs (fold)
    method: Literal["ridge-ls"] = "ridge-ls"
    #: linear: a fitted map per changed layer (one d x d matmul each); fold: refitted down projections (no
    #: run-time cost), a fitted map only on linearized layers and changed layers with no MLP below
    form: HealForm = "linear"
    #: calibration text: 'synthetic', 'wiki-heldout' or 'file:<sha256>'
    calib: str
    samples: int = Field(ge=1)
    length: int = Field(ge=2)
    seed: int = 0
    #: ridge strength, relative to the mean diagonal of the inputs' second moment
    ridge: float = Field(ge=0)
    #: the refits' ridge, likewise relative (fold)
    fold_ridge: float | None = Field(None, ge=0)
    #: the share of the drift from the unpruned model's hidden states each refit corrects too (fold; None:
    #: plans fitted before it existed, which corrected none)
    drift: float | None = Field(None, ge=0, le=1)
    #: the kept layers right above changed ones got a refit too (fold, with drift)
    refit_kept: bool = False
    #: the refits weighed each token's squared error by 1 / rms(h)^p, h the hidden state they add to
    #: (fold; None: plans fitted before it existed, which weighed every token alike)
    rms_power: float | None = Field(None, ge=0)
    #: each repair fitted on the inputs the already-repaired earlier layers give
    sequential: bool = True
    #: what sampled the synthetic calibration text (``llama.cpp (llama-cpp-python <version>)``; None: data,
    #: or plans healed before it was recorded)
    generator: str | None = None
    seconds: float = Field(0.0, ge=0)
    #: the safetensors file of the repairs: relative to the plan file's folder in the JSON, absolute in a
    #: plan loaded from a file
    weights: str

    def ridges(self) -> str:
        """``ridge R`` (and ``, fold ridge F, drift D, rms power P``), as a log line or a model card says
        it."""
        fold = "" if self.fold_ridge is None else f", fold ridge {self.fold_ridge:g}"
        drift = f", drift {self.drift:g}" if self.drift else ""
        power = f", rms power {self.rms_power:g}" if self.rms_power else ""
        return f"ridge {self.ridge:g}{fold}{drift}{power}"


class Recovery(BaseModel):
    """What a recovered plan's distillation trained (`gatenorm.recover`): low-rank adapters on `targets` of
    `layers`, trained to match the unpruned model's next-token distributions, merged into the weights.

    The merged tensors (float32, HF layout) live in the safetensors file `weights` under their state-dict
    names; `tensors` maps each name to the sha256 of its float32 bytes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["lora-kd"] = "lora-kd"
    layers: list[int]
    #: the adapted modules of each layer (e.g. ``o_proj``)
    targets: list[str]
    rank: int = Field(ge=1)
    alpha: float = Field(gt=0)
    steps: int = Field(ge=1)
    lr: float = Field(gt=0)
    batch: int = Field(ge=1)
    seed: int = 0
    #: calibration text: 'synthetic', 'wiki-heldout' or 'file:<sha256>'
    calib: str
    samples: int = Field(ge=1)
    length: int = Field(ge=2)
    #: what sampled the synthetic text (``llama.cpp (llama-cpp-python <version>)``; None: data)
    generator: str | None = None
    #: the teacher's distribution as cached: its top-k tokens and the rest as one bucket (None: in full)
    top_k: int | None = Field(None, ge=1)
    #: KL(teacher || student) per token, before the first step and over the last steps
    initial_loss: float = Field(ge=0)
    loss: float = Field(ge=0)
    device: str = "cpu"
    seconds: float = Field(0.0, ge=0)
    #: state-dict name -> sha256 of the merged tensor's float32 bytes (C order, little endian)
    tensors: dict[str, str]
    #: the safetensors file of the merged tensors: relative to the plan file's folder in the JSON, absolute in
    #: a plan loaded from a file
    weights: str


class LayerPlan(BaseModel):
    """One layer's score and action."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layer: int
    score: float
    action: LayerAction
    #: HARP's rescaling of a linearized attention sublayer; set exactly when action is linearize.
    alpha: float | None = None
    #: the fitted map the layer applies instead of what it lost (healed plans); never on a kept layer
    repair: Repair | None = None
    #: the layer's refitted down projection (healed plans, form fold); on any layer
    refit: Refit | None = None

    @model_validator(mode="after")
    def _alpha(self) -> LayerPlan:
        if self.repair is not None and self.action is LayerAction.KEEP:
            raise ValueError(f"layer {self.layer}: a kept layer has no repair")
        if self.refit is not None and self.action is LayerAction.DROP_BLOCK:
            raise ValueError(f"layer {self.layer}: a dropped block has no down projection to refit")
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

    schema_version: Literal[1, 2, 3] = PLAN_SCHEMA_VERSION  # 1: keep / drop-attention only; 3: healed
    tool_version: str = __version__
    method: str
    seed: int | None = None
    budget: int
    source: Source
    layers: list[LayerPlan]
    #: set exactly when layers carry repairs (schema 3)
    healing: Healing | None = None
    #: distillation merged into the weights (after healing, if any)
    recovery: Recovery | None = None
    #: the calibration text of a calibrated method (None: weights only, or plans made before it was
    #: recorded)
    calibration: CalibrationRecord | None = None

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
        if (self.healing is None) == bool(self.repaired or self.refitted):
            raise ValueError("healing goes with layer repairs or refits and only with them")
        if self.healing is not None and self.schema_version != HEALED_SCHEMA_VERSION:
            raise ValueError(f"a healed plan has schema_version {HEALED_SCHEMA_VERSION}")
        return self

    def from_hub(self, hub: HubSource | None) -> Plan:
        """This plan with its source's hub provenance set (`hub` None: as it is)."""
        if hub is None:
            return self
        return self.model_copy(update={"source": self.source.model_copy(update={"hub": hub})})

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
    def repaired(self) -> list[int]:
        """Indices of the layers that apply a fitted repair (healed plans)."""
        return [lp.layer for lp in self.layers if lp.repair is not None]

    @property
    def refitted(self) -> list[int]:
        """Indices of the layers whose MLP down projection is refitted (healed plans, form fold)."""
        return [lp.layer for lp in self.layers if lp.refit is not None]

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
        if self.healing is not None:
            how = [f"{len(self.repaired)} fitted maps"] if self.repaired else []
            how += [f"{len(self.refitted)} refitted down projections"] if self.refitted else []
            parts.append(f"healed with {' and '.join(how)} (fitted on {self.healing.calib} text)")
        if self.recovery is not None:
            r = self.recovery
            parts.append(
                f"recovered {len(r.tensors)} tensors by distillation ({r.steps} steps, rank {r.rank})"
            )
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
    def from_json(cls, text: str, folder: Path | None = None) -> Plan:
        """The plan in `text`; a healed plan's weights file is resolved against `folder` (its file's)."""
        try:
            plan = cls.model_validate_json(text)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "plan"
            raise GatenormError(f"invalid plan: {where}: {first['msg']}") from None
        if plan.healing is not None and folder is not None:
            plan = plan.with_weights(Path(folder) / plan.healing.weights)
        if plan.recovery is not None and folder is not None:
            plan = plan.with_recovery_weights(Path(folder) / plan.recovery.weights)
        return plan

    def with_weights(self, weights: Path) -> Plan:
        """This healed plan with its weights file at `weights` (absolute)."""
        healing = self.healing.model_copy(update={"weights": str(Path(weights).absolute())})
        return self.model_copy(update={"healing": healing})

    def with_recovery_weights(self, weights: Path) -> Plan:
        """This recovered plan with its merged tensors' file at `weights` (absolute)."""
        recovery = self.recovery.model_copy(update={"weights": str(Path(weights).absolute())})
        return self.model_copy(update={"recovery": recovery})

    def save(self, path: str | os.PathLike) -> None:
        """Write the plan as JSON, atomically; a healed plan names its weights file relative to `path`'s
        folder (keep the two together when moving them)."""
        path = Path(path)
        plan = self
        for field in ("healing", "recovery"):
            record = getattr(plan, field)
            if record is not None:
                weights = os.path.relpath(Path(record.weights).absolute(), path.absolute().parent)
                plan = plan.model_copy(update={field: record.model_copy(update={"weights": weights})})
        atomic_write_text(path, plan.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        path = Path(path)
        if not path.is_file():
            raise GatenormError(f"no such plan file: {path}")
        if path.stat().st_size > MAX_PLAN_BYTES:
            raise GatenormError(f"{path} is {path.stat().st_size} bytes: too big for a plan file")
        try:
            return cls.from_json(read_text_file(path, "plan file"), path.parent)
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
