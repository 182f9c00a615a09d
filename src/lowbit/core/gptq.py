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


def gram_panels(n: int):
    """(a0, a1) row ranges of gram()'s panels: equal panels of at most GRAM_PANEL rows. Hessian.add updates H
    with the same panels, so both give the same bits."""
    k = max(1, -(-n // GRAM_PANEL))
    b = -(-n // k)
    for a0 in range(0, n, b):
        yield a0, min(a0 + b, n)


def gram(x: torch.Tensor) -> torch.Tensor:
    """xᵀx ([n, n]) of x [m, n], computing only the upper triangle's panels (as a BLAS syrk would) and
    mirroring them: about half the multiply-adds of x.T @ x once n spans several panels; exactly symmetric."""
    n = x.shape[1]
    out = torch.empty(n, n, dtype=x.dtype, device=x.device)
    for a0, a1 in gram_panels(n):
        torch.mm(x[:, a0:a1].T, x[:, a0:], out=out[a0:a1, a0:])  # panel rows a0:a1, columns a0: (upper part)
        out[a1:, a0:a1].copy_(out[a0:a1, a1:].T)
    return out


def _device_of(m: nn.Module):
    w = getattr(m, "weight", None)
    return w.device if isinstance(w, torch.Tensor) and not w.is_meta else None


class Hessian:
    """Running H = 2/n Σ x xᵀ over every calibration token of one linear's input."""

    def __init__(self, n: int, device=None) -> None:
        self.n, self.device = n, device
        self._H: torch.Tensor | None = None  # allocated by the first add (n x n float32: 822 MB at n = 14,336)
        self.count = 0
        # data-parallel calibration (core/dist.py): every added batch's (tokens, xᵀx), combined by replay()
        self.parts: list[tuple[int, torch.Tensor]] | None = [] if _data_parallel() else None

    @property
    def H(self) -> torch.Tensor:
        if self._H is None:
            self._H = torch.zeros(self.n, self.n, dtype=torch.float32, device=self.device)
        return self._H

    def take(self) -> torch.Tensor:
        """H, handed over: this object forgets it (its memory goes with the caller's last reference)."""
        H = self.H
        self._H = None
        return H

    def forget(self) -> None:
        self._H = None

    def add(self, x: torch.Tensor, xtx: torch.Tensor | None = None) -> None:
        """Add the tokens of x ([..., in]); xtx = xᵀx of those tokens when already computed.

        Without xtx, xᵀx is never held whole: the first add computes it into H's memory and scales it, later
        ones update H panel by panel (gram()'s panels, the same elementwise arithmetic: the same bits as
        H·c/(c+m) + 2/(c+m)·gram(x)), so the peak is H plus one panel, not two n x n matrices."""
        x = x.reshape(-1, x.shape[-1])
        m = x.shape[0]
        if self.parts is not None:  # data-parallel: kept for the ordered replay across ranks
            self.parts.append((m, xtx if xtx is not None else gram(x.float())))
            self.count += m
            return
        beta = self.count / (self.count + m)
        self.count += m
        alpha = 2 / self.count
        if xtx is not None:
            H = self.H
            H *= beta
            H.add_(xtx, alpha=alpha)
            return
        x = x.float()
        if self._H is None:  # 0·beta + alpha·g = alpha·g
            self._H = gram(x).mul_(alpha)
            return
        H = self._H
        for a0, a1 in gram_panels(self.n):
            P = torch.mm(x[:, a0:a1].T, x[:, a0:])  # gram()'s panel: rows a0:a1, columns a0:
            H[a0:a1, a0:].mul_(beta).add_(P, alpha=alpha)
            del P
            H[a1:, a0:a1].copy_(H[a0:a1, a1:].T)  # H stays exactly symmetric off the diagonal blocks


    def replay(self) -> None:
        """Data-parallel: H from every rank's batches, added in the global batch order (rank 0's, then rank
        1's, ...) with the same running-mean arithmetic as one process (`add` with xtx): the bits of a
        one-process run over the same batches. Every rank calls it for the same Hessians in the same order
        (collectives: one broadcast per batch)."""
        from . import dist

        parts, self.parts = self.parts or [], []
        dev = parts[0][1].device if parts else self.device
        per_rank = dist.gather_int(len(parts), dev)
        H = torch.zeros(self.n, self.n, dtype=torch.float32, device=dev)
        count = 0
        for r, k in enumerate(per_rank):
            for i in range(k):
                if r == dist.rank():
                    m, G = parts[i]
                    G = G.contiguous()
                    mt = torch.tensor([m], dtype=torch.int64, device=dev)
                else:
                    G = torch.empty(self.n, self.n, dtype=torch.float32, device=dev)
                    mt = torch.zeros(1, dtype=torch.int64, device=dev)
                dist.broadcast_(mt, r)
                dist.broadcast_(G, r)
                m = int(mt.item())
                H *= count / (count + m)
                count += m
                H.add_(G, alpha=2 / count)
                del G
        self._H, self.count = H, count


def _data_parallel() -> bool:
    from . import dist

    return dist.world_size() > 1


class Hessians:
    """One running H per observed linear. Linears that read the same input tensor in a forward pass (q, k, v
    read the normed hidden states; gate and up too) compute its xᵀx once (observe), or, observed together
    (observe_group), share one H tensor while they have seen the very same inputs."""

    def __init__(self, linears: dict[str, nn.Module]) -> None:
        self.h = {n: Hessian(m.in_features, _device_of(m)) for n, m in linears.items()}
        self.sources: dict[str, list[int]] = {n: [] for n in linears}  # serial numbers of the inputs each saw
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None  # the last input and its xᵀx
        self._serial = 0

    def observe(self, name: str, x: torch.Tensor) -> None:
        """Add x to name's H. Linears observed one by one with the same tensor compute its xᵀx once (kept until
        another tensor comes, or drop_cache)."""
        if self._last is None or self._last[0] is not x:
            self._last = (x, gram(x.reshape(-1, x.shape[-1]).float()))
            self._serial += 1
        h = self.h[name]
        if h._H is not None and any(o is not h and o._H is h._H for o in self.h.values()):
            h._H = h._H.clone()  # it shared H with others (observe_group): it goes its own way now
        if h.parts and any(o is not h and o.parts is h.parts for o in self.h.values()):
            h.parts = list(h.parts)
        h.add(x, self._last[1])
        self.sources[name].append(self._serial)

    def observe_group(self, names: list[str], x: torch.Tensor) -> None:
        """Add x to the H of every linear in `names` (all reading this very tensor): when they have seen the same
        inputs so far they share one H tensor, added to once (xᵀx never held whole: Hessian.add); else one
        by one."""
        hs = [self.h[n] for n in names]
        h0, src0 = hs[0], self.sources[names[0]]
        if not all(h._H is h0._H and (h.parts is h0.parts or not (h.parts or h0.parts)) and h.count == h0.count
                   and self.sources[n] == src0 for n, h in zip(names, hs)):
            for n in names:
                self.observe(n, x)
            return
        self._last = None
        self._serial += 1
        h0.add(x)
        for n, h in zip(names, hs):
            h._H, h.parts, h.count = h0._H, h0.parts, h0.count
            self.sources[n].append(self._serial)

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

    def drop_cache(self) -> None:
        """Forget the last input (call once every linear of a group has observed it)."""
        self._last = None

    def take(self, name: str) -> tuple[torch.Tensor, bool]:
        """(name's H, whether it is the caller's alone): this object forgets it. Not alone while another
        linear here still shares the tensor: the caller must then leave it unchanged."""
        H = self.h[name].take()
        return H, not any(o._H is H for o in self.h.values())

    def __getitem__(self, name: str) -> Hessian:
        return self.h[name]

    def distinct(self, names: list[str]) -> list[str]:
        """`names` with one name per H tensor (the first of each set sharing one): what to update in place."""
        seen, out = set(), []
        for n in names:
            h = self.h[n]
            key = id(h._H) if h._H is not None else ("unallocated", n)  # (never allocates an H)
            if key not in seen:
                seen.add(key)
                out.append(n)
        return out

    def reduce(self, names: list[str]) -> None:
        """Data-parallel calibration (core/dist.py): every H of `names` from all ranks' batches, replayed in
        the global batch order (Hessian.replay: the bits of one process; the same calls in the same order on
        every rank; linears sharing their batches' xᵀx replayed once). No-op in one process. Memory: until
        then each rank keeps every batch's xᵀx (batches per rank x n² x 4 bytes per distinct input: 822 MB
        per batch for an 8B shape's down_proj), and the replay broadcasts each of them once."""
        if not _data_parallel():
            return
        done: dict[tuple, Hessian] = {}
        for n in names:
            h = self.h[n]
            # linears whose batches are the very same tensors (a shared list, or q/k/v observed one by one
            # with one cached xᵀx each) are replayed once
            key = (len(h.parts or ()), *(id(G) for _, G in h.parts or ())) if h.parts else ("empty", id(h))
            if key in done:
                h._H, h.parts, h.count = done[key]._H, done[key].parts, done[key].count
                continue
            h.replay()
            done[key] = h
        for n in names:  # the lists were emptied by replay: no longer shared
            self.h[n].parts = []


LEAN_N = 1024  # H of at least this many columns is factored in place (the blocked reverse Cholesky and triangular
# inverse: one n x n matrix instead of two or three, and faster than potrf/potri/potrf at these sizes: docs §13)
LEAN_BLOCK = 512  # the in-place factorization's block size


def permute_symmetric_(H: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """H[perm][:, perm], computed in H's own memory (one row of temporary): rows moved along the permutation's
    cycles, then each row gathered. Returns H."""
    p = perm.tolist()
    seen = bytearray(len(p))
    for start in range(len(p)):
        if seen[start] or p[start] == start:
            seen[start] = 1
            continue
        tmp = H[start].clone()
        j = start
        while True:  # row j receives row p[j]
            seen[j] = 1
            nxt = p[j]
            if nxt == start:
                H[j] = tmp
                break
            H[j] = H[nxt]
            j = nxt
    for i in range(H.shape[0]):
        H[i] = H[i, perm]
    return H


def inverse_hessian_factor_(H: torch.Tensor, block: int = LEAN_BLOCK) -> torch.Tensor:
    """The upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU, positive diagonal), written over H (already dampened)
    without an n x n temporary: H = R Rᵀ with R upper triangular (Cholesky from the bottom-right corner, by
    blocks), then U = R⁻¹ (H⁻¹ = R⁻ᵀR⁻¹ = UᵀU), by column blocks. Equal to `inverse_hessian_factor` up to
    floating-point rounding (tests/core/test_gptq_lean.py). Returns H."""
    n = H.shape[0]
    for k1 in range(n, 0, -block):  # 1. R, block column by block column from the right; upper triangle only
        k0 = max(0, k1 - block)
        # the diagonal block: A = R22 R22ᵀ; with J the reversal, JAJ = L Lᵀ (lower L) and R22 = J L J.
        # (JAJ's lower triangle is A's upper one: the only part kept up to date)
        R22 = torch.linalg.cholesky(H[k0:k1, k0:k1].flip(0, 1)).flip(0, 1)
        H[k0:k1, k0:k1] = R22
        if k0 == 0:
            break
        R12 = torch.linalg.solve_triangular(R22.T, H[:k0, k0:k1], upper=False, left=False)  # A12 R22⁻ᵀ
        H[:k0, k0:k1] = R12
        for r0 in range(0, k0, block):  # A11 -= R12 R12ᵀ, upper triangle, one block row at a time
            r1 = min(r0 + block, k0)
            H[r0:r1, r0:k0].addmm_(R12[r0:r1], R12[r0:k0].T, alpha=-1)
    H.triu_()
    for j0 in range(0, n, block):  # 2. U = R⁻¹: U22 = R22⁻¹, U12 = -U11 R12 U22 (U11 already over R11)
        j1 = min(j0 + block, n)
        eye = torch.eye(j1 - j0, dtype=H.dtype, device=H.device)
        U22 = torch.linalg.solve_triangular(H[j0:j1, j0:j1], eye, upper=True)
        if j0 > 0:
            H[:j0, j0:j1] = -(H[:j0, :j0] @ H[:j0, j0:j1]) @ U22
        H[j0:j1, j0:j1] = U22
    return H


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
def gptq_rows(W: torch.Tensor | list[torch.Tensor], H: torch.Tensor, scheme: Scheme, blocksize: int = 128,
              percdamp: float = 0.01, act_order: bool = False, clip_grid: int = 0, consume: bool = False,
              cols_kernel=None) -> tuple[QTensor, torch.Tensor]:
    """`gptq_quantize` with the loss of every output row ([out]). Rows never interact in GPTQ (H acts on
    columns; group params are per row), so weights that share H can be swept as one stacked matrix: W may be
    a list of weights [out_i, in], swept as their row concatenation (without building it).

    Groups are contiguous in the natural column order (last one may be shorter).
    Without act-order a group's params are fitted when the sweep reaches it, on
    the error-updated weights (the reference behaviour). With act-order the
    columns are swept by descending diag(H) and the group params are static:
    fitted on the original weights up front, so the stored layout is unchanged.
    clip_grid > 1: each group's range is searched (clipped) for the least diag(H)-weighted squared rounding
    error instead of min/max (0 or 1: min/max, the reference).
    consume: H is the caller's to give (a float32 tensor on W's device that nothing reads afterwards): it is
    permuted and factored in its own memory when it has at least LEAN_N columns, so the sweep's peak holds one
    n x n matrix instead of two or three.
    cols_kernel: the column loop of a lazy block in native code (kernels/native.gptq_cols_kernel: the same
    operations in the same order, so the same codes), called for each run of columns between group starts;
    None: the loop below in torch ops.
    """
    parts = [w.detach() for w in W] if isinstance(W, (list, tuple)) else [W.detach()]
    rows, cols = sum(w.shape[0] for w in parts), parts[0].shape[1]
    dev = parts[0].device
    H = H.detach()
    diag = torch.diag(H).to(dev, torch.float32)
    dead = diag == 0
    diag[dead] = 1
    perm = torch.argsort(diag, descending=True) if act_order else torch.arange(cols, device=dev)
    dead_p = dead[perm]
    # The sweep works on the transpose, one contiguous row per weight column: the per-column updates
    # then touch contiguous memory (same arithmetic, same order as on W; much faster on CPU). Built a slice of
    # columns at a time from each part: no float copy of the whole (stacked) weight besides WT itself.
    WT = torch.empty(cols, rows, dtype=torch.float32, device=dev)  # [in, out], columns in sweep order
    r0 = 0
    for w in parts:
        for c0 in range(0, cols, 1024):
            idx = perm[c0:c0 + 1024]
            WT[c0:c0 + len(idx), r0:r0 + w.shape[0]] = w[:, idx].T
        r0 += w.shape[0]
    WT[dead_p] = 0

    g = scheme.group_len(cols) if scheme.granularity == "group" else cols
    n_groups = 1 if scheme.granularity == "tensor" else scheme.n_groups(cols)
    inv_perm = torch.argsort(perm)

    def natural(c0: int, c1: int) -> torch.Tensor:  # original columns c0:c1 (dead ones 0) as [out, c1 - c0]
        return WT[inv_perm[c0:c1]].T.contiguous() if act_order else WT[c0:c1].T.contiguous()

    if scheme.granularity == "tensor":
        s_t, z_t = compute_qparams(natural(0, cols), scheme)
        scale, zero = s_t.expand(rows, 1).clone(), (z_t.expand(rows, 1).clone() if z_t is not None else None)
    else:
        scale = torch.empty(rows, n_groups, dtype=scheme.torch_scale_dtype, device=dev)
        zero = None if scheme.symmetric else torch.empty(rows, n_groups, dtype=torch.int16, device=dev)
    hdiag = torch.diag(H).clone()  # the clip search's column weights (dead columns: 1, their weights are 0)
    static = act_order or scheme.granularity != "group"
    if static and scheme.granularity != "tensor":
        for k in range(n_groups):
            s, z = _group_params(natural(k * g, (k + 1) * g), scheme, clip_grid, hdiag[k * g: (k + 1) * g])
            scale[:, k:k + 1] = s
            if zero is not None:
                zero[:, k:k + 1] = z

    lean = consume and cols >= LEAN_N and H.dtype == torch.float32 and H.device == dev
    if lean:  # in H's own memory
        if act_order:
            permute_symmetric_(H, perm)
        H[dead_p, dead_p] = 1
        H.diagonal().add_(percdamp * torch.mean(torch.diag(H)))
        Hinv = inverse_hessian_factor_(H)
    else:
        # the permuted copy straight from the caller's H (no clone first: one n x n copy less at the peak)
        H = H.to(dev, torch.float32)[perm][:, perm] if act_order else H.to(dev, torch.float32).clone()
        H[dead_p, dead_p] = 1
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
    def fit_group(col: int) -> None:  # entering a new group: fit it on the updated weights
        k = group_of[col]
        # the group's columns: the rest of this lazy block (updated), then beyond it
        s, z = _group_params(WT[col: col + g].T, scheme, clip_grid, hdiag[perm[col: col + g]])
        scale[:, k:k + 1] = s
        sT[k] = s[:, 0].float()
        if zero is not None:
            zero[:, k:k + 1] = z
            zT[k] = z[:, 0].float()

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = WT[i1:i2]  # [b, out], a view: updated in place
        Hinv1 = Hinv[i1:i2, i1:i2]
        if cols_kernel is not None:
            grp = torch.tensor(group_of[i1:i2], dtype=torch.int32)
            i = 0
            while i < i2 - i1:  # runs of columns between group starts
                if starts[i1 + i]:
                    fit_group(i1 + i)
                j = i + 1
                while j < i2 - i1 and not starts[i1 + j]:
                    j += 1
                cols_kernel(W1, Hinv1, i, j, grp, sT, zT, float(qmin), float(qmax), QT[i1:i2], Err[: i2 - i1])
                i = j
        d_all = torch.diag(Hinv1).tolist() if cols_kernel is None else []
        for i in range(len(d_all)):
            col = i1 + i
            k = group_of[col]
            if starts[col]:
                fit_group(col)
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
                # two roundings (product, then difference) on every machine: addr_ fuses them where torch's
                # vector loop reaches and not in its tail, which native code could not reproduce
                W1[i + 1:].sub_(torch.outer(Hinv1[i, i + 1:], err))
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
