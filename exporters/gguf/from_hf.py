"""HF folder in -> GGUF out: safetensors weights and tokenizer files as a complete, unpruned GGUF.

The file is what llama.cpp's converter writes for the architecture (``llama``: q/k rows interleaved for
NORM rope; ``qwen2``: HF row order), in F32, F16 or BF16, one tensor in memory at a time. The GGUF pruner
(`exporters.gguf.from_gguf`) then turns it into the pruned ``deci`` file.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors import safe_open

from exporters.gguf.families import gguf_family
from gatenorm.architectures import model_arch
from gatenorm.errors import GatenormError
from gatenorm.readers.hf_folder import HFCheckpoint

_GGML_TYPES = {
    "F32": (gguf.GGMLQuantizationType.F32, torch.float32, np.float32),
    "F16": (gguf.GGMLQuantizationType.F16, torch.float16, np.float16),
    "BF16": (gguf.GGMLQuantizationType.BF16, torch.bfloat16, np.int16),  # numpy has no bfloat16: raw bits
}
_FILE_TYPES = {
    "F32": gguf.LlamaFileType.ALL_F32,
    "F16": gguf.LlamaFileType.MOSTLY_F16,
    "BF16": gguf.LlamaFileType.MOSTLY_BF16,
}
_SKIPPED = ("rotary_emb.inv_freq",)


def load_vocab(folder: Path) -> gguf.Vocab:
    """The tokenizer of `folder` by gguf-py's vocab helpers: GPT-2 BPE, Llama HF BPE or SentencePiece."""
    for vocab_class in (gguf.BpeVocab, gguf.LlamaHfVocab, gguf.SentencePieceVocab):
        try:
            return vocab_class(folder)
        except (FileNotFoundError, TypeError):
            continue
    raise GatenormError(
        f"no tokenizer gguf-py can convert in {folder} (need tokenizer.json or tokenizer.model)"
    )


def bpe_pre_tokenizer(folder: Path) -> str | None:
    """llama.cpp's ``tokenizer.ggml.pre`` for a GPT-2 style tokenizer.json, when it can be told for sure.

    Only the plain GPT-2 byte-level split is recognised; for anything else None is returned, and llama.cpp
    warns that it falls back to its default pre-tokenizer.
    """
    try:
        pre = json.loads((folder / "tokenizer.json").read_text()).get("pre_tokenizer") or {}
    except (OSError, json.JSONDecodeError):
        return None
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    return None


def _add_vocab(writer: gguf.GGUFWriter, folder: Path, n_vocab: int) -> None:
    vocab = load_vocab(folder)
    if isinstance(vocab, gguf.BpeVocab) and (pre := bpe_pre_tokenizer(folder)) is not None:
        writer.add_tokenizer_pre(pre)
    tokens, scores, types = [], [], []
    for text, score, token_type in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(token_type)
    if len(tokens) > n_vocab:
        raise GatenormError(f"tokenizer has {len(tokens)} tokens but the embedding only {n_vocab} rows")
    for i in range(len(tokens), n_vocab):  # embedding rows past the tokenizer, as llama.cpp's converter pads
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model(vocab.tokenizer_model)
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=isinstance(vocab, gguf.BpeVocab), n_vocab=n_vocab).add_to_gguf(
        writer, quiet=True
    )


def _add_hparams(
    writer: gguf.GGUFWriter, ckpt: HFCheckpoint, file_type: gguf.LlamaFileType, name: str | None = None
) -> int:
    config, shape, spec = ckpt.config, ckpt.shape, gguf_family(ckpt.arch)
    writer.add_name(name or ckpt.path.name)
    writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(shape.d_model)
    writer.add_block_count(shape.n_layers)
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_rope_dimension_count(int(shape.head_dim * float(config.get("partial_rotary_factor", 1.0))))
    if shape.head_dim != shape.d_model // shape.n_head:
        writer.add_key_length(shape.head_dim)
        writer.add_value_length(shape.head_dim)
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    scaling = config.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    elif kind in ("longrope", "su") and kind in spec.rope_types:  # + the factor tensors
        writer.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
        original = (
            config.get("original_max_position_embeddings") or scaling["original_max_position_embeddings"]
        )
        writer.add_rope_scaling_orig_ctx_len(int(original))
        writer.add_rope_scaling_attn_factors(spec.rope_attention_factor(config))
    elif kind not in (None, "default", *spec.rope_types):  # llama3: the rope_freqs tensor
        raise GatenormError(f"rope scaling {kind!r} is not supported by the GGUF exporter yet")
    for key, value in spec.hparams(config).items():  # granite's multipliers
        writer.add_float32(f"{ckpt.arch.gguf_arch}.{key}", value)
    for key, (value, vtype, sub_type) in spec.hf_metadata(ckpt).items():  # the family's own keys
        writer.add_key_value(f"{ckpt.arch.gguf_arch}.{key}", value, vtype, sub_type)
    n_vocab = int(config["vocab_size"])
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(file_type)
    return n_vocab


