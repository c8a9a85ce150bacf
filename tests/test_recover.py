"""Recovery (`gatenorm.recover`): the distillation lowers its loss, the merged tensors are W + s * B @ A, a
seeded rerun gives the same bytes, a recovered plan runs alike in PyTorch, llama.cpp (GGUF) and ONNX and
through the per-layer reader's overlay, zero steps changes nothing, recipes take ``recover:``, and bad input
is one line with exit 2."""

from __future__ import annotations

import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf_helpers import llama_cpp_logits, torch_logits
from safetensors.torch import load_file

from exporters.export import export, export_gguf
from exporters.gguf import read_gguf_metadata
from exporters.keys import Keys
from gatenorm.apply import apply_plan, load_model
from gatenorm.cli import main
from gatenorm.errors import GatenormError
from gatenorm.heal.fit import HealSettings, heal_plan
from gatenorm.methods.synthetic import sampler_id
from gatenorm.plan import Plan
from gatenorm.readers import open_checkpoint
from gatenorm.recover.lora import LoraLinear
from gatenorm.recover.settings import RecoverySettings
from gatenorm.recover.store import load_overrides, weights_path_for
from gatenorm.recover.train import adapted_layers, recover_plan
from tests.conftest import mixed_plan, tiny_hf
from tests.test_heal_cli import RECIPE as HEAL_RECIPE

#: 6 layers: attention of layer 2 dropped, block 4 dropped; the adjacent kept layers are 1, 3 and 5
ACTIONS = {2: "drop-attention", 4: "drop-block"}
SMALL = dict(samples=4, length=32, batch=2, lr=1e-2)
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer_dir) -> Path:
    root = tmp_path_factory.mktemp("recover")
    return tiny_hf(root / "llama", tokenizer_dir, "llama", num_hidden_layers=6)


@pytest.fixture(scope="module")
def recovered(tiny, tmp_path_factory) -> tuple[Path, Plan, Plan]:
    """(model folder, the healed plan, it healed and recovered), saved and loaded back."""
    root = tmp_path_factory.mktemp("recovered")
    plan = mixed_plan(open_checkpoint(tiny), ACTIONS, {})
    out = root / "plan.json"
    heal = HealSettings(samples=4, length=32)
    model = load_model(tiny)
    windows = heal.windows(tiny)
    healed = heal_plan(tiny, plan, heal, root / "plan.repairs.safetensors", model=model, windows=windows)
    settings = RecoverySettings(steps=12, **SMALL)
    result = recover_plan(tiny, healed, settings, weights_path_for(out), model=model, windows=windows)
    result.save(out)
    return tiny, healed, Plan.load(out)


def test_recovery_lowers_its_loss_and_records_what_it_trained(recovered):
    _, healed, plan = recovered
    r = plan.recovery
    assert (
        r.layers == [1, 3, 5] and r.targets == list(ATTENTION) and (r.rank, r.alpha, r.steps) == (8, 16.0, 12)
    )
    assert r.calib == "synthetic" and (r.samples, r.length) == (4, 32) and r.top_k is None  # 25 MiB in full
    assert r.generator == sampler_id()  # the text is the model's own, sampled by llama.cpp
    assert r.loss < 0.8 * r.initial_loss, (r.initial_loss, r.loss)
    assert sorted(r.tensors) == sorted(
        f"model.layers.{i}.self_attn.{t}.weight" for i in (1, 3, 5) for t in ATTENTION
    )
    assert Path(r.weights).name == "plan.recovered.safetensors" and Path(r.weights).is_absolute()
    assert plan.healing is not None and plan.layers == healed.layers  # recovered after healing
    assert "recovered 12 tensors" in plan.describe()


def test_apply_plan_uses_the_merged_weights(recovered):
    folder, healed, plan = recovered
    model = apply_plan(load_model(folder), plan)
    state = model.state_dict()
    for name, value in load_overrides(plan).items():
        assert torch.equal(state[name], value), name
    ids = list(range(300, 340))
    assert (
        np.abs(torch_logits(model, ids) - torch_logits(apply_plan(load_model(folder), healed), ids)).max()
        > 1e-3
    )


