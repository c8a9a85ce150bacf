"""Benchmark: pruned SmolLM2 ONNX exports on onnxruntime (CPU EP, 2 threads) against the ideal speedup
and against optimum's stock export.

Exports SmolLM2-135M-Instruct with 0, 8 and 16 attention sublayers dropped (Gate-Norm plans) at fp32 and
int4, plus optimum's stock export of the unpruned model (``optimum-cli export onnx --task
text-generation-with-past`` on an HF copy of the same weights). Every measurement runs in a fresh process
(so peak RSS is that model's), models interleaved within each repetition; the figures are medians:

- prefill tokens/s at 512 and 2048 tokens (one forward pass over the prompt, empty cache);
- decode tokens/s: greedy steps after the 512-token prompt, the cache fed back each step;
- file size of the model and peak RSS of the measuring process.

Our exports run with ``OnnxRunner`` (IO binding: the cache stays in onnxruntime memory); optimum's runs
the usual way, a plain Python loop feeding the numpy ``present.*`` outputs back as ``past_key_values.*``.
Each speedup over the 0-drop export of the same precision is printed next to the ideal one: the ratio of
FLOPs (prefill) or of bytes read per decoded token (weights without the embedding table, plus the cache).
Usage: ``python scripts/bench_onnx.py [--reps 3] [--decode-steps 32] [--workdir DIR] [--keep]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DROPS = (0, 8, 16)
PRECISIONS = ("fp32", "int4")
PREFILL_LENGTHS = (512, 2048)
THREADS = 2
OPTIMUM_CLI = (sys.executable, "-m", "optimum.commands.optimum_cli", "export", "onnx")


# ---------------------------------------------------------------- measuring (runs in a child process)


def _prompt(length: int) -> np.ndarray:
    return np.random.default_rng(length).integers(100, 40000, (1, length))


def measure_ours(folder: Path, decode_steps: int) -> dict:
    from exporters.onnx import OnnxRunner

    runner = OnnxRunner(folder, threads=THREADS)
    state = runner.prefill(_prompt(16))  # warm-up: allocations, kernel selection
    runner.decode(state, [5])
    result = {}
    for length in PREFILL_LENGTHS:
        t = time.perf_counter()
        state = runner.prefill(_prompt(length))
        result[f"prefill_{length}"] = length / (time.perf_counter() - t)
    state = runner.prefill(_prompt(PREFILL_LENGTHS[0]))
    t = time.perf_counter()
    for _ in range(decode_steps):
        runner.decode(state, [int(state.logits[0].argmax())])
    result["decode"] = decode_steps / (time.perf_counter() - t)
    return result


def measure_plain_loop(model: Path, decode_steps: int) -> dict:
    """optimum's export, run the usual way: session.run with numpy feeds, presents fed back as pasts."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    pasts = [i for i in session.get_inputs() if i.name.startswith("past_key_values")]
    outputs = [o.name for o in session.get_outputs()]

    def run(ids: np.ndarray, cache: dict | None) -> tuple[np.ndarray, dict]:
        past_len = 0 if cache is None else next(iter(cache.values())).shape[2]
        feed = {
            "input_ids": ids,
            "attention_mask": np.ones((1, past_len + ids.shape[1]), np.int64),
            "position_ids": np.arange(past_len, past_len + ids.shape[1])[None],
        }
        if cache is None:
            cache = {p.name: np.zeros((1, p.shape[1], 0, p.shape[3]), np.float32) for p in pasts}
        feed.update(cache)
        out = session.run(outputs, feed)
        names = [p.name for p in pasts]
        return out[0], dict(zip(names, out[1:], strict=True))

    logits, cache = run(_prompt(16), None)
    run(np.array([[5]]), cache)
    result = {}
    for length in PREFILL_LENGTHS:
        t = time.perf_counter()
        run(_prompt(length), None)
        result[f"prefill_{length}"] = length / (time.perf_counter() - t)
    logits, cache = run(_prompt(PREFILL_LENGTHS[0]), None)
    t = time.perf_counter()
    for _ in range(decode_steps):
        logits, cache = run(np.array([[int(logits[0, -1].argmax())]]), cache)
    result["decode"] = decode_steps / (time.perf_counter() - t)
    return result


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss it does not carry the parent's peak over exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------- ideal speedups


def prefill_flops(cost, vocab: int, kept: int, tokens: int) -> float:
    """Matmul FLOPs of one causal prefill of `tokens` tokens with `kept` attention sublayers: the layers of
    the cost model `cost` (`gatenorm.methods.cost`) at context `tokens`, plus the LM head at every
    position."""
    import dataclasses

    from gatenorm.plan import LayerAction

    n = cost.shape.n_layers
    actions = [LayerAction.KEEP] * kept + [LayerAction.DROP_ATTENTION] * (n - kept)
    return tokens * (dataclasses.replace(cost, ctx=tokens).flops(actions) + 2 * cost.shape.d_model * vocab)


def decode_bytes(folder: Path, config, kept: int, context: int) -> float:
    """Bytes read per decoded token: every weight but a lookup-only embedding table, plus the cache."""
    import onnx

    from exporters.onnx.precision import initializer_bytes

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    gathers = ("Gather", "GatherBlockQuantized")
    gathered = {i for n in model.graph.node if n.op_type in gathers for i in n.input}
    read_whole = {i for n in model.graph.node if n.op_type not in gathers for i in n.input}
    lookup_only = frozenset(gathered - read_whole)  # a tied LM head reads the table whole: keep it
    head_dim = config.hidden_size // config.num_attention_heads
    cache = kept * 2 * config.num_key_value_heads * head_dim * context * 4
    return initializer_bytes(model, skip=lookup_only) + cache


# ---------------------------------------------------------------- preparing the models


