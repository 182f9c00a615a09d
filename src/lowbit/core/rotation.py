"""Orthogonal input rotations that flatten activation outliers (QuaRot, Ashkboos et al. 2024).

For an orthogonal R [n, n], x Wᵀ = (x R)(W R)ᵀ: a linear may quantize x R and W R instead of x and W
and compute the same product. A channel that carries a large value in every token (an "emergent
outlier") is spread by R over all n channels, so one scale per token no longer has to cover it.

R here is (D_a A ⊗ D_b B) · P: A [a, a] and B [b, b] orthogonal, n = a·b, D_a and D_b diagonals of
random signs (seeded; folded into the factors, which stay orthogonal), and P the permutation that lets
the result come out in the order the second matmul leaves it. Applying it costs two small matmuls per
row, M·n·(a+b) multiply-adds instead of a dense M·n², and one transposing copy:

    x [M, n] viewed as X [M, a, b] -> Y = X B' [M, a, b] -> Yᵀ A' [M, b, a] -> [M, n]   (x R)

A and B are normalized Hadamard matrices (H Hᵀ = k I, entries ±1) where k is a Hadamard order lowbit
can build — Sylvester's 2^j times Paley's q+1 for primes q ≡ 3 (mod 4), and products of those (576 =
24·24, 1536 = 32·48) — and seeded random orthogonal matrices otherwise. A Hadamard spreads a single
spike perfectly evenly; the random signs keep structured rows (a constant row, say) from collapsing
into one.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch

SEED = 0


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % p for p in range(2, math.isqrt(q) + 1))


def _paley(q: int) -> torch.Tensor:
    """Paley's construction I: a Hadamard matrix of order q+1 for a prime q ≡ 3 (mod 4)."""
    residues = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if j in residues else -1.0 for j in range(1, q)], dtype=torch.float64)
    jac = torch.stack([torch.roll(chi, k) for k in range(q)])  # jac[k, j] = chi((j - k) mod q), skew
    h = torch.ones(q + 1, q + 1, dtype=torch.float64)
    h[1:, 0] = -1.0
    h[1:, 1:] = jac + torch.eye(q, dtype=torch.float64)
    return h


@lru_cache(maxsize=None)
def hadamard(n: int) -> torch.Tensor | None:
    """A ±1 float64 [n, n] matrix with H Hᵀ = n I, or None where no construction here reaches n."""
    if n < 1:
        return None
    if n & (n - 1) == 0:  # Sylvester: H_2n = [[H, H], [H, -H]]
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < n:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        return h
    for m in range(4, n + 1, 4):  # Hadamard orders past 2 are multiples of 4
        if n % m or not (_is_prime(m - 1) and (m - 1) % 4 == 3) or m & (m - 1) == 0:
            continue
        rest = hadamard(n // m)
        if rest is not None:
            return torch.kron(rest, _paley(m - 1))
    return None


@lru_cache(maxsize=None)
def has_hadamard(n: int) -> bool:
    """Whether hadamard(n) returns a matrix, decided without building one (an [n, n] float64 matrix is
    n²·8 bytes: 970 MB for n = 11008)."""
    if n < 1:
        return False
    if n & (n - 1) == 0:
        return True
    return any(not n % m and _is_prime(m - 1) and (m - 1) % 4 == 3 and m & (m - 1) and has_hadamard(n // m)
               for m in range(4, n + 1, 4))


def _random_orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).contiguous()  # Haar-distributed


def split(n: int) -> tuple[int, int]:
    """n = a·b with a <= b: both Hadamard orders where possible, then one, then a as close to √n as can be."""
    pairs = [(a, n // a) for a in range(1, math.isqrt(n) + 1) if n % a == 0]
    return max(pairs, key=lambda p: (has_hadamard(p[0]) + has_hadamard(p[1]), p[0]))


def _factor(k: int, gen: torch.Generator) -> torch.Tensor:
    h = hadamard(k)
    return (h / math.sqrt(k)) if h is not None else _random_orthogonal(k, gen)


@lru_cache(maxsize=None)
@lru_cache(maxsize=None)
def make_rotation(n: int, seed: int = SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """(A' [a, a], B' [b, b]) float32, the signed factors of R (module docstring); orthogonal, deterministic
    in (n, seed). The same tensors for every call (modules share them; never write to them)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + n)
    a, b = split(n)
    fa, fb = _factor(a, gen), _factor(b, gen)
    da = torch.randint(0, 2, (a, 1), generator=gen, dtype=torch.float64) * 2 - 1
    db = torch.randint(0, 2, (b, 1), generator=gen, dtype=torch.float64) * 2 - 1
    return (da * fa).float().contiguous(), (db * fb).float().contiguous()


def rotate(x: torch.Tensor, fa: torch.Tensor, fb: torch.Tensor) -> torch.Tensor:
    """x [..., n] -> x R (float32): two GEMMs over all rows at once (a batch of tiny matmuls is several
    times slower on CPU) and one transposing copy."""
    a, b = fa.shape[0], fb.shape[0]
    lead = x.shape[:-1]
    y = x.float().reshape(-1, b) @ fb.float()                          # [M·a, b]: X B'
    y = y.reshape(-1, a, b).transpose(1, 2).reshape(-1, a) @ fa.float()  # [M·b, a]: (X B')ᵀ A'
    return y.reshape(*lead, a * b)


def unrotate(y: torch.Tensor, fa: torch.Tensor, fb: torch.Tensor) -> torch.Tensor:
    """y [..., n] -> y Rᵀ (the inverse of `rotate`)."""
    a, b = fa.shape[0], fb.shape[0]
    lead = y.shape[:-1]
    z = y.float().reshape(-1, a) @ fa.float().T                        # [M·b, a]
    z = z.reshape(-1, b, a).transpose(1, 2).reshape(-1, b) @ fb.float().T  # [M·a, b]: X
    return z.reshape(*lead, a * b)


def dense(fa: torch.Tensor, fb: torch.Tensor) -> torch.Tensor:
    """R itself, float64 [n, n] (for tests): rotate(x) == x @ dense(fa, fb) up to float32 rounding."""
    a, b = fa.shape[0], fb.shape[0]
    k = torch.kron(fa.double(), fb.double())  # x (A' ⊗ B') in (i, j) -> (k, l) order
    perm = torch.arange(a * b).reshape(a, b).T.reshape(-1)  # output position l·a + k holds (k, l)
    return k[:, perm]
