"""``gatenorm run RECIPE.yaml``: plan the whole batch, build what changed, validate, report."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gatenorm.errors import GatenormError
from gatenorm.io import atomic_write_text
from gatenorm.recipes.batch import BatchPlan, Variant, plan_batch
from gatenorm.recipes.build import LOGS, VariantResult, artifact_current, read_report
from gatenorm.recipes.loader import load_recipe
from gatenorm.recipes.progress import BatchProgress
from gatenorm.recipes.report import MANIFEST, REPORT, write_manifest, write_report

console = Console(stderr=True, highlight=False)
LOCK = ".gatenorm-run.lock"
#: Resolved plans of each model x method, keyed by content (`gatenorm.recipes.batch.plans_key`).
PLANS = ".plans"


class Executor(str, Enum):
    LOCAL = "local"
    RAY = "ray"


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on the output folder: two runs must not build the same files at once."""
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise GatenormError(f"another gatenorm run is writing to {out}") from None
        yield
    finally:
        os.close(fd)


def _validated(out: Path, v: Variant) -> bool:
    """Whether the variant's stored report holds the measurement its validation job asks for."""
    report = read_report(out / v.folder)
    return (
        report is not None and v.validation is not None and report.recipe_validation_key == v.validation.key
    )


def _state(out: Path, plan: BatchPlan) -> dict[str, str]:
    """What a run would do to each variant: build, validate only, or nothing."""
    states = {}
    for v in plan.variants:
        if v.heal_pending:
            states[v.name] = "heal + build"
        elif not artifact_current(out, v):
            states[v.name] = "build"
        elif v.validation and not _validated(out, v):
            states[v.name] = "validate"
        else:
            states[v.name] = "up to date"
    return states


def print_plan(plan: BatchPlan, out: Path) -> None:
    """The batch plan as a table (what --dry-run prints), on stdout."""
    table = Table(title=f"{plan.recipe_name}: {len(plan.variants)} variants -> {out}")
    for column in ("variant", "method", "dropped", "layers", "export", "key", "to do"):
        table.add_column(column)
    states = _state(out, plan)
    for v in plan.variants:
        dropped = v.load_plan().changed
        budget = f"{v.budget} ({v.target})" if v.target else str(v.budget)
        table.add_row(
            v.name,
            v.method or "–",
            budget,
            ",".join(map(str, dropped)) or "–",
            v.export.label,
            v.key[:12],
            states[v.name],
        )
    stdout = Console(highlight=False)
    if not stdout.is_terminal:  # a log or a pipe: never truncate names
        stdout = Console(highlight=False, width=240)
    stdout.print(table)
    for key, budgets in plan.budgets.items():
        targets = {b: n for b, n in budgets.items() if not b.isdigit()}
        if targets:
            print(f"{key}: " + ", ".join(f"{b} -> {n} layers" for b, n in targets.items()))


def _summary(results: dict[str, VariantResult], seconds: float, out: Path) -> list[VariantResult]:
    counts: dict[str, int] = {}
    for r in results.values():
        for state in r.steps.values():
            counts[state] = counts.get(state, 0) + 1
    steps = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    failed = [r for r in results.values() if not r.ok]
    console.print(
        f"{len(results)} variants in {seconds:.0f} s ({steps}); {len(failed)} failed. "
        f"Report: {out / REPORT}, manifest: {out / MANIFEST}"
    )
    for r in failed:
        log = out / LOGS / f"{r.name}.log"
        console.print(f"[red]FAILED[/] {r.name} ({r.failed_step}): {escape(r.error or '')} (log: {log})")
    return failed


def run_command(
    recipe_file: Annotated[Path, typer.Argument(help="The recipe YAML file.", show_default=False)],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Output folder (default: the recipe's output).")
    ] = None,
    jobs: Annotated[int | None, typer.Option("--jobs", "-j", help="Variants built at once (local).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the batch plan and stop.")] = False,
    executor: Annotated[
        Executor, typer.Option(help="local: process pool; ray: one Ray task per variant.")
    ] = (Executor.LOCAL),
    address: Annotated[
        str | None, typer.Option(help="Ray cluster address (e.g. auto, ray://host:10001); none: local Ray.")
    ] = None,
) -> None:
    """Build every variant of a recipe (models x methods x budgets x exports), validate each against its
    source, and write REPORT.md and manifest.json. Unchanged artifacts are skipped; one failed variant does
    not stop the others. Exit 0 when all succeed, 1 when one failed, 2 on a bad recipe."""
    recipe, text = load_recipe(recipe_file)
    if jobs is not None and jobs < 1:
        raise GatenormError(f"--jobs must be at least 1, got {jobs}")
    if address is not None and executor is not Executor.RAY:
        raise GatenormError("--address goes with --executor ray")
    name = recipe.name or recipe_file.stem
    out = output or Path(recipe.output or f"out/{name}")
    start = time.perf_counter()
    plan = plan_batch(recipe, name, log=console.print, cache=out / PLANS, store=not dry_run)
    if dry_run:
        print_plan(plan, out)
        return
    with output_lock(out):
        atomic_write_text(out / "recipe.yaml", text)
        results: dict[str, VariantResult] = {}
        with BatchProgress(plan.variants, console) as progress:

            def on_result(result: VariantResult) -> None:
                results[result.name] = result
                progress.done(result)

            if executor is Executor.RAY:
                from gatenorm.recipes.executor import run_ray

                run_ray(
                    plan.variants, out, address, recipe.validation.threads or 1, progress.event, on_result
                )
            else:
                from gatenorm.recipes.executor import run_local

                run_local(plan.variants, out, jobs or recipe.jobs, progress.event, on_result)
        rows = write_report(plan, out, results, recipe_file)
        write_manifest(plan, out, results, text, recipe.model_dump(mode="json"))
    failed = _summary(results, time.perf_counter() - start, out)
    gates_failed = [n for n, r in rows.items() if r["passed"] is False]
    if gates_failed:
        console.print(f"gates failed: {', '.join(gates_failed)}")
    if failed or (gates_failed and recipe.validation.fail_on_gates):
        raise typer.Exit(1)
