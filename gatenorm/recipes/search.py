"""Target budgets: turn "as many layers as keep KLD <= x" or "a speedup of at least y" into a layer count."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

from gatenorm.errors import GatenormError
from gatenorm.methods import Ranking, make_method_plan
from gatenorm.readers import Checkpoint
from gatenorm.recipes.schema import Recipe, Target
from gatenorm.recipes.sources import ResolvedSource


def _config(path: Path):
    """The transformers config of an HF folder or a GGUF file."""
    from transformers import AutoConfig

    if path.is_file():
        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    return AutoConfig.from_pretrained(path)


def ideal_prefill_speedups(path: Path, ctx: int, max_n: int) -> list[float]:
    """Ideal prefill speedup of dropping 0..max_n attention sublayers: FLOPs per token at a `ctx`-token
    prompt (projections, attention over the causal half of the prompt, MLPs; the head runs once per
    prompt and is left out), from the model's parameter shapes."""
    import torch
    from transformers import AutoModelForCausalLM

    config = _config(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layer = model.model.layers[0]
    attention = 2 * sum(p.numel() for p in layer.self_attn.parameters())
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    attention += 4 * heads * head_dim * (ctx + 1) / 2
    rest = 2 * sum(p.numel() for n, p in layer.named_parameters() if not n.startswith("self_attn"))
    total = config.num_hidden_layers * (attention + rest)
    return [total / (total - n * attention) for n in range(max_n + 1)]


def _quality_probe(
    source: ResolvedSource, ckpt: Checkpoint, ranking: Ranking, recipe: Recipe, target: Target
) -> Callable[[int], float]:
    """A function n -> the target's metric of the model with n layers dropped, against the unpruned one,
    in PyTorch on the recipe's search text."""
    from transformers.utils import logging as hf_logging

    from gatenorm.apply import apply_plan
    from gatenorm.validate.agreement import compare_logits
    from gatenorm.validate.runtimes import TorchRuntime
    from gatenorm.validate.text import token_windows

    hf_logging.disable_progress_bar()  # GGUF tokenizer conversion bars would flood the batch's console
    search = recipe.search
    ref = TorchRuntime(source.path, threads=search.threads)
    windows = token_windows(search.text, ref.tokenize, search.ctx, search.max_tokens, ref.bos_id)
    first = search.ctx // 2
    ref_logits = list(ref.window_logits(windows, first))
    metric = {"max_kld": "kld_mean", "min_top1": "top1", "max_ppl_ratio": "ppl_ratio"}[target.kind]

    def probe(n: int) -> float:
        cand = copy.copy(ref)
        cand.model = apply_plan(
            copy.deepcopy(ref.model),
            make_method_plan(
                ckpt,
                ranking.scores.method,
                budget=n,
                ranking=ranking,
                allow_first_layer=recipe.allow_first_layer,
            ),
        )
        return getattr(compare_logits(ref_logits, cand.window_logits(windows, first), windows, first), metric)

    return probe


def resolve_target(
    source: ResolvedSource,
    ckpt: Checkpoint,
    ranking: Ranking,
    target: Target,
    recipe: Recipe,
    log: Callable[[str], None] = lambda _: None,
) -> int:
    """The number of layers a target budget asks for.

    Quality targets: the most layers (in the method's order) whose metric still meets the target, by
    bisection, assuming quality falls as layers go. `min_speedup`: the fewest layers whose ideal prefill
    speedup at the validation context reaches the target (the report shows the measured one)."""
    name = ranking.scores.method.value
    top = ckpt.shape.n_layers - 1  # make_plan's limit: one attention sublayer stays
    if target.kind == "min_speedup":
        speedups = ideal_prefill_speedups(source.path, recipe.validation.ctx, top)
        n = next((i for i, s in enumerate(speedups) if s >= target.value), None)
        if n is None:
            raise GatenormError(
                f"budget {target.label} is out of reach: dropping {top} attention sublayers of "
                f"{source.name} gives an ideal prefill speedup of {speedups[-1]:.2f}"
            )
        log(f"{source.name} / {name}: {target.label} -> {n} layers (ideal {speedups[n]:.2f}x)")
        return n
    probe = _quality_probe(source, ckpt, ranking, recipe, target)
    holds = (lambda v: v <= target.value) if target.kind.startswith("max") else (lambda v: v >= target.value)
    lo, hi = 0, top  # holds(lo) (nothing dropped); find the largest n that holds
    while lo < hi:
        mid = (lo + hi + 1) // 2
        value = probe(mid)
        log(f"{source.name} / {name}: {target.kind[4:]} with {mid} dropped: {value:.4g}")
        if holds(value):
            lo = mid
        else:
            hi = mid - 1
    log(f"{source.name} / {name}: {target.label} -> {lo} layers")
    return lo
