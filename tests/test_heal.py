"""Healing: the plan's repair records, the weights file and its checks, the PyTorch path against a forward
written out with hooks, the least-squares fit, and the cost model's count of a repair."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gatenorm.apply import LinearAttentionLayer, LinearBlockLayer, apply_plan, load_model
from gatenorm.errors import GatenormError
from gatenorm.heal.fit import HealSettings, fit_repairs
from gatenorm.heal.store import LinearRepair, healed, load_repairs, save_repairs, weights_path_for
from gatenorm.methods.cost import cost_model
from gatenorm.plan import Healing, LayerAction, Plan
from gatenorm.readers import open_checkpoint
from tests.conftest import make_tiny_model, mixed_plan


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-heal")
    make_tiny_model(folder, num_hidden_layers=4)  # returns the model; the folder is what is opened
    return folder, open_checkpoint(folder)


def _random_repairs(d: int, layers, bias: bool = False, seed: int = 0) -> dict[int, LinearRepair]:
    g = torch.Generator().manual_seed(seed)
    return {
        i: LinearRepair(0.05 * torch.randn(d, d, generator=g), torch.randn(d, generator=g) if bias else None)
        for i in layers
    }


def _healed(tmp_path, ckpt, actions: dict[int, str], bias: bool = False) -> tuple[Plan, dict]:
    plan = mixed_plan(ckpt, actions, {i: 0.5 for i, a in actions.items() if a == "linearize"})
    repairs = _random_repairs(ckpt.shape.d_model, actions, bias)
    weights = weights_path_for(tmp_path / "plan.json")
    save_repairs(weights, repairs)
    info = Healing(calib="synthetic", samples=2, length=16, ridge=0.0, weights=str(weights))
    return healed(plan, repairs, info), repairs


def test_healed_plan_round_trips_with_its_weights_beside_it(tmp_path, tiny):
    _, ckpt = tiny
    plan, repairs = _healed(tmp_path, ckpt, {1: "drop-attention", 2: "linearize", 3: "drop-block"})
    assert plan.schema_version == 3 and plan.repaired == [1, 2, 3]
    plan.save(tmp_path / "plan.json")
    doc = json.loads((tmp_path / "plan.json").read_text())
    assert doc["healing"]["weights"] == "plan.repairs.safetensors"  # relative: the two move together
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("plan.json", "plan.repairs.safetensors"):
        (tmp_path / name).rename(moved / name)
    loaded = Plan.load(moved / "plan.json")
    got = load_repairs(loaded)
    assert set(got) == {1, 2, 3}
    assert torch.equal(got[2].weight, repairs[2].weight)
    assert "healed 3 of them" in loaded.describe()


def test_repair_records_are_checked(tmp_path, tiny):
    _, ckpt = tiny
    plan, _ = _healed(tmp_path, ckpt, {2: "drop-attention"})
    doc = plan.model_dump(mode="json")
    doc["layers"][1]["repair"] = doc["layers"][2]["repair"]  # a kept layer with a repair
    with pytest.raises(ValueError, match="kept layer has no repair"):
        Plan.model_validate(doc)
    doc = plan.model_dump(mode="json")
    doc["healing"] = None
    with pytest.raises(ValueError, match="healing goes with layer repairs"):
        Plan.model_validate(doc)
    doc = plan.model_dump(mode="json")
    doc["schema_version"] = 2
    with pytest.raises(ValueError, match="schema_version 3"):
        Plan.model_validate(doc)


def test_changed_or_missing_weights_are_one_line_errors(tmp_path, tiny):
    _, ckpt = tiny
    plan, repairs = _healed(tmp_path, ckpt, {2: "drop-attention"})
    other = {2: LinearRepair(repairs[2].weight + 1e-3)}
    save_repairs(plan.healing.weights, other)
    with pytest.raises(GatenormError, match="layer 2's repair weights do not match the plan's hash"):
        load_repairs(plan)
    save_repairs(plan.healing.weights, {3: other[2]})
    with pytest.raises(GatenormError, match="no repair weights for layer 2"):
        load_repairs(plan)
    (tmp_path / "plan.repairs.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(GatenormError, match="not a readable repair weights file"):
        load_repairs(plan)
    (tmp_path / "plan.repairs.safetensors").unlink()
    with pytest.raises(GatenormError, match="repair weights are missing"):
        load_repairs(plan)


def _hooked_reference(folder, ids, repairs: dict[int, LinearRepair], blocks: set[int]) -> torch.Tensor:
    """The stock model with each repaired layer's attention output replaced by W @ attn_input + b (forward
    hooks), and each repaired block's whole output replaced by h + W @ input_layernorm(h) + b."""
    model = load_model(folder)
    handles = []
    for i, layer in enumerate(model.model.layers):
        if i not in repairs:
            continue
        r = repairs[i]

        def fit(x, r=r):
            return torch.nn.functional.linear(x, r.weight, r.bias)

        if i in blocks:

            def block_hook(module, args, kwargs, output, fit=fit):
                h = args[0] if args else kwargs["hidden_states"]
                return h + fit(module.input_layernorm(h))

            handles.append(layer.register_forward_hook(block_hook, with_kwargs=True))
        else:

            def attn_hook(module, args, kwargs, output, fit=fit):
                x = args[0] if args else kwargs["hidden_states"]
                return (fit(x), *output[1:])

            handles.append(layer.self_attn.register_forward_hook(attn_hook, with_kwargs=True))
    with torch.inference_mode():
        logits = model(ids).logits
    for h in handles:
        h.remove()
    return logits


