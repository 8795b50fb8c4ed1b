"""The Triton launchers of ``mimb_instances`` with a per-sample table ``[N, B, C]`` (issue 16)
and of the fused instances backward ``mimb_instances_bwd`` (``csrc/schemas.h``), called
directly (the op layer routes to them once the kernel tables name them).

Forward: against the contract written out in torch here, ``y[n*B + b] = x[b] * (e[b] *
t[n, b])`` computed in float32 on the (rounded) inputs, for ``[N, C]`` and ``[N, B, C]``
tables, NCHW / channels_last, float32 / float16 / bfloat16, single and grouped (mixed 2-D
and 3-D tables in one launch).  Backward: against the composite the contract defines, the
sum over the instances of ``mimb_scale_bwd_reference(dy_n, x, w1, w2, t[n])``, with
flash-attention's tolerance rule (``utils.check_flash``: ``truth`` the composite in float64,
``eager`` the composite in the test dtype); float64 (the gradcheck dtype) to 1e-12.

The small shapes run under ``TRITON_INTERPRET=1`` on CPU tensors; ``_small_tiles`` shrinks
the launchers' tiles so that those shapes still take several channel blocks, HW splits and
instance groups (checked on the recorded launches).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from mipnet_kernels.ops.mimb.reference import mimb_scale_bwd_reference
from utils import HAS_CUDA, check_flash, make_case, relayout, seed_of, skip_unless_runs

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
LAYOUTS = ("contiguous", "channels_last")

# on a GPU machine these run on CUDA tensors (compiled), and are part of `make gpu-smoke`'s -m cuda
pytestmark = [pytest.mark.triton] + ([pytest.mark.cuda] if HAS_CUDA else [])


@pytest.fixture
def dev():
    return skip_unless_runs("triton", "cuda" if HAS_CUDA else "cpu")


def _tm():
    from mipnet_kernels.triton import mimb

    return mimb


@contextlib.contextmanager
def _small_tiles(elems: int = 32):
    """Launch with ``elems``-element tiles: several channel blocks / splits on tiny shapes."""
    tm = _tm()
    saved = tm._TILE_ELEMS
    tm._TILE_ELEMS = elems
    try:
        yield
    finally:
        tm._TILE_ELEMS = saved


def _inputs(shape, N, dtype, layout, dev, per_sample, seed):
    B, C, H, W, r = shape
    c = make_case(B, C, H, W, r, N=max(N, 1), seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    table = 0.1 + 0.8 * torch.rand((N, B, C) if per_sample else (N, C), generator=g)
    x = relayout(c["x"].to(dtype), layout).to(dev)
    return x, c["w1"].to(dtype).to(dev), c["w2"].to(dtype).to(dev), table.to(dtype).to(dev)


def _t3(table: torch.Tensor, B: int) -> torch.Tensor:
    """t[n, b] of either table form, ``[N, B, C]``."""
    return table[:, None, :].expand(table.shape[0], B, table.shape[1]) if table.dim() == 2 else table


def _excite(x, w1, w2):
    s = x.double().mean(dim=(2, 3)).float() if x.dtype != F64 else x.mean(dim=(2, 3))
    ct = s.dtype
    return torch.sigmoid(torch.relu(s @ w1.to(ct).T) @ w2.to(ct).T)


def instances_spec(x, w1, w2, table):
    """The contract: ``y[n*B + b] = x[b] * (e[b] * t[n, b])`` in float32 (float64 for
    float64), rounded once to ``x``'s dtype."""
    B = x.shape[0]
    e = _excite(x, w1, w2)
    t = _t3(table, B).to(e.dtype)
    a = e[None] * t  # [N, B, C]
    y = x.to(e.dtype)[None] * a[:, :, :, None, None]
    return y.flatten(0, 1).to(x.dtype)


def instances_bwd_composite(dy, x, w1, w2, table, ct=None):
    """The contract of the fused backward: the sum over n of the scale backward with
    ``v = t[n]`` (``dtable`` summed over b for a ``[N, C]`` table), computed in ``ct``."""
    ct = ct or x.dtype
    dy, x, w1, w2, table = (t.detach().cpu().to(ct) for t in (dy, x, w1, w2, table))
    B, N = x.shape[0], table.shape[0]
    t = _t3(table, B)
    s = x.mean(dim=(2, 3), dtype=F64 if ct == F64 else F32)
    parts = [mimb_scale_bwd_reference(dy[n * B:(n + 1) * B], x, w1, w2, t[n], s) for n in range(N)]
    dx, dw1, dw2 = (sum(p[k].to(s.dtype) for p in parts) for k in range(3))
    dt = torch.stack([p[3].to(s.dtype) for p in parts])
    return dx, dw1, dw2, dt if table.dim() == 3 else dt.sum(dim=1)


