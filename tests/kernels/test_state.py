"""Per-module kernel state (kernels/state.py): chosen and packed once, replaced whenever the weights change;
the kinds of quantized modules a checkpoint names map to classes in one table (nn/kinds.py)."""
import torch
from torch import nn

from lowbit.core.scheme import Scheme
from lowbit.kernels import KernelState, choose_kernel
from lowbit.kernels.int4 import Int4Kernel, MAX_ROWS
from lowbit.nn.kinds import MODULE_KINDS
from lowbit.nn.qlinear import QuantLinear


def test_a_module_keeps_its_kernel_and_packed_copy_until_its_weights_change():
    torch.manual_seed(0)
    q = QuantLinear.from_linear(nn.Linear(128, 64, bias=False), Scheme(4, True, "group", 64))
    assert q.kstate == KernelState()
    k = choose_kernel(q)
    assert k == Int4Kernel(64) and q.kstate.kernel is k and choose_kernel(q) is k
    x = torch.randn(MAX_ROWS + 1, 128)
    q(x)  # more rows than the kernel takes: the reference path, nothing packed
    assert q.kstate.packed is None
    y = q(x[:2])
    packed = q.kstate.packed
    assert packed is not None and torch.equal(q(x[:2]), y) and q.kstate.packed is packed
    q.to(torch.float32)  # .to() and the like: a fresh state
    assert q.kstate == KernelState()
    q(x[:2])
    q.load_state_dict(q.state_dict())
    assert q.kstate.packed is None and q.kstate.kernel is None


def test_checkpoint_kinds_are_one_table():
    assert sorted(MODULE_KINDS) == ["embedding", "linear", "llm-int8", "w8a8"]
    assert all(cls.kind == k and hasattr(cls, "from_entry") and hasattr(cls, "entry") for k, cls in MODULE_KINDS.items())
