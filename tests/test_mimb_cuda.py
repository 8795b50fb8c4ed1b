"""CUDA-only tests of the MIMB kernels (csrc/cuda/mimb_kernel.cu), beyond what
``test_mimb.py`` already runs on the cuda backend (its ``cuda-cuda-*`` cases):

* both kernel paths forced (``MIPNET_MIMB_CUDA_PATH=two_phase`` / ``single_pass``) against the
  official layer, and bit-identical to each other (the tiling does not depend on the path);
* the grouped ops in one launch (counted with the profiler), more than four branches, branches
  with and without vector access in one launch -- bit-identical to one call per branch;
* large H*W, C = 1 / 3 / 384, B = 1, float16 / bfloat16, channels_last, unaligned x;
* the per-stream counters across calls, shapes, paths and streams; determinism;
* channels-last tiles wider than a block (C = 264 .. 2048), and a cooperative launch the
  driver refuses (auto falls back to two phases, forced single pass raises, no error left);
* the fused ``mimb_fwd`` kernel and the private ops' own input checks;
* the fused instances backward (``mimb_instances_bwd`` / ``_grouped_bwd``, two phases only):
  against the official layer in float64 for both table forms, wide channels-last tiles,
  large maps, unaligned operands; grouped in two launches and bit-identical to single calls;
  deterministic; not affected by MIPNET_MIMB_CUDA_PATH; empty sums; its input checks.

Every test id contains ``cuda-cuda`` (the Makefile's ``sanitize`` target selects them).
Skipped without a GPU or without the CUDA extension.
"""

from __future__ import annotations

import pytest
import torch

import mipnet_kernels as mk
from anchors import official_instances, official_scale
from mipnet_kernels.ops import mimb as M
from utils import (
    MIMB_KEYS,
    check_flash,
    check_output,
    eager_with_grads,
    expected_format,
    make_case,
    relayout,
    seed_of as _seed,
    skip_unless_runs,
)

pytestmark = pytest.mark.cuda

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
ENV = "MIPNET_MIMB_CUDA_PATH"
PATHS = ("two_phase", "single_pass")
KERNELS = ("mimb_reduce_kernel", "mimb_apply_kernel", "mimb_single_pass_kernel")


def _ident(*parts) -> str:
    out = []
    for p in parts:
        if isinstance(p, torch.dtype):
            out.append(str(p).replace("torch.", ""))
        elif isinstance(p, tuple):
            out.append("x".join(map(str, p)))
        else:
            out.append(str(p))
    return "-".join(out)


def _params(cases):
    return [pytest.param(*c, id=_ident(*c)) for c in cases]


@pytest.fixture(params=[pytest.param("cuda", id="cuda-cuda")])
def dev(request):
    """The CUDA device (every test takes it: its id puts "cuda-cuda" in every test id)."""
    d = skip_unless_runs("cuda", request.param)
    if not hasattr(torch.ops.mipnet_cuda, "mimb_scale_fwd"):
        pytest.skip("the loaded CUDA extension has no MIMB kernels")
    return d


