"""Load a model with transformers and apply a plan to it in PyTorch."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import torch
from torch import nn

from gatenorm.architectures import Architecture, get_architecture
from gatenorm.architectures.base import transformers_major
from gatenorm.architectures.layers import (  # noqa: F401  (re-exported: the pruned layers' home)
    PRUNED_LAYERS,
    AttentionFreeLayer,
    IdentityLayer,
    LinearAttentionLayer,
    LinearBlockLayer,
)
from gatenorm.errors import GatenormError
from gatenorm.gguf_tokenizer import cached_tokenizer
from gatenorm.heal.store import load_refits, load_repairs
from gatenorm.plan import LayerAction, LayerPlan, Plan
from gatenorm.quiet import quiet_transformers
from gatenorm.readers import open_checkpoint
from gatenorm.readers.hf_gguf import shared_gguf_parse
from gatenorm.recover.store import load_overrides


def linearized_layer(layer: nn.Module, alpha: float, arch: type[Architecture]) -> LinearAttentionLayer:
    """`layer` (a transformers decoder layer) with its attention folded into HARP's fused matmul."""
    return arch.linearized(layer, alpha)


def load_model(path: str | Path, dtype: torch.dtype = torch.float32):
    """A transformers causal LM from an HF folder or a GGUF file (dequantized to `dtype`), in eval mode."""
    from transformers import AutoModelForCausalLM

    ckpt = open_checkpoint(path)  # validates the input and the architecture first
    if ckpt.arch.name == "deci":  # transformers' GGUF loader does not take deci
        from gatenorm.deci_model import load_deci_model

        return load_deci_model(ckpt, dtype)
    path = Path(path)
    attention = ckpt.arch.hf_attn_implementation
    options = {"dtype": dtype} | ({"attn_implementation": attention} if attention else {})
    with quiet_transformers(), shared_gguf_parse():
        if ckpt.format == "gguf":
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **options)
        else:
            model = AutoModelForCausalLM.from_pretrained(ckpt.path, **options)
    return model.eval()


class _Vocabulary(list):
    """A GGUF's token list whose membership test is a set lookup."""

    def __init__(self, tokens: list[str]) -> None:
        super().__init__(tokens)
        self._members = frozenset(tokens)

    def __contains__(self, token: object) -> bool:
        return token in self._members


@contextlib.contextmanager
def _fast_gguf_merges() -> Iterator[None]:
    """transformers builds a merge-less (SentencePiece) GGUF vocabulary's BPE merges by testing every split
    of every token for membership in the token *list*: O(vocab^2 x length), ~40 s for a 32k vocabulary, on
    every load. Handing it the same tokens with set membership gives the same merges in about a second."""
    from transformers.integrations import ggml

    skeleton = getattr(ggml, "GGUFTokenizerSkeleton", None)
    if skeleton is None:
        yield
        return
    init = skeleton.__init__

    def fast_init(self, dict_: dict) -> None:
        if "merges" not in dict_ and isinstance(dict_.get("tokens"), list):
            dict_ = {**dict_, "tokens": _Vocabulary(dict_["tokens"])}
        init(self, dict_)

    with mock.patch.object(skeleton, "__init__", fast_init):
        yield


def load_tokenizer(path: str | Path):
    """The tokenizer stored with a model: the HF folder's files, or the GGUF's vocabulary (converted once per
    model: `gatenorm.gguf_tokenizer`)."""
    from transformers import AutoTokenizer

    path = Path(path)
    with quiet_transformers(), _fast_gguf_merges(), shared_gguf_parse():
        if path.is_file() and path.suffix == ".gguf":
            ckpt = open_checkpoint(path)
            # transformers has no 'deci' model type to pick a tokenizer class by: the file's own
            # vocabulary in the generic fast tokenizer (what AutoTokenizer gives its host family too)
            generic = ckpt.arch.name == "deci"

            def convert():
                from transformers import PreTrainedTokenizerFast

                loader = PreTrainedTokenizerFast if generic else AutoTokenizer
                return loader.from_pretrained(path.parent, gguf_file=path.name)

            return cached_tokenizer(path, ckpt.reader.fields, generic, convert)
        return AutoTokenizer.from_pretrained(path if path.is_dir() else path.parent)


def _pruned_further(layer: nn.Module, action: LayerAction, arch: type[Architecture]) -> nn.Module:
    """A layer loaded without attention (deci) given a further action: drop-block, or drop-attention of a
    linear-attention layer (`Deci.check_plan` refuses the rest before an export; here too)."""
    if action is LayerAction.DROP_BLOCK:
        return arch.identity(layer)
    if action is LayerAction.DROP_ATTENTION and isinstance(layer, LinearAttentionLayer):
        return layer.without_attention()
    raise GatenormError(f"a layer already without attention cannot be given {action.value}")


def check_plan_fits(plan: Plan, architecture: str, n_layers: int) -> None:
    """Refuse a plan made for another architecture or layer count, or one that keeps no attention."""
    if get_architecture(architecture).name != get_architecture(plan.source.architecture).name:
        raise GatenormError(f"plan is for {plan.source.architecture}, model is {architecture}")
    if n_layers != plan.source.n_layers:
        raise GatenormError(f"plan is for {plan.source.n_layers} layers, model has {n_layers}")
    if not any(lp.action is LayerAction.KEEP for lp in plan.layers):
        raise GatenormError("plan removes every attention sublayer; at least one must stay")


