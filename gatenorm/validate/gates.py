"""Pass/fail gates on the validation results: one per gated metric of `gatenorm.validate.metrics`, each
naming the metric, the measured value and the limit (a maximum or a minimum, as the metric's direction says).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from gatenorm.validate.metrics import Gates, gate_metric
from gatenorm.validate.result import GateResult

__all__ = ["Gates", "check_gates"]  # Gates: the built-in metrics' (`gates_model`: those registered now)


def check_gates(gates: BaseModel, report: Any) -> list[GateResult]:
    """Evaluate every enabled gate on `report` (a `ValidationReport`, or anything with its sections as
    attributes), whose sections may be absent."""
    results = []
    for name, limit in gates.model_dump().items():
        if limit is None:
            continue
        metric = gate_metric(name)
        value = metric.value(report)
        passed = None if value is None else metric.holds(value, limit)
        results.append(GateResult(name=name, metric=metric.label, value=value, limit=limit, passed=passed))
    return results
