"""A test-only GGUF writer for tiny HF models, independent of gatenorm's own code.

It writes q/k rows the way llama.cpp's convert_hf_to_gguf.py does for llama (each head's rotary halves
interleaved), so that reading the file back exercises gatenorm's un-permutation against an outside
definition.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import load_file


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute: (heads, 2, dh/2, d) -> (heads, dh/2, 2, d)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def write_llama_gguf(
    hf_folder: Path,
    out: Path,
    config: dict,
    qtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32,
    arch: str = "llama",
) -> None:
    """Write the llama-family HF model in `hf_folder` as a GGUF with 2-D weights stored as `qtype`."""
    state = load_file(str(next(hf_folder.glob("*.safetensors"))))
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    # transformers 5 writes it inside rope_parameters
    writer.add_rope_freq_base(config.get("rope_theta") or config["rope_parameters"]["rope_theta"])
    for name, tensor in state.items():
        w = tensor.to(torch.float32).numpy()
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            module, _, kind = rest.rpartition(".")
            gname = f"blk.{i}.{GGUF_NAMES[module]}.{kind}"
            if module == "self_attn.q_proj":
                w = llama_cpp_permute(w, n_head)
            elif module == "self_attn.k_proj":
                w = llama_cpp_permute(w, n_kv)
        else:
            gname = {
                "model.embed_tokens.weight": "token_embd.weight",
                "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight",
            }[name]
        if w.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            data = gguf.quants.quantize(w, qtype)
            writer.add_tensor(gname, data, raw_dtype=qtype)
        else:
            writer.add_tensor(gname, np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
