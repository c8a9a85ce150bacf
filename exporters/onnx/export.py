"""``export_onnx``: a plan and a model in, a self-contained onnxruntime folder out."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import onnx

from exporters.onnx.builder import build_onnx
from exporters.onnx.families import onnx_family
from exporters.onnx.metadata import (
    CONFIG_NAME,
    OnnxExportConfig,
    fused_initializers,
    kv_layers,
    plan_metadata,
    set_metadata,
)
from exporters.onnx.mobile import ORT_NAME, REQUIRED_OPERATORS_NAME, write_mobile_package
from exporters.onnx.package import model_relpath, special_ids, write_client_configs
from exporters.onnx.precision import Precision, convert_precision, needs_external_data, save_model
from exporters.onnx.tokenizer_files import client_tokenizer, save_tokenizer
from gatenorm.apply import check_plan_fits, load_tokenizer
from gatenorm.architectures import Architecture
from gatenorm.errors import GatenormError
from gatenorm.io import atomic_dir
from gatenorm.plan import Plan
from gatenorm.readers import open_checkpoint
from gatenorm.sequential import SequentialModel

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def has_tokenizer(model_path: str | Path) -> bool:
    """Whether the model comes with a tokenizer: a GGUF always does, an HF folder if it has its files."""
    path = Path(model_path)
    if path.is_file():
        return True
    return any((path / name).is_file() for name in _TOKENIZER_FILES)


def _check_block_size(block_size: int) -> None:
    if block_size < 16 or block_size & (block_size - 1):
        raise GatenormError(f"--block-size {block_size}: use a power of two >= 16 (e.g. 32, 64, 128)")


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _check_head_size(config, kv: list) -> None:
    """onnxruntime's GroupQueryAttention (every kept attention layer) runs only head sizes divisible by 8."""
    if kv and _head_dim(config) % 8:
        raise GatenormError(
            f"head size {_head_dim(config)} is not a multiple of 8, which onnxruntime's GroupQueryAttention "
            "needs for the kept attention layers; export GGUF instead"
        )


def check_exportable(arch: type[Architecture], config=None) -> None:
    """Refuse (one line) a family the ONNX spec refuses, or RoPE scaling no fixed table holds."""
    spec = onnx_family(arch)
    if spec.refusal:
        raise GatenormError(
            f"cannot export {arch.name} to ONNX: {spec.refusal}; what works: apply the plan in PyTorch "
            "(gatenorm validate --candidate-plan)"
        )
    scaling = getattr(config, "rope_scaling", None) or {}
    if scaling.get("rope_type") == "dynamic":
        raise GatenormError(
            "dynamic RoPE scaling depends on the sequence length; ONNX export needs a fixed table"
        )


def _write_model(seq: SequentialModel, plan: Plan, path: Path, precision: Precision, block_size: int) -> None:
    """Build the graph at `path` (weights in ``{name}_data`` while it is built). fp32 and int4 weights are
    written in their precision as each layer is built; fp16 and int8 convert the built fp32 graph with
    onnxruntime's whole-graph converters. Below the 2 GB protobuf limit the weights end up inside the file."""
    direct = precision in (Precision.FP32, Precision.INT4)
    model = build_onnx(seq, plan, path, precision.value if direct else Precision.FP32.value, block_size)
    data = path.with_name(path.name + "_data")
    if not direct or not needs_external_data(model):
        onnx.load_external_data_for_model(model, str(path.parent))
        data.unlink()
        model = convert_precision(model, precision) if not direct else model
    set_metadata(model, plan_metadata(plan, precision.value, fused_initializers(model, plan)))
    if data.exists():
        onnx.save_model(model, str(path))  # weightless: the initializers name their place in `data`
    else:
        save_model(model, path)


def export_onnx(
    model_path: str | Path,
    plan: Plan,
    out_dir: str | Path,
    precision: Precision | str = Precision.FP32,
    mobile: bool = False,
    block_size: int = 32,
    overwrite: bool = False,
    before_commit: Callable[[], None] | None = None,
) -> Path:
    """Export the model at `model_path` (HF folder or GGUF), pruned by `plan`, to the folder `out_dir`.

    The graph is built from the weights one decoder layer at a time (`exporters.onnx.builder`), so the
    export holds about one layer's float32 weights and a vocabulary chunk, never the model.
    The folder holds the model under ``onnx/`` named as transformers.js names each precision
    (``model.onnx``, ``model_fp16.onnx``, ``model_quantized.onnx``, ``model_q4.onnx``; plan and provenance
    in its metadata_props), ``config.json``, ``generation_config.json`` and ``genai_config.json`` for
    transformers.js, optimum and onnxruntime-genai (see ``exporters.onnx.package``), ``gatenorm_onnx.json``
    (cache slots -> layers and KV names, shapes), ``plan.json`` and the tokenizer files (if the model has
    them: test models built from a config may not); with `mobile` also ``model.ort`` (which
    genai_config.json then names) and ``required_operators.config``. It is built beside `out_dir` and
    renamed at the end, so a failed export leaves nothing there. `block_size` is the int4 quantization
    block. `before_commit` runs once the folder is complete and may refuse it by raising (the plan's
    source check).
    """
    precision = Precision(precision)
    if precision is Precision.INT4:
        _check_block_size(block_size)
    ckpt = open_checkpoint(model_path)
    _check_head_size(ckpt.shape, kv_layers(plan))  # before any slow conversion
    check_exportable(ckpt.arch)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        seq = SequentialModel(ckpt, plan)
        check_plan_fits(plan, seq.arch.name, seq.n_layers)
        check_exportable(seq.arch, seq.config)
        tokenizer = load_tokenizer(model_path) if has_tokenizer(model_path) else None
        if tokenizer is not None:
            tokenizer = client_tokenizer(model_path, tokenizer)
        text_config = copy.deepcopy(seq.config)
        text_config.gatenorm_plan = plan.model_dump(mode="json")
        kv = kv_layers(plan)
        _check_head_size(text_config, kv)
        model_name = model_relpath(precision)
        onnx_path = tmp / model_name
        onnx_path.parent.mkdir()
        _write_model(seq, plan, onnx_path, precision, block_size)
        del seq
        if mobile:
            write_mobile_package(onnx_path, tmp)
        config = OnnxExportConfig(
            model=model_name,
            ort_model=ORT_NAME if mobile else None,
            required_operators=REQUIRED_OPERATORS_NAME if mobile else None,
            precision=precision.value,
            int4_block_size=block_size if precision is Precision.INT4 else None,
            architecture=plan.source.architecture,
            n_layers=plan.source.n_layers,
            dropped_layers=plan.dropped,
            linearized_layers=plan.linearized,
            linearize_alphas=plan.linearize_alphas,
            dropped_blocks=plan.blocks_dropped,
            num_key_value_heads=text_config.num_key_value_heads,
            head_dim=_head_dim(text_config),
            vocab_size=text_config.vocab_size,
            eos_token_id=special_ids(text_config, tokenizer)[0],
            kv_cache=kv,
            tokenizer=tokenizer is not None,
        )
        (tmp / CONFIG_NAME).write_text(config.model_dump_json(indent=2) + "\n")
        (tmp / "plan.json").write_text(plan.to_json() + "\n")
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
        write_client_configs(tmp, text_config, plan, ORT_NAME if mobile else model_name, tokenizer)
        if before_commit is not None:
            before_commit()
    return out_dir
