"""Figures: matplotlib set up once (headless), the Pareto front every plot and table marks, and the
attention scores per layer (the Gate-Norm paper's figure)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from gatenorm.io import atomic_path
from gatenorm.scoring import LayerScores


def pyplot():
    """matplotlib's pyplot on the headless Agg backend (imported on first use: plotting is optional work)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points (loss, speedup) that no other point beats on both (lower loss, higher
    speedup), in order of increasing loss."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def plot_scores(scores: LayerScores, title: str, path: Path, dropped: list[int] | None = None) -> None:
    """Bar chart of the score of every layer, dropped layers highlighted, written atomically as PNG."""
    plt = pyplot()
    dropped = set(dropped or [])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(scores.scores)), 3.5), dpi=120)
    colors = ["tab:red" if i in dropped else "tab:blue" for i in range(len(scores.scores))]
    ax.bar(range(len(scores.scores)), scores.scores, color=colors)
    ax.set_xlabel("layer")
    ax.set_ylabel(f"{scores.method} score")
    ax.set_title(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
