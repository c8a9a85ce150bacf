"""Healing: the plan's repair records, the weights file and its checks, the PyTorch path against a forward
written out with hooks, the least-squares fit, and the cost model's count of a repair."""

from __future__ import annotations

import hashlib
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
    make_tiny_model(folder, num_hidden_layers=4)  # returns the model; the fixture wants the folder
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
    assert "healed with 3 fitted maps" in loaded.describe()


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
    fitted = fit_repairs(model, plan, windows, HealSettings(form="linear", ridge=0.0, skip_first=0))
    assert torch.allclose(fitted.repairs[2].weight, fused, atol=1e-4) and not fitted.refits


def test_fit_lowers_the_loss_it_targets_and_sequential_sees_earlier_repairs(tiny):
    folder, ckpt = tiny
    model = load_model(folder)
    before = {name: (p.detach().clone(), p.requires_grad) for name, p in model.named_parameters()}
    plan = mixed_plan(ckpt, {1: "drop-attention", 2: "drop-attention"}, {})
    windows = np.random.default_rng(0).integers(0, model.config.vocab_size, (8, 32))
    linear = {"form": "linear"}
    seq = fit_repairs(model, plan, windows, HealSettings(**linear, sequential=True)).repairs
    ind = fit_repairs(model, plan, windows, HealSettings(**linear, sequential=False)).repairs
    assert torch.equal(seq[1].weight, ind[1].weight)  # the first repaired layer sees the same inputs
    assert not torch.allclose(seq[2].weight, ind[2].weight)  # the second one sees layer 1's repair
    assert all(r.bias is None for r in seq.values())
    biased = fit_repairs(model, plan, windows, HealSettings(**linear, bias=True)).repairs
    assert biased[1].bias.shape == (ckpt.shape.d_model,)
    after = dict(model.named_parameters())  # the model is left as it was: same weights, unpruned
    assert after.keys() == before.keys()
    for name, (weight, grad) in before.items():
        assert torch.equal(after[name], weight) and after[name].requires_grad == grad, name
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


def _folded(tmp_path, ckpt, actions: dict[int, str], refits: dict[int, torch.Tensor]) -> Plan:
    plan = mixed_plan(ckpt, actions, {})
    weights = weights_path_for(tmp_path / "fold.json")
    save_repairs(weights, {}, refits)
    info = Healing(
        calib="synthetic", samples=2, length=16, form="fold", ridge=0.0, fold_ridge=1.0, weights=str(weights)
    )
    return healed(plan, {}, info, refits)


def test_apply_matches_the_stock_model_with_refitted_down_projections_and_zeroed_attention(tmp_path, tiny):
    """A folded plan in PyTorch is the stock model with its down projections replaced and the dropped
    attention's output zeroed by a forward hook (the dropped block passed through by another)."""
    folder, ckpt = tiny
    model = load_model(folder)
    g = torch.Generator().manual_seed(3)
    refits = {
        i: model.model.layers[i].mlp.down_proj.weight.detach() + 0.05 * torch.randn(64, 96, generator=g)
        for i in (0, 2)
    }
    plan = _folded(tmp_path, ckpt, {1: "drop-attention", 3: "drop-block"}, refits)
    assert plan.refitted == [0, 2] and plan.repaired == [] and plan.layers[0].action is LayerAction.KEEP
    loaded = Plan.load(tmp_path / "fold.json") if plan.save(tmp_path / "fold.json") is None else None
    assert loaded.refitted == [0, 2] and "2 refitted down projections" in loaded.describe()
    ids = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        got = apply_plan(load_model(folder), loaded)(ids).logits
        for i, weight in refits.items():
            model.model.layers[i].mlp.down_proj.weight.copy_(weight)
        model.model.layers[1].self_attn.register_forward_hook(
            lambda _m, _a, out: (torch.zeros_like(out[0]), *out[1:])
        )
        model.model.layers[3].register_forward_hook(
            lambda _m, args, kwargs, _out: args[0] if args else kwargs["hidden_states"], with_kwargs=True
        )
        want = model(ids).logits
    assert (got - want).abs().max() < 1e-4
    with torch.inference_mode():
        plain = apply_plan(load_model(folder), mixed_plan(ckpt, {1: "drop-attention", 3: "drop-block"}, {}))
        assert (got - plain(ids).logits).abs().max() > 1e-2  # the refits matter


