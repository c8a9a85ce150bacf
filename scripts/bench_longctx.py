"""Long context on llama.cpp: measured speedups of dropped attention sublayers at depth, next to the cost
model's estimates, and the KV cache they keep.

SmolLM2-135M (the shipped Q4_1 GGUF) exported as Q8_0 unpruned and with 8 and 16 attention sublayers
dropped (Gate-Norm's order), run by gatenorm's benchmark workers (llama-cpp-python, 2 threads, flash
attention on, one process per model) in one interleaved run: each repetition prefills a context of each
depth and decodes `--gen` tokens after it, so every depth gives a prompt-processing speed (pp at that length)
and a decode speed (tg at that depth). Prints, per depth, measured speedups over the unpruned model next to
`gatenorm.methods.cost`'s estimates (prefill and decode phases; the decode estimate is the FLOP/byte model),
the KV-cache bytes llama.cpp holds (llama_state_seq_get_size) against kept/all layers, the same with flash
attention off, and the issue's target: decode speedup at depth 4096 >= 0.9x the model's ideal.

    python scripts/bench_longctx.py [--reps 3] [--gen 32] [--depths 0,2048,4096,8192] [--drops 8,16]

Ratios only: wall-clock speed on a shared machine is noisy, the interleaving makes the ratios comparable.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from exporters.export import export_gguf
from gatenorm.methods import Method, score_checkpoint
from gatenorm.methods.cost import cost_model
from gatenorm.models import smollm2
from gatenorm.plan import make_plan
from gatenorm.readers import open_checkpoint
from gatenorm.validate.bench import _kv_without_flash, _Worker, clip_depths
from gatenorm.validate.runtimes import ModelSpec
from gatenorm.validate.text import load_text

THREADS = 2
TARGET_DEPTH = 4096


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per model (after one warm-up)")
    p.add_argument("--gen", type=int, default=32, help="tokens decoded after each context")
    p.add_argument("--depths", default="0,2048,4096,8192")
    p.add_argument("--drops", default="8,16", help="attention sublayers dropped per variant")
    p.add_argument("--quant", default="Q8_0")
    args = p.parse_args()
    depths = [int(d) for d in args.depths.split(",")]
    drops = [0] + [int(n) for n in args.drops.split(",")]

    source = open_checkpoint(smollm2())
    scores = score_checkpoint(source, Method.GATE_NORM, 0)
    plans = {n: make_plan(source, scores, n) for n in drops}
    with tempfile.TemporaryDirectory() as tmp:
        files = {n: export_gguf(source, plans[n], Path(tmp) / f"d{n}.gguf", args.quant) for n in drops}
        specs = {n: ModelSpec(f, "llama.cpp") for n, f in files.items()}
        n_ctx = max(depths) + args.gen + 8
        workers = {n: _Worker(specs[n], THREADS, n_ctx) for n in drops}
        try:
            depths = clip_depths(depths, args.gen, workers[0].max_context)
            text = load_text("wiki", 8 * max(depths) + 4096)
            from llama_cpp import Llama

            vocab = Llama(str(files[0]), vocab_only=True, verbose=False)
            tokens = vocab.tokenize(text.encode(), add_bos=False)[: max(depths) + 1]
            vocab.close()
            runs: dict[int, list[dict]] = {n: [] for n in drops}
            for rep in range(1 + args.reps):
                for n in drops:
                    sample = {}
                    for d in depths:
                        t = workers[n].call("generate", tokens[: max(d, 1)], args.gen + 1)
                        sample[("pp", d)] = max(d, 1) / t.first_token_s
                        sample[("tg", d)] = args.gen / (t.total_s - t.first_token_s)
                        sample[("kv", d)] = t.kv_bytes
                    if rep:
                        runs[n].append(sample)
            for w in workers.values():
                w.stop()
        finally:
            for w in workers.values():
                w.kill()
        deep = min(TARGET_DEPTH, max(depths))
        off = _kv_without_flash(list(specs.values()), tokens[:deep], args.gen, THREADS, n_ctx)
        kv_off = dict(zip(drops, off, strict=True))

    med = {n: {k: statistics.median(r[k] for r in runs[n]) for k in runs[n][0]} for n in drops}
    print(
        f"SmolLM2-135M {args.quant}, llama-cpp-python {THREADS} threads, flash attention on, "
        f"median of {args.reps} interleaved runs (after 1 warm-up), {args.gen} tokens decoded per depth"
    )
    print(
        f"{'dropped':>7} {'phase':>7} {'depth':>6} {'tok/s':>8} {'measured':>9} {'estimate':>9} "
        f"{'meas/est':>9}"
    )
    verdicts = []
    for n in drops:
        actions = [lp.action for lp in plans[n].layers]
        for phase, key in (("prefill", "pp"), ("decode", "tg")):
            for d in depths:
                if phase == "prefill" and d == 0:
                    continue
                measured = med[n][(key, d)] / med[0][(key, d)]
                estimate = cost_model(source, d, phase).speedup(actions)
                print(
                    f"{n:>7} {phase:>7} {d:>6} {med[n][(key, d)]:>8.1f} {measured:>9.3f} {estimate:>9.3f}"
                    f" {measured / estimate:>9.3f}"
                )
                if phase == "decode" and d == deep and n:
                    verdicts.append((n, measured, estimate))
    print(
        f"\nKV cache (llama_state_seq_get_size) after {deep} + {args.gen} tokens, "
        "and with flash attention off"
    )
    print(
        f"{'dropped':>7} {'kept':>5} {'MiB':>8} {'ratio':>8} {'kept/all':>9} {'MiB, FA off':>12} "
        f"{'off - on':>9}"
    )
    n_layers = source.shape.n_layers
    for n in drops:
        kv = med[n][("kv", deep)]
        kept = len(plans[n].kv_layers)
        print(
            f"{n:>7} {kept:>5} {kv / 2**20:>8.2f} {kv / med[0][('kv', deep)]:>8.4f} {kept / n_layers:>9.4f}"
            f" {kv_off[n]:>12.2f} {kv_off[n] - kv / 2**20:>+9.2f}"
        )
    print(f"\ntarget: decode speedup at depth {deep} >= 0.9x the FLOP/byte model's ideal")
    for n, measured, estimate in verdicts:
        ok = "ok" if measured >= 0.9 * estimate else "MISSED"
        print(
            f"  {n} dropped: {measured:.3f}x measured, {estimate:.3f}x ideal, {measured / estimate:.3f} {ok}"
        )


if __name__ == "__main__":
    main()
