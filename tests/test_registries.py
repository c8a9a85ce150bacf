"""Each kind of extension is one registry entry: a dummy method, export target and runtime added through
the registries alone reach every caller (CLI, recipes, study, validation)."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gatenorm.errors import GatenormError
from gatenorm.methods import METHODS, MethodOptions, Ranking, make_method_plan, register_method
from gatenorm.methods.spec import unregister_method
from gatenorm.plan import LayerAction, Plan
from gatenorm.readers import Checkpoint
from gatenorm.recipes import schema as recipe_schema  # imported before the dummies are registered
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


def test_dummy_method_reaches_planning_cli_recipes_and_study(dummy_method, tiny_llama_dir, tmp_path):
    from gatenorm.cli import app
    from gatenorm.readers import open_checkpoint
    from gatenorm.recipes.schema import MethodEntry
    from gatenorm.study.common import study_methods
    from gatenorm.study.report import method_label

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
    assert dummy_method in study_methods() and "gate-norm-head" not in study_methods()
    assert method_label(dummy_method) == "dummy (shallowest first)"


def test_method_registry_refuses_a_second_entry_of_a_name():
    with pytest.raises(GatenormError, match="registered twice"):
        register_method("gate-norm", label="x", summary="x", actions={LayerAction.DROP_ATTENTION})(
            lambda *a: None
        )
    assert METHODS["gate-norm"].score_only


class _UniformRuntime:
    """A dummy runtime: uniform logits over a vocabulary, for files ending in ``.uniform`` (its one file:
    here; it implements the `Runtime` protocol and the three class-level declarations)."""

    name = "uniform"
    applies_plans = False

    @classmethod
    def claim(cls, path, plan):
        from gatenorm.validate.runtimes.base import DEFAULT, NO

        return DEFAULT if path.suffix == ".uniform" and plan is None else NO

    @classmethod
    def refusal(cls, path):
        return None if path.is_file() else f"uniform: no such file {path}"

    def __init__(self, path, threads=2, **_):
        self.path = path
        self.vocab_size = int(path.read_text())
        self.bos_id = None

    def tokenize(self, text):
        return [ord(c) % self.vocab_size for c in text]

    def window_logits(self, windows, first):
        import numpy as np

        for _row in windows:
            yield np.zeros((windows.shape[1] - 1 - first, self.vocab_size), dtype=np.float32)

    def loglikelihoods(self, requests):
        import math

        return [(-len(cont) * math.log(self.vocab_size), False) for _ctx, cont in requests]

    def generate(self, prompt, n_new):
        from gatenorm.validate.runtimes import Timing

        return Timing(0.0, 0.0, n_new)

    def close(self):
        pass


@pytest.fixture
def uniform_runtime():
    from gatenorm.validate.runtimes import register_runtime
    from gatenorm.validate.runtimes.base import unregister_runtime

    yield register_runtime(_UniformRuntime)
    unregister_runtime("uniform")


def test_dummy_runtime_is_detected_and_validated(uniform_runtime, tmp_path):
    import math

    from gatenorm.models import tiny
    from gatenorm.validate.gates import Gates
    from gatenorm.validate.run import Settings, validate
    from gatenorm.validate.runtimes import Runtime, detect_runtime, model_spec, open_runtime

    ref = model_spec(str(tiny()))
    vocab = open_runtime(ref).vocab_size
    path = tmp_path / "model.uniform"
    path.write_text(str(vocab))
    assert detect_runtime(path) == "uniform" and detect_runtime(tiny()) == "llama.cpp"
    spec = model_spec(str(path))
    assert spec.runtime == "uniform" and isinstance(open_runtime(spec), Runtime)
    with pytest.raises(GatenormError, match="plan can only be applied in the torch runtime, not uniform"):
        model_spec(str(path), "uniform", tmp_path / "model.uniform")
    report = validate(ref, spec, Settings(ctx=16, max_tokens=64, tasks=[], bench=None), Gates())
    assert report.candidate.runtime == "uniform"
    assert math.isclose(report.agreement.ppl_cand, vocab, rel_tol=1e-4)
    assert "min_top1" in report.failed_gates  # uniform logits: argmax is token 0


@pytest.fixture
def planjson_target():
    """A dummy export target writing the plan JSON as the artifact (its one file: here)."""
    with planjson():
        yield "planjson"


@contextlib.contextmanager
def planjson():
    """Register the dummy ``planjson`` target for the block."""
    from pydantic import BaseModel

    from exporters.targets import ExportTarget, register_target, unregister_target
    from gatenorm.io import atomic_write_text

    class PlanJsonExports(BaseModel):
        indent: list[int] = [2]

    def write(ckpt, plan, out, quant, before_commit, **options):
        before_commit()
        atomic_write_text(out, plan.to_json() if quant == "pretty" else plan.model_dump_json())
        return out

    def parse(quant: str) -> str:
        if quant not in ("keep", "pretty"):
            raise GatenormError(f"--quant {quant!r}: planjson takes keep or pretty")
        return quant

    register_target(
        ExportTarget(
            name="planjson",
            export=write,
            parse_quant=parse,
            actions=lambda arch: (
                {LayerAction.KEEP, LayerAction.DROP_ATTENTION},
                "plans only drop attention",
            ),
            options=PlanJsonExports,
            variants=lambda o: [("pretty" if i else "keep", {}) for i in o.indent],
            artifact=lambda name: f"{name}.plan.json",
            runtimes=lambda _gguf: ("torch", "torch"),
            usage=lambda artifact: f"`Plan.load('{artifact}')`",
            quant_help="keep, pretty",
            card_front_matter=("library_name: gatenorm",),
        )
    )
    try:
        yield
    finally:
        unregister_target("planjson")


def _variant(plan: Plan, target: str, quant: str):
    """A recipe variant ``v`` of the tiny model with `plan`, exported to `target`, not validated."""
    from gatenorm.models import tiny
    from gatenorm.recipes.batch import ExportSpec, Variant

    export = ExportSpec(target=target, quant=quant)
    return Variant(
        name="v",
        model="tiny",
        source_path=str(tiny()),
        source_sha256="0" * 64,
        method="gate-norm",
        budget=1,
        plan=plan.to_json(),
        export=export,
        key="k",
        validation=None,
    )


def test_dummy_export_target_reaches_export_cli_and_cards(planjson_target, tmp_path):
    from exporters.export import export
    from gatenorm.cli import app
    from gatenorm.models import tiny
    from gatenorm.readers import open_checkpoint
    from gatenorm.recipes.card import model_card

    ckpt = open_checkpoint(tiny())
    plan = make_method_plan(ckpt, "gate-norm", 1)
    out = export(tiny(), plan, tmp_path / "p.json", "planjson", "pretty")
    assert Plan.from_json(out.read_text()) == plan
    linear = make_method_plan(ckpt, "harp-free", 1)
    with pytest.raises(GatenormError, match=r"planjson exporter \(llama: plans only drop attention\) cannot"):
        export(tiny(), linear, tmp_path / "l.json", "planjson")

    result = CliRunner().invoke(
        app, ["export", str(tiny()), "--drop", "1", "--to", "planjson", "-o", str(tmp_path / "c.json")]
    )
    assert result.exit_code == 0, result.output
    assert Plan.from_json((tmp_path / "c.json").read_text()).dropped == plan.dropped
    bad = CliRunner().invoke(app, ["export", str(tiny()), "--drop", "1", "--to", "nope", "-o", "x"])
    assert bad.exit_code == 2 and "planjson" in bad.output

    variant = _variant(plan, "planjson", "pretty")
    assert variant.artifact == "v/v.plan.json"
    card = model_card(variant, None)
    assert "`Plan.load('v.plan.json')`" in card and "library_name: gatenorm" in card


def test_builtin_targets_refuse_through_plan_require(monkeypatch):
    """Plan.require can fail: the targets ask the adapter (qwen3 in GGUF: no linearize, since deci has no
    per-head q/k norm and the qwen35 host, which runs its drop-attention, has no linear map)."""
    from exporters.targets import TARGETS
    from gatenorm.architectures import get_architecture
    from gatenorm.models import tiny
    from gatenorm.readers import open_checkpoint

    qwen3, llama, gemma2 = (get_architecture(a) for a in ("qwen3", "llama", "gemma2"))
    assert TARGETS["gguf"].actions(qwen3)[0] == set(LayerAction) - {LayerAction.LINEARIZE}
    assert TARGETS["gguf"].actions(gemma2)[0] == {LayerAction.KEEP, LayerAction.DROP_BLOCK}
    assert TARGETS["gguf"].actions(llama)[0] == set(LayerAction)
    assert TARGETS["onnx"].actions(get_architecture("phi3"))[0] == set(LayerAction)
    from exporters.onnx.families import Phi3Onnx

    monkeypatch.setattr(Phi3Onnx, "refusal", "not checked")
    assert TARGETS["onnx"].actions(get_architecture("phi3")) == (set(), "not checked")
    plan = make_method_plan(open_checkpoint(tiny()), "gate-norm", 1)
    with pytest.raises(GatenormError, match="cannot apply plan action"):
        TARGETS["gguf"].require(gemma2, plan)


@pytest.fixture
def dummy_gguf_family():
    """A family (an adapter subclassing llama's) with a GGUF spec, both registered for one test (their one
    file: here): deci cannot run it, its own architecture runs block removal, and the HF -> GGUF writer
    adds one key of its own."""
    import gguf

    from exporters.gguf.families import LlamaGguf, register_gguf_family, unregister_gguf_family
    from gatenorm.architectures import Llama, register, unregister

    @register()
    class DummyFamily(Llama):
        name = "dummy-family"

    @register_gguf_family(DummyFamily.name)
    class DummyGguf(LlamaGguf):
        deci_exportable = False
        deci_refusal = "the dummy family has no deci form"
        block_removal = True
        works = "drop-block plans as a llama GGUF"

        def hf_metadata(self, ckpt) -> dict[str, tuple]:
            return {"dummy_marker": (7, gguf.GGUFValueType.UINT32, None)}

    try:
        yield DummyFamily
    finally:
        unregister_gguf_family(DummyFamily.name)
        unregister(DummyFamily.name)


def test_dummy_gguf_family_spec_reaches_target_checks_and_writer(dummy_gguf_family, tokenizer_dir, tmp_path):
    import gguf

    from exporters.export import export_gguf
    from exporters.gguf.families import LlamaGguf, gguf_family
    from exporters.targets import TARGETS
    from gatenorm.readers import open_checkpoint
    from tests.conftest import mixed_plan, tiny_hf

    refusal = "the dummy family has no deci form"
    assert TARGETS["gguf"].actions(dummy_gguf_family) == ({LayerAction.KEEP, LayerAction.DROP_BLOCK}, refusal)
    ckpt = open_checkpoint(tiny_hf(tmp_path / "m", tokenizer_dir, "llama"))
    ckpt.arch = dummy_gguf_family  # a checkpoint of the dummy family
    dropped = mixed_plan(ckpt, {1: LayerAction.DROP_ATTENTION}, {})
    match = f"cannot export dummy-family with drop-attention to GGUF: {refusal}; what works: drop-block plans"
    with pytest.raises(GatenormError, match=match):
        export_gguf(ckpt, dropped, tmp_path / "no.gguf")
    assert not (tmp_path / "no.gguf").exists()

    out = export_gguf(ckpt, mixed_plan(ckpt, {}, {}), tmp_path / "same.gguf", "F32")
    fields = gguf.GGUFReader(out).fields
    assert fields["general.architecture"].contents() == "llama"  # the adapter's gguf_arch
    assert fields["llama.dummy_marker"].contents() == 7  # the spec's key, written by the HF -> GGUF writer

    from exporters.gguf.families import unregister_gguf_family

    unregister_gguf_family(dummy_gguf_family.name)  # without its spec: llama's (the nearest ancestor's)
    assert type(gguf_family(dummy_gguf_family)) is LlamaGguf
    assert TARGETS["gguf"].actions(dummy_gguf_family) == (set(LayerAction), "")


def test_gguf_family_registry_refuses_a_second_entry_of_a_name():
    from exporters.gguf.families import GgufFamily, register_gguf_family

    with pytest.raises(GatenormError, match="registered twice"):
        register_gguf_family("llama")(type("Again", (GgufFamily,), {}))


def test_recipe_schema_reads_the_registries_when_a_recipe_is_validated(tmp_path):
    """A target and a method registered after the schema was imported are accepted by the next recipe,
    with nothing rebuilt by hand; once unregistered they are refused again."""
    from gatenorm.recipes.loader import parse_recipe

    text = "models: [tiny]\nmethods: [dummy-first]\nbudgets: [1]\nexports: {planjson: {indent: [2, 0]}}\n"
    path = tmp_path / "r.yaml"
    assert "planjson" not in recipe_schema.exports_model().model_fields
    with pytest.raises(GatenormError, match="planjson"):
        parse_recipe(text, path)
    method = register_method("dummy-first", label="d", summary="d", actions={LayerAction.DROP_ATTENTION})(
        lambda ckpt, options, _needed: None
    )
    assert METHODS["dummy-first"].rank is method
    try:
        with pytest.raises(GatenormError, match="planjson"):  # the method is known now, the target not yet
            parse_recipe(text, path)
        with planjson():
            recipe = parse_recipe(text, path)
            assert [m.name for m in recipe.methods] == ["dummy-first"]
            assert recipe.exports.planjson.indent == [2, 0] and recipe.exports.gguf is None
            assert isinstance(recipe, recipe_schema.Recipe)
    finally:
        unregister_method("dummy-first")
    with pytest.raises(GatenormError, match="unknown method 'dummy-first'"):
        parse_recipe(text.replace("planjson: {indent: [2, 0]}", "gguf: {quants: [Q8_0]}"), path)


def test_export_cli_flags_are_generated_from_the_targets_options(tmp_path, monkeypatch, capsys):
    """Every exporter option a target declares (`ExportTarget.flags`) is a ``gatenorm export`` flag with
    the option's description as help; one the chosen target does not take is one line, exit 2."""
    import re

    from exporters.targets import TARGETS, export_flags_model
    from gatenorm.cli import app, main
    from gatenorm.models import tiny

    declared = {
        (name, field): info.description
        for name, target in TARGETS.items()
        if target.flags is not None
        for field, info in target.flags.model_fields.items()
    }
    assert ("onnx", "block_size") in declared and ("onnx", "mobile") in declared
    assert set(export_flags_model().model_fields) == {field for _, field in declared}
    result = CliRunner().invoke(app, ["export", "--help"], env={"COLUMNS": "400", "NO_COLOR": "1"})
    assert result.exit_code == 0
    text = re.sub(r"\s+", " ", result.output)
    for (name, field), description in declared.items():
        flag = f"--{field.replace('_', '-')}"
        help_ = re.escape(f"{name}: {description.rstrip('.')}")
        assert re.search(rf"{flag} .*{help_}", text), flag
    assert "--no-mobile" not in text and "--no-overwrite" not in text

    out = tmp_path / "t.gguf"
    monkeypatch.setattr(
        sys, "argv", ["gatenorm", "export", str(tiny()), "-n", "1", "--block-size", "32", "-o", str(out)]
    )
    with pytest.raises(SystemExit) as exit_info:
        main()
    stderr = capsys.readouterr().err
    assert (
        exit_info.value.code == 2 and stderr == "gatenorm: error: --block-size applies to --to onnx only\n"
    ), stderr
    assert not out.exists()


