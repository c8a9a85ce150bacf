"""Plans: selection, layer-0 protection, budget limits, JSON round trip, validation."""

from __future__ import annotations

import json

import pytest

from gatenorm.errors import GatenormError
from gatenorm.methods import Method, score_checkpoint
from gatenorm.plan import LayerAction, Plan, make_plan
from gatenorm.readers import open_checkpoint
from gatenorm.scoring import LayerScores


@pytest.fixture(scope="module")
def ckpt(tiny_llama_dir):
    return open_checkpoint(tiny_llama_dir)


def fixed_scores(values: list[float]) -> LayerScores:
    return LayerScores(Method.GATE_NORM, values, "0" * 64, "attention-tensors", 0.0)


def test_drops_lowest_scores_and_protects_layer_zero(ckpt):
    plan = make_plan(ckpt, fixed_scores([0.1, 5.0, 0.5, 3.0]), drop=2)
    assert plan.dropped == [2, 3]  # layer 0 has the lowest score but is protected
    assert plan.budget == 2
    assert [lp.action for lp in plan.layers] == [
        LayerAction.KEEP,
        LayerAction.KEEP,
        LayerAction.DROP_ATTENTION,
        LayerAction.DROP_ATTENTION,
    ]
    forced = make_plan(ckpt, fixed_scores([0.1, 5.0, 0.5, 3.0]), drop=2, allow_first_layer=True)
    assert forced.dropped == [0, 2]


def test_ties_drop_deeper_layers_first(ckpt):
    assert make_plan(ckpt, fixed_scores([1.0, 1.0, 1.0, 1.0]), drop=2).dropped == [2, 3]


@pytest.mark.parametrize("drop", [-1, 4, 10])
def test_budget_out_of_range(ckpt, drop):
    with pytest.raises(GatenormError, match="out of range"):
        make_plan(ckpt, fixed_scores([1.0, 2.0, 3.0, 4.0]), drop=drop)


def test_max_budget_without_layer_zero(ckpt):
    plan = make_plan(ckpt, fixed_scores([1.0, 2.0, 3.0, 4.0]), drop=3)
    assert plan.dropped == [1, 2, 3]


def test_nan_scores_refused(ckpt):
    with pytest.raises(GatenormError, match="NaN"):
        make_plan(ckpt, fixed_scores([1.0, float("nan"), 3.0, 4.0]), drop=1)


def test_json_round_trip(ckpt, tmp_path):
    plan = make_plan(ckpt, score_checkpoint(ckpt, Method.GATE_NORM), drop=2)
    path = tmp_path / "plan.json"
    plan.save(path)
    again = Plan.load(path)
    assert again == plan
    doc = json.loads(path.read_text())
    assert doc["method"] == "gate-norm" and doc["budget"] == 2
    assert doc["source"]["architecture"] == "llama" and doc["source"]["n_layers"] == 4
    assert doc["source"]["sha256"] == plan.source.sha256 and len(plan.source.sha256) == 64
    assert doc["tool_version"]
    assert [lp["action"] for lp in doc["layers"]].count("drop-attention") == 2
    assert not list(tmp_path.glob("*.tmp"))


def test_inconsistent_plan_rejected(ckpt, tmp_path):
    doc = json.loads(make_plan(ckpt, fixed_scores([1.0, 2.0, 3.0, 4.0]), drop=1).to_json())
    doc["budget"] = 3
    with pytest.raises(GatenormError, match="invalid plan"):
        Plan.from_json(json.dumps(doc))
    doc["budget"] = 1
    doc["layers"][0]["action"] = "delete"
    with pytest.raises(GatenormError, match=r"invalid plan: layers\.0\.action"):
        Plan.from_json(json.dumps(doc))


def test_mixed_actions_round_trip_and_alpha_rules(ckpt):
    from gatenorm.plan import plan_from_actions

    actions = [LayerAction.KEEP, LayerAction.LINEARIZE, LayerAction.DROP_BLOCK, LayerAction.DROP_ATTENTION]
    plan = plan_from_actions(ckpt, fixed_scores([1.0, 2.0, 3.0, 4.0]), actions, {1: 0.25}, method="mixed")
    assert plan.budget == 3 and plan.changed == [1, 2, 3] and plan.kv_layers == [0]
    assert (plan.dropped, plan.linearized, plan.blocks_dropped) == ([3], [1], [2])
    assert plan.layers[1].alpha == 0.25 and plan.layers[3].alpha is None
    assert Plan.from_json(plan.to_json()) == plan
    assert plan.describe() == (
        "dropped attention of layers [3]; linearized the attention of layers [1]; dropped whole blocks [2]"
    )
    doc = json.loads(plan.to_json())
    doc["layers"][1]["alpha"] = None
    with pytest.raises(GatenormError, match="alpha goes with action 'linearize'"):
        Plan.from_json(json.dumps(doc))
    doc["layers"][1]["alpha"], doc["layers"][3]["alpha"] = 0.25, 1.0
    with pytest.raises(GatenormError, match="alpha goes with action 'linearize'"):
        Plan.from_json(json.dumps(doc))
    doc["layers"][3]["alpha"], doc["schema_version"] = None, 1
    with pytest.raises(GatenormError, match="schema_version 1"):
        Plan.from_json(json.dumps(doc))
    with pytest.raises(GatenormError, match=r"cannot apply plan action.*drop-block, linearize"):
        plan.require({LayerAction.KEEP, LayerAction.DROP_ATTENTION}, "the gguf exporter")


def test_version_1_plans_still_load(ckpt):
    doc = json.loads(make_plan(ckpt, fixed_scores([1.0, 2.0, 3.0, 4.0]), drop=1).to_json())
    doc["schema_version"] = 1
    assert Plan.from_json(json.dumps(doc)).dropped == [1]
