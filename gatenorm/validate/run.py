"""One validation: agreement on a text, zero-shot accuracy, optional latency, gates. Returns the report."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from datetime import datetime, timezone

import numpy as np
from pydantic import BaseModel

from gatenorm import __version__
from gatenorm.errors import GatenormError
from gatenorm.validate.agreement import compare_logits
from gatenorm.validate.bench import bench_tokens_needed, run_bench
from gatenorm.validate.gates import check_gates
from gatenorm.validate.passkey import RETRIEVAL_TASKS, build_prompts, evaluate_retrieval
from gatenorm.validate.recorded import LIMITS, RecordedRuntime
from gatenorm.validate.result import Bench, ModelInfo, ValidationReport, Zeroshot
from gatenorm.validate.runtimes import ModelSpec, Request, Runtime, open_runtime
from gatenorm.validate.settings import ValidationSettings
from gatenorm.validate.text import token_windows
from gatenorm.validate.zeroshot import Item, build_requests, evaluate_task, load_items

#: What to measure: the one validation-settings model (`gatenorm.validate.settings`).
Settings = ValidationSettings


class _Clock:
    """Wall and CPU seconds (this process, all threads) per stage: CPU time is robust to a busy machine."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str):
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        self.wall[stage] = self.wall.get(stage, 0.0) + time.perf_counter() - wall
        self.cpu[stage] = self.cpu.get(stage, 0.0) + time.process_time() - cpu


def _model_info(spec: ModelSpec) -> ModelInfo:
    return ModelInfo(path=str(spec.path), runtime=spec.runtime, plan=str(spec.plan) if spec.plan else None)


def _check_vocab(ref: Runtime, cand: Runtime) -> None:
    if ref.vocab_size != cand.vocab_size:
        raise GatenormError(
            f"vocabularies differ: reference has {ref.vocab_size} tokens, candidate {cand.vocab_size}; "
            "both models must share the reference's tokenizer"
        )


def _zeroshot(
    ref: Runtime, cand: Runtime, work: dict[str, tuple[list[Item], list[Request]]], log: Callable[[str], None]
) -> Zeroshot:
    tasks = {}
    for task, (items, requests) in work.items():
        scores = [evaluate_task(rt, items, requests, task).to_dict() for rt in (ref, cand)]
        drop = 100 * (scores[0]["main"] - scores[1]["main"])
        tasks[task] = {"reference": scores[0], "candidate": scores[1], "drop_points": drop}
        log(f"{task}: {scores[0]['metric']} {100 * scores[0]['main']:.1f} -> {100 * scores[1]['main']:.1f}")
    average = {
        side: _mean_with_error([t[side] for t in tasks.values()]) for side in ("reference", "candidate")
    }
    flat = {side: mean for side, (mean, _) in average.items()}
    errors = {f"{side}_err": err for side, (_, err) in average.items()}
    drop = 100 * (flat["reference"] - flat["candidate"])
    return Zeroshot.model_validate({"tasks": tasks, "average": {**flat, **errors, "drop_points": drop}})


def _mean_with_error(scores: list[dict]) -> tuple[float, float]:
    """The mean headline accuracy of tasks and its standard error (tasks independent)."""
    errors = [s["acc_err" if s["metric"] == "acc" else "acc_norm_err"] for s in scores]
    return float(np.mean([s["main"] for s in scores])), float(np.sqrt(np.sum(np.square(errors)))) / len(
        scores
    )


