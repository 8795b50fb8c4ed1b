"""How the benchmark suite times things.

CPU rows use pytest-benchmark's own timer (``time.perf_counter``), calibrated rounds.

GPU rows report **device time**, measured with CUDA events, never host launch time:

* each round is ``setup()`` -> ``start = timer()`` -> ``fn()`` -> ``end = timer()``
  (``benchmark.pedantic``), where ``timer`` is :data:`CUDA_EVENT_TIMER`: the start call
  records a CUDA event and returns 0, the end call records a second event, waits for it
  and returns the elapsed device time between the two events.  pytest-benchmark's
  ``stats`` (min/median/...) for GPU rows are therefore CUDA-event times, and the
  committed JSON can be compared with ``pytest-benchmark compare`` like any other run.
* ``setup`` flushes the L2 cache by zeroing a 256 MiB buffer (as
  ``triton.testing.do_bench`` does), then queues a ~0.1 ms spin kernel
  (``torch.cuda._sleep``), and is *not* synchronised: while the GPU clears the buffer and
  spins (~0.15 ms on an H100), the host records the start event and launches ``fn``, so
  the events bracket the kernels back-to-back with no host launch gap in front of them.
  Without the flush the heatmaps (10-23 MB at the headline shapes) would stay resident
  in the 50 MB L2 of an H100 and the GB/s would exceed HBM bandwidth.  ``--mipnet-no-l2-flush``
  keeps only the spin kernel.  The host time of one call (``host_call_s``, measured while
  the GPU is busy) is recorded too: when it exceeds the hidden window, or for ops that
  synchronise inside (the eager reference), the device time includes host-bound gaps.
* a multi-kernel op (the eager reference) still pays every gap between its own kernels
  and any host synchronisation inside it: that is real device-side wall time of the op.
* warm-up (Triton JIT, autotuning, allocator) runs before the timed rounds; the number
  of rounds comes from a short CUDA-event estimate (:func:`gpu_calibrate`).

Nothing here imports triton; nothing here touches CUDA unless a CUDA tensor is benchmarked.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from typing import Callable

import torch

#: Bytes zeroed between GPU rounds to evict L2 (Triton's do_bench uses the same size).
L2_FLUSH_BYTES = 256 * 1024 * 1024
#: Spin cycles queued after the flush to hide the host launch (~0.1 ms at 2 GHz).
SPIN_CYCLES = 200_000
#: Device-time budget per GPU benchmark (seconds), and the bounds on the round count.
GPU_BUDGET_S = 0.25
GPU_MIN_ROUNDS, GPU_MAX_ROUNDS = 20, 500
#: Bytes of each buffer in the device-to-device copy used as the bandwidth roofline.
COPY_BYTES = 512 * 1024 * 1024


class CudaEventTimer:
    """A pytest-benchmark timer whose differences are CUDA-event device time in seconds.

    pytest-benchmark calls a timer exactly twice per round (``start = timer(); fn();
    end = timer(); duration = end - start``).  The first call records a start event and
    returns 0.0; the second records an end event, synchronises on it and returns the
    elapsed time, so ``end - start`` is the device time between the two events.
    Use it only through ``benchmark.pedantic`` (which never calibrates the timer).
    """

    __name__ = "cuda_event_timer"  # what pytest-benchmark writes into the JSON options

    def __init__(self) -> None:
        self._start: torch.cuda.Event | None = None

    def reset(self) -> None:
        self._start = None

    def __call__(self) -> float:
        if self._start is None:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._start = ev
            return 0.0
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        end.synchronize()
        start, self._start = self._start, None
        return start.elapsed_time(end) * 1e-3  # elapsed_time is in milliseconds

    def __repr__(self) -> str:
        return "CudaEventTimer()"


CUDA_EVENT_TIMER = CudaEventTimer()


class GpuRoundSetup:
    """``setup`` for GPU rounds: evict L2 (default), then keep the GPU busy; unsynchronised."""

    def __init__(self, device: torch.device, flush_l2: bool = True) -> None:
        self.flush_l2 = flush_l2
        self._buffer = (
            torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device) if flush_l2 else None
        )
        self._spin = getattr(torch.cuda, "_sleep", None)

    def __call__(self) -> None:
        if self._buffer is not None:
            self._buffer.zero_()
        if self._spin is not None:
            self._spin(SPIN_CYCLES)


def cuda_event_times(fn: Callable[[], object], setup: Callable[[], None] | None, reps: int) -> list[float]:
    """Device seconds of ``reps`` calls of ``fn`` (each after ``setup``), with CUDA events."""
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        if setup is not None:
            setup()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) * 1e-3 for s, e in zip(starts, ends)]


def gpu_warmup(fn: Callable[[], object], calls: int = 3) -> None:
    """Run ``fn`` untimed (JIT compilation, autotuning, allocator warm-up) and wait."""
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()


def gpu_calibrate(fn: Callable[[], object], setup: Callable[[], None] | None) -> dict:
    """Estimate device and host time per call; pick the number of timed rounds.

    ``rounds`` fits :data:`GPU_BUDGET_S` of device time (setup included), clamped to
    [GPU_MIN_ROUNDS, GPU_MAX_ROUNDS].  ``host_call_s`` is the median host time of one call
    issued while the GPU is still busy with ``setup`` (the launch overhead the setup hides).
    """
    device_s = statistics.median(cuda_event_times(fn, setup, 5))
    host = []
    for _ in range(5):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        host.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
    per_round = device_s + (1.5e-4 if setup is not None else 0.0)  # ~flush + spin
    rounds = int(min(GPU_MAX_ROUNDS, max(GPU_MIN_ROUNDS, math.ceil(GPU_BUDGET_S / max(per_round, 1e-6)))))
    return {"rounds": rounds, "device_estimate_s": device_s, "host_call_s": statistics.median(host)}


def gpu_pedantic(benchmark, fn: Callable[[], object], setup: Callable[[], None] | None) -> tuple[object, dict]:
    """One timed GPU row: warm ``fn`` up, calibrate the rounds, reset the CUDA-event timer
    and run ``benchmark.pedantic`` (each round after ``setup``).  Returns ``(result,
    calibration)`` (:func:`gpu_calibrate`)."""
    gpu_warmup(fn)
    cal = gpu_calibrate(fn, setup)
    CUDA_EVENT_TIMER.reset()
    out = benchmark.pedantic(fn, setup=setup, rounds=cal["rounds"], warmup_rounds=1, iterations=1)
    return out, cal


def measure_copy_bandwidth(device: torch.device, nbytes: int = COPY_BYTES, reps: int = 20) -> dict:
    """Device-to-device copy bandwidth: (bytes read + bytes written) / median time.

    The buffers (``nbytes`` each, default 512 MiB) are ten times an H100's L2, so this is
    the HBM bandwidth a streaming kernel can reach through ``Tensor.copy_``; it is the
    roofline the GB/s column is compared with.
    """
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize(device)
    times = cuda_event_times(lambda: dst.copy_(src), None, reps)
    t = statistics.median(times)
    moved = 2 * n * 4
    del src, dst
    torch.cuda.empty_cache()
    return {
        "copy_bytes_moved": moved,
        "copy_time_s": t,
        "copy_bandwidth_GBps": moved / t / 1e9,
        "method": f"median of {reps} CUDA-event-timed device-to-device copies of {nbytes >> 20} MiB",
    }


def interleaved_rounds(fns, rounds: int, reps: int, warmup: int = 3) -> list[list[float]]:
    """Seconds per call of each of ``fns`` in each of ``rounds`` rounds: ``warmup`` untimed
    calls of each, then rounds that time ``reps`` calls of each in turn.  Interleaving puts
    every function under the same drifts of a shared machine (other jobs, clocks, caches),
    so their ratio holds when absolute times do not.  ``result[i][r]``: fn i, round r."""
    for fn in tuple(fns) * warmup:
        fn()
    out: list[list[float]] = [[] for _ in fns]
    gc_was_on = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for _ in range(rounds):
            for i, fn in enumerate(fns):
                t0 = time.perf_counter()
                for _ in range(reps):
                    fn()
                out[i].append((time.perf_counter() - t0) / reps)
    finally:
        if gc_was_on:
            gc.enable()
    return out


def cpu_roof_times(fn: Callable[[], object], roof: Callable[[], object], min_time_s: float = 0.3,
                   min_rounds: int = 15, block_s: float = 2e-3,
                   kernel: Callable[[], object] | None = None) -> dict[str, float]:
    """A CPU row against the matching torch read/copy kernel (``t/roof``), interleaved
    (:func:`interleaved_rounds`, each timed block at least ``block_s``): ``op_s`` and
    ``roof_s`` (medians) and ``t_over_roof`` (the median of the per-round ratios, what the
    targets of issue 12 are stated in).  With ``kernel`` (the row's compiled kernel op on
    already converted arguments) in the same rounds, also ``kernel_s`` and
    ``kernel_over_roof``: ``t_over_roof - kernel_over_roof`` is the op layer's share."""
    fns = (fn, roof) if kernel is None else (fn, roof, kernel)
    for f in fns:  # warm (first-call costs), then one timed call of each calibrates the blocks
        f()
    t0 = time.perf_counter()
    fn()
    roof()
    one = max(time.perf_counter() - t0, 1e-7)
    reps = max(1, math.ceil(2 * block_s / one))
    rounds = max(min_rounds, math.ceil(min_time_s / (reps * one)))
    times = interleaved_rounds(fns, rounds, reps)
    out = {"op_s": statistics.median(times[0]), "roof_s": statistics.median(times[1]),
           "t_over_roof": statistics.median([a / b for a, b in zip(times[0], times[1])])}
    if kernel is not None:
        out["kernel_s"] = statistics.median(times[2])
        out["kernel_over_roof"] = statistics.median([a / b for a, b in zip(times[2], times[1])])
    return out
