"""Model latency: baseline HRNet against MIPNet N=2, the official way and ours.

Variants (``extra_info["variant"]``), each a full inference pass over one batch of crops:

* ``baseline``  -- (a) plain HRNet (``build_model(arch, 1)``): ``model(images)``;
* ``official``  -- (b) MIPNet N=2 as the official code runs it: the whole network once per
  instance, ``[model(images, lam_n) for n in (0, 1)]`` (one-hot float selectors, as the
  official ``lambda_vec``; no host synchronisation, so it can be graph-captured);
* ``ours``      -- (c) MIPNet N=2 with ``model.forward_instances(images)``: the trunk once,
  the first MIMBs writing both instances from one read, the rest as one batch of 2B;
* ``ours_eager_mimb`` -- (c) with every MIMB op on the ``reference`` backend (plain eager
  PyTorch ops): the MIMB-only comparison inside the model, fused vs eager blocks; its row
  records ``fused_mimb_speedup`` = this time / the ``ours`` time.

Configurations: GPU -- HRNet-W32 at 256x192 and HRNet-W48 at 384x288, batch 24 (the paper's
Table 3) and 48, fp32 and bf16 (the model and the crops cast to the dtype, channels_last),
``eager`` and ``graph`` (the pass captured once in a CUDA graph and replayed).  CPU -- only
a smoke configuration (W32, 64x64, batch 1, fp32, eager) so that ``--benchmark-disable``
finishes in seconds; HRNet needs H and W to be multiples of 32, hence 64x64 rather than 64x48.
The headline at the paper's 256x192 -- inference and the training step, on CPU and GPU, with
its summary table -- is ``benchmarks/headline.py``, which ``make bench`` runs after this suite;
:func:`test_headline_smoke` runs it end to end at 64x64 in the untimed (CI) mode.

``extra_info`` of each row: ``arch, variant, batch, input_size, dtype, graph, params``,
``gflops`` (``torch.utils.flop_counter.FlopCounterMode`` over one pass; the MIMB custom ops
are not counted, < 0.01 % of the work), ``flop_ratio_vs_baseline`` (for ``ours`` this is the
FLOP-implied floor of (c)/(a)), ``time_median_s`` and ``ratio_vs_baseline`` ((b)/(a) or
(c)/(a): filled when the baseline row of the same configuration ran earlier in the session,
which the parametrisation order guarantees).  Rows carry no ``op`` key, so the op table of
``benchmarks/_report.py`` leaves them out; the JSON holds them.

Weights: the official initialisation (timing does not depend on the values).  Each row
checks its output's shape and finiteness; ``official`` and ``ours`` rows also record their
largest difference (relative to max |official|), asserted small on CPU fp32 only (on GPU,
TF32/bf16 convolutions with different batch sizes legitimately differ more).
"""

from __future__ import annotations

import io

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import mipnet_kernels
from mipnet.models import build_model

from . import _timing, headline
from .conftest import _benchmarks_disabled
from .common import DTYPE_IDS
from .common import device_name as _device_name
from .common import record as _extra_info

NUM_INSTANCES = 2
VARIANTS = ("baseline", "official", "ours", "ours_eager_mimb")  # baseline first, ours before ours_eager_mimb
GPU_CONFIGS = [("hrnet_w32", (256, 192)), ("hrnet_w48", (384, 288))]
GPU_BATCHES = (24, 48)
GPU_DTYPES = (torch.float32, torch.bfloat16)
GPU_MODES = ("eager", "graph")
CPU_CONFIGS = [("hrnet_w32", (64, 64))]
CPU_RTOL = 1e-3  # ours vs official on CPU fp32 (reassociation only)


