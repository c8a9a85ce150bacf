"""GGUF export: pruned models as llama.cpp ``deci`` files that stock llama.cpp runs."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

from exporters.gguf.families import gguf_family
from exporters.gguf.from_gguf import check_deci_plan, prune_gguf, recovered_outputs, repaired_outputs
from exporters.gguf.from_hf import hf_to_gguf
from exporters.gguf.header import ScannedGGUFCheckpoint
from exporters.gguf.metadata import read_gguf_metadata, read_plan_metadata
from exporters.gguf.quantize import FLOAT_TYPES, KEEP, parse_quant, quantize_gguf
from gatenorm.errors import GatenormError
from gatenorm.io import atomic_path, scratch_file
from gatenorm.plan import Plan
from gatenorm.readers import Checkpoint
from gatenorm.readers.gguf_file import GGUFCheckpoint

__all__ = ["read_gguf_metadata", "read_plan_metadata", "write_gguf"]


def write_gguf(
    ckpt: Checkpoint,
    plan: Plan,
    out: Path,
    quant: str = KEEP,
    before_commit: Callable[[], None] = lambda: None,
) -> Path:
    """Write `ckpt` pruned by `plan` as a ``deci`` GGUF at `out`, atomically.

    A GGUF source is rewritten tensor by tensor with its bytes unchanged; an HF folder is converted first
    (F32/F16/BF16, or its own dtype for ``keep``). Any other `quant` goes through llama.cpp's quantizer
    after pruning (a healed plan's repairs and a recovered plan's merged tensors kept at Q8_0 or better).
    `before_commit` runs once the file is complete and may refuse it by raising; the plan's
    fit to `ckpt` is the caller's business (`exporters.export.export` checks it).
    """
    quant = parse_quant(quant)
    check_deci_plan(ckpt, plan)  # before any long conversion
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if isinstance(ckpt, GGUFCheckpoint):
            source = ckpt
        else:
            if not (spec := gguf_family(ckpt.arch)).from_hf:
                raise GatenormError(
                    f"cannot export {ckpt.arch.name} from an HF folder to GGUF: gatenorm's HF -> GGUF writer "
                    f"does not write its hyperparameters yet; what works: convert it with llama.cpp's "
                    f"convert_hf_to_gguf.py and export that GGUF, or {spec.works}"
                )
            converted = stack.enter_context(scratch_file(out, "f"))
            hf_to_gguf(ckpt, converted, quant if quant in FLOAT_TYPES else KEEP)
            source = ScannedGGUFCheckpoint(converted)
        requantize = quant != KEEP and not (quant in FLOAT_TYPES and source is not ckpt)
        final = stack.enter_context(atomic_path(out))
        if requantize:
            pruned = stack.enter_context(scratch_file(out, "pruned"))
            prune_gguf(source, plan, pruned, fused_exact=True)
            at_least_q8 = repaired_outputs(plan) + recovered_outputs(source, plan)
            quantize_gguf(pruned, final, quant, at_least_q8=at_least_q8)
        else:
            prune_gguf(source, plan, final)
        before_commit()
    return out
