"""Benchmark: pruned SmolLM2 ONNX exports on onnxruntime (CPU EP, 2 threads) against the ideal speedup,
against onnxruntime-genai's own model builder and against optimum's stock export.

Exports SmolLM2-135M-Instruct with 0, 8 and 16 attention sublayers dropped (Gate-Norm plans) at fp32 and
int4, plus optimum's stock export of the unpruned model (``optimum-cli export onnx --task
text-generation-with-past`` on an HF copy of the same weights). Every measurement runs in a fresh process
(so peak RSS is that model's), models interleaved within each repetition; the figures are medians:

- prefill tokens/s at 512 and 2048 tokens (one forward pass over the prompt, empty cache);
- decode tokens/s: greedy steps after the 512-token prompt, the cache fed back each step;
- file size of the model and peak RSS of the measuring process.

Our exports run with ``OnnxRunner`` (IO binding: the cache stays in onnxruntime memory); optimum's runs
the usual way, a plain Python loop feeding the numpy ``present.*`` outputs back as ``past_key_values.*``.
The anchor is onnxruntime-genai's builder (``python -m onnxruntime_genai.models.builder -e cpu`` on the HF
copy; it takes float GGUFs only, and the shipped one is Q4_1; builder 0.18 imports transformers 5, which
gatenorm's pin keeps out of the venv: put a transformers 5 install first on ``PYTHONPATH`` for it, e.g. via
``--builder-pythonpath DIR``) at each precision: it and our exports run
in the same client, onnxruntime-genai (``og.Generator``, 2 threads; prefill = ``append_tokens`` of the
prompt, decode = ``generate_next_token`` steps), so the ratio ours/builder compares graphs only.
Each speedup over the 0-drop export of the same precision is printed next to the ideal one: the ratio of
FLOPs (prefill) or of bytes read per decoded token (weights without the embedding table, plus the cache).

With ``--export-cost`` it measures the export itself instead (interleaved, medians): wall time and peak
RSS (``/usr/bin/time -f %M``) of ``gatenorm export --to onnx --quant int4`` on SmolLM2 next to the int4
folder's size + 1 GiB (the target: the graph builder holds one layer's weights, not the model), its time
next to onnxruntime-genai's builder on the same weights (``-p int4``), and, with ``--gguf-7b FILE`` (a
synthetic Llama-2-7B-shaped Q4_K GGUF: ``scripts/bench_gguf.py``'s ``write_synthetic_7b``, written there
when the file is missing), one int4 export of that file.

Usage: ``python scripts/bench_onnx.py [--reps 3] [--decode-steps 32] [--precisions fp32,int4]
[--drops 0,8,16] [--no-optimum] [--workdir DIR] [--keep]``; ``python scripts/bench_onnx.py --export-cost
[--reps 3] [--gguf-7b FILE] [--builder-pythonpath DIR]``.
"""

from __future__ import annotations

import argparse
import json
import os
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


def measure_genai(folder: Path, decode_steps: int) -> dict:
    """An export run by onnxruntime-genai (its genai_config.json set to THREADS intra-op threads)."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))

    def run(length: int, steps: int) -> tuple[float, float]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=length + steps + 1, do_sample=False)
        generator = og.Generator(model, params)
        t = time.perf_counter()
        generator.append_tokens(_prompt(length))
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(steps):
            generator.generate_next_token()
        return prefill, time.perf_counter() - t

    run(16, 2)  # warm-up
    result = {f"prefill_{length}": length / run(length, 0)[0] for length in PREFILL_LENGTHS}
    result["decode"] = decode_steps / run(PREFILL_LENGTHS[0], decode_steps)[1]
    return result


def set_genai_threads(folder: Path) -> None:
    path = folder / "genai_config.json"
    config = json.loads(path.read_text())
    config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = THREADS
    config["model"]["decoder"]["session_options"]["inter_op_num_threads"] = 1
    path.write_text(json.dumps(config, indent=2))


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


def model_file(folder: Path) -> Path:
    """The ONNX file of an export folder: ours (gatenorm_onnx.json), the builder's (genai_config.json)."""
    if (folder / "gatenorm_onnx.json").is_file():
        return folder / json.loads((folder / "gatenorm_onnx.json").read_text())["model"]
    if (folder / "genai_config.json").is_file():
        return folder / json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]["filename"]
    return folder if folder.suffix == ".onnx" else folder / "model.onnx"