def test_merged_weight_is_base_plus_scaled_product():
    g = torch.Generator().manual_seed(3)
    base = torch.nn.Linear(12, 10, bias=True)
    adapter = LoraLinear(base, rank=4, alpha=6.0, generator=g)
    with torch.no_grad():
        adapter.b.normal_(generator=g)
    expected = base.weight.detach() + 1.5 * (adapter.b.detach() @ adapter.a.detach())
    assert torch.equal(adapter.merged(), expected)
    x = torch.randn(3, 12, generator=g)
    merged = torch.nn.functional.linear(x, adapter.merged(), base.bias)
    assert torch.allclose(adapter(x), merged, atol=1e-5)
    assert adapter.changed() and not LoraLinear(base, 4, 6.0, g).changed()  # B starts at zero


def test_seeded_reruns_are_identical(tiny, tmp_path):
    plan = mixed_plan(open_checkpoint(tiny), ACTIONS, {})
    model = load_model(tiny)
    windows = np.random.default_rng(0).integers(0, 49152, size=(4, 24))
    runs = [
        recover_plan(
            tiny,
            plan,
            RecoverySettings(steps=3, seed=seed, **SMALL),
            tmp_path / f"{i}.safetensors",
            model=model,
            windows=windows,
        )
        for i, seed in enumerate((0, 0, 1))
    ]
    assert runs[0].recovery.tensors == runs[1].recovery.tensors
    first, second = (load_file(tmp_path / f"{i}.safetensors") for i in (0, 1))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert runs[0].recovery.tensors != runs[2].recovery.tensors


def test_top_k_teacher_cache_when_the_full_one_is_too_big(tiny, tmp_path):
    """Over --recover-cache-mb the teacher is kept as its top-k tokens plus the rest: training learns."""
    plan = mixed_plan(open_checkpoint(tiny), ACTIONS, {})
    windows = np.random.default_rng(0).integers(0, 49152, size=(4, 24))
    settings = RecoverySettings(steps=8, cache_mb=1, top_k=16, **SMALL)
    result = recover_plan(tiny, plan, settings, tmp_path / "r.safetensors", windows=windows)
    assert result.recovery.top_k == 16 and result.recovery.loss < 0.9 * result.recovery.initial_loss


def test_adapted_layers_by_setting(tiny):
    plan = mixed_plan(open_checkpoint(tiny), ACTIONS, {})
    assert adapted_layers(plan, RecoverySettings()) == [1, 3, 5]
    assert adapted_layers(plan, RecoverySettings(layers="kept")) == [0, 1, 3, 5]
    assert adapted_layers(plan, RecoverySettings(layers="3,0")) == [0, 3]
    with pytest.raises(GatenormError, match=r"layers \[2\] are not kept"):
        adapted_layers(plan, RecoverySettings(layers="2"))


def test_recovered_gguf_matches_pytorch_in_llama_cpp(recovered, tmp_path):
    folder, healed, plan = recovered
    out = export_gguf(folder, plan, tmp_path / "recovered.gguf", quant="F32")
    tokens = list(range(300, 364))
    reference = torch_logits(apply_plan(load_model(folder), plan), tokens)
    got = llama_cpp_logits(out, tokens, f32_cache=True)
    delta = float(np.abs(reference - got).max())
    print(f"tiny llama healed + recovered GGUF F32: max|dlogit| {delta:.2e}")
    assert delta < 2e-3, delta
    plain = torch_logits(apply_plan(load_model(folder), healed), tokens)
    assert float(np.abs(plain - got).max()) > 10 * delta  # the export runs the merged weights
    changed = read_gguf_metadata(out)[Keys.CHANGED_TENSORS]
    assert {"blk.1.attn_q.weight", "blk.1.attn_v.weight", "blk.4.attn_output.weight"} <= set(changed)


