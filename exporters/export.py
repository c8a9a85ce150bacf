"""One entry point for every export target: ``export(model, plan, target, out, quant)``."""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from pathlib import Path

from exporters.source_check import verify_plan_source
from gatenorm.plan import Plan
from gatenorm.readers import Checkpoint, open_checkpoint
from gatenorm.readers.gguf_file import is_gguf


def open_model(model: str | Path) -> Checkpoint:
    """`open_checkpoint`, except that GGUF files get the fast header scanner (no token decoding)."""
    from exporters.gguf.header import ScannedGGUFCheckpoint

    path = Path(model)
    if path.is_file() and is_gguf(path):
        return ScannedGGUFCheckpoint(path)
    return open_checkpoint(path)


class Target(str, Enum):
    """Export formats of ``gatenorm export --to``."""

    GGUF = "gguf"


def _gguf(ckpt: Checkpoint, plan: Plan, out: Path, quant: str) -> Path:
    from exporters.gguf import write_gguf

    return write_gguf(ckpt, plan, out, quant)


#: target -> exporter(checkpoint, plan, out, quant); a new target adds one entry here.
EXPORTERS: dict[Target, Callable[[Checkpoint, Plan, Path, str], Path]] = {
    Target.GGUF: _gguf,
}


def export(
    model: str | Path | Checkpoint,
    plan: Plan,
    out: str | Path,
    target: Target | str = Target.GGUF,
    quant: str = "keep",
    check_source: bool = True,
) -> Path:
    """Export `model` pruned by `plan` to `target` at `out` (written atomically; nothing there on failure).

    With `check_source`, the plan is first checked to belong to this model (architecture, layer count,
    content hash); pass False only for a plan just made from the same opened checkpoint.
    """
    ckpt = model if isinstance(model, Checkpoint) else open_model(model)
    if check_source:
        verify_plan_source(plan, ckpt)
    return EXPORTERS[Target(target)](ckpt, plan, Path(out), quant)


def export_gguf(model: str | Path | Checkpoint, plan: Plan, out: str | Path, quant: str = "keep") -> Path:
    """Export `model` pruned by `plan` as a GGUF that stock llama.cpp runs (see `exporters.gguf`)."""
    return export(model, plan, out, Target.GGUF, quant)
