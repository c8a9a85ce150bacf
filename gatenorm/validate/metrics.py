"""The metric registry: every quality figure a validation yields, declared once.

A `Metric` says where its value is read in a `ValidationReport` (a section and a reader), whether higher or
lower is better, and what follows from that: its gate (``max_<name>`` for lower-is-better metrics,
``min_<name>`` for higher-is-better ones; a field of `gates_model`, hence a ``gatenorm validate`` flag and a
recipe's ``validation.gates`` key), whether a recipe's quality-target budget can search for it, its column
in a recipe's REPORT.md and its row in the model card. A new metric is one `register_metric` call.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from gatenorm.errors import GatenormError


@dataclass(frozen=True, eq=False)  # hashed by identity: the gate and target models are cached per registry
class Metric:
    """One metric: where it is read, which way is better, and its gate, search target, column and card row."""

    name: str
    label: str  # as gate lines, plots and the frontier name it: "mean KLD"
    section: Literal["agreement", "zeroshot", "retrieval"]  # the report section it is read from
    read: Callable[[Any], float]  # the section -> the value
    better: Literal["higher", "lower"]
    unit: str = ""  # what the value counts: "nats", "fraction", "points", "x" (a ratio)
    gate: bool = False  # a gate bounds it: ``max_<name>`` / ``min_<name>``
    gate_default: float | None = None  # the gate's default limit (None: off unless given)
    gate_help: str = ""
    target: dict[str, float] | None = None  # searchable by a recipe budget: its bounds (pydantic gt/le...)
    column: str | None = None  # its REPORT.md column header (None: no column)
    fmt: str = ".4f"  # the column's format, of the value times `scale`
    scale: float = 1.0
    card: Callable[[Any], tuple[str, str]] | None = field(default=None)  # section -> (measure, value)

    @property
    def bound(self) -> Literal["max", "min"]:
        """The kind of limit its gate or target sets: a maximum of what is better lower."""
        return "max" if self.better == "lower" else "min"

    @property
    def gate_name(self) -> str:
        return f"{self.bound}_{self.name}"

    def value(self, report: Any) -> float | None:
        """Its value in `report` (anything with the report's sections as attributes); None: not measured."""
        section = getattr(report, self.section, None)
        return None if section is None else float(self.read(section))

    def holds(self, value: float, limit: float) -> bool:
        """Whether `value` meets a gate or target `limit`."""
        return value <= limit if self.bound == "max" else value >= limit


#: Every registered metric by name, in declaration order (gate flags, report columns and card rows follow it).
METRICS: dict[str, Metric] = {}


def register_metric(metric: Metric) -> Metric:
    """Add `metric` to the registry; a second entry of a name is refused."""
    if metric.name in METRICS:
        raise GatenormError(f"metric {metric.name!r} registered twice")
    METRICS[metric.name] = metric
    return metric


def unregister_metric(name: str) -> None:
    """Remove a metric (tests that register a throw-away one)."""
    METRICS.pop(name, None)


def gated() -> list[Metric]:
    return [m for m in METRICS.values() if m.gate]


def gate_metric(gate: str) -> Metric:
    """The metric a gate (``max_kld``) bounds."""
    found = next((m for m in gated() if m.gate_name == gate), None)
    if found is None:
        raise GatenormError(f"unknown gate {gate!r} (known: {', '.join(m.gate_name for m in gated())})")
    return found


def search_targets() -> list[Metric]:
    """The metrics a recipe's quality-target budget can search for (read from the output agreement)."""
    return [m for m in METRICS.values() if m.target is not None]


class _Gates(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


@functools.cache
def _gates_model(metrics: tuple[Metric, ...]) -> type[BaseModel]:
    return create_model(
        "Gates",
        __base__=_Gates,
        __doc__="Limits a candidate must meet; None disables a gate. Defaults catch a broken model, not a "
        "pruned one. (`gatenorm validate --max-kld ...`, recipes' ``validation.gates``: one field per "
        "gated metric of `gatenorm.validate.metrics`.)",
        **{m.gate_name: (float | None, Field(m.gate_default, description=m.gate_help)) for m in metrics},
    )


def gates_model() -> type[BaseModel]:
    """The gates of the metrics registered now: one optional limit per gated metric (built once per
    registry contents)."""
    return _gates_model(tuple(gated()))


def _agreement(name: str) -> Callable[[Any], float]:
    return lambda a: getattr(a, name)


for _metric in (
    Metric(
        "ppl",
        "perplexity of the candidate",
        "agreement",
        _agreement("ppl_cand"),
        "lower",
        column="PPL",
        fmt=".3f",
        card=lambda a: (
            "perplexity (source -> this)",
            f"{a.ppl_ref:.3f} -> {a.ppl_cand:.3f} (x{a.ppl_ratio:.3f})",
        ),
    ),
    Metric(
        "kld",
        "mean KLD",
        "agreement",
        _agreement("kld_mean"),
        "lower",
        unit="nats",
        gate=True,
        gate_default=0.5,
        gate_help="Gate: mean KLD at most this.",
        target={"gt": 0},
        column="KLD",
        fmt=".4f",
        card=lambda a: ("mean KL divergence from the source", f"{a.kld_mean:.4f} ± {a.kld_err:.4f}"),
    ),
    Metric(
        "top1",
        "top-1 agreement",
        "agreement",
        _agreement("top1"),
        "higher",
        unit="fraction",
        gate=True,
        gate_default=0.70,
        gate_help="Gate: top-1 agreement (0..1) at least.",
        target={"gt": 0, "le": 1},
        column="top-1 %",
        fmt=".1f",
        scale=100,
        card=lambda a: ("same top token as the source", f"{100 * a.top1:.1f} %"),
    ),
    Metric(
        "ppl_ratio",
        "PPL(cand)/PPL(ref)",
        "agreement",
        _agreement("ppl_ratio"),
        "lower",
        unit="x",
        gate=True,
        gate_default=1.5,
        gate_help="Gate: PPL ratio at most.",
        target={"gt": 1},
    ),
    Metric(
        "zeroshot",
        "zero-shot average",
        "zeroshot",
        lambda z: z.average.candidate,
        "higher",
        unit="fraction",
        column="zero-shot %",
        fmt=".1f",
        scale=100,
        card=lambda z: (
            f"zero-shot average ({', '.join(z.tasks)})",
            f"{z.average.percent('reference')} -> {z.average.percent('candidate')} %",
        ),
    ),
    Metric(
        "acc_drop",
        "average accuracy drop (points)",
        "zeroshot",
        lambda z: z.average.drop_points,
        "lower",
        unit="points",
        gate=True,
        gate_default=5.0,
        gate_help="Gate: drop of the average accuracy, in points, at most.",
    ),
    Metric(
        "retrieval",
        "retrieval accuracy change (points)",
        "retrieval",
        lambda r: r.average.change_points,
        "higher",
        unit="points",
        gate=True,
        gate_help="Gate: passkey exact-match accuracy of the candidate minus the reference's, points.",
    ),
):
    register_metric(_metric)

#: The gates of the built-in metrics, bound here so that pickling finds the class (recipes' workers).
Gates = gates_model()