def _cases():
    for arch, size in CPU_CONFIGS:
        for variant in VARIANTS:
            yield pytest.param("cpu", arch, size, 1, torch.float32, "eager", variant,
                               id=f"cpu-{arch}-{size[0]}x{size[1]}-b1-fp32-eager-{variant}")
    for arch, size in GPU_CONFIGS:
        for batch in GPU_BATCHES:
            for dtype in GPU_DTYPES:
                for mode in GPU_MODES:
                    for variant in VARIANTS:
                        yield pytest.param(
                            "cuda", arch, size, batch, dtype, mode, variant,
                            id=f"cuda-{arch}-{size[0]}x{size[1]}-b{batch}-{DTYPE_IDS[dtype]}-{mode}-{variant}",
                            marks=[pytest.mark.cuda, pytest.mark.benchmark(timer=_timing.CUDA_EVENT_TIMER)],
                        )


CASES = list(_cases())

_models: dict = {}
_flops: dict = {}
_baseline_time: dict = {}
_ours_time: dict = {}
_official_out: dict = {}


def _model(arch: str, num_instances: int, device: str, dtype: torch.dtype):
    """One model per (arch, N) on the device in the dtype (eval, channels_last on CUDA)."""
    key = (arch, num_instances, device, dtype)
    if key not in _models:
        for k in [k for k in _models if k[2:] != (device, dtype)]:  # keep one dtype resident
            del _models[k]
        torch.manual_seed(0)
        model = build_model(arch, num_instances).eval().to(device=device, dtype=dtype)
        if device == "cuda":
            model = model.to(memory_format=torch.channels_last)
        _models[key] = model
    return _models[key]


def _pass_fn(variant: str, model, images: torch.Tensor):
    """The timed inference pass of ``variant``; returns heatmaps ``[N or 1, B, K, h, w]``
    (a list of per-instance tensors for ``official``)."""
    if variant == "baseline":
        def fn():
            with torch.no_grad():
                return model(images)[None]
    elif variant == "official":
        B = images.shape[0]
        lams = [torch.nn.functional.one_hot(torch.full((B,), n, device=images.device), NUM_INSTANCES)
                .to(images.dtype) for n in range(NUM_INSTANCES)]

        def fn():
            with torch.no_grad():
                return [model(images, lam) for lam in lams]
    elif variant == "ours_eager_mimb":
        def fn():
            with mipnet_kernels.use_backend("reference"):
                return model.forward_instances(images)
    else:
        def fn():
            return model.forward_instances(images)
    return fn


