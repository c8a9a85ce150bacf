"""``write_mlx``: a plan and a model in, a folder that ``mlx_lm.load`` / ``mlx_lm.generate`` run as it is.

The model is loaded in PyTorch (float32) and pruned by the plan (`gatenorm.apply.apply_plan`, healed repairs
and refits included), its layers written in the family's mlx-lm layout (`exporters.mlx.nemotron_nas`, or the
family's own architecture with whole blocks removed, `exporters.mlx.own_arch`). The
tensors are then loaded into mlx-lm's own model class (strictly: a name or shape it does not expect is an
error here, not in the user's hands), cast, and quantized by mlx-lm's `quantize_model` (``mlx.nn.quantize``)
exactly as ``mlx_lm.convert -q`` does, and saved by mlx-lm's `save_model` / `save_config`. Tokenizer files,
``plan.json`` and a model card go beside them; the folder is built under a temporary name and renamed.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from pathlib import Path

import torch

from exporters.mlx import nemotron_nas, own_arch
from exporters.mlx.families import mlx_family
from gatenorm.apply import apply_plan, load_model, load_tokenizer
from gatenorm.errors import GatenormError
from gatenorm.io import atomic_dir
from gatenorm.plan import Plan
from gatenorm.readers import Checkpoint
from gatenorm.readers.hf_folder import with_rope_keys

#: --quant -> (mlx dtype of the unquantized tensors, bits or None)
QUANTS = {"fp32": ("float32", None), "fp16": ("float16", None), "bf16": ("bfloat16", None)}
QUANTS |= {"8bit": ("bfloat16", 8), "4bit": ("bfloat16", 4)}
GROUP_SIZES = (32, 64, 128)
_TORCH_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
EXTRA = "pip install 'gatenorm[mlx]'"


def parse_quant(quant: str, source_dtype: str | None = None) -> str:
    """`quant` as one of `QUANTS`; ``keep`` is the source's float type (bf16 for a GGUF source)."""
    if quant == "keep":
        return _TORCH_DTYPES.get(str(source_dtype), "bf16")
    name = quant.lower()
    if name not in QUANTS:
        raise GatenormError(f"--quant {quant!r}: mlx takes keep, fp32, fp16, bf16, 8bit or 4bit")
    return name


def require_mlx() -> None:
    """Refuse, in one line naming the extra, when mlx or mlx-lm is not installed."""
    try:
        import mlx.core  # noqa: F401
        import mlx_lm  # noqa: F401
    except ImportError as e:
        raise GatenormError(f"the mlx target needs mlx and mlx-lm ({e.name} is missing): {EXTRA}") from None


def _refusal(ckpt: Checkpoint, plan: Plan, why: str) -> GatenormError:
    actions = ", ".join(sorted(a.value for a in plan.actions))
    return GatenormError(f"the mlx exporter cannot write {ckpt.arch.name} ({actions}): {why}")


def check_plan(ckpt: Checkpoint, plan: Plan) -> None:
    """What the family's spec refuses for an HF config, and a missing extra, before anything is read or
    written (a GGUF source's config is checked once it is loaded)."""
    config = getattr(ckpt, "config", None)
    if config is not None:
        _check_config(ckpt, plan, config)
    require_mlx()


def _check_config(ckpt: Checkpoint, plan: Plan, config: dict) -> None:
    spec = mlx_family(ckpt.arch)
    if not spec.refusal and (why := spec.config_refusal(config) or spec.plan_refusal(config, plan)):
        raise _refusal(ckpt, plan, why)


def write_mlx(
    ckpt: Checkpoint,
    plan: Plan,
    out: Path,
    quant: str = "keep",
    before_commit: Callable[[], None] = lambda: None,
    group_size: int = 64,
    overwrite: bool = False,
) -> Path:
    """Write `ckpt` pruned by `plan` as an mlx-lm folder at `out` (see the module docstring)."""
    check_plan(ckpt, plan)
    hf_config = getattr(ckpt, "config", None) or {}
    quant = parse_quant(quant, hf_config.get("torch_dtype") or hf_config.get("dtype"))
    if group_size not in GROUP_SIZES:
        raise GatenormError(f"--group-size {group_size}: mlx quantizes groups of 32, 64 or 128 weights")
    if Path(out).exists() and not overwrite:
        raise GatenormError(f"{out} already exists (pass --overwrite to replace it)")
    spec = mlx_family(ckpt.arch)
    model = apply_plan(load_model(ckpt.path, torch.float32), plan)
    config = with_rope_keys(model.config.to_dict())  # transformers 5: rope_parameters
    _check_config(ckpt, plan, config)
    layout = own_arch.layout if spec.layout == "own" else nemotron_nas.layout
    mlx_config, tensors = layout(model, ckpt.arch, spec, config)
    del model
    tokenizer = _tokenizer(ckpt.path)
    with atomic_dir(Path(out), overwrite=overwrite) as tmp:
        _save_weights(tmp, mlx_config, tensors, quant, group_size)
        if tokenizer is not None:
            from exporters.onnx.tokenizer_files import save_tokenizer

            save_tokenizer(tokenizer, tmp)
        (tmp / "plan.json").write_text(plan.to_json() + "\n")
        card = model_card(ckpt, plan, quant, Path(out).name, mlx_config["model_type"])
        (tmp / "README.md").write_text(card)
        before_commit()
    return Path(out)


def _tokenizer(path: Path):
    from exporters.onnx.export import has_tokenizer
    from exporters.onnx.tokenizer_files import client_tokenizer

    return client_tokenizer(path, load_tokenizer(path)) if has_tokenizer(path) else None


def _save_weights(folder: Path, config: dict, tensors: dict, quant: str, group_size: int) -> None:
    """Load `tensors` into mlx-lm's model for `config` (strict), cast, quantize, save (mlx-lm's savers)."""
    import mlx.core as mx
    from mlx.utils import tree_map
    from mlx_lm.utils import _get_classes, quantize_model, save_config, save_model

    dtype_name, bits = QUANTS[quant]
    dtype = getattr(mx, dtype_name)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    weights = {name: mx.array(value) for name, value in tensors.items()}
    tensors.clear()
    if hasattr(model, "sanitize"):  # as mlx_lm.load does (drops a tied LM head, rotary tables)
        weights = model.sanitize(weights)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:  # our layout and mlx-lm's model disagree: a bug here, said in one line
        raise GatenormError(f"mlx-lm does not take the written {config['model_type']} tensors: {e}") from None
    del weights
    model.update(
        tree_map(lambda v: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v, model.parameters())
    )
    config = {**config, "torch_dtype": dtype_name}
    if bits is not None:
        with contextlib.redirect_stdout(io.StringIO()):  # mlx-lm prints the bits per weight
            model, config = quantize_model(model, config, group_size, bits)
    mx.eval(model.parameters())
    save_model(folder, model, donate_model=True)
    save_config(config, config_path=folder / "config.json")


def model_card(ckpt: Checkpoint, plan: Plan, quant: str, name: str, model_type: str) -> str:
    """README.md of the folder: front matter, what was changed, how to run it."""
    from exporters.mlx import usage

    return "\n".join(
        [
            "---",
            "library_name: mlx",
            "tags: [mlx, gatenorm]",
            "---",
            f"# {ckpt.path.name}, pruned ({quant})",
            "",
            f"{plan.describe()} ({plan.method}); written by gatenorm as mlx-lm's `{model_type}` model.",
            "",
            "## Use",
            "",
            usage(name),
            "",
        ]
    )
