"""The GGUF target: stock llama.cpp (the ``deci`` architecture for layer actions, the source's own for block
removal where deci cannot run the family), quant types of llama.cpp's quantizer."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from exporters.targets.base import BeforeCommit, ExportTarget, register_target
from gatenorm.architectures import Architecture
from gatenorm.errors import GatenormError
from gatenorm.plan import LayerAction, Plan
from gatenorm.readers import Checkpoint


def parse_quant(name: str) -> str:
    from exporters.gguf.quantize import parse_quant as parse

    return parse(name)


def _recipe_quant(name: str) -> str:
    try:
        return parse_quant(name)
    except GatenormError as e:
        raise ValueError(str(e).replace("--quant ", "quant ")) from None


class GgufExports(BaseModel):
    """GGUF files for llama.cpp, one per llama.cpp quant type (keep = the source's types)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    quants: list[Annotated[str, AfterValidator(_recipe_quant)]] = Field(min_length=1)
    ladder: list[Annotated[str, AfterValidator(_recipe_quant)]] = Field(
        default_factory=list,
        description="More quant types for the unpruned model only: the quantization ladder that pruned "
        "variants are compared with.",
    )


def export(
    ckpt: Checkpoint, plan: Plan, out: Path, quant: str, before_commit: BeforeCommit, **options
) -> Path:
    from exporters.gguf import write_gguf

    return write_gguf(ckpt, plan, out, quant, before_commit)


class GgufFlags(BaseModel):
    """The GGUF exporter's options: ``overwrite`` only, and it is moot (a GGUF file is replaced in one rename
    anyway)."""

    overwrite: bool = Field(
        False,
        description="moot, an existing file is replaced anyway.",
        json_schema_extra={"negatable": False},
    )


def check(ckpt: Checkpoint, plan: Plan) -> None:
    from exporters.gguf.from_gguf import check_deci_plan

    check_deci_plan(ckpt, plan)


def actions(arch: type[Architecture]) -> tuple[set[LayerAction], str]:
    """deci runs every action; a family it cannot run loses whole blocks where llama.cpp hosts that, and
    what another llama.cpp architecture hosts for it (its GGUF spec's `host_actions`: qwen3's
    drop-attention)."""
    from exporters.gguf.families import gguf_family

    spec = gguf_family(arch)
    if spec.deci_exportable:
        return set(LayerAction), ""
    hosted = {LayerAction(a) for a in spec.host_actions}
    if spec.block_removal:
        return {LayerAction.KEEP, LayerAction.DROP_BLOCK} | hosted, spec.deci_refusal
    return {LayerAction.KEEP} | hosted, spec.deci_refusal


USAGE = """```bash
llama-cli -m {file} -fa on -p "Hello"        # llama.cpp; flash attention shrinks the V cache too
```

```python
from llama_cpp import Llama

llm = Llama("{file}", flash_attn=True)
print(llm("Hello", max_tokens=32)["choices"][0]["text"])
```

The file uses llama.cpp's `deci` architecture (per-layer head counts): stock llama.cpp and everything built
on it (llama-cpp-python, LM Studio, Ollama's llama.cpp engine) run it with no patch. Transformers cannot
load `deci` GGUFs."""


GGUF = register_target(
    ExportTarget(
        name="gguf",
        export=export,
        parse_quant=parse_quant,
        actions=actions,
        options=GgufExports,
        variants=lambda o: [(q, {}) for q in dict.fromkeys(o.quants)],
        ladder=lambda o: [q for q in dict.fromkeys(o.ladder) if q not in o.quants],
        artifact=lambda name: f"{name}.gguf",
        # against the source in llama.cpp (a GGUF source; an HF folder runs in PyTorch)
        runtimes=lambda source_is_gguf: ("llama.cpp" if source_is_gguf else "torch", "llama.cpp"),
        usage=lambda artifact: USAGE.format(file=artifact),
        quant_help="keep (source types), F32, F16, BF16, Q8_0, Q4_K_M, ...",
        check=check,
        flags=GgufFlags,
    )
)
