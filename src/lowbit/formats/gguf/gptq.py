"""GPTQ (Frantar et al. 2022) against a fixed per-weight grid: the grid of a GGUF block as stored.

Every weight w_ij may take the values a_ij·L + c_ij, L an integer in [lo, hi] (a, c: the block's
fp16 scale times its 6- or 4-bit sub-block scale, and its min, already rounded as they are stored).
Columns are quantized left to right; each column's error, scaled by the inverse Hessian's Cholesky
factor, is pushed onto the columns not yet quantized (lazy batches of ``blocksize`` columns).
H = E[x xᵀ] of the layer's input over calibration tokens; ``percdamp`` of its mean diagonal is added.
Weights whose grid step is 0 (an all-zero sub-block) keep the code ``L0`` gave them.
"""
from __future__ import annotations

import torch

from ...core.gptq import inverse_hessian_factor


@torch.no_grad()
def gptq_on_grid(W: torch.Tensor, H: torch.Tensor, a: torch.Tensor, c: torch.Tensor, lo: int, hi: int,
                 L0: torch.Tensor, blocksize: int = 128, percdamp: float = 0.01) -> torch.Tensor:
    """W, a, c, L0: [rows, cols]; H: [cols, cols]. Returns codes L [rows, cols] (float, integral)."""
    W = W.detach().float().clone()
    rows, cols = W.shape
    H = H.detach().float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    Hinv = inverse_hessian_factor(H, percdamp)
    live = a != 0
    a_safe = torch.where(live, a, torch.ones_like(a))
    L = L0.clone().float()
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            w = W1[:, i]
            q = torch.round((w - c[:, col]) / a_safe[:, col]).clamp_(lo, hi)
            q = torch.where(live[:, col], q, L[:, col])
            L[:, col] = q
            dq = a[:, col] * q + c[:, col]
            err = (w - dq) / Hinv1[i, i]
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1)
            Err1[:, i] = err
        W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1)
    return L
