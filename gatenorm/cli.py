"""The ``gatenorm`` command line: score, plan, export, inspect, validate, run."""

from __future__ import annotations

import contextlib
import json
import re
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from exporters.export import export as run_export
from exporters.export import open_model
from exporters.targets import TARGETS, export_flags_model, target_spec
from gatenorm.errors import GatenormError
from gatenorm.heal.fit import HealSettings
from gatenorm.io import atomic_write_text, refuse_overwriting_inputs
from gatenorm.methods import (
    METHODS,
    MethodOptions,
    MethodSettings,
    Ranking,
    make_method_plan,
    method_spec,
    rank_layers,
)
from gatenorm.methods.cost import cost_model
from gatenorm.models import locate_model
from gatenorm.plan import LayerAction, Plan
from gatenorm.readers import Checkpoint, open_checkpoint
from gatenorm.recipes.command import run_command
from gatenorm.recover.settings import RecoverySettings
from gatenorm.scoring import LayerScores
from gatenorm.sequential.budget import check as check_memory
from gatenorm.sequential.budget import plan_steps
from gatenorm.sequential.memory import MemorySettings
from gatenorm.validate.command import validate_command
from gatenorm.validate.flags import with_settings_flags

try:  # recent typer parses with its own copy of click
    from typer._click import exceptions as click_errors
except ImportError:
    from click import exceptions as click_errors
#: a bare command asking for its help (click >= 8.2; older clicks print the help themselves)
_NO_ARGS_HELP = getattr(click_errors, "NoArgsIsHelpError", ())

app = typer.Typer(
    help="Data-free attention-sublayer pruning (Gate-Norm) and edge export for decoder-only LLMs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # click's plain help: rich's option tables cut words short at 80 columns
)
console = Console()

ModelArg = Annotated[
    str,
    typer.Argument(
        help="GGUF file, HF model folder, shipped model (smollm2, tiny), hub id org/name[@revision] or "
        "org/name:FILE.gguf.",
        show_default=False,
    ),
]


def _method_name(value: str) -> str:
    """A registered method's name (checked when the command runs: a method registered after import counts)."""
    try:
        return method_spec(value).name
    except GatenormError as e:
        raise typer.BadParameter(str(e)) from None


def _target_name(value: str) -> str:
    """A registered export target's name."""
    try:
        return target_spec(value).name
    except GatenormError as e:
        raise typer.BadParameter(str(e)) from None


def _names(names: Iterable[str], width: int = 40) -> str:
    """`names`, comma-separated, as a help paragraph that click does not rewrap (``\\b``): its wrapping
    breaks words at hyphens (``attention-`` / ``cosine``); lines of `width` fit the help column at 80."""
    lines = textwrap.wrap(", ".join(names), width, break_on_hyphens=False, break_long_words=False)
    return "\n\n\b\n" + "\n".join(lines) + "\n\n"


MethodOpt = Annotated[
    str,
    typer.Option(
        "--method",
        "-m",
        callback=_method_name,
        help=f"Method (see docs/methods.md):{_names(n + '*' * s.data for n, s in METHODS.items())}"
        "* needs --calib.",
    ),
]

HealOpt = Annotated[
    bool,
    typer.Option(
        "--heal",
        help="Fit a repair for every changed layer (ridge least squares of what it lost, on --calib text; "
        "default synthetic, text the model generates itself). plan writes its weights beside the plan "
        "(PLAN.repairs.safetensors), export embeds them. Settings: the --heal-* flags.",
    ),
]

RecoverOpt = Annotated[
    bool,
    typer.Option(
        "--recover",
        help="Distil the pruned (healed) model toward the unpruned one (low-rank adapters, KL of next-token "
        "distributions on --calib text; default synthetic) and merge them into the weights. plan writes "
        "them beside the plan (PLAN.recovered.safetensors), export embeds them. Settings: --recover-*.",
    ),
]


def _log(message: str) -> None:
    console.print(message, style="dim")


def _options(settings: MethodSettings, heal: HealSettings | None = None) -> MethodOptions:
    """The method options of a command's method flags (a speedup target counts `heal`'s repairs)."""
    return settings.method_options(heal=heal and heal.form, log=_log)


