"""GPTQ's math (Frantar et al. 2022): quantize a weight column by column, pushing each column's rounding
error onto the columns not yet quantized, weighted by the inverse Hessian of the layer's reconstruction
loss, H = 2 X Xᵀ / n.

`gptq_quantize` is the whole sweep as one plain function; H is accumulated by `Hessian`/`Hessians` and
dampened by `inverse_hessian_factor` (also the error propagation of formats/gguf/gptq.py's fixed grid).
The registered method (algorithms/gptq.py) runs it inside the layer-sequential calibration pipeline.
"""
from __future__ import annotations

import torch
from torch import nn

from .quant import QTensor, compute_qparams, search_qparams
from .scheme import Scheme


GRAM_PANEL = 288  # columns per panel of gram(): 576 -> 2 panels, 1536 -> 6


def gram(x: torch.Tensor) -> torch.Tensor:
    """xᵀx ([n, n]) of x [m, n], computing only the upper triangle's panels (as a BLAS syrk would) and
    mirroring them: about half the multiply-adds of x.T @ x once n spans several panels; exactly symmetric."""
    n = x.shape[1]
    k = max(1, -(-n // GRAM_PANEL))
    b = -(-n // k)
    out = torch.empty(n, n, dtype=x.dtype, device=x.device)
    for a0 in range(0, n, b):
        a1 = min(a0 + b, n)
        torch.mm(x[:, a0:a1].T, x[:, a0:], out=out[a0:a1, a0:])  # panel rows a0:a1, columns a0: (upper part)
        out[a1:, a0:a1].copy_(out[a0:a1, a1:].T)
    return out


def _device_of(m: nn.Module):
    w = getattr(m, "weight", None)
    return w.device if isinstance(w, torch.Tensor) and not w.is_meta else None


class Hessian:
    """Running H = 2/n Σ x xᵀ over every calibration token of one linear's input."""

    def __init__(self, n: int, device=None) -> None:
        self.H = torch.zeros(n, n, dtype=torch.float32, device=device)
        self.count = 0

    def add(self, x: torch.Tensor, xtx: torch.Tensor | None = None) -> None:
        """Add the tokens of x ([..., in]); xtx = xᵀx of those tokens when already computed."""
        x = x.reshape(-1, x.shape[-1])
        m = x.shape[0]
        if xtx is None:
            xtx = gram(x.float())
        self.H *= self.count / (self.count + m)
        self.count += m
        self.H.add_(xtx, alpha=2 / self.count)


class Hessians:
    """One running H per observed linear; linears that read the same input tensor in a forward pass (q, k, v
    read the normed hidden states; gate and up too) compute xᵀx once and add it to each of theirs."""

    def __init__(self, linears: dict[str, nn.Module]) -> None:
        self.h = {n: Hessian(m.in_features, _device_of(m)) for n, m in linears.items()}
        self.sources: dict[str, list[int]] = {n: [] for n in linears}  # serial numbers of the inputs each saw
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None
        self._serial = 0

    def observe(self, name: str, x: torch.Tensor) -> None:
        if self._last is None or self._last[0] is not x:
            self._last = (x, gram(x.reshape(-1, x.shape[-1]).float()))
            self._serial += 1
        self.h[name].add(x, self._last[1])
        self.sources[name].append(self._serial)

    def shared(self, names: list[str]) -> list[list[str]]:
        """`names` grouped by identical H: linears that saw the very same input tensors, in order (and whose H
        nothing has changed since: checked)."""
        groups: list[list[str]] = []
        for n in names:
            for g in groups:
                if self.sources[g[0]] == self.sources[n] and torch.equal(self.h[g[0]].H, self.h[n].H):
                    g.append(n)
                    break
            else:
                groups.append([n])
        return groups

    def __getitem__(self, name: str) -> Hessian:
        return self.h[name]

    def reduce(self, names: list[str]) -> None:
        """Across data-parallel ranks (core/dist.py): every H of `names` becomes the mean over all ranks' tokens,
        H = Σ_r count_r H_r / Σ_r count_r (the same collective calls, in the same order, on every rank; linears
        that read the same inputs hold equal H before, so equal sums after). No-op in one process."""
        from . import dist

        if dist.world_size() == 1:
            return
        for n in names:
            h = self.h[n]
            h.H.mul_(h.count)
            dist.all_reduce_sum(h.H)
            h.count = dist.all_reduce_count(h.count, h.H.device)
            h.H.div_(max(h.count, 1))


def inverse_hessian_factor(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + percdamp·mean(diag H)·I)⁻¹: the rows GPTQ propagates errors with.
    H is modified in place (dampened)."""
    H.diagonal().add_(percdamp * torch.mean(torch.diag(H)))  # + d·I without an n x n identity
    L = torch.linalg.cholesky(H)
    Hi = torch.cholesky_inverse(L)
    del L  # one n x n temporary alive at a time besides H (down_proj of an 8B shape: 822 MB each)
    return torch.linalg.cholesky(Hi, upper=True)


def _group_params(W: torch.Tensor, scheme: Scheme, clip_grid: int = 0, hdiag: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scale, zero) of every column slice as [out, 1] each: per-row params of that slice; min/max, or with
    clip_grid > 1 the clipped range of least H-diagonal-weighted squared error (core/quant.search_qparams)."""
    per_row = Scheme(scheme.bits, scheme.symmetric, "channel", None, scheme.scale_dtype)
    if clip_grid > 1:
        return search_qparams(W, per_row, clip_grid, CLIP_MIN_SHRINK, col_weight=hdiag)
    return compute_qparams(W, per_row)


CLIP_MIN_SHRINK = 0.5  # the clip search's smallest range, as a fraction of min/max's


@torch.no_grad()
def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    scheme: Scheme,
    blocksize: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
    clip_grid: int = 0,
) -> tuple[QTensor, float]:
    """GPTQ one weight. W: [out, in] float, H: [in, in]. Returns (codes + params, loss Σ (w-q)²/d²/2).
    (The sweep itself: `gptq_rows`.)"""
    qt, row_loss = gptq_rows(W, H, scheme, blocksize, percdamp, act_order, clip_grid)
    return qt, float(row_loss.sum())


@torch.no_grad()
def gptq_rows(W: torch.Tensor, H: torch.Tensor, scheme: Scheme, blocksize: int = 128, percdamp: float = 0.01,
              act_order: bool = False, clip_grid: int = 0) -> tuple[QTensor, torch.Tensor]:
    """`gptq_quantize` with the loss of every output row ([out]). Rows never interact in GPTQ (H acts on
    columns; group params are per row), so weights that share H can be swept as one stacked matrix.

    Groups are contiguous in the natural column order (last one may be shorter).
    Without act-order a group's params are fitted when the sweep reaches it, on
    the error-updated weights (the reference behaviour). With act-order the
    columns are swept by descending diag(H) and the group params are static:
    fitted on the original weights up front, so the stored layout is unchanged.
    clip_grid > 1: each group's range is searched (clipped) for the least diag(H)-weighted squared rounding
    error instead of min/max (0 or 1: min/max, the reference).
    """
    W = W.detach().float().clone()  # [out, in]
    rows, cols = W.shape
    dev = W.device
    H = H.detach()
    diag = torch.diag(H).to(dev, torch.float32)
    dead = diag == 0
    diag[dead] = 1
    W[:, dead] = 0

    g = scheme.group_len(cols) if scheme.granularity == "group" else cols
    n_groups = 1 if scheme.granularity == "tensor" else scheme.n_groups(cols)
    if scheme.granularity == "tensor":
        s_t, z_t = compute_qparams(W, scheme)
        scale, zero = s_t.expand(rows, 1).clone(), (z_t.expand(rows, 1).clone() if z_t is not None else None)
    else:
        scale = torch.empty(rows, n_groups, dtype=scheme.torch_scale_dtype, device=dev)
        zero = None if scheme.symmetric else torch.empty(rows, n_groups, dtype=torch.int16, device=dev)
    hdiag = torch.diag(H).clone()  # the clip search's column weights (dead columns: 1, their weights are 0)
    static = act_order or scheme.granularity != "group"
    if static and scheme.granularity != "tensor":
        for k in range(n_groups):
            s, z = _group_params(W[:, k * g: (k + 1) * g], scheme, clip_grid, hdiag[k * g: (k + 1) * g])
            scale[:, k:k + 1] = s
            if zero is not None:
                zero[:, k:k + 1] = z

    perm = torch.argsort(diag, descending=True) if act_order else torch.arange(cols, device=dev)
    # the permuted copy straight from the caller's H (no clone first: one n x n copy less at the peak)
    H = H.to(dev, torch.float32)[perm][:, perm] if act_order else H.to(dev, torch.float32).clone()
    dead_p = dead[perm]
    H[dead_p, dead_p] = 1
    # The sweep works on the transpose, one contiguous row per weight column: the per-column updates
    # then touch contiguous memory (same arithmetic, same order as on W; much faster on CPU).
    WT = W[:, perm].T.contiguous()  # [in, out]
    del W
    Hinv = inverse_hessian_factor(H, percdamp)
    del H

    group_of = ((perm // g) if scheme.granularity == "group" else torch.zeros(cols, dtype=torch.long)).tolist()
    starts = [(not static) and p % g == 0 for p in perm.tolist()]  # a new group begins at this column
    code_dtype = torch.int8 if scheme.symmetric else torch.uint8
    QT = torch.zeros(cols, rows, dtype=code_dtype, device=dev)  # codes are integers in range: stored exactly
    Err = torch.empty(min(blocksize, cols), rows, device=dev)  # one lazy block's scaled errors (w - q) / d
    row_loss = torch.zeros(rows, device=dev)
    qmin, qmax = scheme.qmin, scheme.qmax
    sT = scale.float().T.contiguous()  # [groups, out]
    zT = zero.float().T.contiguous() if zero is not None else None
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = WT[i1:i2]  # [b, out], a view: updated in place
        Hinv1 = Hinv[i1:i2, i1:i2]
        d_all = torch.diag(Hinv1).tolist()
        for i in range(i2 - i1):
            col = i1 + i
            k = group_of[col]
            if starts[col]:  # entering a new group: fit it on the updated weights
                # the group's columns: the rest of this lazy block (updated), then beyond it
                s, z = _group_params(WT[col: col + g].T, scheme, clip_grid, hdiag[perm[col: col + g]])
                scale[:, k:k + 1] = s
                sT[k] = s[:, 0].float()
                if zero is not None:
                    zero[:, k:k + 1] = z
                    zT[k] = z[:, 0].float()
            w = W1[i]
            s = sT[k]
            if zT is not None:
                q = torch.round(w / s).add_(zT[k]).clamp_(qmin, qmax)
                dq = (q - zT[k]).mul_(s)
            else:
                q = torch.round(w / s).clamp_(qmin, qmax)
                dq = q * s
            QT[col] = q
            err = Err[i]
            torch.sub(w, dq, out=err).div_(d_all[i])
            if i + 1 < i2 - i1:
                W1[i + 1:].addr_(Hinv1[i, i + 1:], err, alpha=-1)
        # lazy batch update of every later column with this block's errors: W[:, i2:] -= Err1 Hinv[i1:i2, i2:]
        E = Err[: i2 - i1]
        WT[i2:].addmm_(Hinv[i1:i2, i2:].T, E, alpha=-1)
        row_loss += E.pow(2).sum(dim=0)
    row_loss /= 2  # Σ (w - q)² / d² / 2 per row

    Q = QT[torch.argsort(perm)].T.contiguous()  # [out, in], natural column order
    qt = QTensor(codes=Q, scale=scale if scheme.granularity != "tensor" else scale[:1],
                 zero=(zero if scheme.granularity != "tensor" else zero[:1]) if zero is not None else None,
                 scheme=scheme, shape=torch.Size((rows, cols)))
    return qt, row_loss
