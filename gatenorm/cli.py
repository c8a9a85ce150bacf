"""The ``gatenorm`` command line: score, plan, export, inspect, validate, run."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from exporters.export import export as run_export
from exporters.export import open_model
from exporters.targets import TARGETS, export_flags_model, target_spec
from gatenorm.errors import GatenormError
from gatenorm.io import atomic_write_text, refuse_overwriting_inputs
from gatenorm.methods import METHODS, MethodOptions, Ranking, make_method_plan, method_spec, rank_layers
from gatenorm.methods.cost import Phase, cost_model
from gatenorm.models import resolve_model
from gatenorm.plan import LayerAction, Plan
from gatenorm.readers import Checkpoint, open_checkpoint
from gatenorm.recipes.command import run_command
from gatenorm.scoring import LayerScores
from gatenorm.validate.command import validate_command
from gatenorm.validate.flags import with_settings_flags

app = typer.Typer(
    help="Data-free attention-sublayer pruning (Gate-Norm) and edge export for decoder-only LLMs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()

ModelArg = Annotated[
    str,
    typer.Argument(help="GGUF file, HF model folder, or a shipped model: smollm2, tiny.", show_default=False),
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


MethodOpt = Annotated[
    str,
    typer.Option(
        "--method",
        "-m",
        callback=_method_name,
        help=f"Method: {', '.join(METHODS)} (see README, Methods); "
        f"{', '.join(n for n, s in METHODS.items() if s.data)} need --calib.",
    ),
]
SeedOpt = Annotated[int, typer.Option(help="Seed of the random method and of synthetic calibration text.")]
CalibOpt = Annotated[
    str | None,
    typer.Option(
        "--calib",
        help="Calibration text of data-driven methods: a UTF-8 file, wiki-heldout (the shipped Wikipedia "
        "leads read from the end, never reached by the evaluation text), or synthetic (text the model "
        "generates itself: no data; the default of mixed-synthetic).",
    ),
]
CalibSamplesOpt = Annotated[int, typer.Option("--calib-samples", help="Calibration windows.")]
CalibLenOpt = Annotated[int, typer.Option("--calib-len", help="Tokens per calibration window.")]
CtxOpt = Annotated[
    int, typer.Option("--ctx", help="Context length of the cost model and of the data-free HARP alpha.")
]


def _options(
    seed: int, calib: str | None, calib_samples: int, calib_len: int, ctx: int, speedup_for: str = "prefill"
) -> MethodOptions:
    from gatenorm.methods.calibration import Calibration

    calibration = None if calib is None else Calibration(calib, calib_samples, calib_len)
    log = lambda m: console.print(m, style="dim")  # noqa: E731
    return MethodOptions(seed=seed, calib=calibration, ctx=ctx, speedup_for=speedup_for, log=log)


def _rank(
    model: str, method: str, options: MethodOptions, needed: int | None = None
) -> tuple[Checkpoint, Ranking]:
    ckpt = open_checkpoint(resolve_model(model))
    return ckpt, rank_layers(ckpt, method, options, needed)


def _table(
    scores: LayerScores, actions: list[LayerAction] | None = None, alphas: dict[int, float] | None = None
) -> Table:
    table = Table()
    table.add_column("layer", justify="right")
    table.add_column("score", justify="right")
    table.add_column("rank", justify="right")
    if actions is not None:
        table.add_column("action")
        table.add_column("alpha", justify="right")
    for i, (s, r) in enumerate(zip(scores.scores, scores.ranks(), strict=True)):
        row = [str(i), f"{s:.6g}", str(r)]
        if actions is not None:
            alpha = (alphas or {}).get(i) if actions[i] is LayerAction.LINEARIZE else None
            row += [actions[i].value, "" if alpha is None else f"{alpha:.3f}"]
        table.add_row(*row)
    return table


@app.command()
def score(
    model: ModelArg,
    method: MethodOpt = "gate-norm",
    seed: SeedOpt = 0,
    calib: CalibOpt = None,
    calib_samples: CalibSamplesOpt = 16,
    calib_len: CalibLenOpt = 256,
    ctx: CtxOpt = 512,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the scores as JSON here.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Draw the scores per layer to this PNG.")] = None,
) -> None:
    """Score every layer (rank 1 = changed first) and show the action the method would give it."""
    for out in (json_out, plot):
        if out is not None:
            refuse_overwriting_inputs(out, {"the model": resolve_model(model)})
    ckpt, ranking = _rank(model, method, _options(seed, calib, calib_samples, calib_len, ctx))
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
SpeedupForOpt = Annotated[
    Phase,
    typer.Option(
        "--speedup-for",
        help="What --budget-speedup is about: prefill (a prompt of --ctx tokens) or decode (generating at "
        "depth --ctx, where attention's share grows with the depth).",
    ),
]


@app.command()
def plan(
    model: ModelArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the plan JSON.")],
    drop: Annotated[
        int | None, typer.Option("--drop", "-n", help="Number of layers to change (drop/linearize).")
    ] = None,
    budget_speedup: SpeedupOpt = None,
    speedup_for: SpeedupForOpt = "prefill",
    method: MethodOpt = "gate-norm",
    seed: SeedOpt = 0,
    calib: CalibOpt = None,
    calib_samples: CalibSamplesOpt = 16,
    calib_len: CalibLenOpt = 256,
    ctx: CtxOpt = 512,
    allow_first_layer: Annotated[
        bool, typer.Option(help="Allow dropping layer 0 (gate-norm-type methods; llama.cpp cannot run it).")
    ] = False,
) -> None:
    """Rank the layers with a method and write a plan changing the N lowest-ranked (or reaching a speedup)."""
    if (drop is None) == (budget_speedup is None):
        raise GatenormError("give exactly one of --drop N and --budget-speedup X")
    if allow_first_layer and (drop is None or not method_spec(method).score_only):
        score_only = ", ".join(name for name, spec in METHODS.items() if spec.score_only)
        raise GatenormError(f"--allow-first-layer goes with --drop and {score_only}")
    refuse_overwriting_inputs(output, {"the model": resolve_model(model)})
    options = _options(seed, calib, calib_samples, calib_len, ctx, speedup_for)
    ckpt, ranking = _rank(model, method, options, drop)
    scores = ranking.scores
    result = make_method_plan(ckpt, method, drop, budget_speedup, options, ranking, allow_first_layer)
    result.save(output)
    actions = [lp.action for lp in result.layers]
    console.print(f"{method} plan for {ckpt.path}")
    console.print(
        _table(scores, actions, {lp.layer: lp.alpha for lp in result.layers if lp.alpha is not None})
    )
    speedup = cost_model(ckpt, ctx, speedup_for).speedup(actions)
    at = f"ctx {ctx}" if speedup_for == "prefill" else f"decode at depth {ctx}"
    console.print(f"{result.describe()} (estimated speedup {speedup:.3f} at {at}) -> {output}")


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
    speedup_for: SpeedupForOpt = "prefill",
    method: MethodOpt = "gate-norm",
    seed: SeedOpt = 0,
    calib: CalibOpt = None,
    calib_samples: CalibSamplesOpt = 16,
    calib_len: CalibLenOpt = 256,
    ctx: CtxOpt = 512,
    quant: Annotated[
        str,
        typer.Option(
            "--quant",
            "-q",
            help="; ".join(f"{name}: {t.quant_help}" for name, t in TARGETS.items()),
        ),
    ] = "keep",
    settings: BaseModel | None = None,
) -> None:
    """Export MODEL with the plan's attention sublayers removed (GGUF: runs in stock llama.cpp)."""
    # the targets' exporter options (`ExportTarget.flags`), those given on the command line
    given = {} if settings is None else settings.model_dump(exclude_defaults=True)
    target_spec(to).check_options(given)  # before any work: an option the target does not take
    if [plan_file, drop, budget_speedup].count(None) != 2:
        raise GatenormError("give exactly one of --plan PLAN.json, --drop N and --budget-speedup X")
    refuse_overwriting_inputs(output, {"the model": resolve_model(model), "the plan": plan_file})
    ckpt = open_model(resolve_model(model))
    if plan_file is not None:
        result, check = Plan.load(plan_file), True
    else:  # the plan is made from this very checkpoint: no need to check it against it
        options = _options(seed, calib, calib_samples, calib_len, ctx, speedup_for)
        result, check = make_method_plan(ckpt, method, drop, budget_speedup, options=options), False
    start = time.perf_counter()
    out = run_export(ckpt, result, output, to, quant, check_source=check, **given)
    size = sum(p.stat().st_size for p in out.iterdir()) if out.is_dir() else out.stat().st_size
    console.print(
        f"exported {ckpt.path} ({result.describe()}) -> {out} "
        f"({size / 2**20:.1f} MiB, {time.perf_counter() - start:.1f} s)"
    )


#: one flag per exporter option of the registered targets (`exporters.targets.export_flags_model`)
app.command("export")(with_settings_flags(export, export_flags_model()))


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


@app.command()
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
    columns = ("layer", "score", "action", "alpha") + (("repair sha256",) if stored.repaired else ())
    for column in columns:
        table.add_column(column)
    for lp in stored.layers:
        alpha = "" if lp.alpha is None else f"{lp.alpha:.6g}"
        repair = () if not stored.repaired else ("" if lp.repair is None else lp.repair.sha256[:16],)
        table.add_row(str(lp.layer), f"{lp.score:.6g}", lp.action.value, alpha, *repair)
    console.print(table)
    console.print(stored.describe())


app.command("validate")(validate_command)
app.command("run")(run_command)


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2."""
    try:
        app()
    except GatenormError as e:
        print(f"gatenorm: error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        print(f"gatenorm: error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