def _heal_settings(
    heal: bool, settings: HealSettings, calib: str | None, drop: int | None
) -> HealSettings | None:
    """The healing settings of a command (None without --heal), fitted on --calib text (else synthetic)."""
    if not heal:
        if settings != HealSettings():
            raise GatenormError("the --heal-* settings go with --heal")
        return None
    if drop == 0:
        raise GatenormError("--heal with --drop 0: the plan changes no layer, so there is nothing to heal")
    return settings if calib is None else settings.model_copy(update={"calib": calib})


def _recover_settings(
    recover: bool, settings: RecoverySettings, calib: str | None, drop: int | None
) -> RecoverySettings | None:
    """The recovery settings of a command (None without --recover), trained on --calib text (else
    synthetic)."""
    if not recover:
        if settings != RecoverySettings():
            raise GatenormError("the --recover-* settings go with --recover")
        return None
    if drop == 0:
        raise GatenormError(
            "--recover with --drop 0: the plan changes no layer, so there is nothing to recover"
        )
    return settings if calib is None else settings.model_copy(update={"calib": calib})


@contextlib.contextmanager
def _loss_bar():
    """A progress bar of the recovery's steps with the current loss; yields its callback."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (
        TextColumn("recovering"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("KL {task.fields[loss]}"),
    )
    with Progress(*columns, TimeRemainingColumn(), console=console, transient=True) as bar:
        task = bar.add_task("recover", total=None, loss="-")

        def update(step: int, steps: int, loss: float) -> None:
            bar.update(task, completed=step, total=steps, loss=f"{loss:.4f}")

        yield update


def _heal_and_recover(
    path: Path,
    result: Plan,
    healing: HealSettings | None,
    recovery: RecoverySettings | None,
    heal_weights: Path,
    recover_weights: Path,
) -> Plan:
    """`result` healed and / or recovered as asked, the weights written to the given files."""
    if healing is None and recovery is None:
        return result
    from gatenorm.recover.train import heal_and_recover

    with _loss_bar() if recovery is not None else contextlib.nullcontext() as progress:
        return heal_and_recover(
            path, result, healing, recovery, heal_weights, recover_weights, _log, progress
        )


def _refuse_deci_heal(ckpt: Checkpoint) -> None:
    if ckpt.fixed_layers:
        raise GatenormError(
            f"--heal / --recover on {ckpt.path}: its layers without attention (a deci file) are not run by "
            "the calibration passes yet"
        )


def _rank(
    model: Path, method: str, options: MethodOptions, needed: int | None = None
) -> tuple[Checkpoint, Ranking]:
    ckpt = open_checkpoint(model)
    return ckpt, rank_layers(ckpt, method, options, needed)


def _table(
    scores: LayerScores,
    actions: list[LayerAction] | None = None,
    alphas: dict[int, float] | None = None,
    healed: dict[int, str] | None = None,
) -> Table:
    """Scores, ranks, (given `actions`) each layer's action and alpha, (given `healed`) its repairs."""
    table = Table()
    table.add_column("layer", justify="right")
    table.add_column("score", justify="right")
    table.add_column("rank", justify="right")
    if actions is not None:
        table.add_column("action")
        table.add_column("alpha", justify="right")
    if healed is not None:
        table.add_column("healed")
    for i, (s, r) in enumerate(zip(scores.scores, scores.ranks(), strict=True)):
        row = [str(i), f"{s:.6g}", str(r)]
        if actions is not None:
            alpha = (alphas or {}).get(i) if actions[i] is LayerAction.LINEARIZE else None
            row += [actions[i].value, "" if alpha is None else f"{alpha:.3f}"]
        if healed is not None:
            row.append(healed.get(i, ""))
        table.add_row(*row)
    return table


