"""Pass/fail gates on the validation results: each names the metric, the measured value and the limit."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from pydantic import BaseModel, ConfigDict, Field


class Gates(BaseModel):
    """Limits a candidate must meet; None disables a gate. Defaults catch a broken model, not a pruned one.
    (`gatenorm validate --max-kld ...`, recipes' ``validation.gates``: this one model.)"""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    max_kld: float | None = Field(0.5, description="Gate: mean KLD at most this.")
    min_top1: float | None = Field(0.70, description="Gate: top-1 agreement (0..1) at least.")
    max_ppl_ratio: float | None = Field(1.5, description="Gate: PPL ratio at most.")
    max_acc_drop: float | None = Field(
        5.0, description="Gate: drop of the average accuracy, in points, at most."
    )
    min_retrieval: float | None = Field(
        None, description="Gate: passkey exact-match accuracy of the candidate minus the reference's, points."
    )


@dataclass(frozen=True)
class GateResult:
    name: str
    metric: str
    value: float | None  # None: the metric was not measured in this run
    limit: float
    passed: bool | None  # None: not evaluated

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        if self.passed is None:
            return f"{self.name}: not evaluated ({self.metric} was not measured)"
        op = "<=" if self.name.startswith("max") else ">="
        verdict = "ok" if self.passed else "FAILED"
        return f"{self.name}: {self.metric} = {self.value:.4g} (limit {op} {self.limit:g}) {verdict}"


def check_gates(
    gates: Gates, agreement: dict | None, zeroshot: dict | None, retrieval: dict | None = None
) -> list[GateResult]:
    """Evaluate every enabled gate on the report sections (`agreement`, `zeroshot`, `retrieval`), which may
    be absent."""
    measured = {
        "max_kld": ("mean KLD", agreement and agreement["kld_mean"]),
        "min_top1": ("top-1 agreement", agreement and agreement["top1"]),
        "max_ppl_ratio": ("PPL(cand)/PPL(ref)", agreement and agreement["ppl_ratio"]),
        "max_acc_drop": ("average accuracy drop (points)", zeroshot and zeroshot["average"]["drop_points"]),
        "min_retrieval": (
            "retrieval accuracy change (points)",
            retrieval and retrieval["average"]["change_points"],
        ),
    }
    results = []
    for name, limit in gates.model_dump().items():
        if limit is None:
            continue
        metric, value = measured[name]
        if value is None:
            results.append(GateResult(name, metric, None, limit, None))
            continue
        passed = value <= limit if name.startswith("max") else value >= limit
        results.append(GateResult(name, metric, float(value), limit, bool(passed)))
    return results
