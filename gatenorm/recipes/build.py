"""Build one variant: export (skipped when its content key is unchanged), validate, write its model card.

Runs in a worker process (local pool or Ray task) and touches only the variant's own folder. Every file
appears under its final name only when complete; the sidecar ``build.json`` holding the artifact's key is
written after the artifact, and the validation report (holding its key) after its Markdown and PNG, so a
run killed at any point leaves either a finished step or one that the next run redoes."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from gatenorm.errors import GatenormError
from gatenorm.io import atomic_write_text
from gatenorm.recipes.batch import Variant
from gatenorm.validate.result import ValidationReport

BUILD_RECORD = "build.json"
REPORT_JSON, REPORT_MD, REPORT_PNG = "validation.json", "validation.md", "validation.png"
CARD = "README.md"
LOGS = "logs"
STEPS = ("export", "validate", "card")

#: (variant name, step, state) -> None; state is "start", "built", "skipped" or "failed"
Emit = Callable[[str, str, str], None]


@dataclass
class VariantResult:
    """What happened to one variant: per step "built" or "skipped", or the step that failed and why."""

    name: str
    steps: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    failed_step: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def files_of(path: Path) -> list[Path]:
    """The files of an artifact: the file itself, or every file in the folder (name order)."""
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file())


def describe_files(root: Path, path: Path) -> dict[str, dict]:
    """size, mtime and sha256 of each file of `path`, keyed by its path relative to `root`."""
    from gatenorm.io import file_sha256

    out = {}
    for f in files_of(path):
        st = f.stat()
        out[f.relative_to(root).as_posix()] = {
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "sha256": file_sha256(f),
        }
    return out


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_record(folder: Path) -> dict | None:
    """The variant folder's build record, or None when absent or unreadable."""
    return _read_json(folder / BUILD_RECORD)


def artifact_current(out: Path, variant: Variant) -> bool:
    """Whether the artifact on disk was built from the variant's key and is unchanged since."""
    record = read_record(out / variant.folder)
    artifact = out / variant.artifact
    if record is None or record.get("key") != variant.key or not artifact.exists():
        return False
    on_disk = {f.relative_to(out).as_posix(): f.stat() for f in files_of(artifact)}
    files = record.get("files", {})
    return on_disk.keys() == files.keys() and all(
        st.st_size == files[name]["size"] and st.st_mtime_ns == files[name]["mtime_ns"]
        for name, st in on_disk.items()
    )


def clean_leftovers(folder: Path) -> None:
    """Remove the temporary files and folders (``.NAME.XXXX.tmp`` / ``.old``) of an interrupted run."""
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        if p.name.startswith(".") and p.name.endswith((".tmp", ".old")):
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)


def _export(out: Path, variant: Variant) -> str:
    from exporters.export import export
    from exporters.targets import target_spec

    if variant.heal_pending:
        raise GatenormError(f"{variant.name}: its repairs are not fitted (a dry run's batch plan)")
    if artifact_current(out, variant):
        return "skipped"
    folder = out / variant.folder
    (folder / BUILD_RECORD).unlink(missing_ok=True)
    target = target_spec(variant.export.target)
    options = dict(variant.export.options) | target.rebuild_options  # replace a stale artifact at the end
    artifact = out / variant.artifact
    export(
        variant.source_path,
        variant.load_plan(),
        artifact,
        variant.export.target,
        variant.export.quant,
        **options,
    )
    record = {"variant": variant.name, "key": variant.key, "files": describe_files(out, artifact)}
    atomic_write_text(folder / BUILD_RECORD, json.dumps(record, indent=2) + "\n")
    return "built"


#: Fields of a recipe's ``validation`` that are not validation settings.
_RECIPE_ONLY = {"enabled", "fail_on_gates"}


def _gates(variant: Variant):
    return variant.validation.settings.gates


def _write_report(report: ValidationReport, folder: Path) -> None:
    from gatenorm.validate.report import write_markdown, write_png

    write_markdown(report, folder / REPORT_MD)
    write_png(report, folder / REPORT_PNG)
    report.write(folder / REPORT_JSON)  # last: its key marks the validation as done