def test_recovered_gguf_quantized_keeps_the_merged_tensors_at_q8(recovered, tmp_path):
    """At Q4_0 the merged tensors are written at Q8_0 or better (the heal rules); the rest at Q4_0."""
    folder, _, plan = recovered
    out = export_gguf(folder, plan, tmp_path / "recovered-q4.gguf", quant="Q4_0")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(out).tensors}
    Q = gguf.GGMLQuantizationType
    assert types["blk.1.attn_v.weight"] in (Q.Q8_0, Q.F16, Q.F32), types["blk.1.attn_v.weight"]
    assert types["blk.0.attn_v.weight"] == Q.Q4_0


def test_recovered_onnx_matches_pytorch(recovered, tmp_path):
    from exporters.onnx.runner import OnnxRunner

    folder, _, plan = recovered
    out = export(folder, plan, tmp_path / "onnx", "onnx")
    ids = list(range(5, 37))
    reference = torch_logits(apply_plan(load_model(folder), plan), ids)
    delta = float(np.abs(reference - OnnxRunner(out).logits(np.array([ids]))[0]).max())
    print(f"tiny llama healed + recovered ONNX fp32: max|dlogit| {delta:.2e}")
    assert delta < 1e-4, delta


def test_checkpoint_tensors_overlay_the_merged_weights(recovered):
    from gatenorm.sequential.model import SequentialModel
    from gatenorm.sequential.weights import CheckpointTensors

    folder, healed, plan = recovered
    skeleton = SequentialModel(folder).skeleton
    ckpt = open_checkpoint(folder)
    overlay, plain = CheckpointTensors(ckpt, skeleton, plan), CheckpointTensors(ckpt, skeleton, healed)
    for name, value in load_overrides(plan).items():
        assert torch.equal(overlay.read(name), value) and not torch.equal(plain.read(name), value)
    name = "model.layers.0.self_attn.o_proj.weight"
    assert torch.equal(overlay.read(name), plain.read(name))


# --- CLI ------------------------------------------------------------------------------------------------


