"""The int4 kernel computes the same linear map as the reference (dequantize + matmul)."""
import pytest
import torch
from torch import nn

from lowbit.core.scheme import Scheme
from lowbit.kernels import REFERENCE, choose_kernel, reference_forward
from lowbit.kernels.int4 import Int4Kernel, Int8x2Kernel, kernel_group
from lowbit.nn.qlinear import QuantLinear

# The kernel runs in bfloat16 activations (8-bit mantissa; fp32 accumulation) and returns bf16:
# relative to the output's scale, a few bf16 ulps.
INT4_RTOL = 2e-2

needs_kernel = pytest.mark.skipif(not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"),
                                  reason="torch has no CPU int4 matmul")


@needs_kernel
@pytest.mark.parametrize("K,scheme,G", [
    (576, Scheme(4, True, "group", 128), 64),   # short last group (576 = 4*128 + 64)
    (576, Scheme(4, False, "group", 128), 64),
    (256, Scheme(4, False, "group", 32), 32),
    (1536, Scheme(4, True, "group", 256), 256),
    (512, Scheme(4, False, "channel"), 256),
])
@pytest.mark.parametrize("M", [1, 7])
def test_int4_equals_reference(K, scheme, G, M):
    torch.manual_seed(K + M)
    lin = nn.Linear(K, 48, bias=True)
    q = QuantLinear.from_linear(lin, scheme)
    assert kernel_group(q) == G and choose_kernel(q) == Int4Kernel(G)
    x = torch.randn(2, M, K)
    y, ref = q(x), reference_forward(q, x)
    assert y.shape == ref.shape == (2, M, 48)
    assert (y - ref).abs().max() <= INT4_RTOL * ref.abs().max()


@needs_kernel
def test_int4_bf16_input():
    q = QuantLinear.from_linear(nn.Linear(256, 32), Scheme(4, True, "group", 64))
    x = torch.randn(3, 256)
    y = q(x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert (y.float() - reference_forward(q, x)).abs().max() < 0.05 * reference_forward(q, x).abs().max()


def test_many_rows_take_the_reference_path():
    q = QuantLinear.from_linear(nn.Linear(256, 32), Scheme(4, True, "group", 64))
    x = torch.randn(2, 40, 256)  # prefill-sized: the kernel is slower than the reference here
    assert torch.equal(q(x), reference_forward(q, x))


def test_shapes_the_kernel_refuses_fall_back():
    q = QuantLinear.from_linear(nn.Linear(72, 16), Scheme(4, True, "group", 32))  # 72 is not a multiple of 32
    assert choose_kernel(q) is REFERENCE
    x = torch.randn(2, 72)
    assert torch.equal(q(x), reference_forward(q, x))
    q16 = QuantLinear.from_linear(nn.Linear(256, 36), Scheme(4, True, "group", 32))  # rows not a multiple of 16
    assert choose_kernel(q16) is REFERENCE
    q3 = QuantLinear.from_linear(nn.Linear(256, 16), Scheme(3, True, "group", 32))
    assert choose_kernel(q3) is REFERENCE


@needs_kernel
def test_environment_forces_the_reference(monkeypatch):
    monkeypatch.setenv("LOWBIT_KERNELS", "reference")
    q = QuantLinear.from_linear(nn.Linear(256, 16), Scheme(4, True, "group", 32))
    assert choose_kernel(q) is REFERENCE


@needs_kernel
def test_cache_is_rebuilt_after_load(tmp_path):
    a = QuantLinear.from_linear(nn.Linear(256, 16), Scheme(4, True, "group", 32))
    b = QuantLinear.from_linear(nn.Linear(256, 16), Scheme(4, True, "group", 32))
    x = torch.randn(1, 256)
    b(x)  # packs b's weight
    b.load_state_dict(a.state_dict())
    assert torch.equal(b(x), a(x))


@needs_kernel
@pytest.mark.parametrize("scheme,G", [
    (Scheme(8, True, "channel"), 64),         # 576 columns per channel: kernel groups of 64
    (Scheme(8, False, "group", 128), 64),
    (Scheme(8, True, "group", 32), 32),
])
@pytest.mark.parametrize("M", [1, 9])
def test_8bit_as_two_int4_halves_equals_reference(scheme, G, M):
    torch.manual_seed(M)
    q = QuantLinear.from_linear(nn.Linear(576, 48, bias=True), scheme)
    assert choose_kernel(q) == Int8x2Kernel(G)
    x = torch.randn(2, M, 576)
    y, ref = q(x), reference_forward(q, x)
    assert y.shape == ref.shape and y.dtype == torch.float32
    assert (y - ref).abs().max() <= INT4_RTOL * ref.abs().max()


@needs_kernel
def test_8bit_halves_recombine_the_codes_exactly():
    # integer weights and a power-of-two scale: every bf16 product is exact, so the two passes sum to the reference
    from lowbit.kernels.int4 import int8x2_mm, pack_int8_as_int4x2

    q = QuantLinear.from_linear(nn.Linear(64, 16, bias=False), Scheme(8, False, "group", 64))
    with torch.no_grad():
        q.scales.fill_(0.125)
    x = torch.randint(-4, 5, (2, 64)).float()
    y = int8x2_mm(x, *pack_int8_as_int4x2(q, 64, torch.bfloat16), 64)
    assert torch.equal(y, x @ q.dequantize_weight().T)


@needs_kernel
def test_packing_in_row_chunks_equals_packing_at_once(monkeypatch):
    import lowbit.kernels.int4 as int4

    torch.manual_seed(0)
    q = QuantLinear.from_linear(nn.Linear(64, 80, bias=False), Scheme(8, False, "group", 32))  # 160 packed rows
    whole = int4.pack_int8_as_int4x2(q, 32, torch.bfloat16)
    monkeypatch.setattr(int4, "CHUNK_ROWS", 64)  # 64 + 64 + 32-row tail
    chunked = int4.pack_int8_as_int4x2(q, 32, torch.bfloat16)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])