def prepare(workdir: Path) -> tuple[dict[str, Path], object]:
    import torch
    from transformers import AutoConfig

    from exporters.onnx import export_onnx
    from gatenorm.models import smollm2
    from gatenorm.plan import make_plan
    from gatenorm.readers import open_checkpoint
    from gatenorm.scoring import score_checkpoint

    gguf = smollm2()
    ckpt = open_checkpoint(gguf)
    scores = score_checkpoint(ckpt, "gate-norm")
    models: dict[str, Path] = {}
    for precision in PRECISIONS:
        for drop in DROPS:
            name = f"ours-{precision}-drop{drop}"
            t = time.perf_counter()
            models[name] = export_onnx(gguf, make_plan(ckpt, scores, drop), workdir / name, precision)
            print(f"exported {name} in {time.perf_counter() - t:.0f} s", file=sys.stderr)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = workdir / "smollm2-hf"
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    fresh = AutoModelForCausalLM.from_config(loaded.config)
    fresh.load_state_dict(loaded.state_dict())
    fresh.save_pretrained(hf)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(hf)
    del loaded, fresh
    stock = workdir / "optimum-stock"
    t = time.perf_counter()
    subprocess.run(
        [*OPTIMUM_CLI, "--model", str(hf), "--task", "text-generation-with-past", str(stock)],
        check=True,
        capture_output=True,
    )
    print(f"exported optimum-stock in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    models["optimum-stock-fp32"] = stock / "model.onnx"
    return models, AutoConfig.from_pretrained(hf)


def _size(path: Path) -> int:
    folder, name = (path.parent, path.name) if path.suffix == ".onnx" else (path, "model.onnx")
    return sum(p.stat().st_size for p in folder.glob(f"{name}*"))


def _child(kind: str, path: str, decode_steps: int) -> dict:
    cmd = [sys.executable, __file__, "--measure", kind, path, "--decode-steps", str(decode_steps)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=Path(__file__).parents[1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the exports")
    parser.add_argument("--measure", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.measure:
        kind, path = args.measure
        fn = measure_ours if kind == "ours" else measure_plain_loop
        result = fn(Path(path), args.decode_steps)
        result["peak_rss_mb"] = peak_rss_mb()
        print(json.dumps(result))
        return

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gatenorm-bench-onnx-"))
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        models, config = prepare(workdir)
        runs: dict[str, list[dict]] = {name: [] for name in models}
        for rep in range(args.reps):
            for name, path in models.items():
                kind = "optimum" if name.startswith("optimum") else "ours"
                runs[name].append(_child(kind, str(path), args.decode_steps))
            print(f"repetition {rep + 1}/{args.reps} done", file=sys.stderr)
        report(models, runs, config, args)
        print(f"\ntotal wall time {time.perf_counter() - start:.0f} s (exports included)")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def report(models: dict[str, Path], runs: dict[str, list[dict]], config, args) -> None:
    med = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in runs.items()}
    print(f"onnxruntime CPU EP, {THREADS} threads, medians of {args.reps} interleaved repetitions")
    print(f"decode: {args.decode_steps} greedy steps after a {PREFILL_LENGTHS[0]}-token prompt\n")
    cols = ["prefill_512", "prefill_2048", "decode"]
    print(
        f"{'model':24} {'prefill512 tok/s':>17} {'prefill2048 tok/s':>18} {'decode tok/s':>13} "
        f"{'size MB':>8} {'peak RSS MB':>12}"
    )
    for name, m in med.items():
        print(
            f"{name:24} {m[cols[0]]:17.1f} {m[cols[1]]:18.1f} {m[cols[2]]:13.2f} "
            f"{_size(models[name]) / 1e6:8.1f} {m['peak_rss_mb']:12.0f}"
        )

    from gatenorm.methods.cost import cost_model
    from gatenorm.models import smollm2
    from gatenorm.readers import open_checkpoint

    cost, vocab = cost_model(open_checkpoint(smollm2())), config.vocab_size
    n_layers = config.num_hidden_layers
    context = PREFILL_LENGTHS[0] + args.decode_steps // 2
    print("\nspeedup over the 0-drop export of the same precision: measured / ideal (target >= 0.9 x ideal)")
    for precision in PRECISIONS:
        base = f"ours-{precision}-drop0"
        for drop in DROPS[1:]:
            name = f"ours-{precision}-drop{drop}"
            kept = n_layers - drop
            ideals = {
                f"prefill_{t}": prefill_flops(cost, vocab, n_layers, t) / prefill_flops(cost, vocab, kept, t)
                for t in PREFILL_LENGTHS
            }
            ideals["decode"] = decode_bytes(models[base], config, n_layers, context) / decode_bytes(
                models[name], config, kept, context
            )
            parts = []
            for col in cols:
                measured = med[name][col] / med[base][col]
                verdict = "ok" if measured >= 0.9 * ideals[col] else "BELOW"
                parts.append(
                    f"{col} {measured:.3f}/{ideals[col]:.3f} ({measured / ideals[col]:.2f} {verdict})"
                )
            size_ratio = _size(models[base]) / _size(models[name])
            print(f"  {name:22} " + "  ".join(parts) + f"  size {size_ratio:.3f}x smaller")

    ours, stock = med["ours-fp32-drop0"], med["optimum-stock-fp32"]
    print("\nours-fp32-drop0 (OnnxRunner) vs optimum-stock-fp32 (plain loop):")
    for col, target in (("prefill_512", 1.0), ("prefill_2048", 1.0), ("decode", 2.0)):
        ratio = ours[col] / stock[col]
        print(f"  {col:13} {ratio:.2f}x  (target >= {target:.0f}x: {'ok' if ratio >= target else 'BELOW'})")


if __name__ == "__main__":
    main()