def scale_fwd_bwd(x, w1, w2, v, dy):
    """``mimb_scale`` on the cuda backend: ``(y, dx, dw1, dw2, dv)``."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w1, w2, v)]
    with mk.use_backend("cuda"):
        y = mk.mimb_scale(*leaves)
        y.backward(dy)
    return (y.detach(), *(t.grad for t in leaves))


def _inputs(shape, dtype, layout, dev, seed=0):
    c = make_case(*shape, seed=seed)
    x, w1, w2, v = (c[k].to(dtype) for k in ("x", "w1", "w2", "v"))
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    on = [relayout(x.to(dev), layout), w1.to(dev), w2.to(dev), v.to(dev)]
    return (x, w1, w2, v, dy), on, relayout(dy.to(dev), layout)


# --------------------------------------------------------------------------- both paths
# (B, C, H, W, r): C = 1 / 3 / 384, B = 1 and 48, H*W from 1 to 96x72; 12x9 has no 8-wide
# vectors for 16-bit NCHW (single elements), C = 3 none for NHWC.
PATH_SHAPES = [
    (1, 1, 33, 17, 1),
    (2, 3, 7, 5, 1),
    (1, 384, 12, 9, 4),
    (2, 384, 1, 1, 4),
    (48, 32, 8, 6, 4),
    (2, 48, 96, 72, 4),
]
PATH_CASES = [(p, s, d, lay) for p in PATHS for s in PATH_SHAPES for d in (F32, F16, BF16)
              for lay in ("contiguous", "channels_last")]


@pytest.mark.parametrize("path, shape, dtype, layout", _params(PATH_CASES))
def test_paths_against_official(dev, monkeypatch, path, shape, dtype, layout):
    monkeypatch.setenv(ENV, path)
    cpu, on, dyd = _inputs(shape, dtype, layout, dev, seed=_seed("cuda", shape) % 1000)
    y, dx, dw1, dw2, dv = scale_fwd_bwd(*on, dyd)
    check_output(y, on[0])
    assert dx.is_contiguous(memory_format=expected_format(on[0])), "dx must have x's memory format"
    x, w1, w2, v, dy = cpu
    truth, truth_g = eager_with_grads(official_scale, dy.double(), x.double(), w1.double(), w2.double(), v.double())
    eager, eager_g = eager_with_grads(official_scale, dy, x, w1, w2, v)
    check_flash(y, eager, truth, dtype, "y")
    for name, got, e, t in zip(("dx", "dw1", "dw2", "dv"), (dx, dw1, dw2, dv), eager_g, truth_g):
        check_flash(got, e, t, dtype, name)
    # instances (N = 3) on the same path
    table = make_case(*shape, N=3, seed=7)["table"].to(dtype)
    with torch.no_grad(), mk.use_backend("cuda"):
        yi = mk.mimb_instances(on[0], on[1], on[2], table.to(dev))
    check_output(yi, on[0], batch=3 * shape[0])
    truth_i, _ = eager_with_grads(official_instances, None, x.double(), w1.double(), w2.double(), table.double())
    eager_i, _ = eager_with_grads(official_instances, None, x, w1, w2, table)
    check_flash(yi, eager_i, truth_i, dtype, "instances")


LARGE_CASES = [("two_phase", (1, 32, 256, 192, 4), F16), ("auto", (1, 32, 256, 192, 4), BF16),
               ("two_phase", (4, 64, 128, 96, 4), F32), ("auto", (4, 64, 128, 96, 4), F32)]


@pytest.mark.parametrize("path, shape, dtype", _params(LARGE_CASES))
def test_large_maps(dev, monkeypatch, path, shape, dtype):
    monkeypatch.setenv(ENV, path)
    cpu, on, dyd = _inputs(shape, dtype, "contiguous", dev, seed=3)
    y, dx, dw1, dw2, dv = scale_fwd_bwd(*on, dyd)
    x, w1, w2, v, dy = cpu
    truth, truth_g = eager_with_grads(official_scale, dy.double(), x.double(), w1.double(), w2.double(), v.double())
    eager, eager_g = eager_with_grads(official_scale, dy, x, w1, w2, v)
    check_flash(y, eager, truth, dtype, "y")
    for name, got, e, t in zip(("dx", "dw1", "dw2", "dv"), (dx, dw1, dw2, dv), eager_g, truth_g):
        check_flash(got, e, t, dtype, name)


BITWISE_CASES = [(s, d, lay) for s in [(1, 3, 7, 5, 1), (3, 48, 16, 12, 4), (2, 384, 12, 9, 4), (48, 32, 8, 6, 4)]
                 for d in (F32, BF16) for lay in ("contiguous", "channels_last")]


@pytest.mark.parametrize("shape, dtype, layout", _params(BITWISE_CASES))
def test_paths_bit_identical(dev, monkeypatch, shape, dtype, layout):
    """The two paths share the tiling, so every output is the same bit for bit."""
    _, on, dyd = _inputs(shape, dtype, layout, dev, seed=5)
    c = make_case(*shape, N=3, seed=6)
    table = c["table"].to(dev)
    embed = [c[k].to(dev) for k in MIMB_KEYS[1:]]
    embed = [embed[0], on[1], on[2], *embed[3:]]  # lam, w1, w2, e1, b1, e2, b2
    results = {}
    for path in PATHS:
        monkeypatch.setenv(ENV, path)
        out = list(scale_fwd_bwd(*on, dyd))
        out.append(torch.ops.mipnet_cuda.mimb_instances(on[0], on[1], on[2], table))
        out.extend(torch.ops.mipnet_cuda.mimb_fwd(on[0], *embed))
        results[path] = out
    for i, (a, b) in enumerate(zip(*results.values())):
        assert torch.equal(a, b), f"output {i} differs between the two paths"


def test_single_pass_forced_too_large_raises(dev, monkeypatch):
    monkeypatch.setenv(ENV, "single_pass")
    x = torch.randn(32, 64, 128, 128, device=dev)  # 128 MiB: far beyond the register file
    c = make_case(1, 64, 1, 1, 4)
    with pytest.raises(RuntimeError, match="does not fit"):
        torch.ops.mipnet_cuda.mimb_scale_fwd(x, c["w1"].to(dev), c["w2"].to(dev), torch.rand(32, 64, device=dev))
    monkeypatch.setenv(ENV, "auto")  # the automatic choice falls back to two phases
    y, s = torch.ops.mipnet_cuda.mimb_scale_fwd(x, c["w1"].to(dev), c["w2"].to(dev), torch.ones(32, 64, device=dev))
    torch.testing.assert_close(s, x.mean((2, 3)), rtol=1e-5, atol=1e-6)


def test_bad_path_variable(dev, monkeypatch):
    monkeypatch.setenv(ENV, "fastest")
    _, on, _ = _inputs((2, 8, 3, 3, 4), F32, "contiguous", dev)
    with pytest.raises(RuntimeError, match="MIPNET_MIMB_CUDA_PATH must be auto, two_phase or single_pass"):
        torch.ops.mipnet_cuda.mimb_scale_fwd(*on)


# --------------------------------------------------------------------------- grouped
def _kernel_launches(fn) -> list[str]:
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if any(k in e.name for k in KERNELS)]


def _branches(shapes, dtype, dev, N=2):
    cs = [make_case(*s, 4, N=N, seed=i) for i, s in enumerate(shapes)]
    return {k: [c[k].to(dtype).to(dev) for c in cs] for k in ("x", "w1", "w2", "v", "table")}


# HRNet-W48 branches at 384x288 / 4 (the last: 12x9, no 8-wide vectors in float16).
HRNET_W48 = [(2, 48, 96, 72), (2, 96, 48, 36), (2, 192, 24, 18), (2, 384, 12, 9)]


@pytest.mark.parametrize("path", _params([(p,) for p in PATHS]))
def test_grouped_is_one_launch(dev, monkeypatch, path):
    monkeypatch.setenv(ENV, path)
    b = _branches(HRNET_W48, F16, dev)
    per_call = 1 if path == "single_pass" else 2
    with torch.no_grad():
        launches = _kernel_launches(lambda: torch.ops.mipnet_cuda.mimb_scale_grouped_fwd(b["x"], b["w1"], b["w2"], b["v"]))
        assert len(launches) == per_call, launches
        launches = _kernel_launches(lambda: torch.ops.mipnet_cuda.mimb_instances_grouped(b["x"], b["w1"], b["w2"], b["table"]))
        assert len(launches) == per_call, launches
        dys = [torch.randn_like(x) for x in b["x"]]
        ss = [x.float().mean((2, 3)) for x in b["x"]]
        launches = _kernel_launches(
            lambda: torch.ops.mipnet_cuda.mimb_scale_grouped_bwd(dys, b["x"], b["w1"], b["w2"], b["v"], ss))
        assert len(launches) == per_call, launches


@pytest.mark.parametrize("path", _params([(p,) for p in ("auto", *PATHS)]))
def test_grouped_equals_single_calls(dev, monkeypatch, path):
    """Five branches (two launches: 4 + 1), float16 with and without vector access, mixed
    layouts: every output equals one call per branch, bit for bit."""
    monkeypatch.setenv(ENV, path)
    shapes = [*HRNET_W48, (3, 3, 7, 5)]
    b = _branches(shapes, F16, dev, N=3)
    b["x"][1] = b["x"][1].contiguous(memory_format=torch.channels_last)
    dys = [torch.randn_like(x) for x in b["x"]]
    ss = [x.float().mean((2, 3)) for x in b["x"]]
    ys, sg = torch.ops.mipnet_cuda.mimb_scale_grouped_fwd(b["x"], b["w1"], b["w2"], b["v"])
    yi = torch.ops.mipnet_cuda.mimb_instances_grouped(b["x"], b["w1"], b["w2"], b["table"])
    gb = torch.ops.mipnet_cuda.mimb_scale_grouped_bwd(dys, b["x"], b["w1"], b["w2"], b["v"], ss)
    for i in range(len(shapes)):
        args = [b[k][i] for k in ("x", "w1", "w2")]
        y1, s1 = torch.ops.mipnet_cuda.mimb_scale_fwd(*args, b["v"][i])
        assert torch.equal(ys[i], y1) and torch.equal(sg[i], s1), f"branch {i}"
        assert torch.equal(yi[i], torch.ops.mipnet_cuda.mimb_instances(*args, b["table"][i])), f"branch {i}"
        single = torch.ops.mipnet_cuda.mimb_scale_bwd(dys[i], *args, b["v"][i], ss[i])
        for j, (g, s) in enumerate(zip(gb, single)):
            assert torch.equal(g[i], s), f"backward output {j} of branch {i}"


# --------------------------------------------------------------------------- state, layouts
@pytest.mark.parametrize("path", _params([(p,) for p in ("auto", *PATHS)]))
def test_counters_reused_across_calls_and_streams(dev, monkeypatch, path):
    """The per-stream ticket / flag counters return to zero after every launch: repeated
    calls with other shapes in between, and calls on a side stream, give the same bits."""
    monkeypatch.setenv(ENV, path)
    cases = [_inputs(s, F32, "contiguous", dev, seed=i)[1:] for i, s in enumerate(
        [(48, 32, 8, 6, 4), (2, 64, 16, 12, 4), (1, 384, 7, 5, 4)])]
    first = [scale_fwd_bwd(*on, dy) for on, dy in cases]
    for _ in range(3):
        for (on, dy), want in zip(cases, first):
            for a, b in zip(scale_fwd_bwd(*on, dy), want):
                assert torch.equal(a, b)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = [scale_fwd_bwd(*on, dy) for on, dy in cases]
    torch.cuda.current_stream().wait_stream(side)
    for g, want in zip(got, first):
        for a, b in zip(g, want):
            assert torch.equal(a, b)


@pytest.mark.parametrize("path", _params([(p,) for p in ("auto", *PATHS)]))
def test_cuda_graph_capture_on_a_fresh_stream(dev, monkeypatch, path):
    """The first call on a stream may happen inside a CUDA-graph capture (torch.cuda.graph
    captures on its own stream): the counters then live in the captured call's workspace and
    are zeroed by a captured memset.  Replays with new inputs match eager calls, and eager
    calls on that stream afterwards (persistent counters) still do."""
    monkeypatch.setenv(ENV, path)
    (_, _, _, _, _), (x, w1, w2, v), _ = _inputs((8, 64, 16, 12, 4), F32, "contiguous", dev, seed=3)
    static_x = x.clone()
    with mk.use_backend("cuda"), torch.no_grad():
        want = mk.mimb_scale(x, w1, w2, v)
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.graph(graph, stream=stream):
            static_y = mk.mimb_scale(static_x, w1, w2, v)
        for k in range(3):
            static_x.copy_(x * (1 + k))
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(static_y, mk.mimb_scale(x * (1 + k), w1, w2, v)), k
        assert torch.equal(static_y, mk.mimb_scale(static_x, w1, w2, v))
        del graph
        with torch.cuda.stream(stream):
            again = mk.mimb_scale(x, w1, w2, v)
        torch.cuda.current_stream().wait_stream(stream)
        assert torch.equal(again, want)


def test_unaligned_and_mixed_operands(dev):
    """x at an odd element offset (no vector access), transposed / strided / mixed-dtype small
    operands: same results as the reference, within float32 rounding."""
    c = make_case(3, 48, 16, 12, 4, seed=9)
    flat = torch.empty(c["x"].numel() + 1, device=dev)
    x = flat[1:].view(c["x"].shape)
    x.copy_(c["x"].to(dev))
    assert x.data_ptr() % 16 != 0
    w1 = c["w1"].to(dev).T.contiguous().T  # column-major
    w2 = c["w2"].to(dev, F16)
    v = torch.stack([c["v"], c["v"]], 2).to(dev)[:, :, 0]  # strided
    y, s = torch.ops.mipnet_cuda.mimb_scale_fwd(x, w1, w2, v)
    y_ref, s_ref = M.mimb_scale_fwd_reference(x, w1, w2, v)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(x)
    got = torch.ops.mipnet_cuda.mimb_scale_bwd(dy, x, w1, w2, v, s)
    want = M.mimb_scale_bwd_reference(dy, x, w1, w2, v, s)
    for name, g, w in zip(("dx", "dw1", "dw2", "dv"), got, want):
        assert g.dtype == w.dtype and g.is_contiguous()
        torch.testing.assert_close(g.float(), w.float(), rtol=2e-3 if w.dtype == F16 else 1e-4,
                                   atol=1e-4 * float(w.abs().max()), msg=name)


def test_backward_is_deterministic(dev):
    _, on, dy = _inputs((48, 64, 16, 12, 4), F32, "channels_last", dev, seed=11)
    a = scale_fwd_bwd(*on, dy)
    b = scale_fwd_bwd(*on, dy)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_backward_dy_in_another_layout(dev):
    """dy with other strides than x (an expanded or channels_last gradient) is brought to x's
    layout first."""
    _, on, dy = _inputs((2, 16, 8, 6, 4), F32, "contiguous", dev, seed=12)
    s = on[0].mean((2, 3))
    want = torch.ops.mipnet_cuda.mimb_scale_bwd(dy, *on, s)
    for other in (dy.contiguous(memory_format=torch.channels_last), dy[:1].expand_as(dy)):
        ref = torch.ops.mipnet_cuda.mimb_scale_bwd(other.contiguous(), *on, s)
        got = torch.ops.mipnet_cuda.mimb_scale_bwd(other, *on, s)
        for g, r in zip(got, ref):
            assert torch.equal(g, r)
    assert want[0].is_contiguous()


# --------------------------------------------------------------------------- wide channels_last
# Vectorised channels-last tiles hold up to 256 lanes x 8 channels: C = 264 .. 2048 have more
# channels per tile than a block has threads (issue 14: the channels past the 256th got no
# partial sum and read garbage from the workspace).  [B, C, 1, 1] runs channels-last too.
WIDE_CASES = [(p, s, d, lay) for p in PATHS
              for s in [(2, 264, 3, 5, 4), (1, 1024, 4, 3, 4), (2, 2048, 1, 1, 4)]
              for d in (F32, BF16) for lay in ("channels_last", "contiguous")]


@pytest.mark.parametrize("path, shape, dtype, layout", _params(WIDE_CASES))
def test_wide_channels_last_tiles(dev, monkeypatch, path, shape, dtype, layout):
    monkeypatch.setenv(ENV, path)
    cpu, on, dyd = _inputs(shape, dtype, layout, dev, seed=13)
    y, dx, dw1, dw2, dv = scale_fwd_bwd(*on, dyd)
    x, w1, w2, v, dy = cpu
    _, s = torch.ops.mipnet_cuda.mimb_scale_fwd(*on)
    torch.testing.assert_close(s.cpu(), x.float().mean((2, 3)), rtol=1e-5, atol=1e-5)
    truth, truth_g = eager_with_grads(official_scale, dy.double(), x.double(), w1.double(), w2.double(), v.double())
    eager, eager_g = eager_with_grads(official_scale, dy, x, w1, w2, v)
    check_flash(y, eager, truth, dtype, "y")
    for name, got, e, t in zip(("dx", "dw1", "dw2", "dv"), (dx, dw1, dw2, dv), eager_g, truth_g):
        check_flash(got, e, t, dtype, name)


# --------------------------------------------------------------------------- refused cooperative launch
COOP_CAPACITY = "MIPNET_MIMB_CUDA_COOP_CAPACITY"


def test_refused_cooperative_launch(dev, monkeypatch):
    """The driver refuses a cooperative launch with more blocks than can be co-resident (under
    MPS limits or in a green context that happens below the occupancy calculator's count).
    MIPNET_MIMB_CUDA_COOP_CAPACITY makes the launcher believe any grid fits, so the driver
    refuses for real: auto falls back to the two-phase kernels (same bits), the forced single
    pass raises a clear error, and no launch error is left behind for the next kernel."""
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    # 64 channels of 32x32 (NCHW, float32): 8 tiles per sample, more blocks than 8 per SM.
    shape = (sms + 1, 64, 32, 32, 4)
    _, on, dyd = _inputs(shape, F32, "contiguous", dev, seed=17)
    monkeypatch.setenv(ENV, "two_phase")
    want = scale_fwd_bwd(*on, dyd)
    monkeypatch.setenv(COOP_CAPACITY, str(2**30))
    monkeypatch.setenv(ENV, "auto")
    for _ in range(2):  # the second call skips the refused grid size
        got = scale_fwd_bwd(*on, dyd)
        for i, (a, b) in enumerate(zip(got, want)):
            assert torch.equal(a, b), f"output {i} differs from the two-phase path"
    monkeypatch.setenv(ENV, "single_pass")
    with pytest.raises(RuntimeError, match="driver refused the cooperative launch"):
        torch.ops.mipnet_cuda.mimb_scale_fwd(*on)
    # No sticky launch error: torch's own launch checks (cudaGetLastError) pass.
    z = torch.arange(8.0, device=dev) * 2
    torch.cuda.synchronize()
    assert float(z.sum()) == 56.0
    monkeypatch.setenv(ENV, "auto")
    y, _ = torch.ops.mipnet_cuda.mimb_scale_fwd(*on)
    assert torch.equal(y, want[0])


def test_bad_capacity_variable(dev, monkeypatch):
    monkeypatch.setenv(COOP_CAPACITY, "lots")
    _, on, _ = _inputs((2, 8, 3, 3, 4), F32, "contiguous", dev)
    with pytest.raises(RuntimeError, match="MIPNET_MIMB_CUDA_COOP_CAPACITY must be a block count"):
        torch.ops.mipnet_cuda.mimb_scale_fwd(*on)


# --------------------------------------------------------------------------- fused mimb_fwd
@pytest.mark.parametrize("dtype, layout", _params([(d, lay) for d in (F32, F16, BF16) for lay in ("contiguous", "channels_last")]))
def test_fused_mimb_fwd(dev, dtype, layout):
    c = make_case(3, 24, 5, 4, 4, N=3, seed=21, soft=True)
    x = relayout(c["x"].to(dev, dtype), layout)
    lam, w1, w2, e1, b1, e2, b2 = (c[k].to(dev) for k in MIMB_KEYS[1:])
    args = (x, lam.to(dtype), w1, w2, e1.T.contiguous().T, b1, e2.to(dtype), b2.half())
    y, s = torch.ops.mipnet_cuda.mimb_fwd(*args)
    y_ref, s_ref = M.mimb_fwd_reference(*args)
    check_output(y, x)
    tol = {F32: 1e-5, F16: 2e-3, BF16: 2e-2}[dtype]
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=tol, atol=tol)
    with torch.no_grad(), mk.use_backend("cuda"):  # the public op runs the fused kernel
        assert torch.equal(mk.mimb(*args), y)


# --------------------------------------------------------------------------- bad input
def test_private_ops_check_their_inputs(dev):
    c = make_case(2, 8, 5, 4, 4, N=3)
    x, w1, w2, v = (c[k].to(dev) for k in ("x", "w1", "w2", "v"))
    op = torch.ops.mipnet_cuda
    for args, match in (
        ((x.cpu(), w1, w2, v), r"x must be a CUDA tensor"),
        ((x, w1, w2, v.cpu()), r"v must be a CUDA tensor"),
        ((x[:, :, ::2], w1, w2, v), r"x must be contiguous \(NCHW\) or channels_last"),
        ((x, w1[:, :7], w2, v), r"w1.size\(1\) must be C"),
        ((x, w1, w2[:, :1], v), r"w2.size\(1\) must be Cr"),
        ((x, w1, w2, v[:1]), r"v.size\(0\) must be B"),
        ((x.int(), w1, w2, v), r"x must be float32, float16 or bfloat16, got int32"),
        ((x, w1.double(), w2, v), r"w1 must be float32, float16 or bfloat16, got float64"),
    ):
        with pytest.raises(RuntimeError, match=match):
            op.mimb_scale_fwd(*args)
    with pytest.raises(RuntimeError, match=r"dy must have the shape of x"):
        op.mimb_scale_bwd(x[:1], x, w1, w2, v, v)
    with pytest.raises(RuntimeError, match=r"dy is float16 but x is float32"):
        op.mimb_scale_bwd(x.half(), x, w1, w2, v, v)
    with pytest.raises(RuntimeError, match=r"table.size\(1\) must be C"):
        op.mimb_instances(x, w1, w2, torch.rand(3, 7, device=dev))
    with pytest.raises(RuntimeError, match=r"xs\[1\] must be a CUDA tensor"):
        op.mimb_scale_grouped_fwd([x, x.cpu()], [w1, w1], [w2, w2], [v, v])
    with pytest.raises(RuntimeError, match=r"the lists must have the same length"):
        op.mimb_scale_grouped_fwd([x, x], [w1], [w2, w2], [v, v])


# --------------------------------------------------------------------------- instances backward
def _instances_bwd_inputs(shape, dtype, layout, dev, N, rows, seed):
    """(cpu operands, cuda operands) of ``mimb_instances_bwd``: dy [N*B, C, H, W] in x's
    layout, a table of one row per instance [N, C] or per sample [N, B, C]."""
    c = make_case(*shape, N=N, seed=seed)
    B, C = shape[:2]
    table = c["table"] if rows == "instance" else \
        0.1 + 0.8 * torch.rand(N, B, C, generator=torch.Generator().manual_seed(seed + 2))
    x, w1, w2, table = (t.to(dtype) for t in (c["x"], c["w1"], c["w2"], table))
    dy = torch.randn((N * B, *shape[1:4]), generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    on = (relayout(dy.to(dev), layout), relayout(x.to(dev), layout), w1.to(dev), w2.to(dev), table.to(dev))
    return (dy, x, w1, w2, table), on


def _check_instances_bwd(cpu, got, dtype):
    """Every output of the instances backward against the official layer (flash rule, float64
    truth): ``official_instances`` differentiated w.r.t. x, w1, w2 and the table."""
    dy, x, w1, w2, table = cpu
    _, truth_g = eager_with_grads(official_instances, dy.double(), x.double(), w1.double(), w2.double(), table.double())
    _, eager_g = eager_with_grads(official_instances, dy, x, w1, w2, table)
    for name, g, e, t, like in zip(("dx", "dw1", "dw2", "dtable"), got, eager_g, truth_g, (x, w1, w2, table)):
        assert g.shape == like.shape and g.dtype == like.dtype, name
        check_flash(g, e, t, dtype, name)


# (B, C, H, W, r): vectors and single elements, C = 1 / 3 / 384 and channels-last tiles wider
# than a block (264, 2048), H*W = 1 .. 64x48.
INST_BWD_SHAPES = [(1, 1, 33, 17, 1), (2, 3, 7, 5, 1), (3, 48, 16, 12, 4), (2, 384, 12, 9, 4),
                   (2, 264, 3, 5, 4), (2, 2048, 1, 1, 4), (2, 32, 64, 48, 4)]
INST_BWD_CASES = [(s, d, lay, N, rows) for s in INST_BWD_SHAPES for d in (F32, F16, BF16)
                  for lay in ("contiguous", "channels_last") for N, rows in ((3, "instance"), (2, "sample"))]


@pytest.mark.parametrize("shape, dtype, layout, N, rows", _params(INST_BWD_CASES))
def test_instances_bwd_against_official(dev, shape, dtype, layout, N, rows):
    cpu, on = _instances_bwd_inputs(shape, dtype, layout, dev, N, rows, seed=_seed("inst-bwd", shape) % 1000)
    got = torch.ops.mipnet_cuda.mimb_instances_bwd(*on)
    assert got[0].is_contiguous(memory_format=expected_format(on[1])), "dx must have x's memory format"
    for g in got[1:]:
        assert g.is_contiguous()
    _check_instances_bwd(cpu, got, dtype)


def test_instances_bwd_large_maps_and_unaligned(dev):
    """A 256x192 map (several pixel splits per plane), and x / dy at an odd element offset
    (no vector access) with a transposed w1 and a strided table."""
    cpu, on = _instances_bwd_inputs((2, 32, 256, 192, 4), F16, "contiguous", dev, 2, "instance", seed=5)
    _check_instances_bwd(cpu, torch.ops.mipnet_cuda.mimb_instances_bwd(*on), F16)
    cpu, on = _instances_bwd_inputs((3, 24, 9, 7, 4), F32, "contiguous", dev, 3, "sample", seed=6)
    dy, x, w1, w2, table = on

    def odd(t):
        flat = torch.empty(t.numel() + 1, device=dev, dtype=t.dtype)
        out = flat[1:].view(t.shape)
        out.copy_(t)
        return out
    args = (odd(dy), odd(x), w1.T.contiguous().T, w2, torch.stack([table, table], 3)[..., 0])
    assert args[1].data_ptr() % 16 != 0 and not args[4].is_contiguous()
    _check_instances_bwd(cpu, torch.ops.mipnet_cuda.mimb_instances_bwd(*args), F32)


def test_instances_bwd_mixed_dtypes_one_instance_expanded_table(dev):
    """AMP's operands (x, dy bfloat16 / float16; w1, w2, table float32: dtable float32), one
    instance (N = 1: mimb_scale_bwd's results), an expanded [N, C] table (stride 0 over C's
    rows' copies)."""
    for dtype in (BF16, F16):
        # (the rule of test_mimb.py's test_mimb_scale_mixed_dtypes: dx to the rounding of its
        # dtype, the float32 gradients to float32 accuracy given the rounded x and dy)
        cpu, on = _instances_bwd_inputs((3, 40, 7, 6, 4), dtype, "channels_last", dev, 2, "instance", seed=10)
        dy, x, w1, w2, table = on
        got = torch.ops.mipnet_cuda.mimb_instances_bwd(dy, x, w1.float(), w2.float(), table.float())
        assert [g.dtype for g in got] == [dtype, F32, F32, F32]
        _, truth_g = eager_with_grads(official_instances, cpu[0].double(), *(t.double() for t in cpu[1:]))
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(got[0].cpu().double(), truth_g[0], rtol=eps, atol=eps * float(truth_g[0].abs().max()))
        for name, g, want in zip(("dw1", "dw2", "dtable"), got[1:], truth_g[1:]):
            torch.testing.assert_close(g.cpu().double(), want, rtol=1e-4, atol=1e-5 * float(want.abs().max()), msg=name)
    cpu, (dy, x, w1, w2, table) = _instances_bwd_inputs((4, 24, 9, 5, 4), F32, "contiguous", dev, 1, "instance", seed=11)
    got = torch.ops.mipnet_cuda.mimb_instances_bwd(dy, x, w1, w2, table)
    _check_instances_bwd(cpu, got, F32)
    one = torch.ops.mipnet_cuda.mimb_scale_bwd(dy, x, w1, w2, table[0].expand(4, -1), x.mean((2, 3)))
    for name, g, w in zip(("dx", "dw1", "dw2"), got, one):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5 * float(w.abs().max()), msg=name)
    torch.testing.assert_close(got[3][0], one[3].sum(0), rtol=1e-5, atol=1e-5, msg="dtable")
    row = table[:1].expand(3, -1)  # [3, C], stride 0 over the instances
    dy3 = torch.cat([dy] * 3)
    got = torch.ops.mipnet_cuda.mimb_instances_bwd(dy3, x, w1, w2, row)
    want = torch.ops.mipnet_cuda.mimb_instances_bwd(dy3, x, w1, w2, row.contiguous())
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.is_contiguous() and torch.equal(g, w), f"output {i} depends on the table's strides"


def test_instances_bwd_equals_scale_backwards(dev):
    """The sum over the instances of the cuda scale backward (v = t[n]), within float32
    reassociation: the contract of csrc/schemas.h."""
    _, (dy, x, w1, w2, table) = _instances_bwd_inputs((4, 64, 16, 12, 4), F32, "channels_last", dev, 3, "sample", seed=8)
    B, C = x.shape[:2]
    s = x.mean((2, 3))
    parts = [torch.ops.mipnet_cuda.mimb_scale_bwd(dy[n * B:(n + 1) * B], x, w1, w2, table[n], s) for n in range(3)]
    got = torch.ops.mipnet_cuda.mimb_instances_bwd(dy, x, w1, w2, table)
    for i, name in enumerate(("dx", "dw1", "dw2")):
        want = sum(p[i] for p in parts)
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-5 * float(want.abs().max()), msg=name)
    torch.testing.assert_close(got[3], torch.stack([p[3] for p in parts]), rtol=1e-5, atol=1e-6, msg="dtable")