@pytest.mark.parametrize("bias", [False, True])
def test_apply_matches_the_stock_model_with_the_repairs_hooked_in(tmp_path, tiny, bias):
    folder, ckpt = tiny
    actions = {1: "drop-attention", 2: "linearize", 3: "drop-block"}
    plan, repairs = _healed(tmp_path, ckpt, actions, bias)
    model = apply_plan(load_model(folder), plan)
    layers = model.model.layers
    assert isinstance(layers[1], LinearAttentionLayer) and isinstance(layers[3], LinearBlockLayer)
    ids = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        got = model(ids).logits
    want = _hooked_reference(folder, ids, repairs, {3})
    assert (got - want).abs().max() < 1e-4
    unhealed = apply_plan(load_model(folder), plan.model_copy(update={"healing": None, "schema_version": 2}))
    assert (got - unhealed(ids).logits).abs().max() > 1e-2  # the repairs matter


def test_fit_recovers_an_exactly_linear_attention(tiny):
    """A layer whose attention output is exactly linear in its input (HARP-linearized in a model used as
    the target) is fitted back to that matrix: the least squares is exact, the solve right."""
    folder, ckpt = tiny
    model = load_model(folder)
    plan = mixed_plan(ckpt, {2: "drop-attention"}, {})
    windows = np.random.default_rng(0).integers(0, model.config.vocab_size, (6, 32))
    from gatenorm.architectures import get_architecture

    arch = get_architecture("llama")
    target = arch.linearized(model.model.layers[2], 0.7)  # h + 0.7 W_o W_v norm(h): the "attention"
    fused = target.fused_attention.weight.detach()
    with torch.no_grad():  # make layer 2's attention output exactly fused @ x
        model.model.layers[2].self_attn.forward = lambda hidden_states, *a, **k: (
            torch.nn.functional.linear(hidden_states, fused),
            None,
        )
    repairs = fit_repairs(model, plan, windows, HealSettings(ridge=0.0, skip_first=0))
    assert torch.allclose(repairs[2].weight, fused, atol=1e-4)


def test_fit_lowers_the_loss_it_targets_and_sequential_sees_earlier_repairs(tiny):
    folder, ckpt = tiny
    model = load_model(folder)
    plan = mixed_plan(ckpt, {1: "drop-attention", 2: "drop-attention"}, {})
    windows = np.random.default_rng(0).integers(0, model.config.vocab_size, (8, 32))
    seq = fit_repairs(model, plan, windows, HealSettings(sequential=True))
    ind = fit_repairs(model, plan, windows, HealSettings(sequential=False))
    assert torch.equal(seq[1].weight, ind[1].weight)  # the first repaired layer sees the same inputs
    assert not torch.allclose(seq[2].weight, ind[2].weight)  # the second one sees layer 1's repair
    assert all(r.bias is None for r in seq.values())
    assert fit_repairs(model, plan, windows, HealSettings(bias=True))[1].bias.shape == (ckpt.shape.d_model,)
    for p in model.parameters():  # the model is left unpruned
        assert p.requires_grad is not None
    assert not any(isinstance(layer, LinearAttentionLayer) for layer in model.model.layers)


def test_cost_model_counts_a_repair_as_one_matmul(tiny):
    _, ckpt = tiny
    d = ckpt.shape.d_model
    model = cost_model(ckpt, 512)
    keep = LayerAction.KEEP
    assert model.layer(LayerAction.DROP_ATTENTION, True) == model.layer(LayerAction.LINEARIZE)
    assert model.layer(LayerAction.LINEARIZE, True) == model.layer(LayerAction.LINEARIZE)
    assert model.layer(LayerAction.DROP_BLOCK, True) == 2.0 * d * d
    actions = [keep, LayerAction.DROP_ATTENTION, keep, keep]
    assert model.speedup(actions, {1}) < model.speedup(actions)
