"""The C++ CPU kernels' vector paths (csrc/cpu/isa.h): ``scalar | avx2 | avx512``.

Every path this CPU supports runs every C++ op over a battery of inputs (odd sizes, both
layouts, fp32/fp16/bf16, NaN / inf / ties) and must give bit-identical results to the
scalar path -- the kernels use the same lane-independent arithmetic and the same order of
every sum on every path -- so a difference between an AVX2 machine and an AVX-512 machine
shows up on either.  The other tests check the default path against the reference within
the documented bounds.  Also: choosing a path (``set_cpu_isa``, ``use_cpu_isa``,
``MIPNET_KERNELS_CPU_ISA``) and refusing one the CPU lacks with a clear error.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import mipnet_kernels as mk
from mipnet_kernels import _extension

pytestmark = pytest.mark.skipif(not _extension.cpu_extension()[0],
                                reason=f"C++ CPU extension not loaded: {_extension.cpu_extension()[1]}")

ISAS = mk.cpu_isas()
OTHER_ISAS = [i for i in ISAS if i != "scalar"]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def same(a, b) -> bool:
    """Bitwise equality of two (nested) results, NaN equal to NaN of the same bits."""
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if a.dtype != b.dtype or a.shape != b.shape or a.stride() != b.stride():
        return False
    if a.is_floating_point():
        ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))
    return torch.equal(a, b)


def on_every_path(fn):
    """``fn()`` on each supported path; asserts they equal the scalar path bit for bit."""
    with mk.use_backend("cpu"):
        with mk.use_cpu_isa("scalar"):
            want = fn()
        for isa in OTHER_ISAS:
            with mk.use_cpu_isa(isa):
                got = fn()
            assert same(got, want), f"the {isa} path differs from the scalar path"
    return want


def heatmaps(B, K, H, W, dtype, layout, seed, special=None):
    g = torch.Generator().manual_seed(seed)
    hm = torch.rand(B, K, H, W, generator=g)
    if special == "ties":  # several equal maxima, the first must win
        hm = (hm * 4).floor()
    elif special == "nan":
        hm[0, 0, H // 2, W // 2] = float("nan")
    elif special == "inf":
        hm[0, 0, 1, 1] = float("inf")
        hm[0, min(1, K - 1), 0, 0] = float("-inf")
    hm = hm.to(dtype)
    if layout == "channels_last":
        hm = hm.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        hm = hm.transpose(2, 3).contiguous().transpose(2, 3)
    return hm


# --------------------------------------------------------------------------- paths
def test_scalar_path_always_available():
    assert "scalar" in ISAS
    assert mk.get_cpu_isa() in ISAS


def test_default_path_is_the_best_available():
    # The process default (set at load; tests put it back with use_cpu_isa).
    code = "import mipnet_kernels as mk; print(mk.get_cpu_isa(), ','.join(mk.cpu_isas()))"
    env = {k: v for k, v in os.environ.items() if k != _extension.ISA_ENV}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[0] == out[1].split(",")[-1]


def test_set_cpu_isa_round_trip_and_errors():
    before = mk.get_cpu_isa()
    with mk.use_cpu_isa("scalar"):
        assert mk.get_cpu_isa() == "scalar"
    assert mk.get_cpu_isa() == before
    with pytest.raises(ValueError, match="name='sse9'.*not one of scalar, avx2, avx512"):
        mk.set_cpu_isa("sse9")
    for isa in ("scalar", "avx2", "avx512"):
        if isa not in ISAS:
            with pytest.raises(ValueError, match=f"cannot run the {isa} path"):
                mk.set_cpu_isa(isa)
    assert mk.get_cpu_isa() == before


@pytest.mark.parametrize("value", ["scalar", "avx2", "avx512", "bogus"])
def test_environment_variable(value):
    """MIPNET_KERNELS_CPU_ISA picks the path at load; one this CPU lacks (or an unknown
    name) makes the cpu backend unavailable with the reason, and asking for it raises."""
    code = (
        "import warnings, torch\n"
        "warnings.simplefilter('ignore')\n"
        "import mipnet_kernels as mk\n"
        "b = mk.available_backends()['cpu']\n"
        "print('ISA', mk.get_cpu_isa() if b['available'] else 'none')\n"
        "print('REASON', b['reason'])\n"
        "try:\n"
        "    with mk.use_backend('cpu'):\n"
        "        mk.decode_heatmaps(torch.rand(1, 1, 4, 4), mode='argmax')\n"
        "    print('RAN')\n"
        "except RuntimeError as e:\n"
        "    print('ERROR', e)\n"
    )
    env = dict(os.environ, **{_extension.ISA_ENV: value})
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout
    if value in ISAS:
        assert f"ISA {value}" in out and "RAN" in out, out
    else:
        assert "ISA none" in out, out
        assert f"MIPNET_KERNELS_CPU_ISA={value}" in out and "ERROR" in out, out


def test_info_names_the_path():
    out = subprocess.run([sys.executable, "-m", "mipnet_kernels.info"], capture_output=True,
                         text=True, check=True).stdout
    assert f"cpu isa: {mk.get_cpu_isa()}" in out


# --------------------------------------------------------------------------- ops
@pytest.mark.parametrize("mode", ["argmax", "quarter", "dark", "udp"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, layout, special", [
    ((2, 17, 64, 48), "contiguous", None),
    ((3, 5, 13, 11), "contiguous", "ties"),
    ((1, 3, 7, 300), "contiguous", "nan"),   # long rows: several blocks + a tail
    ((2, 4, 9, 9), "contiguous", "inf"),
    ((2, 19, 10, 7), "channels_last", None),
    ((2, 3, 11, 6), "strided", "ties"),
    ((1, 1, 1, 1), "contiguous", None),
])
def test_decode_identical_on_every_path(mode, dtype, shape, layout, special):
    hm = heatmaps(*shape, dtype, layout, seed=sum(shape), special=special)
    aff = torch.randn(shape[0], 2, 3, generator=torch.Generator().manual_seed(1))
    on_every_path(lambda: mk.decode_heatmaps(hm, mode=mode, affine=aff))


@pytest.mark.parametrize("n", [1, 7, 8, 31, 255, 256, 257, 1000, 3072, 4099, 70000])
def test_argmax_first_maximum_every_length(n):
    """The block scan's bookkeeping at every boundary: the first of equal maxima, wherever
    it falls (first, last, inside a block, in the tail)."""
    g = torch.Generator().manual_seed(n)
    for pos in sorted({0, n // 3, n - 1}):
        hm = torch.rand(1, 1, 1, n, generator=g) * 0.5
        hm[0, 0, 0, pos] = 1.0
        if pos + 1 < n:
            hm[0, 0, 0, n - 1] = 1.0  # a later tie must not win
        coords, scores = on_every_path(lambda: mk.decode_heatmaps(hm, mode="argmax"))
        assert coords[0, 0, 0].item() == pos and scores[0, 0].item() == 1.0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, layout", [((2, 17, 64, 48), "contiguous"), ((3, 5, 7, 13), "contiguous"),
                                           ((2, 4, 6, 9), "channels_last"), ((1, 2, 5, 16), "strided")])
@pytest.mark.parametrize("shift", [True, False])
def test_flip_merge_identical_on_every_path(dtype, shape, layout, shift):
    a = heatmaps(*shape, dtype, layout, seed=1)
    b = heatmaps(*shape, dtype, layout, seed=2)
    pairs = [(0, 1)] if shape[1] > 1 else []
    on_every_path(lambda: mk.flip_merge(a, b, pairs, shift=shift))


def mimb_inputs(B, C, H, W, dtype, layout, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, C, H, W, generator=g) + 1).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    Cr = max(C // 4, 1)
    w1 = torch.randn(Cr, C, generator=g) / C ** 0.5
    w2 = torch.randn(C, Cr, generator=g) / Cr ** 0.5
    return x, w1, w2, g


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, layout", [
    ((4, 32, 16, 12), "contiguous"), ((3, 37, 5, 7), "contiguous"), ((2, 384, 3, 2), "channels_last"),
    ((3, 24, 9, 5), "channels_last"), ((2, 8, 1, 1), "contiguous"),
])
def test_mimb_identical_on_every_path(dtype, shape, layout):
    B, C = shape[:2]
    x, w1, w2, g = mimb_inputs(*shape, dtype, layout, seed=C)
    v = torch.rand(B, C, generator=g)
    table = torch.rand(2, C, generator=g)
    dy = torch.randn(x.shape, generator=g).to(dtype).contiguous(
        memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)

    def run():
        xs, w1s, w2s, vs = (t.detach().clone().requires_grad_(True) for t in (x.float(), w1, w2, v))
        xs = xs.to(dtype).contiguous(memory_format=torch.channels_last if layout == "channels_last"
                                     else torch.contiguous_format).detach().requires_grad_(True)
        y = mk.mimb_scale(xs, w1s, w2s, vs)
        y.backward(dy)
        inst = mk.mimb_instances(x, w1, w2, table)
        return y.detach(), xs.grad, w1s.grad, w2s.grad, vs.grad, inst

    on_every_path(run)


@pytest.mark.parametrize("B, C, H, W, kind", [(3, 48, 7, 5, "soft"), (4, 32, 6, 4, "index")])
def test_mimb_training_step_identical_on_every_path(B, C, H, W, kind):
    torch.manual_seed(0)
    m = mk.MIMB(C, 2).train()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, C, H, W, generator=g)
    lam = (torch.softmax(torch.randn(B, 2, generator=g), 1) if kind == "soft"
           else torch.arange(B) % 2)
    dy = torch.randn(x.shape, generator=g)

    def run():
        mm = __import__("copy").deepcopy(m)
        xs = x.clone().requires_grad_(True)
        y = mm(xs, lam)
        y.backward(dy)
        return (y.detach(), xs.grad, *[p.grad for p in mm.parameters()], *mm.buffers())

    on_every_path(run)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_nms_identical_on_every_path(dtype):
    g = torch.Generator().manual_seed(5)
    n, K = 300, 17
    centers = torch.rand(n, 1, 2, generator=g) * 200
    kpts = torch.cat([centers + torch.randn(n, K, 2, generator=g) * 8,
                      torch.rand(n, K, 1, generator=g)], dim=2).to(dtype)
    scores = torch.rand(n, generator=g).to(dtype)
    scores[10:20] = scores[0]  # ties
    areas = (torch.rand(n, generator=g) * 3000 + 100).to(dtype)
    batch = torch.randint(0, 7, (n,), generator=g)
    on_every_path(lambda: mk.oks_nms(kpts, scores, areas, batch, threshold=0.5))
    on_every_path(lambda: mk.soft_oks_nms(kpts, scores, areas, batch, threshold=0.3, max_dets=20))