@pytest.mark.parametrize("path", _params([(p,) for p in ("auto", *PATHS)]))
def test_instances_bwd_is_two_launches_and_grouped_equals_single(dev, monkeypatch, path):
    """Five branches (4 + 1 per launch), float16 with and without vector access, mixed layouts
    and table forms: two kernel launches per group whatever MIPNET_MIMB_CUDA_PATH says, and
    every output equal to one call per branch, bit for bit, and to the two-phase run."""
    monkeypatch.setenv(ENV, path)
    shapes = [*HRNET_W48, (3, 3, 7, 5)]
    b = _branches(shapes, F16, dev, N=3)
    b["x"][1] = b["x"][1].contiguous(memory_format=torch.channels_last)
    b["table"][2] = torch.rand(3, *b["x"][2].shape[:2], device=dev, dtype=F16)
    dys = [relayout(torch.randn(3 * x.shape[0], *x.shape[1:], device=dev, dtype=F16),
                    "channels_last" if i == 1 else "contiguous") for i, x in enumerate(b["x"])]
    args = (dys, b["x"], b["w1"], b["w2"], b["table"])
    launches = _kernel_launches(lambda: torch.ops.mipnet_cuda.mimb_instances_grouped_bwd(*[a[:4] for a in args]))
    assert len(launches) == 2 and "mimb_reduce_kernel" in launches[0] and "mimb_apply_kernel" in launches[1], launches
    got = torch.ops.mipnet_cuda.mimb_instances_grouped_bwd(*args)
    for i in range(len(shapes)):
        single = torch.ops.mipnet_cuda.mimb_instances_bwd(*(a[i] for a in args))
        for j, (g, s1) in enumerate(zip(got, single)):
            assert torch.equal(g[i], s1), f"backward output {j} of branch {i}"
    monkeypatch.setenv(ENV, "two_phase")
    again = torch.ops.mipnet_cuda.mimb_instances_grouped_bwd(*args)
    for j, (g, a) in enumerate(zip(got, again)):
        for i in range(len(shapes)):
            assert torch.equal(g[i], a[i]), f"output {j} of branch {i} depends on the path variable"