def score(
    model: ModelArg,
    method: MethodOpt = "gate-norm",
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the scores as JSON here.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Draw the scores per layer to this PNG.")] = None,
    *,
    method_settings: MethodSettings,
) -> None:
    """Score every layer (rank 1 = changed first) and show the action the method would give it."""
    path = locate_model(model).path
    for out in (json_out, plot):
        if out is not None:
            refuse_overwriting_inputs(out, {"the model": path})
    ckpt, ranking = _rank(path, method, _options(method_settings))
    scores = ranking.scores
    console.print(f"{method} scores of {ckpt.path} ({scores.seconds:.2f} s)")
    console.print(_table(scores, ranking.actions, ranking.alphas))
    if json_out is not None:
        doc = {
            "method": method,
            "model": str(ckpt.path),
            "seconds": scores.seconds,
            "layers": [
                {"layer": i, "score": s, "action": a.value, "alpha": ranking.alphas.get(i)}
                for i, (s, a) in enumerate(zip(scores.scores, ranking.actions, strict=True))
            ],
        }
        atomic_write_text(json_out, json.dumps(doc, indent=2) + "\n")
    if plot is not None:
        from gatenorm.plot import plot_scores

        plot_scores(scores, ckpt.path.name, plot)


SpeedupOpt = Annotated[
    float | None,
    typer.Option(
        "--budget-speedup",
        help="Instead of --drop: change the fewest layers whose estimated speedup (cost model at --ctx) "
        "reaches this, e.g. 1.2.",
    ),
]


def plan(
    model: ModelArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the plan JSON.")],
    drop: Annotated[
        int | None, typer.Option("--drop", "-n", help="Number of layers to change (drop/linearize).")
    ] = None,
    budget_speedup: SpeedupOpt = None,
    method: MethodOpt = "gate-norm",
    allow_first_layer: Annotated[
        bool, typer.Option(help="Allow dropping layer 0 (gate-norm-type methods; llama.cpp cannot run it).")
    ] = False,
    heal: HealOpt = False,
    recover: RecoverOpt = False,
    *,
    method_settings: MethodSettings,
    heal_settings: HealSettings,
    recover_settings: RecoverySettings,
    memory: MemorySettings,
) -> None:
    """Rank the layers with a method and write a plan changing the N lowest-ranked (or reaching a speedup);
    with --heal, fit the changed layers' repairs too, with --recover distil it toward the unpruned model
    (their weights beside the plan)."""
    from gatenorm.heal.store import weights_path_for
    from gatenorm.recover import store as recover_store

    if (drop is None) == (budget_speedup is None):
        raise GatenormError("give exactly one of --drop N and --budget-speedup X")
    if allow_first_layer and (drop is None or not method_spec(method).score_only):
        score_only = ", ".join(name for name, spec in METHODS.items() if spec.score_only)
        raise GatenormError(f"--allow-first-layer goes with --drop and {score_only}")
    calib = method_settings.calib
    healing = _heal_settings(heal, heal_settings, calib, drop)
    recovery = _recover_settings(recover, recover_settings, calib, drop)
    located = locate_model(model)
    inputs = {"the model": located.path, "the calibration text": _calib_file(calib)}
    refuse_overwriting_inputs(output, inputs)
    weights, recovered = weights_path_for(output), recover_store.weights_path_for(output)
    if healing is not None:
        refuse_overwriting_inputs(weights, inputs)
    if recovery is not None:
        refuse_overwriting_inputs(recovered, inputs)
    options = _options(method_settings, healing)
    ckpt = open_checkpoint(located.path)
    if healing is not None or recovery is not None:
        _refuse_deci_heal(ckpt)
    if recovery is not None:
        from gatenorm.recover.train import check_fits

        check_fits(ckpt.path, recovery)
    heal_tokens = None if healing is None else healing.samples * healing.length
    check_memory(ckpt, plan_steps(ckpt, method, options.calib, drop, heal_tokens), memory, _log)
    ranking = rank_layers(ckpt, method, options, drop)
    result = make_method_plan(ckpt, method, drop, budget_speedup, options, ranking, allow_first_layer)
    result = result.from_hub(located.provenance)
    result = _heal_and_recover(ckpt.path, result, healing, recovery, weights, recovered)
    result.save(output)
    _print_plan(ckpt, method, ranking.scores, result, method_settings)
    files = [str(output)] + [r.weights for r in (result.healing, result.recovery) if r is not None]
    console.print(f"-> {' + '.join(files)}")


def _calib_file(calib: str | None) -> Path | None:
    """The calibration text file of --calib (None for a named source)."""
    from gatenorm.methods.calibration import SYNTHETIC
    from gatenorm.validate.text import WIKI_HELDOUT

    return None if calib in (None, SYNTHETIC, WIKI_HELDOUT) else Path(calib)


