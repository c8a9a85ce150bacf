"""The batch's figures: scores per layer, quality against dropped layers, speed against quality (Pareto)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from gatenorm.io import atomic_path
from gatenorm.plot import pareto_front, pyplot

__all__ = ["pareto_front"]


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})  # no version/date: stable bytes
    pyplot().close(fig)


def plot_layer_scores(model: str, methods: dict[str, tuple[list[float], dict[int, int]]], path: Path) -> None:
    """One bar chart per method: each layer's score, coloured by the smallest budget that drops it.

    `methods`: method -> (scores, {layer: smallest budget dropping it})."""
    plt = pyplot()
    n_layers = max(len(s) for s, _ in methods.values())
    fig, axes = plt.subplots(
        len(methods), 1, figsize=(max(6.0, 0.28 * n_layers), 2.6 * len(methods)), dpi=110, squeeze=False
    )
    from matplotlib.patches import Patch

    budgets = sorted({b for _, first in methods.values() for b in first.values()})
    palette = ["#d62728", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf", "#7f7f7f"]
    color = {b: palette[i % len(palette)] for i, b in enumerate(budgets)}
    handles = [Patch(color=color[b], label=f"dropped from budget {b}") for b in budgets]
    handles.append(Patch(color="tab:blue", label="kept"))
    for ax, (method, (scores, first)) in zip(axes[:, 0], methods.items(), strict=True):
        ax.bar(
            range(len(scores)),
            scores,
            color=[color.get(first.get(i), "tab:blue") for i in range(len(scores))],
        )
        ax.set_ylabel(f"{method} score")
        ax.set_title(f"{model}: {method} score per layer (lowest dropped first)")
        ax.set_xticks(range(len(scores)))
        ax.tick_params(axis="x", labelsize=7)
        ax.legend(handles=handles, fontsize=7, ncols=min(len(handles), 5))
    axes[-1, 0].set_xlabel("layer")
    _save(fig, path)


Point = dict  # {"series", "dropped", "kld", "top1", "zeroshot", "speedup_pp", "speedup_tg", "label"}


def plot_quality(points: Sequence[Point], path: Path) -> None:
    """Mean KLD (and zero-shot average, when measured) against the number of dropped layers, per series."""
    plt = pyplot()
    panels = [("kld", "mean KLD vs source")]
    if any(p.get("zeroshot") is not None for p in points):
        panels.append(("zeroshot", "zero-shot average (%)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.0), dpi=110, squeeze=False)
    series = defaultdict(list)
    for p in points:
        series[p["series"]].append(p)
    for ax, (key, label) in zip(axes[0], panels, strict=True):
        for name, pts in series.items():
            pts = sorted((p for p in pts if p.get(key) is not None), key=lambda p: p["dropped"])
            if pts:
                scale = 100 if key == "zeroshot" else 1
                ax.plot([p["dropped"] for p in pts], [scale * p[key] for p in pts], marker="o", label=name)
        ax.set_xlabel("attention sublayers dropped")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle("Quality against budget")
    _save(fig, path)


def plot_speed_quality(points: Sequence[Point], path: Path) -> None:
    """Speedup (prompt, generation) against mean KLD; the Pareto front of each panel is drawn and ringed."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12.4, 4.4), dpi=110, squeeze=False)
    for ax, (key, label) in zip(
        axes[0], [("speedup_pp", "prompt speedup"), ("speedup_tg", "generation speedup")], strict=True
    ):
        pts = [p for p in points if p.get(key) is not None and p.get("kld") is not None]
        series = sorted({p["series"] for p in pts})
        for name in series:
            mine = [p for p in pts if p["series"] == name]
            ax.scatter([p["kld"] for p in mine], [p[key] for p in mine], label=name, zorder=3)
            for p in mine:
                ax.annotate(
                    str(p["dropped"]),
                    (p["kld"], p[key]),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
        front = [pts[i] for i in pareto_front([(p["kld"], p[key]) for p in pts])]
        if front:
            ax.step(
                [p["kld"] for p in front], [p[key] for p in front], where="post", color="k", lw=1, zorder=2
            )
            ax.scatter(
                [p["kld"] for p in front],
                [p[key] for p in front],
                s=140,
                facecolors="none",
                edgecolors="k",
                label="Pareto front",
                zorder=4,
            )
        ax.set_xlabel("mean KLD vs source (lower is better)")
        ax.set_ylabel(f"{label} vs 0 dropped (x)")
        ax.grid(alpha=0.3)
        if pts:
            ax.legend(fontsize=7)
    fig.suptitle("Speed against quality (labels: attention sublayers dropped)")
    _save(fig, path)
