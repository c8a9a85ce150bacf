"""The methods study on SmolLM2-135M: quality (PPL, KLD, zero-shot) and measured llama.cpp speedup of every
method's plan per budget, scoring times, Gate-Norm vs attention-cosine rank correlation, the mechanism plot.

Every number lands in a JSON cache (--cache) keyed by what produced it, so the script resumes; `report`
writes docs/study.md and PNGs from the cache only. Stages: rank, time (re-time the rankings on a quiet
machine), quality, zeroshot, speed, heal (healed vs unhealed plans, `--heal`), heal-scale (the fit timed on
7B-shaped random layers), report.

    python scripts/study_methods.py   # every stage; the defaults are the settings of docs/study.md
    python scripts/study_methods.py --stages heal,heal-scale,report --heal-compare wiki-heldout   # Healing
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from pydantic import ValidationError

from gatenorm.errors import GatenormError
from gatenorm.heal.fit import HealSettings, heal_plan
from gatenorm.io import atomic_write_text
from gatenorm.methods import MethodOptions, Ranking, make_method_plan, method_spec, rank_layers
from gatenorm.methods.calibration import Calibration
from gatenorm.methods.cost import cost_model
from gatenorm.models import resolve_model
from gatenorm.plan import LayerAction, Plan
from gatenorm.readers import open_checkpoint
from gatenorm.scoring import LayerScores
from gatenorm.study.common import combo, heal_run_section, study_methods
from gatenorm.study.report import write_report
from gatenorm.validate.agreement import compare_logits
from gatenorm.validate.metrics import METRICS
from gatenorm.validate.text import (
    WIKI_HELDOUT,
    hf_bos_id,
    hf_tokenize,
    token_windows,
    wiki_articles,
    window_chars,
    windows_sha256,
)
from gatenorm.validate.zeroshot import DEFAULT_TASKS

#: Every registered method the study takes (`MethodSpec.in_study`), when the module is imported.
ALL_METHODS = ",".join(study_methods())
TASKS = ",".join(DEFAULT_TASKS)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", default="rank,quality,speed,zeroshot,report", help="also: time, heal")
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
    p.add_argument("--heal", action="store_true", help="Run the heal stage too (healed vs unhealed plans).")
    p.add_argument("--heal-methods", default="mixed-synthetic,gate-norm,attention-cosine")
    p.add_argument("--heal-budgets", default="2,4,8,12,16")
    p.add_argument(
        "--heal-settings",
        default="{}",
        help="HealSettings fields as JSON, study-wide (default: HealSettings(), synthetic calibration).",
    )
    p.add_argument(
        "--heal-compare",
        default="",
        help="Also heal the plans on these calibration texts (comma-separated: wiki-heldout, a file), the "
        "settings otherwise the same; quality only, reported beside the main calibration's.",
    )
    p.add_argument(
        "--heal-zeroshot",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="zero-shot the healed plans too (at --zeroshot-budgets)",
    )
    p.add_argument("--heal-dir", type=Path, default=None, help="Keep the healed plans and weights here.")
    p.add_argument(
        "--scale-samples",
        type=int,
        default=None,
        help="heal-scale: calibration windows of the 7B-shaped run (default: the heal settings'; "
        "the time is scaled to those)",
    )
    p.add_argument("--scale-healed", type=int, default=8, help="heal-scale: healed layers of the 7B estimate")
    p.add_argument("--model", default="smollm2", help="Model path or shipped alias (the study: smollm2).")
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
    """The evaluation windows: BOS first where the tokenizer adds one (the GGUF's ``add_bos_token``, as
    `validate` and every calibration text do; SmolLM2's file adds none)."""
    tokens = args.eval_windows * args.eval_len
    return token_windows("wiki", hf_tokenize(tokenizer), args.eval_len, tokens, hf_bos_id(tokenizer))


def drop_other_windows(cache: Cache, windows: np.ndarray) -> None:
    """Forget the KLD / PPL measured on other evaluation windows than `windows` (the quality section, the
    heal runs' healed qualities: refitted and measured again)."""
    digest = windows_sha256(windows)
    if cache.data.get("eval_windows_sha256") == digest:
        return
    cache.data.pop("quality", None)
    for name, section in cache.data.items():
        if name.split(":")[0] == heal_run_section():  # heal, heal:<calib>
            for entry in section.values():
                entry.pop("quality", None)
    cache.data["eval_windows_sha256"] = digest


def check_disjoint(args) -> dict:
    """Indices of the Wikipedia leads the evaluation and the calibration read; they must not meet."""
    ev = {i for i, _ in wiki_articles("wiki", window_chars(args.eval_windows * args.eval_len, args.eval_len))}
    n_cal = max(args.calib_samples, args.harp_samples) * args.calib_len
    cal = {i for i, _ in wiki_articles(WIKI_HELDOUT, window_chars(n_cal, args.calib_len))}
    out = {"eval_articles": [min(ev), max(ev)], "calib_articles": [min(cal), max(cal)]}
    for section, heal in heal_runs(args):
        if heal.calib == WIKI_HELDOUT:
            n = heal.samples * heal.length
            healing = {i for i, _ in wiki_articles(WIKI_HELDOUT, window_chars(n, heal.length))}
            cal |= healing
            articles = [min(healing), max(healing)]
        else:  # synthetic: generated by the model, no text read; a file: not the shipped leads
            articles = heal.calib_id()
        out[f"{section}_articles"] = articles
    if ev & cal:
        raise GatenormError(f"calibration and evaluation text share {len(ev & cal)} articles")
    return out


def logits_of(model, windows: np.ndarray) -> list[np.ndarray]:
    with torch.inference_mode():
        return [
            model(torch.from_numpy(row[None]), use_cache=False).logits[0, :-1].float().numpy()
            for row in windows
        ]


def quality_from(ref: list[np.ndarray], logits, windows: np.ndarray) -> dict:
    """PPL, KLD and top-1 agreement (keyed by their metric names, `gatenorm.validate.metrics`) of the
    candidate `logits` (per window) against the reference logits `ref` on `windows`."""
    a = compare_logits(ref, logits, windows, first=0)
    ppl, kld, top1 = (METRICS[name].read(a) for name in ("ppl", "kld", "top1"))
    return {
        "ppl": ppl,
        "ppl_ref": a.ppl_ref,
        "kld": kld,
        "kld_err": a.kld_err,
        "top1": top1,
        "tokens": a.n_tokens,
    }


def quality_of(model, windows: np.ndarray, ref: list[np.ndarray]) -> dict:
    """`quality_from` of a whole model (a recovery's student, whose merged weights the engine's plans do
    not carry)."""
    return quality_from(ref, logits_of(model, windows), windows)


#: plans per layer-at-a-time pass: their hidden states are held together (8 x 256 x 576 float32 = 4.7 MB
#: each on SmolLM2), and the cache is saved after each pass
PASS_PLANS = 16


def engine_qualities(engine, windows: np.ndarray, plans: list[Plan]) -> tuple[list[np.ndarray], list[dict]]:
    """(the unpruned model's logits, `quality_from` of each plan) on `windows`, computed on the
    layer-sequential engine (`gatenorm.sequential.SequentialModel.forward_many`): the reference and every
    plan in one pass that reads each layer's weights once, the LM head read once."""
    states = engine.forward_many(windows, [None, *plans])
    with engine.head():
        ref = list(engine.window_logits(states[0].hidden, 0))
        return ref, [quality_from(ref, engine.window_logits(s.hidden, 0), windows) for s in states[1:]]


def stage_quality(args, cache: Cache, ckpt) -> None:
    from gatenorm.apply import load_tokenizer
    from gatenorm.sequential import SequentialModel

    section = cache.section("quality")
    todo = {k: p for k, p in plans(args, cache, ckpt).items() if f"{k[0]}/{k[1]}" not in section}
    if not todo:
        return
    engine = SequentialModel(ckpt)
    windows = eval_windows(args, load_tokenizer(ckpt.path))
    items = list(todo.items())
    for start in range(0, len(items), PASS_PLANS):
        chunk = items[start : start + PASS_PLANS]
        began = time.perf_counter()
        _, qualities = engine_qualities(engine, windows, [plan for _, plan in chunk])
        took = (time.perf_counter() - began) / len(chunk)
        for ((name, b), _), q in zip(chunk, qualities, strict=True):
            section[f"{name}/{b}"] = q
            log(f"quality: {name} budget {b}: PPL {q['ppl']:.2f} KLD {q['kld']:.4f} ({took:.0f} s each)")
        cache.save()


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


def zeroshot_work(args, rt) -> dict:
    """Task -> (items, tokenized requests) of the study's zero-shot tasks, for runtime `rt`."""
    from gatenorm.validate.zeroshot import build_requests, load_items

    work = {}
    for task in args.tasks.split(","):
        items = load_items(task, args.limit)
        work[task] = (items, build_requests(items, rt.tokenize, rt.bos_id))
    return work


def zeroshot_of(rt, work: dict) -> dict:
    """Per-task main accuracy and its standard error of `rt`'s model, their average and its error (tasks
    independent)."""
    from gatenorm.validate.zeroshot import evaluate_task

    got = {task: evaluate_task(rt, items, reqs, task) for task, (items, reqs) in work.items()}
    errors = {task: s.acc_err if s.metric == "acc" else s.acc_norm_err for task, s in got.items()}
    return {
        "tasks": {task: s.main for task, s in got.items()},
        "errors": errors,
        "average": float(np.mean([s.main for s in got.values()])),
        "average_err": float(np.sqrt(sum(e * e for e in errors.values())) / len(errors)),
    }


def stage_zeroshot(args, cache: Cache, ckpt) -> None:
    """Zero-shot accuracy; one loaded runtime whose model is swapped for each pruned copy."""
    from gatenorm.apply import apply_plan
    from gatenorm.validate.runtimes import TorchRuntime

    section = cache.section("zeroshot")
    zb = [int(b) for b in args.zeroshot_budgets.split(",")] if args.zeroshot_budgets else []
    todo = [("unpruned", 0, None)] + [(n, b, p) for (n, b), p in plans(args, cache, ckpt).items() if b in zb]
    todo = [t for t in todo if f"{t[0]}/{t[1]}" not in section]
    if not todo:
        return
    rt = TorchRuntime(ckpt.path, threads=args.threads)
    base = rt.model
    work = zeroshot_work(args, rt)
    for name, b, plan in todo:
        rt.model = base if plan is None else apply_plan(copy.deepcopy(base), plan)
        key = f"{name}/{b}"
        section[key] = zeroshot_of(rt, work)
        log(f"zeroshot: {key}: average {100 * section[key]['average']:.1f}")
        cache.save()


def heal_settings(args) -> HealSettings:
    """The study-wide `HealSettings` of ``--heal-settings`` (JSON fields)."""
    try:
        return HealSettings.model_validate_json(args.heal_settings)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "value"
        raise GatenormError(f"--heal-settings {args.heal_settings!r}: {where}: {first['msg']}") from None


def heal_runs(args) -> list[tuple[str, HealSettings]]:
    """(results section, settings) of each heal run: ``heal`` with the study-wide settings, then
    ``heal:<calib>`` for each ``--heal-compare`` calibration text, the settings otherwise the same."""
    main = heal_settings(args)
    others = [c for c in args.heal_compare.split(",") if c]
    for calib in others:  # a missing file or the evaluation text: one line, before any work
        try:
            Calibration(calib)
        except GatenormError as e:
            raise GatenormError(f"--heal-compare {calib}: {e}") from None
    compared = [(heal_run_section(c), main.model_copy(update={"calib": c})) for c in others]
    return [(heal_run_section(), main), *compared]


def heal_plans(args, cache: Cache, ckpt) -> dict[tuple[str, int], Plan]:
    """The unhealed plans the heal stage heals: ``--heal-methods`` x ``--heal-budgets``."""
    section = cache.section("rankings")
    out = {}
    for method in args.heal_methods.split(","):
        if method not in section:
            raise GatenormError(f"--heal-methods {method}: no ranking of it in {args.cache} (run stage rank)")
        ranking = ranking_from_cache(section[method])
        for b in (int(x) for x in args.heal_budgets.split(",")):
            opts = MethodOptions(ctx=args.ctx)
            out[method, b] = make_method_plan(ckpt, method, b, options=opts, ranking=ranking)
    return out


def stage_heal(args, cache: Cache, ckpt) -> None:
    """Heal every plan of ``--heal-methods`` x ``--heal-budgets`` (`heal_plan`, one calibration for all)
    and evaluate healed and unhealed with the quality and zero-shot code of the other stages. Entries
    ``heal/<method>/<budget>`` hold the healed quality, zero-shot, fit time and estimated speedups; a
    missing unhealed quality or zero-shot entry is filled in its own section. Each ``--heal-compare``
    calibration heals the same plans into its own section (quality only)."""
    for i, (name, settings) in enumerate(heal_runs(args)):
        _heal_run(args, cache, ckpt, name, settings, zeroshot=i == 0)


def _heal_run(args, cache: Cache, ckpt, name: str, settings: HealSettings, zeroshot: bool) -> None:
    from gatenorm.apply import apply_plan, load_tokenizer
    from gatenorm.sequential import SequentialModel
    from gatenorm.validate.runtimes import TorchRuntime

    section = cache.section(name)
    stamp = settings.model_dump(mode="json")
    for key in [k for k, v in section.items() if k != "calibration" and v.get("settings") != stamp]:
        del section[key]  # fitted with other settings
    todo = heal_plans(args, cache, ckpt)
    cost = cost_model(ckpt, args.ctx)
    zb = {int(b) for b in args.zeroshot_budgets.split(",")} if args.zeroshot_budgets else set()
    zb = zb if args.heal_zeroshot and zeroshot else set()  # zero-shot at the study's --zeroshot-budgets

    def incomplete(method: str, b: int) -> bool:
        key = f"{method}/{b}"
        entry = section.get(key, {})
        zs = b in zb and ("zeroshot" not in entry or key not in cache.section("zeroshot"))
        return "quality" not in entry or key not in cache.section("quality") or zs

    # budget 8 first, then outwards, each for every method: an interrupted run still covers them all
    order = sorted(todo, key=lambda k: (abs(k[1] - 8), k[1]))
    missing = {k: todo[k] for k in order if incomplete(*k)}
    if not missing:
        return
    start = time.perf_counter()
    engine = SequentialModel(ckpt)
    tokenizer = load_tokenizer(ckpt.path)
    load_seconds = time.perf_counter() - start
    start = time.perf_counter()
    calib = settings.calibration().windows(tokenizer, ckpt.path, settings.seed)
    calib_seconds = time.perf_counter() - start
    section["calibration"] = {
        "settings": stamp,
        "windows": list(calib.shape),
        "load_seconds": load_seconds,
        "seconds": calib_seconds,
        "load": os.getloadavg()[0],
    }
    start = time.perf_counter()
    engine.forward(calib)  # a layer at a time: the reads of the weights are in it
    section["calibration"]["forward_seconds"] = time.perf_counter() - start  # the 7B generation estimate
    log(f"{name}: {calib.shape[0]} x {calib.shape[1]} {settings.calib} tokens in {calib_seconds:.0f} s")
    cache.save()
    windows = eval_windows(args, tokenizer)
    folder = tempfile.TemporaryDirectory() if args.heal_dir is None else None
    where = Path(folder.name if folder else args.heal_dir)
    where.mkdir(parents=True, exist_ok=True)
    healed_plans: dict[tuple[str, int], Plan] = {}
    # a compared run's files apart from the main run's in --heal-dir
    prefix = "" if name == heal_run_section() else re.sub(r"[^A-Za-z0-9]+", "-", name) + "-"
    try:
        for (method, b), plan in missing.items():  # fit and quality first: zero-shot is the long part
            key = f"{method}/{b}"
            stem = f"{prefix}{method}-{b}"
            healed_plan = heal_plan(
                ckpt.path, plan, settings, where / f"{stem}.repairs.safetensors", log, engine, calib
            )
            healed_plan.save(where / f"{stem}.json")
            healed_plans[method, b] = healed_plan
            entry = section.setdefault(key, {})
            entry.update(
                settings=stamp,
                fit_seconds=healed_plan.healing.seconds,
                fit_load=os.getloadavg()[0],
                est=cost.plan_speedup(healed_plan),
                est_unhealed=cost.plan_speedup(plan),
                repaired=healed_plan.repaired,
                refitted=healed_plan.refitted,
                plan=healed_plan.describe(),
            )
            _, (q, unhealed) = engine_qualities(engine, windows, [healed_plan, plan])
            entry["quality"] = q
            cache.section("quality").setdefault(key, unhealed)
            u = cache.section("quality")[key]
            log(
                f"{name}: {key}: fit {healed_plan.healing.seconds:.1f} s, "
                f"KLD {u['kld']:.4f} -> {q['kld']:.4f}, PPL {u['ppl']:.1f} -> {q['ppl']:.1f}"
            )
            cache.save()
        if not any(b in zb for _, b in healed_plans):
            return
        rt = TorchRuntime(ckpt.path, threads=args.threads)
        zbase = rt.model
        work = zeroshot_work(args, rt)
        zsection = cache.section("zeroshot")
        if "unpruned/0" not in zsection:
            zsection["unpruned/0"] = zeroshot_of(rt, work)
        for (method, b), healed_plan in healed_plans.items():
            key = f"{method}/{b}"
            if b not in zb:
                continue
            if key not in zsection:
                rt.model = apply_plan(copy.deepcopy(zbase), missing[method, b])
                zsection[key] = zeroshot_of(rt, work)
                log(f"heal: zeroshot unhealed {key}: {100 * zsection[key]['average']:.1f}")
                cache.save()
            if "zeroshot" not in section[key]:
                rt.model = apply_plan(copy.deepcopy(zbase), healed_plan)
                section[key]["zeroshot"] = zeroshot_of(rt, work)
                log(f"heal: zeroshot healed {key}: {100 * section[key]['zeroshot']['average']:.1f}")
                cache.save()
    finally:
        if folder is not None:
            folder.cleanup()


#: Llama-2-7B's layer shape, the 7B estimate's
SHAPE_7B = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
}
N_LAYERS_7B = 32


