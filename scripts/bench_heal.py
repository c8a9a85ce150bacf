"""What healing costs at run time: SmolLM2 exported unpruned and with Gate-Norm's `--drops` attention
sublayers dropped, unhealed and healed in each of `--forms` (`gatenorm.heal`: `fold` refits the down
projections below the dropped attention, Q8_0 or better; `linear` makes each dropped attention one fitted
d x d matmul, llama.cpp deci linear attention), timed in one interleaved run (llama-cpp-python, 2
threads, flash attention on, one process per model): prompt processing at `--prompt` tokens and decoding
`--gen` tokens at each of `--depths`. Prints each variant's speedup over the unpruned model, the share of
the unhealed speedup's gain the repair gives back ((s_unhealed - s_healed) / (s_unhealed - 1); target
<= 2 %), and the cost model's estimate of both, plus the fit time and the synthetic text's generation time.

    python scripts/bench_heal.py [--reps 3] [--drops 8,16] [--forms fold,linear] [--depths 0,4096]
                                 [--quant Q8_0]

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
from gatenorm.sequential import SequentialModel
from gatenorm.validate.bench import (
    add_script_bench_args,
    bench_interleaved,
    bench_tokens,
    pp_key,
    script_bench_config,
    tg_key,
)
from gatenorm.validate.runtimes import ModelSpec

THREADS = 2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_script_bench_args(p)
    p.add_argument("--drops", default="8,16")
    p.add_argument("--quant", default="Q8_0")
    p.add_argument("--forms", default="fold,linear", help="healing forms (HealSettings.form)")
    args = p.parse_args()
    source_path = smollm2()
    source = open_checkpoint(source_path)
    scores = score_checkpoint(source, Method.GATE_NORM, 0)
    model, start = SequentialModel(source_path), time.perf_counter()
    windows = HealSettings().windows(source_path)  # once for all
    gen_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        plans, fit_s = {"unpruned": make_plan(source, scores, 0)}, {}
        for n in (int(d) for d in args.drops.split(",")):
            plans[f"{n} dropped"] = plan = make_plan(source, scores, n)
            for form in args.forms.split(","):
                weights = weights_path_for(Path(tmp) / f"d{n}-{form}.json")
                healed = heal_plan(
                    source_path, plan, HealSettings(form=form), weights, model=model, windows=windows
                )
                plans[f"{n} {form}"] = healed
                fit_s[f"{n} {form}"] = healed.healing.seconds
        del model
        files = {
            name: export_gguf(source, plan, Path(tmp) / f"{i}.gguf", args.quant)
            for i, (name, plan) in enumerate(plans.items())
        }
        cfg = script_bench_config(args)
        specs = {name: ModelSpec(f, "llama.cpp") for name, f in files.items()}
        med, depths, _ = bench_interleaved(specs, bench_tokens(files["unpruned"], cfg), cfg, THREADS)
    metrics = [(pp_key(args.prompt), f"pp{args.prompt}", "prefill", args.prompt)]
    metrics += [(tg_key(args.gen, d), f"tg{args.gen} @ d{d}", "decode", d) for d in depths]
    base = med["unpruned"]
    print(
        f"SmolLM2-135M {args.quant}, Gate-Norm order, llama-cpp-python {THREADS} threads, flash attention, "
        f"median of {args.reps} interleaved runs after 1 warm-up; speedup over unpruned (cost model)"
    )
    fits = ", ".join(f"{name} {s:.1f} s" for name, s in fit_s.items())
    print(
        f"fit time: {fits}; the synthetic text ({windows.shape[0]} x {windows.shape[1]} tokens, once): "
        f"{gen_s:.0f} s"
    )
    print(f"{'metric':<14} {'variant':<11} {'speedup':>8} {'estimate':>9} {'gain given back':>16}")
    for key, label, phase, ctx in metrics:
        model = cost_model(source, ctx, phase)
        for name in plans:
            if name == "unpruned":
                continue
            s = med[name][key] / base[key]
            line = f"{label:<14} {name:<11} {s:>8.3f} {model.plan_speedup(plans[name]):>9.3f}"
            if not name.endswith("dropped"):
                plain = med[f"{name.split()[0]} dropped"][key] / base[key]
                line += f" {(plain - s) / (plain - 1):>15.1%}" if plain > 1 else f" {'-':>15}"
            print(line)


if __name__ == "__main__":
    main()