def validate(
    ref_spec: ModelSpec,
    cand_spec: ModelSpec,
    settings: ValidationSettings,
    gates: BaseModel | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> ValidationReport:
    """Run every requested measurement of `cand_spec` against `ref_spec` and evaluate the gates (`gates`,
    default `settings.gates`).

    All inputs (text, task data, benchmark prompt) are read and tokenized, with the reference's tokenizer,
    before the first measurement, so bad input fails fast. One model is loaded at a time: the reference
    answers everything first and is freed, its answers replayed against the candidate's
    (`gatenorm.validate.recorded`). Two PyTorch models hold no model while their agreement runs: the
    candidate is opened beside the reference, so that one layer-at-a-time pass (`gatenorm.sequential`)
    reads each layer once for both."""
    if settings.max_tokens == 0 and not settings.tasks and settings.bench is None:
        raise GatenormError("nothing to validate: --max-tokens 0, --tasks none and no --bench")
    gates = settings.gates if gates is None else gates
    clock = _Clock()
    cand = None
    retrieval_tasks = [t for t in settings.tasks if t in RETRIEVAL_TASKS]
    n_ctx = max(settings.ctx, 1024)
    if retrieval_tasks:  # llama.cpp's context must hold the longest prompt
        n_ctx = max(n_ctx, max(settings.passkey.lengths) + 16)
    with clock("load"):  # the candidate's vocabulary and context limits first, its model freed again
        probe = RecordedRuntime(open_runtime(cand_spec, settings.threads, n_ctx))
        probe.close()
        ref = RecordedRuntime(open_runtime(ref_spec, settings.threads, n_ctx))
        if ref_spec.runtime == cand_spec.runtime == "torch":  # served by the reference's pass
            cand = open_runtime(cand_spec, settings.threads, n_ctx)
    try:
        _check_vocab(ref, probe)
        first = settings.ctx // 2
        windows = bench_tokens = None
        if settings.max_tokens != 0:
            text, ctx = settings.text, settings.ctx
            windows = token_windows(text, ref.tokenize, ctx, settings.max_tokens, ref.bos_id)
        if settings.bench is not None:
            need = bench_tokens_needed(settings.bench)
            bench_tokens = token_windows(settings.text, ref.tokenize, need, need, None)[0].tolist()
        usable = [getattr(rt, k, None) for rt in (ref, probe) for k in LIMITS]
        usable = min((u for u in usable if u), default=None)
        retrieval_work = {
            task: build_prompts(task, settings.passkey, ref.tokenize, ref.bos_id, usable)
            for task in retrieval_tasks
        }
        work = {}
        for task in (t for t in settings.tasks if t not in RETRIEVAL_TASKS):  # one token stream for both
            items = load_items(task, settings.item_limit)
            work[task] = (items, build_requests(items, ref.tokenize, ref.bos_id))

        log(f"reference {ref_spec.label} first, then the candidate (one model loaded at a time)")
        if windows is not None:
            with clock("agreement"):
                ref.record_windows(windows, first)
        if work:
            with clock("zeroshot"):
                ref.record_requests(*(requests for _, requests in work.values()))
        if retrieval_work:
            with clock("retrieval"):
                ref.record_requests(*([p["request"] for p in prompts] for prompts in retrieval_work.values()))
        ref.release()
        if cand is None:
            with clock("load"):
                cand = open_runtime(cand_spec, settings.threads, n_ctx)

        agreement = None
        if windows is not None:
            log(f"agreement: {len(windows)} windows of {settings.ctx} tokens")
            with clock("agreement"):
                result = compare_logits(
                    ref.window_logits(windows, first), cand.window_logits(windows, first), windows, first, log
                )
            agreement = result
            log(
                f"agreement: KLD {result.kld_mean:.4f}, top-1 {100 * result.top1:.1f} %, ppl ratio "
                f"{result.ppl_ratio:.4f} ({clock.wall['agreement']:.0f} s)"
            )

        zeroshot = None
        if work:
            with clock("zeroshot"):
                zeroshot = _zeroshot(ref, cand, work, log)
        retrieval = None
        if retrieval_work:
            with clock("retrieval"):
                retrieval = evaluate_retrieval(ref, cand, retrieval_work, log)
    finally:
        ref.close()
        if cand is not None:
            cand.close()

    bench = None
    if bench_tokens is not None:
        log("bench: running interleaved latency runs")
        with clock("bench"):
            bench = Bench.model_validate(
                run_bench(ref_spec, cand_spec, bench_tokens, settings.bench, settings.threads)
            )

    settings_doc = settings.model_dump(exclude={"gates"})
    settings_doc["limit"] = settings.item_limit  # None: every item (as reports of earlier versions say)
    report = ValidationReport(
        gatenorm_version=__version__,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        reference=_model_info(ref_spec),
        candidate=_model_info(cand_spec),
        settings=settings_doc,
        agreement=agreement,
        zeroshot=zeroshot,
        retrieval=retrieval,
        bench=bench,
        gates=[],
        gate_lines=[],
        failed_gates=[],
        passed=True,
        seconds=clock.wall,
        cpu_seconds=clock.cpu,
    )
    return report.with_gates(check_gates(gates, report))
