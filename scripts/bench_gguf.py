"""Benchmark of the GGUF exporter: export time against a plain copy, and llama.cpp speed of pruned files.

Prints ratios measured within one run (interleaved runs, medians), never absolute targets:

1. export time / plain-copy time of the source file (GGUF -> GGUF, tensor bytes unchanged);
2. llama-cpp-python speed (2 threads, flash attention on) of exports dropping 0, 8 and 16 attention
   sublayers: prefill (pp) and generation (tg) speedups next to the ideal ones (fraction of FLOPs and of
   bytes read per token removed), and the KV-cache size; on SmolLM2 also 8 linearized layers (HARP) and 8
   dropped blocks (ShortGPT), the same 8 Gate-Norm layers, in the same interleaved runs;

on the shipped SmolLM2-135M (Q4_1) and on a synthetic Llama-7B-shaped Q4_K file with random weights that
the script writes (speed does not depend on the values).

    python scripts/bench_gguf.py [--reps 5] [--reps-7b 3] [--pp-7b 64] [--tg-7b 16] [--skip-7b]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from exporters.export import export, export_gguf
from exporters.keys import Keys
from gatenorm.methods import score_checkpoint
from gatenorm.methods.cost import cost_model
from gatenorm.models import smollm2, tiny
from gatenorm.plan import LayerAction, Plan, make_plan
from gatenorm.readers.gguf_file import GGUFCheckpoint
from gatenorm.scoring import LayerScores

THREADS = 2
#: label -> (layers changed, action): the runs compared, the first is the baseline.
ATTENTION_VARIANTS = {
    "unpruned": (0, LayerAction.DROP_ATTENTION),
    "8 attn": (8, LayerAction.DROP_ATTENTION),
    "16 attn": (16, LayerAction.DROP_ATTENTION),
}
LAYER_VARIANTS = {"8 linear": (8, LayerAction.LINEARIZE), "8 blocks": (8, LayerAction.DROP_BLOCK)}


# --- synthetic Llama-7B-shaped Q4_K file ---------------------------------------------------------------

LLAMA_7B = dict(d=4096, n_layers=32, ff=11008, n_head=32, n_head_kv=32, vocab=32000)


def write_synthetic_7b(path: Path, s: dict = LLAMA_7B, name: str = "synthetic-llama-7b-q4_k") -> None:
    """A Llama-2-7B-shaped GGUF (or of shape `s`): every matrix Q4_K (random quants, small scales), the
    tokenizer of `tiny` (padded with unused tokens up to a larger vocabulary)."""
    d, ff = s["d"], s["ff"]
    kv = d // s["n_head"] * s["n_head_kv"]
    q4k = gguf.GGMLQuantizationType.Q4_K
    block_size, type_size = gguf.GGML_QUANT_SIZES[q4k]
    rng = np.random.default_rng(0)
    pool = rng.integers(0, 256, size=(1 << 18, type_size), dtype=np.uint8)  # 36 MiB of blocks, reused
    pool[:, 0:2] = np.frombuffer(np.float16(0.004).tobytes(), np.uint8)  # d
    pool[:, 2:4] = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)  # dmin
    pool = pool.reshape(-1)

    tensors: list[tuple[str, tuple[int, ...], gguf.GGMLQuantizationType]] = [
        ("token_embd.weight", (s["vocab"], d), q4k)
    ]
    for i in range(s["n_layers"]):
        tensors += [
            (f"blk.{i}.attn_norm.weight", (d,), gguf.GGMLQuantizationType.F32),
            (f"blk.{i}.attn_q.weight", (d, d), q4k),
            (f"blk.{i}.attn_k.weight", (kv, d), q4k),
            (f"blk.{i}.attn_v.weight", (kv, d), q4k),
            (f"blk.{i}.attn_output.weight", (d, d), q4k),
            (f"blk.{i}.ffn_norm.weight", (d,), gguf.GGMLQuantizationType.F32),
            (f"blk.{i}.ffn_gate.weight", (ff, d), q4k),
            (f"blk.{i}.ffn_up.weight", (ff, d), q4k),
            (f"blk.{i}.ffn_down.weight", (d, ff), q4k),
        ]
    tensors += [
        ("output_norm.weight", (d,), gguf.GGMLQuantizationType.F32),
        ("output.weight", (s["vocab"], d), q4k),
    ]

    source = gguf.GGUFReader(tiny())
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name(name)
    writer.add_context_length(4096)
    writer.add_embedding_length(d)
    writer.add_block_count(s["n_layers"])
    writer.add_feed_forward_length(ff)
    writer.add_head_count(s["n_head"])
    writer.add_head_count_kv(s["n_head_kv"])
    if "rope_theta" in s:
        writer.add_rope_freq_base(s["rope_theta"])
    writer.add_rope_dimension_count(d // s["n_head"])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_S)
    pad = s["vocab"] - len(source.fields["tokenizer.ggml.tokens"].contents())
    padding = {
        "tokenizer.ggml.tokens": [f"<unused_{i}>" for i in range(pad)],
        "tokenizer.ggml.scores": [0.0] * pad,
        "tokenizer.ggml.token_type": [int(gguf.TokenType.UNUSED)] * pad,
    }
    for key, field in source.fields.items():
        if key.startswith("tokenizer."):
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            value = field.contents()
            if key in padding and pad > 0:
                value = value + padding[key]
            writer.add_key_value(key, value, field.types[0], sub)
    for name, shape, qtype in tensors:
        n = int(np.prod(shape))
        nbytes = n * 4 if qtype == gguf.GGMLQuantizationType.F32 else n // block_size * type_size
        writer.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, shape, qtype in tensors:
        if qtype == gguf.GGMLQuantizationType.F32:
            writer.write_tensor_data(np.ones(shape, dtype=np.float32))
        else:
            nbytes = int(np.prod(shape)) // block_size * type_size
            start = (hash(name) % 1000) * type_size
            writer.write_tensor_data(np.resize(np.roll(pool, -start), nbytes))
    writer.close()


# --- export time against a plain copy ------------------------------------------------------------------


def bench_export(source: Path, plan: Plan, work: Path, reps: int) -> tuple[float, float, float]:
    """Median seconds of a plain copy of `source`, of a GGUF -> GGUF export, and of the same export without
    the plan's content-hash check (which reads every q/k tensor); the three interleaved."""
    runs: dict[str, list[float]] = {"copy": [], "export": [], "unchecked": []}
    shutil.copyfile(source, work / "warm.gguf")  # first read of the source into the page cache
    (work / "warm.gguf").unlink()
    for _ in range(reps):
        start = time.perf_counter()
        shutil.copyfile(source, work / "copy.gguf")
        runs["copy"].append(time.perf_counter() - start)
        (work / "copy.gguf").unlink()
        for kind in ("export", "unchecked"):
            start = time.perf_counter()
            export(source, plan, work / "export.gguf", check_source=kind == "export")  # opens, writes
            runs[kind].append(time.perf_counter() - start)
            (work / "export.gguf").unlink()
    return tuple(statistics.median(runs[k]) for k in ("copy", "export", "unchecked"))


