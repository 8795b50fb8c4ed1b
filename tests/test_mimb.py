"""MIMB ops (``mimb_scale``, ``mimb``, ``mimb_instances`` and the grouped forms): every backend
against the official layer written out in plain torch, forward and every gradient; odd
shapes, dtypes, channels_last; gradcheck (fp64, reference); opcheck; torch.compile; empty
and bad input; backend routing.

Tolerances (flash-attention's rule): ``truth`` is the eager official layer in float64 on the
(already rounded) inputs; ``eager`` the same eager code run in the test dtype.  The op's max
error must be at most ``2 x`` eager's max error, plus ``1e-5 x max|truth|`` and, in float16 /
bfloat16, half a unit in the last place of ``max|truth|`` (what one correct rounding of the
output costs; tiny tensors otherwise depend on eager's luck).
"""

from __future__ import annotations

import math

import pytest
import torch

import mipnet_kernels as mk
from anchors import official_instances, official_mimb, official_scale
from mipnet_kernels import _backends
from mipnet_kernels.ops import mimb as M
from mipnet_kernels._backends import Kernel, table
from mipnet_kernels.ops.mimb import kernels as MIMB_KERNELS
from utils import (
    MIMB_KEYS,
    backend_device_params,
    backend_params,
    check_flash,
    check_output,
    eager_with_grads,
    expected_format,
    make_case,
    relayout,
    seed_of as _seed,
    skip_unless_runs,
)

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
DTYPES = (F32, F16, BF16)
LAYOUTS = ("contiguous", "channels_last")


def on(dev, *ts, grad=False):
    return [t.detach().to(dev).requires_grad_(grad) for t in ts]


def require_op(backend, op, *args):
    """Skip unless ``backend`` implements ``op`` for these (device) inputs, with its reasons."""
    dev = args[0][0].device if isinstance(args[0], list) else args[0].device
    reasons = _backends.not_supported_reasons(op, backend, dev, *args)
    if reasons:
        pytest.skip(f"backend {backend!r} cannot run {op}: {'; '.join(reasons)}")


# --------------------------------------------------------------------------- shapes
# (B, C, H, W, r): C = 1 and 3 need r = 1 (C // r >= 1); H x W from 1x1 to 96x72; B 1 .. 48.
SHAPES = [
    (1, 1, 1, 1, 1),
    (2, 3, 7, 5, 1),
    (3, 48, 7, 5, 4),
    (2, 48, 64, 48, 4),
    (1, 384, 7, 5, 4),
    (2, 384, 1, 1, 4),
    (48, 32, 8, 6, 4),
    (1, 32, 96, 72, 4),
]
SMALL_SHAPES = [(1, 1, 1, 1, 1), (2, 3, 7, 5, 1), (3, 48, 7, 5, 4), (1, 384, 7, 5, 4), (48, 32, 3, 2, 4)]
INTERP_SHAPES = [(1, 1, 1, 1, 1), (2, 3, 7, 5, 1), (2, 16, 5, 3, 4)]


# --------------------------------------------------------------------------- mimb_scale
SCALE_CASES = [(s, d, lay) for s in SHAPES for d in DTYPES for lay in LAYOUTS]
INTERP_SCALE = [(s, d, lay) for s in INTERP_SHAPES for d in (F32, BF16) for lay in LAYOUTS]


@pytest.mark.parametrize("backend, device, shape, dtype, layout", backend_params(SCALE_CASES, INTERP_SCALE))
def test_mimb_scale(backend, device, shape, dtype, layout):
    dev = skip_unless_runs(backend, device)
    c = make_case(*shape, seed=_seed("scale", shape))
    x, w1, w2, v = (c[k].to(dtype) for k in ("x", "w1", "w2", "v"))  # a .half() model
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    xd, w1d, w2d, vd = on(dev, x, w1, w2, v, grad=True)
    xd = relayout(xd.detach(), layout).requires_grad_(True)
    require_op(backend, "mimb_scale_fwd", xd, w1d, w2d, vd)
    require_op(backend, "mimb_scale_bwd", xd, xd, w1d, w2d, vd, vd.float())

    with mk.use_backend(backend):
        y = mk.mimb_scale(xd, w1d, w2d, vd)
        y.backward(relayout(dy.to(dev), layout))
    check_output(y, xd)
    assert xd.grad.is_contiguous(memory_format=expected_format(xd)), "dx must have x's memory format"
    for t, g in ((w1d, w1d.grad), (w2d, w2d.grad), (vd, vd.grad)):
        assert g.dtype == t.dtype and g.shape == t.shape

    truth, truth_g = eager_with_grads(official_scale, dy.double(), x.double(), w1.double(), w2.double(), v.double())
    eager, eager_g = eager_with_grads(official_scale, dy, x, w1, w2, v)
    check_flash(y, eager, truth, dtype, "y")
    for name, got, e, t in zip(("dx", "dw1", "dw2", "dv"), (xd.grad, w1d.grad, w2d.grad, vd.grad), eager_g, truth_g):
        check_flash(got, e, t, dtype, name)


