"""Recover a pruned (and healed) plan by distillation: low-rank adapters on kept layers of the pruned
model (the student) are trained so that its next-token distributions match the unpruned model's (the
teacher's), KL(teacher || student) per token, on the model's own text by default; the adapters are then
merged into the weights, which the plan records (`gatenorm.recover.store`).

The teacher runs once: its log-probabilities are cached, in full when they fit in ``cache_mb``, else as its
top-k tokens plus one bucket for the rest (the KL of those k + 1 outcomes). The student's layers below the
lowest adapted one run once too: their outputs are cached, and each step runs only the layers from there up
(and the LM head). AdamW, the learning rate decayed linearly to 0, the batch order and the adapters' start
drawn from `seed`; on the CPU the run is deterministic (same seed, same merged bytes).
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gatenorm.architectures import get_architecture
from gatenorm.errors import GatenormError
from gatenorm.heal.fit import HealSettings, heal_plan
from gatenorm.methods.calibration import SYNTHETIC, direct_layer_inputs
from gatenorm.methods.synthetic import sampler_id
from gatenorm.plan import LayerAction, Plan, Recovery
from gatenorm.recover.lora import attach
from gatenorm.recover.settings import RecoverySettings
from gatenorm.recover.store import recovered, save_overrides, tensor_sha256

GIB = 1 << 30
#: Bytes per token per adapted-or-above layer that a training step holds for the backward pass, in units of
#: the model width (attention and MLP activations, float32), and per vocabulary entry at the head.
_ACTIVATION_WIDTHS, _HEAD_COPIES = 24, 4


def adapted_layers(plan: Plan, settings: RecoverySettings) -> list[int]:
    """The layers whose `settings.targets` get adapters: for ``adjacent`` the closest kept layer below and
    above each changed one, for ``kept`` every kept layer, else the listed ones (one line if one is
    changed or out of range)."""
    kept = [lp.layer for lp in plan.layers if lp.action is LayerAction.KEEP]
    if settings.layers == "kept":
        return kept
    if settings.layers == "adjacent":
        chosen = set()
        for i in plan.changed:
            chosen |= {
                max((k for k in kept if k < i), default=None),
                min((k for k in kept if k > i), default=None),
            }
        return sorted(chosen - {None})
    listed = sorted({int(p) for p in settings.layers.split(",")})
    wrong = [i for i in listed if i >= len(plan.layers) or i not in kept]
    if wrong:
        raise GatenormError(
            f"--recover-layers {settings.layers}: layers {wrong} are not kept layers of the plan"
        )
    return listed


def _module_path(layer: nn.Module, target: str, index: int) -> str:
    """The path under a decoder layer of its linear module named `target` (one line if none or several)."""
    paths = [name for name, m in layer.named_modules() if name.rpartition(".")[2] == target]
    if len(paths) != 1 or not isinstance(layer.get_submodule(paths[0]), nn.Linear):
        found = sorted({n.rpartition(".")[2] for n, m in layer.named_modules() if isinstance(m, nn.Linear)})
        raise GatenormError(
            f"--recover-targets {target}: layer {index} has no single linear module of that name "
            f"(it has {', '.join(found)})"
        )
    return paths[0]


@dataclass(frozen=True)
class Estimate:
    """What a recovery needs in memory, by part (bytes)."""

    models: float
    cache: float
    activations: float

    @property
    def total(self) -> float:
        return self.models + self.cache + self.activations

    def describe(self) -> str:
        return (
            f"~{self.total / GIB:.1f} GiB (two float32 models {self.models / GIB:.1f}, teacher cache "
            f"{self.cache / GIB:.1f}, activations {self.activations / GIB:.1f})"
        )


def teacher_top_k(settings: RecoverySettings, vocab: int) -> int | None:
    """The teacher cache's top-k (None: its distribution in full, which fits in ``cache_mb``)."""
    full = 4.0 * settings.samples * settings.length * vocab
    return None if full <= settings.cache_mb * 2**20 else min(settings.top_k, vocab)