def test_instances_bwd_deterministic_and_dy_layout(dev):
    _, (dy, x, w1, w2, table) = _instances_bwd_inputs((8, 96, 24, 18, 4), BF16, "channels_last", dev, 2, "instance", seed=9)
    a = torch.ops.mipnet_cuda.mimb_instances_bwd(dy, x, w1, w2, table)
    b = torch.ops.mipnet_cuda.mimb_instances_bwd(dy, x, w1, w2, table)
    for i, (p, q) in enumerate(zip(a, b)):
        assert torch.equal(p, q), f"output {i} differs between two runs"
    other = dy.contiguous()  # NCHW dy for a channels-last x: brought to x's layout first
    for i, (p, q) in enumerate(zip(a, torch.ops.mipnet_cuda.mimb_instances_bwd(other, x, w1, w2, table))):
        assert torch.equal(p, q), f"output {i} depends on dy's layout"


def test_instances_bwd_empty_sums(dev):
    """No instance (N = 0): dx, dw1, dw2 are zero and dtable empty; no sample (B = 0): dx
    empty, dw1, dw2 and an [N, C] dtable zero."""
    c = make_case(2, 8, 5, 4, 4, N=2)
    x, w1, w2, table = (c[k].to(dev) for k in ("x", "w1", "w2", "table"))
    dx, dw1, dw2, dt = torch.ops.mipnet_cuda.mimb_instances_bwd(x[:0], x, w1, w2, table[:0])
    assert dx.shape == x.shape and not dx.any() and not dw1.any() and not dw2.any() and dt.shape == (0, 8)
    dx, dw1, dw2, dt = torch.ops.mipnet_cuda.mimb_instances_bwd(x[:0], x[:0], w1, w2, table)
    assert dx.shape == (0, 8, 5, 4) and not dw1.any() and not dw2.any() and dt.shape == (2, 8) and not dt.any()


