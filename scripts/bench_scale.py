"""Laptop-scale benchmark: gatenorm's commands on synthetic 7-8B Q4_K GGUFs, run as a user would (the CLI,
under /usr/bin/time -v), peak RSS and wall time printed next to their floors.

Files (random Q4_K weights, `scripts/bench_gguf.py`'s writer; speed and memory do not depend on values):
Llama-2-7B-shaped (d 4096, 32 layers, ff 11008, 32 heads, 32k vocabulary) and Llama-3-8B-shaped (GQA 32/8
heads, ff 14336, 128k vocabulary). Floors: peak RSS, the file's size (llama.cpp runs it in about that; the
issue's target is size + 2 GiB); wall time, one cold read of the file plus the command's multiply-adds at
the float32 matmul rate measured here; for `plan -m mixed-synthetic`, llama.cpp sampling the same
synthetic tokens (`gatenorm.methods.synthetic.llama_windows`) plus one llama.cpp prompt pass over them,
measured in the same run (the issue's target: within 1.5x). Each command starts with an empty cache
(synthetic text sampled afresh) but for the GGUF's tokenizer, converted once before the first
(`--work`/tokenizers), as a user's cache keeps it. A command the `--max-memory` check refuses (say the
machine has less memory than it needs) shows its one-line refusal. Each row is printed as soon as it is
measured.

    python scripts/bench_scale.py [--shapes 7b,8b] [--layers N] [--work DIR] [--calib-samples 2]
        [--calib-len 64] [--only LABEL,...]

`--layers N` writes the shape with N decoder layers instead (each layer, the vocabulary and the LM head as
in the full model): a layer-at-a-time command's peak memory does not depend on the depth, and its time and
its floor both grow with it, so a shallow file gives the ratios in minutes where the full one takes hours.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gguf import LLAMA_7B, write_synthetic_7b

SHAPES = {
    "7b": ("synthetic-llama2-7b-q4_k.gguf", LLAMA_7B),
    "8b": (
        "synthetic-llama3-8b-q4_k.gguf",
        dict(d=4096, n_layers=32, ff=14336, n_head=32, n_head_kv=8, vocab=128256, rope_theta=500000.0),
    ),
}
GIB = 1 << 30


RECIPE = """name: scale
models: [{model}]
methods:
  - name: mixed-synthetic
    options: {{calib_samples: {samples}, calib_len: {length}}}
  - name: gate-norm
    heal: {{samples: {samples}, length: {length}}}
budgets: [{drop}]
exports:
  gguf: {{quants: [keep]}}
