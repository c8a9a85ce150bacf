"""Trace a pruned transformers model to ONNX with optimum's exporter, past-KV inputs only for kept layers."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from exporters.onnx.fused_attention import fused_attention
from gatenorm.architectures import get_architecture
from gatenorm.errors import GatenormError
from gatenorm.quiet import quiet

#: ONNX opset of the exported graph (ORT Mobile and MatMulNBits both support it).
OPSET = 17
TASK = "text-generation-with-past"


def past_name(slot: int, part: str) -> str:
    """Graph input holding the cached `part` ("key" or "value") of cache `slot` (0..K-1 over kept layers).

    Slots, not original layer numbers, so that clients that build the names ``0..num_hidden_layers-1``
    from config.json (transformers.js, optimum, older onnxruntime-genai) find every one.
    """
    return f"past_key_values.{slot}.{part}"


def present_name(slot: int, part: str) -> str:
    """Graph output holding the updated cache of cache `slot`."""
    return f"present.{slot}.{part}"


def _base_config_class(model: nn.Module) -> type:
    from optimum.exporters.tasks import TasksManager

    model_type = model.config.model_type
    try:
        constructor = TasksManager.get_exporter_config_constructor(
            "onnx", model=model, task=TASK, library_name="transformers"
        )
    except (KeyError, ValueError) as e:
        raise GatenormError(f"optimum cannot export {model_type!r} to ONNX: {e}") from None
    return constructor.func


def pruned_onnx_config(model: nn.Module, kept_layers: list[int]):
    """optimum's OnnxConfig for `model`'s architecture whose past/present KV list follows the plan.

    Cache entries are named by cache slot 0..K-1, the order of the kept layers, which is how
    ``apply_plan`` numbers the cache.
    """
    base = _base_config_class(model)

    class PrunedDecoderOnnxConfig(base):
        @property
        def inputs(self) -> dict[str, dict[int, str]]:
            inputs = super().inputs
            # every export takes position_ids (the rotary positions GroupQueryAttention reads), also for
            # families whose optimum config leaves them out (Gemma)
            inputs.setdefault("position_ids", {0: "batch_size", 1: "sequence_length"})
            return inputs

        def add_past_key_values(self, inputs_or_outputs: dict, direction: str) -> None:
            if direction == "inputs":
                name, axis = past_name, "past_sequence_length"
            else:
                name, axis = present_name, "past_sequence_length + sequence_length"
            for slot in range(len(kept_layers)):
                for part in ("key", "value"):
                    inputs_or_outputs[name(slot, part)] = {0: "batch_size", 2: axis}

        def generate_dummy_inputs(self, framework: str = "pt", **kwargs):
            dummy = super().generate_dummy_inputs(framework=framework, **kwargs)
            if "past_key_values" in dummy:
                dummy["past_key_values"] = dummy["past_key_values"][: len(kept_layers)]
            return dummy

    PrunedDecoderOnnxConfig.__name__ = f"Pruned{base.__name__}"
    return PrunedDecoderOnnxConfig(
        model.config, task="text-generation", use_past=True, use_past_in_inputs=True
    )


@contextlib.contextmanager
def _no_autograd_inlining() -> Iterator[None]:
    """torch.onnx.export (as optimum calls it) with ``autograd_inlining`` off: our autograd Functions all
    have a symbolic, and inlining their traced bodies trips torch's peephole pass on some shapes (one KV
    head: "Argument passed to at() was not in the map")."""
    export = torch.onnx.export
    torch.onnx.export = functools.partial(export, autograd_inlining=False)
    try:
        yield
    finally:
        torch.onnx.export = export


def trace_to_onnx(
    model: nn.Module, kept_layers: list[int], output: Path, tie_embeddings: bool = True
) -> None:
    """Write `model` (already pruned with ``apply_plan``) as an fp32 ONNX graph at `output`.

    With `tie_embeddings`, a tied LM head reads the embedding table through a Transpose node (optimum's
    deduplication) instead of storing a transposed copy; leave it off when a quantizer will replace the
    LM head's weight, as quantizers only handle weights stored as initializers.
    """
    from optimum.exporters.onnx.convert import export_pytorch

    config = pruned_onnx_config(model, kept_layers)
    arch = get_architecture(model.config.model_type)
    with quiet("optimum", "torch.onnx", "transformers"):
        with fused_attention(model, arch), _no_autograd_inlining():
            export_pytorch(model, config, opset=OPSET, output=output)
        if tie_embeddings:
            config.post_process_exported_models(output.parent, {"model": (model, config)}, [output.name])
