"""The layer-sequential engine (`gatenorm.sequential`) on the shipped GGUFs against the whole loaded model:
calibration statistics, HARP's alphas and torch-validation KLD equal (the tiny HF families: test_families)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from gatenorm.apply import load_model
from gatenorm.methods.calibration import (
    SequentialTailRunner,
    TailRunner,
    layer_statistics,
    sequential_layer_statistics,
)
from gatenorm.methods.harp_alpha import calibrate_alphas
from gatenorm.readers import open_checkpoint
from gatenorm.sequential import SequentialModel
from gatenorm.validate.runtimes import TorchRuntime
from tests.conftest import SMOLLM2_MIXED_ACTIONS, SMOLLM2_MIXED_ALPHAS, mixed_plan
from tests.test_families import (
    _assert_same_statistics,
    assert_sequential_validation_equal,
    whole_model_agreement,
)


@pytest.fixture(scope="module")
def windows() -> np.ndarray:
    return np.random.default_rng(0).integers(3, 2000, size=(4, 24))


@pytest.fixture(scope="module")
def tiny_model(tiny_gguf):
    return load_model(tiny_gguf)


def test_statistics_equal_whole_model_smollm2(smollm2_gguf, smollm2_model, windows):
    old = layer_statistics(smollm2_model, windows)
    _assert_same_statistics(old, sequential_layer_statistics(SequentialModel(smollm2_gguf), windows))


def test_statistics_equal_whole_model_tiny_gguf(tiny_gguf, tiny_model):
    windows = np.random.default_rng(1).integers(3, 100, size=(3, 16))
    old = layer_statistics(tiny_model, windows)
    _assert_same_statistics(old, sequential_layer_statistics(SequentialModel(tiny_gguf), windows))


def test_harp_alphas_equal_whole_model_smollm2(smollm2_gguf, smollm2_model, windows):
    layers = [28, 29]
    model = copy.deepcopy(smollm2_model)
    old = TailRunner(model, windows, keep_from=28)
    new = SequentialTailRunner(SequentialModel(smollm2_gguf), windows, keep_from=28)
    try:
        assert new.nll(28) == pytest.approx(old.nll(28), rel=1e-5)
        assert calibrate_alphas(new, layers) == pytest.approx(calibrate_alphas(old, layers), rel=1e-5)
    finally:
        new.close()


def test_torch_validation_equals_whole_model_smollm2(smollm2_gguf, smollm2_scored, smollm2_model, tmp_path):
    ckpt, scores = smollm2_scored
    plan = mixed_plan(ckpt, SMOLLM2_MIXED_ACTIONS, SMOLLM2_MIXED_ALPHAS, scores)
    path = tmp_path / "plan.json"
    plan.save(path)
    windows = np.random.default_rng(2).integers(3, 2000, size=(3, 32))
    assert_sequential_validation_equal(smollm2_gguf, smollm2_model, plan, path, windows, 16)


def test_engine_refuses_a_plan_of_another_model(smollm2_scored, tiny_gguf):
    from gatenorm.errors import GatenormError

    ckpt, scores = smollm2_scored
    plan = mixed_plan(ckpt, {3: "drop-attention"}, {}, scores)
    with pytest.raises(GatenormError, match="plan is for 30 layers"):
        SequentialModel(open_checkpoint(tiny_gguf)).forward(np.zeros((1, 8), dtype=np.int64), plan)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_K", "Q4_K", "Q6_K", "Q8_0"])
def test_ggml_dequantization_equals_gguf_py(qtype):
    """ggml's dequantizer (llama-cpp-python's libggml-base) gives gguf-py's numpy values bit for bit."""
    import gguf

    from gatenorm.readers.dequant import dequantize, ggml_to_float

    q = gguf.GGMLQuantizationType[qtype]
    assert ggml_to_float(q) is not None
    block, size = gguf.GGML_QUANT_SIZES[q]
    rows, cols = 37, 4 * 256
    raw = np.random.default_rng(3).integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    scales = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    if q.name.endswith("_K"):  # d (and dmin) f16 at the block's end (Q6_K) or start
        raw[:, -2:] = scales if q.name == "Q6_K" else raw[:, -2:]
        raw[:, 0:2] = scales if q.name != "Q6_K" else raw[:, 0:2]
        raw[:, 2:4] = scales if q.name in ("Q4_K", "Q5_K") else raw[:, 2:4]
    else:
        raw[:, 0:2] = scales
        raw[:, 2:4] = scales if q.name in ("Q4_1",) else raw[:, 2:4]
    want = gguf.quants.dequantize(raw.reshape(rows, -1), q).reshape(rows, cols)
    got = dequantize(raw.reshape(-1), q, rows, cols)
    np.testing.assert_array_equal(got, want)


