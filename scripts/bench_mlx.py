"""Benchmark: pruned SmolLM2 MLX exports in mlx-lm against the cost model's ideal speedup.

Exports SmolLM2-135M-Instruct with 0, 8 and 16 attention sublayers dropped (Gate-Norm plans, `make_plan`)
as MLX folders (``--quant``, fp32 by default: mlx's CPU backend has no fast bf16 matmul), loads each with
``mlx_lm.load`` and measures, models interleaved within each repetition, all in one process:

- prefill: a chunk of ``--chunk`` tokens after a cache of `depth` tokens (depth 0 and 2048), seconds;
- decode: ``--decode-steps`` greedy one-token steps at that depth, seconds per step.

The cache is mlx-lm's own (`make_prompt_cache`); the depth is filled untimed once per model and depth, and
trimmed back to it after each prefill chunk and decode run. Each speedup over the 0-drop export is printed
(median and the min-max spread over repetitions) next to the ideal of `gatenorm.methods.cost`: prefill FLOPs
of the chunk (ctx = 2 x depth + chunk, so that a token attends to depth + chunk / 2 keys on average) and
decode's FLOP/byte model at the depth with the folder's bytes per weight. mlx runs on its default device
(the CPU here; the GPU on Apple silicon). Usage: ``python scripts/bench_mlx.py [--reps 3] [--drops 0,8,16]
[--depths 0,2048] [--chunk 256] [--decode-steps 16] [--quant fp32] [--blas openblas] [--workdir DIR]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

#: Debian's OpenBLAS as a drop-in libblas (package libopenblas0-pthread). mlx[cpu]'s Linux wheel bundles the
#: reference (netlib) BLAS, about 10x slower at fp32 matmul here (2.4 against 30 GFLOPS, 1024^3 on one run).
OPENBLAS = Path("/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3")

BYTES_PER_WEIGHT = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "8bit": 8.5 / 8, "4bit": 4.5 / 8}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def filled_cache(model, depth: int) -> tuple[list, object]:
    """mlx-lm's own cache of `model` holding `depth` random tokens (filled in mlx-lm's prefill-sized
    pieces), and the tokens that follow them."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    tokens = mx.random.randint(100, 40000, (1, depth + 1024), key=mx.random.key(depth))
    cache = make_prompt_cache(model)
    for start in range(0, depth, 512):
        mx.eval(model(tokens[:, start : min(start + 512, depth)], cache=cache))
    return cache, tokens[:, depth:]


def measure(model, cache: list, after, chunk: int, steps: int) -> tuple[float, float]:
    """(seconds of a `chunk`-token prefill on top of `cache`, seconds per decode step there); `cache` is
    trimmed back to its depth afterwards, so one fill serves every repetition."""
    import mlx.core as mx

    prefill = _timed(lambda: mx.eval(model(after[:, :chunk], cache=cache)))
    for c in cache:
        c.trim(chunk)
    decode = []
    for i in range(steps):
        token = after[:, i : i + 1]
        decode.append(_timed(lambda token=token: mx.eval(model(token, cache=cache))))
    for c in cache:
        c.trim(steps)
    return prefill, statistics.median(decode)


def ideal(ckpt, plan, depth: int, chunk: int, quant: str) -> tuple[float, float]:
    """The cost model's (prefill, decode) speedup of `plan` at `depth`."""
    from gatenorm.methods.cost import cost_model

    prefill = cost_model(ckpt, ctx=2 * depth + chunk)
    decode = dataclasses.replace(
        cost_model(ckpt, ctx=max(depth, 1), phase="decode"), weight_bytes=BYTES_PER_WEIGHT[quant]
    )
    return prefill.plan_speedup(plan), decode.plan_speedup(plan)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--drops", default="0,8,16")
    parser.add_argument("--depths", default="0,2048")
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--quant", default="fp32", choices=sorted(BYTES_PER_WEIGHT))
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument(
        "--blas",
        choices=("openblas", "bundled"),
        default="openblas" if OPENBLAS.is_file() else "bundled",
        help="mlx's BLAS on Linux: its wheel's reference BLAS, or OpenBLAS preloaded (default if installed)",
    )
    args = parser.parse_args()
    if args.blas == "openblas" and sys.platform.startswith("linux") and "LD_PRELOAD" not in os.environ:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "LD_PRELOAD": str(OPENBLAS)})
    drops = [int(d) for d in args.drops.split(",")]
    depths = [int(d) for d in args.depths.split(",")]
    if drops[0] != 0:
        sys.exit("--drops must start with 0 (the baseline)")

    from mlx_lm import load

    from exporters.export import export
    from gatenorm.methods import score_checkpoint
    from gatenorm.models import smollm2
    from gatenorm.plan import make_plan
    from gatenorm.readers import open_checkpoint

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-mlx-"))
    ckpt = open_checkpoint(smollm2())
    scores = score_checkpoint(ckpt, "gate-norm")
    plans, models = {}, {}
    for drop in drops:
        plans[drop] = make_plan(ckpt, scores, drop)
        folder = workdir / f"drop{drop}-{args.quant}"
        if not (folder / "plan.json").is_file():
            export(ckpt, plans[drop], folder, "mlx", quant=args.quant, check_source=False, overwrite=True)
        models[drop] = load(str(folder))[0]
    for drop in drops:  # warm-up: kernels, allocations
        measure(models[drop], *filled_cache(models[drop], 0), 16, 2)
    rows = []
    print(
        f"SmolLM2-135M {args.quant}, mlx {_mlx_version()} on {_device()} ({args.blas} BLAS),"
        f" {args.reps} reps (median [min-max])"
    )
    print(
        f"{'drop':>4} {'depth':>5} {'prefill s':>10} {'speedup':>20} {'ideal':>6}"
        f" {'decode ms':>10} {'speedup':>20} {'ideal':>6}",
        flush=True,
    )
    for depth in depths:  # the shallow depth first, each depth's rows printed once measured
        times: dict[int, list[tuple[float, float]]] = {d: [] for d in drops}
        caches = {drop: filled_cache(models[drop], depth) for drop in drops}
        for _ in range(args.reps):
            for drop in drops:  # interleaved: the machine's load falls on every model alike
                times[drop].append(measure(models[drop], *caches[drop], args.chunk, args.decode_steps))
        del caches
        for drop in drops:
            ideal_p, ideal_d = ideal(ckpt, plans[drop], depth, args.chunk, args.quant)
            row = {"drop": drop, "depth": depth, "ideal_prefill": ideal_p, "ideal_decode": ideal_d}
            for phase, k in (("prefill", 0), ("decode", 1)):
                ratios = [b[k] / t[k] for b, t in zip(times[0], times[drop], strict=True)]
                row[phase] = statistics.median(t[k] for t in times[drop])
                row[f"{phase}_speedup"] = statistics.median(ratios)
                row[f"{phase}_spread"] = (min(ratios), max(ratios))
            rows.append(row)
            print(
                f"{drop:>4} {depth:>5} {row['prefill']:>10.3f} {_speed(row, 'prefill'):>20} {ideal_p:>6.3f}"
                f" {1000 * row['decode']:>10.2f} {_speed(row, 'decode'):>20} {ideal_d:>6.3f}",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


def _speed(row: dict, phase: str) -> str:
    lo, hi = row[f"{phase}_spread"]
    return f"{row[f'{phase}_speedup']:.3f} [{lo:.2f}-{hi:.2f}]"


def _mlx_version() -> str:
    import mlx.core as mx

    return mx.__version__


def _device() -> str:
    import mlx.core as mx

    return str(mx.default_device())


if __name__ == "__main__":
    main()
