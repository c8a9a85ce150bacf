"""`--heal` on `plan` / `export` / recipes: the CLI writes a healed plan and its weights, the repairs lower
the KLD of the plan on wiki text, speedup budgets count the repairs, validate applies a healed plan, recipe
entries heal their variants, and bad input is one line with exit 2."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gatenorm.errors import GatenormError
from gatenorm.heal.forms import mapped_layers
from gatenorm.heal.store import load_refits, load_repairs, unhealed, weights_path_for
from gatenorm.methods import MethodOptions, make_method_plan, rank_layers
from gatenorm.methods.cost import cost_model
from gatenorm.methods.registry import chosen_layers
from gatenorm.plan import LayerAction, Plan
from gatenorm.readers import open_checkpoint

HEAL = ("--heal", "--heal-samples", "4", "--heal-len", "64")


def gatenorm(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gatenorm.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def healed_smollm2(tmp_path_factory):
    """`gatenorm plan smollm2 --budget-speedup 1.05 --heal` (Gate-Norm, 4 x 64 synthetic tokens)."""
    out = tmp_path_factory.mktemp("heal-cli") / "healed.json"
    r = gatenorm("plan", "smollm2", "-o", out, "--budget-speedup", "1.05", "--ctx", "256", *HEAL)
    assert r.returncode == 0, r.stderr
    return out, r.stdout


def test_plan_heal_writes_the_plan_and_its_weights(healed_smollm2, smollm2_scored):
    out, stdout = healed_smollm2
    weights = weights_path_for(out)
    assert weights.is_file() and weights.name == "healed.repairs.safetensors"
    plan = Plan.load(out)
    assert plan.healing is not None and plan.healing.calib == "synthetic"
    assert plan.healing.generator.startswith("llama.cpp (llama-cpp-python ")
    assert (plan.healing.samples, plan.healing.length) == (4, 64)
    actions = [lp.action for lp in plan.layers]
    assert plan.healing.form == "fold" and set(plan.repaired) == mapped_layers(actions, "fold")
    assert (plan.healing.drift, plan.healing.rms_power) == (0.5, 1.0)  # the fold settings recorded
    for i in set(plan.changed) - set(plan.repaired):  # folded into the closest MLP below
        below = max(j for j in range(i) if actions[j] is not LayerAction.DROP_BLOCK)
        assert below in plan.refitted, (i, below)
    assert set(load_repairs(plan)) == set(plan.repaired)  # hashes match the file
    assert set(load_refits(plan)) == set(plan.refitted)
    assert json.loads(out.read_text())["healing"]["weights"] == weights.name  # relative: they move together
    assert "healed" in stdout and "repairs counted" in stdout and "repairs (fold) fitted in" in stdout
    # the speedup budget counts the repairs: the printed estimate reaches it, with at least as many layers
    printed = float(re.search(r"estimated speedup ([0-9.]+)", stdout.replace("\n", " ")).group(1))
    ckpt, _ = smollm2_scored
    assert printed >= 1.05
    assert cost_model(ckpt, 256).plan_speedup(plan) == pytest.approx(printed, abs=1e-3)
    plain = make_method_plan(ckpt, "gate-norm", speedup=1.05, options=MethodOptions(ctx=256))
    assert len(plan.changed) >= len(plain.changed)
    plain_speedup = cost_model(ckpt, 256).plan_speedup(unhealed(plan))
    if plan.repaired:
        assert plain_speedup > printed  # the fitted maps cost something
    else:
        assert plain_speedup == cost_model(ckpt, 256).plan_speedup(plan)  # the folds cost nothing


def test_healed_plan_has_lower_kld_on_wiki_text(healed_smollm2):
    from gatenorm.apply import apply_plan
    from gatenorm.validate.agreement import compare_logits
    from gatenorm.validate.runtimes.pytorch import TorchRuntime
    from gatenorm.validate.text import token_windows

    plan = Plan.load(healed_smollm2[0])
    ref = TorchRuntime(plan.source.path, threads=1)
    windows = token_windows("wiki", ref.tokenize, 128, 512, ref.bos_id)  # disjoint from the synthetic text
    ref_logits = list(ref.window_logits(windows, 64))
    kld = {}
    for name, p in (("healed", plan), ("plain", unhealed(plan))):
        cand = copy.copy(ref)
        cand.model = apply_plan(copy.deepcopy(ref.model), p)
        kld[name] = compare_logits(ref_logits, cand.window_logits(windows, 64), windows, 64).kld_mean
    assert kld["healed"] < kld["plain"], kld


@pytest.mark.slow  # two validate runs on SmolLM2: about 2 minutes
def test_validate_applies_a_healed_candidate_plan(healed_smollm2, tmp_path):
    out = tmp_path / "report.json"
    args = ("--runtime", "torch", "--ctx", "64", "--max-tokens", "128", "--tasks", "none", "--json", out)
    r = gatenorm("validate", "smollm2", "smollm2", "--candidate-plan", healed_smollm2[0], *args)
    assert r.returncode in (0, 1), r.stderr
    report = json.loads(out.read_text())
    assert report["agreement"]["kld_mean"] > 0  # the candidate is the healed, pruned model
    moved = tmp_path / "moved.json"  # weights missing: one line, exit 2
    shutil.copy(healed_smollm2[0], moved)
    r = gatenorm("validate", "smollm2", "smollm2", "--candidate-plan", moved, *args)
    errors = [line for line in r.stderr.splitlines() if line.startswith("gatenorm: error:")]
    assert r.returncode == 2 and len(errors) == 1 and "missing" in errors[0], r.stderr  # after the labels


def test_budget_speedup_with_heal_counts_every_repair(smollm2_scored):
    ckpt, _ = smollm2_scored
    ranking = rank_layers(ckpt, "mixed", MethodOptions(ctx=256))  # weights only: drops, blocks, linearizes
    model = cost_model(ckpt, 256)
    for target in (1.05, 1.1, 1.2):
        plain = chosen_layers(ckpt, ranking, None, target, 256)
        # folds are free: only layers with no MLP below would get a map, and these plans have none
        assert chosen_layers(ckpt, ranking, None, target, 256, heal="fold") == plain
        healed = chosen_layers(ckpt, ranking, None, target, 256, heal="linear")
        assert len(healed) >= len(plain)
        n = ckpt.shape.n_layers
        actions = [ranking.actions[i] if i in healed else LayerAction.KEEP for i in range(n)]
        assert model.speedup(actions, set(healed)) >= target
        fewer = [ranking.actions[i] if i in healed[:-1] else LayerAction.KEEP for i in range(n)]
        assert model.speedup(fewer, set(healed[:-1])) < target  # the fewest layers that reach it
    with pytest.raises(GatenormError, match=r"healed \(linear\) reaches at most"):
        chosen_layers(ckpt, ranking, None, 50.0, 256, heal="linear")


@pytest.mark.parametrize(
    "case",
    [
        ("plan", "tiny", "-o", "{tmp}/p.json", "--drop", "0", "--heal"),
        ("plan", "tiny", "-o", "{tmp}/p.json", "--drop", "1", "--heal-samples", "4"),
        ("plan", "tiny", "-o", "{tmp}/p.json", "--drop", "1", "--heal", "--heal-samples", "0"),
        ("plan", "tiny", "-o", "{tmp}/p.json", "--drop", "1", "--heal", "--calib", "{tmp}/none.txt"),
        ("export", "tiny", "-o", "{tmp}/x.gguf", "--plan", "{tmp}/given.json", "--heal"),
        ("export", "tiny", "-o", "{tmp}/x.gguf", "--plan", "{tmp}/healed-moved.json"),
        ("plan", "{tmp}/deci.gguf", "-o", "{tmp}/p.json", "--drop", "1", "--heal"),
    ],
)
def test_bad_heal_input_is_one_line_exit_2(tmp_path, healed_tiny, case):
    plain, healed, deci = healed_tiny
    shutil.copy(plain, tmp_path / "given.json")
    shutil.copy(healed, tmp_path / "healed-moved.json")  # without its weights file
    shutil.copy(deci, tmp_path / "deci.gguf")
    r = gatenorm(*(a.format(tmp=tmp_path) for a in case))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("gatenorm: error:"), r.stderr
    assert not (tmp_path / "p.json").exists() and not (tmp_path / "x.gguf").exists()


@pytest.fixture(scope="module")
def healed_tiny(tmp_path_factory):
    """(an unhealed tiny plan, a healed one made by the library with its weights beside it, a deci GGUF)."""
    from gatenorm.heal.fit import HealSettings, heal_plan
    from gatenorm.models import tiny

    root = tmp_path_factory.mktemp("heal-tiny")
    ckpt = open_checkpoint(tiny())
    plain = make_method_plan(ckpt, "gate-norm", budget=1)
    plain.save(root / "plain.json")
    healed = heal_plan(
        ckpt.path, plain, HealSettings(samples=2, length=16), weights_path_for(root / "h.json")
    )
    healed.save(root / "h.json")
    r = gatenorm("export", "tiny", "-o", root / "deci.gguf", "--plan", root / "plain.json")
    assert r.returncode == 0, r.stderr
    assert open_checkpoint(root / "deci.gguf").fixed_layers
    return root / "plain.json", root / "h.json", root / "deci.gguf"


def test_export_heal_hands_the_exporter_a_healed_plan_with_its_weights(tmp_path, monkeypatch):
    """`export --drop N --heal` fits the repairs into a temporary folder that lives while the exporter runs
    (the exporters' embedding of repairs is tested with them)."""
    from typer.testing import CliRunner

    import gatenorm.cli as cli

    seen = {}

    def fake_export(ckpt, plan, output, to, quant, check_source=True, **options):
        seen["plan"] = plan
        seen["refits"] = load_refits(plan)  # the weights are there while the export runs
        Path(output).write_bytes(b"exported")
        return Path(output)

    monkeypatch.setattr(cli, "run_export", fake_export)
    out = tmp_path / "x.gguf"
    args = [
        "export",
        "tiny",
        "-o",
        str(out),
        "--drop",
        "1",
        "--heal",
        "--heal-samples",
        "2",
        "--heal-len",
        "16",
    ]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    plan = seen["plan"]
    assert plan.changed == [1] and plan.refitted == [0] and set(seen["refits"]) == {0}  # folded below
    assert not Path(plan.healing.weights).exists()  # the temporary folder is gone after the export
    assert "refitted down projections of layers [0] in" in result.output


RECIPE = """\
name: heal-batch
models: [tiny]
methods:
  - gate-norm
  - name: gate-norm
    heal: {heal}
budgets: [0, 1]
exports:
  gguf:
    quants: [Q8_0]
validation:
  enabled: false
"""


def test_recipe_heal_entries_keys_and_dry_run(tmp_path):
    from gatenorm.recipes.batch import _method_labels, plans_key
    from gatenorm.recipes.loader import load_recipe
    from gatenorm.recipes.sources import resolve_source

    (tmp_path / "a.yaml").write_text(RECIPE.format(heal="true"))
    (tmp_path / "b.yaml").write_text(RECIPE.format(heal="{samples: 4, length: 16}"))
    (tmp_path / "c.yaml").write_text(RECIPE.format(heal="{samples: 4, bogus: 1}"))
    a, b = load_recipe(tmp_path / "a.yaml")[0], load_recipe(tmp_path / "b.yaml")[0]
    assert a.methods[1].heal_settings.samples == 32 and b.methods[1].heal_settings.samples == 4
    assert a.methods[0].heal_settings is None
    assert _method_labels(a.methods) == ["gate-norm", "gate-norm-healed"]
    with pytest.raises(GatenormError, match="bogus"):
        load_recipe(tmp_path / "c.yaml")
    source = resolve_source(a.models[0])
    keys = {plans_key(source, m, r) for r in (a, b) for m in r.methods}
    assert len(keys) == 3  # unhealed (same in both), healed with defaults, healed with 4 samples
    r = gatenorm("run", tmp_path / "b.yaml", "-o", tmp_path / "out", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "tiny-gate-norm-healed-d01-gguf-Q8_0" in r.stdout and "tiny-gate-norm-d01-gguf-Q8_0" in r.stdout
    assert "heal + build" in r.stdout
    assert not list((tmp_path / "out").rglob("*.safetensors"))  # a dry run fits nothing


def test_recipe_heals_once_and_reuses_the_weights(tmp_path, monkeypatch):
    """A healed entry's plan is fitted once into the plan cache (its weights by absolute path, beside the
    cached plan) and reused by a rerun; the card and the report name the healed layers."""
    import gatenorm.heal.fit as fit
    from gatenorm.recipes.batch import plan_batch
    from gatenorm.recipes.card import model_card
    from gatenorm.recipes.loader import load_recipe

    recipe = load_recipe(_write(tmp_path / "b.yaml", RECIPE.format(heal="{samples: 2, length: 16}")))[0]
    calls = []
    real = fit.heal_plan
    monkeypatch.setattr(fit, "heal_plan", lambda *a, **k: calls.append(1) or real(*a, **k))
    cache = tmp_path / "plans"
    first = plan_batch(recipe, "heal-batch", cache=cache)
    healed = [v for v in first.variants if v.healed]
    assert [v.name for v in healed] == ["tiny-gate-norm-healed-d01-gguf-Q8_0"] and calls == [1]
    plan = healed[0].load_plan()
    weights = Path(plan.healing.weights)
    assert weights.is_absolute() and weights.parent == cache / "healed"
    assert not load_repairs(plan) and set(load_refits(plan)) == {0}  # layer 1 folded into layer 0's MLP
    unhealed = next(v for v in first.variants if v.method == "gate-norm" and v.budget == 1)
    assert unhealed.key != healed[0].key and not unhealed.healed
    again = plan_batch(recipe, "heal-batch", cache=cache)
    assert calls == [1] and [v.key for v in again.variants] == [v.key for v in first.variants]
    for stored in cache.glob("*.json"):  # the plans' cache gone: the healed plans stay and are reused
        stored.unlink()
    assert [v.key for v in plan_batch(recipe, "heal-batch", cache=cache).variants] == [
        v.key for v in first.variants
    ]
    assert calls == [1]
    card = model_card(healed[0], None)
    assert "down projections of layers [0] are refitted" in card and "text the model generated itself" in card


def test_a_recipe_loads_the_model_and_makes_each_calibration_once(tmp_path, monkeypatch):
    """The plans a run heals on one model share its layer-sequential model (nothing is loaded whole) and,
    per calibration, its windows."""
    import gatenorm.apply as apply
    import gatenorm.heal.fit as fit
    import gatenorm.sequential as sequential
    from gatenorm.recipes.batch import plan_batch
    from gatenorm.recipes.loader import load_recipe

    text = RECIPE.replace(
        "  - gate-norm\n  - name: gate-norm\n    heal: {heal}\n",
        "  - {name: random, heal: {samples: 2, length: 16}}\n"
        "  - {name: last, heal: {samples: 2, length: 16}}\n"
        "  - {name: gate-norm, heal: {samples: 3, length: 16}}\n",
    )
    recipe = load_recipe(_write(tmp_path / "r.yaml", text))[0]
    calls: dict[str, list] = {"heal": [], "load": [], "engine": [], "windows": []}
    for module, name, tag in ((fit, "heal_plan", "heal"), (apply, "load_model", "load")):
        real = getattr(module, name)
        monkeypatch.setattr(
            module, name, lambda *a, real=real, tag=tag, **k: calls[tag].append(1) or real(*a, **k)
        )

    class Counted(sequential.SequentialModel):
        def __init__(self, *args, **kwargs):
            calls["engine"].append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(sequential, "SequentialModel", Counted)
    real_windows = fit.HealSettings.windows
    monkeypatch.setattr(
        fit.HealSettings,
        "windows",
        lambda self, *a: calls["windows"].append(self.samples) or real_windows(self, *a),
    )
    batch = plan_batch(recipe, "shared", cache=tmp_path / "plans")
    assert sum(v.healed for v in batch.variants) == 3
    assert len(calls["heal"]) == 3 and len(calls["engine"]) == 1 and sorted(calls["windows"]) == [2, 3]
    assert not calls["load"]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
