"""The ONNX target: onnxruntime (and onnxruntime-genai, optimum, transformers.js), fp32/fp16/int8/int4."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from exporters.targets.base import BeforeCommit, ExportTarget, register_target
from gatenorm.architectures import Architecture
from gatenorm.errors import GatenormError
from gatenorm.plan import LayerAction, Plan
from gatenorm.readers import Checkpoint

PRECISIONS = ("fp32", "fp16", "int8", "int4")


def parse_quant(quant: str) -> str:
    """`quant` as a weight precision: fp32 (= keep), fp16, int8, int4."""
    precision = "fp32" if quant == "keep" else quant.lower()
    if precision not in PRECISIONS:
        raise GatenormError(f"--quant {quant!r}: onnx takes fp32, fp16, int8 or int4")
    return precision


class OnnxExports(BaseModel):
    """ONNX folders for onnxruntime, one per weight precision."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    precisions: list[Literal["fp32", "fp16", "int8", "int4"]] = Field(min_length=1)
    block_size: int = Field(32, ge=16, description="int4: weights per scale (a power of two).")
    mobile: bool = Field(False, description="Also write model.ort and its ORT Mobile operator list.")

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError(f"block_size {value} is not a power of two")
        return value


class OnnxFlags(BaseModel):
    """The ONNX exporter's options (`exporters.onnx.export_onnx`); a recipe sets them in `OnnxExports`."""

    mobile: bool | None = Field(
        None,
        description="also write model.ort and its ORT Mobile op list.",
        json_schema_extra={"negatable": False},
    )
    block_size: int | None = Field(None, description="int4: weights per scale (default 32).")
    overwrite: bool = Field(
        False, description="replace an existing output folder.", json_schema_extra={"negatable": False}
    )


def _variants(o: OnnxExports) -> list[tuple[str, dict[str, int | bool]]]:
    out = []
    for precision in dict.fromkeys(o.precisions):
        options: dict[str, int | bool] = {"mobile": o.mobile}
        if precision == "int4":
            options["block_size"] = o.block_size
        out.append((precision, options))
    return out


def export(
    ckpt: Checkpoint, plan: Plan, out: Path, quant: str, before_commit: BeforeCommit, **options
) -> Path:
    """`quant` is the weight precision (fp32 = keep, fp16, int8, int4); options: mobile, block_size,
    overwrite."""
    from exporters.onnx import Precision, export_onnx

    precision = Precision(parse_quant(quant))
    return export_onnx(ckpt.path, plan, out, precision, before_commit=before_commit, **options)


def actions(arch: type[Architecture]) -> tuple[set[LayerAction], str]:
    """Every action of a family checked against onnxruntime; none of the others."""
    from exporters.onnx.families import onnx_family

    refusal = onnx_family(arch).refusal
    return (set(), refusal) if refusal else (set(LayerAction), "")


def check(_ckpt: Checkpoint, plan: Plan) -> None:
    """A healed plan's repair weights match its hashes (one line naming the layer), before anything is
    written; the exporter then builds each repaired layer as one MatMul (and Add for a bias)."""
    from gatenorm.heal.store import check_weights

    check_weights(plan)


USAGE = """```python
from exporters.onnx import OnnxRunner  # part of gatenorm

runner = OnnxRunner("onnx", threads=2)
ids = runner.tokenizer.encode("Hello")
print(runner.tokenizer.decode(runner.generate(ids, max_new_tokens=32)))
```

The `onnx` folder opens as it is in onnxruntime-genai (`og.Model("onnx")`), optimum
(`ORTModelForCausalLM.from_pretrained("onnx", subfolder="onnx")`) and transformers.js (`config.json`,
tokenizer files, the model under `onnx/onnx/` with transformers.js's file names). The graph takes
`input_ids`, `attention_mask`, `position_ids` and the KV cache `past_key_values.{slot}.*` of the layers that
keep attention (`onnx/gatenorm_onnx.json` maps slots to layers; `config.json`'s `num_hidden_layers` counts
them). Kept attention uses onnxruntime's fused `com.microsoft` operators, so it needs onnxruntime (any
client built on it), not another ONNX runtime."""


ONNX = register_target(
    ExportTarget(
        name="onnx",
        export=export,
        parse_quant=parse_quant,
        actions=actions,
        options=OnnxExports,
        flags=OnnxFlags,
        variants=_variants,
        artifact=lambda _name: "onnx",
        # in onnxruntime against the source in PyTorch (its exact weights, dequantized from a GGUF)
        runtimes=lambda _source_is_gguf: ("torch", "onnx"),
        usage=lambda _artifact: USAGE,
        quant_help="fp32 (= keep), fp16, int8, int4",
        card_front_matter=("library_name: onnxruntime",),
        check=check,
        rebuild_options={"overwrite": True},
    )
)