def decode_bytes(folder: Path, config, kept: int, context: int) -> float:
    """Bytes read per decoded token: every weight but a lookup-only embedding table, plus the cache."""
    import onnx

    from exporters.onnx.precision import initializer_bytes

    model = onnx.load(str(model_file(folder)), load_external_data=False)
    gathers = ("Gather", "GatherBlockQuantized")
    gathered = {i for n in model.graph.node if n.op_type in gathers for i in n.input}
    read_whole = {i for n in model.graph.node if n.op_type not in gathers for i in n.input}
    lookup_only = frozenset(gathered - read_whole)  # a tied LM head reads the table whole: keep it
    head_dim = config.hidden_size // config.num_attention_heads
    cache = kept * 2 * config.num_key_value_heads * head_dim * context * 4
    return initializer_bytes(model, skip=lookup_only) + cache


# ---------------------------------------------------------------- preparing the models


BUILDER = (sys.executable, "-m", "onnxruntime_genai.models.builder")


def prepare(workdir: Path, args) -> tuple[dict[str, tuple[str, Path]], object]:
    """Every model to measure: name -> (how it runs: ours / genai / optimum, its folder or file)."""
    from transformers import AutoConfig

    from exporters.onnx import export_onnx
    from gatenorm.methods import score_checkpoint
    from gatenorm.models import smollm2
    from gatenorm.plan import make_plan
    from gatenorm.readers import open_checkpoint

    gguf = smollm2()
    ckpt = open_checkpoint(gguf)
    scores = score_checkpoint(ckpt, "gate-norm")
    models: dict[str, tuple[str, Path]] = {}
    for precision in args.precisions:
        for drop in args.drops:
            name = f"ours-{precision}-drop{drop}"
            t = time.perf_counter()
            folder = workdir / name
            if not (args.reuse and (folder / "gatenorm_onnx.json").is_file()):
                folder = export_onnx(gguf, make_plan(ckpt, scores, drop), folder, precision, overwrite=True)
                print(f"exported {name} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
            set_genai_threads(folder)
            models[name] = ("ours", folder)
            models[f"genai:{name}"] = ("genai", folder)

    hf = hf_copy(gguf, workdir / "smollm2-hf")
    for precision in args.precisions:
        out = workdir / f"builder-{precision}"
        t = time.perf_counter()
        if args.reuse and (out / "genai_config.json").is_file():
            models[f"genai:builder-{precision}"] = ("genai", out)
            continue
        cmd = [
            *BUILDER,
            "-i",
            str(hf),
            "-o",
            str(out),
            "-p",
            precision,
            "-e",
            "cpu",
            "-c",
            str(workdir / "cache"),
        ]
        env = {**os.environ, "PYTHONPATH": args.builder_pythonpath} if args.builder_pythonpath else None
        subprocess.run(cmd, check=True, capture_output=True, env=env)
        print(f"built builder-{precision} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        set_genai_threads(out)
        models[f"genai:builder-{precision}"] = ("genai", out)
    if args.optimum:
        stock = workdir / "optimum-stock"
        t = time.perf_counter()
        subprocess.run(
            [*OPTIMUM_CLI, "--model", str(hf), "--task", "text-generation-with-past", str(stock)],
            check=True,
            capture_output=True,
        )
        print(f"exported optimum-stock in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        models["optimum-stock-fp32"] = ("optimum", stock / "model.onnx")
    return models, AutoConfig.from_pretrained(hf)


def _size(path: Path) -> int:
    """Bytes of a model file and its external data."""
    file = model_file(path)
    return sum(p.stat().st_size for p in file.parent.glob(f"{file.name}*"))


def _nodes(path: Path) -> int:
    import onnx

    return len(onnx.load(str(model_file(path)), load_external_data=False).graph.node)


def _child(kind: str, path: str, decode_steps: int) -> dict:
    cmd = [sys.executable, __file__, "--measure", kind, path, "--decode-steps", str(decode_steps)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=Path(__file__).parents[1])
    return json.loads(out.stdout.strip().splitlines()[-1])


MEASURE = {"ours": measure_ours, "genai": measure_genai, "optimum": measure_plain_loop}


# ---------------------------------------------------------------- the export itself


GIB = 2**30


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, int]:
    """Wall seconds and peak RSS bytes of the command `cmd` (GNU time's maximum resident set size)."""
    t = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"{cmd[0:4]} failed: {done.stderr[-2000:]}")
    return time.perf_counter() - t, int(done.stderr.strip().splitlines()[-1]) * 1024


def export_command(source: Path, out: Path) -> list[str]:
    """``gatenorm export SOURCE --to onnx --quant int4`` of the unpruned model into `out`."""
    cli = "from gatenorm.cli import main; main()"
    args = ["export", str(source), "--to", "onnx", "--quant", "int4", "--drop", "0", "-o", str(out)]
    return [sys.executable, "-c", cli, *args, "--overwrite"]


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in (folder / "onnx").glob("model_q4.onnx*"))


