"""Bit packing of unsigned integer codes along the last dimension.

Layout (the same for every width k in 1..8): each row is cut into chunks of 8
codes; a chunk of 8 k-bit codes is one little-endian k-byte word in which code i
occupies bits [k*i, k*i + k). So
  - 8-bit: 1 code per byte, 4-bit: 2 per byte (low nibble first),
  - 2-bit: 4 per byte (lowest bits first),
  - 3-bit: 8 codes in 3 bytes, truly packed (no 4-bit slot per code).
A row of n codes takes ceil(n / 8) * k bytes; a row whose length is not a
multiple of 8 is padded with zero codes inside the last chunk, and `unpack`
cuts them off again (it takes n).
"""
from __future__ import annotations

import torch


def packed_row_bytes(n: int, bits: int) -> int:
    """Bytes of one packed row of n codes (8-bit codes are stored as they are)."""
    return n if bits == 8 else -(-n // 8) * bits


def zero_points_nbytes(rows: int, groups: int, bits: int) -> int:
    """Bytes of a [rows, groups] table of packed zero points (`pack_zero_points`)."""
    return packed_row_bytes(rows * groups, bits)


def pack_zero_points(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """[R, G] zero points in [0, 2^bits) -> uint8 [ceil(R*G/8)*bits]: the whole table, row-major, as one packed
    row, so no row pads its last byte (a 576-column row at g128 holds 5 zero points: 20 bits at 4-bit, which a
    row of its own would store in 4 bytes)."""
    return pack(zeros.reshape(-1), bits)


def unpack_zero_points(packed: torch.Tensor, bits: int, rows: int, groups: int) -> torch.Tensor:
    """Inverse of `pack_zero_points`: uint8 [rows, groups]."""
    return unpack(packed.reshape(-1), bits, rows * groups).view(rows, groups)


def unpack_zero_point_rows(packed: torch.Tensor, bits: int, groups: int, rows: torch.Tensor) -> torch.Tensor:
    """Rows `rows` of a packed [R, groups] zero-point table (uint8 [len(rows), groups]), read from the bytes
    that hold them only: an embedding lookup does not unpack the whole table."""
    i = rows.reshape(-1, 1).to(torch.int64) * groups + torch.arange(groups, dtype=torch.int64)  # [r, G]
    flat = packed.reshape(-1)
    if bits == 8:
        return flat[i]
    chunk, pos = i // 8, i % 8  # a chunk of 8 codes is one little-endian `bits`-byte word
    word = torch.zeros_like(i)
    for j in range(bits):
        word |= flat[chunk * bits + j].to(torch.int64) << (8 * j)
    return ((word >> (pos * bits)) & ((1 << bits) - 1)).to(torch.uint8)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[..., n] integer codes in [0, 2^bits) -> [..., ceil(n/8)*bits] uint8."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    *lead, n = codes.shape
    c = codes.reshape(-1, n).to(torch.int64)
    if c.numel() and (c.min() < 0 or c.max() >= (1 << bits)):
        raise ValueError(f"codes out of range for {bits}-bit packing")
    if bits == 8:
        return c.to(torch.uint8).reshape(*lead, n)
    pad = (-n) % 8
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.reshape(c.shape[0], -1, 8)  # [rows, chunks, 8]
    shifts = torch.arange(8, dtype=torch.int64) * bits
    word = (c << shifts).sum(dim=-1)  # [rows, chunks]: at most 56 bits, no sign issues
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    out = ((word.unsqueeze(-1) >> byte_shifts) & 0xFF).to(torch.uint8)  # [rows, chunks, bits]
    return out.reshape(*lead, -1)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack`: [..., ceil(n/8)*bits] uint8 -> [..., n] uint8 codes."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    *lead, nbytes = packed.shape
    if nbytes != packed_row_bytes(n, bits):
        raise ValueError(f"packed row has {nbytes} bytes, expected {packed_row_bytes(n, bits)} for {n} {bits}-bit codes")
    if bits == 8:
        return packed.clone()
    if bits in (2, 4):  # whole codes per byte: shift-and-mask in uint8, no 64-bit words
        per = 8 // bits
        shifts = torch.arange(per, dtype=torch.uint8) * bits
        out = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
        return out.reshape(*lead, -1)[..., :n]
    wide = torch.int32 if bits <= 3 else torch.int64  # a chunk is an 8*bits-bit word
    p = packed.reshape(-1, nbytes // bits, bits).to(wide)  # [rows, chunks, bits]
    word = p[..., 0].clone()
    for j in range(1, bits):
        word |= p[..., j] << (8 * j)  # [rows, chunks]
    shifts = torch.arange(8, dtype=wide) * bits
    out = ((word.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).to(torch.uint8)
    return out.reshape(*lead, -1)[..., :n]
