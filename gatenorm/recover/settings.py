"""How a plan is recovered: the one settings model from which the ``--recover-*`` flags and a recipe
entry's ``recover:`` are generated."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from gatenorm.heal.fit import CalibrationText

#: `RecoverySettings.layers`' named choices
LAYER_CHOICES = ("adjacent", "kept")


class RecoverySettings(CalibrationText):
    """How a plan's recovery is trained (`gatenorm plan/export --recover`, a recipe method's ``recover:``);
    its text is the healing's by default (the same calibration fields and defaults: one text for both)."""

    length: int = Field(
        256, ge=8, description="Tokens per calibration window.", json_schema_extra={"flag": "--recover-len"}
    )
    seed: int = Field(0, description="Seed of the synthetic text, the adapters' start and the batch order.")
    steps: int = Field(100, ge=0, description="Optimizer steps (0 changes nothing: the plan as it is).")
    batch: int = Field(2, ge=1, description="Windows per step.")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate (decayed linearly to 0).")
    rank: int = Field(8, ge=1, description="Rank of each low-rank adapter.")
    alpha: float = Field(16.0, gt=0, description="Adapter scale numerator: merged W + alpha/rank * B @ A.")
    layers: str = Field(
        "adjacent",
        description="Adapted layers: adjacent (each kept layer next to a changed one), kept (every kept "
        "layer) or a comma list of layer indices.",
    )
    targets: list[str] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj"],
        min_length=1,
        description="Adapted linear modules of each adapted layer, by name.",
    )
    top_k: int = Field(
        64,
        ge=1,
        description="The teacher's distribution is cached as its top-k tokens plus one bucket for the rest "
        "when in full it would exceed --recover-cache-mb.",
    )
    cache_mb: int = Field(512, ge=1, description="Largest teacher cache kept in full, in MiB.")
    device: Literal["cpu", "cuda"] = Field("cpu", description="Where to train (cuda: a GPU torch sees).")

    @field_validator("layers")
    @classmethod
    def _layers(cls, value: str) -> str:
        if value not in LAYER_CHOICES and not all(p.strip().isdigit() for p in value.split(",")):
            raise ValueError(f"layers must be {', '.join(LAYER_CHOICES)} or a comma list of layer indices")
        return value
