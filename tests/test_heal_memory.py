"""What keeps the heal fit's memory down: the ridged moments factored in their own storage (solved as LU
would), the refitted down projections kept in files while the fit runs, the weights file written one
tensor at a time."""

import numpy as np
import pytest
import torch
from safetensors import safe_open

from gatenorm.errors import GatenormError
from gatenorm.heal.fit import HealSettings, fit_repairs
from gatenorm.heal.solve import RidgeSolver, cholesky_in_place
from gatenorm.heal.spill import SpilledTensors
from gatenorm.heal.store import LinearRepair, save_repairs
from gatenorm.readers import open_checkpoint
from tests.conftest import make_tiny_model, mixed_plan


def _moments(n: int, tokens: int, seed: int = 0) -> torch.Tensor:
    x = torch.randn(tokens, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x.T @ x


@pytest.mark.parametrize("n, block", [(7, 3), (40, 16), (48, 16)])
def test_blocked_cholesky_overwrites_the_lower_triangle_with_the_factor(n, block):
    a = _moments(n, 3 * n)
    expected = torch.linalg.cholesky(a)
    storage = a.data_ptr()
    assert cholesky_in_place(a, block)
    assert a.data_ptr() == storage
    torch.testing.assert_close(a.tril(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bias", [False, True])
def test_solver_equals_lu_on_the_ridged_moments_and_reuses_its_factor(bias):
    n, d_out = 1100, 5  # over two blocks of columns; fewer tokens than inputs: the ridge makes it solvable
    xtx = _moments(n, 300)
    if bias:
        xtx[-1].zero_(), xtx[:, -1].zero_()
        xtx[-1, -1] = 300.0
    d = n - int(bias)
    ridged = xtx.clone()
    ridged.diagonal()[:d] += 0.5 * float(xtx.diagonal()[:d].mean())
    solver = RidgeSolver(xtx, 0.5, bias)
    assert solver.matrix is xtx  # taken over, no copy kept
    for seed in (1, 2):  # a second right-hand side on the same factor
        xty = torch.randn(n, d_out, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        expected = torch.linalg.solve(ridged, xty)
        torch.testing.assert_close(solver.solve(xty.T.contiguous().T), expected, rtol=1e-9, atol=1e-12)


def test_no_ridge_solves_the_moments_by_lu():
    xtx = _moments(20, 100)
    kept = xtx.clone()
    xty = torch.randn(20, 3, dtype=torch.float64)
    solved = RidgeSolver(xtx, 0.0).solve(xty)
    torch.testing.assert_close(xtx, kept)
    torch.testing.assert_close(solved, torch.linalg.solve(kept, xty))


def test_moments_that_are_not_positive_definite_are_one_line():
    xtx = torch.eye(8, dtype=torch.float64)
    xtx[3, 3] = -3.0  # the mean diagonal stays positive: a ridge is added, the matrix stays indefinite
    with pytest.raises(GatenormError, match="not positive definite"):
        RidgeSolver(xtx, 0.1)


def test_spilled_refits_equal_the_fit_in_memory_and_leave_nothing_behind(tmp_path):
    """With a spill folder the fit's refitted down projections live in files (read back equal to the fit
    held in memory); the files go with the mapping; the weights file written one tensor at a time reads
    back through safetensors."""
    folder = tmp_path / "tiny"
    model = make_tiny_model(folder, num_hidden_layers=4)
    ckpt = open_checkpoint(folder)
    windows = np.random.default_rng(2).integers(0, 128, (4, 16))
    plan = mixed_plan(ckpt, {1: "drop-block", 2: "drop-attention"}, {})
    settings = HealSettings(fold_ridge=0.01)
    held = fit_repairs(model, plan, windows, settings)
    spilled = fit_repairs(model, plan, windows, settings, spill=tmp_path / "out")
    assert isinstance(spilled.refits, SpilledTensors) and set(spilled.refits) == set(held.refits) == {0, 3}
    assert len(list((tmp_path / "out").glob(".gatenorm-refits-*/*.f32"))) == 2
    for layer, weight in held.refits.items():
        assert torch.equal(spilled.refits[layer], weight)
    repair = LinearRepair(torch.randn(6, 5), torch.randn(6))
    save_repairs(tmp_path / "w.safetensors", {2: repair}, spilled.refits)
    with safe_open(tmp_path / "w.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt", "gatenorm": "repairs"}
        assert torch.equal(f.get_tensor("blk.2.weight"), repair.weight)
        assert torch.equal(f.get_tensor("blk.2.bias"), repair.bias)
        assert torch.equal(f.get_tensor("blk.3.ffn_down"), held.refits[3])
    del spilled
    assert not list((tmp_path / "out").iterdir())
