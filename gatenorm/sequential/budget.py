"""The steps of `gatenorm plan` and `gatenorm validate --runtime torch` as memory/time estimates
(`gatenorm.sequential.memory`), what runs a layer at a time and what still loads the whole model."""

from __future__ import annotations

from collections.abc import Callable

from gatenorm.methods.calibration import SYNTHETIC, Calibration
from gatenorm.methods.spec import SPECS
from gatenorm.readers import Checkpoint
from gatenorm.sequential.memory import (
    Estimate,
    MemorySettings,
    ModelSize,
    check_memory,
    heal_pass,
    layer_pass,
    llama_sampling,
    whole_model,
)

#: What to do instead of a step that does not fit, by the start of its description.
HINTS = {
    "sampling synthetic": "--calib wiki-heldout or a text file (calibration a layer at a time)",
    "healing": "the plan without --heal",
    "HARP": "a smaller --drop (HARP holds the layers it linearizes)",
    "zero-shot": "--tasks none (the agreement runs a layer at a time) or --runtime llama.cpp on a GGUF",
}


def _hint(step: Estimate) -> str:
    return next((hint for start, hint in HINTS.items() if step.what.startswith(start)), "")


def plan_steps(
    ckpt: Checkpoint, method: str, calib: Calibration | None, needed: int | None, heal_tokens: int | None
) -> list[Estimate]:
    """The memory-heavy steps of planning `method` (its calibration `calib`, default the method's) with a
    budget of `needed` layers, healed on `heal_tokens` calibration tokens (None: not healed)."""
    size, steps = ModelSize.of(ckpt), []
    spec = SPECS[method]
    calib = calib or spec.default_calib
    if (spec.data or spec.default_calib is not None) and calib is not None:
        tokens = calib.samples * calib.length
        if calib.source == SYNTHETIC:
            steps.append(synthetic_sampling(ckpt, size, tokens))
        if method == "harp":
            held = min(needed or ckpt.shape.n_layers - 1, ckpt.shape.n_layers - 1)
            steps.append(
                layer_pass(size, f"HARP's alpha search ({held} layers held)", tokens, held, held + 1)
            )
        else:
            steps.append(layer_pass(size, "calibration statistics, a layer at a time", tokens))
    if heal_tokens is not None:
        steps.append(heal_pass(size, "healing, a layer at a time", heal_tokens))
    return steps


def synthetic_sampling(ckpt: Checkpoint, size: ModelSize, tokens: int) -> Estimate:
    """Sampling `tokens` of synthetic text: in llama.cpp, or where it cannot host the checkpoint with
    transformers, the whole float32 model loaded (`gatenorm.methods.synthetic`)."""
    from gatenorm.methods.synthetic import llama_cpp_refusal

    if llama_cpp_refusal(ckpt.path):
        what = "sampling synthetic calibration text with transformers (whole float32 model)"
        return whole_model(size, what, tokens, per_token_passes=True)
    gguf = ckpt.format == "gguf"
    return llama_sampling(size, "sampling synthetic calibration text in llama.cpp", tokens, gguf)


def validate_steps(ckpt: Checkpoint, tokens: int, whole: bool, plans: int) -> list[Estimate]:
    """Torch validation of `ckpt`: the agreement on `tokens` a layer at a time (both models in one pass),
    and with `whole` (zero-shot, retrieval or latency) `plans` whole float32 models."""
    size = ModelSize.of(ckpt)
    steps = [layer_pass(size, "agreement, a layer at a time", tokens, hidden_copies=3)] if tokens else []
    if whole:
        one = whole_model(size, "zero-shot / retrieval / latency (whole float32 models)", 0)
        steps.append(Estimate(one.what, one.peak + (plans - 1) * (one.peak - 0.7 * (1 << 30)), one.seconds))
    return steps


def check(
    ckpt: Checkpoint, steps: list[Estimate], settings: MemorySettings, log: Callable[[str], None]
) -> None:
    """`check_memory` with the hints above."""
    check_memory(ckpt, steps, settings, _hint, log)
