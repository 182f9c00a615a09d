import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.core.quant import dequantize, quantize
from lowbit.core.scheme import Scheme
from lowbit.kernels import reference_forward
from lowbit.nn.qlinear import QuantEmbedding, QuantLinear

SCHEMES = [
    Scheme(8, True, "channel"), Scheme(4, True, "group", 32), Scheme(4, False, "group", 32),
    Scheme(3, True, "group", 128), Scheme(3, False, "group", 20), Scheme(2, False, "group", 64),
    Scheme(5, False, "tensor"), Scheme(6, True, "group", 7),
]


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.describe())
@pytest.mark.parametrize("in_features", [72, 130])
def test_dequantized_weight_equals_core(scheme, in_features):
    torch.manual_seed(0)
    lin = nn.Linear(in_features, 24, bias=True)
    q = QuantLinear.from_linear(lin, scheme)
    expected = dequantize(quantize(lin.weight.detach(), scheme))
    assert torch.equal(q.dequantize_weight(), expected)  # integer path: exact
    assert torch.equal(q.codes(), quantize(lin.weight.detach(), scheme).codes.to(torch.int32))
    x = torch.randn(2, 5, in_features)
    assert torch.equal(reference_forward(q, x), F.linear(x, expected, lin.bias))  # the reference path: exact
    assert torch.allclose(q(x), F.linear(x, expected, lin.bias), atol=1e-5)  # a kernel may sum in another order


def test_memory_really_shrinks_and_float_weight_is_released():
    lin = nn.Linear(576, 1536, bias=False)
    ref = weakref.ref(lin.weight)
    float_bytes = lin.weight.numel() * 4
    q = QuantLinear.from_linear(lin, Scheme(4, True, "group", 128))
    del lin
    gc.collect()
    assert ref() is None
    assert not any(t.is_floating_point() and t.numel() >= 576 * 1536 for t in q.state_dict().values())
    assert q.weight_nbytes() == 576 * 1536 // 2 + 1536 * 5 * 2  # 4-bit codes + fp16 scales (5 groups/row)
    assert q.weight_nbytes() < float_bytes / 7


def test_quant_embedding_rows():
    emb = nn.Embedding(50, 40)
    sch = Scheme(4, False, "group", 16)
    q = QuantEmbedding.from_embedding(emb, sch)
    ids = torch.tensor([[3, 7, 3], [49, 0, 7]])
    full = dequantize(quantize(emb.weight.detach(), sch))
    assert torch.equal(q(ids), full[ids])
