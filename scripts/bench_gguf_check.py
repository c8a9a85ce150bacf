"""What the GGUF header checks cost when opening SmolLM2, as shares of ``gatenorm score smollm2``.

    python scripts/bench_gguf_check.py [--rounds 5]

Interleaved in each round: ``gatenorm score smollm2`` as a subprocess (wall time), then in this process
the checked header scan (`ScannedGGUF`: bounded reads, UTF-8 of every string, types, offsets), the
hyper-parameter and tensor-shape checks on the opened checkpoint, the whole checked open
(`open_checkpoint`), and gguf-py's ``GGUFReader`` (how the score path opened the file before). Prints the
median of each and its ratio to the score wall time. Figures from a loaded machine are noisy: compare
ratios from one run.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import gguf  # noqa: E402

from gatenorm.models import smollm2  # noqa: E402
from gatenorm.readers import open_checkpoint  # noqa: E402
from gatenorm.readers.gguf_check import ScannedGGUF, check_gguf_tensors, check_hparams  # noqa: E402


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    path = smollm2()
    ckpt = open_checkpoint(path)
    command = [sys.executable, "-m", "gatenorm.cli", "score", "smollm2"]
    times: dict[str, list[float]] = {k: [] for k in ("score", "scan", "checks", "open", "gguf-py")}
    for _ in range(args.rounds):
        times["score"].append(
            _timed(lambda: subprocess.run(command, cwd=ROOT, capture_output=True, check=True))
        )
        times["scan"].append(_timed(lambda: ScannedGGUF(path)))
        times["checks"].append(_timed(lambda: (check_hparams(ckpt.reader), check_gguf_tensors(ckpt))))
        times["open"].append(_timed(lambda: open_checkpoint(path)))
        times["gguf-py"].append(_timed(lambda: gguf.GGUFReader(path)))
    score = statistics.median(times["score"])
    labels = {
        "score": "gatenorm score smollm2 (subprocess, wall)",
        "scan": "checked header scan (ScannedGGUF)",
        "checks": "hyper-parameter + tensor-shape checks",
        "open": "whole checked open (open_checkpoint)",
        "gguf-py": "gguf-py GGUFReader (the score path's open before)",
    }
    print(f"{args.rounds} interleaved rounds, medians, share of the score wall time:")
    for key, label in labels.items():
        median = statistics.median(times[key])
        print(f"  {label:52s} {median * 1000:9.1f} ms  {median / score:7.2%}")


if __name__ == "__main__":
    main()