def _healed_cells(plan: Plan) -> dict[int, str]:
    """Layer -> what healing gave it: a fitted map, a refitted down projection (a fold), or both."""
    cells: dict[int, list[str]] = {}
    for i in plan.repaired:
        cells.setdefault(i, []).append("map")
    for i in plan.refitted:
        cells.setdefault(i, []).append("refit")
    return {i: "+".join(parts) for i, parts in cells.items()}


def _print_plan(
    ckpt: Checkpoint, method: str, scores: LayerScores, result: Plan, settings: MethodSettings
) -> None:
    """The plan's table (with a healed column for a healed plan), what it changes, and its estimated
    speedup with its repairs counted (and the fitting time)."""
    actions = [lp.action for lp in result.layers]
    alphas = {lp.layer: lp.alpha for lp in result.layers if lp.alpha is not None}
    healed = _healed_cells(result) if result.healing is not None else None
    console.print(f"{method} plan for {ckpt.path}")
    console.print(_table(scores, actions, alphas, healed))
    ctx, speedup_for = settings.ctx, settings.speedup_for
    speedup = cost_model(ckpt, ctx, speedup_for).plan_speedup(result)
    at = f"ctx {ctx}" if speedup_for == "prefill" else f"decode at depth {ctx}"
    counted = ", repairs counted" if result.healing is not None else ""
    console.print(f"{result.describe()} (estimated speedup {speedup:.3f} at {at}{counted})")
    if result.healing is not None:
        h = result.healing
        console.print(
            f"repairs ({h.form}) fitted in {h.seconds:.1f} s on {h.samples} x {h.length} tokens of "
            f"{h.calib} text ({h.ridges()})"
        )
    if (r := result.recovery) is not None:
        console.print(
            f"recovery: rank {r.rank} adapters on {', '.join(r.targets)} of layers {r.layers}, {r.steps} "
            f"steps on {r.samples} x {r.length} tokens of {r.calib} text, KL {r.initial_loss:.4f} -> "
            f"{r.loss:.4f} in {r.seconds:.1f} s"
        )


def export(
    model: ModelArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the exported model.")],
    to: Annotated[
        str, typer.Option("--to", callback=_target_name, help=f"Export format: {', '.join(TARGETS)}.")
    ] = "gguf",
    plan_file: Annotated[
        Path | None, typer.Option("--plan", "-p", help="Plan JSON made for MODEL (or use --drop).")
    ] = None,
    drop: Annotated[
        int | None, typer.Option("--drop", "-n", help="Score, plan and export in one step, dropping N.")
    ] = None,
    budget_speedup: SpeedupOpt = None,
    method: MethodOpt = "gate-norm",
    quant: Annotated[
        str,
        typer.Option(
            "--quant",
            "-q",
            help="; ".join(f"{name}: {t.quant_help}" for name, t in TARGETS.items()),
        ),
    ] = "keep",
    settings: BaseModel | None = None,
    heal: HealOpt = False,
    recover: RecoverOpt = False,
    *,
    method_settings: MethodSettings,
    heal_settings: HealSettings,
    recover_settings: RecoverySettings,
) -> None:
    """Export MODEL with the plan's attention sublayers removed (GGUF: runs in stock llama.cpp); a healed
    plan's repairs and a recovered plan's merged weights (--heal / --recover, or a plan made with them)
    are embedded."""
    from gatenorm.heal.store import load_repairs
    from gatenorm.recover.store import load_overrides

    # the targets' exporter options (`ExportTarget.flags`), those given on the command line
    given = {} if settings is None else settings.model_dump(exclude_defaults=True)
    target_spec(to).check_options(given)  # before any work: an option the target does not take
    if [plan_file, drop, budget_speedup].count(None) != 2:
        raise GatenormError("give exactly one of --plan PLAN.json, --drop N and --budget-speedup X")
    if heal and plan_file is not None:
        raise GatenormError("--heal goes with --drop or --budget-speedup (heal a plan file with plan --heal)")
    if recover and plan_file is not None:
        raise GatenormError(
            "--recover goes with --drop or --budget-speedup (recover a plan with plan --recover)"
        )
    calib = method_settings.calib
    healing = _heal_settings(heal, heal_settings, calib, drop)
    recovery = _recover_settings(recover, recover_settings, calib, drop)
    located = locate_model(model)
    inputs = {"the model": located.path, "the plan": plan_file, "the calibration text": _calib_file(calib)}
    refuse_overwriting_inputs(output, inputs)
    ckpt = open_model(located.path)
    with contextlib.ExitStack() as stack:
        if plan_file is not None:
            result, check = Plan.load(plan_file), True
            if result.healing is not None:
                refuse_overwriting_inputs(output, {"the plan's repair weights": Path(result.healing.weights)})
                load_repairs(result)  # present and matching the plan's hashes, before any work
            if result.recovery is not None:
                refuse_overwriting_inputs(
                    output, {"the plan's recovered weights": Path(result.recovery.weights)}
                )
                load_overrides(result)
        else:  # the plan is made from this very checkpoint: no need to check it against it
            if healing is not None or recovery is not None:
                _refuse_deci_heal(ckpt)
            options = _options(method_settings, healing)
            result = make_method_plan(ckpt, method, drop, budget_speedup, options=options)
            result, check = result.from_hub(located.provenance), False
            if healing is not None or recovery is not None:  # the weights live until the export is written
                folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gatenorm-heal-")))
                heal_weights, recover_weights = (
                    folder / "plan.repairs.safetensors",
                    folder / "plan.recovered.safetensors",
                )
                result = _heal_and_recover(
                    ckpt.path, result, healing, recovery, heal_weights, recover_weights
                )
                speedup = cost_model(ckpt, options.ctx, options.speedup_for).plan_speedup(result)
                seconds = sum(r.seconds for r in (result.healing, result.recovery) if r is not None)
                console.print(
                    f"{result.describe()}: fitted in {seconds:.1f} s (estimated speedup {speedup:.3f}, "
                    "repairs counted)"
                )
        start = time.perf_counter()
        out = run_export(ckpt, result, output, to, quant, check_source=check, **given)
    size = sum(p.stat().st_size for p in out.iterdir()) if out.is_dir() else out.stat().st_size
    console.print(
        f"exported {ckpt.path} ({result.describe()}) -> {out} "
        f"({size / 2**20:.1f} MiB, {time.perf_counter() - start:.1f} s)"
    )