def test_smollm2_tensors_dequantize_alike(smollm2_gguf):
    """Every quantized tensor type of the shipped SmolLM2 (Q4_1 and its others), ggml against gguf-py."""
    import gguf

    from gatenorm.readers.dequant import dequantize

    ckpt = open_checkpoint(smollm2_gguf)
    seen = {}
    for name, t in ckpt.tensors.items():
        q = gguf.GGMLQuantizationType(t.tensor_type)
        if q.name not in ("F32", "F16", "BF16") and q not in seen:
            seen[q] = name
    assert seen
    for q, name in seen.items():
        t = ckpt.tensors[name]
        raw = np.frombuffer(ckpt.read_raw(name), dtype=np.uint8)
        rows, cols = int(np.prod(t.shape[1:])), int(t.shape[0])
        want = gguf.quants.dequantize(raw.reshape(rows, -1), q).reshape(rows, cols)
        np.testing.assert_array_equal(dequantize(raw, q, rows, cols), want)


def test_quality_target_probe_equals_whole_model(smollm2_gguf, smollm2_scored, smollm2_model):
    """The max_kld search's probe (a layer-at-a-time pass per probe, no model copy) gives the KLD of the
    whole model with the probe's plan applied."""
    from gatenorm.methods import make_method_plan, rank_layers
    from gatenorm.recipes.schema import Recipe, Target
    from gatenorm.recipes.search import _quality_probe
    from gatenorm.recipes.sources import ResolvedSource
    from gatenorm.validate.text import token_windows

    ckpt, _ = smollm2_scored
    ranking = rank_layers(ckpt, "gate-norm")
    recipe = Recipe.model_validate(
        {"models": [str(smollm2_gguf)], "budgets": [1], "exports": {"gguf": {"quants": ["keep"]}},
         "search": {"ctx": 32, "max_tokens": 64}}
    )  # fmt: skip
    probe = _quality_probe(
        ResolvedSource("smollm2", smollm2_gguf, "0"), ckpt, ranking, recipe, Target(max_kld=0.1)
    )
    got = probe(6)
    ref = TorchRuntime(smollm2_gguf)
    windows = token_windows("wiki", ref.tokenize, 32, 64, ref.bos_id)
    plan = make_method_plan(ckpt, "gate-norm", budget=6, ranking=ranking)
    want = whole_model_agreement(smollm2_model, plan, windows, 16).kld_mean
    assert got == pytest.approx(want, rel=1e-5)
    assert want > 1e-3


def test_torch_runtime_asks_the_same_windows_twice(tiny_gguf):
    """A runtime served by a shared pass can ask for the same windows again (a pass of its own)."""
    windows = np.random.default_rng(4).integers(3, 100, size=(2, 12))
    ref, other = TorchRuntime(tiny_gguf), TorchRuntime(tiny_gguf)
    first = list(ref.window_logits(windows, 4))
    again = list(ref.window_logits(windows, 4))
    served = list(other.window_logits(windows, 4))  # left by ref's first pass
    for a, b, c in zip(first, again, served, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


def test_heal_fit_equals_whole_model_smollm2(smollm2_gguf, smollm2_scored, smollm2_model):
    """The heal fit a layer at a time from the Q4_1 GGUF equals the loaded model's (the default fold with
    drift, the kept layers' refits, and fitted maps of the linearized layers), on a plan with every action
    (form linear on every family: test_families)."""
    from gatenorm.heal.fit import HealSettings
    from tests.test_families import assert_heal_fit_equal

    ckpt, scores = smollm2_scored
    plan = mixed_plan(ckpt, SMOLLM2_MIXED_ACTIONS, SMOLLM2_MIXED_ALPHAS, scores)
    windows = np.random.default_rng(9).integers(3, 2000, size=(4, 24))
    assert_heal_fit_equal(smollm2_gguf, smollm2_model, plan, windows, HealSettings())