@pytest.fixture
def dummy_metric():
    """A metric of the output agreement, the mean change of the target token's probability, registered for
    one test (its one file: here): gated (``min_mean_dp``), a recipe's target budget, with a REPORT.md column
    and a card row."""
    from gatenorm.validate.metrics import Metric, register_metric, unregister_metric

    register_metric(
        Metric(
            "mean_dp",
            "mean Δp",
            "agreement",
            lambda a: a.mean_dp,
            "higher",
            unit="fraction",
            gate=True,
            gate_help="Gate: mean change of the target's probability at least.",
            target={"ge": -1, "le": 1},
            column="mean Δp",
            fmt="+.5f",
            card=lambda a: ("mean change of the target's probability", f"{a.mean_dp:+.5f}"),
        )
    )
    yield "mean_dp"
    unregister_metric("mean_dp")


def test_dummy_metric_reaches_gates_flags_recipes_report_and_card(dummy_metric, tmp_path):
    import json

    import typer

    from gatenorm.models import tiny
    from gatenorm.readers import open_checkpoint
    from gatenorm.recipes.batch import BatchPlan
    from gatenorm.recipes.build import read_report
    from gatenorm.recipes.card import model_card
    from gatenorm.recipes.loader import parse_recipe
    from gatenorm.recipes.report import write_report
    from gatenorm.validate.command import validate_command
    from gatenorm.validate.metrics import gates_model

    assert gates_model().model_fields["min_mean_dp"].default is None  # declared without a default limit
    app = typer.Typer()
    app.command()(validate_command())
    help_ = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "400", "NO_COLOR": "1"}).output
    assert "--min-mean-dp" in help_ and "Gate: mean change of the target's probability at least." in help_

    folder = tmp_path / "v"
    report_json = folder / "validation.json"
    args = [str(tiny()), str(tiny()), "--ctx", "16", "--max-tokens", "64", "--tasks", "none"]
    result = CliRunner().invoke(app, [*args, "--min-mean-dp", "0.5", "--json", str(report_json)])
    assert result.exit_code == 1, result.output  # the same model: mean Δp is 0, below the limit 0.5
    stored = json.loads(report_json.read_text())
    assert stored["failed_gates"] == ["min_mean_dp"]
    assert "min_mean_dp: mean Δp = 0 (limit >= 0.5) FAILED" in stored["gate_lines"]

    text = "models: [tiny]\nbudgets: [1]\nexports: {gguf: {quants: [Q8_0]}}\n"
    text += "validation: {gates: {min_mean_dp: 0.1}}\n"
    assert parse_recipe(text, tmp_path / "r.yaml").validation.gates.min_mean_dp == 0.1
    searched = parse_recipe(text.replace("[1]", "[{min_mean_dp: -0.01}]"), tmp_path / "r.yaml").budgets[0]
    assert searched.metric.name == "mean_dp" and searched.label == "min_mean_dp=-0.01"
    assert searched.metric.holds(0.0, searched.value) and not searched.metric.holds(-0.02, searched.value)

    plan = make_method_plan(open_checkpoint(tiny()), "gate-norm", 1)
    variant = _variant(plan, "gguf", "Q8_0")
    rows = write_report(BatchPlan(recipe_name="r", variants=[variant], budgets={}), tmp_path, {}, Path("r"))
    assert rows["v"]["mean_dp"] == 0.0
    table = (tmp_path / "REPORT.md").read_text()
    assert "| top-1 % | zero-shot % | mean Δp | pp tok/s |" in table and "| +0.00000 |" in table
    card = model_card(variant, read_report(folder))
    assert "| mean change of the target's probability | +0.00000 |" in card


def test_builtin_gates_follow_the_metrics_directions():
    """A gate is a maximum or a minimum as its metric declares, whatever its name."""
    from gatenorm.validate.gates import Gates
    from gatenorm.validate.metrics import METRICS, gated

    assert list(Gates.model_fields) == [
        "max_kld",
        "min_top1",
        "max_ppl_ratio",
        "max_acc_drop",
        "min_retrieval",
    ]
    assert [m.bound for m in gated()] == ["max", "min", "max", "max", "min"]
    assert METRICS["kld"].holds(0.1, 0.2) and not METRICS["top1"].holds(0.1, 0.2)