def planned_layer(arch: type[Architecture], layer: nn.Module, lp: LayerPlan, repairs: dict) -> nn.Module:
    """The module the plan entry `lp` makes of the stock decoder `layer`: the layer itself when kept, its
    fitted repair when healed (`Architecture.repaired`), else the adapter's module for the action."""
    if lp.action is LayerAction.KEEP:
        return layer
    if lp.layer in repairs:
        repair = repairs[lp.layer]
        return arch.repaired(layer, lp.action is LayerAction.DROP_BLOCK, repair.weight, repair.bias)
    if lp.action is LayerAction.DROP_ATTENTION:
        return arch.attention_free(layer)
    if lp.action is LayerAction.LINEARIZE:
        return arch.linearized(layer, lp.alpha)
    return arch.identity(layer)  # LayerAction.DROP_BLOCK


def set_refit(arch: type[Architecture], layer: nn.Module, index: int, weight: torch.Tensor) -> None:
    """Give `layer` (decoder layer `index`) its refitted down projection `weight` (`gatenorm.heal`)."""
    down = arch.down_projection(layer)
    if tuple(down.weight.shape) != tuple(weight.shape):
        raise GatenormError(
            f"layer {index}'s refitted down projection is {tuple(weight.shape)}, the model's "
            f"{tuple(down.weight.shape)}"
        )
    with torch.no_grad():
        down.weight.copy_(weight)


def set_overrides(model: nn.Module, overrides: dict[str, torch.Tensor]) -> None:
    """Give `model`'s tensors named in `overrides` (state-dict name -> value: a recovered plan's merged
    weights, `gatenorm.recover`) those values."""
    params = dict(model.named_parameters())
    for name, value in overrides.items():
        if name not in params or tuple(params[name].shape) != tuple(value.shape):
            have = tuple(params[name].shape) if name in params else "no such tensor"
            raise GatenormError(f"recovered tensor {name} {tuple(value.shape)}: the model has {have}")
        with torch.no_grad():
            params[name].copy_(value)


def cache_slots(
    kept: list[int], n_layers: int, types: list[str] | None
) -> tuple[dict[int, int], list[str] | None]:
    """Kept layer -> its KV-cache slot (0..K-1, so changed layers own no cache entry), and the
    ``config.layer_types`` that go with them (None: the config has none).

    transformers builds cache slot j with the type ``layer_types[j]`` (a sliding-window slot keeps only the
    window) and sizes every mask from the first slot of each type, so slot j must have its layer's type
    and slots 0..K-1 are the used ones. Kept layers take the slots in order (what the ONNX export's
    ``kv_layers`` records), kept types listed first. transformers 5 also picks layer i's mask by
    ``layer_types[i]``: where that order would change a kept layer's own entry, each kept layer i < K keeps
    slot i and the others fill the slots of dropped layers below K, their type copied there."""
    if types is None:
        return {layer: slot for slot, layer in enumerate(kept)}, None
    dropped = [i for i in range(n_layers) if i not in set(kept)]
    in_order = [types[i] for i in kept] + [types[i] for i in dropped]
    if transformers_major() < 5 or all(in_order[i] == types[i] for i in kept):
        return {layer: slot for slot, layer in enumerate(kept)}, in_order
    k = len(kept)
    slots = {layer: layer for layer in kept if layer < k}
    new = list(types)
    for slot, layer in zip([i for i in dropped if i < k], [i for i in kept if i >= k], strict=True):
        slots[layer], new[slot] = slot, types[layer]
    for i in dropped:  # unused slots: a type a used slot has, so that no mask is sized from an empty one
        if i >= k and new[i] not in new[:k]:
            new[i] = new[0]
    return slots, new


def apply_plan(model: nn.Module, plan: Plan) -> nn.Module:
    """Rewrite `model` in place as the plan says, with the architecture's replacement modules: a dropped
    attention leaves the MLP step (``h + mlp(post_norm(h))`` for llama), a linearized one HARP's fused matmul
    (`LinearAttentionLayer`), a dropped block the identity; a healed layer applies its fitted repair
    instead (`Architecture.repaired`, weights from the plan's file, checked against its hashes), a
    refitted layer its new down projection (`Architecture.down_projection`), and a recovered plan's merged
    tensors replace theirs (`gatenorm.recover`).

    Kept layers get KV-cache slots 0..K-1 (`cache_slots`), so changed layers own no cache entry.
    """
    arch = get_architecture(model.config.model_type)
    declared = getattr(model.config, "gatenorm_architecture", arch.name)  # a deci file in its host family
    fixed = getattr(model.config, "gatenorm_fixed", {})
    layers = arch.decoder_layers(model)
    check_plan_fits(plan, declared, len(layers))
    if plan.healing is not None and fixed:
        raise GatenormError("a healed plan cannot be applied to a model loaded from a deci file")
    repairs = load_repairs(plan)  # checked against the plan's hashes
    refits = load_refits(plan)
    overrides = load_overrides(plan)
    kept = [lp.layer for lp in plan.layers if lp.action is LayerAction.KEEP]
    slots, layer_types = cache_slots(kept, len(layers), getattr(model.config, "layer_types", None))
    for lp in plan.layers:
        layer = layers[lp.layer]
        if isinstance(layer, PRUNED_LAYERS) and str(lp.layer) in fixed:  # loaded from a deci file
            if lp.action.value != fixed[str(lp.layer)]:
                layers[lp.layer] = _pruned_further(layer, lp.action, arch)
            continue
        if isinstance(layer, PRUNED_LAYERS):
            raise GatenormError(f"layer {lp.layer} is already pruned; apply a plan to an unpruned model")
        if lp.action is LayerAction.KEEP:
            getattr(layer, arch.hf_attention_module).layer_idx = slots[lp.layer]
        else:
            layers[lp.layer] = planned_layer(arch, layer, lp, repairs)
    for i, weight in refits.items():
        set_refit(arch, layers[i], i, weight)
    set_overrides(model, overrides)
    if layer_types is not None:
        model.config.layer_types = layer_types
    model.config.gatenorm_plan = plan.model_dump(mode="json")
    return model
