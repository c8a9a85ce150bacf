"""A deci GGUF (gatenorm's own pruned exports, Nemotron-NAS) as a transformers model, for PyTorch.

transformers' GGUF loader does not take ``deci``; here the file's tensors are dequantized by gguf-py (the
reader) into a stock transformers llama (qwen2 for gatenorm's qwen2 exports, whose q/k/v have biases), and
the layers the file has already changed (`gatenorm.architectures.deci.implied_layers`) are replaced by the
pruned modules: attention-free layers by `AttentionFreeLayer`, linear-attention ones by a
`LinearAttentionLayer` holding the stored ``attn_output``. What transformers' llama cannot hold (per-layer
FFN widths, FFN-free layers, head counts that vary) is refused in one line.
"""

from __future__ import annotations

import gguf
import torch
from torch import nn

from gatenorm.architectures import get_architecture
from gatenorm.architectures.deci import (
    DROP_ATTENTION,
    HOST_FAMILIES,
    layer_counts,
    stored_plan,
)
from gatenorm.architectures.layers import LinearAttentionLayer
from gatenorm.errors import GatenormError
from gatenorm.readers.gguf_file import GGUFCheckpoint, field_value

ROPE_FREQS = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"


def host_family(ckpt: GGUFCheckpoint) -> str:
    """The transformers family that holds the file's layers: the source family a gatenorm export names,
    if it has its own class here (qwen2: q/k/v biases), else llama."""
    plan = stored_plan(ckpt.reader.fields)
    family = get_architecture(plan.source.architecture).name if plan is not None else "llama"
    return family if family in HOST_FAMILIES else "llama"


