"""The typed validation report `validate` returns and every consumer reads by attribute. It serializes to the
same JSON keys the report has always had (``validation.json``), so a stored report is read back with
`ValidationReport.read`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from gatenorm.io import atomic_write_text
from gatenorm.validate.agreement import Agreement
from gatenorm.validate.metrics import gate_metric
from gatenorm.validate.zeroshot import TaskScore


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelInfo(_Section):
    """A model as the report names it."""

    path: str
    runtime: str
    plan: str | None = None


class TaskResult(_Section):
    reference: TaskScore
    candidate: TaskScore
    drop_points: float


class Average(_Section):
    """The mean headline accuracy of the tasks, its standard error (absent in reports written before it was
    stored) and the drop in points."""

    reference: float
    candidate: float
    reference_err: float | None = None
    candidate_err: float | None = None
    drop_points: float

    def percent(self, side: str) -> str:
        """`side`'s average in percent with its standard error where stored."""
        err = getattr(self, f"{side}_err")
        return f"{100 * getattr(self, side):.1f}" + ("" if err is None else f" ± {100 * err:.1f}")


class Zeroshot(_Section):
    tasks: dict[str, TaskResult]
    average: Average


class RetrievalGrid(_Section):
    """Exact-match accuracy of one model per prompt length (rows) and depth of the key (columns)."""

    lengths: list[int]
    depths: list[float]
    accuracy: list[list[float]]
    acc: float
    acc_err: float
    n: int


class RetrievalTask(_Section):
    reference: RetrievalGrid
    candidate: RetrievalGrid
    drop_points: float


class RetrievalAverage(_Section):
    reference: float
    candidate: float
    change_points: float


class Retrieval(_Section):
    tasks: dict[str, RetrievalTask]
    average: RetrievalAverage


class Bench(_Section):
    """Median latency, memory and size of each model (keys as `gatenorm.validate.bench` names them) and the
    ratios candidate / reference; `flash_off`: the KV cache with flash attention off (llama.cpp)."""

    config: dict[str, Any]
    reference: dict[str, float | int]
    candidate: dict[str, float | int]
    ratio: dict[str, float | int]
    flash_off: dict[str, Any] | None = None


class GateResult(_Section):
    """One gate: the limit set on a metric (`gatenorm.validate.metrics`), the value measured, the verdict."""

    name: str
    metric: str
    value: float | None  # None: the metric was not measured in this run
    limit: float
    passed: bool | None  # None: not evaluated

    def describe(self) -> str:
        if self.passed is None:
            return f"{self.name}: not evaluated ({self.metric} was not measured)"
        op = "<=" if gate_metric(self.name).bound == "max" else ">="
        verdict = "ok" if self.passed else "FAILED"
        return f"{self.name}: {self.metric} = {self.value:.4g} (limit {op} {self.limit:g}) {verdict}"


class ValidationReport(_Section):
    """Everything one validation measured of a candidate against a reference, and the gates' verdict."""

    gatenorm_version: str
    created: str
    reference: ModelInfo
    candidate: ModelInfo
    settings: dict[str, Any]
    agreement: Agreement | None = None
    zeroshot: Zeroshot | None = None
    retrieval: Retrieval | None = None
    bench: Bench | None = None
    gates: list[GateResult]
    gate_lines: list[str]
    failed_gates: list[str]
    passed: bool
    seconds: dict[str, float]
    cpu_seconds: dict[str, float] = {}
    recipe_validation_key: str | None = None  # a recipe's: the measurement it holds (`recipes.batch`)

    def with_gates(self, results: list[GateResult]) -> ValidationReport:
        """This report judged by the gate `results` instead."""
        return self.model_copy(
            update={
                "gates": results,
                "gate_lines": [g.describe() for g in results],
                "failed_gates": [g.name for g in results if g.passed is False],
                "passed": all(g.passed is not False for g in results),
            }
        )

    def to_json(self) -> str:
        """The JSON of ``validation.json``: what was set (an optional key never given, such as a
        `recipe_validation_key` outside recipes, stays out); floats as `json` writes them."""
        return json.dumps(self.model_dump(exclude_unset=True), indent=2) + "\n"

    def write(self, path: Path) -> None:
        atomic_write_text(path, self.to_json())

    @classmethod
    def read(cls, path: Path) -> ValidationReport | None:
        """The report stored at `path`, or None when absent, unreadable or not a report."""
        try:
            return cls.model_validate(json.loads(path.read_text()))
        except (OSError, ValueError):
            return None
