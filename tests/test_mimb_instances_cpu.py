"""The C++ CPU kernels of ``mimb_instances`` with both table forms and of its fused backward
``mimb_instances_bwd`` (``torch.ops.mipnet_cpu.*``, csrc/cpu/mimb_kernel.cpp; contract in
csrc/schemas.h), kernel against its definition:

* ``mimb_instances(x, w1, w2, table)``: ``table [N, C]`` or ``[N, B, C]``; block ``n`` of ``y``
  is ``mimb_scale_fwd`` with ``v = t[n]``, bit for bit;
* ``mimb_instances_bwd(dy, x, w1, w2, table)``: the sum over ``n`` of ``mimb_scale_bwd(dy_n,
  x, w1, w2, v = t[n])`` (``dtable [N, C]``: instance ``n``'s ``dv`` summed over the batch).

Accuracy (flash-attention's rule, as tests/test_mimb.py): ``truth`` is autograd through the
float64 forward reference ``mimb_instances_reference`` on the (already rounded) inputs, an
independent derivation of the gradient; ``eager`` the composite definition (a loop of
``mimb_scale_bwd_reference`` over ``n``, each result in the test dtype, summed) in the test
dtype.  The kernel's error must be at most ``2 x`` eager's, plus ``1e-5 x max|truth|`` (+ half
an ulp of ``max|truth|`` in float16 / bfloat16).  Also: ``N = 1`` equals ``mimb_scale_bwd``
bit for bit; every result is bit-identical for 1 and 2 threads and on every vector path of
this CPU; odd shapes, both layouts, any ``dy`` layout, strided / low-precision tables, empty
inputs, bad input; a float32 gradcheck of the forward / backward pair.
"""

from __future__ import annotations

import pytest
import torch

import mipnet_kernels as mk
from mipnet_kernels import _extension
from mipnet_kernels.ops.mimb.reference import mimb_instances_reference, mimb_scale_bwd_reference
from utils import check_flash, expected_format, make_case, relayout, seed_of

ops = torch.ops.mipnet_cpu
pytestmark = pytest.mark.skipif(
    not _extension.cpu_extension()[0] or not hasattr(ops, "mimb_instances_bwd"),
    reason=f"C++ CPU extension without mimb_instances_bwd: {_extension.cpu_extension()[1]}")

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
FMT = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


# --------------------------------------------------------------------------- definitions
def per_sample_table(table: torch.Tensor, B: int, seed: int) -> torch.Tensor:
    """A ``[N, B, C]`` table: ``table [N, C]`` with a different factor per output sample."""
    g = torch.Generator().manual_seed(seed)
    N, C = table.shape
    return (table.float()[:, None, :] * (0.5 + torch.rand(N, B, C, generator=g))).to(table.dtype)


def rows(table: torch.Tensor, n: int, B: int) -> torch.Tensor:
    """``t[n, :]``: ``v [B, C]`` of instance ``n``."""
    return table[n] if table.dim() == 3 else table[n].expand(B, table.shape[-1])


def composite_bwd(dy, x, w1, w2, table, drop=None):
    """The contract, in the inputs' dtype: the sum over ``n`` of ``mimb_scale_bwd_reference``
    (``drop``: leave that instance out, a test of the test)."""
    B = x.shape[0]
    s = x.mean(dim=(2, 3), dtype=torch.float64 if x.dtype == F64 else F32)
    dx = dw1 = dw2 = None
    dts = []
    for n in range(table.shape[0]):
        r = mimb_scale_bwd_reference(dy[n * B:(n + 1) * B], x, w1, w2, rows(table, n, B), s)
        if n == drop:
            r = tuple(torch.zeros_like(t) for t in r)
        dx, dw1, dw2 = (r[:3] if dx is None else (dx + r[0], dw1 + r[1], dw2 + r[2]))
        dts.append(r[3] if table.dim() == 3 else r[3].sum(0))
    return dx, dw1, dw2, torch.stack(dts)


def truth_bwd(dy, x, w1, w2, table):
    """Autograd through the float64 forward reference: ``(y, dx, dw1, dw2, dtable)``."""
    leaves = [t.detach().double().requires_grad_(True) for t in (x, w1, w2, table)]
    y = mimb_instances_reference(*leaves)
    y.backward(dy.double())
    return (y.detach(), *(t.grad for t in leaves))