def test_fold_is_the_least_squares_map_from_the_mlp_below_to_the_lost_attention(tiny):
    """A dropped attention is folded into the down projection of the layer below as ``W + D``, D the
    least-squares map from that projection's inputs z to the attention's output (here solved apart, on
    the stock model's own z and attention outputs), each token weighed by 1 / rms(h)^rms_power, h that
    layer's output; the model is left as it was."""
    folder, ckpt = tiny
    model = load_model(folder)
    layers = model.model.layers
    down = layers[1].mlp.down_proj
    before = down.weight.detach().clone()
    windows = np.random.default_rng(0).integers(0, 128, (8, 32))
    seen: dict[str, list] = {"z": [], "a": [], "h": []}
    handles = [
        down.register_forward_pre_hook(lambda _m, args: seen["z"].append(args[0])),
        layers[1].register_forward_hook(
            lambda _m, _a, out: seen["h"].append(out[0] if isinstance(out, tuple) else out)
        ),
        layers[2].self_attn.register_forward_hook(lambda _m, _a, out: seen["a"].append(out[0])),
    ]
    with torch.inference_mode():
        model(torch.from_numpy(windows))
    for handle in handles:
        handle.remove()
    z, a, h = (torch.cat(seen[k]).flatten(0, -2).double() for k in ("z", "a", "h"))
    plan = mixed_plan(ckpt, {2: "drop-attention", 3: "linearize"}, {3: 0.5})
    refits = {}
    for power in (0.0, 1.0):
        root = h.square().mean(-1, keepdim=True).pow(power / 4)  # sqrt of the weight 1 / rms^power
        want = torch.linalg.lstsq(z / root, a / root).solution.T.float()
        settings = HealSettings(fold_ridge=0.0, skip_first=0, drift=0.0, rms_power=power)
        fitted = fit_repairs(model, plan, windows, settings)
        assert set(fitted.refits) == {1} and set(fitted.repairs) == {3}  # linearized: a fitted map
        assert torch.allclose(fitted.refits[1], before + want, atol=1e-4)
        refits[power] = fitted.refits[1]
    assert (refits[0.0] - refits[1.0]).abs().max() > 1e-3  # the weights matter
    assert torch.equal(down.weight, before)  # fitted on a copy


def test_fold_goes_below_removed_blocks_and_falls_back_to_a_map_without_an_mlp_below(tiny):
    folder, ckpt = tiny
    model = load_model(folder)
    windows = np.random.default_rng(1).integers(0, 128, (4, 32))
    plan = mixed_plan(ckpt, {0: "drop-block", 1: "drop-attention", 2: "drop-block", 3: "drop-attention"}, {})
    fitted = fit_repairs(model, plan, windows, HealSettings())
    # layer 0 has no MLP below (a map, then nothing feeds layer 1 directly: a map too); layers 2 and 3
    # fold into layer 1's MLP, the one below them with only a removed block between
    assert set(fitted.repairs) == {0, 1} and set(fitted.refits) == {1}


def test_fold_is_refused_where_the_mlp_output_is_normed(tmp_path):
    folder = tmp_path / "gemma2"
    make_tiny_model(folder, "gemma2", head_dim=8, query_pre_attn_scalar=8)
    ckpt = open_checkpoint(folder)
    plan = mixed_plan(ckpt, {2: "drop-attention"}, {})
    windows = np.random.default_rng(0).integers(0, 128, (2, 16))
    with pytest.raises(GatenormError, match=r"norms each MLP output.*--heal-form linear"):
        fit_repairs(load_model(folder), plan, windows, HealSettings())
    assert fit_repairs(load_model(folder), plan, windows, HealSettings(form="linear")).repairs


def test_fold_settings_and_records_are_checked():
    with pytest.raises(ValueError, match="fitted sequentially"):
        HealSettings(sequential=False)
    assert HealSettings(form="linear", sequential=False).form == "linear"
    with pytest.raises(ValueError, match="dropped block has no down projection"):
        LayerPlanModel = Plan.model_fields["layers"].annotation.__args__[0]
        LayerPlanModel(layer=0, score=0.0, action="drop-block", refit={"shape": [4, 8], "sha256": "0" * 64})


