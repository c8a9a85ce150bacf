"""The client files of an ONNX export: what onnxruntime-genai, optimum and transformers.js read.

The folder holds the model under ``onnx/`` with transformers.js's file names (``model.onnx``,
``model_fp16.onnx``, ``model_quantized.onnx``, ``model_q4.onnx``), ``config.json`` and
``generation_config.json`` (transformers.js, optimum), ``genai_config.json`` (onnxruntime-genai) and the
tokenizer files at the top. Clients size the cache from ``num_hidden_layers`` and name it
``past_key_values.{i}.*`` for i below it, so config.json and genai_config.json give K, the number of layers
that keep a cache, and the graph names the cache by slot 0..K-1 (``gatenorm_onnx.json`` and the model's
metadata map slots back to layers).
"""

from __future__ import annotations

import json
from pathlib import Path

from exporters.onnx.builder import past_name, present_name
from exporters.onnx.families import onnx_family
from exporters.onnx.precision import Precision
from gatenorm.architectures import get_architecture
from gatenorm.plan import Plan

ONNX_DIR = "onnx"
#: transformers.js's file name for each precision (its ``dtype`` option: fp32, fp16, quantized, q4).
MODEL_FILES = {
    Precision.FP32: "model.onnx",
    Precision.FP16: "model_fp16.onnx",
    Precision.INT8: "model_quantized.onnx",
    Precision.INT4: "model_q4.onnx",
}
GENAI_CONFIG_NAME = "genai_config.json"
#: config.json keys that hold one entry per layer: cut to the kept layers.
_PER_LAYER_KEYS = ("layer_types",)


def model_relpath(precision: Precision) -> str:
    """The model file of an export in `precision`, relative to the folder."""
    return f"{ONNX_DIR}/{MODEL_FILES[Precision(precision)]}"


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _token_ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def hf_config(config, plan: Plan) -> dict:
    """config.json of the export: the source's, with `num_hidden_layers` = layers that keep a cache.

    The graph, not this file, defines the model; the file tells clients the architecture, head sizes,
    vocabulary and how many cache slots to feed. The source's layer count stays in ``gatenorm``.
    """
    data = config.to_dict()
    kept = plan.kv_layers
    data["num_hidden_layers"] = len(kept)
    for key in _PER_LAYER_KEYS:
        if isinstance(data.get(key), list) and len(data[key]) == plan.source.n_layers:
            data[key] = [data[key][i] for i in kept]
    data["use_cache"] = True
    data["head_dim"] = _head_dim(config)
    for key in ("dtype", "torch_dtype"):
        data.pop(key, None)
    data["gatenorm"] = {
        "source_num_hidden_layers": plan.source.n_layers,
        "kv_layers": kept,
        "note": "num_hidden_layers counts the layers that keep a KV cache; see gatenorm_onnx.json",
    }
    return data


def generation_config(config, eos: list[int], bos: int | None) -> dict:
    return {
        "bos_token_id": bos,
        "eos_token_id": eos[0] if len(eos) == 1 else eos,
        "pad_token_id": getattr(config, "pad_token_id", None),
        "do_sample": False,
        "use_cache": True,
    }


def genai_config(config, plan: Plan, model_file: str, eos: list[int], bos: int | None) -> dict:
    """onnxruntime-genai's genai_config.json for the graph at `model_file` (CPU, greedy by default)."""
    context = int(getattr(config, "max_position_embeddings", 4096))
    pad = getattr(config, "pad_token_id", None)
    return {
        "model": {
            "bos_token_id": bos if bos is not None else (eos[0] if eos else 0),
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": model_file,
                "head_size": _head_dim(config),
                "hidden_size": config.hidden_size,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": past_name(0, "key").replace(".0.", ".%d."),
                    "past_value_names": past_name(0, "value").replace(".0.", ".%d."),
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": present_name(0, "key").replace(".0.", ".%d."),
                    "present_value_names": present_name(0, "value").replace(".0.", ".%d."),
                },
                "num_attention_heads": config.num_attention_heads,
                "num_hidden_layers": len(plan.kv_layers),
                "num_key_value_heads": config.num_key_value_heads,
            },
            "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "pad_token_id": pad if pad is not None else (eos[0] if eos else 0),
            "type": onnx_family(get_architecture(config.model_type)).genai_model_type or config.model_type,
            "vocab_size": config.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": context,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            # one cache buffer of max_length per slot that GroupQueryAttention writes into in place (as the
            # builder's configs do): same tokens, no per-step copy of the cache
            "past_present_share_buffer": True,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def special_ids(config, tokenizer) -> tuple[list[int], int | None]:
    """EOS ids and BOS id: the shipped tokenizer's (the source model's), else the model config's."""
    eos = _token_ids(getattr(tokenizer, "eos_token_id", None)) if tokenizer is not None else []
    eos = eos or _token_ids(getattr(config, "eos_token_id", None))
    bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    return eos, bos if bos is not None else getattr(config, "bos_token_id", None)


def write_client_configs(folder: Path, config, plan: Plan, genai_model_file: str, tokenizer) -> None:
    """config.json, generation_config.json and genai_config.json for `plan`'s export in `folder`."""
    eos, bos = special_ids(config, tokenizer)
    data = hf_config(config, plan)
    data["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    data["bos_token_id"] = bos
    _write_json(folder / "config.json", data)
    _write_json(folder / "generation_config.json", generation_config(config, eos, bos))
    _write_json(folder / GENAI_CONFIG_NAME, genai_config(config, plan, genai_model_file, eos, bos))
