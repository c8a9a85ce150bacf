"""Each kind of extension is one registry entry: a dummy method, export target and runtime added through
the registries alone reach every caller (CLI, recipes, study, validation)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from gatenorm.errors import GatenormError
from gatenorm.methods import METHODS, MethodOptions, Ranking, make_method_plan, register_method
from gatenorm.methods.spec import unregister_method
from gatenorm.plan import LayerAction, Plan
from gatenorm.readers import Checkpoint
from gatenorm.scoring import depth_scores, shape_scores


@pytest.fixture
def dummy_method():
    """A method that changes the shallowest layers first, registered for one test (its one file: here)."""

    @register_method(
        "dummy-first",
        label="dummy (shallowest first)",
        summary="shallowest layers first",
        actions={LayerAction.LINEARIZE},
    )
    def dummy_first(ckpt: Checkpoint, options: MethodOptions, _needed: int | None) -> Ranking:
        n = ckpt.shape.n_layers
        scores = shape_scores(ckpt, "dummy-first", reversed(depth_scores(n)))
        return Ranking(scores, [LayerAction.LINEARIZE] * n, dict.fromkeys(range(n), 0.5))

    yield "dummy-first"
    unregister_method("dummy-first")


def test_dummy_method_reaches_planning_cli_and_recipes(dummy_method, tiny_llama_dir, tmp_path):
    from gatenorm.cli import app
    from gatenorm.readers import open_checkpoint
    from gatenorm.recipes.schema import MethodEntry

    ckpt = open_checkpoint(tiny_llama_dir)
    plan = make_method_plan(ckpt, dummy_method, 2)
    assert plan.method == dummy_method and plan.linearized == [1, 2]
    assert all(lp.alpha == 0.5 for lp in plan.layers if lp.action is LayerAction.LINEARIZE)

    out = tmp_path / "p.json"
    result = CliRunner().invoke(
        app, ["plan", str(tiny_llama_dir), "--drop", "1", "-m", dummy_method, "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert Plan.load(out).linearized == [1]
    bad = CliRunner().invoke(app, ["plan", str(tiny_llama_dir), "--drop", "1", "-m", "nope", "-o", str(out)])
    assert bad.exit_code == 2 and "unknown method 'nope'" in bad.output and dummy_method in bad.output

    assert MethodEntry(name=dummy_method).name == dummy_method


def test_method_registry_refuses_a_second_entry_of_a_name():
    with pytest.raises(GatenormError, match="registered twice"):
        register_method("gate-norm", label="x", summary="x", actions={LayerAction.DROP_ATTENTION})(
            lambda *a: None
        )
    assert METHODS["gate-norm"].score_only
