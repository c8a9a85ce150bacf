"""The GGUF spec of a family: what the GGUF exporter needs to know beyond the model's structure (which the
adapter, `gatenorm.architectures`, holds), one class per family, registered by family name like the
adapters. The base is a llama-like family that llama.cpp's ``deci`` graph runs; a family without a spec of
its own gets its nearest registered ancestor's (Mistral: llama's), else the base.

A spec says which llama.cpp architecture runs each plan action (``deci``, the source's own with whole blocks
left out, or a host such as ``qwen35``) and why not where none does; what gatenorm's HF -> GGUF writer adds
(keys, generated tensors, weight factors) as llama.cpp's converter writes them; and how the family's tensors
change in a ``deci`` file (`DeciTensors`: fused tensors split, q/k rows reordered, scales folded in).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import gguf
import numpy as np
import torch

from exporters.family_specs import FamilySpecs
from gatenorm.architectures import Architecture, gguf_tensor, reorder_rotary_rows
from gatenorm.errors import GatenormError

MT = gguf.MODEL_TENSOR
V = gguf.GGUFValueType


@dataclass(frozen=True)
class DeciTensors:
    """How the source's tensors change in a ``deci`` file, by source tensor name: `scales` multiply its
    values (scales deci lacks), `splits` write its row blocks as separate tensors ((new name, rows, 'q'/'k'
    for a rotary tensor in NEOX order)), `rotary` ('q'/'k') put its rows in deci's NORM rope order."""

    scales: dict[str, float]
    splits: dict[str, list[tuple[str, slice, str | None]]]
    rotary: dict[str, str]