def read_report(folder: Path) -> ValidationReport | None:
    """The variant's validation report, or None when absent, unreadable or not a report."""
    return ValidationReport.read(folder / REPORT_JSON)


def _regate(report: ValidationReport, variant: Variant) -> ValidationReport | None:
    """The stored `report` judged by the recipe's current gates; None when the verdict text is unchanged."""
    from gatenorm.validate.gates import check_gates

    regated = report.with_gates(check_gates(_gates(variant), report))
    return None if regated.gate_lines == report.gate_lines else regated


def _validate(out: Path, variant: Variant) -> str:
    from gatenorm.validate.run import validate
    from gatenorm.validate.runtimes import ModelSpec
    from gatenorm.validate.settings import settings_model

    job = variant.validation
    folder = out / variant.folder
    report = read_report(folder)
    if report is not None and report.recipe_validation_key == job.key:
        if (regated := _regate(report, variant)) is not None:
            _write_report(regated, folder)
        return "skipped"
    (folder / REPORT_JSON).unlink(missing_ok=True)
    settings = settings_model().model_validate(job.settings.model_dump(exclude=_RECIPE_ONLY))
    ref = ModelSpec(Path(job.reference), job.reference_runtime)
    cand = ModelSpec(out / variant.artifact, job.runtime)
    report = validate(ref, cand, settings, _gates(variant))
    _write_report(report.model_copy(update={"recipe_validation_key": job.key}), folder)
    return "built"


def _card(out: Path, variant: Variant) -> str:
    from gatenorm.recipes.card import model_card

    folder = out / variant.folder
    atomic_write_text(folder / CARD, model_card(variant, read_report(folder)))
    return "built"


_STEP_FUNCTIONS = {"export": _export, "validate": _validate, "card": _card}


def _one_line(error: BaseException) -> str:
    if isinstance(error, GatenormError):
        return str(error)
    if isinstance(error, OSError):
        return f"{error.strerror or error}: {error.filename or ''}".rstrip(": ")
    last = traceback.extract_tb(error.__traceback__)[-1] if error.__traceback__ else None
    where = f" (at {Path(last.filename).name}:{last.lineno})" if last else ""
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {first}{where}"


@contextlib.contextmanager
def output_to(log: Path | None) -> Iterator[None]:
    """Send this process's stdout and stderr (Python's and native code's, e.g. llama.cpp's quantizer) to
    `log` (appended) for the duration; `None` leaves them alone."""
    if log is None:
        yield
        return
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with log.open("ab") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def log_path(out: Path, variant: Variant) -> Path:
    """Where a variant's worker output goes."""
    return out / LOGS / f"{variant.name}.log"


def build_variant(
    variant: Variant, out_dir: str, emit: Emit | None = None, capture: bool = True
) -> VariantResult:
    """Run the variant's steps in order; the first failing step stops this variant (and only it).

    With `capture`, the steps' console output goes to ``logs/VARIANT.log`` in the output folder."""
    out = Path(out_dir)
    folder = out / variant.folder
    folder.mkdir(parents=True, exist_ok=True)
    clean_leftovers(folder)
    result = VariantResult(variant.name)
    with output_to(log_path(out, variant) if capture else None):
        _run_steps(out, variant, result, emit)
    return result


def _run_steps(out: Path, variant: Variant, result: VariantResult, emit: Emit | None) -> None:
    for step in STEPS:
        if step == "validate" and variant.validation is None:
            continue
        if emit is not None:
            emit(variant.name, step, "start")
        print(f"== {variant.name}: {step} ({time.strftime('%Y-%m-%d %H:%M:%S')})", flush=True)
        start = time.perf_counter()
        try:
            state = _STEP_FUNCTIONS[step](out, variant)
        except Exception as e:  # isolated: reported in the summary, the other variants go on
            result.error, result.failed_step = _one_line(e), step
            state = "failed"
            traceback.print_exc()
        result.steps[step] = state
        result.seconds[step] = time.perf_counter() - start
        if emit is not None:
            emit(variant.name, step, state)
        if state == "failed":
            break
