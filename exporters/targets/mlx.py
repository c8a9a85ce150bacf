"""The MLX target: folders that mlx-lm runs as they are (Apple silicon; mlx's CPU backend elsewhere),
float (fp32/fp16/bf16) or quantized by mlx's own quantizer (8bit/4bit). mlx and mlx-lm are the optional
extra ``gatenorm[mlx]``, imported only when a folder is written or run."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from exporters.targets.base import BeforeCommit, ExportTarget, register_target
from gatenorm.architectures import Architecture
from gatenorm.plan import LayerAction, Plan
from gatenorm.readers import Checkpoint


def parse_quant(quant: str) -> str:
    from exporters.mlx.writer import parse_quant as parse

    return quant if quant == "keep" else parse(quant)


class MlxExports(BaseModel):
    """MLX folders for mlx-lm, one per dtype or mlx quantization."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    quants: list[Literal["fp32", "fp16", "bf16", "8bit", "4bit"]] = Field(min_length=1)
    group_size: int = Field(64, description="8bit/4bit: weights per scale (mlx takes 32, 64 or 128).")


class MlxFlags(BaseModel):
    """The MLX exporter's options (`exporters.mlx.write_mlx`); a recipe sets them in `MlxExports`."""

    group_size: int | None = Field(None, description="8bit/4bit: weights per scale (default 64).")
    overwrite: bool = Field(
        False, description="replace an existing output folder.", json_schema_extra={"negatable": False}
    )


def export(
    ckpt: Checkpoint, plan: Plan, out: Path, quant: str, before_commit: BeforeCommit, **options
) -> Path:
    from exporters.mlx.writer import write_mlx

    options = {k: v for k, v in options.items() if v is not None}
    return write_mlx(ckpt, plan, out, quant, before_commit, **options)


def actions(arch: type[Architecture]) -> tuple[set[LayerAction], str]:
    """Every action for a family written as nemotron-nas (`exporters.mlx.families`); none for the rest."""
    from exporters.mlx.families import mlx_family

    return mlx_family(arch).actions()


def check(ckpt: Checkpoint, plan: Plan) -> None:
    from exporters.mlx.writer import check_plan

    check_plan(ckpt, plan)


def usage(artifact: str) -> str:
    from exporters.mlx import usage as mlx_usage

    return mlx_usage(artifact)


MLX = register_target(
    ExportTarget(
        name="mlx",
        export=export,
        parse_quant=parse_quant,
        actions=actions,
        options=MlxExports,
        flags=MlxFlags,
        variants=lambda o: [
            (q, {"group_size": o.group_size} if q in ("8bit", "4bit") else {})
            for q in dict.fromkeys(o.quants)
        ],
        artifact=lambda _name: "mlx",
        # in mlx-lm against the source in PyTorch (its exact weights, dequantized from a GGUF)
        runtimes=lambda _source_is_gguf: ("torch", "mlx"),
        usage=usage,
        quant_help="keep (source float type), fp32, fp16, bf16, 8bit, 4bit",
        card_front_matter=("library_name: mlx",),
        check=check,
        rebuild_options={"overwrite": True},
    )
)