def hf_copy(gguf: Path, out: Path) -> Path:
    """An HF safetensors folder of the GGUF's weights and tokenizer (what the genai builder reads)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out / "config.json").is_file():
        return out
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if getattr(loaded.config, "quantization_config", None) is not None:  # transformers 5 records the GGUF
        del loaded.config.quantization_config  # the copy is plain float32: the builder refuses "gguf"
    fresh = AutoModelForCausalLM.from_config(loaded.config)
    fresh.load_state_dict(loaded.state_dict())
    fresh.save_pretrained(out)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    return out


def export_cost(workdir: Path, args) -> None:
    """Export time and peak RSS of the int4 ONNX export against the folder size and the genai builder."""
    from gatenorm.models import smollm2

    gguf = smollm2()
    hf = hf_copy(gguf, workdir / "smollm2-hf")
    env = {**os.environ, "PYTHONPATH": args.builder_pythonpath} if args.builder_pythonpath else None
    builder = [*BUILDER, "-i", str(hf), "-o", str(workdir / "builder-int4"), "-p", "int4", "-e", "cpu"]
    builder += ["-c", str(workdir / "cache")]
    runs: dict[str, list[tuple[float, int]]] = {
        "ours (GGUF)": [],
        "ours (HF folder)": [],
        "genai builder": [],
    }
    for rep in range(args.reps):
        runs["ours (GGUF)"].append(timed(export_command(gguf, workdir / "ours-gguf")))
        runs["ours (HF folder)"].append(timed(export_command(hf, workdir / "ours-hf")))
        runs["genai builder"].append(timed(builder, env))
        print(f"repetition {rep + 1}/{args.reps} done", file=sys.stderr)
    size = folder_bytes(workdir / "ours-gguf")
    print(f"int4 ONNX export of SmolLM2-135M, medians of {args.reps} interleaved runs")
    print(f"{'export':20} {'time s':>8} {'peak RSS MiB':>13}")
    med = {
        name: (statistics.median(t for t, _ in r), statistics.median(m for _, m in r))
        for name, r in runs.items()
    }
    for name, (seconds, rss) in med.items():
        print(f"{name:20} {seconds:8.1f} {rss / 2**20:13.0f}")
    rss = med["ours (GGUF)"][1]
    print(
        f"peak RSS {rss / 2**20:.0f} MiB vs int4 folder {size / 2**20:.0f} MiB + 1 GiB = "
        f"{(size + GIB) / 2**20:.0f} MiB ({_verdict(rss <= size + GIB)})"
    )
    for source in ("ours (HF folder)", "ours (GGUF)"):  # the builder reads the HF folder
        ratio = med[source][0] / med["genai builder"][0]
        print(
            f"export time {source} / genai builder: {ratio:.2f}x (target <= 1.0x: {_verdict(ratio <= 1.0)})"
        )
    if args.gguf_7b:
        if not args.gguf_7b.is_file():
            sys.path.insert(0, str(Path(__file__).parent))
            from bench_gguf import write_synthetic_7b

            write_synthetic_7b(args.gguf_7b)
        seconds, rss = timed(export_command(args.gguf_7b, workdir / "ours-7b"))
        size = folder_bytes(workdir / "ours-7b")
        print(
            f"\nsynthetic Llama-2-7B Q4_K ({args.gguf_7b.stat().st_size / GIB:.1f} GiB GGUF): int4 export "
            f"{seconds:.0f} s, peak RSS {rss / GIB:.2f} GiB vs folder {size / GIB:.2f} GiB + 1 GiB "
            f"({_verdict(rss <= size + GIB)})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--precisions", type=lambda v: v.split(","), default=list(PRECISIONS))
    parser.add_argument("--drops", type=lambda v: [int(d) for d in v.split(",")], default=list(DROPS))
    parser.add_argument("--no-optimum", dest="optimum", action="store_false", help="skip optimum's export")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the exports")
    parser.add_argument("--builder-pythonpath", default=None, help="PYTHONPATH for the genai builder")
    parser.add_argument("--reuse", action="store_true", help="reuse the exports found in --workdir")
    parser.add_argument("--measure", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    parser.add_argument("--export-cost", action="store_true", help="measure the export, not the models")
    parser.add_argument("--gguf-7b", type=Path, default=None, help="--export-cost: also this 7B GGUF")
    args = parser.parse_args()

    if args.measure:
        kind, path = args.measure
        result = MEASURE[kind](Path(path), args.decode_steps)
        from gatenorm.validate.bench import peak_rss_bytes

        result["peak_rss_mb"] = peak_rss_bytes() / 2**20
        print(json.dumps(result))
        return

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gatenorm-bench-onnx-"))
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        if args.export_cost:
            export_cost(workdir, args)
            return
        models, config = prepare(workdir, args)
        runs: dict[str, list[dict]] = {name: [] for name in models}
        for rep in range(args.reps):
            for name, (kind, path) in models.items():
                runs[name].append(_child(kind, str(path), args.decode_steps))
            print(f"repetition {rep + 1}/{args.reps} done", file=sys.stderr)
        report(models, runs, config, args)
        print(f"\ntotal wall time {time.perf_counter() - start:.0f} s (exports included)")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def _verdict(ok: bool) -> str:
    return "ok" if ok else "BELOW"


def report(models: dict[str, tuple[str, Path]], runs: dict[str, list[dict]], config, args) -> None:
    med = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in runs.items()}
    print(f"onnxruntime CPU EP, {THREADS} threads, medians of {args.reps} interleaved repetitions")
    print(f"decode: {args.decode_steps} greedy steps after a {PREFILL_LENGTHS[0]}-token prompt\n")
    cols = ["prefill_512", "prefill_2048", "decode"]
    print(
        f"{'model (client)':32} {'prefill512 tok/s':>17} {'prefill2048 tok/s':>18} {'decode tok/s':>13} "
        f"{'size MB':>8} {'nodes':>6} {'peak RSS MB':>12}"
    )
    for name, m in med.items():
        kind, path = models[name]
        label = name.removeprefix("genai:") + f" ({'OnnxRunner' if kind == 'ours' else kind})"
        print(
            f"{label:32} {m[cols[0]]:17.1f} {m[cols[1]]:18.1f} {m[cols[2]]:13.2f} "
            f"{_size(path) / 1e6:8.1f} {_nodes(path):6d} {m['peak_rss_mb']:12.0f}"
        )

    from gatenorm.methods.cost import cost_model
    from gatenorm.models import smollm2
    from gatenorm.readers import open_checkpoint

    cost, vocab = cost_model(open_checkpoint(smollm2())), config.vocab_size
    n_layers = config.num_hidden_layers
    context = PREFILL_LENGTHS[0] + args.decode_steps // 2
    print(
        "\nspeedup over the 0-drop export of the same precision and client: measured / ideal (target >= 0.9)"
    )
    for client in ("ours", "genai:ours"):
        for precision in args.precisions:
            base = f"{client}-{precision}-drop0"
            for drop in [d for d in args.drops if d] if base in med else []:
                name = f"{client}-{precision}-drop{drop}"
                kept = n_layers - drop
                ideals = {
                    f"prefill_{t}": prefill_flops(cost, vocab, n_layers, t)
                    / prefill_flops(cost, vocab, kept, t)
                    for t in PREFILL_LENGTHS
                }
                ideals["decode"] = decode_bytes(models[base][1], config, n_layers, context) / decode_bytes(
                    models[name][1], config, kept, context
                )
                parts = []
                for col in cols:
                    measured = med[name][col] / med[base][col]
                    parts.append(
                        f"{col} {measured:.3f}/{ideals[col]:.3f} "
                        f"({measured / ideals[col]:.2f} {_verdict(measured >= 0.9 * ideals[col])})"
                    )
                print(f"  {name.removeprefix('genai:'):22} [{client.split(':')[0]}] " + "  ".join(parts))

    print("\nours vs onnxruntime-genai's builder, both in onnxruntime-genai (target >= 1.0x, size <= 1.0x):")
    for precision in args.precisions:
        ours, builder = f"genai:ours-{precision}-drop0", f"genai:builder-{precision}"
        if ours not in med or builder not in med:
            continue
        parts = [f"{col} {med[ours][col] / med[builder][col]:.2f}x" for col in cols]
        parts = [
            f"{p} ({_verdict(med[ours][c] >= med[builder][c])})" for p, c in zip(parts, cols, strict=True)
        ]
        size = _size(models[ours][1]) / _size(models[builder][1])
        print(f"  {precision:5} " + "  ".join(parts) + f"  size {size:.2f}x ({_verdict(size <= 1.0)})")
        for drop in [d for d in args.drops if d]:
            name = f"genai:ours-{precision}-drop{drop}"
            if name in med:
                ratios = "  ".join(f"{col} {med[name][col] / med[builder][col]:.2f}x" for col in cols)
                print(f"    ours drop{drop} vs builder: {ratios}")

    if "optimum-stock-fp32" in med and "ours-fp32-drop0" in med:
        ours, stock = med["ours-fp32-drop0"], med["optimum-stock-fp32"]
        print("\nours-fp32-drop0 (OnnxRunner) vs optimum-stock-fp32 (plain loop):")
        for col, target in (("prefill_512", 1.0), ("prefill_2048", 1.0), ("decode", 2.0)):
            ratio = ours[col] / stock[col]
            print(f"  {col:13} {ratio:.2f}x  (target >= {target:.0f}x: {_verdict(ratio >= target)})")


if __name__ == "__main__":
    main()