def estimate(params: int, d: int, vocab: int, n_layers: int, settings: RecoverySettings) -> Estimate:
    """The memory a recovery of a model of `params` parameters (width `d`, `n_layers`) needs."""
    tokens = settings.samples * settings.length
    k = teacher_top_k(settings, vocab)
    cache = 4.0 * tokens * (vocab if k is None else 2 * k + 1) + 4.0 * tokens * d
    step = settings.batch * settings.length
    activations = 4.0 * step * (n_layers * _ACTIVATION_WIDTHS * d + _HEAD_COPIES * vocab)
    return Estimate(2 * 4.0 * params * 1.1, cache, activations)


def check_fits(model_path: str | Path, settings: RecoverySettings) -> None:
    """Refuse, in one line naming what it needs, a recovery that would not fit in memory (the device's, for
    cuda) or a cuda device torch does not see."""
    from gatenorm.readers import open_checkpoint
    from gatenorm.sequential.memory import ModelSize, available_bytes

    if settings.device == "cuda" and not torch.cuda.is_available():
        raise GatenormError("--recover-device cuda: torch sees no CUDA device here")
    ckpt = open_checkpoint(model_path)
    size = ModelSize.of(ckpt)
    vocab = size.table_params // size.d_model
    need = estimate(size.params, size.d_model, vocab, size.n_layers, settings)
    if settings.device == "cuda":
        limit, where = float(torch.cuda.mem_get_info()[0]), "free on the GPU"
    else:
        limit, where = available_bytes(), "available"
    if need.total > limit:
        raise GatenormError(
            f"--recover on {ckpt.path.name}: training needs {need.describe()}, {limit / GIB:.1f} GiB "
            f"{where}; "
            "fewer --recover-samples / --recover-batch, or --recover-device cuda"
        )


