"""Ridge least squares on float64 moments, factored in their own storage.

A fold's moments of the MLP's ``d_ff`` inputs are the largest thing the heal fit holds (``d_ff x d_ff``
float64: 1.64 GB at Llama-3-8B's 14336); `torch.linalg.solve` would hold an LU copy of them beside them.
Here the ridged moments are overwritten by their Cholesky factor, a block of columns at a time (torch's
own Cholesky of a matrix copies it), and each solve runs two triangular solves on that factor, which copy
nothing. The factor serves every later solve with the same moments (more removed layers folding into one
MLP). Without a ridge (or moments that are all zero), the moments are kept and solved by LU, as before.
"""

from __future__ import annotations

import torch

from gatenorm.errors import GatenormError

#: Columns factored per step of the blocked Cholesky.
BLOCK = 512


def cholesky_in_place(a: torch.Tensor, block: int = BLOCK) -> bool:
    """Overwrite the lower triangle of the symmetric positive definite float64 `a` [n, n] with its
    Cholesky factor ``L`` (``a = L L^T``), a block of columns at a time (temporaries of one block of
    rows); the strict upper triangle is left unspecified. False when `a` is not positive definite (it is
    then partly overwritten)."""
    n = a.shape[0]
    for k in range(0, n, block):
        e = min(k + block, n)
        factor, info = torch.linalg.cholesky_ex(a[k:e, k:e])
        if int(info) != 0:
            return False
        a[k:e, k:e] = factor
        if e == n:
            break
        panel = a[e:, k:e]
        panel.copy_(torch.linalg.solve_triangular(factor.mT, panel, upper=True, left=False))
        for j in range(e, n, block):  # the trailing lower triangle, a block of rows at a time
            stop = min(j + block, n)
            a[j:stop, e:stop].addmm_(panel[j - e : stop - e], panel[: stop - e].T, alpha=-1)
    return True


class RidgeSolver:
    """Solves ``(X^T X + lam I) W = X^T Y`` for any number of right-hand sides, ``lam = ridge * mean
    diag(X^T X)`` (with `bias`, the last row and column are the ones column's, not shrunk). `xtx` is
    taken over: its storage becomes the factor."""

    def __init__(self, xtx: torch.Tensor, ridge: float, bias: bool = False):
        d = xtx.shape[0] - int(bias)
        diagonal = torch.diagonal(xtx)[:d]
        lam = ridge * float(diagonal.mean())
        diagonal.add_(lam)
        self.matrix, self.factored = xtx, lam > 0
        if self.factored and not cholesky_in_place(xtx):
            raise GatenormError(
                "the heal fit's ridged moments are not positive definite (non-finite activations?); "
                "raise the ridge (--heal-ridge / --heal-fold-ridge)"
            )

    def solve(self, xty: torch.Tensor) -> torch.Tensor:
        """The solution [n, m] of `xty` [n, m], float64 (`xty` is overwritten by it when factored)."""
        if not self.factored:
            return torch.linalg.solve(self.matrix, xty)
        torch.linalg.solve_triangular(self.matrix, xty, upper=False, out=xty)
        torch.linalg.solve_triangular(self.matrix.mT, xty, upper=True, out=xty)
        return xty