def _cli(monkeypatch, capsys, *args) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["gatenorm", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code or 0, capsys.readouterr().err


RECOVER = ("--recover", "--recover-samples", "2", "--recover-len", "16")


def test_zero_steps_export_is_byte_identical(tiny, tmp_path, monkeypatch, capsys):
    plain, zero = tmp_path / "plain.gguf", tmp_path / "zero.gguf"
    base = ("export", tiny, "--drop", "1", "--quant", "F32")
    assert _cli(monkeypatch, capsys, *base, "-o", plain)[0] == 0
    assert _cli(monkeypatch, capsys, *base, "-o", zero, *RECOVER, "--recover-steps", "0")[0] == 0
    assert plain.read_bytes() == zero.read_bytes()


def test_plan_recover_writes_the_plan_and_its_weights(tiny, tmp_path, monkeypatch, capsys):
    out = tmp_path / "plan.json"
    monkeypatch.setattr(
        sys,
        "argv",
        ["gatenorm", "plan", str(tiny), "--drop", "1", "-o", str(out), *RECOVER, "--recover-steps", "3"],
    )
    with pytest.raises(SystemExit) as exit_info:
        main()
    printed = capsys.readouterr()
    assert not exit_info.value.code, printed.err
    assert "recovery: rank 8 adapters on q_proj, k_proj, v_proj, o_proj" in printed.out
    plan = Plan.load(out)
    assert plan.recovery.steps == 3 and (tmp_path / "plan.recovered.safetensors").is_file()
    assert set(load_overrides(plan)) == set(plan.recovery.tensors)


def _assert_refused(code: int, err: str, out: Path, *words: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("gatenorm: error: "), (code, err)
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert not out.exists(), out


@pytest.mark.parametrize(
    "args, words",
    [
        (("--drop", "1", "--recover-steps", "3"), ("go with --recover",)),
        (("--drop", "0", *RECOVER), ("nothing to recover",)),
        (("--drop", "1", *RECOVER, "--recover-targets", "nope"), ("--recover-targets nope", "o_proj")),
        (("--drop", "1", *RECOVER, "--recover-layers", "first"), ("--recover-layers",)),
        (("--drop", "1", *RECOVER, "--recover-device", "cuda"), ("cuda",)),
    ],
)
def test_bad_recover_input_is_one_line_exit_2(tiny, tmp_path, monkeypatch, capsys, args, words):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("torch sees a GPU here")
    out = tmp_path / "plan.json"
    code, err = _cli(monkeypatch, capsys, "plan", tiny, "-o", out, *args)
    _assert_refused(code, err, out, *words)


def test_a_model_whose_training_does_not_fit_is_refused(tiny, tmp_path, monkeypatch, capsys):
    import gatenorm.sequential.memory as memory

    monkeypatch.setattr(memory, "available_bytes", lambda: 2**20)
    out = tmp_path / "out.gguf"
    code, err = _cli(monkeypatch, capsys, "export", tiny, "--drop", "1", "-o", out, *RECOVER)
    _assert_refused(code, err, out, "training needs", "0.0 GiB available")


def test_export_refuses_a_recovered_plan_whose_weights_changed(recovered, tmp_path, monkeypatch, capsys):
    folder, _, plan = recovered
    copy = tmp_path / "plan.json"
    weights = tmp_path / "plan.recovered.safetensors"
    weights.write_bytes(Path(plan.recovery.weights).read_bytes())
    plan.with_recovery_weights(weights).save(copy)
    from safetensors.torch import load_file, save_file

    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, weights)
    out = tmp_path / "out.gguf"
    code, err = _cli(monkeypatch, capsys, "export", folder, "--plan", copy, "-o", out)
    _assert_refused(code, err, out, name, "hash")
    code, err = _cli(monkeypatch, capsys, "export", folder, "--plan", copy, "-o", out, *RECOVER)
    _assert_refused(code, err, out, "--recover goes with --drop")


# --- recipes --------------------------------------------------------------------------------------------

#: test_heal_cli's recipe with a recovered entry instead of a healed one
RECIPE = HEAL_RECIPE.replace("name: heal-batch", "name: recover-batch").replace(
    "heal: {heal}", "recover: {recover}"
)


def test_recipe_recover_entries(tmp_path):
    from gatenorm.recipes.batch import _method_labels, plan_batch
    from gatenorm.recipes.loader import load_recipe

    (tmp_path / "a.yaml").write_text(RECIPE.format(recover="{steps: 2, samples: 2, length: 16, batch: 1}"))
    (tmp_path / "c.yaml").write_text(RECIPE.format(recover="{steps: 2, bogus: 1}"))
    searched = RECIPE.format(recover="true").replace("budgets: [0, 1]", "budgets: [{max_kld: 0.5}]")
    (tmp_path / "d.yaml").write_text(searched)
    recipe = load_recipe(tmp_path / "a.yaml")[0]
    assert recipe.methods[1].recover_settings.steps == 2 and recipe.methods[0].recover_settings is None
    assert _method_labels(recipe.methods) == ["gate-norm", "gate-norm-recovered"]
    with pytest.raises(GatenormError, match="bogus"):
        load_recipe(tmp_path / "c.yaml")
    with pytest.raises(GatenormError, match="recovered methods take layer counts"):
        plan_batch(load_recipe(tmp_path / "d.yaml")[0], "searched")
    cache = tmp_path / "plans"
    batch = plan_batch(recipe, "recover-batch", cache=cache)
    recovered = [v for v in batch.variants if v.method == "gate-norm-recovered"]
    assert [v.name for v in recovered] == ["tiny-gate-norm-recovered-d01-gguf-Q8_0"]
    plan = recovered[0].load_plan()
    assert plan.recovery.steps == 2 and Path(plan.recovery.weights).parent == cache / "healed"
    assert load_overrides(plan)
    plain = next(v for v in batch.variants if v.method == "gate-norm" and v.budget == 1)
    assert plain.key != recovered[0].key
    again = plan_batch(recipe, "recover-batch", cache=cache)  # reused from the cache: the same keys
    assert [v.key for v in again.variants] == [v.key for v in batch.variants]
