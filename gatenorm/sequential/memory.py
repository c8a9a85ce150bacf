"""Say it before doing it: the expected peak memory and time of a command on a checkpoint, from its tensor
table alone, and the refusal (one line, before anything is loaded) of one that cannot fit `--max-memory`.

The figures are estimates: a layer-at-a-time pass holds one layer's float32 weights (and the dequantized
copy it is made from), the LM head and the windows' hidden states; a whole-model step (zero-shot tasks
in PyTorch) holds every weight in float32; llama.cpp sampling synthetic text maps the GGUF (an HF folder's
temporary F16 one) and holds its KV cache.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from gatenorm.errors import GatenormError
from gatenorm.readers import Checkpoint

GIB = 1 << 30
#: Python, torch, transformers and a tokenizer, before any weight.
BASE_BYTES = 0.7 * GIB
#: Models below this many parameters get no line (they run in seconds, in little memory).
ANNOUNCE_PARAMS = 1e9
#: Rough CPU throughputs for the time line: checkpoint bytes read and dequantized, float32 multiply-adds.
READ_BYTES_PER_S = 150e6
FLOPS_PER_S = 2e10


class MemorySettings(BaseModel):
    """How much memory a command may use (its flag is generated: ``--max-memory``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    max_memory: float | None = Field(
        None,
        gt=0,
        description="GiB the command may use (default: the memory available now); a command that cannot "
        "fit is refused before anything is loaded.",
    )

    def limit_bytes(self) -> float:
        return available_bytes() if self.max_memory is None else self.max_memory * GIB


def available_bytes() -> float:
    """MemAvailable of /proc/meminfo (free pages elsewhere)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


@dataclass(frozen=True)
class ModelSize:
    """Parameter counts of a checkpoint from its tensor table: all, the largest layer's, a vocabulary
    table's; `file_bytes` as stored."""

    params: int
    layer_params: int
    table_params: int
    d_model: int
    n_layers: int
    file_bytes: int

    @classmethod
    def of(cls, ckpt: Checkpoint) -> ModelSize:
        shapes, stored = _tensor_table(ckpt)
        layer = re.compile(r"^(?:blk|model\.layers)\.(\d+)\.")
        per_layer: dict[int, int] = {}
        total = 0
        for name, shape in shapes.items():
            n = 1
            for x in shape:
                n *= int(x)
            total += n
            if m := layer.match(name):
                per_layer[int(m.group(1))] = per_layer.get(int(m.group(1)), 0) + n
        d = ckpt.shape.d_model
        embed = shapes.get(ckpt.tensor_name("embed", 0), (0, d))
        table = 1
        for x in embed:
            table *= int(x)
        return cls(total, max(per_layer.values(), default=0), table, d, ckpt.shape.n_layers, stored)


def _tensor_table(ckpt: Checkpoint) -> tuple[dict[str, tuple[int, ...]], int]:
    if ckpt.format == "gguf":
        tensors = ckpt.tensors
        return {n: tuple(int(x) for x in t.shape) for n, t in tensors.items()}, sum(
            int(t.n_bytes) for t in tensors.values()
        )
    table = ckpt._tensors
    shapes = {n: tuple(shape) for n, (_, _, shape) in table.items()}
    stored = sum(shard.stat().st_size for shard in {s for s, _, _ in table.values()})
    return shapes, stored


@dataclass(frozen=True)
class Estimate:
    """What a step holds at its peak and how long it takes, with what it is, in words."""

    what: str
    peak: float
    seconds: float

    def describe(self) -> str:
        return f"{self.what}: ~{self.peak / GIB:.1f} GiB peak, ~{_duration(self.seconds)}"


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def whole_model(size: ModelSize, what: str, tokens: int = 0, per_token_passes: bool = False) -> Estimate:
    """Every weight in float32 (transformers' loaders), `tokens` run once (or token by token)."""
    flops = 2.0 * size.params * tokens
    seconds = size.file_bytes / READ_BYTES_PER_S + flops / FLOPS_PER_S * (4 if per_token_passes else 1)
    return Estimate(what, BASE_BYTES + 4.0 * size.params * 1.1, seconds)


def llama_sampling(size: ModelSize, what: str, tokens: int, gguf: bool) -> Estimate:
    """llama.cpp sampling `tokens` one step at a time from the GGUF (`gguf`), else from a temporary F16 GGUF
    of the HF folder: the file mapped, its KV cache (`gatenorm.methods.synthetic.KV_BUDGET` at most), a
    float32 vocabulary row per window."""
    mapped = size.file_bytes if gguf else 2.0 * size.params
    seconds = mapped / READ_BYTES_PER_S + 2.0 * size.params * tokens / FLOPS_PER_S
    return Estimate(what, BASE_BYTES + mapped + 0.5 * GIB, seconds)


def layer_pass(
    size: ModelSize, what: str, tokens: int, held_layers: int = 1, hidden_copies: int = 2
) -> Estimate:
    """A layer-at-a-time pass over `tokens`: `held_layers` layers' float32 weights (and the dequantized
    copy of one), the LM head, `hidden_copies` float32 hidden states of every token."""
    weights = 4.0 * size.layer_params * (held_layers + 1) + 4.0 * size.table_params
    hidden = 4.0 * tokens * size.d_model * hidden_copies
    seconds = size.file_bytes / READ_BYTES_PER_S + 2.0 * size.params * tokens / FLOPS_PER_S
    return Estimate(what, BASE_BYTES + weights + hidden, seconds)


def heal_pass(size: ModelSize, what: str, tokens: int) -> Estimate:
    """The heal fit a layer at a time over `tokens`: a layer-at-a-time pass holding four hidden states (the
    healed and the unpruned stream, a folded layer's inputs and outputs), a refitted down projection, and
    a fold's float64 moments of the MLP's ``d_ff`` inputs (``d_ff x d_ff``, factored in their own storage:
    `gatenorm.heal.solve`) and their right-hand side, with those inputs themselves (float32)."""
    d = size.d_model
    d_ff = max((size.layer_params - 3 * d * d) // (3 * d), d)
    step = layer_pass(size, what, tokens, held_layers=1, hidden_copies=4)
    moments = 8.0 * (d_ff * d_ff + d_ff * d) + 4.0 * tokens * d_ff + 4.0 * d * d_ff
    return Estimate(what, step.peak + moments, step.seconds * 2)


def check_memory(
    ckpt: Checkpoint,
    steps: list[Estimate],
    settings: MemorySettings,
    instead: Callable[[Estimate], str] | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> None:
    """Log the expected peak and time of a command's `steps` on a model above ~1B parameters; refuse, in one
    line naming the step and (`instead`) what would fit, a command whose peak exceeds the limit."""
    if not steps:
        return
    size = ModelSize.of(ckpt)
    peak = max(steps, key=lambda s: s.peak)
    limit = settings.limit_bytes()
    if peak.peak > limit:
        source = "--max-memory" if settings.max_memory is not None else "available memory"
        hint = instead(peak) if instead is not None else ""
        raise GatenormError(
            f"{ckpt.path.name} ({size.params / 1e9:.1f}B parameters) does not fit: {peak.describe()}, "
            f"{source} {limit / GIB:.1f} GiB" + (f"; what fits: {hint}" if hint else "")
        )
    if size.params >= ANNOUNCE_PARAMS:
        total = sum(s.seconds for s in steps)
        log(
            f"{ckpt.path.name} ({size.params / 1e9:.1f}B parameters): expect ~{peak.peak / GIB:.1f} GiB peak "
            f"({peak.what}), ~{_duration(total)}"
        )
