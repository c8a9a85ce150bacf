"""The layer-sequential engine (`gatenorm.sequential`) on the shipped GGUFs against the whole loaded model:
calibration statistics, HARP's alphas and torch-validation KLD equal (the tiny HF families: test_families)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from gatenorm.apply import apply_plan, load_model
from gatenorm.methods.calibration import (
    SequentialTailRunner,
    TailRunner,
    layer_statistics,
    sequential_layer_statistics,
)
from gatenorm.methods.harp_alpha import calibrate_alphas
from gatenorm.readers import open_checkpoint
from gatenorm.sequential import SequentialModel
from gatenorm.validate.agreement import compare_logits
from gatenorm.validate.runtimes import TorchRuntime
from tests.conftest import SMOLLM2_MIXED_ACTIONS, SMOLLM2_MIXED_ALPHAS, mixed_plan
from tests.test_families import _assert_same_statistics


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
    first = 16
    ref, cand = TorchRuntime(smollm2_gguf), TorchRuntime(smollm2_gguf, plan=path)
    got = compare_logits(
        ref.window_logits(windows, first), cand.window_logits(windows, first), windows, first
    )
    assert ref._model is None and cand._model is None
    pruned = apply_plan(copy.deepcopy(smollm2_model), plan)
    ids = torch.from_numpy(windows)
    with torch.no_grad():
        want_ref = smollm2_model(ids, use_cache=False).logits[:, first:-1].numpy()
        want_cand = pruned(ids, use_cache=False).logits[:, first:-1].numpy()
    want = compare_logits(want_ref, want_cand, windows, first)
    assert got.kld_mean == pytest.approx(want.kld_mean, rel=1e-5)
    assert got.ppl_ref == pytest.approx(want.ppl_ref, rel=1e-5)
    assert got.top1 == want.top1
    assert want.kld_mean > 1e-3


def test_engine_refuses_a_plan_of_another_model(smollm2_scored, tiny_gguf):
    from gatenorm.errors import GatenormError

    ckpt, scores = smollm2_scored
    plan = mixed_plan(ckpt, {3: "drop-attention"}, {}, scores)
    with pytest.raises(GatenormError, match="plan is for 30 layers"):
        SequentialModel(open_checkpoint(tiny_gguf)).forward(np.zeros((1, 8), dtype=np.int64), plan)