def test_instances_bwd_checks_its_inputs(dev):
    c = make_case(2, 8, 5, 4, 4, N=3)
    x, w1, w2, table = (c[k].to(dev) for k in ("x", "w1", "w2", "table"))
    dy = torch.randn(6, 8, 5, 4, device=dev)
    op = torch.ops.mipnet_cuda
    with pytest.raises(RuntimeError, match=r"dy must have N \* B rows and the C, H, W of x; size 4 != 6 at dim 0"):
        op.mimb_instances_bwd(dy[:4], x, w1, w2, table)
    with pytest.raises(RuntimeError, match=r"dy is float16 but x is float32"):
        op.mimb_instances_bwd(dy.half(), x, w1, w2, table)
    with pytest.raises(RuntimeError, match=r"table.size\(1\) must be C"):
        op.mimb_instances_bwd(dy, x, w1, w2, table[:, :3])
    with pytest.raises(RuntimeError, match=r"table.size\(1\) must be B"):
        op.mimb_instances_bwd(dy, x, w1, w2, torch.rand(3, 5, 8, device=dev))
    with pytest.raises(RuntimeError, match=r"dys\[1\] must be a CUDA tensor"):
        op.mimb_instances_grouped_bwd([dy, dy.cpu()], [x, x], [w1, w1], [w2, w2], [table, table])
