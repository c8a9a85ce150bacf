"""The methods study on SmolLM2-135M: quality (PPL, KLD, zero-shot) and measured llama.cpp speedup of every
method's plan per budget, scoring times, Gate-Norm vs attention-cosine rank correlation, the mechanism plot.

Every number lands in a JSON cache (--cache) keyed by what produced it, so the script resumes; `report`
writes docs/study.md and PNGs from the cache only. Stages: rank, time (re-time the rankings on a quiet
machine), quality, zeroshot, speed, report.

    python scripts/study_methods.py   # every stage; the defaults are the settings of docs/study.md
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gatenorm.errors import GatenormError
from gatenorm.io import atomic_write_text
from gatenorm.methods import MethodOptions, Ranking, make_method_plan, method_spec, rank_layers
from gatenorm.methods.calibration import Calibration
from gatenorm.methods.cost import cost_model
from gatenorm.models import smollm2
from gatenorm.plan import LayerAction, Plan
from gatenorm.readers import open_checkpoint
from gatenorm.scoring import LayerScores
from gatenorm.study.common import combo, study_methods
from gatenorm.study.report import write_report
from gatenorm.validate.agreement import compare_logits
from gatenorm.validate.text import WIKI_HELDOUT, hf_tokenize, token_windows, wiki_articles, window_chars
from gatenorm.validate.zeroshot import DEFAULT_TASKS

#: Every registered method the study takes (`MethodSpec.in_study`), when the module is imported.
ALL_METHODS = ",".join(study_methods())
TASKS = ",".join(DEFAULT_TASKS)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", default="rank,quality,speed,zeroshot,report")
    p.add_argument("--methods", default=ALL_METHODS)
    p.add_argument("--budgets", default="1,2,4,6,8,12,16")
    p.add_argument("--seeds", type=int, default=3, help="random: seeds 0..N-1")
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--eval-len", type=int, default=256)
    p.add_argument("--calib-samples", type=int, default=8)
    p.add_argument("--calib-len", type=int, default=256)
    p.add_argument("--harp-samples", type=int, default=4, help="calibration windows of HARP's alpha search")
    p.add_argument("--ctx", type=int, default=256, help="context of the cost model and the data-free alpha")
    p.add_argument("--tasks", default=TASKS)
    p.add_argument("--limit", type=int, default=30, help="zero-shot items per task")
    p.add_argument("--zeroshot-budgets", default="4,8,12,16")
    p.add_argument("--bench-prompt", type=int, default=256)
    p.add_argument("--bench-gen", type=int, default=32)
    p.add_argument("--bench-runs", type=int, default=11)
    p.add_argument(
        "--speed-budgets", default="1,2,4,6,8,12,16", help="budgets whose action counts are benchmarked"
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", type=Path, default=Path("docs/study_results.json"))
    p.add_argument("--docs", type=Path, default=Path("docs"))
    p.add_argument(
        "--merge",
        type=Path,
        action="append",
        default=[],
        help="Copy the quality / speed / zeroshot entries of another results JSON (a parallel run).",
    )
    return p.parse_args(argv)


class Cache:
    """The results JSON, saved atomically after every new entry."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {}

    def section(self, name: str) -> dict:
        return self.data.setdefault(name, {})

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(self.data, indent=1, sort_keys=True) + "\n")