@pytest.mark.parametrize("backend, device, dtype", backend_params([F16, BF16], [BF16]))
def test_mimb_scale_mixed_dtypes(backend, device, dtype):
    """Low-precision x with float32 weights and embedding (autocast): float32 gradients for the
    weights, accurate to float32 given the rounded x and dy."""
    dev = skip_unless_runs(backend, device)
    c = make_case(2, 48, 7, 5, 4, seed=3)
    x = c["x"].to(dtype)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    xd, w1d, w2d, vd = on(dev, x, c["w1"], c["w2"], c["v"], grad=True)
    require_op(backend, "mimb_scale_fwd", xd, w1d, w2d, vd)
    with mk.use_backend(backend):
        y = mk.mimb_scale(xd, w1d, w2d, vd)
        y.backward(dy.to(dev))
    assert y.dtype == dtype and xd.grad.dtype == dtype
    assert w1d.grad.dtype == w2d.grad.dtype == vd.grad.dtype == F32
    truth, truth_g = eager_with_grads(official_scale, dy.double(), x.double(), *(c[k].double() for k in ("w1", "w2", "v")))
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(y.cpu().double(), truth, rtol=eps, atol=eps * 1e-3)
    torch.testing.assert_close(xd.grad.cpu().double(), truth_g[0], rtol=eps, atol=eps * float(truth_g[0].abs().max()))
    for got, want in zip((w1d.grad, w2d.grad, vd.grad), truth_g[1:]):
        torch.testing.assert_close(got.cpu().double(), want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


# --------------------------------------------------------------------------- mimb
MIMB_SHAPES = [(1, 1, 1, 1, 1, 2), (2, 3, 7, 5, 1, 3), (3, 48, 7, 5, 4, 2), (2, 48, 64, 48, 4, 2), (1, 384, 7, 5, 4, 2), (48, 32, 8, 6, 4, 4)]
MIMB_CASES = [(s, d, lay, soft) for s in MIMB_SHAPES for d in DTYPES for lay in LAYOUTS for soft in (False, True)
              if lay == "contiguous" or d == BF16]
INTERP_MIMB = [(s, F32, "contiguous", True) for s in MIMB_SHAPES[:2]]


@pytest.mark.parametrize("backend, device, shape, dtype, layout, soft", backend_params(MIMB_CASES, INTERP_MIMB))
def test_mimb(backend, device, shape, dtype, layout, soft):
    dev = skip_unless_runs(backend, device)
    B, C, H, W, r, N = shape
    c = make_case(B, C, H, W, r, N, seed=_seed("mimb", shape), soft=soft)
    args = [c[k].to(dtype) for k in MIMB_KEYS]
    dy = torch.randn(args[0].shape, generator=torch.Generator().manual_seed(4)).to(dtype)
    dargs = on(dev, *args, grad=True)
    dargs[0] = relayout(dargs[0].detach(), layout).requires_grad_(True)
    require_op(backend, "mimb_scale_fwd", dargs[0], dargs[2], dargs[3], dargs[0].new_empty(B, C, dtype=F32))
    with mk.use_backend(backend):
        y = mk.mimb(*dargs)
        y.backward(dy.to(dev))
    check_output(y, dargs[0])
    for t in dargs:
        assert t.grad is not None and t.grad.dtype == t.dtype and t.grad.shape == t.shape

    truth, truth_g = eager_with_grads(official_mimb, dy.double(), *(a.double() for a in args))
    eager, eager_g = eager_with_grads(official_mimb, dy, *args)
    check_flash(y, eager, truth, dtype, "y")
    for name, t, e, tg in zip(MIMB_KEYS, dargs, eager_g, truth_g):
        check_flash(t.grad, e, tg, dtype, f"d{name}")


@pytest.mark.parametrize("backend, device", backend_device_params())
def test_mimb_equals_mimb_scale_of_embedding(backend, device):
    """``mimb`` is ``mimb_scale`` with ``v = embed(lam)``: same values, same gradients."""
    dev = skip_unless_runs(backend, device)
    c = make_case(3, 24, 5, 4, 4, 3, seed=5, soft=True)
    a = on(dev, *(c[k] for k in MIMB_KEYS), grad=True)
    b = on(dev, *(c[k] for k in MIMB_KEYS), grad=True)
    require_op(backend, "mimb_scale_fwd", a[0], a[2], a[3], a[0].new_empty(3, 24))
    dy = torch.randn(a[0].shape).to(dev)
    with mk.use_backend(backend):
        y1 = mk.mimb(*a)
        y1.backward(dy)
        x, lam, w1, w2, e1, b1, e2, b2 = b
        y2 = mk.mimb_scale(x, w1, w2, M.mimb_embedding_reference(lam, e1, b1, e2, b2))
        y2.backward(dy)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    for t1, t2 in zip(a, b):
        torch.testing.assert_close(t1.grad, t2.grad, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- mimb_instances
# N = -2: a per-sample table [2, B, C] (training: one embedding row per output sample)
INST_CASES = ([(s, d, lay, N) for s in SMALL_SHAPES + [(2, 48, 64, 48, 4)] for d in DTYPES for lay in LAYOUTS
               for N in (1, 3) if N == 3 or (d == F32 and lay == "contiguous")]
              + [(s, d, lay, -2) for s in SMALL_SHAPES + [(2, 48, 64, 48, 4)] for d in (F32, BF16) for lay in LAYOUTS])
INTERP_INST = [(s, F32, "contiguous", 2) for s in INTERP_SHAPES] + [(INTERP_SHAPES[2], F32, "channels_last", -2)]


def per_sample_table(c, N, seed=0):
    """A per-sample table ``[N, B, C]`` for case ``c`` (values like make_case's table)."""
    B, C = c["x"].shape[:2]
    return 0.1 + 0.8 * torch.rand(N, B, C, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backend, device, shape, dtype, layout, N", backend_params(INST_CASES, INTERP_INST))
def test_mimb_instances(backend, device, shape, dtype, layout, N):
    dev = skip_unless_runs(backend, device)
    c = make_case(*shape, N=abs(N), seed=_seed("inst", shape))
    if N < 0:
        N = -N
        c["table"] = per_sample_table(c, N, seed=_seed("inst-rows", shape))
    x, w1, w2, table = (c[k].to(dtype) for k in ("x", "w1", "w2", "table"))
    xd, w1d, w2d, td = on(dev, x, w1, w2, table, grad=True)
    xd = relayout(xd.detach(), layout).requires_grad_(True)
    require_op(backend, "mimb_instances", xd, w1d, w2d, td)
    dy = torch.randn((N * shape[0], *shape[1:4]), generator=torch.Generator().manual_seed(3)).to(dtype)
    with mk.use_backend(backend):
        y = mk.mimb_instances(xd, w1d, w2d, td)
        y.backward(relayout(dy.to(dev), layout))
    check_output(y, xd, batch=N * shape[0])
    truth, truth_g = eager_with_grads(official_instances, dy.double(), x.double(), w1.double(), w2.double(), table.double())
    eager, eager_g = eager_with_grads(official_instances, dy, x, w1, w2, table)
    check_flash(y, eager, truth, dtype, "y")
    for name, t, e, tg in zip(("dx", "dw1", "dw2", "dtable"), (xd, w1d, w2d, td), eager_g, truth_g):
        assert t.grad is not None and t.grad.shape == t.shape and t.grad.dtype == t.dtype, name
        check_flash(t.grad, e, tg, dtype, name)
    assert xd.grad.is_contiguous(memory_format=expected_format(xd))
    # Instance-major: block n is mimb_scale with v = table[n] (each sample's row).
    B, C = shape[:2]
    with mk.use_backend(backend), torch.no_grad():
        for n in range(N):
            y_n = mk.mimb_scale(xd, w1d, w2d, td[n].expand(B, C))
            torch.testing.assert_close(y[n * B:(n + 1) * B], y_n, rtol=0, atol=0)


def _instances_vs_scale_calls(backend, dev, c, N, drop=None):
    """Forward and every gradient of ``mimb_instances`` and of N separate ``mimb_scale``
    calls (v = table[n] per sample) on the same backend, the same ``dy``; ``drop`` (a test
    of the test): zero that instance's ``dy`` in the instances run only."""
    B, C = c["x"].shape[:2]
    a = on(dev, *(c[k] for k in ("x", "w1", "w2", "table")), grad=True)
    b = on(dev, *(c[k] for k in ("x", "w1", "w2", "table")), grad=True)
    dy = torch.randn((N * B, *c["x"].shape[1:]), generator=torch.Generator().manual_seed(4)).to(dev)
    dya = dy.clone()
    if drop is not None:
        dya[drop * B:(drop + 1) * B] = 0
    with mk.use_backend(backend):
        ya = mk.mimb_instances(*a)
        ya.backward(dya)
        yb = torch.cat([mk.mimb_scale(b[0], b[1], b[2], b[3][n].expand(B, C)) for n in range(N)])
        yb.backward(dy)
    return ya, yb, [t.grad for t in a], [t.grad for t in b]


@pytest.mark.parametrize("backend, device", backend_device_params())
@pytest.mark.parametrize("N, rows", [(1, "instance"), (2, "instance"), (3, "instance"), (1, "sample"), (3, "sample")])
def test_mimb_instances_equals_scale_calls(backend, device, N, rows):
    """Forward and all gradients equal N separate ``mimb_scale`` calls (float32 reassociation:
    the instances backward sums the same per-instance gradients), with a table of one row
    per instance or per sample."""
    dev = skip_unless_runs(backend, device)
    c = make_case(3, 16, 5, 4, 4, N=N, seed=_seed("inst-vs-scale", (N,)))
    if rows == "sample":
        c["table"] = per_sample_table(c, N, seed=N)
    require_op(backend, "mimb_instances", *on(dev, *(c[k] for k in ("x", "w1", "w2", "table"))))
    ya, yb, ga, gb = _instances_vs_scale_calls(backend, dev, c, N)
    torch.testing.assert_close(ya, yb, rtol=0, atol=0)
    for name, p, q in zip(("dx", "dw1", "dw2", "dtable"), ga, gb):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("rows", ["instance", "sample"])
def test_mimb_instances_test_catches_a_dropped_instance(rows):
    """The comparison above fails when one instance's contribution is missing from backward."""
    c = make_case(3, 16, 5, 4, 4, N=2, seed=_seed("inst-vs-scale", (2,)))
    if rows == "sample":
        c["table"] = per_sample_table(c, 2, seed=2)
    for drop in (0, 1):
        _, _, ga, gb = _instances_vs_scale_calls("reference", "cpu", c, 2, drop=drop)
        for name, p, q in zip(("dx", "dw1", "dw2", "dtable"), ga, gb):
            with pytest.raises(AssertionError):
                torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5, msg=name)


def test_mimb_instances_inference_forms():
    """Without anything to record the public functions run the inference forms (no autograd
    formula), which refuse inputs that require grad; the differentiable ops accept them."""
    c = make_case(2, 8, 3, 3, 4, N=2)
    x = c["x"].clone().requires_grad_(True)
    y = mk.mimb_instances(x, c["w1"], c["w2"], c["table"])
    assert y.requires_grad
    (yg,) = mk.mimb_instances_grouped([x], [c["w1"]], [c["w2"]], [c["table"]])
    assert yg.requires_grad
    torch.testing.assert_close(yg, y, rtol=0, atol=0)
    with torch.no_grad():
        assert not mk.mimb_instances(x, c["w1"], c["w2"], c["table"]).requires_grad
    with torch.inference_mode():
        mk.mimb_instances(x, c["w1"], c["w2"], c["table"])
    for op, args in (("mimb_instances_inference", (x, c["w1"], c["w2"], c["table"])),
                     ("mimb_instances_grouped_inference", ([x], [c["w1"]], [c["w2"]], [c["table"]])),
                     ("mimb_scale_inference", (x, c["w1"], c["w2"], c["v"]))):
        with pytest.raises(RuntimeError, match="inference form"):
            getattr(torch.ops.mipnet, op)(*args)
    # An output that does not reach the loss gets zero gradients (grouped).
    x2 = make_case(2, 4, 2, 2, 2, N=2)["x"].requires_grad_(True)
    c2 = make_case(2, 4, 2, 2, 2, N=2)
    ya, _ = mk.mimb_instances_grouped([x, x2], [c["w1"], c2["w1"]], [c["w2"], c2["w2"]], [c["table"], c2["table"]])
    ya.sum().backward()
    assert x.grad is not None and torch.equal(x2.grad, torch.zeros_like(x2))


# --------------------------------------------------------------------------- grouped
# HRNet-W32-like branches (C = 32/64/128/256 at 1/4 .. 1/32 of a small input), B = 2.
BRANCHES = [(2, 32, 16, 12), (2, 64, 8, 6), (2, 128, 4, 3), (2, 256, 2, 2)]
INTERP_BRANCHES = [(2, 8, 5, 4), (2, 16, 3, 2), (2, 32, 4, 4), (2, 3, 1, 1)]


def _branches(shapes, dtype, layout, N=2):
    cases = [make_case(*s, 4, N=N, seed=_seed("grouped", s)) for s in shapes]
    return {k: [relayout(cs[k].to(dtype), layout) if k == "x" else cs[k].to(dtype) for cs in cases]
            for k in ("x", "w1", "w2", "v", "table")}


@pytest.mark.parametrize(
    "backend, device, dtype, layout",
    backend_params([(d, lay) for d in DTYPES for lay in LAYOUTS],
                   [(F32, "contiguous"), (BF16, "channels_last")]),
)
def test_mimb_scale_grouped(backend, device, dtype, layout):
    dev = skip_unless_runs(backend, device)
    shapes = INTERP_BRANCHES if (backend, device) == ("triton", "cpu") else BRANCHES
    b = _branches(shapes, dtype, layout)
    xs, w1s, w2s, vs = ([t.to(dev).requires_grad_(True) for t in b[k]] for k in ("x", "w1", "w2", "v"))
    require_op(backend, "mimb_scale_grouped_fwd", xs, w1s, w2s, vs)
    require_op(backend, "mimb_scale_grouped_bwd", xs, xs, w1s, w2s, vs, [v.float() for v in vs])
    dys = [torch.randn(x.shape, generator=torch.Generator().manual_seed(i)).to(dtype) for i, x in enumerate(xs)]
    with mk.use_backend(backend):
        ys = mk.mimb_scale_grouped(xs, w1s, w2s, vs)
        torch.autograd.backward(ys, [dy.to(dev) for dy in dys])
    assert isinstance(ys, list) and len(ys) == len(shapes)
    for i, (y, x) in enumerate(zip(ys, xs)):
        check_output(y, x)
        args = [b[k][i] for k in ("x", "w1", "w2", "v")]
        truth, truth_g = eager_with_grads(official_scale, dys[i].double(), *(a.double() for a in args))
        eager, eager_g = eager_with_grads(official_scale, dys[i], *args)
        check_flash(y, eager, truth, dtype, f"ys[{i}]")
        for name, t, e, tg in zip(("dx", "dw1", "dw2", "dv"), (xs[i], w1s[i], w2s[i], vs[i]), eager_g, truth_g):
            check_flash(t.grad, e, tg, dtype, f"{name}[{i}]")


@pytest.mark.parametrize("backend, device", backend_device_params())
def test_grouped_equals_single_calls(backend, device):
    """The grouped ops give exactly what one call per branch gives (same backend); a branch
    whose output does not reach the loss gets zero weight gradients."""
    dev = skip_unless_runs(backend, device)
    shapes = INTERP_BRANCHES if (backend, device) == ("triton", "cpu") else BRANCHES
    b = _branches(shapes, F32, "contiguous", N=3)
    g = {k: [t.to(dev).requires_grad_(k != "table") for t in b[k]] for k in b}
    s = {k: [t.detach().to(dev).requires_grad_(k != "table") for t in b[k]] for k in b}
    require_op(backend, "mimb_scale_grouped_fwd", g["x"], g["w1"], g["w2"], g["v"])
    with mk.use_backend(backend):
        ys = mk.mimb_scale_grouped(g["x"], g["w1"], g["w2"], g["v"])
        sum(y.square().sum() for y in ys[:-1]).backward()  # the last branch does not reach the loss
        singles = [mk.mimb_scale(*(s[k][i] for k in ("x", "w1", "w2", "v"))) for i in range(len(shapes))]
        sum(y.square().sum() for y in singles[:-1]).backward()
        with torch.no_grad():
            yi = mk.mimb_instances_grouped(g["x"], g["w1"], g["w2"], g["table"])
            yi_single = [mk.mimb_instances(*(s[k][i] for k in ("x", "w1", "w2", "table"))) for i in range(len(shapes))]
    # Triton's grouped launch uses one tile shape for all its branches (those of the largest),
    # so its sums associate differently from one launch per branch: equal up to float32
    # rounding there, bit-identical on the other backends.
    exact = backend != "triton"

    def same(got, want, msg=""):
        if exact:
            torch.testing.assert_close(got, want, rtol=0, atol=0, msg=msg)
        else:
            atol = 1e-6 * max(1.0, float(want.detach().abs().max()))
            torch.testing.assert_close(got, want, rtol=1e-5, atol=atol, msg=msg)

    for i in range(len(shapes)):
        same(ys[i], singles[i])
        same(yi[i], yi_single[i])
        for k in ("x", "w1", "w2", "v"):
            want = s[k][i].grad if i < len(shapes) - 1 else torch.zeros_like(s[k][i])
            same(g[k][i].grad, want, msg=f"d{k}[{i}]")


# --------------------------------------------------------------------------- empty inputs
@pytest.mark.parametrize("backend, device", backend_device_params())
@pytest.mark.parametrize("shape", [(0, 8, 5, 4), (3, 0, 5, 4), (0, 0, 0, 0), (0, 4, 0, 3)])
def test_empty(backend, device, shape):
    dev = skip_unless_runs(backend, device)
    B, C, H, W = shape
    x = torch.randn(shape, device=dev, requires_grad=True)
    w1 = torch.randn(2, C, device=dev, requires_grad=True)
    w2 = torch.randn(C, 2, device=dev, requires_grad=True)
    v = torch.rand(B, C, device=dev, requires_grad=True)
    with mk.use_backend(backend):
        y = mk.mimb_scale(x, w1, w2, v)
        assert y.shape == shape
        y.sum().backward()
        assert x.grad.shape == shape and float(w1.grad.abs().sum()) == 0 and float(w2.grad.abs().sum()) == 0
        with torch.no_grad():
            for N in (0, 2):
                yi = mk.mimb_instances(x, w1, w2, torch.rand(N, C, device=dev))
                assert yi.shape == (N * B, C, H, W)
            yi = mk.mimb_instances(x[:1] if B else x, w1, w2, torch.rand(0, C, device=dev))
            assert yi.shape[0] == 0


def test_nonempty_batch_with_empty_map_is_an_error():
    with pytest.raises(ValueError, match=r"x has an empty spatial size 0x4"):
        mk.mimb_scale(torch.rand(2, 3, 0, 4), torch.rand(1, 3), torch.rand(3, 1), torch.rand(2, 3))


# --------------------------------------------------------------------------- other strides
@pytest.mark.parametrize("backend, device", backend_device_params())
def test_other_strides(backend, device):
    """Sliced / permuted x: the op copies to contiguous first; the result and dx are contiguous."""
    dev = skip_unless_runs(backend, device)
    c = make_case(2, 12, 7, 5, 4, seed=9)
    big = torch.randn(2, 24, 7, 10, device=dev)
    x = big[:, ::2, :, ::2]
    x.copy_(c["x"].to(dev))
    permuted = c["x"].to(dev).permute(2, 3, 0, 1).contiguous().permute(2, 3, 0, 1)
    w1, w2, v = on(dev, c["w1"], c["w2"], c["v"])
    require_op(backend, "mimb_scale_fwd", c["x"].to(dev), w1, w2, v)
    with mk.use_backend(backend):
        want = mk.mimb_scale(c["x"].to(dev), w1, w2, v)
        for xs in (x, permuted):
            y = mk.mimb_scale(xs, w1, w2, v)
            assert y.is_contiguous()
            torch.testing.assert_close(y, want, rtol=0, atol=0)
            xg = xs.detach().clone().requires_grad_(True) if xs is permuted else xs.detach().requires_grad_(True)
            mk.mimb_scale(xg, w1, w2, v).sum().backward()
            assert xg.grad is not None


# --------------------------------------------------------------------------- gradcheck (fp64)
def _f64(c, keys):
    return [c[k].double().requires_grad_(True) for k in keys]


# fp64 gradcheck through the reference and the Triton kernels (which accumulate in float64
# for float64 inputs; on CPU under TRITON_INTERPRET=1).
GRADCHECK_BACKENDS = [("reference", "cpu"), pytest.param("triton", "cpu", marks=pytest.mark.triton)]


@pytest.mark.parametrize("backend, device", GRADCHECK_BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck_mimb_scale(backend, device, layout):
    skip_unless_runs(backend, device)
    c = make_case(2, 4, 3, 2, 2, seed=10)
    x, w1, w2, v = _f64(c, ("x", "w1", "w2", "v"))
    x = relayout(x.detach(), layout).requires_grad_(True)
    with mk.use_backend(backend):
        assert torch.autograd.gradcheck(mk.mimb_scale, (x, w1, w2, v))


@pytest.mark.parametrize("backend, device", GRADCHECK_BACKENDS)
@pytest.mark.parametrize("soft", [False, True])
def test_gradcheck_mimb(backend, device, soft):
    skip_unless_runs(backend, device)
    c = make_case(3, 4, 2, 3, 2, N=3, seed=11, soft=soft)
    with mk.use_backend(backend):
        assert torch.autograd.gradcheck(mk.mimb, tuple(_f64(c, MIMB_KEYS)))


def test_gradcheck_mimb_scale_grouped():
    cs = [make_case(2, 4, 3, 2, 2, seed=12), make_case(2, 6, 2, 2, 3, seed=13)]
    leaves = [cs[i][k].double().requires_grad_(True) for k in ("x", "w1", "w2", "v") for i in range(2)]

    def fn(x0, x1, a0, a1, b0, b1, v0, v1):
        return tuple(mk.mimb_scale_grouped([x0, x1], [a0, a1], [b0, b1], [v0, v1]))

    with mk.use_backend("reference"):
        assert torch.autograd.gradcheck(fn, tuple(leaves))


@pytest.mark.parametrize("backend, device", GRADCHECK_BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rows", ["instance", "sample"])
def test_gradcheck_mimb_instances(backend, device, layout, rows):
    skip_unless_runs(backend, device)
    c = make_case(2, 4, 3, 2, 2, N=3, seed=19)
    if rows == "sample":
        c["table"] = per_sample_table(c, 3, seed=19)
    x, w1, w2, table = _f64(c, ("x", "w1", "w2", "table"))
    x = relayout(x.detach(), layout).requires_grad_(True)
    with mk.use_backend(backend):
        assert torch.autograd.gradcheck(mk.mimb_instances, (x, w1, w2, table))


@pytest.mark.parametrize("backend, device", GRADCHECK_BACKENDS)
def test_gradcheck_mimb_instances_grouped(backend, device):
    skip_unless_runs(backend, device)
    cs = [make_case(2, 4, 3, 2, 2, N=2, seed=20), make_case(2, 6, 2, 2, 3, N=2, seed=21)]
    leaves = [cs[i][k].double().requires_grad_(True) for k in ("x", "w1", "w2", "table") for i in range(2)]

    def fn(x0, x1, a0, a1, b0, b1, t0, t1):
        return tuple(mk.mimb_instances_grouped([x0, x1], [a0, a1], [b0, b1], [t0, t1]))

    # Triton under the interpreter: gradcheck's fast mode (one random projection v^T J u of
    # the full Jacobian, numerical against analytical; a wrong entry of J shows up with
    # probability 1) -- the full Jacobian took 212 s of a CI run here.  A 1 % error in one
    # branch's dtable still fails it (checked when this was changed).  The reference keeps
    # the full check.
    with mk.use_backend(backend):
        assert torch.autograd.gradcheck(fn, tuple(leaves), fast_mode=backend == "triton")


def test_reference_float64_is_exact_spec():
    """The float64 path of the public op equals the official layer in float64 (~1e-15)."""
    c = make_case(3, 48, 7, 5, 4, seed=14, soft=True)
    args = [c[k].double() for k in MIMB_KEYS]
    dy = torch.randn(args[0].shape, dtype=F64)
    truth, truth_g = eager_with_grads(official_mimb, dy, *args)
    got, got_g = eager_with_grads(mk.mimb, dy, *args)  # auto: the cpu kernels decline float64
    torch.testing.assert_close(got, truth, rtol=1e-12, atol=1e-12)
    for g, t in zip(got_g, truth_g):
        torch.testing.assert_close(g, t, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- opcheck
def _opcheck_args(op, dev, layout):
    c = make_case(2, 8, 5, 3, 4, N=3, seed=15, soft=True)
    x = relayout(c["x"].to(dev), layout)

    def g(*ts):
        return [t.to(dev).requires_grad_(True) for t in ts]

    if op == "mimb_scale_fwd" or op == "mimb_scale":
        return (x.requires_grad_(True), *g(c["w1"], c["w2"], c["v"]))
    if op in ("mimb_scale_inference",):
        return (x, *(c[k].to(dev) for k in ("w1", "w2", "v")))
    if op in ("mimb_inference",):
        return (x, *(c[k].to(dev) for k in MIMB_KEYS[1:]))
    if op in ("mimb_fwd", "mimb"):
        return (x.requires_grad_(True), *g(*(c[k] for k in MIMB_KEYS[1:])))
    if op == "mimb_scale_bwd":
        return (torch.randn_like(x), x, *(c[k].to(dev) for k in ("w1", "w2", "v")), c["x"].mean((2, 3)).to(dev))
    if op == "mimb_instances":
        return (x.requires_grad_(True), *g(c["w1"], c["w2"], c["table"]))
    if op == "mimb_instances_inference":
        return (x, *(c[k].to(dev) for k in ("w1", "w2", "table")))
    if op == "mimb_instances_rows":  # a per-sample table [N, B, C]
        return (x.requires_grad_(True), *g(c["w1"], c["w2"], per_sample_table(c, 2, seed=15)))
    if op == "mimb_instances_bwd":
        return (torch.randn(3 * x.shape[0], *x.shape[1:], device=dev), x,
                *(c[k].to(dev) for k in ("w1", "w2", "table")))
    c2 = make_case(2, 12, 2, 4, 3, N=3, seed=16)
    x2 = relayout(c2["x"].to(dev), layout)
    if op in ("mimb_scale_grouped_fwd", "mimb_scale_grouped"):
        return ([x.requires_grad_(True), x2.requires_grad_(True)],
                *([t.to(dev).requires_grad_(True) for t in (c[k], c2[k])] for k in ("w1", "w2", "v")))
    if op == "mimb_scale_grouped_bwd":
        return ([torch.randn_like(x), torch.randn_like(x2)], [x, x2],
                *([t.to(dev) for t in (c[k], c2[k])] for k in ("w1", "w2", "v")),
                [c["x"].mean((2, 3)).to(dev), c2["x"].mean((2, 3)).to(dev)])
    if op == "mimb_instances_grouped":
        return ([x.requires_grad_(True), x2.requires_grad_(True)],
                *([t.to(dev).requires_grad_(True) for t in (c[k], c2[k])] for k in ("w1", "w2", "table")))
    if op == "mimb_instances_grouped_inference":
        return ([x, x2], *([t.to(dev) for t in (c[k], c2[k])] for k in ("w1", "w2", "table")))
    if op == "mimb_instances_grouped_bwd":  # one table per instance, one per sample
        t2 = per_sample_table(c2, 3, seed=16).to(dev)
        return ([torch.randn(3 * x.shape[0], *x.shape[1:], device=dev),
                 torch.randn(3 * x2.shape[0], *x2.shape[1:], device=dev)], [x, x2],
                *([t.to(dev) for t in (c[k], c2[k])] for k in ("w1", "w2")), [c["table"].to(dev), t2])
    raise ValueError(op)


# The dispatch entry each public op runs (for skipping backends that lack it).
_DISPATCHED = {
    "mimb_scale_fwd": "mimb_scale_fwd", "mimb_scale": "mimb_scale_fwd", "mimb_fwd": "mimb_scale_fwd",
    "mimb": "mimb_scale_fwd", "mimb_scale_bwd": "mimb_scale_bwd", "mimb_instances": "mimb_instances",
    "mimb_scale_inference": "mimb_scale_fwd", "mimb_inference": "mimb_scale_fwd",
    "mimb_scale_grouped_fwd": "mimb_scale_grouped_fwd", "mimb_scale_grouped": "mimb_scale_grouped_fwd",
    "mimb_scale_grouped_bwd": "mimb_scale_grouped_bwd", "mimb_instances_grouped": "mimb_instances_grouped",
    "mimb_instances_inference": "mimb_instances",
    "mimb_instances_grouped_inference": "mimb_instances_grouped",
    "mimb_instances_rows": "mimb_instances",
    "mimb_instances_bwd": "mimb_instances_bwd", "mimb_instances_grouped_bwd": "mimb_instances_grouped_bwd",
}
OPCHECK_CASES = [(op, "contiguous") for op in _DISPATCHED] + [
    (op, "channels_last") for op in ("mimb_scale_fwd", "mimb_scale_bwd", "mimb_instances",
                                     "mimb_instances_rows", "mimb_instances_bwd")
]


@pytest.mark.parametrize("backend, device, op, layout", backend_params(OPCHECK_CASES, OPCHECK_CASES[:3]))
def test_opcheck(backend, device, op, layout):
    dev = skip_unless_runs(backend, device)
    args = _opcheck_args(op, dev, layout)
    disp = _DISPATCHED[op]
    if disp == "mimb_scale_fwd":
        c = make_case(2, 8, 5, 3, 4)
        require_op(backend, disp, args[0], c["w1"].to(dev), c["w2"].to(dev), c["v"].to(dev))
    else:
        require_op(backend, disp, *args)
    with mk.use_backend(backend):
        name = "mimb_instances" if op == "mimb_instances_rows" else op
        torch.library.opcheck(getattr(torch.ops.mipnet, name).default, args)


# --------------------------------------------------------------------------- torch.compile
def _block(x, lam, w1, w2, e1, b1, e2, b2, v, x2, w1b, w2b, v2):
    y = mk.mimb(x, lam, w1, w2, e1, b1, e2, b2)
    y = mk.mimb_scale(y * 0.5 + x, w1, w2, v)
    ya, yb = mk.mimb_scale_grouped([y, x2], [w1, w1b], [w2, w2b], [v, v2])
    return ya.square().mean() + yb.sin().sum()


_compiled = {}


@pytest.mark.parametrize("backend, device", backend_device_params())
def test_torch_compile_fullgraph(backend, device):
    dev = skip_unless_runs(backend, device)
    c = make_case(2, 16, 6, 5, 4, N=2, seed=17, soft=True)
    c2 = make_case(2, 8, 3, 3, 4, seed=18)
    base = [c[k] for k in MIMB_KEYS] + [c["v"], c2["x"], c2["w1"], c2["w2"], c2["v"]]
    require_op(backend, "mimb_scale_fwd", *on(dev, c["x"], c["w1"], c["w2"], c["v"]))
    require_op(backend, "mimb_scale_grouped_fwd", *([t] for t in on(dev, c["x"], c["w1"], c["w2"], c["v"])))
    fn = _compiled.setdefault("fn", torch.compile(_block, fullgraph=True, backend="aot_eager"))
    a, b = on(dev, *base, grad=True), on(dev, *base, grad=True)
    with mk.use_backend(backend):
        got = fn(*a)
        got.backward()
        want = _block(*b)
        want.backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for i, (ga, gb) in enumerate(zip(a, b)):
        torch.testing.assert_close(ga.grad, gb.grad, rtol=1e-5, atol=1e-6, msg=f"grad of input {i}")


def _instances_block(x, w1, w2, table, x2, w1b, w2b, t2):
    y = mk.mimb_instances(x, w1, w2, table)
    ya, yb = mk.mimb_instances_grouped([y * 0.5, x2], [w1, w1b], [w2, w2b], [table, t2])
    return ya.square().mean() + yb.sin().sum()


@pytest.mark.parametrize("backend, device", backend_device_params())
def test_torch_compile_fullgraph_instances(backend, device):
    """``mimb_instances`` (and grouped) forward + backward under ``torch.compile(fullgraph=True)``;
    the second branch has a per-sample table."""
    dev = skip_unless_runs(backend, device)
    c = make_case(2, 16, 6, 5, 4, N=2, seed=22)
    c2 = make_case(2, 8, 3, 3, 4, N=2, seed=23)
    c2["table"] = per_sample_table(c2, 2, seed=23)
    base = [c[k] for k in ("x", "w1", "w2", "table")] + [c2[k] for k in ("x", "w1", "w2", "table")]
    require_op(backend, "mimb_instances", *on(dev, *base[:4]))
    fn = _compiled.setdefault("inst", torch.compile(_instances_block, fullgraph=True, backend="aot_eager"))
    a, b = on(dev, *base, grad=True), on(dev, *base, grad=True)
    with mk.use_backend(backend):
        got = fn(*a)
        got.backward()
        want = _instances_block(*b)
        want.backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for i, (ga, gb) in enumerate(zip(a, b)):
        torch.testing.assert_close(ga.grad, gb.grad, rtol=1e-5, atol=1e-6, msg=f"grad of input {i}")


# --------------------------------------------------------------------------- backend routing
def test_cpu_routing_reasons():
    """The cpu backend declines ops its extension lacks ("not built") and float64 inputs; the
    automatic choice then runs the reference."""
    assert "not built" in _backends.BACKEND["cpu"].resolve("mimb_no_such_kernel")[1]
    c = make_case(2, 8, 3, 3, 4)
    args64 = [c[k].double() for k in ("x", "w1", "w2", "v")]
    name, skipped = _backends.select("mimb_scale_fwd", torch.device("cpu"), *args64)
    assert name == "reference"
    if mk.available_backends()["cpu"]["available"]:
        assert any("float64" in r for r in skipped["cpu"])
    args = [c[k] for k in ("x", "w1", "w2", "v")]
    name, skipped = _backends.select("mimb_scale_fwd", torch.device("cpu"), *args)
    if mk.available_backends()["cpu"]["available"] and hasattr(torch.ops.mipnet_cpu, "mimb_scale_fwd"):
        assert name == "cpu"
    else:
        assert name == "reference" and skipped["cpu"]
    with mk.use_backend("cpu"):
        if mk.available_backends()["cpu"]["available"]:
            with pytest.raises(RuntimeError, match="float64"):
                mk.mimb_scale(*args64)


def _cpu_mimb_fwd_or_skip():
    if not mk.available_backends()["cpu"]["available"] or not hasattr(torch.ops.mipnet_cpu, "mimb_fwd"):
        pytest.skip("the C++ CPU extension (with mimb_fwd) is not loaded")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cpu_fused_mimb_fwd_matches_reference(dtype, layout):
    """The private fused op (embedding inside the kernel) against the torch path."""
    _cpu_mimb_fwd_or_skip()
    c = make_case(3, 24, 5, 4, 4, N=3, seed=21, soft=True)
    x = relayout(c["x"].to(dtype), layout)
    # strided / mixed-dtype small operands: a transposed e1, a strided b1, a half b2
    lam, w1, w2, e1, b1, e2, b2 = (c[k] for k in MIMB_KEYS[1:])
    e1 = e1.T.contiguous().T
    b1 = torch.stack([b1, b1], 1)[:, 0]
    args = (x, lam.to(dtype), w1, w2, e1, b1, e2.to(dtype), b2.half())
    y, s = torch.ops.mipnet_cpu.mimb_fwd(*args)
    y_ref, s_ref = M.mimb_fwd_reference(*args)
    check_output(y, x)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=tol, atol=tol)
    # the same through the public op on the cpu backend
    with mk.use_backend("cpu"):
        torch.testing.assert_close(mk.mimb(*args), y, rtol=0, atol=0)


def test_cpu_fused_mimb_fwd_routing(monkeypatch):
    """``mimb``'s forward runs the fused cpu kernel (auto and forced cpu); the reference backend,
    float64 inputs and an extension without it take the torch embedding path."""
    _cpu_mimb_fwd_or_skip()
    calls = []
    orig = _backends.BACKEND["cpu"].resolve("mimb_fwd")[0]
    monkeypatch.setitem(MIMB_KERNELS.FUSED_MIMB, "cpu", lambda *a: calls.append("fused") or orig(*a))
    c = make_case(2, 8, 3, 3, 4, soft=True)
    args = [c[k] for k in MIMB_KEYS]
    assert _backends.select("mimb_fwd", torch.device("cpu"), *args)[0] == "cpu"
    want = M.mimb_reference(*args)
    for backend in ("auto", "cpu"):
        with mk.use_backend(backend):
            torch.testing.assert_close(mk.mimb(*args), want, rtol=1e-5, atol=1e-6)
    assert calls == ["fused", "fused"]
    with mk.use_backend("reference"):
        torch.testing.assert_close(mk.mimb(*args), want, rtol=1e-6, atol=1e-7)
    args64 = [a.double() for a in args]
    name, skipped = _backends.select("mimb_fwd", torch.device("cpu"), *args64)
    assert name == "reference" and any("float64" in r for r in skipped["cpu"])
    mk.mimb(*args64)
    # lam alone in float64: the cpu kernel declines it, mimb_scale_fwd still runs on cpu
    mk.mimb(args[0], args[1].double(), *args[2:])
    assert calls == ["fused", "fused"]
    # empty batch: no kernel call, empty outputs
    y = mk.mimb(args[0][:0], args[1][:0], *args[2:])
    assert y.shape == (0, *args[0].shape[1:])
    assert calls == ["fused", "fused"]
    # training: inputs that require grad take the torch embedding (the backward recomputes it)
    xg = args[0].clone().requires_grad_(True)
    mk.mimb(xg, *args[1:]).sum().backward()
    assert calls == ["fused", "fused"] and xg.grad is not None


@pytest.mark.parametrize("lam_kind", ["one_hot", "repeated_soft", "distinct", "mostly_distinct", "last_column"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cpu_fused_mimb_fwd_embedding_per_distinct_row(lam_kind, layout):
    """The cpu kernel computes the embedding once per distinct lam row (when rows repeat):
    bit-identical to computing it per sample (one-sample calls)."""
    _cpu_mimb_fwd_or_skip()
    B, N = 12, 3
    c = make_case(B, 16, 5, 4, 4, N=N, seed=31)
    g = torch.Generator().manual_seed(32)
    lam = {"one_hot": torch.eye(N)[torch.randint(0, N, (B,), generator=g)],
           "repeated_soft": torch.softmax(torch.randn(3, N, generator=g), 1)[torch.arange(B) % 3],
           "distinct": torch.softmax(torch.randn(B, N, generator=g), 1),
           "mostly_distinct": torch.softmax(torch.randn(B, N, generator=g), 1)[torch.tensor([0, 0] + list(range(2, B)))],
           # rows that differ in their last element only (every element must be compared)
           "last_column": torch.cat([torch.full((B, N - 1), 0.25), (torch.arange(B) % 4)[:, None] / 4.0], 1)}[lam_kind]
    x = relayout(c["x"], layout)
    rest = [c[k] for k in MIMB_KEYS[2:]]
    y, s = torch.ops.mipnet_cpu.mimb_fwd(x, lam, *rest)
    for b in range(B):
        yb, sb = torch.ops.mipnet_cpu.mimb_fwd(x[b:b + 1], lam[b:b + 1], *rest)
        assert torch.equal(y[b:b + 1], yb) and torch.equal(s[b:b + 1], sb), b


def test_cpu_fused_mimb_fwd_bad_input():
    """The private op checks its own inputs (it is reachable as torch.ops.mipnet_cpu.mimb_fwd)."""
    _cpu_mimb_fwd_or_skip()
    c = make_case(2, 8, 3, 3, 4, N=3)
    args = [c[k] for k in MIMB_KEYS]
    for i, bad, match in (
        (1, torch.rand(3, 3), r"lam.size\(0\)"),
        (4, torch.rand(2, 2), r"e1.size\(1\)"),
        (5, torch.rand(3), r"b1.size\(0\)"),
        (6, torch.rand(8, 3), r"e2.size\(1\)"),
        (7, torch.rand(7), r"b2.size\(0\)"),
        (7, torch.ones(8, dtype=torch.int64), r"b2 must be float32"),
    ):
        a = list(args)
        a[i] = bad
        with pytest.raises(RuntimeError, match=match):
            torch.ops.mipnet_cpu.mimb_fwd(*a)


def test_cpu_extension_without_mimb_kernels_falls_back(monkeypatch):
    """An extension built before the MIMB kernels existed: cpu says "not built" for every MIMB
    dispatch entry and the automatic choice runs the reference, with the same results."""
    if not mk.available_backends()["cpu"]["available"]:
        pytest.skip("the C++ CPU extension is not loaded")
    for op in ("mimb_scale_fwd", "mimb_scale_bwd", "mimb_instances"):  # an older build
        t = table(op)
        monkeypatch.setitem(t.kernels, "cpu", Kernel(symbol=f"{op}_not_in_this_build"))
        monkeypatch.delitem(t._resolved, "cpu", raising=False)
    c = make_case(2, 8, 3, 3, 4)
    args = [c[k] for k in ("x", "w1", "w2", "v")]
    for op, op_args in (
        ("mimb_scale_fwd", args),
        ("mimb_scale_bwd", [args[0], *args, c["v"]]),
        ("mimb_instances", [args[0], args[1], args[2], c["table"]]),
        ("mimb_scale_grouped_fwd", [[a] for a in args]),
    ):
        name, skipped = _backends.select(op, torch.device("cpu"), *op_args)
        assert name == "reference", op
        assert len(skipped["cpu"]) == 1 and "not built" in skipped["cpu"][0], skipped
    x = c["x"].clone().requires_grad_(True)
    mk.mimb_scale(x, *args[1:]).sum().backward()
    with pytest.raises(RuntimeError, match="not built"):
        with mk.use_backend("cpu"):
            mk.mimb_scale(*args)


def test_backward_runs_on_the_forward_backend(monkeypatch):
    """``use_backend`` around the forward also governs the backward, wherever autograd runs it."""
    calls = []
    orig = _backends.kernel("mimb_scale_bwd", "reference")

    def spy(*args):
        calls.append("reference")
        return orig(*args)

    monkeypatch.setitem(table("mimb_scale_bwd").kernels, "reference", Kernel(fn=spy))
    monkeypatch.delitem(table("mimb_scale_bwd")._resolved, "reference", raising=False)
    c = make_case(2, 8, 3, 3, 4)
    x = c["x"].requires_grad_(True)
    with mk.use_backend("reference"):
        y = mk.mimb_scale(x, c["w1"], c["w2"], c["v"])
        y2 = mk.mimb(x, *(c[k] for k in MIMB_KEYS[1:]))
    (y.sum() + y2.sum()).backward()  # outside the block
    assert calls == ["reference", "reference"]


# --------------------------------------------------------------------------- bad input
def _c():
    return make_case(2, 8, 5, 4, 4, N=3)


def _scale(**over):
    c = _c()
    c.update(over)
    return ("mimb_scale", (c["x"], c["w1"], c["w2"], c["v"]))


def _mimb(**over):
    c = _c()
    c.update(over)
    return ("mimb", tuple(c[k] for k in MIMB_KEYS))


def _inst(**over):
    c = _c()
    c.update(over)
    return ("mimb_instances", (c["x"], c["w1"], c["w2"], c["table"]))


def _grouped(**over):
    c = _c()
    lists = {"xs": [c["x"]], "w1s": [c["w1"]], "w2s": [c["w2"]], "vs": [c["v"]]}
    lists.update(over)
    return ("mimb_scale_grouped", (lists["xs"], lists["w1s"], lists["w2s"], lists["vs"]))


BAD = [
    ("x-3d", lambda: _scale(x=torch.rand(8, 5, 4)), ValueError, r"x must be 4-D \[B, C, H, W\], got shape \[8, 5, 4\]"),
    ("x-5d", lambda: _mimb(x=torch.rand(2, 8, 5, 4, 1)), ValueError, r"x must be 4-D"),
    ("x-int", lambda: _scale(x=torch.ones(2, 8, 5, 4, dtype=torch.int32)), ValueError, r"x must be float32.*int32"),
    ("x-bool", lambda: _inst(x=torch.ones(2, 8, 5, 4, dtype=torch.bool)), ValueError, r"x must be float32.*bool"),
    ("x-list", lambda: _scale(x=[[1.0]]), (TypeError, RuntimeError), r"x"),
    ("x-channels", lambda: _scale(x=torch.rand(2, 7, 5, 4)), ValueError, r"w1 must have shape \[C/r, C\] with C = x.shape\[1\] = 7"),
    ("w1-cols", lambda: _scale(w1=torch.rand(2, 9)), ValueError, r"w1 must have shape \[C/r, C\].*got \[2, 9\]"),
    ("w1-1d", lambda: _mimb(w1=torch.rand(8)), ValueError, r"w1 must have shape"),
    ("w1-empty", lambda: _scale(w1=torch.rand(0, 8), w2=torch.rand(8, 0)), ValueError, r"w1 .*C/r >= 1"),
    ("w1-int", lambda: _scale(w1=torch.ones(2, 8, dtype=torch.int64)), ValueError, r"w1 must be float32.*int64"),
    ("w2-shape", lambda: _scale(w2=torch.rand(8, 3)), ValueError, r"w2 must have shape \[C, C/r\].* = \[8, 2\], got \[8, 3\]"),
    ("w2-transposed", lambda: _inst(w2=torch.rand(2, 8)), ValueError, r"w2 must have shape"),
    ("w2-dtype", lambda: _mimb(w2=torch.rand(8, 2).to(torch.complex64)), ValueError, r"w2 must be float32.*complex64"),
    ("v-shape", lambda: _scale(v=torch.rand(3, 8)), ValueError, r"v must have shape \[B, C\].* = \[2, 8\], got \[3, 8\]"),
    ("v-1d", lambda: _scale(v=torch.rand(8)), ValueError, r"v must have shape"),
    ("v-int", lambda: _scale(v=torch.ones(2, 8, dtype=torch.int32)), ValueError, r"v must be float32"),
    ("v-device", lambda: _scale(v=torch.rand(2, 8, device="meta")), ValueError, r"v is on meta but x is on cpu"),
    ("lam-int", lambda: _mimb(lam=torch.zeros(2, 3, dtype=torch.int64)), ValueError, r"lam must be float32.*int64"),
    ("lam-batch", lambda: _mimb(lam=torch.rand(3, 3)), ValueError, r"lam must have shape \[B, N\] with B = x.shape\[0\] = 2"),
    ("lam-1d", lambda: _mimb(lam=torch.rand(2)), ValueError, r"lam must have shape \[B, N\]"),
    ("e1-N", lambda: _mimb(e1=torch.rand(2, 2)), ValueError, r"e1 must have shape \[K, N\].*N = lam.shape\[1\] = 3"),
    ("b1-shape", lambda: _mimb(b1=torch.rand(3)), ValueError, r"b1 must have shape \[K\].* = \[2\], got \[3\]"),
    ("e2-shape", lambda: _mimb(e2=torch.rand(8, 3)), ValueError, r"e2 must have shape \[C, K\].* = \[8, 2\]"),
    ("b2-shape", lambda: _mimb(b2=torch.rand(7)), ValueError, r"b2 must have shape \[C\].* = \[8\], got \[7\]"),
    ("b2-int", lambda: _mimb(b2=torch.ones(8, dtype=torch.int64)), ValueError, r"b2 must be float32"),
    ("table-C", lambda: _inst(table=torch.rand(3, 7)), ValueError, r"table must have shape \[N, C\] .*or \[N, B, C\] .*with B, C = x.shape\[:2\] = 2, 8, got \[3, 7\]"),
    ("table-1d", lambda: _inst(table=torch.rand(8)), ValueError, r"table must have shape \[N, C\]"),
    ("table-rows-B", lambda: _inst(table=torch.rand(3, 3, 8)), ValueError, r"table must have shape .*\[N, B, C\].*got \[3, 3, 8\]"),
    ("table-rows-C", lambda: _inst(table=torch.rand(3, 2, 7)), ValueError, r"table must have shape .*\[N, B, C\].*got \[3, 2, 7\]"),
    ("table-4d", lambda: _inst(table=torch.rand(3, 2, 8, 1)), ValueError, r"table must have shape"),
    ("table-int", lambda: _inst(table=torch.ones(3, 8, dtype=torch.int32)), ValueError, r"table must be float32"),
    ("grouped-len", lambda: _grouped(w1s=[]), ValueError, r"w1s has 0 tensors but xs has 1"),
    ("grouped-empty", lambda: _grouped(xs=[], w1s=[], w2s=[], vs=[]), ValueError, r"xs must be a non-empty list"),
    ("grouped-branch", lambda: _grouped(w2s=[torch.rand(8, 5)]), ValueError, r"w2s\[0\] must have shape \[C, C/r\]"),
    ("grouped-x", lambda: _grouped(xs=[torch.rand(2, 8, 5)]), ValueError, r"xs\[0\] must be 4-D"),
    ("grouped-not-list", lambda: _grouped(vs=torch.rand(2, 8)), (TypeError, RuntimeError), r"vs"),
]


@pytest.mark.parametrize("make, exc, match", [pytest.param(m, e, r, id=i) for i, m, e, r in BAD])
def test_bad_input(make, exc, match):
    name, args = make()
    with pytest.raises(exc, match=match):
        getattr(mk, name)(*args)
    if any(isinstance(a, list) and not a for a in args) or not all(isinstance(a, (torch.Tensor, list)) for a in args):
        return  # torch's schema parser rejects these before the op runs
    with pytest.raises(exc, match=match):  # the op itself, not only the Python wrapper
        getattr(torch.ops.mipnet, name)(*args)


def test_bad_backward_inputs():
    c = _c()
    x, w1, w2, v = c["x"], c["w1"], c["w2"], c["v"]
    s = x.mean((2, 3))
    with pytest.raises(ValueError, match=r"dy must have x's shape"):
        torch.ops.mipnet.mimb_scale_bwd(x[:1], x, w1, w2, v, s)
    with pytest.raises(ValueError, match=r"dy must have x's shape .* and dtype torch.float32"):
        torch.ops.mipnet.mimb_scale_bwd(x.half(), x, w1, w2, v, s)
    with pytest.raises(ValueError, match=r"s must have shape \[B, C\]"):
        torch.ops.mipnet.mimb_scale_bwd(x, x, w1, w2, v, s[:, :3])
    table = c["table"]  # [3, 8]: N = 3
    dy = torch.rand(3 * x.shape[0], *x.shape[1:])
    with pytest.raises(ValueError, match=r"dy must have shape \[N\*B, C, H, W\] = \[6, 8, 5, 4\]"):
        torch.ops.mipnet.mimb_instances_bwd(dy[:4], x, w1, w2, table)
    with pytest.raises(ValueError, match=r"and x's dtype torch.float32, got \[6, 8, 5, 4\] torch.float16"):
        torch.ops.mipnet.mimb_instances_bwd(dy.half(), x, w1, w2, table)
    with pytest.raises(ValueError, match=r"table must have shape"):
        torch.ops.mipnet.mimb_instances_bwd(dy, x, w1, w2, table[:, :3])
    with pytest.raises(ValueError, match=r"dys\[1\] must have shape \[N\*B, C, H, W\]"):
        torch.ops.mipnet.mimb_instances_grouped_bwd([dy, dy[:2]], [x, x], [w1, w1], [w2, w2], [table, table])


# --------------------------------------------------------------------------- eager path
def _fwd_bwd(fn, inputs, dy):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    y = fn(*leaves)
    y.backward(dy)
    return [y.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("backend, device", backend_device_params())
@pytest.mark.parametrize("layout", LAYOUTS)
def test_eager_path_equals_the_custom_ops(backend, device, layout):
    """In plain eager mode the public functions skip the torch.library layers; they must give
    bit-identical outputs and gradients to the torch.ops.mipnet.* ops (same kernels)."""
    dev = skip_unless_runs(backend, device)
    g = torch.Generator().manual_seed(5)
    B, C, N, K = 3, 12, 2, 3
    x = torch.randn(B, C, 5, 4, generator=g)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w1, w2 = 0.5 * torch.randn(K, C, generator=g), 0.5 * torch.randn(C, K, generator=g)
    v = torch.rand(B, C, generator=g)
    lam = torch.softmax(torch.randn(B, N, generator=g), 1)
    e1, b1, e2, b2 = (torch.randn(*s, generator=g) for s in ((K, N), (K,), (C, K), (C,)))
    table = torch.rand(N, C, generator=g)
    dy = torch.randn(x.shape, generator=g)
    x, w1, w2, v, lam, e1, b1, e2, b2, table, dy = (
        t.to(dev) for t in (x, w1, w2, v, lam, e1, b1, e2, b2, table, dy))
    with mk.use_backend(backend):
        for name, fn, op, inputs in (
            ("mimb_scale", mk.mimb_scale, torch.ops.mipnet.mimb_scale, (x, w1, w2, v)),
            ("mimb", mk.mimb, torch.ops.mipnet.mimb, (x, lam, w1, w2, e1, b1, e2, b2)),
        ):
            for a, b in zip(_fwd_bwd(fn, inputs, dy), _fwd_bwd(op, inputs, dy)):
                assert torch.equal(a, b), name
        with torch.no_grad():
            assert torch.equal(mk.mimb_instances(x, w1, w2, table),
                               torch.ops.mipnet.mimb_instances(x, w1, w2, table))
            assert torch.equal(mk.mimb_scale(x, w1, w2, v), torch.ops.mipnet.mimb_scale(x, w1, w2, v))


def test_dispatch_mode_sees_the_operator():
    """A TorchDispatchMode (FakeTensor, make_fx, FlopCounterMode ...) sees the operator."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    x, w1, w2, v = torch.rand(2, 8, 3, 3), torch.rand(2, 8), torch.rand(8, 2), torch.rand(2, 8)
    with Record():
        mk.mimb_scale(x, w1, w2, v)
    assert any("mipnet.mimb_scale_inference" in s for s in seen), seen  # no grad: the inference form
    seen.clear()
    with Record():
        mk.mimb_scale(x.requires_grad_(True), w1, w2, v)
    assert any("mipnet.mimb_scale_fwd" in s for s in seen), seen


# --------------------------------------------------------------------------- issue 13: NaN / overflow
@pytest.mark.parametrize("backend, device", backend_device_params())
@pytest.mark.parametrize("bad", ["nan_x", "plus_3e38", "minus_3e38", "nan_w1", "nan_v"])
def test_non_finite_input_makes_its_sample_nan(backend, device, bad):
    """One semantics on every backend, the reference's: a NaN in a sample's x (or a mean that
    overflows float32, x = +-3e38) makes that whole sample NaN -- forward, instances and dx --
    and leaves the others untouched; a NaN in a weight makes every sample NaN.  The C++
    kernel gave a finite ~1e-39 scale (its exp clamp dropped the NaN), Triton 0.5 (relu as
    max(z, 0) dropped it)."""
    dev = skip_unless_runs(backend, device)
    g = torch.Generator().manual_seed(7)
    B, C, H, W = 3, 16, 3, 5
    x = torch.randn(B, C, H, W, generator=g)
    w1 = torch.randn(C // 4, C, generator=g)
    w2 = torch.randn(C, C // 4, generator=g)
    v = torch.rand(B, C, generator=g)
    table = torch.rand(2, C, generator=g)
    if bad == "nan_x":
        x[1, 2, 1, 1] = math.nan
    elif bad in ("plus_3e38", "minus_3e38"):
        x[1] = 3e38 if bad == "plus_3e38" else -3e38
    elif bad == "nan_w1":
        w1[0, 0] = math.nan
    else:
        v[1, 0] = math.nan
    xs = x.clone().to(dev).requires_grad_(True)
    with mk.use_backend(backend):
        y = mk.mimb_scale(xs, w1.to(dev), w2.to(dev), v.to(dev))
        y.backward(torch.ones_like(y))
        inst = mk.mimb_instances(x.to(dev), w1.to(dev), w2.to(dev), table.to(dev)) if bad != "nan_v" else None
    nan_samples = {"nan_w1": {0, 1, 2}}.get(bad, {1})
    for b in range(B):
        want_nan = b in nan_samples
        if bad == "nan_v" and b == 1:  # v scales channel by channel: only that channel
            assert torch.isnan(y[b, 0]).all() and not torch.isnan(y[b, 1:]).any()
            continue
        for name, t in (("y", y[b]), ("dx", xs.grad[b])):
            assert bool(torch.isnan(t).all()) == want_nan and bool(torch.isnan(t).any()) == want_nan, \
                f"{name}[{b}]: {torch.isnan(t).sum().item()} NaN of {t.numel()}"
        if inst is not None:
            for n in range(2):
                t = inst[n * B + b]
                assert bool(torch.isnan(t).all()) == want_nan, f"instances[{n}, {b}]"


@pytest.mark.parametrize("backend, device", backend_device_params())
@pytest.mark.parametrize("z", [-85.0, -90.0, -100.0, -110.0])
def test_sigmoid_far_left_tail(backend, device, z):
    """e = sigmoid(z) near and beyond float32 exp's overflow, as torch.sigmoid (the reference)
    and the CUDA / Triton kernels compute it, not the C++ exp range clamp's 2.9e-39 -- with a
    huge x, y = x * e shows the difference (the property battery found it)."""
    dev = skip_unless_runs(backend, device)
    x = torch.ones(2, 1, 1, 1)
    w1, w2, v = torch.ones(1, 1), torch.full((1, 1), z), torch.ones(2, 1)
    with mk.use_backend(backend):
        y = mk.mimb_scale(x.to(dev), w1.to(dev), w2.to(dev), v.to(dev)).cpu()
    want = torch.sigmoid(torch.tensor(z))  # float32: 1 / (1 + exp(-z)), 0 once exp(-z) overflows
    torch.testing.assert_close(y.flatten(), want.expand(2), rtol=1e-5, atol=0)


@pytest.mark.parametrize("op", ["mimb_scale_fwd", "mimb_scale_bwd", "mimb_instances", "mimb_instances_bwd",
                                "mimb_scale_grouped_fwd", "mimb_scale_grouped_bwd", "mimb_instances_grouped",
                                "mimb_instances_grouped_bwd"])
def test_cuda_columns_refuse_samples_past_int32_offsets(op, monkeypatch):
    """Every cuda column of the MIMB tables names a sample too large for int32 offsets, on
    its ``x`` argument (after ``dy`` in the backwards) and per branch in the grouped forms.
    Size-only, so checked here on CPU tensors with the limit lowered."""
    monkeypatch.setattr(MIMB_KERNELS, "_SAMPLE_ELEMS", 100)
    reasons = table(op).kernels["cuda"].reasons
    big, small = torch.zeros(2, 8, 4, 4), torch.zeros(2, 4, 2, 2)  # 128 and 16 per sample
    x_at = 1 if op.endswith("bwd") else 0
    grouped = "grouped" in op

    def args(x):
        out = [small] * len(table(op).args)
        out[x_at] = x
        return [[t] for t in out] if grouped else out

    (why,) = reasons(*args(big))
    assert "C*H*W = 128 elements per sample" in why and why.startswith("branch 0: ") == grouped
    assert reasons(*args(small)) == []