def inputs(shape, N, dtype, layout, table_kind, seed_parts, wdtype=None):
    B, C, H, W, r = shape
    c = make_case(*shape, N=N, seed=seed_of("inst-cpu", *seed_parts))
    wdtype = dtype if wdtype is None else wdtype
    x = c["x"].to(dtype).contiguous(memory_format=FMT[layout])
    w1, w2 = c["w1"].to(wdtype), c["w2"].to(wdtype)
    table = c["table"]
    if table_kind == "per_sample":
        table = per_sample_table(table, B, seed_of("table", *seed_parts))
    table = table.to(wdtype)
    g = torch.Generator().manual_seed(seed_of("dy", *seed_parts))
    dy = torch.randn(N * B, C, H, W, generator=g).to(dtype).contiguous(memory_format=FMT[layout])
    return dy, x, w1, w2, table


def bits(t: torch.Tensor) -> torch.Tensor:
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(ints)


def assert_same(got, want, what=""):
    """Bitwise equality (NaN of the same bits equal), dtype, shape and strides."""
    if isinstance(got, (tuple, list)):
        assert len(got) == len(want)
        for i, (a, b) in enumerate(zip(got, want)):
            assert_same(a, b, f"{what}[{i}]")
        return
    assert got.dtype == want.dtype and got.shape == want.shape and got.stride() == want.stride(), what
    assert torch.equal(bits(got), bits(want)), f"{what}: not bit-identical"


# --------------------------------------------------------------------------- accuracy
# (B, C, H, W, r): C = 1 / Cr = 1, H*W = 1, a plane of more than 4096 values (summed in blocks),
# B = 1, odd sizes; Cr = max(C // r, 1).
SHAPES = [(1, 1, 1, 1, 1), (2, 3, 7, 5, 1), (2, 8, 3, 3, 8), (1, 48, 1, 1, 4), (3, 48, 7, 5, 4),
          (2, 16, 70, 64, 4), (4, 32, 16, 12, 4)]
CASES = ([(s, F32, lay, kind, N) for s in SHAPES for lay in FMT for kind in ("shared", "per_sample")
          for N in (1, 2, 3)]
         + [((2, 52, 4, 5, 4), F32, lay, kind, 5) for lay in FMT for kind in ("shared", "per_sample")]
         + [(s, d, lay, kind, 2) for s in SHAPES for d in (F16, BF16) for lay in FMT
            for kind in ("shared", "per_sample")])


@pytest.mark.parametrize("shape, dtype, layout, table_kind, N", CASES)
def test_bwd_matches_the_definition(shape, dtype, layout, table_kind, N):
    dy, x, w1, w2, table = inputs(shape, N, dtype, layout, table_kind, (shape, dtype, layout, table_kind, N))
    y = ops.mimb_instances(x, w1, w2, table)
    got = ops.mimb_instances_bwd(dy, x, w1, w2, table)
    truth = truth_bwd(dy, x, w1, w2, table)
    eager = (mimb_instances_reference(x, w1, w2, table), *composite_bwd(dy, x, w1, w2, table))
    for name, out, e, t in zip(("y", "dx", "dw1", "dw2", "dtable"), (y, *got), eager, truth):
        check_flash(out, e, t, dtype, name)
    dx, dw1, dw2, dtable = got
    assert dx.dtype == x.dtype and dx.shape == x.shape
    assert dx.is_contiguous(memory_format=expected_format(x)), "dx must have x's memory format"
    for g, like in ((dw1, w1), (dw2, w2), (dtable, table)):
        assert g.dtype == like.dtype and g.shape == like.shape and g.is_contiguous()


@pytest.mark.parametrize("dtype", [F16, BF16], ids=str)
def test_bwd_low_precision_x_float32_weights(dtype):
    """Autocast-style inputs: float32 weights and table get float32 gradients."""
    dy, x, w1, w2, table = inputs((3, 48, 7, 5, 4), 2, dtype, "contiguous", "per_sample", ("mixed", dtype), wdtype=F32)
    got = ops.mimb_instances_bwd(dy, x, w1, w2, table)
    assert got[0].dtype == dtype and all(g.dtype == F32 for g in got[1:])
    truth = truth_bwd(dy, x, w1, w2, table)[1:]
    eager = composite_bwd(dy, x, w1, w2, table)
    for name, out, e, t in zip(("dx", "dw1", "dw2", "dtable"), got, eager, truth):
        check_flash(out, e, t, dtype, name)


def test_the_accuracy_test_catches_a_dropped_instance():
    """A test of the test: the definition without one instance's term fails the comparison
    the kernel passes (so a kernel dropping a term in dx, dw1, dw2 or dtable fails too)."""
    shape, N = (3, 16, 5, 4, 4), 3
    for kind in ("shared", "per_sample"):
        dy, x, w1, w2, table = inputs(shape, N, F32, "contiguous", kind, ("drop", kind))
        truth = truth_bwd(dy, x, w1, w2, table)[1:]
        eager = composite_bwd(dy, x, w1, w2, table)
        for n in range(N):
            wrong = composite_bwd(dy, x, w1, w2, table, drop=n)
            for name, out, e, t in zip(("dx", "dw1", "dw2", "dtable"), wrong, eager, truth):
                with pytest.raises(AssertionError):
                    check_flash(out, e, t, F32, name)