def hf_to_gguf(ckpt: HFCheckpoint, out: Path, dtype: str = "keep", name: str | None = None) -> None:
    """Write the HF checkpoint as an unpruned GGUF of its own architecture at `out`, named `name` (default:
    the folder's name).

    `dtype` is F32, F16, BF16, or ``keep`` (the safetensors type of the weights); 1-D tensors (norms,
    biases) are always F32.
    """
    arch, shape, spec = ckpt.arch, ckpt.shape, gguf_family(ckpt.arch)
    names = gguf.get_tensor_name_map(model_arch(arch.gguf_arch), shape.n_layers)
    rotary = {
        arch.hf_tensors[part].format(i=i).removesuffix(".weight") + suffix: part
        for i in range(shape.n_layers)
        for part in ("q", "k")
        for suffix in (".weight", ".bias")
    }
    factors = spec.hf_factors(ckpt)
    tensors = []  # (hf name, gguf name, shard, GGUF type, shape)
    for name, shard in ckpt.weight_map.items():
        if name.endswith(_SKIPPED):
            continue
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise GatenormError(f"no GGUF name for tensor {name} of {arch.name}")
        with safe_open(shard, framework="pt") as f:
            view = f.get_slice(name)
            dims, stored = view.get_shape(), view.get_dtype()
        if len(dims) == 1:
            kind = "F32"
        elif dtype == "keep":
            kind = stored  # safetensors names F32 / F16 / BF16 as GGUF does
            if kind not in _GGML_TYPES:
                raise GatenormError(f"tensor {name} has type {stored}; pass --quant F16 or F32")
        else:
            kind = dtype
        tensors.append((name, gguf_name, shard, kind, dims))
    extra = spec.extra_tensors(ckpt.config, shape.head_dim)  # generated (llama3's rope_freqs)
    weight_kinds = {kind for *_, kind, dims in tensors if len(dims) > 1}
    file_type = _FILE_TYPES[weight_kinds.pop()] if len(weight_kinds) == 1 else gguf.LlamaFileType.GUESSED

    writer = gguf.GGUFWriter(out, arch.gguf_arch)
    try:
        n_vocab = _add_hparams(writer, ckpt, file_type, name)
        _add_vocab(writer, ckpt.path, n_vocab)
        for _, gguf_name, _, kind, dims in tensors:
            ggml_type, _, np_type = _GGML_TYPES[kind]
            n_bytes = int(np.prod(dims)) * np.dtype(np_type).itemsize
            writer.add_tensor_info(gguf_name, dims, np.dtype(np_type), n_bytes, ggml_type)
        for gguf_name, values in extra.items():
            writer.add_tensor_info(gguf_name, list(values.shape), values.dtype, values.nbytes)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for name, _, shard, kind, _ in tensors:
            _, torch_type, np_type = _GGML_TYPES[kind]
            with safe_open(shard, framework="pt") as f:
                value = f.get_tensor(name)
            part = rotary.get(name)
            if part is not None:
                value = arch.hf_to_gguf_rows(part, value, shape.n_head, shape.n_head_kv)
            value = spec.hf_tensor(name, value)
            if name in factors:
                value = value.float() * factors[name]
            data = value.to(torch_type).contiguous()
            if torch_type is torch.bfloat16:
                data = data.view(torch.int16)
            writer.write_tensor_data(data.numpy())
        for values in extra.values():
            writer.write_tensor_data(values)
    finally:
        writer.close()
