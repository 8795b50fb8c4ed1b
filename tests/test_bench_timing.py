"""The CPU timing helpers of the benchmarks (benchmarks/_timing.py): what they time and
record, not how fast anything is (timings are the benchmarks' job)."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # as tests/test_bench_gate.py: benchmarks/ is not installed
    sys.path.insert(0, str(ROOT))

from benchmarks import _timing  # noqa: E402


def test_interleaved_rounds_times_each_function_in_turn_with_the_gc_off():
    calls, gc_states = [], []

    def make(name):
        def fn():
            calls.append(name)
            gc_states.append(gc.isenabled())
        return fn

    assert gc.isenabled()
    out = _timing.interleaved_rounds((make("a"), make("b")), rounds=3, reps=2, warmup=1)
    assert len(out) == 2 and all(len(t) == 3 and all(x >= 0 for x in t) for t in out)
    # one warm-up call of each, then per round: 2 calls of a, then 2 of b
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] * 3
    assert gc_states[2:] == [False] * 12 and gc.isenabled()


def test_interleaved_rounds_restores_the_gc_when_a_function_raises():
    n = []

    def boom():
        n.append(1)
        if len(n) > 1:  # after the warm-up call
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        _timing.interleaved_rounds((boom,), rounds=2, reps=1, warmup=1)
    assert gc.isenabled()


def test_cpu_roof_times_records_the_kernel_in_the_same_rounds():
    seen = []
    fns = {name: (lambda name=name: seen.append(name)) for name in ("op", "roof", "kernel")}
    out = _timing.cpu_roof_times(fns["op"], fns["roof"], min_time_s=0.0, min_rounds=3, block_s=1e-6,
                                 kernel=fns["kernel"])
    assert set(out) == {"op_s", "roof_s", "t_over_roof", "kernel_s", "kernel_over_roof"}
    assert all(v > 0 for v in out.values())
    # the same warm-up and rounds for all three; op and roof once more (the calibration call)
    assert seen.count("op") == seen.count("roof") == seen.count("kernel") + 1 > 3
    without = _timing.cpu_roof_times(fns["op"], fns["roof"], min_time_s=0.0, min_rounds=3, block_s=1e-6)
    assert set(without) == {"op_s", "roof_s", "t_over_roof"}


def test_op_overhead_row():
    from benchmarks import op_overhead

    row = op_overhead.overhead("toy", lambda: sum(range(50)), lambda: None, rounds=3, reps=2)
    assert set(row) == {"call", "public_us", "kernel_us", "overhead_us", "ratio"} and row["call"] == "toy"
    assert row["public_us"] > 0 and row["kernel_us"] > 0


def test_floor_rows_and_thread_count_restored():
    """test_mimb_bench --floor on a tiny budget: every W32 forward row, floor = roof + fixed,
    and the caller's thread count back afterwards."""
    import torch

    import mipnet_kernels as mk
    from benchmarks import test_mimb_bench
    from benchmarks.common import anchors_skip_reason

    if not mk.available_backends()["cpu"]["available"]:
        pytest.skip("needs the cpu backend")
    why = anchors_skip_reason()
    if why:
        pytest.skip(why)
    threads = torch.get_num_threads()
    rows = test_mimb_bench.floor_vs_roof(batch=2, block_s=1e-5, min_rounds=2, time_s=0.0)
    assert torch.get_num_threads() == threads
    assert [(r["shape"].split("x")[1], r["op"]) for r in rows] == [
        (str(c), op) for c, _, _ in test_mimb_bench.W32_256 for op in ("mimb", "mimb_instances")]
    for r in rows:
        assert r["floor_over_roof"] == pytest.approx(1.0 + r["fixed_over_roof"])
        assert min(r["t_over_roof"], r["kernel_over_roof"], r["fixed_over_roof"], r["roof_us"]) > 0