# --------------------------------------------------------------------------- exact relations
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
@pytest.mark.parametrize("layout", list(FMT))
@pytest.mark.parametrize("shape", [(3, 48, 7, 5, 4), (2, 3, 70, 64, 1), (2, 24, 1, 1, 4)])
def test_one_instance_is_mimb_scale_bwd_bit_for_bit(shape, dtype, layout):
    """N = 1: (dx, dw1, dw2, dv) of mimb_scale_bwd with v = t[0] and the forward's s."""
    B, C = shape[:2]
    dy, x, w1, w2, table = inputs(shape, 1, dtype, layout, "per_sample", ("n1", shape, dtype, layout))
    _, s = ops.mimb_scale_fwd(x, w1, w2, table[0])
    want = ops.mimb_scale_bwd(dy, x, w1, w2, table[0], s)
    dx, dw1, dw2, dtable = ops.mimb_instances_bwd(dy, x, w1, w2, table)
    assert_same((dx, dw1, dw2, dtable[0]), want)
    # [N, C] table: the same dx, dw1, dw2; dtable = dv summed over the batch
    t2 = table[0, :1].clone()
    want = ops.mimb_scale_bwd(dy, x, w1, w2, t2.expand(B, C), s)
    got = ops.mimb_instances_bwd(dy, x, w1, w2, t2)
    assert_same(got[:3], want[:3])
    # (summed in float32 and rounded once; the B rounded dv rows differ by an ulp each)
    ulp = 1e-6 if dtype == F32 else torch.finfo(dtype).eps
    dv = want[3].float()
    torch.testing.assert_close(got[3][0].float(), dv.sum(0), rtol=0, atol=B * ulp * float(dv.abs().max()))


@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
@pytest.mark.parametrize("layout", list(FMT))
def test_forward_per_sample_table_is_scale_fwd_per_block(dtype, layout):
    """y[n*B:(n+1)*B] = mimb_scale_fwd(x, w1, w2, t[n]) bit for bit, for both table forms."""
    shape, N = (3, 40, 6, 5, 4), 3
    B, C = shape[:2]
    _, x, w1, w2, table = inputs(shape, N, dtype, layout, "per_sample", ("fwd", dtype, layout))
    for t in (table, table[:, 0]):
        y = ops.mimb_instances(x, w1, w2, t)
        assert y.shape == (N * B, *x.shape[1:]) and y.is_contiguous(memory_format=expected_format(x))
        for n in range(N):
            assert_same(y[n * B:(n + 1) * B], ops.mimb_scale_fwd(x, w1, w2, rows(t, n, B))[0], f"block {n}")


@pytest.mark.parametrize("layout", list(FMT))
def test_shared_table_equals_its_per_sample_expansion(layout):
    """table [N, C] and table[:, None].expand(N, B, C) (stride 0 over B): the same y, dx, dw1,
    dw2 bit for bit; dtable [N, C] = the per-sample dtable summed over B."""
    shape, N = (3, 20, 6, 5, 4), 3
    B, C = shape[:2]
    dy, x, w1, w2, table = inputs(shape, N, F32, layout, "shared", ("expand", layout))
    wide = table[:, None].expand(N, B, C)
    assert_same(ops.mimb_instances(x, w1, w2, wide), ops.mimb_instances(x, w1, w2, table), "y")
    got, want = ops.mimb_instances_bwd(dy, x, w1, w2, wide), ops.mimb_instances_bwd(dy, x, w1, w2, table)
    assert_same(got[:3], want[:3])
    assert got[3].shape == (N, B, C) and got[3].is_contiguous()
    torch.testing.assert_close(got[3].sum(1), want[3], rtol=1e-6, atol=1e-6 * float(want[3].abs().max()))


