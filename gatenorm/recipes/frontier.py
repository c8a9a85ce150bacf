"""Pruning next to quantization: every GGUF variant of a batch (the unpruned quantization ladder and the
pruned ones) as a point (mean KLD vs source, speed vs source) per benchmark phase and context depth, with
the Pareto front, a plot, and which pruned variants are on a front that quantization alone does not reach.

All GGUF variants are measured interleaved with the same reference (the source in llama.cpp), so their
speed ratios are comparable with each other."""

from __future__ import annotations

from pathlib import Path

from gatenorm.plot import pareto_front, pyplot
from gatenorm.recipes.batch import BatchPlan
from gatenorm.recipes.build import read_report
from gatenorm.recipes.plots import _save
from gatenorm.validate.bench import pp_key, tg_key
from gatenorm.validate.metrics import METRICS

#: The quality axis of the front: a lower-is-better metric of `gatenorm.validate.metrics`.
QUALITY = METRICS["kld"]


def frontier_points(plan: BatchPlan, out: Path) -> dict[str, list[dict]]:
    """metric label ('tg64 @ d2048', 'pp512') -> points {name, pruned, quant, dropped, kld, speed}, ``kld``
    being the value of `QUALITY`."""
    by_metric: dict[str, list[dict]] = {}
    for v in plan.variants:
        report = read_report(out / v.folder)
        quality = QUALITY.value(report) if report else None
        b = report.bench if report else None
        if v.export.target != "gguf" or quality is None or not b:
            continue
        cfg = b.config
        metrics = [(f"tg{cfg['generate']} @ d{d}", tg_key(cfg["generate"], d)) for d in cfg["depths_run"]]
        metrics += [(f"pp{n}", pp_key(n)) for n in cfg["prompts"]]
        for label, key in metrics:
            if key in b.ratio:
                by_metric.setdefault(label, []).append(
                    {
                        "name": v.name,
                        "pruned": v.budget > 0,
                        "quant": v.export.quant,
                        "method": v.method,
                        "dropped": v.budget,
                        "kld": quality,
                        "speed": b.ratio[key],
                    }
                )
    return by_metric


def frontier_md(by_metric: dict[str, list[dict]]) -> list[str]:
    """Per metric: the Pareto front (lower KLD, higher speed), and the pruned variants on it."""
    if not by_metric:
        return []
    lines = [
        f"## Pruning next to quantization (Pareto front of {QUALITY.label} vs speed, x source)",
        "",
        "| metric | Pareto front (KLD, speed) | pruned variants on the front |",
        "|---|---|---|",
    ]
    for label, pts in by_metric.items():
        front = [pts[i] for i in pareto_front([(p["kld"], p["speed"]) for p in pts])]
        shown = ", ".join(f"{_short(p)} ({p['kld']:.3f}, {p['speed']:.2f}x)" for p in front)
        pruned = [_short(p) for p in front if p["pruned"]]
        lines.append(f"| {label} | {shown} | {', '.join(pruned) or 'none'} |")
    lines.append("")
    return lines


def _short(p: dict) -> str:
    return f"{p['quant']}" if not p["pruned"] else f"{p['method']}-d{p['dropped']:02d} {p['quant']}"


def plot_frontier(by_metric: dict[str, list[dict]], path: Path) -> None:
    """One panel per metric: the ladder and the pruned variants, KLD against speed, the front drawn."""
    plt = pyplot()
    n = len(by_metric)
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 4.2), dpi=100, squeeze=False)
    for ax, (label, pts) in zip(axes[0], by_metric.items(), strict=True):
        for pruned, marker, name in ((False, "s", "unpruned (quantization)"), (True, "o", "pruned")):
            mine = [p for p in pts if p["pruned"] is pruned]
            ax.scatter(
                [p["kld"] for p in mine], [p["speed"] for p in mine], marker=marker, label=name, zorder=3
            )
            for p in mine:
                ax.annotate(
                    _short(p), (p["kld"], p["speed"]), fontsize=6, xytext=(3, 3), textcoords="offset points"
                )
        front = [pts[i] for i in pareto_front([(p["kld"], p["speed"]) for p in pts])]
        ax.step([p["kld"] for p in front], [p["speed"] for p in front], where="post", color="k", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel(f"{QUALITY.label} vs source (log)")
        ax.set_ylabel("speed vs source (x)")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Pruning next to quantization")
    _save(fig, path)