def _cuda_graph(fn):
    """``fn`` captured in a CUDA graph (after warm-up on a side stream); the replay returns
    the graph's static outputs."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay():
        graph.replay()
        return out
    return replay


def _count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _stack(out) -> torch.Tensor:
    return torch.stack(list(out)) if isinstance(out, (list, tuple)) else out


def _time(benchmark, request, device: str, fn):
    """Time ``fn`` (CUDA events on GPU, as the op benchmarks) and return its result."""
    if device != "cuda":
        out = benchmark(fn)
        _extra_info(benchmark, timer="perf_counter")
    else:
        env = request.getfixturevalue("gpu_bench_env")
        if benchmark.disabled:  # smoke: run once
            out = benchmark.pedantic(fn, rounds=1)
            torch.cuda.synchronize()
            return out
        out, cal = _timing.gpu_pedantic(benchmark, fn, env.setup)
        _extra_info(benchmark, timer="cuda_event_timer", host_call_s=cal["host_call_s"], l2_flush=env.flush_l2)
    if benchmark.enabled and benchmark.stats is not None:
        _extra_info(benchmark, time_median_s=float(benchmark.stats["median"]), rounds=benchmark.stats["rounds"])
    return out


@pytest.mark.parametrize("device, arch, size, batch, dtype, mode, variant", CASES)
def test_model_latency(benchmark, request, device, arch, size, batch, dtype, mode, variant):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device (torch.cuda.is_available() is False)")
    num_instances = 1 if variant == "baseline" else NUM_INSTANCES
    model = _model(arch, num_instances, device, dtype)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, *size, generator=g).to(device=device, dtype=dtype)
    if device == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    fn = _pass_fn(variant, model, images)

    config = (device, arch, size, batch)
    if (config, variant) not in _flops:  # dtype- and mode-independent
        _flops[(config, variant)] = _count_flops(fn)
    flops = _flops[(config, variant)]
    base_flops = _flops.get((config, "baseline"))
    benchmark.group = f"model {arch} {size[0]}x{size[1]} b{batch} {DTYPE_IDS[dtype]} {mode} {device}"
    _extra_info(
        benchmark, model_bench=True, arch=arch, variant=variant, device=device,
        device_name=_device_name(device), batch=batch, input_size=f"{size[0]}x{size[1]}",
        dtype=str(dtype).replace("torch.", ""), graph=mode == "graph", num_instances=num_instances,
        params=sum(p.numel() for p in model.parameters()), gflops=flops / 1e9,
        flop_ratio_vs_baseline=flops / base_flops if base_flops else None,
        # the FLOP-implied floor of ours / baseline latency (the report marks it)
        flop_floor=flops / base_flops if base_flops and variant == "ours" else None,
    )
    timed = _cuda_graph(fn) if mode == "graph" else fn
    out = _stack(_time(benchmark, request, device, timed)).detach()

    K, (H, W) = model.num_keypoints, size
    assert out.shape == (num_instances, batch, K, H // 4, W // 4), out.shape
    assert torch.isfinite(out).all()
    key = (config, dtype, mode)
    if benchmark.enabled and benchmark.stats is not None:
        median = float(benchmark.stats["median"])
        if variant == "baseline":
            _baseline_time[key] = median
        elif key in _baseline_time:
            _extra_info(benchmark, ratio_vs_baseline=median / _baseline_time[key])
        if variant == "ours":
            _ours_time[key] = median
        elif variant == "ours_eager_mimb" and key in _ours_time:
            _extra_info(benchmark, fused_mimb_speedup=median / _ours_time[key])
    if variant == "official":
        _official_out[key] = out.clone()
    elif variant == "ours" and key in _official_out:
        ref = _official_out.pop(key)
        diff = float((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30))
        _extra_info(benchmark, max_rel_diff_vs_official=diff)
        if device == "cpu" and dtype == torch.float32:
            assert diff <= CPU_RTOL, f"forward_instances differs from the per-instance passes by {diff:.3g}"


def test_headline_smoke(request):
    """``benchmarks/headline.py`` end to end at 64x64, batch 1, one round: every row, its FLOP
    ratios (official = 2x HRNet exactly: two full passes / a doubled batch; ours / shared
    well under it) and the summary table.  Untimed mode only: ``make bench`` runs the real
    headline right after the suite."""
    if not _benchmarks_disabled(request.config):
        pytest.skip("timed run: make bench runs python -m benchmarks.headline at 256x192 itself")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a smoke run: one thread stays quick while other work loads the CPU
    try:
        results = headline.run("hrnet_w32", (64, 64), [1], torch.device("cpu"), "none", rounds=1, train_rounds=1,
                               stat="best", modes=("inference", "training"), log=io.StringIO())
    finally:
        torch.set_num_threads(threads)
    rows = {(r["mode"], r["variant"]): r for r in results["rows"]}
    assert set(rows) == {("inference", v) for v in headline.INFERENCE} | {("training", v) for v in headline.TRAINING}
    for r in rows.values():
        assert r["time_s"] > 0 and len(r["times_s"]) == 1 and r["gflops"] > 0
    for mode, ours in (("inference", "ours"), ("training", "shared")):
        assert rows[mode, "official"]["flop_ratio"] == pytest.approx(2.0, rel=1e-3)
        assert 1.0 < rows[mode, ours]["flop_ratio"] < 1.5
    text = headline.summary(results, "test cpu")
    assert "shared trunk N=2" in text and "official/shared" in text and "batch 1" in text