#: one flag per exporter option of the registered targets (`exporters.targets.export_flags_model`)


def _inspect_deci(file: Path) -> bool:
    """A deci GGUF that gatenorm did not write (Nemotron-NAS): print each layer's state; False otherwise."""
    from gatenorm.readers.gguf_check import check_gguf

    fields = check_gguf(file).fields if file.is_file() else {}
    arch = fields.get("general.architecture")
    if arch is None or arch.contents() != "deci" or "gatenorm.plan" in fields:
        return False
    ckpt = open_checkpoint(file)
    console.print(f"{file}: deci, {ckpt.shape.n_layers} layers, no gatenorm plan (not a gatenorm export)")
    table = Table()
    for column in ("layer", "state"):
        table.add_column(column)
    for i in range(ckpt.shape.n_layers):
        state = ckpt.fixed_layers.get(i, ("keep", None))[0]
        table.add_row(
            str(i), {"keep": "attention", "linearize": "linear attention"}.get(state, "no attention")
        )
    console.print(table)
    return True


def inspect(
    file: Annotated[Path, typer.Argument(help="A GGUF file written by gatenorm export.", show_default=False)],
) -> None:
    """Print the gatenorm metadata and pruning plan stored in an exported GGUF."""
    from exporters.gguf.metadata import read_gguf_metadata, read_plan_metadata
    from exporters.keys import Keys

    if _inspect_deci(file):
        return
    meta, stored = read_gguf_metadata(file), read_plan_metadata(file)
    console.print(f"{file}: {meta['general.name']} (architecture {meta['general.architecture']})")
    for key, value in meta.items():
        if key.startswith(Keys.PREFIX) and key not in (Keys.PLAN, Keys.SCORES):
            console.print(f"  {key} = {value}")
    table = Table()
    columns = ("layer", "score", "action", "alpha")
    columns += ("repair sha256",) if stored.repaired else ()
    columns += ("refit sha256",) if stored.refitted else ()
    for column in columns:
        table.add_column(column)
    for lp in stored.layers:
        alpha = "" if lp.alpha is None else f"{lp.alpha:.6g}"
        records = [r for listed, r in ((stored.repaired, lp.repair), (stored.refitted, lp.refit)) if listed]
        cells = ("" if record is None else record.sha256[:16] for record in records)
        table.add_row(str(lp.layer), f"{lp.score:.6g}", lp.action.value, alpha, *cells)
    console.print(table)
    console.print(stored.describe())


