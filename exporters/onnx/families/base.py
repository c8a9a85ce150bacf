"""The ONNX spec of a family: what the ONNX exporter's graph needs beyond the model's structure (which the
adapter, `gatenorm.architectures`, holds), one class per family, registered by family name like the
adapters. The base is a llama-like family (separate q/k/v packed into one projection, per-head q/k norms
where the adapter names them, no soft-capping); a family without a spec of its own gets its nearest
registered ancestor's, else the base."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from exporters.family_specs import FamilySpecs
from gatenorm.architectures import Architecture


class OnnxFamily:
    """Base: a llama-like family the ONNX exporter takes (checked against PyTorch by the tests)."""

    #: Why the ONNX exporter does not take this family yet (empty: it does, checked against PyTorch).
    refusal: ClassVar[str] = ""
    #: genai_config.json's model type (None: the HF model_type) where onnxruntime-genai names the family
    #: otherwise or not at all (it runs any decoder-only graph; the type picks its decoder class).
    genai_model_type: ClassVar[str | None] = None

    def __init__(self, arch: type[Architecture]):
        self.arch = arch

    def qkv_projection(self, attention: nn.Module) -> nn.Module:
        """One projection whose output per token is [q; k; v] (ONNX: one MatMul for the three)."""
        return packed_linear([attention.q_proj, attention.k_proj, attention.v_proj])

    def has_qk_norms(self) -> bool:
        """Whether q and k are normed before the rotary embedding (`qk_norms` names the norms)."""
        return self.arch.hf_qk_norms is not None

    def attention_softcap(self, attention: nn.Module) -> float:
        """Soft-capping of attention logits (``c * tanh(x / c)``), 0 for none."""
        return 0.0

    def qk_norms(self, attention: nn.Module) -> tuple[nn.Module, nn.Module] | None:
        """The q and k RMSNorms applied before the rotary embedding (per head where a norm's gain has
        head_dim entries, else over the whole projection), None if the family has none."""
        if not self.has_qk_norms():
            return None
        names = self.arch.hf_qk_norms or ("q_norm", "k_norm")
        return getattr(attention, names[0]), getattr(attention, names[1])

    def gate_up(self, mlp: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The gated MLP's gate and up projections as one weight [2 x ffn, d] (gate rows first) and bias."""
        gate, up = mlp.gate_proj, mlp.up_proj
        bias = None if gate.bias is None else torch.cat([gate.bias, up.bias])
        return torch.cat([gate.weight, up.weight]), bias

    def embedding_scale(self, config) -> float:
        """The factor the embedding lookup is multiplied by (Granite's multiplier, Gemma's sqrt(d))."""
        return 1.0

    def logits_divisor(self, config) -> float:
        """What the LM head's logits are divided by (Granite's ``logits_scaling``)."""
        return 1.0

    def logits_softcap(self, config) -> float:
        """Soft-capping of the final logits, 0 for none (Gemma-2)."""
        return 0.0


def packed_linear(parts: list[nn.Linear]) -> nn.Linear:
    """One Linear computing the outputs of `parts` one after the other (weights and biases concatenated,
    the source's dtype; a part without a bias gets zeros)."""
    has_bias = any(p.bias is not None for p in parts)
    weight = torch.cat([p.weight for p in parts])
    packed = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, dtype=weight.dtype)
    with torch.no_grad():
        packed.weight.copy_(weight)
        if has_bias:
            biases = [p.bias if p.bias is not None else torch.zeros(p.out_features) for p in parts]
            packed.bias.copy_(torch.cat([b.to(weight.dtype) for b in biases]))
    return packed


SPECS = FamilySpecs("ONNX", OnnxFamily)
register_onnx_family = SPECS.register
onnx_family = SPECS.spec
