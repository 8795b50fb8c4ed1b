"""Benchmarks of the Multi-Instance Modulation Block: the ``mimb`` forward, one training step
of the ``MIMB`` module (forward + backward) and ``mimb_instances``.

Workload: the MIMB inputs of MIPNet HRNet (one block per branch before stage 4),
* W32 at 256x192: C = 32/64/128/256 at 64x48, 32x24, 16x12, 8x6;
* W48 at 384x288: C = 48/96/192/384 at 96x72, 48x36, 24x18, 12x9 (GPU only).
CPU: W32 at batch 4, fp32 (the issue's CPU target).  GPU: batch 24 and 48, fp32/fp16/bf16.

Rows (``op`` / ``mode``):

* ``mimb`` / ``fwd`` -- eval-style forward with fixed weights (BatchNorm folded,
  :meth:`MIMB.folded_embedding`) and a one-hot ``lam [B, 2]``, under ``no_grad``.
* ``mimb_train_step`` / ``fwd+bwd`` -- one training step of the block: ``MIMB`` in train
  mode (the fused training op: the embedding with its BatchNorm on batch statistics and the
  squeeze-excite scale, one call forward and one backward), then ``backward(dy)`` into
  ``x`` and every parameter.  The eager row is the same step through the official layer
  (its modules).  Until issue 15 this row was named ``mimb_scale`` (the op it timed before
  the training step was fused); ``benchmarks/_report.py`` (``RENAMED_ROWS``) renames it in
  older result files, so the regression gate compares like with like.
* ``mimb_instances`` / ``N=2`` -- both instances from one read of ``x``; the eager row
  runs the official layer twice (once per one-hot selector), as MIPNet inference does.
* ``mimb_instances_train`` / ``fwd+bwd N=2`` -- ``mimb_instances`` forward, then backward of
  ``dy [N*B, ...]`` into ``x``, ``w1``, ``w2`` and the table (issue 16); the eager row is
  the official squeeze-excite scale (``anchors.official_instances``: one call per instance)
  forward + backward.  (Issue 16's target: faster than two ``mimb_scale`` forward +
  backward calls on the same backend; the interleaved comparison is in docs/ops.md, MIMB.)

Backends: ``cpu`` / ``reference`` on CPU tensors, ``cuda`` / ``triton`` / ``reference`` on CUDA
tensors, through ``mipnet_kernels.use_backend`` (skipped with the dispatcher's
``not_supported_reasons`` where they have no implementation), plus the baselines ``eager``
(the official ``SELambdaLayer`` of ``tests/anchors.py``, the one the tests check
``MIMB`` against) and, on CUDA only, ``compile`` (``torch.compile`` of it).

Bytes that must move (the GB/s column): forward read x + write y; ``mimb_instances``
read x + N writes; ``fwd+bwd`` the forward's plus the backward's (read x and dy, write dx),
i.e. 5 tensors of x's size.  Weights and per-channel vectors are ignored (< 0.1 %).

Timing and ``extra_info`` as in ``test_decode_bench.py`` (``benchmarks/common.py``).  Each row's
result is checked once against the eager official layer (a gross check; accuracy is the
tests' job).
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch
import torch.nn.functional as F

import mipnet_kernels
from mipnet_kernels import use_backend
from mipnet_kernels.nn import MIMB

from . import _timing
from .common import DTYPE_IDS, anchors, anchors_skip_reason, device_name, dtype_name, record, run, shape_id, skip_reason

NUM_INSTANCES, REDUCTION = 2, 4
W32_256 = [(32, 64, 48), (64, 32, 24), (128, 16, 12), (256, 8, 6)]
W48_384 = [(48, 96, 72), (96, 48, 36), (192, 24, 18), (384, 12, 9)]
CPU_BATCHES = (4, 24)  # 24: the issue-12 memory-limit target's batch
GPU_BATCHES = (24, 48)

CPU_SHAPES = [(b, c, h, w) for b in CPU_BATCHES for c, h, w in W32_256]
GPU_SHAPES = [(b, c, h, w) for b in GPU_BATCHES for c, h, w in W32_256 + W48_384]
DEVICE_CASES = {
    "cpu": (CPU_SHAPES, (torch.float32,), ("cpu", "reference", "eager")),
    "cuda": (GPU_SHAPES, (torch.float32, torch.float16, torch.bfloat16),
             ("cuda", "triton", "reference", "eager", "compile")),
}
BASELINES = ("eager", "compile")
#: the dispatcher op each benchmark's backends implement (for ``not_supported_reasons``)
DISPATCH_OP = {"mimb": "mimb_scale_fwd", "mimb_train_step": "mimb_scale_bwd", "mimb_instances": "mimb_instances",
               "mimb_instances_train": "mimb_instances"}
# gross-error bound vs the eager official layer (relative to max |eager|)
TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def _cases():
    for device, (shapes, dtypes, backends) in DEVICE_CASES.items():
        for dtype in dtypes:
            for backend in backends:
                marks = []
                if device == "cuda":
                    marks += [pytest.mark.cuda, pytest.mark.benchmark(timer=_timing.CUDA_EVENT_TIMER)]
                for shape in shapes:
                    yield pytest.param(
                        device, dtype, backend, shape,
                        id=f"{device}-{backend}-{DTYPE_IDS[dtype]}-{shape_id(shape)}", marks=marks,
                    )


CASES = list(_cases())


# --------------------------------------------------------------------------- inputs
_cache: dict = {}


def _setup(shape, dtype, device: str) -> dict:
    """Official layer and MIMB with identical (non-trivial) weights, inputs, eval tensors."""
    key = (shape, dtype, device)
    if key in _cache:
        return _cache[key]
    _cache.clear()  # one shape at a time: GPU shapes reach 170 MB per tensor
    B, C, H, W = shape
    g = torch.Generator().manual_seed(1)  # the weights' perturbation, then the inputs
    off = anchors.official_se_lambda(C, NUM_INSTANCES, REDUCTION, seed=0, generator=g)
    ours = MIMB(C, NUM_INSTANCES, REDUCTION)
    ours.load_state_dict(off.state_dict())
    off, ours = off.to(device=device, dtype=dtype), ours.to(device=device, dtype=dtype)
    for m in (off, ours):  # train steps must not move the running statistics (eval rows use them)
        m.fc_lambda[1].momentum = 0.0
    x = (torch.randn(B, C, H, W, generator=g) + 2 * torch.randn(1, C, 1, 1, generator=g))
    dy = torch.randn(B, C, H, W, generator=g)
    idx = torch.arange(B) % NUM_INSTANCES
    lam = F.one_hot(idx, NUM_INSTANCES).to(device=device, dtype=dtype)
    lam_n = [F.one_hot(torch.full((B,), n), NUM_INSTANCES).to(device=device, dtype=dtype)
             for n in range(NUM_INSTANCES)]
    ours.eval()
    with torch.no_grad():
        e1, b1, e2, b2 = (t.detach() for t in ours.folded_embedding())
        table = ours.embedding_table().detach()
    d = {
        "off": off, "ours": ours, "x": x.to(device=device, dtype=dtype).contiguous(),
        "dy": dy.to(device=device, dtype=dtype).contiguous(), "lam": lam, "lam_n": lam_n,
        "w1": ours.w1.detach(), "w2": ours.w2.detach(), "e1": e1, "b1": b1, "e2": e2, "b2": b2,
        "table": table, "compiled": {},
    }
    _cache[key] = d
    return d


def _compiled(d, mode: str):
    if mode not in d["compiled"]:
        d["compiled"][mode] = torch.compile(d["off"])
    return d["compiled"][mode]


# --------------------------------------------------------------------------- functions timed
def _forward_fn(d, backend: str):
    x, lam = d["x"], d["lam"]
    if backend in BASELINES:
        d["off"].eval()
        layer = d["off"] if backend == "eager" else _compiled(d, "eval")

        def fn():
            with torch.no_grad():
                return layer(x, lam)
        return fn
    args = (x, lam, d["w1"], d["w2"], d["e1"], d["b1"], d["e2"], d["b2"])

    def fn():
        with torch.no_grad():
            return mipnet_kernels.mimb(*args)
    return fn


def _train_step_fn(d, backend: str):
    """Forward + backward of one training step; returns dx."""
    module = d["off"] if backend in BASELINES else d["ours"]
    module.train()
    layer = module if backend != "compile" else _compiled(d, "train")
    xg = d["x"].detach().clone().requires_grad_(True)
    lam, dy = d["lam"], d["dy"]

    def fn():
        module.zero_grad(set_to_none=True)
        xg.grad = None
        layer(xg, lam).backward(dy)
        return xg.grad
    return fn


def _instances_fn(d, backend: str):
    x = d["x"]
    if backend in BASELINES:
        d["off"].eval()
        layer = d["off"] if backend == "eager" else _compiled(d, "eval")
        lams = d["lam_n"]

        def fn():
            with torch.no_grad():
                return [layer(x, lam) for lam in lams]
        return fn
    w1, w2, table = d["w1"], d["w2"], d["table"]

    def fn():
        with torch.no_grad():
            return mipnet_kernels.mimb_instances(x, w1, w2, table)
    return fn


def _instances_train_fn(d, backend: str):
    """Forward + backward of ``mimb_instances`` (eager: the official scale once per
    instance); returns dx."""
    leaves = [d[k].detach().clone().requires_grad_(True) for k in ("x", "w1", "w2", "table")]
    key = "dy_instances"
    if key not in d:
        d[key] = torch.cat([d["dy"]] * NUM_INSTANCES) * torch.linspace(
            0.5, 1.5, NUM_INSTANCES * d["dy"].shape[0], device=d["dy"].device,
            dtype=d["dy"].dtype)[:, None, None, None]
    dy = d[key]
    op = anchors.official_instances if backend in BASELINES else mipnet_kernels.mimb_instances

    def fn():
        for t in leaves:
            t.grad = None
        op(*leaves).backward(dy)
        return leaves[0].grad
    return fn


OPS = {
    # op: (mode, fn factory, bytes read / written in units of x's size)
    "mimb": ("fwd", _forward_fn, 1, 1),
    "mimb_train_step": ("fwd+bwd", _train_step_fn, 3, 2),
    "mimb_instances": (f"N={NUM_INSTANCES}", _instances_fn, 1, NUM_INSTANCES),
    # fwd: read x, write N y; bwd: read x and N dy, write dx
    "mimb_instances_train": (f"fwd+bwd N={NUM_INSTANCES}", _instances_train_fn,
                             2 + NUM_INSTANCES, NUM_INSTANCES + 1),
}


def _kernel_op_fn(d, op: str):
    """The cpu kernel op of an inference row alone (the op layer's share of t/roof)."""
    ops = torch.ops.mipnet_cpu
    x, w1, w2 = d["x"], d["w1"], d["w2"]
    if op == "mimb":
        args = (x, d["lam"], w1, w2, d["e1"], d["b1"], d["e2"], d["b2"])
        return lambda: ops.mimb_fwd(*args)
    table = d["table"]
    return lambda: ops.mimb_instances(x, w1, w2, table)


def _as_tensor(out) -> torch.Tensor:
    return torch.cat(list(out), 0) if isinstance(out, (list, tuple)) else out


def _skip_reason(op: str, backend: str, device: str, d) -> str | None:
    if backend in BASELINES:
        return None
    x, w1, w2 = d["x"], d["w1"], d["w2"]
    B, C = x.shape[:2]
    v = torch.ones(B, C, device=x.device, dtype=x.dtype)
    if op in ("mimb_instances", "mimb_instances_train"):
        args = (x, w1, w2, d["table"])
    elif op == "mimb_train_step":
        s = torch.zeros(B, C, device=x.device, dtype=torch.float32)
        args = (d["dy"], x, w1, w2, v, s)
    else:
        args = (x, w1, w2, v)
    ops = {DISPATCH_OP[op]: args}
    if op == "mimb_train_step":  # the step also runs the forward kernel
        ops["mimb_scale_fwd"] = (x, w1, w2, v)
    if op == "mimb_instances_train":  # the backward runs the scale backward kernel
        s = torch.zeros(B, C, device=x.device, dtype=torch.float32)
        ops["mimb_scale_bwd"] = (d["dy"], x, w1, w2, v, s)
    return skip_reason(backend, device, ops)


# --------------------------------------------------------------------------- benchmarks
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("device, dtype, backend, shape", CASES)
def test_mimb_ops(benchmark, request, device, dtype, backend, shape, op):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device (torch.cuda.is_available() is False)")
    why = anchors_skip_reason()
    if why:
        pytest.skip(why)
    d = _setup(shape, dtype, device)
    why = _skip_reason(op, backend, device, d)
    if why:
        pytest.skip(why)

    mode, factory, n_read, n_written = OPS[op]
    nbytes = d["x"].numel() * d["x"].element_size()
    bytes_read, bytes_written = n_read * nbytes, n_written * nbytes
    benchmark.group = f"{op} {mode} {shape_id(shape)} {DTYPE_IDS[dtype]} {device}"
    record(
        benchmark, op=op, backend=backend, mode=mode, device=device,
        device_name=device_name(device), shape=shape_id(shape), dtype=dtype_name(dtype),
        bytes_read=bytes_read, bytes_written=bytes_written, bytes_moved=bytes_read + bytes_written,
        reduction=REDUCTION, num_instances=NUM_INSTANCES,
    )
    fn = factory(d, backend)
    roof = None
    if op in ("mimb", "mimb_instances"):  # inference: read x once, write n_written / n_read x
        # Allocating, as the op allocates y (see test_decode_bench.test_flip_merge).
        x, reps = d["x"], n_written // n_read
        roof = (f"x.repeat({reps}, 1, 1, 1) (read x, write y)", lambda: x.repeat(reps, 1, 1, 1))
    kernel = _kernel_op_fn(d, op) if backend == "cpu" and roof is not None else None
    if backend in BASELINES:
        out = run(benchmark, request, device, backend, fn, bytes_read + bytes_written)
    else:
        with use_backend(backend):
            out = run(benchmark, request, device, backend, fn, bytes_read + bytes_written, roof=roof,
                      kernel=kernel)
    out = _as_tensor(out).detach()

    ref_key = ("ref", op)
    if ref_key not in d:  # the eager official layer, run once
        d[ref_key] = _as_tensor(factory(d, "eager")()).detach().clone()
    ref = d[ref_key]
    diff = (out.float() - ref.float()).abs().max().item()
    record(benchmark, max_abs_diff_vs_eager=diff)
    tol = TOL[dtype] * max(1.0, ref.float().abs().max().item())
    assert diff <= tol, f"{op} {backend}: differs from the eager official layer by {diff:.3g} (> {tol:.3g})"


# --------------------------------------------------------------------------- issue 16 ratio
def instances_vs_scale_calls(backend: str = "cpu", rounds: int = 15, reps: int = 20) -> None:
    """Issue 16's target, interleaved in one process (best of ``rounds`` x ``reps`` calls):
    ``mimb_instances`` forward + backward vs two ``mimb_scale`` forward + backward calls
    (``x``, ``w1``, ``w2`` gradients accumulated by autograd), CPU fp32, W32 branches,
    batch 4, N = 2.  ``OMP_NUM_THREADS=1 python -m benchmarks.test_mimb_bench``."""

    B, N = 4, NUM_INSTANCES
    g = torch.Generator().manual_seed(0)
    total = [0.0, 0.0]
    for C, H, W in W32_256:
        x = torch.randn(B, C, H, W, generator=g)
        w1 = torch.randn(C // REDUCTION, C, generator=g) * 0.3
        w2 = torch.randn(C, C // REDUCTION, generator=g) * 0.3
        table, dy = torch.rand(N, C, generator=g), torch.randn(N * B, C, H, W, generator=g)
        leaves = [t.clone().requires_grad_(True) for t in (x, w1, w2, table)]
        dys = [dy[n * B:(n + 1) * B].contiguous() for n in range(N)]
        vs = [table[n].expand(B, C).contiguous().requires_grad_(True) for n in range(N)]

        def instances():
            for t in leaves:
                t.grad = None
            mipnet_kernels.mimb_instances(*leaves).backward(dy)

        def scale_calls():
            for t in leaves[:3] + vs:
                t.grad = None
            for n in range(N):
                mipnet_kernels.mimb_scale(leaves[0], leaves[1], leaves[2], vs[n]).backward(dys[n])

        with use_backend(backend):
            best = _interleaved_best((instances, scale_calls), rounds, reps)
        total = [a + b for a, b in zip(total, best)]
        print(f"{B}x{C}x{H}x{W}: instances fwd+bwd {best[0] * 1e6:7.1f} us | {N} x mimb_scale "
              f"fwd+bwd {best[1] * 1e6:7.1f} us | speed-up {best[1] / best[0]:.2f}x")
    print(f"all four branches: {total[0] * 1e6:.1f} us vs {total[1] * 1e6:.1f} us, "
          f"speed-up {total[1] / total[0]:.2f}x")


def _interleaved_best(fns, rounds: int, reps: int) -> list[float]:
    """Seconds per call of each of ``fns``: the best of ``rounds`` interleaved rounds of
    ``reps`` calls each (``_timing.interleaved_rounds``)."""
    return [min(t) for t in _timing.interleaved_rounds(fns, rounds, reps)]


def instances_kernels_vs_scale_kernels(rounds: int = 15, reps: int = 20, layout: str = "contiguous") -> None:
    """The same comparison kernel against kernel, without autograd or Python dispatch:
    ``torch.ops.mipnet_cpu.mimb_instances`` + ``mimb_instances_bwd`` vs ``N`` x
    (``mimb_scale_fwd`` + ``mimb_scale_bwd``), CPU fp32, W32 branches, batch 4, N = 2
    (interleaved, best of ``rounds`` x ``reps`` calls).
    ``OMP_NUM_THREADS=1 python -m benchmarks.test_mimb_bench --kernels [channels_last]``."""

    ops = torch.ops.mipnet_cpu
    B, N = 4, NUM_INSTANCES
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    g = torch.Generator().manual_seed(0)
    total = [0.0, 0.0]
    for C, H, W in W32_256:
        x = torch.randn(B, C, H, W, generator=g).contiguous(memory_format=fmt)
        w1 = torch.randn(C // REDUCTION, C, generator=g) * 0.3
        w2 = torch.randn(C, C // REDUCTION, generator=g) * 0.3
        table = torch.rand(N, C, generator=g)
        dy = torch.randn(N * B, C, H, W, generator=g).contiguous(memory_format=fmt)
        dys = [dy[n * B:(n + 1) * B].contiguous(memory_format=fmt) for n in range(N)]
        vs = [table[n].expand(B, C).contiguous() for n in range(N)]

        def instances():
            ops.mimb_instances(x, w1, w2, table)
            ops.mimb_instances_bwd(dy, x, w1, w2, table)

        def scale_calls():
            for n in range(N):
                _, s = ops.mimb_scale_fwd(x, w1, w2, vs[n])
                ops.mimb_scale_bwd(dys[n], x, w1, w2, vs[n], s)

        best = _interleaved_best((instances, scale_calls), rounds, reps)
        total = [a + b for a, b in zip(total, best)]
        print(f"{B}x{C}x{H}x{W} {layout}: instances fwd+bwd kernels {best[0] * 1e6:7.1f} us | {N} x scale "
              f"fwd+bwd kernels {best[1] * 1e6:7.1f} us | speed-up {best[1] / best[0]:.2f}x")
    print(f"all four branches: {total[0] * 1e6:.1f} us vs {total[1] * 1e6:.1f} us, "
          f"speed-up {total[1] / total[0]:.2f}x")


def floor_vs_roof(batch: int = 24, block_s: float = 2e-3, min_rounds: int = 15,
                  time_s: float = 0.5) -> list[dict]:
    """Why a ``t/roof`` row of issue 12 cannot reach 1.5: each forward row next to its floor.

    For the W32 branch shapes at ``batch`` (fp32, one thread, the cpu backend), interleaved
    (:func:`_timing.interleaved_rounds`), medians of per-round ratios to the roof
    (``x.repeat``: read x, write y):

    * ``t``: the public op (``mimb``: N = 1 with the lambda embedding; ``mimb_instances``:
      N = 2), as the benchmark rows time it;
    * ``kernel``: the compiled kernel alone (``torch.ops.mipnet_cpu``), so ``t - kernel`` is
      the op layer (argument checks, backend selection, ``torch.library``);
    * ``fixed``: the public op on ``[B, C, 1, 1]``, the same weights: every cost that does
      not grow with H*W (the op layer, the kernel's set-up, and the squeeze-excite MLP of
      all B samples, ~2 B C^2 / r multiply-adds);
    * ``floor = roof + fixed``: the op cannot move its data faster than the roof, and on one
      thread the MLP of a sample sits between that sample's reduce and apply passes (it
      needs all of the sample's sums, and the apply needs its result), so it does not
      overlap the data passes.  The sum counts a per-call cost twice (the roof's own, ~2
      us), so it over-states the floor by that much.  ``floor/roof > 1.5`` means the row's
      target is out of reach for any kernel with this MLP and this op layer.  (With more
      threads the ``[B, C, 1, 1]`` call runs on one thread while the row splits its MLP:
      not a bound, so the function runs on one thread, then restores the count.)

    Each row gets at least ``min_rounds`` rounds and about ``time_s`` seconds.
    ``OMP_NUM_THREADS=1 python -m benchmarks.test_mimb_bench --floor [--json PATH]``.
    """

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _floor_rows(batch, block_s, min_rounds, time_s)
    finally:
        torch.set_num_threads(threads)


def _floor_rows(batch: int, block_s: float, min_rounds: int, time_s: float) -> list[dict]:
    ops = torch.ops.mipnet_cpu
    rows = []
    for C, H, W in W32_256:
        d = _setup((batch, C, H, W), torch.float32, "cpu")
        x, lam = d["x"], d["lam"]
        x1 = x[:, :, :1, :1].contiguous()
        emb = (d["w1"], d["w2"], d["e1"], d["b1"], d["e2"], d["b2"])
        w1, w2, table = d["w1"], d["w2"], d["table"]
        cases = {
            "mimb": (1, lambda: mipnet_kernels.mimb(x, lam, *emb), lambda: ops.mimb_fwd(x, lam, *emb),
                     lambda: mipnet_kernels.mimb(x1, lam, *emb)),
            "mimb_instances": (NUM_INSTANCES, lambda: mipnet_kernels.mimb_instances(x, w1, w2, table),
                               lambda: ops.mimb_instances(x, w1, w2, table),
                               lambda: mipnet_kernels.mimb_instances(x1, w1, w2, table)),
        }
        for op, (reps_y, t_fn, k_fn, f_fn) in cases.items():
            def roof(reps_y=reps_y):
                return x.repeat(reps_y, 1, 1, 1)

            fns = (t_fn, k_fn, f_fn, roof)
            with torch.no_grad(), use_backend("cpu"):
                t0 = time.perf_counter()
                for fn in fns:
                    fn()
                one = max(time.perf_counter() - t0, 1e-7)
                reps = max(1, int(4 * block_s / one) + 1)
                t, k, f, r = _timing.interleaved_rounds(fns, max(min_rounds, int(time_s / (reps * one)) + 1), reps)
            med = statistics.median
            row = {
                "shape": f"{batch}x{C}x{H}x{W}", "op": op, "roof_us": med(r) * 1e6,
                "t_over_roof": med([a / b for a, b in zip(t, r)]),
                "kernel_over_roof": med([a / b for a, b in zip(k, r)]),
                "fixed_over_roof": med([a / b for a, b in zip(f, r)]),
            }
            row["floor_over_roof"] = 1.0 + row["fixed_over_roof"]
            rows.append(row)
            print(f"{row['shape']:>12} {op:<15} roof {row['roof_us']:7.1f} us | t/roof {row['t_over_roof']:.2f} "
                  f"kernel/roof {row['kernel_over_roof']:.2f} fixed/roof {row['fixed_over_roof']:.2f} "
                  f"floor/roof {row['floor_over_roof']:.2f}"
                  + ("  (target 1.5 out of reach)" if row["floor_over_roof"] > 1.5 else ""))
    return rows


if __name__ == "__main__":
    import sys

    if "--floor" in sys.argv:
        floor_rows = floor_vs_roof()
        if "--json" in sys.argv:  # --json PATH: the rows, for benchmarks/results
            import json
            import platform

            with open(sys.argv[sys.argv.index("--json") + 1], "w") as fh:
                json.dump({"command": " ".join(["python -m benchmarks.test_mimb_bench"] + sys.argv[1:]),
                           "cpu": platform.processor() or platform.machine(),
                           "cpu_isa": mipnet_kernels.get_cpu_isa(), "rows": floor_rows}, fh, indent=1)
    elif "--kernels" in sys.argv:
        instances_kernels_vs_scale_kernels(layout="channels_last" if "channels_last" in sys.argv else "contiguous")
    else:
        instances_vs_scale_calls()