def test_any_table_strides_and_dy_layout():
    """A strided / float16 table is read as its values; dy in another layout is copied to
    x's; the results equal the contiguous ones bit for bit."""
    shape, N = (3, 24, 5, 7, 4), 2
    B, C = shape[:2]
    for layout in FMT:
        dy, x, w1, w2, table = inputs(shape, N, F32, layout, "per_sample", ("strides", layout))
        want_y = ops.mimb_instances(x, w1, w2, table)
        want = ops.mimb_instances_bwd(dy, x, w1, w2, table)
        strided = table.permute(2, 0, 1).contiguous().permute(1, 2, 0)  # C outermost
        assert not strided.is_contiguous()
        assert_same(ops.mimb_instances(x, w1, w2, strided), want_y, "y, strided table")
        assert_same(ops.mimb_instances_bwd(dy, x, w1, w2, strided), want, "strided table")
        other = "contiguous" if layout == "channels_last" else "channels_last"
        for dy2 in (relayout(dy, other), relayout(dy, "sliced"), relayout(dy, "permuted")):
            assert_same(ops.mimb_instances_bwd(dy2, x, w1, w2, table), want, f"dy {dy2.stride()}")
        expanded = relayout(dy, "expanded")  # dy[:1] over all N * B rows, stride 0
        assert_same(ops.mimb_instances_bwd(expanded, x, w1, w2, table),
                    ops.mimb_instances_bwd(expanded.contiguous(memory_format=FMT[layout]), x, w1, w2, table),
                    "expanded dy")
        # a float16 table and its float32 copy: the same values, the gradient in its dtype
        t16 = table.half()
        got = ops.mimb_instances_bwd(dy, x, w1, w2, t16)
        ref = ops.mimb_instances_bwd(dy, x, w1, w2, t16.float())
        assert_same(got[:3], ref[:3])
        assert_same(got[3], ref[3].half())


# --------------------------------------------------------------------------- determinism
DET_SHAPES = [((3, 24, 16, 12, 4), "contiguous"), ((2, 40, 16, 12, 4), "contiguous"),
              ((3, 24, 16, 12, 4), "channels_last"), ((4, 72, 9, 7, 4), "channels_last"),
              ((3, 8, 80, 60, 4), "contiguous")]


def run_both(dy, x, w1, w2, table):
    return ops.mimb_instances(x, w1, w2, table), *ops.mimb_instances_bwd(dy, x, w1, w2, table)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("shape, layout", DET_SHAPES)
def test_bit_identical_for_1_and_2_threads(shape, layout, dtype):
    """Per-sample (B even) and phase-by-phase (B odd) partitions; large enough that two
    threads run (kernels parallelise above 2^15 values)."""
    before = torch.get_num_threads()
    try:
        for kind in ("shared", "per_sample"):
            args = inputs(shape, 2, dtype, layout, kind, ("threads", shape, layout, kind))
            torch.set_num_threads(1)
            want = run_both(*args)
            torch.set_num_threads(2)
            assert_same(run_both(*args), want, f"{kind} table, 2 threads")
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
@pytest.mark.parametrize("shape, layout, N", [
    ((3, 37, 5, 7, 4), "contiguous", 3), ((2, 384, 3, 2, 4), "channels_last", 2),
    ((3, 24, 9, 5, 4), "channels_last", 3), ((2, 52, 4, 5, 4), "channels_last", 5),
    ((2, 8, 1, 1, 4), "contiguous", 1), ((2, 5, 70, 64, 1), "contiguous", 5)])
def test_bit_identical_on_every_isa_path(shape, layout, N, dtype):
    """Every vector path this CPU has (tests/test_cpu_isa.py) equals the scalar path (C = 52
    channels_last: blocks of vectors, a remainder block and scalar channels on every path)."""
    for kind in ("shared", "per_sample"):
        args = inputs(shape, N, dtype, layout, kind, ("isa", shape, layout, kind))
        with mk.use_cpu_isa("scalar"):
            want = run_both(*args)
        for isa in mk.cpu_isas():
            with mk.use_cpu_isa(isa):
                assert_same(run_both(*args), want, f"{isa} path, {kind} table")


# --------------------------------------------------------------------------- gradcheck
class Instances(torch.autograd.Function):
    """The kernel pair as a differentiable function (the lead's wiring, in miniature)."""

    @staticmethod
    def forward(ctx, x, w1, w2, table):
        ctx.save_for_backward(x, w1, w2, table)
        return ops.mimb_instances(x, w1, w2, table)

    @staticmethod
    def backward(ctx, dy):
        return ops.mimb_instances_bwd(dy, *ctx.saved_tensors)


