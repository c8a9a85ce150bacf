"""Load a model with transformers and apply a plan to it in PyTorch."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from gatenorm.architectures import get_architecture
from gatenorm.errors import GatenormError
from gatenorm.plan import LayerAction, Plan
from gatenorm.readers import open_checkpoint


class AttentionFreeLayer(nn.Module):
    """A decoder layer whose attention sublayer was removed: ``h + mlp(post_norm(h))``.

    It holds only the MLP and its norm, so the input norm and q/k/v/o weights are gone, and it never
    touches the KV cache.
    """

    def __init__(self, mlp_norm: nn.Module, mlp: nn.Module, attention_type: str | None = None):
        super().__init__()
        self.post_attention_layernorm = mlp_norm
        self.mlp = mlp
        if attention_type is not None:
            self.attention_type = attention_type  # read by some models to pick the attention mask

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


def load_model(path: str | Path, dtype: torch.dtype = torch.float32):
    """A transformers causal LM from an HF folder or a GGUF file (dequantized to `dtype`), in eval mode."""
    from transformers import AutoModelForCausalLM

    ckpt = open_checkpoint(path)  # validates the input and the architecture first
    path = Path(path)
    if ckpt.format == "gguf":
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(ckpt.path, dtype=dtype)
    return model.eval()


def load_tokenizer(path: str | Path):
    """The tokenizer stored with a model: the HF folder's files, or the GGUF's vocabulary."""
    from transformers import AutoTokenizer

    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return AutoTokenizer.from_pretrained(path if path.is_dir() else path.parent)


def apply_plan(model: nn.Module, plan: Plan) -> nn.Module:
    """Rewrite `model` in place so each layer the plan drops computes only ``h + mlp(post_norm(h))``.

    Kept layers get consecutive KV-cache slots (0, 1, ...), so dropped layers own no cache entry.
    """
    arch = get_architecture(model.config.model_type)
    if arch.name != get_architecture(plan.source.architecture).name:
        raise GatenormError(f"plan is for {plan.source.architecture}, model is {model.config.model_type}")
    layers = model.model.layers
    if len(layers) != plan.source.n_layers:
        raise GatenormError(f"plan is for {plan.source.n_layers} layers, model has {len(layers)}")
    if not any(lp.action is LayerAction.KEEP for lp in plan.layers):
        raise GatenormError("plan drops every attention sublayer; at least one must stay")
    kept_types = []
    cache_slot = 0
    for lp in plan.layers:
        layer = layers[lp.layer]
        if isinstance(layer, AttentionFreeLayer):
            raise GatenormError(f"layer {lp.layer} is already pruned; apply a plan to an unpruned model")
        if lp.action is LayerAction.KEEP:
            getattr(layer, arch.hf_attention_module).layer_idx = cache_slot
            kept_types.append(getattr(layer, "attention_type", None))
            cache_slot += 1
        else:
            layers[lp.layer] = AttentionFreeLayer(
                getattr(layer, arch.hf_mlp_norm),
                getattr(layer, arch.hf_mlp_module),
                getattr(layer, "attention_type", None),
            )
    if getattr(model.config, "layer_types", None) is not None:
        # The cache builds slot i with the type of config.layer_types[i]: list the kept layers first.
        actions = [lp.action for lp in plan.layers]
        dropped_types = [
            t for t, a in zip(model.config.layer_types, actions, strict=True) if a is not LayerAction.KEEP
        ]
        model.config.layer_types = kept_types + dropped_types
    model.config.gatenorm_plan = plan.model_dump(mode="json")
    return model
