"""What every benchmark suite shares: the outside references, row labels, skip reasons and the
timed run of one row.

* :data:`anchors` -- ``tests/anchors.py``, the module the tests check the ops against (NumPy
  anchors of HRNet / DarkPose / MMPose / OKS-NMS, the official MIPNet ``SELambdaLayer``):
  the benchmarks time the same code the tests trust, so the two never drift.  None (and
  :data:`ANCHORS_IMPORT_ERROR` says why) when the file cannot be imported, e.g. in an
  install without the tests.
* :func:`run`: times one row (pytest-benchmark's timer on the host, CUDA events on the GPU,
  see ``benchmarks/_timing.py``) and records the timing fields of ``extra_info``.
* :func:`record`, :func:`device_name`, :data:`DTYPE_IDS`, :func:`shape_id`: the row labels.
* :func:`skip_reason`: why a backend row cannot run here (no GPU, Triton under its
  interpreter, the library's own reasons for these inputs), or None.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Callable

import torch

import mipnet_kernels

from . import _report, _timing

# --------------------------------------------------------------------------- references
ANCHORS_PATH = Path(__file__).resolve().parents[1] / "tests" / "anchors.py"


def _load_anchors():
    """``tests/anchors.py`` as ``tests.anchors``, or by path when another ``tests`` package
    shadows the repository's."""
    try:
        from tests import anchors as mod

        if Path(mod.__file__).resolve() == ANCHORS_PATH:
            return mod
    except ImportError:
        pass
    spec = importlib.util.spec_from_file_location("mipnet_tests_anchors", ANCHORS_PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ANCHORS_IMPORT_ERROR = ""
try:
    anchors = _load_anchors()
except (ImportError, OSError) as exc:  # pragma: no cover - only when tests/ is not shipped
    anchors = None
    ANCHORS_IMPORT_ERROR = f"tests/anchors.py could not be imported: {exc!r}"


def anchors_skip_reason(need_cv2: bool = False) -> str | None:
    """Why the anchors cannot run here (``need_cv2``: the affines and dark/udp need OpenCV)."""
    if anchors is None:
        return ANCHORS_IMPORT_ERROR
    if need_cv2 and anchors.cv2 is None:
        return "opencv-python(-headless) is not installed: the affines and the dark/udp anchors need it"
    return None


# --------------------------------------------------------------------------- labels
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def shape_id(shape) -> str:
    """``(48, 17, 64, 48)`` -> ``"48x17x64x48"``."""
    return "x".join(str(s) for s in shape)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"`` (the ``dtype`` field of ``extra_info``)."""
    return str(dtype).replace("torch.", "")


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else _report.cpu_name()


def record(benchmark, **fields) -> None:
    """Add ``fields`` to the row's ``extra_info`` (what the table, the gate and the report read)."""
    benchmark.extra_info.update(fields)


# --------------------------------------------------------------------------- skips
TRITON_INTERPRETED = ("TRITON_INTERPRET is set: interpreter timings are meaningless, "
                      "triton is benchmarked on CUDA only")
NO_CUDA = "no CUDA device (torch.cuda.is_available() is False)"


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def skip_reason(backend: str, device: str, ops: dict[str, tuple] | None = None) -> str | None:
    """Why ``backend`` cannot run on ``device`` tensors here: no GPU, Triton under its
    interpreter, or the library's reasons for each ``op: args`` of ``ops``
    (:func:`mipnet_kernels.backends_for`, joined by "; "); None when it can."""
    if device == "cuda" and not torch.cuda.is_available():
        return NO_CUDA
    if backend == "triton" and triton_interpreted():
        return TRITON_INTERPRETED
    reasons: list[str] = []
    for op, args in (ops or {}).items():
        reasons += mipnet_kernels.backends_for(op, torch.device(device), *args)[backend]
    return "; ".join(reasons) if reasons else None


# --------------------------------------------------------------------------- timing
def run(benchmark, request, device: str, backend: str, fn: Callable[[], object], bytes_moved: int | None = None,
        *, roof: tuple[str, Callable[[], object]] | None = None, single_run: bool = False,
        warmup_calls: int = 3, kernel: Callable[[], object] | None = None):
    """Time ``fn`` and return its result.

    Rows of ``backend != "numpy"`` on CUDA tensors are timed with CUDA events (device time,
    each round after the session's L2 flush; see ``_timing.gpu_pedantic``), every other row
    with pytest-benchmark's host timer after ``warmup_calls`` untimed calls (thread team,
    allocator pages).  ``single_run``: one round, no warm-up (the slow baselines).  With
    ``--benchmark-disable`` (the smoke) ``fn`` runs once, untimed.

    Recorded in ``extra_info``: ``timer``, ``time_median_s``, ``rounds``; with ``bytes_moved``
    also ``gbps`` and, on GPU rows, ``l2_flush`` and ``roofline_time_s`` (those bytes at the
    measured copy bandwidth); GPU rows ``copy_bandwidth_GBps`` and ``host_call_s`` (the
    host time of one call, not for single runs).  ``roof``: ``(name, callable)``, the torch
    kernel that moves the same bytes once (e.g. ``torch.amax`` over the maps for a decode);
    on the CPU, after the row, ``fn`` and the roof are timed interleaved
    (``_timing.cpu_roof_times``) and recorded as ``roof_kernel``, ``roof_time_s``,
    ``paired_time_s`` (their medians) and ``t_over_roof`` (the median of the per-round
    ratios: robust to the drifts of a shared VM) -- the targets of issue 12 are stated in
    that ratio.  ``kernel``: the row's compiled kernel op alone (arguments converted once),
    timed in the same rounds and recorded as ``kernel_time_s`` / ``kernel_over_roof``, so
    that the op layer's share of ``t_over_roof`` shows.
    """
    gpu_timed = device == "cuda" and backend != "numpy"
    if benchmark.disabled:  # smoke: run once
        out = benchmark.pedantic(fn, rounds=1)
        if gpu_timed:
            torch.cuda.synchronize()
        return out
    if gpu_timed:
        env = request.getfixturevalue("gpu_bench_env")
        timer = getattr(benchmark, "_timer", _timing.CUDA_EVENT_TIMER)
        assert timer is _timing.CUDA_EVENT_TIMER, "GPU rows must be timed with CUDA events"
        if single_run:
            out = benchmark.pedantic(fn, setup=env.setup, rounds=1, iterations=1)
        else:
            out, cal = _timing.gpu_pedantic(benchmark, fn, env.setup)
            record(benchmark, host_call_s=cal["host_call_s"])
        record(benchmark, timer="cuda_event_timer", copy_bandwidth_GBps=env.copy_bandwidth_GBps)
        if bytes_moved is not None:
            record(benchmark, l2_flush=env.flush_l2,
                   roofline_time_s=bytes_moved / (env.copy_bandwidth_GBps * 1e9))
    else:
        if single_run:
            out = benchmark.pedantic(fn, rounds=1, iterations=1)
        else:
            for _ in range(warmup_calls):
                fn()
            out = benchmark(fn)
        record(benchmark, timer="perf_counter" if device == "cpu" else "perf_counter (host, incl. .cpu() copy)")
    if benchmark.stats is not None:
        median = float(benchmark.stats["median"])
        record(benchmark, time_median_s=median, rounds=benchmark.stats["rounds"])
        if bytes_moved is not None:
            record(benchmark, gbps=bytes_moved / median / 1e9)
        if roof is not None and device == "cpu":
            name, roof_fn = roof
            r = _timing.cpu_roof_times(fn, roof_fn, kernel=kernel)
            record(benchmark, roof_kernel=name, roof_time_s=r["roof_s"], paired_time_s=r["op_s"],
                   t_over_roof=r["t_over_roof"], cpu_isa=mipnet_kernels.get_cpu_isa(),
                   threads=torch.get_num_threads())
            if kernel is not None:
                record(benchmark, kernel_time_s=r["kernel_s"], kernel_over_roof=r["kernel_over_roof"])
    return out
