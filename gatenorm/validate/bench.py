"""Latency, llama-bench style: prompt processing and generation speed, time to first token, peak RSS and
file size. Each model runs in its own worker process (so peak RSS is its own), and the runs of the two
models are interleaved after a warm-up so that machine load affects both alike."""

from __future__ import annotations

import multiprocessing as mp
import resource
import statistics
from dataclasses import dataclass
from pathlib import Path

from gatenorm.errors import GatenormError
from gatenorm.validate.runtimes import ModelSpec, open_runtime


@dataclass(frozen=True)
class BenchConfig:
    prompt: int = 512
    long_prompt: int = 2048
    generate: int = 128
    runs: int = 5
    warmup: int = 1
    threads: int = 2


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


def _worker(conn, spec: ModelSpec, threads: int, n_ctx: int) -> None:
    """Serve timing commands for one model until told to stop; reply with ('ok', value) or ('error', msg)."""
    try:
        runtime = open_runtime(spec, threads=threads, n_ctx=n_ctx)
        conn.send(("ok", None))
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
    def __init__(self, spec: ModelSpec, threads: int, n_ctx: int):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, spec, threads, n_ctx), daemon=True)
        self.proc.start()
        child.close()
        self.spec = spec
        self.call()  # wait until loaded

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


def file_size(path: Path) -> int:
    """Bytes of a model file, or of all files in a model folder."""
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def _median_stats(samples: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(s[k] for s in samples) for k in samples[0]}


def _one_run(
    worker: _Worker, prompt: list[int], long_prompt: list[int], cfg: BenchConfig
) -> dict[str, float]:
    short = worker.call("generate", prompt, 1)
    long = worker.call("generate", long_prompt, 1)
    gen = worker.call("generate", prompt[:1], cfg.generate + 1)  # 1 prefill token, then decode steps
    return {
        f"pp{cfg.prompt}_tok_s": cfg.prompt / short.first_token_s,
        f"pp{cfg.long_prompt}_tok_s": cfg.long_prompt / long.first_token_s,
        f"tg{cfg.generate}_tok_s": cfg.generate / (gen.total_s - gen.first_token_s),
        f"ttft{cfg.prompt}_ms": 1000 * short.first_token_s,
    }


def run_bench(ref: ModelSpec, cand: ModelSpec, tokens: list[int], cfg: BenchConfig) -> dict:
    """Median of `cfg.runs` interleaved runs (after `cfg.warmup`) per model, and the ratios cand/ref."""
    need = max(cfg.prompt, cfg.long_prompt)
    if len(tokens) < need:
        raise GatenormError(f"the benchmark prompt needs {need} tokens of text, got {len(tokens)}")
    prompt, long_prompt = tokens[: cfg.prompt], tokens[: cfg.long_prompt]
    n_ctx = need + cfg.generate + 8
    workers = [_Worker(ref, cfg.threads, n_ctx), _Worker(cand, cfg.threads, n_ctx)]
    samples: list[list[dict[str, float]]] = [[], []]
    try:
        for i in range(cfg.warmup + cfg.runs):
            for w, s in zip(workers, samples, strict=True):
                result = _one_run(w, prompt, long_prompt, cfg)
                if i >= cfg.warmup:
                    s.append(result)
        rss = [w.stop() for w in workers]
    finally:
        for w in workers:
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join()
    out: dict = {"config": cfg.__dict__.copy(), "reference": {}, "candidate": {}, "ratio": {}}
    for key, s, r, spec in zip(("reference", "candidate"), samples, rss, (ref, cand), strict=True):
        out[key] = {**_median_stats(s), "peak_rss_mib": r / 2**20, "file_mib": file_size(spec.path) / 2**20}
    out["ratio"] = {k: out["candidate"][k] / out["reference"][k] for k in out["reference"]}
    return out