def variants(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    """(variant name, method, seed): random gets one variant per seed."""
    out = []
    for m in args.methods.split(","):
        seeds = range(args.seeds) if m == "random" else [0]
        out += [(f"random-{s}" if m == "random" else m, m, s) for s in seeds]
    return out


def budgets(args: argparse.Namespace) -> list[int]:
    return [int(b) for b in args.budgets.split(",")]


def options(args: argparse.Namespace, method: str, seed: int) -> MethodOptions:
    """A method with a default calibration (mixed-synthetic: text the model generates) calibrates on that
    source, the others on held-out text."""
    samples = args.harp_samples if method == "harp" else args.calib_samples
    default = method_spec(method).default_calib
    source = WIKI_HELDOUT if default is None else default.source
    return MethodOptions(seed=seed, calib=Calibration(source, samples, args.calib_len), ctx=args.ctx, log=log)


def ranking_from_cache(entry: dict) -> Ranking:
    s = entry["scores"]
    scores = LayerScores(s["method"], s["scores"], s["sha"], s["hashed"], s["seconds"], s["seed"])
    actions = [LayerAction(a) for a in entry["actions"]]
    return Ranking(scores, actions, {int(k): v for k, v in entry["alphas"].items()}, entry["extra"])


def stage_rank(args, cache: Cache, ckpt) -> None:
    section = cache.section("rankings")
    for name, method, seed in variants(args):
        if name in section:
            continue
        log(f"rank: {name}")
        r = rank_layers(ckpt, method, options(args, method, seed), needed=max(budgets(args)))
        s = r.scores
        section[name] = {
            "scores": {
                "method": s.method,
                "scores": s.scores,
                "sha": s.content_sha256,
                "hashed": s.hashed,
                "seconds": s.seconds,
                "seed": s.seed,
            },
            "actions": [a.value for a in r.actions],
            "alphas": {str(k): v for k, v in r.alphas.items()},
            "extra": {k: [None if v != v else v for v in vals] for k, vals in r.extra.items()},
        }
        log(f"rank: {name} took {s.seconds:.2f} s")
        cache.save()


def stage_time(args, cache: Cache, ckpt) -> None:
    """Time each method's ranking again (a fresh calibration pass each: no shared cache) and record the wall
    time and load beside the cached ranking, which is kept: the quality entries were measured on it."""
    from gatenorm.methods.data_driven import calibration_statistics

    section = cache.section("rankings")
    for name, method, seed in variants(args):
        if method == "harp" and "harp" in section:
            continue  # its search takes ~20 minutes; the time of the run that made the ranking stands
        calibration_statistics.cache_clear()
        r = rank_layers(ckpt, method, options(args, method, seed), needed=max(budgets(args)))
        section[name]["scores"]["seconds"] = r.scores.seconds
        section[name]["timed_at_load"] = os.getloadavg()[0]
        log(f"time: {name} {r.scores.seconds:.2f} s")
        cache.save()


def plans(args, cache: Cache, ckpt) -> dict[tuple[str, int], Plan]:
    out = {}
    for name, method, _ in variants(args):
        ranking = ranking_from_cache(cache.section("rankings")[name])
        for b in budgets(args):
            out[name, b] = make_method_plan(
                ckpt, method, b, options=MethodOptions(ctx=args.ctx), ranking=ranking
            )
    return out


def eval_windows(args, tokenizer) -> np.ndarray:
    bos = tokenizer.bos_token_id  # always first: the windows docs/study.md was measured on
    tokens = args.eval_windows * args.eval_len
    return token_windows("wiki", hf_tokenize(tokenizer), args.eval_len, tokens, bos)


def check_disjoint(args) -> dict:
    """Indices of the Wikipedia leads the evaluation and the calibration read; they must not meet."""
    ev = {i for i, _ in wiki_articles("wiki", window_chars(args.eval_windows * args.eval_len, args.eval_len))}
    n_cal = max(args.calib_samples, args.harp_samples) * args.calib_len
    cal = {i for i, _ in wiki_articles(WIKI_HELDOUT, window_chars(n_cal, args.calib_len))}
    if ev & cal:
        raise GatenormError(f"calibration and evaluation text share {len(ev & cal)} articles")
    return {"eval_articles": [min(ev), max(ev)], "calib_articles": [min(cal), max(cal)]}


def logits_of(model, windows: np.ndarray) -> list[np.ndarray]:
    with torch.inference_mode():
        return [
            model(torch.from_numpy(row[None]), use_cache=False).logits[0, :-1].float().numpy()
            for row in windows
        ]


def stage_quality(args, cache: Cache, ckpt) -> None:
    from gatenorm.apply import apply_plan, load_model, load_tokenizer

    section = cache.section("quality")
    todo = {k: p for k, p in plans(args, cache, ckpt).items() if f"{k[0]}/{k[1]}" not in section}
    if not todo:
        return
    base = load_model(ckpt.path)
    windows = eval_windows(args, load_tokenizer(ckpt.path))
    ref = logits_of(base, windows)
    for (name, b), plan in todo.items():
        start = time.perf_counter()
        model = apply_plan(copy.deepcopy(base), plan)
        a = compare_logits(ref, logits_of(model, windows), windows, first=0)
        section[f"{name}/{b}"] = {
            "ppl": a.ppl_cand,
            "ppl_ref": a.ppl_ref,
            "kld": a.kld_mean,
            "kld_err": a.kld_err,
            "top1": a.top1,
            "tokens": a.n_tokens,
        }
        took = time.perf_counter() - start
        log(f"quality: {name} budget {b}: PPL {a.ppl_cand:.2f} KLD {a.kld_mean:.4f} ({took:.0f} s)")
        cache.save()
        del model


def stage_speed(args, cache: Cache, ckpt) -> None:
    from exporters.export import export
    from exporters.targets import TARGETS
    from gatenorm.validate.bench import BenchConfig, run_bench
    from gatenorm.validate.runtimes import ModelSpec
    from gatenorm.validate.text import load_text

    section = cache.section("speed")
    cfg = BenchConfig(
        prompts=[args.bench_prompt],  # one prompt length: the bench is the costliest stage
        depths=[0],
        generate=args.bench_gen,
        runs=args.bench_runs,
        warmup=1,
        compare_flash=False,
    )
    from llama_cpp import Llama

    llm = Llama(str(ckpt.path), n_ctx=64, verbose=False)
    tokens = llm.tokenize(load_text("wiki", 20 * args.bench_prompt).encode(), add_bos=False)[
        : args.bench_prompt
    ]
    llm.close()
    ref = ModelSpec(ckpt.path, "llama.cpp")
    speed_budgets = {int(b) for b in args.speed_budgets.split(",")}
    for (name, b), plan in sorted(plans(args, cache, ckpt).items(), key=lambda kv: -kv[0][1]):
        key = combo(plan)
        if b not in speed_budgets or key in section or plan.actions - TARGETS["gguf"].actions(ckpt.arch)[0]:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            out = export(ckpt.path, plan, Path(tmp) / "cand.gguf", "gguf", "keep")
            result = run_bench(ref, ModelSpec(out, "llama.cpp"), tokens, cfg, args.threads)
        section[key] = {
            "ratio": result["ratio"],
            "reference": result["reference"],
            "candidate": result["candidate"],
            "plan": f"{name}/{b}",
            "load": os.getloadavg()[0],  # 1-minute load average after the measurement
        }
        ratios = json.dumps({k: round(v, 3) for k, v in result["ratio"].items()})
        log(f"speed: {key} ({name} budget {b}): {ratios}")
        cache.save()


def stage_zeroshot(args, cache: Cache, ckpt) -> None:
    """Zero-shot accuracy; one loaded runtime whose model is swapped for each pruned copy."""
    from gatenorm.apply import apply_plan
    from gatenorm.validate.runtimes import TorchRuntime
    from gatenorm.validate.zeroshot import build_requests, evaluate_task, load_items

    section = cache.section("zeroshot")
    zb = [int(b) for b in args.zeroshot_budgets.split(",")] if args.zeroshot_budgets else []
    todo = [("unpruned", 0, None)] + [(n, b, p) for (n, b), p in plans(args, cache, ckpt).items() if b in zb]
    todo = [t for t in todo if f"{t[0]}/{t[1]}" not in section]
    if not todo:
        return
    rt = TorchRuntime(ckpt.path, threads=args.threads)
    base = rt.model
    work = {}
    for task in args.tasks.split(","):
        items = load_items(task, args.limit)
        work[task] = (items, build_requests(items, rt.tokenize, rt.bos_id))
    for name, b, plan in todo:
        rt.model = base if plan is None else apply_plan(copy.deepcopy(base), plan)
        scores = {task: evaluate_task(rt, items, reqs, task).main for task, (items, reqs) in work.items()}
        key = f"{name}/{b}"
        section[key] = {"tasks": scores, "average": float(np.mean(list(scores.values())))}
        log(f"zeroshot: {key}: average {100 * section[key]['average']:.1f}")
        cache.save()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cache = Cache(args.cache)
    for other in args.merge:
        for name, entries in json.loads(other.read_text()).items():
            if name in ("quality", "speed", "zeroshot"):
                cache.section(name).update(entries)
    ckpt = open_checkpoint(smollm2())
    settings = {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("stages",)
    }
    cache.data["settings"] = {**settings, "text_split": check_disjoint(args)}
    stages = args.stages.split(",")
    for stage in STAGES:
        if stage in stages:
            STAGES[stage](args, cache, ckpt)
    if "report" in stages:
        write_report(cache.data, args, ckpt, plans(args, cache, ckpt), cost_model(ckpt, args.ctx))


#: The measuring stages, in the order they run.
STAGES = {
    "rank": stage_rank,
    "time": stage_time,
    "quality": stage_quality,
    "speed": stage_speed,
    "zeroshot": stage_zeroshot,
}
