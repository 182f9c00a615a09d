"""The W8 weight-only kernel computes the same linear map as the reference (dequantize + matmul)."""
import pytest
import torch
from torch import nn

from lowbit.core.scheme import Scheme
from lowbit.kernels import REFERENCE, choose_kernel, reference_forward
from lowbit.kernels.w8 import W8Kernel, int8_mm, pack_int8, w8_forward
from lowbit.nn.qlinear import QuantLinear

# Same products, another summation order (fp32): relative to the output's scale.
W8_RTOL = 1e-5

needs_kernel = pytest.mark.skipif(not hasattr(torch.ops.aten, "_weight_int8pack_mm"),
                                  reason="torch has no CPU int8 weight matmul")


@needs_kernel
@pytest.mark.parametrize("M", [1, 5, 16])
@pytest.mark.parametrize("bias", [True, False])
def test_w8_equals_reference(M, bias):
    torch.manual_seed(M)
    q = QuantLinear.from_linear(nn.Linear(576, 96, bias=bias), Scheme(8, True, "channel"))
    x = torch.randn(2, M, 576)
    y, ref = w8_forward(q, x), reference_forward(q, x)
    assert y.shape == ref.shape == (2, M, 96) and y.dtype == torch.float32
    assert (y - ref).abs().max() <= W8_RTOL * ref.abs().max()


@needs_kernel
def test_fused_rows_equal_separate_layers():
    torch.manual_seed(0)
    parts = [QuantLinear.from_linear(nn.Linear(64, n, bias=False), Scheme(8, True, "channel")) for n in (32, 16)]
    x = torch.randn(3, 64)
    y = int8_mm(x, *pack_int8(parts))
    assert torch.equal(y, torch.cat([int8_mm(x, *pack_int8(p)) for p in parts], -1))


@pytest.mark.parametrize("scheme", [Scheme(8, False, "channel"), Scheme(8, True, "group", 32)])
def test_other_8bit_schemes_take_the_reference(scheme):
    q = QuantLinear.from_linear(nn.Linear(72, 16), scheme)  # 72 columns: the int4 kernel cannot tile them either
    assert choose_kernel(q) is REFERENCE


def test_the_kernel_serves_per_channel_rows_the_int4_kernel_cannot_tile():
    q = QuantLinear.from_linear(nn.Linear(72, 16), Scheme(8, True, "channel"))  # 72 columns: no int4 group
    assert choose_kernel(q) == W8Kernel()
    x = torch.randn(3, 72)
    assert (q(x) - reference_forward(q, x)).abs().max() <= W8_RTOL * reference_forward(q, x).abs().max()


def test_many_rows_take_the_reference_path():
    q = QuantLinear.from_linear(nn.Linear(72, 16), Scheme(8, True, "channel"))
    x = torch.randn(2, 40, 72)  # prefill-sized: the kernel is far slower than the reference here
    assert torch.equal(q(x), reference_forward(q, x))
