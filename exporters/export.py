"""One entry point for every export target: ``export(model, plan, target, out, quant)``."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from enum import Enum
from pathlib import Path

from exporters.source_check import verify_plan_content, verify_plan_shape
from gatenorm.errors import GatenormError
from gatenorm.io import refuse_overwriting_inputs
from gatenorm.plan import LayerAction, Plan
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
    ONNX = "onnx"


#: Called by an exporter once its output is complete, before moving it to OUT: raises if the plan turned
#: out not to belong to the model (its content hash is checked while the exporter works).
BeforeCommit = Callable[[], None]


def _gguf(
    ckpt: Checkpoint, plan: Plan, out: Path, quant: str, before_commit: BeforeCommit, **options
) -> Path:
    from exporters.gguf import write_gguf

    options.pop("overwrite", None)  # a GGUF file is replaced in one rename anyway
    if options:
        raise GatenormError(f"--{next(iter(options)).replace('_', '-')} applies to --to onnx only")
    return write_gguf(ckpt, plan, out, quant, before_commit)


def _onnx(
    ckpt: Checkpoint, plan: Plan, out: Path, quant: str, before_commit: BeforeCommit, **options
) -> Path:
    """`quant` is the weight precision (fp32 = keep, fp16, int8, int4); options: mobile, block_size,
    overwrite."""
    from exporters.onnx import Precision, export_onnx

    try:
        precision = Precision("fp32" if quant == "keep" else quant.lower())
    except ValueError:
        raise GatenormError(f"--quant {quant!r}: onnx takes fp32, fp16, int8 or int4") from None
    return export_onnx(ckpt.path, plan, out, precision, before_commit=before_commit, **options)


#: target -> exporter(checkpoint, plan, out, quant, before_commit, **options); a new target adds one entry.
EXPORTERS: dict[Target, Callable[..., Path]] = {
    Target.GGUF: _gguf,
    Target.ONNX: _onnx,
}


#: The plan actions each target can write.
SUPPORTED_ACTIONS: dict[Target, set[LayerAction]] = {
    Target.GGUF: set(LayerAction),
    Target.ONNX: set(LayerAction),
}


def export(
    model: str | Path | Checkpoint,
    plan: Plan,
    out: str | Path,
    target: Target | str = Target.GGUF,
    quant: str = "keep",
    check_source: bool = True,
    **options,
) -> Path:
    """Export `model` pruned by `plan` to `target` at `out` (written atomically; nothing there on failure).

    With `check_source`, the plan must belong to this model: architecture and layer count are checked
    first, the content hash (a read of every q/k tensor) while the exporter writes, before the output is
    moved to `out`. Pass False only for a plan just made from the same opened checkpoint. `options` go
    to the target's exporter (onnx: ``mobile``, ``block_size``, ``overwrite``).
    """
    target = Target(target)
    plan.require(SUPPORTED_ACTIONS[target], f"the {target.value} exporter")
    ckpt = model if isinstance(model, Checkpoint) else open_model(model)
    refuse_overwriting_inputs(Path(out), {"the model": ckpt.path})
    exporter = EXPORTERS[target]
    if not check_source:
        return exporter(ckpt, plan, Path(out), quant, lambda: None, **options)
    verify_plan_shape(plan, ckpt)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="gatenorm-verify") as pool:
        content_check = pool.submit(verify_plan_content, plan, ckpt)
        return exporter(ckpt, plan, Path(out), quant, content_check.result, **options)


def export_gguf(model: str | Path | Checkpoint, plan: Plan, out: str | Path, quant: str = "keep") -> Path:
    """Export `model` pruned by `plan` as a GGUF that stock llama.cpp runs (see `exporters.gguf`)."""
    return export(model, plan, out, Target.GGUF, quant)
