"""Load a model with transformers and apply a plan to it in PyTorch."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from gatenorm.architectures import Architecture, get_architecture
from gatenorm.errors import GatenormError
from gatenorm.harp import fuse_value_output
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


class LinearAttentionLayer(nn.Module):
    """A decoder layer whose attention is HARP-linearized: ``h + fused(norm(h))``, then the MLP step.

    `fused` is the single ``d x d`` matmul ``alpha * o_proj(repeat_kv(v_proj(.)))`` (`gatenorm.harp`); the
    layer keeps no KV cache.
    """

    def __init__(
        self,
        attention_norm: nn.Module,
        fused: nn.Linear,
        mlp_norm: nn.Module,
        mlp: nn.Module,
        attention_type: str | None = None,
    ):
        super().__init__()
        self.input_layernorm = attention_norm
        self.fused_attention = fused
        self.post_attention_layernorm = mlp_norm
        self.mlp = mlp
        if attention_type is not None:
            self.attention_type = attention_type

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        hidden_states = hidden_states + self.fused_attention(self.input_layernorm(hidden_states))
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class IdentityLayer(nn.Module):
    """A decoder block removed whole (ShortGPT): the residual stream passes through unchanged."""

    def __init__(self, attention_type: str | None = None):
        super().__init__()
        if attention_type is not None:
            self.attention_type = attention_type

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


PRUNED_LAYERS = (AttentionFreeLayer, LinearAttentionLayer, IdentityLayer)


def linearized_layer(layer: nn.Module, alpha: float, arch: type[Architecture]) -> LinearAttentionLayer:
    """`layer` (a transformers decoder layer) with its attention folded into HARP's fused matmul."""
    attn = getattr(layer, arch.hf_attention_module)
    v, o = getattr(attn, arch.hf_value_proj), getattr(attn, arch.hf_output_proj)
    config = attn.config
    weight, bias = fuse_value_output(
        v.weight.detach(),
        o.weight.detach(),
        config.num_attention_heads,
        config.num_key_value_heads,
        alpha,
        None if v.bias is None else v.bias.detach(),
        None if o.bias is None else o.bias.detach(),
    )
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(weight)
        if bias is not None:
            fused.bias.copy_(bias)
    return LinearAttentionLayer(
        getattr(layer, arch.hf_attention_norm),
        fused,
        getattr(layer, arch.hf_mlp_norm),
        getattr(layer, arch.hf_mlp_module),
        getattr(layer, "attention_type", None),
    )


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
    """Rewrite `model` in place as the plan says: a dropped attention leaves ``h + mlp(post_norm(h))``,
    a linearized one HARP's fused matmul (`LinearAttentionLayer`), a dropped block the identity.

    Kept layers get consecutive KV-cache slots (0, 1, ...), so changed layers own no cache entry.
    """
    arch = get_architecture(model.config.model_type)
    if arch.name != get_architecture(plan.source.architecture).name:
        raise GatenormError(f"plan is for {plan.source.architecture}, model is {model.config.model_type}")
    layers = model.model.layers
    if len(layers) != plan.source.n_layers:
        raise GatenormError(f"plan is for {plan.source.n_layers} layers, model has {len(layers)}")
    if not any(lp.action is LayerAction.KEEP for lp in plan.layers):
        raise GatenormError("plan removes every attention sublayer; at least one must stay")
    kept_types = []
    cache_slot = 0
    for lp in plan.layers:
        layer = layers[lp.layer]
        if isinstance(layer, PRUNED_LAYERS):
            raise GatenormError(f"layer {lp.layer} is already pruned; apply a plan to an unpruned model")
        attention_type = getattr(layer, "attention_type", None)
        if lp.action is LayerAction.KEEP:
            getattr(layer, arch.hf_attention_module).layer_idx = cache_slot
            kept_types.append(attention_type)
            cache_slot += 1
        elif lp.action is LayerAction.DROP_ATTENTION:
            layers[lp.layer] = AttentionFreeLayer(
                getattr(layer, arch.hf_mlp_norm), getattr(layer, arch.hf_mlp_module), attention_type
            )
        elif lp.action is LayerAction.LINEARIZE:
            layers[lp.layer] = linearized_layer(layer, lp.alpha, arch)
        else:  # LayerAction.DROP_BLOCK
            layers[lp.layer] = IdentityLayer(attention_type)
    if getattr(model.config, "layer_types", None) is not None:
        # The cache builds slot i with the type of config.layer_types[i]: list the kept layers first.
        actions = [lp.action for lp in plan.layers]
        dropped_types = [
            t for t, a in zip(model.config.layer_types, actions, strict=True) if a is not LayerAction.KEEP
        ]
        model.config.layer_types = kept_types + dropped_types
    model.config.gatenorm_plan = plan.model_dump(mode="json")
    return model