# --------------------------------------------------------------------------- forward
# (B, C, H, W, r)
SHAPES = [(2, 3, 4, 3, 1), (3, 16, 5, 3, 4)]
FWD_TOL = {F32: dict(rtol=1e-5, atol=1e-6), F16: dict(rtol=1e-3, atol=1e-5), BF16: dict(rtol=8e-3, atol=1e-4),
           F64: dict(rtol=1e-12, atol=1e-12)}


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("per_sample", [False, True], ids=["table2d", "table3d"])
def test_instances_forward(dev, shape, dtype, layout, per_sample):
    tm = _tm()
    N = 3
    x, w1, w2, table = _inputs(shape, N, dtype, layout, dev, per_sample, seed_of("inst-tri", shape))
    y = tm.mimb_instances_triton(x, w1, w2, table)
    B = x.shape[0]
    assert y.shape == (N * B, *x.shape[1:]) and y.dtype == x.dtype
    assert y.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    # bfloat16: the spec upcasts (the interpreter's own bfloat16 arithmetic is not torch's)
    want = instances_spec(x.cpu().float(), w1.cpu().float(), w2.cpu().float(), table.cpu().float()).to(dtype)
    torch.testing.assert_close(y.cpu(), want, **FWD_TOL[dtype])
    if per_sample:  # rows differ per sample: a kernel reading t[n, 0] for every b fails
        assert not torch.equal(table[:, 0], table[:, 1])
    else:  # a [N, C] table is the [N, B, C] table with equal rows, bit for bit
        y3 = tm.mimb_instances_triton(x, w1, w2, table[:, None].expand(N, B, -1).contiguous())
        torch.testing.assert_close(y3, y, rtol=0, atol=0)


def test_instances_forward_strided_tables_and_many_tiles(dev):
    """Tables with other strides (a transposed [N, B, C] view, a [N, C] column slice), and
    small tiles: several channel blocks and HW splits per sample."""
    tm = _tm()
    shape, N = (2, 16, 6, 5, 4), 3
    x, w1, w2, table = _inputs(shape, N, F32, "channels_last", dev, True, 7)
    views = [table.transpose(0, 1).contiguous().transpose(0, 1),  # [N, B, C] with strides (C, N*C, 1)
             torch.cat([table[:, 0], table[:, 0]], dim=1)[:, ::2]]  # [N, C] with column stride 2
    for t in views:
        assert not t.is_contiguous()
        with _small_tiles(8):  # [8, 1] tiles: 2 channel blocks, 30 splits
            y = tm.mimb_instances_triton(x, w1, w2, t)
        torch.testing.assert_close(y.cpu(), instances_spec(x.cpu(), w1.cpu(), w2.cpu(), t.cpu()), **FWD_TOL[F32])


def test_instances_grouped_mixed_tables(dev):
    """One grouped launch over branches with [N, C] and [N, B, C] tables (and N differing)."""
    tm = _tm()
    shapes = [(2, 8, 5, 4, 4), (2, 16, 3, 2, 4), (2, 3, 1, 1, 1)]
    for dtype, layout in ((F32, "contiguous"), (BF16, "channels_last")):
        xs, w1s, w2s, tables = [], [], [], []
        for i, s in enumerate(shapes):
            x, w1, w2, t = _inputs(s, 2 + i, dtype, layout, dev, i != 1, seed_of("grouped-tri", s))
            xs.append(x), w1s.append(w1), w2s.append(w2), tables.append(t)
        ys = tm.mimb_instances_grouped_triton(xs, w1s, w2s, tables)
        for x, w1, w2, t, y in zip(xs, w1s, w2s, tables, ys):
            want = instances_spec(x.cpu().float(), w1.cpu().float(), w2.cpu().float(), t.cpu().float()).to(dtype)
            torch.testing.assert_close(y.cpu(), want, **FWD_TOL[dtype])


def test_instances_rejects_a_table_of_another_batch(dev):
    tm = _tm()
    x, w1, w2, table = _inputs((2, 8, 3, 3, 4), 2, F32, "contiguous", dev, True, 1)
    with pytest.raises(ValueError, match=r"table must have shape \[N, C\] or \[N, B, C\] with B = x.shape\[0\] = 3"):
        tm.mimb_instances_triton(torch.cat([x, x[:1]]), w1, w2, table)
    with pytest.raises(ValueError, match="dy must have shape"):
        tm.mimb_instances_bwd_triton(torch.zeros(3, 8, 3, 3), x, w1, w2, table)


