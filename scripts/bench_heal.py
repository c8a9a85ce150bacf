"""What healing costs at run time: SmolLM2 exported unpruned and with Gate-Norm's `--drops` attention
sublayers dropped, unhealed and healed (`gatenorm.heal`: each dropped attention becomes one fitted d x d
matmul, llama.cpp deci linear attention), timed in one interleaved run (llama-cpp-python, 2 threads, flash
attention on, one process per model): prompt processing at `--prompt` tokens and decoding `--gen` tokens at
each of `--depths`. Prints each variant's speedup over the unpruned model, the share of the unhealed
speedup's gain the repair gives back ((s_unhealed - s_healed) / (s_unhealed - 1); target <= 2 %), and the
cost model's estimate of both, plus the fit time.

    python scripts/bench_heal.py [--reps 3] [--drops 8,16] [--depths 0,4096] [--quant Q8_0]

Ratios only: the interleaving makes them comparable; absolute tokens/s depend on the machine.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from exporters.export import export_gguf
from gatenorm.heal.fit import HealSettings, heal_plan
from gatenorm.heal.store import weights_path_for
from gatenorm.methods import Method, score_checkpoint
from gatenorm.methods.cost import cost_model
from gatenorm.models import smollm2
from gatenorm.plan import make_plan
from gatenorm.readers import open_checkpoint
from gatenorm.validate.bench import BenchConfig, bench_interleaved, bench_tokens, pp_key, tg_key
from gatenorm.validate.runtimes import ModelSpec

THREADS = 2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3, help="timed repetitions (after one warm-up)")
    p.add_argument("--gen", type=int, default=32)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--depths", default="0,4096")
    p.add_argument("--drops", default="8,16")
    p.add_argument("--quant", default="Q8_0")
    args = p.parse_args()
    source_path = smollm2()
    source = open_checkpoint(source_path)
    scores = score_checkpoint(source, Method.GATE_NORM, 0)
    with tempfile.TemporaryDirectory() as tmp:
        plans, fit_s = {"unpruned": make_plan(source, scores, 0)}, {}
        for n in (int(d) for d in args.drops.split(",")):
            plans[f"{n} dropped"] = plan = make_plan(source, scores, n)
            start = time.perf_counter()
            weights = weights_path_for(Path(tmp) / f"d{n}.json")
            plans[f"{n} healed"] = heal_plan(source_path, plan, HealSettings(), weights)
            fit_s[n] = time.perf_counter() - start
        files = {
            name: export_gguf(source, plan, Path(tmp) / f"{i}.gguf", args.quant)
            for i, (name, plan) in enumerate(plans.items())
        }
        cfg = BenchConfig(
            prompts=[args.prompt],
            depths=[int(d) for d in args.depths.split(",")],
            generate=args.gen,
            runs=args.reps,
            warmup=1,
            compare_flash=False,
        )
        specs = {name: ModelSpec(f, "llama.cpp") for name, f in files.items()}
        med, depths, _ = bench_interleaved(specs, bench_tokens(files["unpruned"], cfg), cfg, THREADS)
    metrics = [(pp_key(args.prompt), f"pp{args.prompt}", "prefill", args.prompt)]
    metrics += [(tg_key(args.gen, d), f"tg{args.gen} @ d{d}", "decode", d) for d in depths]
    base = med["unpruned"]
    print(
        f"SmolLM2-135M {args.quant}, Gate-Norm order, llama-cpp-python {THREADS} threads, flash attention, "
        f"median of {args.reps} interleaved runs after 1 warm-up; speedup over unpruned (cost model)"
    )
    fits = ", ".join(f"{n} layers {s:.1f} s" for n, s in fit_s.items())
    print(f"fit time (synthetic text generation included): {fits}")
    print(f"{'metric':<14} {'variant':<11} {'speedup':>8} {'estimate':>9} {'gain given back':>16}")
    for key, label, phase, ctx in metrics:
        model = cost_model(source, ctx, phase)
        for name in plans:
            if name == "unpruned":
                continue
            s = med[name][key] / base[key]
            line = f"{label:<14} {name:<11} {s:>8.3f} {model.plan_speedup(plans[name]):>9.3f}"
            if name.endswith("healed"):
                plain = med[name.replace("healed", "dropped")][key] / base[key]
                line += f" {(plain - s) / (plain - 1):>15.1%}" if plain > 1 else f" {'-':>15}"
            print(line)


if __name__ == "__main__":
    main()
