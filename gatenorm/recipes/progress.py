"""Progress of a batch: a rich progress bar per variant on a terminal, one line per step elsewhere."""

from __future__ import annotations

import time

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from gatenorm.recipes.batch import Variant
from gatenorm.recipes.build import STEPS, VariantResult

_MARK = {"built": "[green]built[/]", "skipped": "[dim]skipped[/]", "failed": "[red]FAILED[/]"}


def _steps(variant: Variant) -> list[str]:
    return [s for s in STEPS if s != "validate" or variant.validation is not None]


class BatchProgress:
    """Shows each variant's steps as workers report them; use as a context manager."""

    def __init__(self, variants: list[Variant], console: Console):
        self.console = console
        self.live = console.is_terminal
        self.total = sum(len(_steps(v)) for v in variants)
        self.finished = 0
        self.started: dict[tuple[str, str], float] = {}
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(bar_width=20),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        )
        self.tasks = {}
        if self.live:
            self.overall = self.progress.add_task("[bold]batch", total=self.total)
            for v in variants:
                self.tasks[v.name] = self.progress.add_task(f"{v.name}: waiting", total=len(_steps(v)))

    def __enter__(self) -> BatchProgress:
        if self.live:
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.live:
            self.progress.stop()

    def event(self, name: str, step: str, state: str) -> None:
        """A worker started or finished `step` of variant `name`."""
        if state == "start":
            self.started[name, step] = time.perf_counter()
            if self.live:
                self.progress.update(self.tasks[name], description=f"{name}: {step} ...")
            return
        seconds = time.perf_counter() - self.started.get((name, step), time.perf_counter())
        self.finished += 1
        text = f"{name}: {step} {_MARK.get(state, state)} ({seconds:.1f} s)"
        if self.live:
            self.progress.update(self.tasks[name], advance=1, description=text)
            self.progress.advance(self.overall)
        else:
            self.console.print(f"[{self.finished}/{self.total}] {text}", highlight=False)

    def done(self, result: VariantResult) -> None:
        """A variant is finished (or failed)."""
        if self.live and result.ok:
            self.progress.update(self.tasks[result.name], description=f"{result.name}: [green]done[/]")
        elif not result.ok:
            line = f"{result.name}: [red]failed[/] at {result.failed_step}: {escape(result.error or '')}"
            if self.live:
                self.progress.update(self.tasks[result.name], description=line)
            else:
                self.console.print(line, highlight=False, markup=True)
