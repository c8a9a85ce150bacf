"""Pruning next to quantization, timed in one interleaved run: every GGUF variant of a recipe's output
folder (e.g. ``gatenorm run recipes/smollm2-frontier.yaml``) and the source, speeds as ratios over the
source, next to each variant's mean KLD from its validation report, with the Pareto front per metric.

A recipe times each variant against the source in its own validation step, so on a machine that is busy
with anything else the ratios of different variants are not comparable; here every model is loaded once
(llama-cpp-python, 2 threads, flash attention on, one process per model) and each repetition runs them all
in turn: prompt processing at `--prompt` tokens, decoding `--gen` tokens at each of `--depths`.

    python scripts/bench_frontier.py out/smollm2-frontier [--reps 3] [--depths 0,4096] [--prompt 512]

Ratios only: the interleaving makes them comparable; absolute tokens/s depend on the machine.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gatenorm.plot import pareto_front
from gatenorm.recipes.frontier import QUALITY
from gatenorm.validate.bench import (
    add_script_bench_args,
    bench_interleaved,
    bench_tokens,
    script_bench_config,
)
from gatenorm.validate.result import ValidationReport
from gatenorm.validate.runtimes import ModelSpec

THREADS = 2


def variants(out: Path) -> dict[str, tuple[Path, float, bool]]:
    """Variant name -> (its GGUF, mean KLD vs the source, pruned) for every validated GGUF variant."""
    found = {}
    for path in sorted(out.glob("*/validation.json")):
        report = ValidationReport.read(path)
        quality = QUALITY.value(report) if report else None
        ggufs = sorted(path.parent.glob("*.gguf"))
        if not ggufs or quality is None:
            continue
        name = path.parent.name
        found[name] = (ggufs[0], quality, "-d00-" not in name)
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="a recipe's output folder")
    p.add_argument("--source", type=Path, help="the source GGUF (default: the recipe's reference)")
    add_script_bench_args(p)
    args = p.parse_args()
    found = variants(args.out)
    if args.source is None:
        reference = json.loads(next(args.out.glob("*/validation.json")).read_text())["reference"]
        args.source = Path(reference["path"] if isinstance(reference, dict) else reference)
    models = {"source": args.source} | {name: f for name, (f, _, _) in found.items()}
    cfg = script_bench_config(args)
    specs = {name: ModelSpec(path, "llama.cpp") for name, path in models.items()}
    med, _, _ = bench_interleaved(specs, bench_tokens(args.source, cfg), cfg, THREADS)
    med = {n: {k: v for k, v in m.items() if "_tok_s" in k} for n, m in med.items()}
    metrics = list(med["source"])
    print(
        f"{args.out.name}: {len(found)} GGUF variants and the source, llama-cpp-python {THREADS} threads, "
        f"flash attention, median of {args.reps} interleaved runs after 1 warm-up; speed x source"
    )
    print("source: " + ", ".join(f"{k} {v:.1f} tok/s" for k, v in med["source"].items()))
    print(f"{'variant':<44} {'KLD':>7} " + " ".join(f"{m:>13}" for m in metrics))
    for name, (_, kld, _) in found.items():
        ratios = " ".join(f"{med[name][m] / med['source'][m]:>13.3f}" for m in metrics)
        print(f"{name:<44} {kld:>7.3f} {ratios}")
    print("\nPareto front (lower KLD, higher speed) per metric; * = pruned")
    names = list(found)
    for m in metrics:
        pts = [(found[n][1], med[n][m] / med["source"][m]) for n in names]
        front = [names[i] for i in pareto_front(pts)]
        shown = ", ".join(
            f"{'*' if found[n][2] else ''}{n} ({found[n][1]:.3f}, {med[n][m] / med['source'][m]:.2f}x)"
            for n in front
        )
        print(f"  {m}: {shown}")


if __name__ == "__main__":
    main()
