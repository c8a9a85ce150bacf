"""One entry point for every export target (`exporters.targets`): ``export(model, plan, out, target)``."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from exporters.source_check import verify_plan_content, verify_plan_shape
from exporters.targets import target_spec
from gatenorm.io import refuse_overwriting_inputs
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


def export(
    model: str | Path | Checkpoint,
    plan: Plan,
    out: str | Path,
    target: str = "gguf",
    quant: str = "keep",
    check_source: bool = True,
    **options,
) -> Path:
    """Export `model` pruned by `plan` to `target` at `out` (written atomically; nothing there on failure).

    With `check_source`, the plan must belong to this model: architecture and layer count are checked
    first, the content hash (a read of every q/k tensor) while the exporter writes, before the output is
    moved to `out`. Pass False only for a plan just made from the same opened checkpoint. `options` go
    to the target's exporter (onnx: ``mobile``, ``block_size``, ``overwrite``). The target (a name in
    `exporters.targets.TARGETS`) refuses, before anything is written, a plan it cannot write for the
    model's architecture.
    """
    spec = target_spec(target)
    spec.check_options(options)
    ckpt = model if isinstance(model, Checkpoint) else open_model(model)
    refuse_overwriting_inputs(Path(out), {"the model": ckpt.path})
    if check_source:
        verify_plan_shape(plan, ckpt)
    spec.check(ckpt, plan)  # the format's own refusals, naming family, action, reason and what works
    spec.require(ckpt.arch, plan)
    if not check_source:
        return spec.export(ckpt, plan, Path(out), quant, lambda: None, **options)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="gatenorm-verify") as pool:
        content_check = pool.submit(verify_plan_content, plan, ckpt)
        return spec.export(ckpt, plan, Path(out), quant, content_check.result, **options)


def export_gguf(model: str | Path | Checkpoint, plan: Plan, out: str | Path, quant: str = "keep") -> Path:
    """Export `model` pruned by `plan` as a GGUF that stock llama.cpp runs (see `exporters.gguf`)."""
    return export(model, plan, out, "gguf", quant)
