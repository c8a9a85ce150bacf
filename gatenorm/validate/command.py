"""``gatenorm validate``: is a pruned / exported model good enough to ship, and is it faster?"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from gatenorm.errors import GatenormError
from gatenorm.validate.bench import BenchConfig
from gatenorm.validate.gates import Gates
from gatenorm.validate.passkey import PasskeyConfig
from gatenorm.validate.report import to_markdown, write_json, write_markdown, write_png
from gatenorm.validate.run import Settings, validate
from gatenorm.validate.runtimes import model_spec
from gatenorm.validate.zeroshot import DEFAULT_TASKS, parse_tasks

console = Console(stderr=True, markup=False, highlight=False)
RUNTIME_HELP = "auto (GGUF: llama.cpp, HF folder: torch, gatenorm ONNX folder: onnx), torch, llama.cpp, onnx."
_defaults = Gates()


def _ints(option: str, text: str, low: int) -> list[int]:
    """A comma-separated list of integers of at least `low`."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise GatenormError(f"{option} {text!r}: expected comma-separated integers") from None
    if not values or min(values) < low:
        raise GatenormError(f"{option} {text!r}: expected integers of at least {low}")
    return values


def validate_command(
    reference: Annotated[
        str, typer.Argument(help="Reference model: GGUF, HF folder, ONNX folder or smollm2.")
    ],
    candidate: Annotated[str, typer.Argument(help="Candidate model, same forms as REFERENCE.")],
    text: Annotated[
        str, typer.Option(help="'wiki' (shipped Wikipedia leads) or a UTF-8 text file.")
    ] = "wiki",
    ctx: Annotated[int, typer.Option(help="Window size; the second half of each window is scored.")] = 512,
    max_tokens: Annotated[
        int, typer.Option(help="Tokens of text to score (whole windows); 0 skips.")
    ] = 20480,
    tasks: Annotated[str, typer.Option(help="Comma-separated zero-shot tasks, or 'none'.")] = ",".join(
        DEFAULT_TASKS
    ),
    limit: Annotated[int, typer.Option(help="Items per task (the first N); 0 = all.")] = 200,
    bench: Annotated[bool, typer.Option("--bench", help="Also measure latency, RSS and file size.")] = False,
    bench_runs: Annotated[int, typer.Option(help="Timed runs per model (after one warm-up).")] = 5,
    bench_prompts: Annotated[
        str, typer.Option(help="Comma-separated prompt lengths timed (llama-bench's -p).")
    ] = "512,2048",
    bench_depths: Annotated[
        str,
        typer.Option(help="Comma-separated context depths decoding is timed at (llama-bench's -d), clipped."),
    ] = "0,2048,8192",
    bench_gen: Annotated[
        int, typer.Option(help="Tokens decoded per generation run (llama-bench's -n).")
    ] = 128,
    flash_attn: Annotated[bool, typer.Option(help="llama.cpp: flash attention in the benchmark.")] = True,
    passkey_lengths: Annotated[
        str, typer.Option(help="passkey tasks: comma-separated prompt lengths (clipped to the context).")
    ] = "1024,2048,4096,8192",
    passkey_depths: Annotated[int, typer.Option(help="passkey tasks: depths of the key per length.")] = 5,
    passkey_trials: Annotated[int, typer.Option(help="passkey tasks: prompts per length and depth.")] = 2,
    runtime: Annotated[str, typer.Option(help=f"Runtime of both models: {RUNTIME_HELP}")] = "auto",
    reference_runtime: Annotated[str | None, typer.Option(help="Runtime of the reference only.")] = None,
    candidate_runtime: Annotated[str | None, typer.Option(help="Runtime of the candidate only.")] = None,
    reference_plan: Annotated[
        Path | None, typer.Option(help="Apply this plan to the reference (torch).")
    ] = None,
    candidate_plan: Annotated[
        Path | None, typer.Option(help="Apply this plan to the candidate (torch).")
    ] = None,
    threads: Annotated[int, typer.Option(help="CPU threads per model; 0 = all cores.")] = 2,
    max_kld: Annotated[float, typer.Option(help="Gate: mean KLD at most this.")] = _defaults.max_kld,
    min_top1: Annotated[
        float, typer.Option(help="Gate: top-1 agreement (0..1) at least.")
    ] = _defaults.min_top1,
    max_ppl_ratio: Annotated[float, typer.Option(help="Gate: PPL ratio at most.")] = _defaults.max_ppl_ratio,
    max_acc_drop: Annotated[
        float, typer.Option(help="Gate: drop of the average accuracy, in points, at most.")
    ] = _defaults.max_acc_drop,
    min_retrieval: Annotated[
        float | None,
        typer.Option(
            help="Gate: passkey exact-match accuracy of the candidate minus the reference's, points."
        ),
    ] = _defaults.min_retrieval,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the full report as JSON.")] = None,
    md: Annotated[Path | None, typer.Option("--md", help="Write the report as Markdown.")] = None,
    png: Annotated[
        Path | None, typer.Option(help="Write the per-window KLD and accuracy plot (default: beside --md).")
    ] = None,
) -> None:
    """Compare CANDIDATE with REFERENCE on the same tokens: PPL/KLD/top-1 agreement, zero-shot accuracy,
    and with --bench latency. Exit 0 when every gate holds, 1 when one fails, 2 on bad input."""
    for name, value, low in (
        ("--ctx", ctx, 8),
        ("--max-tokens", max_tokens, 0),
        ("--limit", limit, 0),
        ("--bench-runs", bench_runs, 1),
        ("--bench-gen", bench_gen, 2),
        ("--threads", threads, 0),
        ("--passkey-depths", passkey_depths, 1),
        ("--passkey-trials", passkey_trials, 1),
    ):
        if value < low:
            raise GatenormError(f"{name} must be at least {low}, got {value}")
    ref_spec = model_spec(reference, reference_runtime or runtime, reference_plan)
    cand_spec = model_spec(candidate, candidate_runtime or runtime, candidate_plan)
    settings = Settings(
        text=text,
        ctx=ctx,
        max_tokens=max_tokens,
        tasks=parse_tasks(tasks),
        limit=limit or None,
        threads=threads,
        bench=BenchConfig(
            prompts=_ints("--bench-prompts", bench_prompts, 1),
            depths=_ints("--bench-depths", bench_depths, 0),
            generate=bench_gen,
            runs=bench_runs,
            flash_attn=flash_attn,
        )
        if bench
        else None,
        passkey=PasskeyConfig(
            lengths=_ints("--passkey-lengths", passkey_lengths, 64),
            depths=passkey_depths,
            trials=passkey_trials,
        ),
    )
    gates = Gates(
        max_kld=max_kld,
        min_top1=min_top1,
        max_ppl_ratio=max_ppl_ratio,
        max_acc_drop=max_acc_drop,
        min_retrieval=min_retrieval,
    )
    console.print(f"reference: {ref_spec.label}\ncandidate: {cand_spec.label}")
    report = validate(ref_spec, cand_spec, settings, gates, log=console.print)
    print(to_markdown(report))
    if json_out is not None:
        write_json(report, json_out)
    if md is not None:
        write_markdown(report, md)
    if png is None and md is not None:
        png = md.with_suffix(".png")
    if png is not None:
        write_png(report, png)
    if not report["passed"]:
        console.print(f"gates failed: {', '.join(report['failed_gates'])}")
        raise typer.Exit(1)