class _Teacher:
    """The teacher's next-token log-probabilities over the windows: in full [n, T, V], or top-k values and
    indices [n, T, k] with the rest's log-probability [n, T, 1]."""

    def __init__(self, model: nn.Module, ids: torch.Tensor, top_k: int | None, batch: int):
        self.top_k = top_k
        values, indices = [], []
        with torch.no_grad():
            for chunk in ids.split(batch):
                logp = torch.log_softmax(model(input_ids=chunk, use_cache=False).logits.float(), dim=-1)
                if top_k is None:
                    values.append(logp.cpu())
                    continue
                top, where = logp.topk(top_k, dim=-1)
                rest = torch.log1p(-top.exp().sum(-1, keepdim=True).clamp(max=1 - 1e-7))
                values.append(torch.cat([top, rest], dim=-1).cpu())
                indices.append(where.cpu())
        self.values = torch.cat(values)
        self.indices = torch.cat(indices) if indices else None

    def kl(self, rows: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Mean KL(teacher || student) per token of windows `rows`, the student's `logits` [b, T, V]."""
        student = torch.log_softmax(logits.float(), dim=-1)
        teacher = self.values[rows].to(logits.device)
        if self.top_k is not None:
            top = student.gather(-1, self.indices[rows].to(logits.device))
            rest = torch.log1p(-top.exp().sum(-1, keepdim=True).clamp(max=1 - 1e-6))
            student = torch.cat([top, rest], dim=-1)
        return (teacher.exp() * (teacher - student)).sum(-1).mean()


def _inputs_of(model: nn.Module, index: int, ids: torch.Tensor, batch: int) -> torch.Tensor:
    """The hidden states entering decoder layer `index` of `model` over windows `ids`, [n, T, d]."""
    arch = get_architecture(model.config.model_type)
    captured: list[torch.Tensor] = []

    class Stop(Exception):
        pass

    def hook(_module, args, kwargs):
        captured.append((args[0] if args else kwargs["hidden_states"]).detach().float())
        raise Stop

    handle = arch.decoder_layers(model)[index].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for chunk in ids.split(batch):
                with contextlib.suppress(Stop):
                    model.model(input_ids=chunk, use_cache=False)
    finally:
        handle.remove()
    return torch.cat(captured)


def _clone(value):
    """`value` (a tensor or a tuple of them, made in inference mode) as normal tensors autograd can save."""
    return tuple(t.clone() for t in value) if isinstance(value, tuple) else value.clone()


@contextlib.contextmanager
def _deterministic():
    """torch's deterministic algorithms, on for the block."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


@dataclass
class Trained:
    """What `train` produced: state-dict name -> merged weight (only those merging changed), the losses."""

    tensors: dict[str, torch.Tensor]
    initial_loss: float
    loss: float
    top_k: int | None


def train(
    teacher: nn.Module,
    plan: Plan,
    windows: np.ndarray,
    settings: RecoverySettings,
    progress: Callable[[int, int, float], None] | None = None,
    probe: tuple[int, Callable[[int, dict[str, torch.Tensor]], None]] | None = None,
) -> Trained:
    """Adapters trained on the pruned `teacher` (as `plan` applies it, healed if healed) to match `teacher`
    over `windows` [n, T], merged; `teacher` (float32, unpruned) is left unchanged.
    `progress(step, steps, loss)` after each step; `probe` = (every, call): ``call(step, merged tensors)``
    every that many steps (a curve of quality against steps)."""
    from gatenorm.apply import apply_plan

    arch = get_architecture(teacher.config.model_type)
    device = torch.device(settings.device)
    ids = torch.from_numpy(np.ascontiguousarray(windows)).to(device)
    teacher = teacher.to(device)
    layers_at = adapted_layers(plan, settings)
    if not layers_at:
        raise GatenormError("--recover: the plan keeps no layer to adapt")
    prefix = {id(m): name for name, m in teacher.named_modules()}
    teacher_layers = arch.decoder_layers(teacher)
    refitted = set(plan.refitted)
    named: dict[str, tuple[int, str]] = {}  # state-dict name -> (layer, path in the layer)
    for i in layers_at:
        for target in settings.targets:
            path = _module_path(teacher_layers[i], target, i)
            if target == arch.hf_down_proj and i in refitted:
                raise GatenormError(
                    f"--recover-targets {target}: layer {i}'s down projection is refitted by the healing; "
                    "adapt other modules or layers"
                )
            named[f"{prefix[id(teacher_layers[i])]}.{path}.weight"] = (i, path)
    k = teacher_top_k(settings, teacher.config.vocab_size)
    cache = _Teacher(teacher, ids, k, settings.batch)
    student = apply_plan(copy.deepcopy(teacher), plan).to(device)
    student.requires_grad_(False)
    generator = torch.Generator().manual_seed(settings.seed)
    layers = arch.decoder_layers(student)
    adapters = {
        name: attach(layers[i], path, settings.rank, settings.alpha, generator)
        for name, (i, path) in named.items()
    }
    first = min(layers_at)
    masks, kwargs = direct_layer_inputs(teacher, ids)  # made in inference mode: cloned for autograd
    masks = [m.to(device) for m in masks]
    kwargs = [{k: _clone(v) for k, v in layer.items()} for layer in kwargs]
    hidden = _inputs_of(student, first, ids, settings.batch)
    params = [p for a in adapters.values() for p in (a.a, a.b)]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / settings.steps)
    order = torch.cat(
        [
            torch.randperm(len(ids), generator=generator)
            for _ in range(-(-settings.steps * settings.batch // len(ids)))
        ]
    )
    losses = []
    with _deterministic():
        for step in range(settings.steps):
            rows = order[step * settings.batch : (step + 1) * settings.batch]
            h = hidden[rows.to(device)]
            for i in range(first, len(layers)):
                out = layers[i](h, attention_mask=masks[i], **kwargs[i])
                h = out[0] if isinstance(out, tuple) else out
            loss = cache.kl(rows, arch.logits(student, h))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
            if progress is not None:
                progress(step + 1, settings.steps, losses[-1])
            if probe is not None and (step + 1) % probe[0] == 0 and step + 1 < settings.steps:
                probe[1](step + 1, {name: a.merged() for name, a in adapters.items()})
    tail = losses[-max(1, len(losses) // 10) :]
    merged = {name: a.merged() for name, a in adapters.items() if a.changed()}
    return Trained(merged, losses[0] if losses else 0.0, float(np.mean(tail)) if tail else 0.0, k)


def recover_plan(
    model_path: str | Path,
    plan: Plan,
    settings: RecoverySettings,
    weights: Path,
    log: Callable[[str], None] = lambda _: None,
    progress: Callable[[int, int, float], None] | None = None,
    model: nn.Module | None = None,
    windows: np.ndarray | None = None,
    probe: tuple[int, Callable[[int, dict[str, torch.Tensor]], None]] | None = None,
) -> Plan:
    """`plan` recovered: adapters trained on `model_path`'s own model (`model`, float32, unpruned, left
    unchanged, when given), merged, the merged tensors written to `weights` (atomically) and recorded with
    their hashes in the returned plan. Zero steps, or training that changes no value, returns `plan` as it
    is. `windows` (``settings``' training windows) are reused when given (e.g. the healing's); `probe` as
    `train`'s."""
    from gatenorm.apply import load_model

    if plan.recovery is not None:
        raise GatenormError("the plan is already recovered")
    if not plan.changed:
        raise GatenormError("--recover: the plan changes no layer, so there is nothing to recover")
    check_fits(model_path, settings)
    if settings.steps == 0:
        log("recovery: 0 steps, the plan is left as it is")
        return plan
    if model is None:
        model = load_model(model_path)
    if getattr(model.config, "gatenorm_fixed", None):
        raise GatenormError(f"--recover on {model_path}: a deci file's pruned layers cannot be trained yet")
    start = time.perf_counter()
    if windows is None:
        windows = settings.windows(model_path, log)
    n, t = windows.shape
    log(
        f"recovering: {settings.steps} steps of {settings.batch} x {t} tokens from {n} {settings.calib} "
        "windows"
    )
    trained = train(model, plan, windows, settings, progress, probe)
    model.to("cpu")
    seconds = time.perf_counter() - start
    if not trained.tensors:
        log("recovery changed no weight: the plan is left as it is")
        return plan
    save_overrides(weights, trained.tensors)
    recovery = Recovery(
        layers=adapted_layers(plan, settings),
        targets=list(settings.targets),
        rank=settings.rank,
        alpha=settings.alpha,
        steps=settings.steps,
        lr=settings.lr,
        batch=settings.batch,
        seed=settings.seed,
        calib=settings.calib_id(),
        samples=n,
        length=t,
        generator=sampler_id(model_path) if settings.calib == SYNTHETIC else None,
        top_k=trained.top_k,
        initial_loss=trained.initial_loss,
        loss=trained.loss,
        device=settings.device,
        seconds=seconds,
        tensors={name: tensor_sha256(w) for name, w in sorted(trained.tensors.items())},
        weights=str(Path(weights).absolute()),
    )
    log(
        f"recovered {len(trained.tensors)} tensors of layers {recovery.layers}: KL "
        f"{trained.initial_loss:.4f} -> {trained.loss:.4f} in {seconds:.1f} s -> {weights}"
    )
    return recovered(plan, recovery)


def heal_and_recover(
    model_path: str | Path,
    plan: Plan,
    healing: HealSettings | None,
    recovery: RecoverySettings | None,
    heal_weights: Path,
    recover_weights: Path,
    log: Callable[[str], None] = lambda _: None,
    progress: Callable[[int, int, float], None] | None = None,
) -> Plan:
    """`plan` healed with `healing` (None: not) then recovered with `recovery` (None: not),
    their weights written to `heal_weights` and `recover_weights`: one model load, and one calibration text
    when the two ask for the same windows."""
    from gatenorm.apply import load_model

    if recovery is not None:
        check_fits(model_path, recovery)  # before the healing's work
    model = load_model(model_path) if recovery is not None else None  # healing reads a layer at a time
    same = (
        healing is not None
        and recovery is not None
        and (healing.calib, healing.samples, healing.length, healing.seed)
        == (recovery.calib, recovery.samples, recovery.length, recovery.seed)
    )
    windows = healing.windows(model_path, log) if same else None
    if healing is not None:
        plan = heal_plan(model_path, plan, healing, heal_weights, log, model, windows)
    if recovery is not None:
        plan = recover_plan(model_path, plan, recovery, recover_weights, log, progress, model, windows)
    return plan
