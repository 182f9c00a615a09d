"""kernels/decode.c against its torch references (kernels/native.py), and the C build's failure path."""
import pytest
import torch
from torch import nn

from lowbit.core.scheme import Scheme
from lowbit.kernels import native as N
from lowbit.nn.qlinear import QuantLinear

L = N.lib()
pytestmark = pytest.mark.skipif(L is None, reason="no C compiler: the lean decoder uses torch ops")

F32_RTOL = 1e-5  # float32 sums in another order (vectorized)
BF16_RTOL = 2 ** -7  # one bf16 rounding step where the float32 value before rounding differs in its last bits


def close(a, b, rtol):
    return (a.float() - b.float()).abs().max().item() <= rtol * b.float().abs().max().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("with_y", [True, False])
def test_add_rmsnorm(dtype, with_y):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(576, generator=g)
    y = torch.randn(576, generator=g).to(dtype) if with_y else None
    w = torch.randn(576, generator=g)
    x_ref, out = x.clone(), torch.empty(576, dtype=dtype)
    N.add_rmsnorm(L, x, y, w, 1e-5, out)
    ref = N.add_rmsnorm_reference(x_ref, y, w, 1e-5, dtype)
    assert torch.equal(x, x_ref)  # the residual update is one float32 add per element
    assert close(out, ref, BF16_RTOL if dtype == torch.bfloat16 else F32_RTOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_silu_mul(dtype):
    gu = torch.randn(2 * 1536, generator=torch.Generator().manual_seed(1)).to(dtype)
    out = torch.empty(1536, dtype=dtype)
    N.silu_mul(L, gu, out)
    assert close(out, N.silu_mul_reference(gu, dtype), BF16_RTOL if dtype == torch.bfloat16 else F32_RTOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("nh,nkv,hd,pos", [(9, 3, 64, 0), (9, 3, 64, 37), (4, 4, 32, 100), (8, 2, 16, 7)])
def test_attn_decode(dtype, nh, nkv, hd, pos):
    g = torch.Generator().manual_seed(pos)
    max_len = 128
    qkv = torch.randn((nh + 2 * nkv) * hd, generator=g).to(dtype)
    cos, sin = torch.randn(hd, generator=g), torch.randn(hd, generator=g)
    kc = torch.randn(nkv, max_len, hd, generator=g).half()
    vc = torch.randn(nkv, max_len, hd, generator=g).half()
    kc_ref, vc_ref = kc.clone(), vc.clone()
    out = torch.empty(nh * hd, dtype=dtype)
    N.attn_decode(L, qkv, cos, sin, kc, vc, pos, nh, nkv, hd, hd ** -0.5, torch.empty(nh * max_len + (nh + nkv) * hd), out)
    ref = N.attn_decode_reference(qkv, cos, sin, kc_ref, vc_ref, pos, nh, nkv, hd, hd ** -0.5, dtype)
    assert torch.equal(vc, vc_ref)  # v rows copied; other positions untouched
    assert (kc.float() - kc_ref.float()).abs().max() <= 2 ** -10 * kc_ref.float().abs().max()  # k roped (fma), then fp16
    assert close(out, ref, BF16_RTOL if dtype == torch.bfloat16 else F32_RTOL)


def qlinear(bits, sym, group, K, N_out, bias=False, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(K, N_out, bias=bias)
    scheme = Scheme(bits, sym, "channel") if group is None else Scheme(bits, sym, "group", group)
    return QuantLinear.from_linear(lin, scheme)


CASES = [(4, True, 128, 576), (4, False, 128, 576), (4, True, 64, 128), (4, False, 64, 1536), (4, True, None, 192),
         (8, True, None, 576), (8, False, 128, 576), (8, True, 32, 96)]


@pytest.mark.parametrize("bits,sym,group,K", CASES)
def test_qweight_holds_the_modules_weight(bits, sym, group, K):
    m = qlinear(bits, sym, group, K, 48)
    qw = N.QWeight([m])
    assert qw.weights[0].data_ptr() == m.qweight.data_ptr()  # read in place, not copied
    reps = qw.G
    s = qw.s.repeat_interleave(reps, 1)[:, :K]
    sz = qw.sz.repeat_interleave(reps, 1)[:, :K]
    assert torch.allclose(s * qw.codes() - sz, m.dequantize_weight(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("xdtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bits,sym,group,K", CASES)
def test_linear_q_equals_its_reference_and_the_float_matvec(bits, sym, group, K, xdtype):
    mods = [qlinear(bits, sym, group, K, n, bias=True, seed=n) for n in (64, 36, 8)]  # segments, N % 4 != 0
    qw = N.QWeight(mods)
    x = torch.randn(K, generator=torch.Generator().manual_seed(3)).to(xdtype)
    out = torch.empty(qw.N)
    N.linear_q(L, qw, x, out)
    ref = N.linear_q_reference(qw, x, torch.float32)
    assert close(out, ref, F32_RTOL)  # exact integer dots; float combination in another order
    full = torch.cat([m(x.float().unsqueeze(0))[0] for m in mods])
    assert close(out, full, 2e-2)  # int8 activations per block of up to 128 columns against float x


@pytest.mark.parametrize("interleave,ab", [(False, 32), (False, 64), (False, 128), (True, 32), (True, 64), (True, 128)])
def test_activation_quantization_is_within_half_a_step(interleave, ab):
    x = torch.randn(4096 + 64, generator=torch.Generator().manual_seed(4)) * 3  # a shorter last block at ab = 128
    xq, d, cols, blk = N.quantize_act_reference(x, interleave, ab)
    assert xq.abs().max() <= 127 and torch.equal(cols.sort().values, torch.arange(x.numel()))
    if not interleave or ab >= 64:
        assert torch.equal(cols // ab, blk)  # a block holds its own columns, whatever the order inside it
    err = (x[cols] - xq.float() * d[blk]).abs()
    assert (err <= d[blk] / 2 * (1 + 1e-6)).all()


def test_activation_blocks_are_llama_cpps_q8_0_blocks():
    assert {N.act_block(g) for g in (32, 64, 96, 128, 192, 256, 576, 1536)} == {32}


def test_applies_only_where_the_layout_fits():
    assert N.QWeight.applies([qlinear(4, True, 128, 576, 16)])
    assert not N.QWeight.applies([qlinear(4, True, 128, 96, 16)])  # 4-bit needs K % 64
    assert not N.QWeight.applies([qlinear(4, True, 32, 192, 16)])  # 4-bit: groups of 64k columns
    assert N.QWeight.applies([qlinear(8, True, 32, 192, 16)])  # 8-bit: groups of 32k columns
    assert not N.QWeight.applies([qlinear(3, True, 128, 576, 16)])
    assert not N.QWeight.applies([qlinear(4, True, 128, 576, 16), qlinear(4, False, 128, 576, 16)])


def test_loading_the_library_keeps_denormals():
    # a library linked with -ffast-math would switch the process to flush-to-zero when loaded
    assert (torch.tensor([1e-40]) * 1).item() != 0


def test_build_failure_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with pytest.raises(OSError):
        N.build(tmp_path)
    assert not list(tmp_path.glob("*.so"))  # nothing half-written


# ---- the library cache: nothing but the library lowbit built is ever loaded (issue 24) ----------------------

import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import stat  # noqa: E402
import subprocess  # noqa: E402

from lowbit.errors import LowbitError  # noqa: E402

PLANTED = r'''
#include <stdio.h>
__attribute__((constructor)) static void planted(void) {
    FILE *f = fopen("%s", "w");
    if (f) { fputs("the planted library ran\n", f); fclose(f); }
}
int lb_abi_version(void) { return 6; }
'''


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def plant(tmp_path, target):
    """A shared library whose constructor writes a marker file, at `target` (the predictable name)."""
    marker = tmp_path / "marker"
    src = tmp_path / "planted.c"
    src.write_text(PLANTED % marker)
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    subprocess.run([cc, "-shared", "-fPIC", str(src), "-o", str(tmp_path / "planted.so")], check=True)
    if target.exists() or target.is_symlink():
        target.unlink()
    shutil.copy(tmp_path / "planted.so", target)
    return marker


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One library built by lowbit (and its record), copied into each test's cache."""
    return N.build(tmp_path_factory.mktemp("native-built"))


@pytest.fixture()
def cache(tmp_path, built, monkeypatch):
    """A private cache holding the library lowbit built; builds are counted and copy that library (no compiler
    run per test)."""
    d = tmp_path / "cache" / "native"
    d.mkdir(parents=True, mode=0o700)
    for p in (built, built.with_suffix(".json")):
        shutil.copy2(p, d / p.name)
    builds = []

    def fake_compile(cc, cflags, lflags, digest, out_dir, path):
        builds.append(path)
        shutil.copy2(built, out_dir / ".tmp.so")
        os.replace(out_dir / ".tmp.so", path)
        shutil.copy2(built.with_suffix(".json"), path.with_suffix(".json"))

    monkeypatch.setattr(N, "_compile", fake_compile)
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(N, "_PRIVATE", [])
    return d, d / built.name, builds


def works(handle):
    return handle.lb_abi_version() == N.ABI_VERSION and hasattr(handle, "lb_linear_q")


def test_the_recorded_library_is_reused_not_rebuilt(cache):
    d, so, builds = cache
    assert works(N.load(d)) and builds == []
    rec = json.loads(so.with_suffix(".json").read_text())
    assert rec["sha256"] == sha(so) and rec["source"] == N._toolchain()[3] and rec["abi"] == N.ABI_VERSION


@pytest.mark.parametrize("sidecar", ["kept", "removed"])
def test_a_planted_library_is_never_loaded(tmp_path, cache, sidecar):
    """A library of the predictable name in the cache (its constructor writes a marker) is built over, never run."""
    d, so, builds = cache
    marker = plant(tmp_path, so)
    if sidecar == "removed":
        so.with_suffix(".json").unlink()
    assert works(N.load(d)) and builds == [so]
    assert not marker.exists()
    assert sha(so) == json.loads(so.with_suffix(".json").read_text())["sha256"]


def test_lib_never_runs_a_planted_library(tmp_path, cache, monkeypatch):
    d, so, builds = cache
    marker = plant(tmp_path, so)
    monkeypatch.setattr(N, "_LIB", [])
    assert N.lib() is not None and builds == [so]
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["empty", "tampered", "truncated", "symlink", "sidecar"])
def test_an_empty_or_altered_library_is_rebuilt(tmp_path, cache, damage):
    """A 0-byte file used to turn the native ops off for good; an altered one was loaded as it was."""
    d, so, builds = cache
    good = so.read_bytes()
    if damage == "empty":
        so.write_bytes(b"")
    elif damage == "tampered":
        so.write_bytes(good[:4096] + bytes([good[4096] ^ 0xFF]) + good[4097:])
    elif damage == "truncated":
        so.write_bytes(good[: len(good) // 2])
    elif damage == "symlink":
        marker = plant(tmp_path, tmp_path / "elsewhere.so")
        so.unlink()
        os.symlink(tmp_path / "elsewhere.so", so)
    else:
        so.with_suffix(".json").write_text(json.dumps({"sha256": "0" * 64, "source": N._toolchain()[3], "abi": 6}))
    assert works(N.load(d)) and builds == [so]
    assert not so.is_symlink() and so.read_bytes() == good
    if damage == "symlink":
        assert not marker.exists()


@pytest.mark.skipif(os.getuid() != 0, reason="making a file of another user needs root")
def test_a_library_of_another_user_is_rebuilt(cache):
    d, so, builds = cache
    os.chown(so, 12345, 12345)
    assert works(N.load(d)) and builds == [so] and so.stat().st_uid == os.getuid()


@pytest.mark.parametrize("why", ["world-writable", "group-writable", "another user's", "a symlink"])
def test_a_cache_folder_others_can_write_is_ignored(tmp_path, cache, why):
    """A planted library with a record that matches it, in a folder someone else could write: not loaded; the
    library is built in a private temporary folder instead."""
    d, so, builds = cache
    if why == "another user's" and os.getuid() != 0:
        pytest.skip("making a folder of another user needs root")
    marker = plant(tmp_path, so)
    rec = {"sha256": sha(so), "source": N._toolchain()[3], "abi": N.ABI_VERSION}
    so.with_suffix(".json").write_text(json.dumps(rec))
    if why == "world-writable":
        os.chmod(d, 0o777)
    elif why == "group-writable":
        os.chmod(d, 0o770)
    elif why == "another user's":
        os.chown(d, 12345, 12345)
    else:
        os.rename(d, tmp_path / "real-native")
        os.symlink(tmp_path / "real-native", d)
    with pytest.raises(OSError):
        N.private_dir(d)
    path = N.build()
    assert d not in path.parents and builds == [path]
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700 and path.parent.stat().st_uid == os.getuid()
    assert works(N.load())
    assert not marker.exists()


def test_a_new_cache_folder_is_private(tmp_path, cache):
    d = tmp_path / "fresh" / "native"
    N.private_dir(d)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    os.chmod(d, 0o755)  # made before: tightened (nobody else could write it)
    N.private_dir(d)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700


# ---- every C call checks its tensors against the dims it passes ------------------------------------------------

def test_add_rmsnorm_and_silu_mul_check_sizes():
    x, w = torch.randn(576), torch.randn(576)
    for args in [(x, None, w, 1e-5, torch.empty(575)), (x, torch.randn(64), w, 1e-5, torch.empty(576)),
                 (x, torch.randn(576).half(), w, 1e-5, torch.empty(576)), (x, None, torch.randn(64), 1e-5, torch.empty(576)),
                 (torch.randn(576, 2)[:, 0], None, w, 1e-5, torch.empty(576)), (x.double(), None, w, 1e-5, torch.empty(576))]:
        with pytest.raises(LowbitError, match="native decode ops: add_rmsnorm"):
            N.add_rmsnorm(L, *args)
    with pytest.raises(LowbitError, match="silu_mul gate\\|up"):
        N.silu_mul(L, torch.randn(1000), torch.empty(576))


def test_attn_decode_checks_positions_caches_and_buffers():
    nh, nkv, hd, max_len = 4, 2, 32, 16
    good = dict(qkv=torch.randn((nh + 2 * nkv) * hd), cos=torch.randn(hd), sin=torch.randn(hd),
                kc=torch.zeros(nkv, max_len, hd, dtype=torch.float16), vc=torch.zeros(nkv, max_len, hd, dtype=torch.float16),
                pos=3, nh=nh, nkv=nkv, hd=hd, scale=0.1, scratch=torch.empty(nh * max_len + (nh + nkv) * hd),
                out=torch.empty(nh * hd))
    N.attn_decode(L, **good)
    for bad in [dict(pos=max_len), dict(pos=-1), dict(kc=torch.zeros(nkv, max_len, hd)), dict(hd=1024),
                dict(vc=torch.zeros(nkv, max_len - 1, hd, dtype=torch.float16)), dict(nh=3),
                dict(scratch=torch.empty(nh * 2)), dict(qkv=torch.randn(10)), dict(out=torch.empty(8)),
                dict(cos=torch.randn(hd // 2)), dict(qkv=torch.randn((nh + 2 * nkv) * hd).half())]:
        with pytest.raises(LowbitError, match="native decode ops"):
            N.attn_decode(L, **{**good, **bad})


def test_linear_q_checks_its_input_and_output():
    qw = N.QWeight([qlinear(4, True, 64, 128, 48)])
    N.linear_q(L, qw, torch.randn(128), torch.empty(48))
    for x, out in [(torch.randn(64), torch.empty(48)), (torch.randn(128), torch.empty(47)),
                   (torch.randn(128).half(), torch.empty(48)), (torch.randn(128), torch.empty(48, dtype=torch.int32))]:
        with pytest.raises(LowbitError, match="native decode ops: linear"):
            N.linear_q(L, qw, x, out)


def test_qweight_refuses_codes_that_do_not_match_the_layer():
    """A qweight aliased to a 64-byte buffer was read 36 rows x 64 bytes deep: now refused when the projection is made."""
    m = qlinear(4, True, 64, 128, 48)
    m.qweight = torch.zeros(64, dtype=torch.uint8)
    with pytest.raises(LowbitError, match="linear codes"):
        N.QWeight([m])
    m = qlinear(8, True, None, 128, 48)
    m.scales = torch.ones(48, 2, dtype=torch.float16)
    with pytest.raises(LowbitError, match="scales of 2 groups"):
        N.QWeight([m])


def test_int8_split_and_sparse_add_check_their_arrays():
    u = torch.randint(0, 255, (3, 64), dtype=torch.uint8)
    with pytest.raises(LowbitError, match="zero points"):
        N.i8_split(L, u, torch.zeros(2, dtype=torch.int32))
    uc, rowptr, cols, vals = N.i8_split(L, u, torch.full((3,), 128, dtype=torch.int32))
    wT = torch.randint(-128, 127, (64, 8), dtype=torch.int8)
    out = torch.zeros(3, 8)
    N.i8_sparse_add(L, rowptr, cols, vals, wT, out)
    assert cols.numel() > 0
    bad_cols = cols.clone()
    bad_cols[0] = 64
    for args in [(rowptr, bad_cols, vals, wT, out), (rowptr[:-1], cols, vals, wT, out),
                 (rowptr, cols, vals, wT[:, :4], out), (rowptr, cols, vals[:-1], wT, out),
                 (rowptr.flip(0), cols, vals, wT, out)]:
        with pytest.raises(LowbitError, match="int8 sparse add"):
            N.i8_sparse_add(L, *args)


# ---- prefill: the tiled GEMM and the per-row ops for M rows (issue 25) ---------------------------------------

@pytest.mark.parametrize("xdtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bits,sym,group,K", CASES)
@pytest.mark.parametrize("M", [1, 3, 4, 9, 37])  # whole tiles of 4 rows and leftovers; AMX tiles of 16
def test_gemm_rows_equal_the_matvec_and_the_integer_reference(bits, sym, group, K, M, xdtype):
    mods = [qlinear(bits, sym, group, K, n, bias=True, seed=n) for n in (64, 36, 7)]  # segments, odd row counts
    qw = N.QWeight(mods)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to(xdtype)
    out = torch.empty(M, qw.N)
    N.gemm_q(L, qw, x, out)
    for m in range(M):  # the same integers; the decode matvec sums its lanes in its own float order (decode.c)
        row = torch.empty(qw.N)
        N.linear_q(L, qw, x[m].contiguous(), row)
        assert close(out[m], row, F32_RTOL)
    # the integer block sums are exact (int64 reference); their float combination is the reference's
    dots = N.block_dots_reference(qw, x)
    assert dots.abs().max() <= N.act_block(qw.G) * 127 * (15 if bits == 4 else 128)
    assert close(out, N.gemm_q_reference(qw, x, torch.float32), F32_RTOL)


def test_gemm_refuses_sizes_that_do_not_match():
    qw = N.QWeight([qlinear(4, True, 128, 576, 16)])
    with pytest.raises(LowbitError):
        N.gemm_q(L, qw, torch.randn(3, 512), torch.empty(3, 16))
    with pytest.raises(LowbitError):
        N.gemm_q(L, qw, torch.randn(3, 576), torch.empty(2, 16))
    with pytest.raises(LowbitError):
        N.gemm_q(L, qw, torch.randn(3, 576), torch.empty(3, 17))
    with pytest.raises(LowbitError):
        N.gemm_q(L, qw, torch.randn(3, 576).t(), torch.empty(576, 16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_row_ops_equal_the_single_row_ops(dtype):
    g = torch.Generator().manual_seed(5)
    M, n = 5, 576
    x, y, w = torch.randn(M, n, generator=g), torch.randn(M, n, generator=g).to(dtype), torch.randn(n, generator=g)
    xr, out = x.clone(), torch.empty(M, n, dtype=dtype)
    N.add_rmsnorm_rows(L, x, y, w, 1e-5, out)
    for m in range(M):
        o = torch.empty(n, dtype=dtype)
        N.add_rmsnorm(L, xr[m], y[m].contiguous(), w, 1e-5, o)
        assert torch.equal(out[m], o)
    assert torch.equal(x, xr)
    gu = torch.randn(M, 2 * n, generator=g).to(dtype)
    out = torch.empty(M, n, dtype=dtype)
    N.silu_mul_rows(L, gu, out)
    for m in range(M):
        o = torch.empty(n, dtype=dtype)
        N.silu_mul(L, gu[m].contiguous(), o)
        assert torch.equal(out[m], o)


@pytest.mark.parametrize("p", [0, 5])
def test_rope_rows_write_the_cache_once_and_equal_the_reference(p):
    nh, nkv, hd, M, max_len = 9, 3, 64, 6, 32
    g = torch.Generator().manual_seed(p)
    qkv = torch.randn(M, (nh + 2 * nkv) * hd, generator=g)
    cos, sin = torch.randn(max_len, hd, generator=g), torch.randn(max_len, hd, generator=g)
    kc, vc = torch.zeros(nkv, max_len, hd).half(), torch.zeros(nkv, max_len, hd).half()
    q, k, v = torch.empty(nh, M, hd), torch.empty(nkv, M, hd), torch.empty(nkv, M, hd)
    N.rope_rows(L, qkv, cos, sin, kc, vc, p, nh, nkv, hd, q, k, v)
    x = qkv.view(M, nh + 2 * nkv, hd)
    half = hd // 2
    qk = x[:, : nh + nkv]
    rot = torch.cat((-qk[..., half:], qk[..., :half]), -1)
    qk = qk * cos[p: p + M].unsqueeze(1) + rot * sin[p: p + M].unsqueeze(1)
    assert close(q, qk[:, :nh].transpose(0, 1), F32_RTOL) and close(k, qk[:, nh:].transpose(0, 1), F32_RTOL)
    assert torch.equal(v, x[:, nh + nkv:].transpose(0, 1).contiguous())
    assert torch.equal(kc[:, p: p + M], k.half()) and torch.equal(vc[:, p: p + M], v.half())
    assert not kc[:, :p].any() and not kc[:, p + M:].any()  # written once, at p..p+M-1 only
    with pytest.raises(LowbitError):
        N.rope_rows(L, qkv, cos, sin, kc, vc, max_len - M + 1, nh, nkv, hd, q, k, v)


@pytest.mark.parametrize("ab", [0, 16, 48, 96, 256])
def test_qweight_refuses_activation_blocks_the_kernels_do_not_take(ab):
    qw = N.QWeight([qlinear(4, True, 128, 576, 16)])
    qw.ab = ab
    with pytest.raises(LowbitError, match="activation blocks"):
        qw._check()


# ---- GPTQ's column loop in C (core/gptq.gptq_rows, cols_kernel) -----------------------------------------------

@pytest.mark.parametrize("bits,sym,group,act_order,clip", [(4, True, 32, True, 0), (4, False, 32, False, 0),
                                                         (3, False, 64, True, 0), (8, True, None, False, 0),
                                                         (2, False, 32, False, 4), (4, True, None, True, 0)])
def test_native_gptq_columns_give_the_torch_loops_bits(bits, sym, group, act_order, clip):
    from lowbit.core.gptq import gptq_rows

    torch.manual_seed(0)
    W = [torch.randn(70, 160), torch.randn(33, 160)]  # two parts, rows not a multiple of any tile
    X = torch.randn(400, 160) * torch.linspace(0.2, 3, 160)
    H = 2 * X.T @ X / 400
    H[7] = 0  # a dead column
    H[:, 7] = 0
    scheme = Scheme(bits, sym, "channel") if group is None else Scheme(bits, sym, "group", group)
    ref, ref_loss = gptq_rows(W, H.clone(), scheme, 48, 0.01, act_order, clip)  # 48: blocks across groups
    got, got_loss = gptq_rows(W, H.clone(), scheme, 48, 0.01, act_order, clip, cols_kernel=N.gptq_cols_kernel())
    assert torch.equal(got.codes, ref.codes) and torch.equal(got.scale, ref.scale)
    assert (got.zero is None and ref.zero is None) or torch.equal(got.zero, ref.zero)
    assert torch.equal(got_loss, ref_loss)


def test_native_gptq_columns_check_their_arrays():
    b, rows = 8, 16
    args = dict(W1=torch.zeros(b, rows), H1=torch.eye(b), c0=0, c1=b, grp=torch.zeros(b, dtype=torch.int32),
                sT=torch.ones(1, rows), zT=None, qmin=-8.0, qmax=7.0, Q=torch.zeros(b, rows, dtype=torch.int8),
                E=torch.zeros(b, rows))
    N.gptq_cols(L, **args)  # fine
    for k, bad in [("grp", torch.full((b,), 1, dtype=torch.int32)), ("c1", b + 1), ("Q", torch.zeros(b, rows - 1, dtype=torch.int8)),
                   ("H1", torch.eye(b + 1)), ("sT", torch.ones(1, rows + 1)), ("E", torch.zeros(b, rows).t())]:
        with pytest.raises(LowbitError, match="gptq columns"):
            N.gptq_cols(L, **{**args, k: bad})