# --------------------------------------------------------------------------- backward
BWD_CASES = [
    # (shape, N, dtype, x layout, dy layout, per_sample, small tiles)
    ((2, 3, 4, 3, 1), 2, F32, "contiguous", "contiguous", False, False),
    ((2, 3, 4, 3, 1), 2, F32, "contiguous", "contiguous", True, False),
    ((3, 16, 5, 3, 4), 3, F32, "channels_last", "channels_last", True, False),
    ((3, 16, 5, 3, 4), 3, F32, "channels_last", "contiguous", False, False),  # dy in the other layout
    ((2, 16, 6, 5, 4), 9, F32, "contiguous", "contiguous", True, True),  # two instance groups (8 + 1)
    ((2, 16, 6, 5, 4), 3, F32, "channels_last", "channels_last", False, True),
    ((2, 16, 5, 3, 4), 2, BF16, "channels_last", "channels_last", True, False),
    ((2, 16, 5, 3, 4), 2, F16, "contiguous", "contiguous", False, False),
    ((2, 8, 3, 2, 2), 3, F64, "contiguous", "contiguous", True, False),
    ((2, 8, 3, 2, 2), 3, F64, "channels_last", "channels_last", False, True),
]


def _bwd_id(case):
    shape, N, dtype, xl, dyl, per_sample, small = case
    return (f"{'x'.join(map(str, shape[:4]))}-N{N}-{str(dtype)[6:]}-{xl[:2]}/{dyl[:2]}-"
            f"{'t3' if per_sample else 't2'}{'-small' if small else ''}")


def _check_bwd(got, dy, x, w1, w2, table):
    names = ("dx", "dw1", "dw2", "dtable")
    dtype = x.dtype
    for name, g, like in zip(names, got, (x, w1, w2, table)):
        assert g.shape == like.shape and g.dtype == like.dtype and g.device == like.device, name
    assert got[0].is_contiguous(memory_format=torch.channels_last if not x.is_contiguous() else torch.contiguous_format)
    assert all(g.is_contiguous() for g in got[1:])
    truth = instances_bwd_composite(dy, x, w1, w2, table, F64)
    if dtype == F64:
        for name, g, t in zip(names, got, truth):
            torch.testing.assert_close(g.cpu(), t, rtol=1e-12, atol=1e-12, msg=name)
        return
    # eager: the composite in the test dtype (bfloat16 / float16 reference arithmetic in float32,
    # rounded to the dtype: the scale backward's own contract)
    eager = instances_bwd_composite(dy, x, w1, w2, table, F32)
    eager = tuple(e.to(dtype) for e in eager)
    for name, g, e, t in zip(names, got, eager, truth):
        check_flash(g, e, t, dtype, name)


@pytest.mark.parametrize("case", BWD_CASES, ids=_bwd_id)
def test_instances_backward_equals_composite(dev, case):
    tm = _tm()
    shape, N, dtype, xl, dyl, per_sample, small = case
    x, w1, w2, table = _inputs(shape, N, dtype, xl, dev, per_sample, seed_of("inst-bwd-tri", shape))
    B, C, H, W = x.shape
    dy = torch.randn((N * B, C, H, W), generator=torch.Generator().manual_seed(5)).to(dtype)
    dy = relayout(dy, dyl).to(dev)
    with _small_tiles() if small else contextlib.nullcontext():
        got = tm.mimb_instances_bwd_triton(dy, x, w1, w2, table)
    _check_bwd(got, dy, x, w1, w2, table)


def test_small_tiles_take_the_multi_program_paths():
    """The ``small`` backward cases run several channel blocks, HW splits and (N = 9) two
    instance groups per sample: read off the recorded reduction launch."""
    from mipnet_kernels.triton._launch import record_launches

    tm = _tm()
    for layout, N in (("contiguous", 9), ("channels_last", 3)):
        x, w1, w2, table = _inputs((2, 16, 6, 5, 4), N, F32, layout, torch.device("cpu"), True, 0)
        with _small_tiles(), record_launches() as rec:
            tm.mimb_instances_bwd_triton(torch.zeros(N * 2, 16, 6, 5), x, w1, w2, table)
        red = next(r for r in rec if r.kernel.__name__ == "_mimb_reduce_mlp_kernel")
        # positional: ... B, C, CR, HW, stride_c, stride_p, CHUNK, num_cblocks, SPLIT, NA, NG
        num_cblocks, split, na, ng = red.args[21:25]
        assert red.kwargs["MODE"] == 3 and na == N
        assert num_cblocks > 1 and split > 1, (num_cblocks, split)
        assert ng == (2 if N == 9 else 1) and red.kwargs["NB"] == (8 if N == 9 else 4)
        assert red.grid == (2 * num_cblocks * split * ng,)
        # the forward: one instance group (the x sums only), one program per (b, block, split)
        with _small_tiles(), record_launches() as rec:
            tm.mimb_instances_triton(x, w1, w2, table)
        red = next(r for r in rec if r.kernel.__name__ == "_mimb_reduce_mlp_kernel")
        num_cblocks, split, na, ng = red.args[21:25]
        assert red.kwargs["MODE"] == 1 and red.kwargs["NB"] == 1 and na == N and ng == 1
        assert red.grid == (2 * num_cblocks * split,)