def print_export(name: str, size: str, times: tuple[float, float, float], reps: int) -> None:
    copy_s, export_s, unchecked_s = times
    print(
        f"  {name} ({size}): copy {copy_s:.3f} s, export {export_s:.3f} s (ratio {export_s / copy_s:.2f}), "
        f"without the hash check {unchecked_s:.3f} s (ratio {unchecked_s / copy_s:.2f}); median of {reps}"
    )


# --- llama.cpp speed -----------------------------------------------------------------------------------


@dataclass
class Cost:
    """Per-token cost of one file: FLOPs of prefill / decode at a context length, and bytes read."""

    flops_pp: float
    flops_tg: float
    bytes_tg: float


def file_actions(ckpt: GGUFCheckpoint) -> list[LayerAction]:
    """The action each layer of a (pruned) GGUF runs: a deci file's linear and attention-free layers are its
    `fixed_layers`, dropped blocks are not in the file; checked against the plan the file carries."""
    actions = [
        LayerAction(ckpt.fixed_layers.get(i, (LayerAction.KEEP.value, None))[0])
        for i in range(ckpt.shape.n_layers)
    ]
    field = ckpt.reader.fields.get(Keys.PLAN)
    if field is not None:
        planned = [lp.action for lp in Plan.from_json(field.contents()).layers]
        if actions != [a for a in planned if a is not LayerAction.DROP_BLOCK]:
            raise SystemExit(f"{ckpt.path}: its layers do not match the plan it carries")
    return actions