def deci_config(ckpt: GGUFCheckpoint):
    """The transformers config of a deci file's kept layers, or a GatenormError naming what it cannot hold."""
    from transformers import AutoConfig

    fields, s, path = ckpt.reader.fields, ckpt.shape, ckpt.path
    widths = [ffn for _, _, ffn in layer_counts(fields)]
    if 0 in widths:
        layers = [i for i, w in enumerate(widths) if w == 0]
        raise GatenormError(
            f"cannot load deci GGUF {path} in PyTorch: layers {layers} have no FFN (feed_forward_length 0), "
            "which transformers' llama cannot hold; what works: llama.cpp (gatenorm validate --runtime "
            "llama.cpp)"
        )
    if len(set(widths)) > 1:
        raise GatenormError(
            f"cannot load deci GGUF {path} in PyTorch: its layers have different FFN widths "
            f"{sorted(set(widths))}, and transformers' llama has one intermediate_size; what works: "
            "llama.cpp (gatenorm validate --runtime llama.cpp), gatenorm score / plan / export"
        )
    scaling = str(field_value(ckpt.reader, "deci.rope.scaling.type", "none"))
    rope_scaling = None
    if scaling == "linear":
        rope_scaling = {
            "rope_type": "linear",
            "factor": float(field_value(ckpt.reader, "deci.rope.scaling.factor")),
        }
    elif scaling not in ("none",):
        raise GatenormError(
            f"cannot load deci GGUF {path} in PyTorch: rope scaling {scaling!r} is not rebuilt from GGUF "
            "yet; what works: llama.cpp"
        )
    embed = ckpt.tensors[gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight"]
    has_bias = ckpt.has_tensor("blk.0.attn_q.bias") or any(
        ckpt.has_tensor(f"blk.{i}.attn_q.bias") for i in range(s.n_layers)
    )
    family = host_family(ckpt)
    if has_bias and family == "llama":
        family = "qwen2"  # q/k/v biases and no o bias: Qwen2's layout
    return AutoConfig.for_model(
        family,
        hidden_size=s.d_model,
        intermediate_size=widths[0],
        num_hidden_layers=s.n_layers,
        num_attention_heads=s.n_head,
        num_key_value_heads=s.n_head_kv,
        head_dim=s.head_dim,
        vocab_size=int(embed.shape[1]),
        max_position_embeddings=int(field_value(ckpt.reader, "deci.context_length", 4096)),
        rms_norm_eps=float(field_value(ckpt.reader, "deci.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(field_value(ckpt.reader, "deci.rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        tie_word_embeddings=not ckpt.has_tensor("output.weight"),
        use_sliding_window=False,
    )


def load_deci_model(ckpt: GGUFCheckpoint, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The deci file `ckpt` as a transformers causal LM with its implied plan applied, in eval mode."""
    from transformers import AutoModelForCausalLM

    from gatenorm.quiet import quiet_transformers

    config = deci_config(ckpt)
    with quiet_transformers():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    arch = get_architecture(config.model_type)
    fixed, s = ckpt.fixed_layers, ckpt.shape
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, s.n_layers)
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    linear: dict[int, str] = {}
    for hf_name, param in params.items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        layer = _layer(hf_name)
        if name is None or not ckpt.has_tensor(name):
            if layer in fixed or (hf_name == "lm_head.weight" and config.tie_word_embeddings):
                continue
            raise GatenormError(f"deci GGUF {ckpt.path} lacks {name or hf_name}, which {arch.name} needs")
        if layer in fixed and ".self_attn." in hf_name:
            if hf_name.endswith("o_proj.weight"):
                linear[layer] = name
            loaded.add(name)
            continue
        value = ckpt._read(name)[1]
        part = next((p for p in ("q", "k") if f".{p}_proj." in hf_name), None)
        if part is not None:
            value = ckpt.arch.gguf_to_hf_rows(part, value.reshape(param.shape[0], -1), s.n_head, s.n_head_kv)
        with torch.no_grad():
            param.copy_(value.reshape(param.shape))
        loaded.add(name)
    unused = sorted(set(ckpt.tensors) - loaded - {ROPE_FREQS})
    unused = [n for n in unused if not (n.endswith("attn_output.bias") and _layer_of_gguf(n) in fixed)]
    if unused:
        raise GatenormError(
            f"cannot load deci GGUF {ckpt.path} in PyTorch: tensors {unused[:3]} have no place in "
            f"transformers' {arch.name}"
        )
    if ckpt.has_tensor(ROPE_FREQS):  # llama.cpp divides each rotary frequency by its factor
        rotary = model.model.rotary_emb
        factors = ckpt._read(ROPE_FREQS)[1].reshape(-1).to(rotary.inv_freq.dtype)
        rotary.inv_freq = rotary.inv_freq / factors
        rotary.original_inv_freq = rotary.inv_freq
    _apply_implied(model, arch, ckpt, linear)
    model.config.gatenorm_architecture = "deci"
    model.config.gatenorm_fixed = {str(k): v[0] for k, v in fixed.items()}
    return model


def _layer(hf_name: str) -> int | None:
    parts = hf_name.split(".")
    return int(parts[2]) if hf_name.startswith("model.layers.") else None


def _layer_of_gguf(name: str) -> int | None:
    head, _, rest = name.partition(".")
    index = rest.partition(".")[0]
    return int(index) if head == "blk" and index.isdigit() else None


def _apply_implied(model: nn.Module, arch, ckpt: GGUFCheckpoint, linear: dict[int, str]) -> None:
    """Replace the layers the file has already changed; kept layers get consecutive KV-cache slots."""
    layers = arch.decoder_layers(model)
    slot = 0
    d = ckpt.shape.d_model
    for i, layer in enumerate(layers):
        state = ckpt.fixed_layers.get(i)
        if state is None:
            getattr(layer, arch.hf_attention_module).layer_idx = slot
            slot += 1
        elif state[0] == DROP_ATTENTION and i not in linear:
            layers[i] = arch.attention_free(layer)
        else:  # linear attention: the stored d x d attn_output (zero for a dropped first attention)
            bias_name = linear[i].removesuffix(".weight") + ".bias"
            has_bias = ckpt.has_tensor(bias_name)
            fused = nn.Linear(d, d, bias=has_bias, dtype=next(layer.parameters()).dtype)
            with torch.no_grad():
                fused.weight.copy_(ckpt._read(linear[i])[1].reshape(d, d))
                if has_bias:
                    fused.bias.copy_(ckpt._read(bias_name)[1].reshape(d))
            parts = arch.layer_parts(layer)
            layers[i] = LinearAttentionLayer(parts, fused, 1.0, getattr(layer, "attention_type", None))