def test_backward_test_catches_a_missing_instance(dev):
    """The composite comparison fails when one instance's dy is dropped (a test of the test)."""
    tm = _tm()
    x, w1, w2, table = _inputs((2, 8, 3, 2, 2), 3, F64, "contiguous", dev, True, 3)
    dy = torch.randn(6, 8, 3, 2, dtype=F64, generator=torch.Generator().manual_seed(1)).to(dev)
    dropped = dy.clone()
    dropped[2:4] = 0
    got = tm.mimb_instances_bwd_triton(dropped, x, w1, w2, table)
    with pytest.raises(AssertionError):
        _check_bwd(got, dy, x, w1, w2, table)


# --------------------------------------------------------------------------- grouped backward
GROUPED_BWD_CASES = [(F32, "contiguous", False), (F64, "channels_last", False), (BF16, "channels_last", False),
                     (F32, "channels_last", True)]


@pytest.mark.parametrize("dtype, layout, small", GROUPED_BWD_CASES,
                         ids=lambda v: str(v)[6:] if isinstance(v, torch.dtype) else str(v))
def test_instances_grouped_backward(dev, dtype, layout, small):
    """One grouped launch pair over branches with [N, C] and [N, B, C] tables and different N
    (one of them two instance groups of the group-wide 8), each branch against the composite;
    an empty branch and one without instances take the single-op path (zeros)."""
    tm = _tm()
    specs = [((2, 8, 5, 4, 4), 2, True), ((2, 16, 3, 2, 4), 9, False), ((2, 3, 1, 1, 1), 3, True),
             ((0, 8, 2, 2, 4), 2, True), ((2, 8, 2, 2, 4), 0, False)]
    xs, w1s, w2s, tables, dys = [], [], [], [], []
    for k, (shape, N, per_sample) in enumerate(specs):
        x, w1, w2, t = _inputs(shape, N, dtype, layout, dev, per_sample, seed_of("grouped-bwd-tri", shape))
        B, C, H, W = x.shape
        dy = torch.randn((N * B, C, H, W), generator=torch.Generator().manual_seed(k)).to(dtype)
        xs.append(x), w1s.append(w1), w2s.append(w2), tables.append(t), dys.append(relayout(dy, "contiguous").to(dev))
    with _small_tiles() if small else contextlib.nullcontext():
        got = tm.mimb_instances_grouped_bwd_triton(dys, xs, w1s, w2s, tables)
    assert all(len(g) == len(xs) for g in got)
    for k in range(3):
        _check_bwd([g[k] for g in got], dys[k], xs[k], w1s[k], w2s[k], tables[k])
    for k in (3, 4):  # nothing reaches the inputs
        dx, dw1, dw2, dt = (g[k] for g in got)
        assert dx.shape == xs[k].shape and dt.shape == tables[k].shape
        for t in (dx, dw1, dw2, dt):
            assert not t.any()


def test_instances_backward_other_strides(dev):
    """Any strides (the op layer passes them through): a sliced x and dy, transposed weight
    views, a permuted [N, B, C] table."""
    tm = _tm()
    x, w1, w2, table = _inputs((2, 8, 4, 3, 2), 3, F32, "contiguous", dev, True, 11)
    dy = torch.randn(6, 8, 4, 3, generator=torch.Generator().manual_seed(2)).to(dev)
    xs, dys = relayout(x, "sliced"), relayout(dy, "sliced")
    w1t, w2t = w1.T.contiguous().T, w2.T.contiguous().T
    tt = table.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    assert not any(t.is_contiguous() for t in (xs, dys, w1t, w2t, tt))
    got = tm.mimb_instances_bwd_triton(dys, xs, w1t, w2t, tt)
    _check_bwd(got, dy, x, w1, w2, table)