validation: {{ctx: {length}, max_tokens: {tokens}, tasks: []}}
"""


def _commands(
    model: Path, work: Path, samples: int, length: int, n_layers: int
) -> list[tuple[str, list[str], int]]:
    """(label, gatenorm arguments, tokens the command runs through the model) of each benchmarked command
    (paths without spaces); 4 layers changed (a shallow file: half of them)."""
    stem, tokens, drop = work / model.stem, samples * length, min(4, n_layers // 2)
    calib = f"--calib-samples {samples} --calib-len {length}"
    heal = f"--heal --heal-samples {samples} --heal-len {length}"
    recipe = work / f"{model.stem}-recipe.yaml"
    recipe.write_text(RECIPE.format(model=model, samples=samples, length=length, tokens=tokens, drop=drop))
    cmds = [
        ("score", f"score {model}", 0),
        ("plan (weights only)", f"plan {model} --drop {drop} -o {stem}-weights.json", 0),
        ("plan attention-cosine (wiki-heldout)",
         f"plan {model} -m attention-cosine --calib wiki-heldout {calib} --drop {drop} -o {stem}-cosine.json",
         tokens),
        ("plan harp (wiki-heldout)",
         f"plan {model} -m harp --calib wiki-heldout {calib} --drop 2 -o {stem}-harp.json", tokens),
        ("plan mixed-synthetic",
         # --calib synthetic: without it the method's default calibration (8 x 256) ignores {calib}
         f"plan {model} -m mixed-synthetic --calib synthetic {calib} --drop {drop} -o {stem}-mixed.json",
         tokens),
        ("plan --heal (synthetic)", f"plan {model} --drop {drop} {heal} -o {stem}-healed.json", 2 * tokens),
        ("validate torch --candidate-plan",
         f"validate {model} {model} --runtime torch --candidate-plan {stem}-weights.json --tasks none "
         f"--ctx {length} --max-tokens {tokens}", 2 * tokens),
        ("export --to gguf", f"export {model} --plan {stem}-weights.json --to gguf -o {stem}-cut.gguf", 0),
        ("export --to gguf --heal",
         f"export {model} --drop {drop} {heal} --to gguf -o {stem}-healed.gguf", 2 * tokens),
        ("validate llama.cpp (source vs healed)",
         f"validate {model} {stem}-healed.gguf --tasks none --ctx {length} --max-tokens {tokens}",
         2 * tokens),
        ("run recipe (plan, heal, export, validate)",
         f"run {recipe} -o {work / (model.stem + '-run')}", 4 * tokens),
    ]  # fmt: skip
    return [(label, text.split(), n) for label, text, n in cmds]


def _synthetic_floor(path: Path, samples: int, length: int) -> tuple[float, float]:
    """(wall s, CPU s) of llama.cpp sampling `samples` x `length` synthetic tokens from `path` (as
    mixed-synthetic does, same seed and rules) plus one llama.cpp prompt pass over them."""
    from llama_cpp import Llama

    from gatenorm.methods.synthetic import _gguf_facts, llama_windows

    n_vocab, kv_bytes = _gguf_facts(path)
    prefixes = np.random.default_rng(0).integers(n_vocab, size=(samples, 2))
    start, cpu = time.perf_counter(), time.process_time()
    windows = llama_windows(path, prefixes, length, 0, kv_bytes)
    sampled = time.perf_counter() - start
    llm = Llama(
        str(path), n_ctx=length, n_batch=length, n_threads=len(os.sched_getaffinity(0)), verbose=False
    )
    start = time.perf_counter()
    for row in windows:
        llm.reset()
        llm.eval([int(x) for x in row])
    prompt = time.perf_counter() - start
    llm.close()
    cpu = time.process_time() - cpu
    print(
        f"floor of mixed-synthetic: sampling {sampled:.0f} s + one prompt pass {prompt:.0f} s "
        f"({cpu:.0f} CPU s)",
        flush=True,
    )
    return sampled + prompt, cpu


@contextlib.contextmanager
def _cache(tokenizers: Path) -> Iterator[str]:
    """An empty gatenorm cache folder whose tokenizer folder is `tokenizers`."""
    tokenizers.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as cache:
        (Path(cache) / "tokenizers").symlink_to(tokenizers.resolve(), target_is_directory=True)
        yield cache


def _warm_tokenizer(path: Path, tokenizers: Path) -> None:
    """The GGUF's tokenizer converted into `tokenizers` (what a user's first command does once)."""
    from gatenorm.apply import load_tokenizer

    with _cache(tokenizers) as cache:
        os.environ["GATENORM_CACHE"], before = cache, os.environ.get("GATENORM_CACHE")
        try:
            load_tokenizer(path)
        finally:
            os.environ.pop("GATENORM_CACHE")
            if before is not None:
                os.environ["GATENORM_CACHE"] = before


def _timed(args: list[str], tokenizers: Path) -> tuple[float, float, float, int, str]:
    """(wall s, CPU s (user + system), peak RSS GiB, exit code, last stderr line) of `gatenorm args` under
    /usr/bin/time -v: synthetic text sampled afresh (an empty cache), the GGUF's tokenizer converted once
    (`tokenizers`: the cache's tokenizer folder, kept across commands as a user's cache keeps it)."""
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "gatenorm.cli", *args]
    with _cache(tokenizers) as cache:
        start = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "GATENORM_CACHE": cache})
        wall = time.perf_counter() - start
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr)
    lines = [
        line for line in out.stderr.splitlines() if line.strip() and not line.startswith(("\t", "Command"))
    ]
    peak = int(rss.group(1)) * 1024 / GIB if rss else float("nan")
    cpu = sum(
        float(m.group(1)) for m in re.finditer(r"(?:User|System) time \(seconds\): ([\d.]+)", out.stderr)
    )
    return wall, cpu, peak, out.returncode, (lines or [""])[-1]


def _matmul_rate() -> float:
    """float32 multiply-adds x 2 per second of one 1024 x 4096 x 4096 matmul here (torch's threads)."""
    a, b = torch.randn(1024, 4096), torch.randn(4096, 4096)
    a @ b
    start = time.perf_counter()
    a @ b
    return 2 * 1024 * 4096 * 4096 / (time.perf_counter() - start)


def _read_seconds(path: Path) -> float:
    start = time.perf_counter()
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", default="7b,8b", help="comma-separated: 7b, 8b")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-scale"), help="where the files go")
    parser.add_argument("--calib-samples", type=int, default=2)
    parser.add_argument("--calib-len", type=int, default=64)
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's)")
    parser.add_argument(
        "--only", default="", help="comma-separated: run only commands whose label contains one of these"
    )
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rate = _matmul_rate()
    print(
        f"float32 matmul rate here: {rate / 1e9:.1f} GFLOP/s, load average {os.getloadavg()[0]:.1f} "
        "(the machine may be shared)",
        flush=True,
    )
    for shape in args.shapes.split(","):
        name, dims = SHAPES[shape]
        if args.layers is not None:
            dims = {**dims, "n_layers": args.layers}
            name = name.replace(".gguf", f"-{args.layers}l.gguf")
        path = args.work / name
        if not path.exists():
            start = time.perf_counter()
            write_synthetic_7b(path, dims, path.stem)
            print(f"wrote {path} in {time.perf_counter() - start:.0f} s", flush=True)
        size = path.stat().st_size / GIB
        read = _read_seconds(path)
        from gatenorm.readers import open_checkpoint
        from gatenorm.sequential.memory import ModelSize

        params = ModelSize.of(open_checkpoint(path)).params
        print(
            f"\n{path.name}: {size:.2f} GiB, {params / 1e9:.2f}B parameters, read in {read:.0f} s", flush=True
        )
        commands = _commands(path, args.work, args.calib_samples, args.calib_len, dims["n_layers"])
        only = [o for o in args.only.split(",") if o]
        commands = [c for c in commands if not only or any(o in c[0] for o in only)]
        _warm_tokenizer(path, args.work / "tokenizers")
        synthetic = None
        if any(label == "plan mixed-synthetic" for label, *_ in commands):
            synthetic = _synthetic_floor(path, args.calib_samples, args.calib_len)
        heads = ("exit", "wall s", "CPU s", "floor s", "x floor", "peak GiB", "target GiB")
        print(f"{'command':44s} " + " ".join(f"{h:>9s}" for h in heads), flush=True)
        for label, argv, tokens in commands:
            wall, cpu, rss, code, last = _timed(argv, args.work / "tokenizers")
            floor = read + 2.0 * params * tokens / rate
            if label == "plan mixed-synthetic":
                floor = synthetic[0]
            print(
                f"{label:44s} {code:>9d} {wall:>9.0f} {cpu:>9.0f} {floor:>9.0f} {wall / floor:>9.2f} "
                f"{rss:>9.2f} {size + 2:>9.2f}",
                flush=True,
            )
            if label == "plan mixed-synthetic":  # a shared machine's load moves wall times: CPU too
                print(f"    CPU s over the floor's: {cpu / synthetic[1]:.2f}x", flush=True)
            if code not in (0, 1):
                print(f"    {last[:200]}", flush=True)


if __name__ == "__main__":
    main()