def test_drift_refits_the_kept_layer_above_and_brings_the_stream_back(tmp_path, tiny):
    """With drift, the folds also correct how far the healed stream has moved from the unpruned model's
    and the kept layer right above the changed ones gets a refit for it: the healed model's last hidden
    states come closer to the unpruned model's than without (on the calibration windows)."""
    folder, ckpt = tiny
    model = load_model(folder)
    windows = np.random.default_rng(2).integers(0, 128, (8, 32))
    plan = mixed_plan(ckpt, {1: "drop-block", 2: "drop-attention"}, {})
    ids = torch.from_numpy(windows)

    def last_hidden(m) -> torch.Tensor:
        seen = {}
        handle = m.model.layers[3].register_forward_hook(lambda _m, _a, out: seen.__setitem__("h", out))
        with torch.inference_mode():
            m(ids)
        handle.remove()
        return seen["h"][0] if isinstance(seen["h"], tuple) else seen["h"]

    want = last_hidden(model)
    errors = {}
    for drift in (0.0, 1.0):
        fitted = fit_repairs(model, plan, windows, HealSettings(drift=drift, fold_ridge=0.01))
        assert set(fitted.refits) == ({0, 3} if drift else {0}) and not fitted.repairs
        (where := tmp_path / f"drift{drift:g}").mkdir()
        healed_plan = _folded(where, ckpt, {1: "drop-block", 2: "drop-attention"}, fitted.refits)
        errors[drift] = float(
            (last_hidden(apply_plan(load_model(folder), healed_plan)) - want).square().mean()
        )
    assert errors[1.0] < 0.7 * errors[0.0], errors  # measured: 0.56x
    without = fit_repairs(model, plan, windows, HealSettings(drift=1.0, refit_kept=False))
    assert set(without.refits) == {0}
    info = Healing(calib="synthetic", samples=2, length=16, form="fold", ridge=0.0, fold_ridge=1.0, drift=0.5,
                   refit_kept=True, weights="w")  # fmt: skip
    assert info.ridges() == "ridge 0, fold ridge 1, drift 0.5"
    assert (
        info.model_copy(update={"rms_power": 1.0}).ridges() == "ridge 0, fold ridge 1, drift 0.5, rms power 1"
    )


def test_the_calibration_source_is_recorded_and_a_text_file_by_its_hash(tmp_path):
    text = tmp_path / "domain.txt"
    text.write_text("Field notes from the users' own domain.\n" * 50, encoding="utf-8")
    digest = hashlib.sha256(text.read_bytes()).hexdigest()
    assert HealSettings(calib=str(text)).calib_id() == f"file:{digest}"
    assert HealSettings(calib="wiki-heldout").calib_id() == "wiki-heldout"
    assert HealSettings().calib_id() == "synthetic"
    text.write_text("other text", encoding="utf-8")
    assert HealSettings(calib=str(text)).calib_id() != f"file:{digest}"


def test_healed_plans_run_alike_on_the_layer_sequential_engine(tmp_path, tiny):
    """A healed plan (fitted maps on a dropped attention, a linearized layer and a dropped block) and a
    folded one (refitted down projections) give the same logits a layer at a time, in one shared pass with
    the unpruned model, as applied to the whole loaded model."""
    from gatenorm.sequential import SequentialModel

    folder, ckpt = tiny
    mapped, _ = _healed(tmp_path, ckpt, {1: "drop-attention", 2: "linearize", 3: "drop-block"}, bias=True)
    base = load_model(folder)
    g = torch.Generator().manual_seed(5)
    refits = {i: base.model.layers[i].mlp.down_proj.weight.detach() + 0.05 * torch.randn(64, 96, generator=g)
              for i in (0, 2)}  # fmt: skip
    folded = _folded(tmp_path, ckpt, {1: "drop-attention", 3: "drop-block"}, refits)
    windows = np.random.default_rng(6).integers(0, 128, size=(3, 16))
    engine = SequentialModel(folder)
    states = engine.forward_many(windows, [None, mapped, folded])
    for plan, state in zip([None, mapped, folded], states, strict=True):
        model = base if plan is None else apply_plan(load_model(folder), plan)
        with torch.inference_mode():
            want = model(torch.from_numpy(windows), use_cache=False).logits[:, 2:-1].numpy()
        got = np.stack(list(engine.window_logits(state.hidden, 2)))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
