"""The heal fit's ridge solver: the ridged moments factored in their own storage, solved as LU would."""

import pytest
import torch

from gatenorm.errors import GatenormError
from gatenorm.heal.solve import RidgeSolver, cholesky_in_place


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