@pytest.mark.filterwarnings("ignore:Input #.* is not a double precision")
@pytest.mark.parametrize("table_kind", ["shared", "per_sample"])
@pytest.mark.parametrize("layout", list(FMT))
def test_gradcheck_float32(layout, table_kind):
    """Finite differences of the forward kernel against the backward kernel (float32: the
    kernels refuse float64; central differences with eps 1e-3 on values of order 1, the
    excite's ReLU inputs kept clear of the kink so that eps does not cross it)."""
    eps = 1e-3
    for seed in range(50):  # the first case whose ReLU inputs are > 2x what eps can move them
        _, x, w1, w2, table = inputs((2, 6, 3, 2, 2), 2, F32, layout, table_kind, ("gradcheck", layout, table_kind, seed))
        s = x.double().mean(dim=(2, 3))
        reach = eps * (1 + s.abs().sum(1).max() + w1.double().abs().sum(1).max())
        if (s @ w1.double().T).abs().min() > 2 * reach:
            break
    else:
        raise AssertionError("test set-up: no case with its ReLU inputs clear of the kink")
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w1, w2, table)]
    assert torch.autograd.gradcheck(Instances.apply, leaves, eps=eps, atol=2e-3, rtol=1e-2)


# --------------------------------------------------------------------------- edges + errors
@pytest.mark.parametrize("table_kind", ["shared", "per_sample"])
@pytest.mark.parametrize("shape, N", [((2, 8, 3, 3, 4), 0), ((0, 8, 3, 3, 4), 2), ((2, 0, 3, 3, 1), 2)])
def test_empty(shape, N, table_kind):
    """No instance: dx = 0 (an empty sum) and zero weight gradients; no sample or channel:
    empty dx, zero weight gradients."""
    B, C, H, W, r = shape
    Cr = max(C // r, 1)
    x = torch.randn(B, C, H, W)
    w1, w2 = torch.randn(Cr, C), torch.randn(C, Cr)
    table = torch.rand(N, B, C) if table_kind == "per_sample" else torch.rand(N, C)
    dy = torch.randn(N * B, C, H, W)
    y = ops.mimb_instances(x, w1, w2, table)
    assert y.shape == (N * B, C, H, W)
    dx, dw1, dw2, dtable = ops.mimb_instances_bwd(dy, x, w1, w2, table)
    assert dx.shape == x.shape and dw1.shape == w1.shape and dw2.shape == w2.shape and dtable.shape == table.shape
    for t in (dx, dw1, dw2, dtable):
        assert not t.any()


def _bad(make, match):
    dy, x, w1, w2, table = inputs((2, 8, 3, 3, 4), 2, F32, "contiguous", "per_sample", ("bad",))
    args = dict(dy=dy, x=x, w1=w1, w2=w2, table=table)
    changed = make(args)
    args.update(changed)
    with pytest.raises(RuntimeError, match=match):
        ops.mimb_instances_bwd(args["dy"], args["x"], args["w1"], args["w2"], args["table"])
    if "dy" not in changed:  # the forward checks x, w1, w2 and table alike
        with pytest.raises(RuntimeError, match=match.replace("mimb_instances_bwd", "mimb_instances")):
            ops.mimb_instances(args["x"], args["w1"], args["w2"], args["table"])


@pytest.mark.parametrize("make, match", [
    (lambda a: {"table": a["table"][:, :1]}, r"mimb_instances_bwd: table.size\(1\) must be B \(x.size\(0\)\) = 2, got 1"),
    (lambda a: {"table": a["table"][:, :, :5]}, r"table.size\(2\) must be C \(x.size\(1\)\) = 8, got 5"),
    (lambda a: {"table": a["table"][:, 0, :5]}, r"table.size\(1\) must be C \(x.size\(1\)\) = 8, got 5"),
    (lambda a: {"table": a["table"][0, 0]}, r"table must be 2-D \[N, C\] or 3-D \[N, B, C\], got 1 dims"),
    (lambda a: {"table": a["table"][None]}, r"table must be 2-D \[N, C\] or 3-D \[N, B, C\], got 4 dims"),
    (lambda a: {"table": a["table"].double()}, r"table must be float32, float16 or bfloat16, got float64"),
    (lambda a: {"table": a["table"].int()}, r"table must be float32, float16 or bfloat16"),
    (lambda a: {"x": a["x"].double()}, r"x must be float32, float16 or bfloat16, got float64"),
    (lambda a: {"w1": a["w1"][:, :3]}, r"w1.size\(1\) must be C"),
    (lambda a: {"dy": a["dy"][:2]}, r"dy must be \[N\*B, C, H, W\] = \[4, 8, 3, 3\].*size 2 != 4 at dim 0"),
    (lambda a: {"dy": a["dy"][:, :, :2]}, r"dy must be \[N\*B, C, H, W\].*at dim 2"),
    (lambda a: {"dy": a["dy"].half()}, r"dy is float16 but x is float32"),
    (lambda a: {"x": a["x"].transpose(2, 3)}, r"x must be contiguous \(NCHW\) or channels_last"),
])
def test_bad_input(make, match):
    _bad(make, match)
