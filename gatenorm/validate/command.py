"""``gatenorm validate``: is a pruned / exported model good enough to ship, and is it faster?

The settings flags (``--ctx``, ``--tasks``, ``--bench-*``, ``--passkey-*``, the gates) are generated from
`gatenorm.validate.settings.ValidationSettings` (`gatenorm.validate.flags`); only the models, runtimes,
plans and outputs are declared here."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from gatenorm.sequential.memory import MemorySettings
from gatenorm.validate.flags import with_settings_flags
from gatenorm.validate.report import to_markdown, write_markdown, write_png
from gatenorm.validate.run import validate
from gatenorm.validate.runtimes import RUNTIMES, ModelSpec, model_spec
from gatenorm.validate.settings import ValidationSettings, settings_model

console = Console(stderr=True, markup=False, highlight=False)
RUNTIME_HELP = (
    "auto (the runtime that claims the model: GGUF llama.cpp, HF folder torch, gatenorm ONNX folder onnx), "
    f"{', '.join(RUNTIMES)}."
)


def _validate(
    reference: Annotated[
        str,
        typer.Argument(
            help="Reference model: GGUF, HF folder, ONNX folder, smollm2 or a hub id (docs/hub.md)."
        ),
    ],
    candidate: Annotated[str, typer.Argument(help="Candidate model, same forms as REFERENCE.")],
    runtime: Annotated[str, typer.Option(help=f"Runtime of both models: {RUNTIME_HELP}")] = "auto",
    reference_runtime: Annotated[str | None, typer.Option(help="Runtime of the reference only.")] = None,
    candidate_runtime: Annotated[str | None, typer.Option(help="Runtime of the candidate only.")] = None,
    reference_plan: Annotated[
        Path | None, typer.Option(help="Apply this plan to the reference (torch).")
    ] = None,
    candidate_plan: Annotated[
        Path | None, typer.Option(help="Apply this plan to the candidate (torch).")
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the full report as JSON.")] = None,
    md: Annotated[Path | None, typer.Option("--md", help="Write the report as Markdown.")] = None,
    png: Annotated[
        Path | None, typer.Option(help="Write the per-window KLD and accuracy plot (default: beside --md).")
    ] = None,
    *,
    settings: ValidationSettings,
    memory: MemorySettings,
) -> None:
    """Compare CANDIDATE with REFERENCE on the same tokens: PPL/KLD/top-1 agreement, zero-shot accuracy,
    and with --bench latency. Exit 0 when every gate holds, 1 when one fails, 2 on bad input."""
    ref_spec = model_spec(reference, reference_runtime or runtime, reference_plan)
    cand_spec = model_spec(candidate, candidate_runtime or runtime, candidate_plan)
    console.print(f"reference: {ref_spec.label}\ncandidate: {cand_spec.label}")
    _check_torch_memory([ref_spec, cand_spec], settings, memory)
    report = validate(ref_spec, cand_spec, settings, log=console.print)
    print(to_markdown(report))
    if json_out is not None:
        report.write(json_out)
    if md is not None:
        write_markdown(report, md)
    if png is None and md is not None:
        png = md.with_suffix(".png")
    if png is not None:
        write_png(report, png)
    if not report.passed:
        console.print(f"gates failed: {', '.join(report.failed_gates)}")
        raise typer.Exit(1)


def _check_torch_memory(specs: list[ModelSpec], settings: ValidationSettings, memory: MemorySettings) -> None:
    """The expected peak of the models run in PyTorch (`gatenorm.sequential.budget`), refused before loading
    when it cannot fit."""
    from gatenorm.readers import open_checkpoint
    from gatenorm.sequential.budget import check, validate_steps

    torch_specs = [s for s in specs if s.runtime == "torch"]
    if not torch_specs:
        return
    whole = bool(settings.tasks) or settings.bench is not None
    ckpt = open_checkpoint(torch_specs[0].path)
    steps = validate_steps(ckpt, settings.max_tokens, whole, len(torch_specs))
    check(ckpt, steps, memory, lambda line: console.print(line, style="dim"))


def validate_command() -> Callable[..., None]:
    """The ``gatenorm validate`` command with one flag per setting of `settings_model` (the gates of the
    metrics registered now included)."""
    return with_settings_flags(with_settings_flags(_validate, settings_model()), MemorySettings, "memory")
