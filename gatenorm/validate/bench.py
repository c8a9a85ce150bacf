"""Latency, llama-bench style: prompt processing at lengths (``pp512``), generation at depths (``tg128`` after
an empty context, ``tg128 @ d4096`` after a 4096-token one), time to first token, KV-cache bytes as the
runtime holds them, peak RSS and file size. Each model runs in its own worker process (so peak RSS is its
own), and the runs of the two models are interleaved after a warm-up so that machine load affects both
alike. Depths beyond the models' context are clipped to it."""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from gatenorm.errors import GatenormError
from gatenorm.validate.runtimes import ModelSpec, open_runtime


class BenchConfig(BaseModel):
    """What `gatenorm validate --bench` and recipes' ``validation.bench`` measure (one settings model)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    prompts: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [512, 2048], min_length=1, description="Prompt lengths timed (pp)."
    )
    depths: list[Annotated[int, Field(ge=0)]] = Field(
        default_factory=lambda: [0, 2048, 8192],
        min_length=1,
        description="Context depths decoding is timed after (tg @ d), clipped to the models' context.",
    )
    generate: int = Field(
        128,
        ge=2,
        description="Tokens decoded per generation run (llama-bench's -n).",
        json_schema_extra={"flag": "--bench-gen"},
    )
    runs: int = Field(5, ge=1, description="Timed runs per model, interleaved.")
    warmup: int = Field(1, ge=0, description="Untimed runs first.")
    flash_attn: bool = Field(
        True,
        description="llama.cpp: flash attention (a dropped layer keeps no V cache).",
        json_schema_extra={"flag": "--flash-attn/--no-flash-attn"},
    )
    compare_flash: bool = Field(
        True,
        description="llama.cpp: also measure the KV bytes at the deepest depth with flash attention off.",
    )


def pp_key(n: int) -> str:
    return f"pp{n}_tok_s"


def tg_key(n: int, depth: int) -> str:
    """Decode speed after a `depth`-token context (depth 0: after one prompt token, as llama-bench's tg)."""
    return f"tg{n}_tok_s" if depth == 0 else f"tg{n}_d{depth}_tok_s"


def kv_key(depth: int) -> str:
    return f"kv_d{depth}_mib"


def peak_rss_bytes() -> int:
    """Peak resident memory of this process: VmHWM (Linux; reset by exec, unlike ru_maxrss, which a spawned
    child inherits from its parent), else ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _worker(conn, spec: ModelSpec, threads: int, n_ctx: int, flash_attn: bool) -> None:
    """Serve timing commands for one model until told to stop; reply with ('ok', value) or ('error', msg)."""
    try:
        runtime = open_runtime(spec, threads=threads, n_ctx=n_ctx, flash_attn=flash_attn, timing=True)
        conn.send(("ok", getattr(runtime, "max_context", None)))
        while True:
            cmd, *args = conn.recv()
            if cmd == "stop":
                conn.send(("ok", peak_rss_bytes()))
                break
            conn.send(("ok", runtime.generate(*args)))
        runtime.close()
    except Exception as e:  # reported to the parent as one line
        conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        conn.close()


class _Worker:
    def __init__(self, spec: ModelSpec, threads: int, n_ctx: int, flash_attn: bool = True):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, spec, threads, n_ctx, flash_attn), daemon=True)
        self.proc.start()
        child.close()
        self.spec = spec
        self.max_context: int | None = self.call()  # wait until loaded

    def call(self, *msg):
        if msg:
            self.conn.send(msg)
        try:
            status, value = self.conn.recv()
        except EOFError:
            raise GatenormError(f"benchmark worker for {self.spec.label} died") from None
        if status != "ok":
            raise GatenormError(f"benchmark of {self.spec.label} failed: {value}")
        return value

    def stop(self) -> int:
        rss = self.call("stop")
        self.proc.join(timeout=30)
        return rss

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


def file_size(path: Path) -> int:
    """Bytes of a model file, or of all files in a model folder."""
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def _median_stats(samples: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(s[k] for s in samples) for k in samples[0]}


def clip_depths(depths: list[int], generate: int, max_context: int | None) -> list[int]:
    """`depths` (sorted, deduplicated) with those past the context replaced by the deepest that fits."""
    if max_context is None:
        return sorted(set(depths))
    top = max(0, max_context - generate - 1)
    return sorted({min(d, top) for d in depths})


def _one_run(worker: _Worker, tokens: list[int], cfg: BenchConfig, depths: list[int]) -> dict[str, float]:
    out: dict[str, float] = {}
    for i, n in enumerate(cfg.prompts):
        t = worker.call("generate", tokens[:n], 1)
        out[pp_key(n)] = n / t.first_token_s
        if i == 0:
            out[f"ttft{n}_ms"] = 1000 * t.first_token_s
    for d in depths:
        gen = worker.call("generate", tokens[: max(d, 1)], cfg.generate + 1)  # decode after the context
        out[tg_key(cfg.generate, d)] = cfg.generate / (gen.total_s - gen.first_token_s)
        if gen.kv_bytes is not None:
            out[kv_key(d)] = gen.kv_bytes / 2**20
    return out


def bench_tokens_needed(cfg: BenchConfig) -> int:
    return max(*cfg.prompts, *cfg.depths, 1)


def _kv_without_flash(
    specs: list[ModelSpec], tokens: list[int], generate: int, threads: int, n_ctx: int
) -> list[float]:
    """KV MiB of each llama.cpp model after `tokens` and `generate` decoded ones with flash attention off
    (one untimed run each, as the timed runs end)."""
    out = []
    for spec in specs:
        w = _Worker(spec, threads, n_ctx, flash_attn=False)
        try:
            out.append(w.call("generate", tokens, generate + 1).kv_bytes / 2**20)
            w.stop()
        finally:
            w.kill()
    return out


def bench_tokens(model: Path, cfg: BenchConfig) -> list[int]:
    """The benchmark's prompt tokens of `cfg`: the shipped wiki text in `model`'s vocabulary (no BOS), as
    `gatenorm validate --bench` takes them."""
    from gatenorm.validate.text import token_windows

    runtime = open_runtime(ModelSpec(Path(model), "llama.cpp"), 1, 64)
    need = bench_tokens_needed(cfg)
    try:
        return token_windows("wiki", runtime.tokenize, need, need, None)[0].tolist()
    finally:
        getattr(runtime, "close", lambda: None)()


def bench_interleaved(
    specs: dict[str, ModelSpec], tokens: list[int], cfg: BenchConfig, threads: int = 2
) -> tuple[dict[str, dict[str, float]], list[int], dict[str, int]]:
    """Every model of `specs` (name -> spec, one process each) timed in turn, `cfg.warmup` untimed then
    `cfg.runs` timed rounds: (name -> median stats, the depths run, name -> peak RSS bytes)."""
    need = bench_tokens_needed(cfg)
    if len(tokens) < need:
        raise GatenormError(f"the benchmark prompt needs {need} tokens of text, got {len(tokens)}")
    n_ctx = need + cfg.generate + 8
    workers: dict[str, _Worker] = {}
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in specs}
    try:
        for name, spec in specs.items():
            workers[name] = _Worker(spec, threads, n_ctx, cfg.flash_attn)
        contexts = [w.max_context for w in workers.values() if w.max_context]
        depths = clip_depths(cfg.depths, cfg.generate, min(contexts) if contexts else None)
        for i in range(cfg.warmup + cfg.runs):
            for name, w in workers.items():
                result = _one_run(w, tokens, cfg, depths)
                if i >= cfg.warmup:
                    samples[name].append(result)
        rss = {name: w.stop() for name, w in workers.items()}
    finally:
        for w in workers.values():
            w.kill()
    return {name: _median_stats(s) for name, s in samples.items()}, depths, rss


def run_bench(ref: ModelSpec, cand: ModelSpec, tokens: list[int], cfg: BenchConfig, threads: int = 2) -> dict:
    """Median of `cfg.runs` interleaved runs (after `cfg.warmup`) per model, and the ratios cand/ref."""
    medians, depths, rss_by = bench_interleaved({"reference": ref, "candidate": cand}, tokens, cfg, threads)
    n_ctx = bench_tokens_needed(cfg) + cfg.generate + 8
    samples = [medians["reference"], medians["candidate"]]
    rss = [rss_by["reference"], rss_by["candidate"]]
    out: dict = {
        "config": {**cfg.model_dump(), "threads": threads, "depths_run": depths},
        "reference": {},
        "candidate": {},
        "ratio": {},
    }
    for key, s, r, spec in zip(("reference", "candidate"), samples, rss, (ref, cand), strict=True):
        out[key] = {**s, "peak_rss_mib": r / 2**20, "file_mib": file_size(spec.path) / 2**20}
    out["ratio"] = {k: out["candidate"][k] / out["reference"][k] for k in out["reference"]}
    llama = [spec for spec in (ref, cand) if spec.runtime == "llama.cpp"]
    if cfg.flash_attn and cfg.compare_flash and len(llama) == 2:
        deep = max(depths[-1], 1)
        off = _kv_without_flash(llama, tokens[:deep], cfg.generate, threads, n_ctx)
        on = [out[k].get(kv_key(depths[-1])) for k in ("reference", "candidate")]
        out["flash_off"] = {"depth": deep, "kv_mib": dict(zip(("reference", "candidate"), off, strict=True))}
        out["flash_off"]["kv_mib_flash_on"] = dict(zip(("reference", "candidate"), on, strict=True))
    return out


def add_script_bench_args(parser: argparse.ArgumentParser) -> None:
    """The interleaved-benchmark flags the `scripts/bench_*.py` share (`script_bench_config` reads them)."""
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions (after one warm-up)")
    parser.add_argument("--gen", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--depths", default="0,4096")


def script_bench_config(args: argparse.Namespace) -> BenchConfig:
    """The `BenchConfig` of `add_script_bench_args`' flags: one prompt length, the depths, one warm-up."""
    return BenchConfig(
        prompts=[args.prompt],
        depths=[int(d) for d in args.depths.split(",")],
        generate=args.gen,
        runs=args.reps,
        warmup=1,
        compare_flash=False,
    )
