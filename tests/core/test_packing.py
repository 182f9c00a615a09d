import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.core.packing import pack, packed_row_bytes, unpack


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([2, 3, 4, 8]), st.integers(1, 4), st.integers(1, 100), st.integers(0, 2**31 - 1))
def test_round_trip(bits, rows, n, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (rows, n), generator=g)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, packed_row_bytes(n, bits))
    assert torch.equal(unpack(packed, bits, n).long(), codes)


def test_three_bit_is_truly_packed():
    assert packed_row_bytes(576, 3) == 576 * 3 // 8  # 216 bytes, not 288
    # codes 0..7 form one 24-bit little-endian word: sum(i << 3i) = 0xFAC688
    assert pack(torch.arange(8).reshape(1, 8), 3).tolist() == [[0x88, 0xC6, 0xFA]]


def test_known_layouts():
    assert pack(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]), 4).tolist() == [[0x21, 0x43, 0x65, 0x87]]  # low nibble first
    assert pack(torch.tensor([[1, 2, 3, 0, 3, 0, 0, 0]]), 2).tolist() == [[0b00111001, 0b00000011]]
    assert pack(torch.tensor([[1, 2, 3, 4]]), 4).tolist() == [[0x21, 0x43, 0, 0]]  # padded to a chunk of 8
    assert pack(torch.tensor([[200, 7]]), 8).tolist() == [[200, 7]]


def test_out_of_range_refused():
    with pytest.raises(ValueError):
        pack(torch.tensor([[16]]), 4)
    with pytest.raises(ValueError):
        unpack(torch.zeros(1, 5, dtype=torch.uint8), 4, 12)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("rows,groups", [(576, 5), (192, 9), (1, 1), (7, 3)])
def test_zero_points_pack_as_one_row(bits, rows, groups):
    """A module's zero-point table packs row-major as one row: no row pads its last byte, and it unpacks to
    the same table."""
    from lowbit.core.packing import pack_zero_points, unpack_zero_points, zero_points_nbytes

    z = torch.randint(0, 1 << bits, (rows, groups))
    p = pack_zero_points(z, bits)
    assert p.dtype == torch.uint8 and p.shape == (zero_points_nbytes(rows, groups, bits),)
    assert p.numel() == packed_row_bytes(rows * groups, bits) <= rows * packed_row_bytes(groups, bits)
    assert torch.equal(unpack_zero_points(p, bits, rows, groups).to(torch.int64), z)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_zero_point_rows_read_from_their_bytes_equal_the_whole_table(bits):
    from lowbit.core.packing import pack_zero_points, unpack_zero_point_rows, unpack_zero_points

    z = torch.randint(0, 1 << bits, (37, 5))
    p = pack_zero_points(z, bits)
    rows = torch.tensor([0, 36, 5, 5, 17, 1])
    assert torch.equal(unpack_zero_point_rows(p, bits, 5, rows), unpack_zero_points(p, bits, 37, 5)[rows])
