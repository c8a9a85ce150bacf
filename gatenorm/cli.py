"""The ``gatenorm`` command line: score, plan, export, inspect, validate, run."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from exporters.export import Target, open_model
from exporters.export import export as run_export
from gatenorm.errors import GatenormError
from gatenorm.io import atomic_write_text
from gatenorm.models import resolve_model
from gatenorm.plan import LayerAction, Plan, make_plan
from gatenorm.readers import Checkpoint, open_checkpoint
from gatenorm.recipes.command import run_command
from gatenorm.scoring import LayerScores, Method, score_checkpoint
from gatenorm.validate.command import validate_command

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
MethodOpt = Annotated[Method, typer.Option("--method", "-m", help="Scoring method.")]
SeedOpt = Annotated[int, typer.Option(help="Seed of the random method.")]


def _score(model: str, method: Method, seed: int) -> tuple[Checkpoint, LayerScores]:
    ckpt = open_checkpoint(resolve_model(model))
    return ckpt, score_checkpoint(ckpt, method, seed)


def _table(scores: LayerScores, actions: list[LayerAction] | None = None) -> Table:
    table = Table()
    table.add_column("layer", justify="right")
    table.add_column("score", justify="right")
    table.add_column("rank", justify="right")
    if actions is not None:
        table.add_column("action")
    for i, (s, r) in enumerate(zip(scores.scores, scores.ranks(), strict=True)):
        row = [str(i), f"{s:.6g}", str(r)]
        if actions is not None:
            row.append(actions[i].value)
        table.add_row(*row)
    return table


@app.command()
def score(
    model: ModelArg,
    method: MethodOpt = Method.GATE_NORM,
    seed: SeedOpt = 0,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the scores as JSON here.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Draw the scores per layer to this PNG.")] = None,
) -> None:
    """Score every layer's attention sublayer from the weights alone (rank 1 = dropped first)."""
    ckpt, scores = _score(model, method, seed)
    console.print(f"{method.value} scores of {ckpt.path} ({scores.seconds:.2f} s)")
    console.print(_table(scores))
    if json_out is not None:
        doc = {
            "method": method.value,
            "model": str(ckpt.path),
            "layers": [{"layer": i, "score": s} for i, s in enumerate(scores.scores)],
        }
        atomic_write_text(json_out, json.dumps(doc, indent=2) + "\n")
    if plot is not None:
        from gatenorm.plot import plot_scores

        plot_scores(scores, ckpt.path.name, plot)


@app.command()
def plan(
    model: ModelArg,
    drop: Annotated[int, typer.Option("--drop", "-n", help="Number of attention sublayers to remove.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the plan JSON.")],
    method: MethodOpt = Method.GATE_NORM,
    seed: SeedOpt = 0,
    allow_first_layer: Annotated[
        bool, typer.Option(help="Allow dropping layer 0 (llama.cpp cannot run such a GGUF).")
    ] = False,
) -> None:
    """Score the layers and write a plan that drops the attention of the N lowest-scored ones."""
    ckpt, scores = _score(model, method, seed)
    result = make_plan(ckpt, scores, drop, allow_first_layer)
    result.save(output)
    actions = [lp.action for lp in result.layers]
    console.print(f"{method.value} plan for {ckpt.path}")
    console.print(_table(scores, actions))
    console.print(f"{result.describe()} -> {output}")


@app.command()
def export(
    model: ModelArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the exported model.")],
    to: Annotated[Target, typer.Option("--to", help="Export format.")] = Target.GGUF,
    plan_file: Annotated[
        Path | None, typer.Option("--plan", "-p", help="Plan JSON made for MODEL (or use --drop).")
    ] = None,
    drop: Annotated[
        int | None, typer.Option("--drop", "-n", help="Score, plan and export in one step, dropping N.")
    ] = None,
    method: MethodOpt = Method.GATE_NORM,
    seed: SeedOpt = 0,
    quant: Annotated[
        str,
        typer.Option(
            "--quant",
            "-q",
            help="gguf: keep (source types), F32, F16, BF16, Q8_0, Q4_K_M, ...; "
            "onnx: fp32 (= keep), fp16, int8, int4",
        ),
    ] = "keep",
    mobile: Annotated[
        bool | None, typer.Option("--mobile", help="onnx: also write model.ort and its ORT Mobile op list.")
    ] = None,
    block_size: Annotated[int | None, typer.Option(help="onnx int4: weights per scale (default 32).")] = None,
) -> None:
    """Export MODEL with the plan's attention sublayers removed (GGUF: runs in stock llama.cpp)."""
    if (plan_file is None) == (drop is None):
        raise GatenormError("give exactly one of --plan PLAN.json and --drop N")
    ckpt = open_model(resolve_model(model))
    if plan_file is not None:
        result, check = Plan.load(plan_file), True
    else:  # the plan is made from this very checkpoint: no need to check it against it
        result, check = make_plan(ckpt, score_checkpoint(ckpt, method, seed), drop), False
    start = time.perf_counter()
    options = {k: v for k, v in {"mobile": mobile, "block_size": block_size}.items() if v is not None}
    out = run_export(ckpt, result, output, to, quant, check_source=check, **options)
    size = sum(p.stat().st_size for p in out.iterdir()) if out.is_dir() else out.stat().st_size
    console.print(
        f"exported {ckpt.path} ({result.describe()}) -> {out} "
        f"({size / 2**20:.1f} MiB, {time.perf_counter() - start:.1f} s)"
    )


@app.command()
def inspect(
    file: Annotated[Path, typer.Argument(help="A GGUF file written by gatenorm export.", show_default=False)],
) -> None:
    """Print the gatenorm metadata and pruning plan stored in an exported GGUF."""
    from exporters.gguf.metadata import read_gguf_metadata, read_plan_metadata

    meta, stored = read_gguf_metadata(file), read_plan_metadata(file)
    console.print(f"{file}: {meta['general.name']} (architecture {meta['general.architecture']})")
    for key, value in meta.items():
        if key.startswith("gatenorm.") and key not in ("gatenorm.plan", "gatenorm.scores"):
            console.print(f"  {key} = {value}")
    table = Table()
    for column in ("layer", "score", "action", "alpha"):
        table.add_column(column)
    for lp in stored.layers:
        alpha = "" if lp.alpha is None else f"{lp.alpha:.6g}"
        table.add_row(str(lp.layer), f"{lp.score:.6g}", lp.action.value, alpha)
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