def _with_method_flags(command, exclude: set[str] | frozenset[str] = frozenset()):
    """`command` with one flag per method setting (`MethodSettings`: --seed, --calib, --ctx, ...)."""
    return with_settings_flags(command, MethodSettings, "method_settings", exclude=exclude)


def _with_heal_flags(command):
    """`command` with --heal-* and --recover-* flags (`HealSettings`, `RecoverySettings`; their text is
    --calib's)."""
    command = with_settings_flags(
        command, RecoverySettings, "recover_settings", "recover-", exclude={"calib"}
    )
    return with_settings_flags(command, HealSettings, "heal_settings", "heal-", exclude={"calib"})


app.command("score")(_with_method_flags(score, exclude={"speedup_for"}))  # no speedup target to price
app.command("inspect")(inspect)
app.command("plan")(with_settings_flags(_with_method_flags(_with_heal_flags(plan)), MemorySettings, "memory"))
app.command("export")(with_settings_flags(_with_method_flags(_with_heal_flags(export)), export_flags_model()))
app.command("validate")(validate_command())
app.command("run")(run_command)


def _fail(message: str) -> NoReturn:
    print(f"gatenorm: error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(2)


#: the size an allocation failure names: numpy's "Unable to allocate 8.00 GiB for an array ...", torch's
#: "...: you tried to allocate 8589934592 bytes"
_ASKED = re.compile(r"allocate (?:(\d+) bytes|([\d.]+ [KMGTPE]?i?B))")


def _out_of_memory(error: BaseException) -> str | None:
    """The one line of an allocation failure (a MemoryError; torch's allocators raise a RuntimeError):
    the command, its model, the memory asked for and the memory available; None for any other error."""
    text = str(error)
    if not isinstance(error, MemoryError) and not re.search(
        r"(not enough|can't allocate|out of) memory", text
    ):
        return None
    notes = []
    if (found := _ASKED.search(text)) is not None:
        notes.append(f"an allocation of {found[2] or f'{int(found[1]) / 2**30:.2f} GiB'} failed")
    with contextlib.suppress(ImportError):
        import psutil

        notes.append(f"{psutil.virtual_memory().available / 2**30:.1f} GiB available")
    return f"out of memory: {_running()}" + (f" ({'; '.join(notes)})" if notes else "")


def _running() -> str:
    """``gatenorm COMMAND on ARGUMENT``: the command line being run and its first argument (the model, file
    or recipe), re-read from sys.argv once the command has unwound."""
    args = sys.argv[1:]
    command = typer.main.get_command(app).commands.get(args[0]) if args else None
    if command is None:
        return "gatenorm"
    first = next((p.name for p in command.params if p.param_type_name == "argument"), None)
    with contextlib.suppress(Exception):  # the command line parsed once already: this is a best effort
        value = command.make_context(args[0], args[1:], resilient_parsing=True).params.get(first)
        if value is not None:
            return f"gatenorm {args[0]} on {value}"
    return f"gatenorm {args[0]}"


def main() -> None:
    """Entry point: user errors, bad flags and values included, and running out of memory become one line on
    stderr and exit code 2."""
    try:
        code = app(standalone_mode=False)
    except _NO_ARGS_HELP as e:
        print(e.ctx.get_help())
        sys.exit(2)
    except click_errors.UsageError as e:
        hint = f" (see {e.ctx.command_path} --help)" if e.ctx else ""
        _fail(e.format_message() + hint)
    except click_errors.ClickException as e:
        _fail(e.format_message())
    except typer.Abort:
        print("gatenorm: aborted", file=sys.stderr)
        sys.exit(1)
    except GatenormError as e:
        _fail(str(e))
    except OSError as e:
        _fail(f"{e.strerror or e}: {e.filename or ''}".rstrip(": "))
    except (MemoryError, RuntimeError) as e:  # out of memory anywhere in a command: one line too
        if (line := _out_of_memory(e)) is None:
            raise
        _fail(line)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