def model_cost(path: Path, pp: int, tg: int) -> Cost:
    """FLOPs and bytes per token of a (pruned) GGUF from the cost model (`gatenorm.methods.cost`): prefill
    of `pp` tokens; `tg` decode steps from an empty cache, at their mean depth, the bytes at the file's own
    storage types (weights, KV cache, LM head)."""
    ckpt = GGUFCheckpoint(path)
    actions = file_actions(ckpt)
    decode = cost_model(ckpt, (tg - 1) // 2, "decode", stored_bytes=True)
    return Cost(
        flops_pp=cost_model(ckpt, pp).flops(actions),  # the head runs for the last token only: left out
        flops_tg=decode.compute(actions),
        bytes_tg=decode.bytes_read(actions),
    )


def time_llama(path: Path, tokens: list[int], pp: list[int], tg: int) -> tuple[dict[str, float], int]:
    """Seconds of prefill of each length in `pp` and of `tg` one-token decode steps, and KV-state bytes."""
    from llama_cpp import Llama

    n_ctx = max(*pp, tg) + 16
    llm = Llama(
        str(path),
        n_ctx=n_ctx,
        n_batch=min(2048, n_ctx),
        n_ubatch=512,
        n_threads=THREADS,
        n_threads_batch=THREADS,
        flash_attn=True,
        verbose=False,
    )
    times = {}
    try:
        for n in pp:
            llm.reset()
            start = time.perf_counter()
            llm.eval(tokens[:n])
            times[f"pp{n}"] = time.perf_counter() - start
        state = len(llm.save_state().llama_state)
        llm.reset()
        start = time.perf_counter()
        for token in tokens[:tg]:
            llm.eval([token])
        times[f"tg{tg}"] = time.perf_counter() - start
    finally:
        llm.close()
    return times, state


def bench_runtime(
    name: str,
    ckpt: GGUFCheckpoint,
    scores: LayerScores,
    variants: dict[str, tuple[int, LayerAction]],
    work: Path,
    reps: int,
    pp: list[int],
    tg: int,
) -> None:
    """Export each variant of `ckpt`, time them interleaved, print speedups over the first vs ideal."""
    tokens = [int(t) for t in np.random.default_rng(0).integers(100, 30000, size=max(*pp, tg))]
    files, plans = {}, {}
    for i, (label, (n, action)) in enumerate(variants.items()):
        plans[label] = make_plan(ckpt, scores, n, action=action)
        files[label] = export_gguf(ckpt, plans[label], work / f"{name}-v{i}.gguf")
    base = next(iter(variants))
    costs = {label: model_cost(f, max(pp), tg) for label, f in files.items()}
    runs: dict[str, list[dict[str, float]]] = {label: [] for label in variants}
    states = {}
    for _ in range(reps):
        for label in variants:
            times, states[label] = time_llama(files[label], tokens, pp, tg)
            runs[label].append(times)
    metrics = [f"pp{n}" for n in pp] + [f"tg{tg}"]
    median = {v: {m: statistics.median(r[m] for r in runs[v]) for m in metrics} for v in variants}
    print(f"\n{name}: llama-cpp-python {THREADS} threads, flash attention, median of {reps} interleaved runs")
    print(
        f"{'variant':>9} {'metric':>7} {'tok/s':>9} {'speedup':>8} {'ideal FLOPs':>12} {'ideal bytes':>12}"
        f" {'measured/ideal':>15}"
    )
    for label in variants:
        for m in metrics:
            n_tokens = int(m[2:])
            speedup = median[base][m] / median[label][m]
            ideal_bytes = costs[base].bytes_tg / costs[label].bytes_tg
            if m.startswith("pp"):
                pp_cost = {v: model_cost(files[v], n_tokens, tg).flops_pp for v in (base, label)}
                ideal_flops = target = pp_cost[base] / pp_cost[label]
            else:
                ideal_flops = costs[base].flops_tg / costs[label].flops_tg
                target = ideal_bytes
            print(
                f"{label:>9} {m:>7} {n_tokens / median[label][m]:>9.1f} {speedup:>8.3f} {ideal_flops:>12.3f}"
                f" {ideal_bytes:>12.3f} {speedup / target:>15.3f}"
            )
    print(f"{'variant':>9} {'KV state bytes after pp' + str(max(pp)):>30} {'ratio':>7} {'ideal':>7}")
    for label, plan in plans.items():
        ideal = len(plan.kv_layers) / ckpt.shape.n_layers
        print(f"{label:>9} {states[label]:>30,} {states[label] / states[base]:>7.3f} {ideal:>7.3f}")


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions on SmolLM2")
    parser.add_argument("--reps-7b", type=int, default=3, help="interleaved repetitions on the 7B file")
    parser.add_argument("--pp-7b", type=int, default=64, help="prefill length on the 7B file")
    parser.add_argument("--tg-7b", type=int, default=16, help="decode steps on the 7B file")
    parser.add_argument("--skip-7b", action="store_true", help="SmolLM2 only")
    parser.add_argument("--export-only", action="store_true", help="export time only, no llama.cpp runs")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a new one in /tmp)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-gguf-", dir=args.work))
    try:
        small = GGUFCheckpoint(smollm2())
        small_scores = score_checkpoint(small, "gate-norm")
        print(
            "export time / plain copy time (GGUF -> GGUF, 8 attention sublayers dropped, Gate-Norm plan "
            "checked against the file's hash, page cache warm, interleaved runs)"
        )
        times = bench_export(small.path, make_plan(small, small_scores, 8), work, args.reps)
        print_export("SmolLM2-135M Q4_1", f"{small.path.stat().st_size / 2**20:.0f} MiB", times, args.reps)
        if not args.skip_7b:
            path = work / "synthetic-7b-q4_k.gguf"
            start = time.perf_counter()
            write_synthetic_7b(path)
            print(f"  (wrote the synthetic 7B file in {time.perf_counter() - start:.0f} s)")
            big = GGUFCheckpoint(path)
            start = time.perf_counter()
            big_scores = score_checkpoint(big, "gate-norm")
            print(f"  (Gate-Norm scores of the 7B file: {time.perf_counter() - start:.0f} s)")
            reps = min(args.reps, 3)
            times = bench_export(path, make_plan(big, big_scores, 8), work, reps)
            print_export("synthetic Llama-7B Q4_K", f"{path.stat().st_size / 2**30:.2f} GiB", times, reps)
        if args.export_only:
            return
        variants = ATTENTION_VARIANTS | LAYER_VARIANTS
        bench_runtime("SmolLM2-135M-Q4_1", small, small_scores, variants, work, args.reps, [512, 2048], 128)
        if not args.skip_7b:
            bench_runtime(
                "synthetic-Llama-7B-Q4_K",
                big,
                big_scores,
                ATTENTION_VARIANTS,
                work,
                args.reps_7b,
                [args.pp_7b],
                args.tg_7b,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