class GgufFamily:
    """Base: a llama-like family that llama.cpp's ``deci`` graph runs (per-layer head counts)."""

    #: Per-layer GGUF tensors that make up the attention sublayer: a layer whose attention is dropped loses
    #: all of them (weights and biases), its input norm included.
    attention_sublayer: ClassVar[tuple[gguf.MODEL_TENSOR, ...]] = (
        MT.ATTN_NORM,
        MT.ATTN_Q,
        MT.ATTN_K,
        MT.ATTN_V,
        MT.ATTN_OUT,
    )
    #: llama.cpp's ``deci`` graph can run this family's layers; else `deci_refusal` says why not.
    deci_exportable: ClassVar[bool] = True
    deci_refusal: ClassVar[str] = ""
    #: Where deci cannot run it: a GGUF of the source architecture with whole blocks left out runs in stock
    #: llama.cpp (checked against llama.cpp's logits by the tests).
    block_removal: ClassVar[bool] = False
    #: Plan actions (values) another llama.cpp architecture runs for this family (`host_layout`).
    host_actions: ClassVar[frozenset[str]] = frozenset()
    #: What a refused GGUF export can do instead (the end of the refusal line).
    works: ClassVar[str] = "apply the plan in PyTorch (gatenorm validate --candidate-plan)"
    #: `exporters.gguf.from_hf` writes this family's HF checkpoints as the GGUF llama.cpp's converter writes.
    from_hf: ClassVar[bool] = True
    #: HF rope scaling types (besides none and linear) that `extra_tensors` writes for llama.cpp.
    rope_types: ClassVar[tuple[str, ...]] = ()

    def __init__(self, arch: type[Architecture]):
        self.arch = arch

    def hf_refusal(self, ckpt) -> str | None:
        """Why llama.cpp's graph cannot run this HF checkpoint as `exporters.gguf.from_hf` writes it (None:
        it can)."""
        return None if self.from_hf else f"gatenorm's HF->GGUF writer does not write {self.arch.name}"

    def value(self, fields, key: str, default=None):
        """The value of the source GGUF's key ``{arch}.<key>`` (`default` where it has none)."""
        field = fields.get(f"{self.arch.gguf_arch}.{key}")
        return default if field is None else field.contents()

    def attention_dims(self, fields) -> tuple[int, int, int]:
        """(embedding length, head count, head size) of a GGUF of this architecture."""
        d, n_head = (
            int(self.value(fields, "embedding_length")),
            int(self.value(fields, "attention.head_count")),
        )
        return d, n_head, int(self.value(fields, "attention.key_length", d // n_head))

    # ---- which llama.cpp architecture runs a plan, refusals ---------------------------------------------

    def deci_unsupported(self, ckpt) -> str:
        """Why `ckpt` (of a family deci hosts) cannot be written as deci ("" when it can)."""
        return ""

    def refusal(self, ckpt) -> str:
        """Why `ckpt` cannot be written as deci ("" when it can)."""
        return self.deci_refusal if not self.deci_exportable else self.deci_unsupported(ckpt)

    def check_plan(self, fixed, plan) -> None:
        """Refuse a plan that changes a layer the source has already changed (the adapter's
        `gguf_fixed_layers`) in a way it cannot be changed."""

    def recorded_plan(self, fields, plan):
        """The plan a re-export records: `plan` composed with the one the source file was made with."""
        return plan

    def check_block_removal(self, kept: list[int]) -> None:
        """Refuse a block removal keeping source layers `kept` that the source architecture cannot run."""

    def own_arch_rewrite(self, fields: dict, kept: list[int]) -> tuple[dict, dict[str, float]]:
        """A GGUF of this architecture written with only source layers `kept`: keys (after ``{arch}.``) to
        set, as (value, GGUF type, item type or None), or to remove (None), and the source tensors whose
        F32 values are multiplied by a factor; refuses what llama.cpp cannot run."""
        return {}, {}

    def host_layout(self, header, plan):
        """The `host_layout.HostLayout` of `plan` on the GGUF `header` (a scan of this architecture's file)
        as the architecture that hosts it, or None where the plan is written as deci or the source's own."""
        return None

    # ---- HF -> GGUF writer --------------------------------------------------------------------------------

    def hparams(self, config: dict) -> dict[str, float]:
        """Family-specific float keys (``{arch}.`` suffix -> value) the HF -> GGUF writer adds."""
        return {}

    def hf_metadata(self, ckpt) -> dict[str, tuple]:
        """Family keys (after ``{arch}.``) the HF -> GGUF writer adds, as (value, GGUF type, item type or
        None), as llama.cpp's converter writes them; refuses a config llama.cpp cannot run."""
        return {}

    def hf_factors(self, ckpt) -> dict[str, float]:
        """HF tensors the HF -> GGUF writer multiplies by a factor (after `hf_tensor`)."""
        return {}

    def extra_tensors(self, config: dict, head_dim: int) -> dict[str, np.ndarray]:
        """Tensors llama.cpp's converter generates for an HF config (Llama-3.x's ``rope_freqs``): name ->
        float32 values."""
        return {}

    def rope_attention_factor(self, config: dict) -> float:
        """The factor a LongRoPE family scales cos / sin by (``rope.scaling.attn_factor``)."""
        raise GatenormError(f"{self.arch.name} has no LongRoPE attention factor")

    def hf_tensor(self, hf_name: str, value: torch.Tensor) -> torch.Tensor:
        """An HF tensor as llama.cpp's converter stores it (q/k row order is the adapter's
        `hf_to_gguf_rows`): a ``1 + w`` norm gain stored as ``1 + w``."""
        if self.arch.norm_plus_one and hf_name.endswith("norm.weight"):
            return value.float() + 1
        return value

    # ---- the deci file ------------------------------------------------------------------------------------

    def deci_split(self, name: str, shape, ffn: int) -> list[tuple[str, slice, str | None]] | None:
        """A fused GGUF tensor deci stores as several: (new name, its rows, 'q'/'k' for a rotary tensor in
        NEOX order); None for a tensor written as it is."""
        return None

    def deci_scales(self, fields, shape) -> dict[str, float]:
        """GGUF tensor name -> factor its values are multiplied by in a deci file (scales deci lacks)."""
        return {}

    def deci_metadata_dropped(self) -> tuple[str, ...]:
        """``{arch}.`` key suffixes a deci file leaves out (folded into the weights)."""
        return ()

    def deci_metadata_defaults(self, header) -> dict[str, str]:
        """``deci.*`` keys (suffix -> string value) a deci file of this family needs when its source lacks
        them."""
        return {}

    def deci_tensors(self, header, shape, ffn_of) -> DeciTensors:
        """What the deci file changes in the source `header`'s tensors (`ffn_of(layer)`: a layer's
        feed-forward length): the scales, the fused tensors split, and, where the source keeps NEOX order,
        every q/k weight and bias reordered."""
        splits = {}
        for t in header.tensors:
            parts = t.name.split(".")
            layer = int(parts[1]) if parts[0] == "blk" and len(parts) > 1 and parts[1].isdigit() else None
            if layer is not None and (pieces := self.deci_split(t.name, shape, ffn_of(layer))):
                splits[t.name] = pieces
        rotary = {}
        if not self.arch.gguf_qk_permuted:
            for i in range(shape.n_layers):
                for part in ("q", "k"):
                    weight = self.arch.gguf_tensors[part].format(i=i)
                    rotary[weight] = rotary[weight.removesuffix(".weight") + ".bias"] = part
        return DeciTensors(self.deci_scales(header.fields, shape), splits, rotary)

    def to_deci_rows(self, part: str, rows: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
        """Rows of this architecture's GGUF q/k weight or bias in the order ``deci`` (NORM rope) expects.

        `rows` may be raw bytes, one row of a quantized tensor per first-axis entry: only rows move.
        """
        if self.arch.gguf_qk_permuted or part not in ("q", "k"):
            return rows  # already NORM order, or not a rotary tensor
        return reorder_rotary_rows(rows, n_head if part == "q" else n_head_kv, to_norm=True)

    def attention_tensors(self, layer: int) -> list[str]:
        """The GGUF names of layer `layer`'s attention sublayer weights (`attention_sublayer`)."""
        return [gguf_tensor(t).format(i=layer) for t in self.attention_sublayer]


SPECS = FamilySpecs("GGUF", GgufFamily)
register_gguf_family = SPECS.register
gguf_family = SPECS.spec
unregister_gguf_family = SPECS.unregister