def stage_heal_scale(args, cache: Cache, ckpt) -> None:
    """Time `fit_repairs` on a stack of four random llama layers of Llama-2-7B's shape (a kept layer, a
    healed dropped attention, a healed dropped block: in form fold both fold into the MLP below, in form
    linear each gets a map; a kept layer above them, refitted for the drift where the settings say so) with
    the heal settings, and estimate from it (linear in tokens) the fit and the calibration-text generation
    of a 32-layer 7B model, each healed layer with a kept layer above it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from gatenorm.heal.fit import fit_repairs
    from gatenorm.plan import LayerPlan, Source

    settings = heal_settings(args)
    samples = args.scale_samples or settings.samples
    actions = [LayerAction.KEEP, LayerAction.DROP_ATTENTION, LayerAction.DROP_BLOCK, LayerAction.KEEP]
    labels = ["keep", "drop-attention", "drop-block", "kept above"]
    config = LlamaConfig(
        **SHAPE_7B, num_hidden_layers=len(actions), vocab_size=1024, max_position_embeddings=4096
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    source = Source(
        path="random llama layers, 7B shape", format="safetensors", architecture="llama",
        n_layers=len(actions), sha256="0" * 64, hashed="shape",
    )  # fmt: skip
    plan = Plan(
        method="random",
        budget=2,
        source=source,
        layers=[LayerPlan(layer=i, score=0.0, action=a) for i, a in enumerate(actions)],
    )
    windows = np.random.default_rng(0).integers(0, config.vocab_size, (samples, settings.length))
    marks = [time.perf_counter()]
    fit_repairs(model, plan, windows, settings, progress=lambda *_: marks.append(time.perf_counter()))
    per = {label: marks[i + 1] - marks[i] for i, label in enumerate(labels)}
    healed = args.scale_healed
    kept_refit = per["kept above"] - per["keep"]  # what refitting a kept layer above a healed one adds
    healed_layer = (per["drop-attention"] + per["drop-block"]) / 2 + kept_refit
    calib = cache.section("heal").get("calibration", {})
    ratio = calib["seconds"] / calib["forward_seconds"] if calib.get("forward_seconds") else None

    def estimate(target_samples: int) -> dict:
        """Linear in tokens: the study's heal settings' windows, or the default settings'."""
        factor = target_samples / samples
        forward = factor * N_LAYERS_7B * per["keep"]  # the 7B layers' forward over the calibration tokens
        return {
            "windows": [target_samples, settings.length],
            "fit_seconds": factor * (healed * healed_layer + (N_LAYERS_7B - healed) * per["keep"]),
            "forward_seconds": forward,
            "gen_seconds": forward * (ratio or 1.0),
        }

    cache.data["heal_scale"] = {
        "layers": len(actions),
        "d_model": SHAPE_7B["hidden_size"],
        "ffn": SHAPE_7B["intermediate_size"],
        "heads": SHAPE_7B["num_attention_heads"],
        "windows": [samples, settings.length],
        "tokens": samples * settings.length,
        "layer_seconds": per,
        "stack": labels,
        "load": os.getloadavg()[0],
        "n_layers": N_LAYERS_7B,
        "healed": healed,
        "gen_ratio": ratio,
        "estimates": [estimate(n) for n in dict.fromkeys([settings.samples, HealSettings().samples])],
    }
    log(f"heal-scale: per layer {json.dumps({k: round(v, 1) for k, v in per.items()})} s on {windows.shape}")
    cache.save()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cache = Cache(args.cache)
    for other in args.merge:
        for name, entries in json.loads(other.read_text()).items():
            if name in ("quality", "speed", "zeroshot"):
                cache.section(name).update(entries)
    ckpt = open_checkpoint(resolve_model(args.model))
    settings = {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("stages",)
    }
    cache.data["settings"] = {**settings, "text_split": check_disjoint(args)}
    from gatenorm.apply import load_tokenizer

    drop_other_windows(cache, eval_windows(args, load_tokenizer(ckpt.path)))
    stages = [s for s in args.stages.split(",") if s] + (["heal"] if args.heal else [])
    unknown = set(stages) - set(STAGES) - {"report"}
    if unknown:
        raise GatenormError(
            f"--stages: unknown {', '.join(sorted(unknown))} (choose {', '.join(STAGES)}, report)"
        )
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
    "heal": stage_heal,
    "heal-scale": stage_heal_scale,
}
