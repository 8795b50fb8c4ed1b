"""The Triton compile gate and the Triton numerics that only a GPU compile shows (issue 14).

* ``test_compile_gate``: every Triton kernel, in every code path its launchers choose for
  the GPU test shapes (``triton_launches.py``), compiles for sm_90 and sm_80 through the
  ptxas in the wheel, and the PTX passes the checks of ``benchmarks.gpu_resources --gate``
  (float64-typed NMS thresholds, no approximate division / exp in NMS, MIMB, decode).  It
  runs in a subprocess WITHOUT ``TRITON_INTERPRET`` (conftest sets it for this process).
* ``test_gpu_resources_check``: HOT Triton kernels gain no spills against the committed
  ``benchmarks/gpu_resources.json``.
* the weight gradients do not follow torch's TF32 / matmul-precision setting;
* grouped MIMB and the flip index make no host-to-device copy (CUDA-graph capture of a
  first call), on CPU by the ops they dispatch and on a GPU by capturing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

pytest.importorskip("triton")


def _run_tool(*args: str, timeout: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu_resources", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.triton
def test_compile_gate(tmp_path):
    out = tmp_path / "gate.json"
    proc = _run_tool("--gate", "--json", str(out), timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    rows = json.loads(out.read_text())
    compiled = {r["kernel"] for r in rows}
    # every @triton.jit kernel of the package is launched by some recorded launcher call
    import importlib

    import triton  # noqa: F401  (this process may interpret: only names are compared)

    for mod in ("decode", "mimb", "nms"):
        m = importlib.import_module(f"mipnet_kernels.triton.{mod}")
        kernels = {n for n in vars(m) if n.endswith("_kernel") and n.startswith("_")}
        assert kernels <= compiled, f"never compiled: {kernels - compiled}"
    assert {r["arch"] for r in rows} == {"sm_90", "sm_80"}
    nms64 = [r for r in rows if r["kernel"].startswith(("_nms_small", "_nms_mask", "_soft")) and "fp64" in r["spec"]]
    assert nms64 and all("f64" in r["param_types"] and "f32" not in r["param_types"] for r in nms64)


def test_gate_rejects_float32_thresholds_and_approximate_math():
    from benchmarks.gpu_resources import gate_failures

    base = {"arch": "sm_90", "param_types": ["u64", "f64"], "approx": {"div.full.f32": 0, "ex2.approx.f32": 0}}
    assert gate_failures([dict(base, kernel="_nms_mask_kernel", spec="s")]) == []
    assert gate_failures([dict(base, kernel="_nms_mask_kernel", spec="s", param_types=["u64", "f32"])])
    assert gate_failures([dict(base, kernel="_mimb_reduce_mlp_kernel", spec="s",
                               approx={"div.full.f32": 0, "ex2.approx.f32": 2})])
    assert gate_failures([dict(base, kernel="_soft_nms_kernel", spec="s", error="ptxas failed")])


def test_approximate_math_counter():
    from mipnet_kernels.triton._compile import approximate_math

    ptx = ("ex2.approx.f32 %f1, %f2;\n ex2.approx.ftz.f32 %f3, %f4;\n div.full.f32 %f5, %f6, %f7;\n div.rn.f32 %f8;"
           "\n lg2.approx.f32 %f9, %f10;\n lg2.approx.ftz.f32 %f11, %f12;")
    assert approximate_math(ptx) == {"div.full.f32": 1, "ex2.approx.f32": 1, "lg2.approx.f32": 1}


@pytest.mark.triton
def test_gpu_resources_check():
    if not (ROOT / "benchmarks" / "gpu_resources.json").exists():
        pytest.skip("no committed benchmarks/gpu_resources.json")
    proc = _run_tool("--check", "--no-cuda", timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]


# --------------------------------------------------------------------------- dw1 / dw2 precision
def _mimb_bwd_inputs(device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, C, H, W, CR = 5, 48, 7, 5, 12
    x = torch.randn(B, C, H, W, generator=g, dtype=dtype).to(device)
    w1 = torch.randn(CR, C, generator=g, dtype=dtype).to(device) * 0.2
    w2 = torch.randn(C, CR, generator=g, dtype=dtype).to(device) * 0.2
    v = torch.rand(B, C, generator=g, dtype=dtype).to(device)
    dy = torch.randn(B, C, H, W, generator=g, dtype=dtype).to(device)
    return dy, x, w1, w2, v


def _weight_grads_under(precision: str, allow_tf32: bool, device):
    from mipnet_kernels.triton.mimb import mimb_scale_bwd_triton, mimb_scale_fwd_triton

    dy, x, w1, w2, v = _mimb_bwd_inputs(device)
    old = (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32)
    try:
        torch.set_float32_matmul_precision(precision)
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
        _, s = mimb_scale_fwd_triton(x, w1, w2, v)
        _, dw1, dw2, _ = mimb_scale_bwd_triton(dy, x, w1, w2, v, s)
    finally:
        torch.set_float32_matmul_precision(old[0])
        torch.backends.cuda.matmul.allow_tf32 = old[1]
    return dw1, dw2


def _check_weight_grads_ignore_matmul_precision(device):
    want = _weight_grads_under("highest", False, device)
    for precision in ("high", "medium"):
        got = _weight_grads_under(precision, True, device)
        for a, b in zip(got, want):
            assert torch.equal(a, b), precision
    # and they are full float32: float64 batch sums agree to float32 rounding
    from mipnet_kernels.ops.mimb import mimb_scale_bwd_reference

    dy, x, w1, w2, v = (t.double() for t in _mimb_bwd_inputs(device))
    s = x.mean(dim=(2, 3))
    _, dw1_64, dw2_64, _ = mimb_scale_bwd_reference(dy, x, w1, w2, v, s)
    for a, b in zip(want, (dw1_64, dw2_64)):
        torch.testing.assert_close(a.double(), b, rtol=2e-5, atol=2e-5 * b.abs().max().item())


@pytest.mark.triton
def test_weight_grads_ignore_matmul_precision_interpreter():
    if torch.cuda.is_available():
        pytest.skip("the interpreter runs only without a GPU")
    _check_weight_grads_ignore_matmul_precision(torch.device("cpu"))


@pytest.mark.cuda
@pytest.mark.triton
def test_weight_grads_ignore_tf32_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    _check_weight_grads_ignore_matmul_precision(torch.device("cuda"))


# --------------------------------------------------------------------------- capture safety
class _HostTensorCreations(torch.utils._python_dispatch.TorchDispatchMode):
    """Records ops that turn host data into a tensor (``torch.tensor`` dispatches lift_fresh)
    or copy across devices."""

    def __init__(self):
        super().__init__()
        self.bad = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if "lift_fresh" in name or ("_to_copy" in name and kwargs and "device" in kwargs):
            self.bad.append(name)
        return func(*args, **(kwargs or {}))


def test_flip_index_built_without_host_data():
    from mipnet_kernels.ops import decode as ops_decode

    perm = [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15]
    ops_decode._const_cache.clear()
    with _HostTensorCreations() as mode:
        t = ops_decode._flip_index_tensor(perm, torch.device("cpu"))
        w = ops_decode._blur_weights("dark", 11, torch.device("cpu"))
    assert mode.bad == []
    assert t.tolist() == perm and t.dtype == torch.int64
    # the taps are the same float32 values a host-built tensor holds
    want = torch.tensor(ops_decode.gaussian_kernel_1d(11), dtype=torch.float32)
    assert torch.equal(w, want) and w.dtype == torch.float32


@pytest.mark.triton
def test_grouped_meta_table_built_without_host_data():
    if torch.cuda.is_available():
        pytest.skip("the interpreter runs only without a GPU")
    from mipnet_kernels.triton import mimb as tm

    tm._META_CACHE.clear()
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(2, c, h, w, generator=g) for c, h, w in ((8, 5, 3), (16, 3, 2))]
    w1s = [torch.randn(c // 4, c, generator=g) for c in (8, 16)]
    w2s = [torch.randn(c, c // 4, generator=g) for c in (8, 16)]
    vs = [torch.rand(2, c, generator=g) for c in (8, 16)]
    rows = [(0, 2, 8, 2, 15) + (7,) * 19, (5, 2, 16, 4, 6) + (1,) * 19]
    with _HostTensorCreations() as mode:
        table = tm._meta(rows, torch.device("cpu"))
    assert mode.bad == []
    assert table.tolist() == [list(r) for r in rows]
    ys, _ = tm.mimb_scale_grouped_fwd_triton(xs, w1s, w2s, vs)
    for x, y, w1, w2, v in zip(xs, ys, w1s, w2s, vs):
        want, _ = tm.mimb_scale_fwd_triton(x, w1, w2, v)
        torch.testing.assert_close(y, want, rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.triton
def test_first_call_captured_in_cuda_graph():
    """Grouped MIMB, flip_merge and DARK decode (triton) whose first call is inside
    torch.cuda.graph on a fresh stream: no warm-up, cold caches; replay equals eager."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    import mipnet_kernels as mk
    from mipnet_kernels.ops import decode as ops_decode
    from mipnet_kernels.triton import mimb as tm

    dev = torch.device("cuda")
    tm._META_CACHE.clear()
    ops_decode._const_cache.clear()
    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(2, c, h, w, generator=g).to(dev) for c, h, w in ((32, 16, 12), (64, 8, 6))]
    w1s = [(torch.randn(c // 4, c, generator=g) * 0.2).to(dev) for c in (32, 64)]
    w2s = [(torch.randn(c, c // 4, generator=g) * 0.2).to(dev) for c in (32, 64)]
    vs = [torch.rand(2, c, generator=g).to(dev) for c in (32, 64)]
    hm = torch.rand(2, 17, 16, 12, generator=g).to(dev)
    fl = torch.rand(2, 17, 16, 12, generator=g).to(dev)
    pairs = mk.COCO_FLIP_PAIRS if hasattr(mk, "COCO_FLIP_PAIRS") else [(1, 2)]
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with mk.use_backend("triton"):
        with torch.cuda.graph(graph, stream=stream):
            ys, _ = tm.mimb_scale_grouped_fwd_triton(xs, w1s, w2s, vs)
            merged = mk.flip_merge(hm, fl, pairs)
            coords, scores = mk.decode_heatmaps(hm, mode="dark")  # blur taps: cold cache too
        graph.replay()
        torch.cuda.synchronize()
        want_ys, _ = tm.mimb_scale_grouped_fwd_triton(xs, w1s, w2s, vs)
        want_merged = mk.flip_merge(hm, fl, pairs)
        want_coords, want_scores = mk.decode_heatmaps(hm, mode="dark")
    torch.testing.assert_close(coords, want_coords, rtol=0, atol=0)
    torch.testing.assert_close(scores, want_scores, rtol=0, atol=0)
    for y, w in zip(ys, want_ys):
        torch.testing.assert_close(y, w, rtol=0, atol=0)
    torch.testing.assert_close(merged, want_merged, rtol=0, atol=0)
