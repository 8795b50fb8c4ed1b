"""Benchmarks of ``decode_heatmaps`` (argmax, quarter, dark, udp) and ``flip_merge``.

Headline workload (MIPNet top-down inference with N=2 instances per box): 24 boxes x 2
instances = B=48 heatmap stacks, K=17 COCO joints, 64x48 and 96x72 heatmaps, a per-box
heatmap -> image affine.  fp32 on CPU; fp32 and fp16 on CUDA.

Rows per shape/mode/dtype and device:

* backends through the public op, ``with mipnet_kernels.use_backend(name)``:
  CPU tensors -- ``cpu`` (C++), ``reference``; CUDA tensors -- ``cuda``, ``triton``,
  ``reference``.  ``reference`` is the eager-PyTorch baseline.  A backend that cannot run
  here is skipped with ``not_supported_reasons``; Triton is never benchmarked under the
  interpreter.
* ``numpy``: the pipeline we beat, from ``tests/anchors.py`` (the same anchors the tests
  check the op against, through ``benchmarks/common.py``): HRNet ``get_final_preds`` (argmax; quarter =
  its per-joint quarter-offset loop), DarkPose ``get_final_preds`` (dark), MMPose
  ``_get_max_preds`` + ``post_dark_udp`` (udp), each with the per-joint ``transform_preds``
  affine; HRNet's flip test (``flip_back`` + shift + average).  On CUDA input it starts
  with ``.cpu().numpy()`` exactly as the official code does (HRNet's flip test copies the
  flipped maps to the host, flips them there, copies them back and averages on the GPU).

Timing (see ``benchmarks/_timing.py``): CPU rows use pytest-benchmark's timer; CUDA rows
of the backends use CUDA events (device time, L2 flushed before each round); ``numpy``
rows on CUDA input use the host timer (their result lands on the host).
Each row's ``extra_info`` carries op, backend, mode, shape, dtype, bytes that must move,
GB/s and the device name; the run ends with the table of ``benchmarks/_report.py``.

Every result is checked once against the eager reference (a gross check -- wrong argmax,
wrong formula; accuracy is the tests' job): backends must agree, the anchor's deviation
is recorded in ``extra_info``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mipnet_kernels
from mipnet_kernels import COCO_FLIP_PAIRS, use_backend
from mipnet_kernels.ops.decode import _decode_kernel_args, _flip_index, _flip_kernel_args, flip_index_from_pairs

from . import _timing
from .common import DTYPE_IDS, anchors, anchors_skip_reason, device_name, dtype_name, record, run, shape_id, skip_reason

NUM_BOXES, NUM_INSTANCES, NUM_JOINTS = 24, 2, 17
BATCH = NUM_BOXES * NUM_INSTANCES  # 48
HEATMAP_SIZES = [(64, 48), (96, 72)]  # (H, W): 256x192 and 384x288 inputs
SHAPES = [(BATCH, NUM_JOINTS, h, w) for h, w in HEATMAP_SIZES]
MODES = ("argmax", "quarter", "dark", "udp")
BLUR_KERNEL = 11  # DarkPose / MMPose UDP default for these sizes
IMAGE_SIZE = (640, 480)  # (width, height) of the synthetic frame the boxes live in

DEVICE_CASES = {
    "cpu": ((torch.float32,), ("cpu", "reference", "numpy")),
    "cuda": ((torch.float32, torch.float16), ("cuda", "triton", "reference", "numpy")),
}

# Gross-error bounds for backends vs the eager reference (in heatmap pixels / relative).
COORD_TOL_HM_PX = 0.1
SCORE_RTOL = 1e-3


def _cases():
    for device, (dtypes, backends) in DEVICE_CASES.items():
        for dtype in dtypes:
            for backend in backends:
                marks = []
                if device == "cuda":
                    marks.append(pytest.mark.cuda)
                    if backend != "numpy":  # device time for everything that runs on the GPU
                        marks.append(pytest.mark.benchmark(timer=_timing.CUDA_EVENT_TIMER))
                yield pytest.param(device, dtype, backend, id=f"{device}-{backend}-{DTYPE_IDS[dtype]}", marks=marks)


# --------------------------------------------------------------------------- inputs
_input_cache: dict = {}


def _gaussian_heatmaps(shape, seed: int) -> torch.Tensor:
    """Float32 CPU heatmaps like a trained head's: one Gaussian blob per joint (sigma 2 at
    64x48, 3 at 96x72, as HRNet's targets), amplitude 0.3-1, centre away from the border
    (so every refinement path runs), plus a little noise."""
    B, K, H, W = shape
    g = torch.Generator().manual_seed(seed)
    sigma = 2.0 * H / 64
    cx = 3 + torch.rand(B, K, 1, 1, generator=g) * (W - 7)
    cy = 3 + torch.rand(B, K, 1, 1, generator=g) * (H - 7)
    amp = 0.3 + 0.7 * torch.rand(B, K, 1, 1, generator=g)
    xs = torch.arange(W, dtype=torch.float32).view(1, 1, 1, W)
    ys = torch.arange(H, dtype=torch.float32).view(1, 1, H, 1)
    hm = amp * torch.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * sigma**2))
    return hm + 0.01 * torch.rand(B, K, H, W, generator=g)


def _box_affines(H: int, W: int, seed: int) -> np.ndarray:
    """[B, 2, 3] float64 heatmap -> image matrices built the HRNet way (box -> center/scale
    -> ``get_affine_transform(inv=1)``); the two instances of a box share its matrix."""
    rng = np.random.default_rng(seed)
    mats = []
    for _ in range(NUM_BOXES):
        w, h = rng.uniform(40, 300), rng.uniform(80, 400)
        x, y = rng.uniform(0, IMAGE_SIZE[0] - w), rng.uniform(0, IMAGE_SIZE[1] - h)
        center, scale = anchors.box_to_center_scale(x, y, w, h, aspect_ratio=W / H)
        mats.append(anchors.get_affine_transform(center, scale, 0, (W, H), inv=1))
    return np.repeat(np.stack(mats).astype(np.float64), NUM_INSTANCES, axis=0)


def _inputs(shape, dtype, device: str) -> dict:
    key = (shape, dtype, device)
    if key not in _input_cache:
        _, _, H, W = shape
        hm = _gaussian_heatmaps(shape, seed=1)
        flipped = _gaussian_heatmaps(shape, seed=2)
        affine_np = _box_affines(H, W, seed=3)
        affine = torch.from_numpy(affine_np).to(torch.float32)
        hm_px = float(np.abs(affine_np[:, :, :2]).sum(axis=2).max())  # image px per heatmap px
        _input_cache[key] = {
            "heatmaps": hm.to(device=device, dtype=dtype).contiguous(),
            "flipped": flipped.to(device=device, dtype=dtype).contiguous(),
            "affine": affine.to(device),
            "affine_np": affine_np,
            "image_px_per_heatmap_px": hm_px,
        }
    return _input_cache[key]


# --------------------------------------------------------------------------- baselines
def _to_host_f32(t: torch.Tensor) -> np.ndarray:
    # What the official code does with the network output: copy it to the host as numpy.
    arr = t.detach().cpu().numpy()
    return arr if arr.dtype == np.float32 else arr.astype(np.float32)


def _numpy_decode_fn(mode: str, heatmaps: torch.Tensor, affine_np: np.ndarray):
    if mode in ("argmax", "quarter"):
        post = mode == "quarter"
        return lambda: anchors.hrnet_get_final_preds(_to_host_f32(heatmaps), affine_np, post_process=post)
    if mode == "dark":
        return lambda: anchors.darkpose_get_final_preds(_to_host_f32(heatmaps), affine_np, kernel=BLUR_KERNEL)
    if mode == "udp":
        return lambda: anchors.mmpose_udp_decode(_to_host_f32(heatmaps), affine_np, kernel=BLUR_KERNEL)
    raise ValueError(mode)


def _numpy_flip_fn(heatmaps: torch.Tensor, flipped: torch.Tensor):
    pairs = [list(p) for p in COCO_FLIP_PAIRS]
    if heatmaps.device.type == "cpu":
        return lambda: torch.from_numpy(
            anchors.hrnet_flip_merge(heatmaps.numpy(), flipped.numpy(), pairs, shift=True)
        )

    def official_gpu():  # HRNet function.validate with FLIP_TEST and SHIFT_HEATMAP
        back = anchors.hrnet_flip_back(flipped.cpu().numpy(), pairs)
        f = torch.from_numpy(back.copy()).to(heatmaps.device)
        f[:, :, :, 1:] = f.clone()[:, :, :, 0:-1]
        out = (heatmaps + f) * 0.5
        torch.cuda.synchronize()
        return out

    return official_gpu


_reference_cache: dict = {}


def _reference(op: str, key, fn):
    if key not in _reference_cache:
        with use_backend("reference"):
            _reference_cache[key] = fn()
    return _reference_cache[key]


def _backend_skip_reason(op: str, backend: str, device: str, args) -> str | None:
    if backend == "numpy":  # the anchors run wherever the test runs (the GPU rows copy to the host)
        return None
    return skip_reason(backend, device, {op: args})


def _cpu_kernel_op(name: str, args: tuple):
    """``torch.ops.mipnet_cpu.<name>`` on arguments converted once: the kernel op alone."""
    op = getattr(torch.ops.mipnet_cpu, name).default
    return lambda: op(*args)


# --------------------------------------------------------------------------- benchmarks
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("device, dtype, backend", list(_cases()))
def test_decode_heatmaps(benchmark, request, device, dtype, backend, mode, shape):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device (torch.cuda.is_available() is False)")
    why = anchors_skip_reason(need_cv2=True)  # the anchors also build the HRNet-style affines
    if why:
        pytest.skip(why)
    data = _inputs(shape, dtype, device)
    hm, affine = data["heatmaps"], data["affine"]
    why = _backend_skip_reason("decode_heatmaps", backend, device, (hm, mode, affine, BLUR_KERNEL))
    if why:
        pytest.skip(why)

    B, K, H, W = shape
    elem = hm.element_size()
    bytes_read = B * K * H * W * elem + affine.numel() * 4
    bytes_written = B * K * 2 * 4 + B * K * 4  # coords [B, K, 2] + scores [B, K], float32
    benchmark.group = f"decode_heatmaps {mode} {shape_id(shape)} {DTYPE_IDS[dtype]} {device}"
    record(
        benchmark, op="decode_heatmaps", backend=backend, mode=mode, device=device,
        device_name=device_name(device), shape=shape_id(shape), dtype=dtype_name(dtype),
        bytes_read=bytes_read, bytes_written=bytes_written, bytes_moved=bytes_read + bytes_written,
        blur_kernel=BLUR_KERNEL if mode in ("dark", "udp") else None,
    )

    if backend == "numpy":
        fn = _numpy_decode_fn(mode, hm, data["affine_np"])
        preds, maxvals = run(benchmark, request, device, backend, fn, bytes_read + bytes_written)
        coords = torch.from_numpy(np.asarray(preds, dtype=np.float64))
        scores = torch.from_numpy(np.asarray(maxvals, dtype=np.float64)).reshape(B, K)
    else:
        def fn():
            return mipnet_kernels.decode_heatmaps(hm, mode, affine, BLUR_KERNEL)

        roof = ("torch.amax(heatmaps, dim=(2, 3))", lambda: torch.amax(hm, dim=(2, 3)))
        kernel = None
        if backend == "cpu":  # the kernel op alone, for the op layer's share of t/roof
            kernel = _cpu_kernel_op("decode_heatmaps", _decode_kernel_args(hm, mode, affine, BLUR_KERNEL))
        with use_backend(backend):
            coords, scores = run(benchmark, request, device, backend, fn, bytes_read + bytes_written,
                                  roof=roof, kernel=kernel)

    ref_coords, ref_scores = _reference(
        "decode_heatmaps", ("decode", mode, shape, dtype, device),
        lambda: mipnet_kernels.decode_heatmaps(hm, mode, affine, BLUR_KERNEL),
    )
    d_coord = (coords.double().cpu() - ref_coords.double().cpu()).abs().max().item()
    d_score = (scores.double().cpu() - ref_scores.double().cpu()).abs().max().item()
    record(benchmark, max_abs_coord_diff_vs_reference=d_coord, max_abs_score_diff_vs_reference=d_score)
    if backend != "numpy":
        tol = COORD_TOL_HM_PX * data["image_px_per_heatmap_px"]
        assert d_coord <= tol, f"{backend} coords differ from the reference by {d_coord:.3g} px (> {tol:.3g})"
        assert d_score <= SCORE_RTOL * ref_scores.abs().max().item() + 1e-6, f"{backend} scores differ by {d_score:.3g}"


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("device, dtype, backend", list(_cases()))
def test_flip_merge(benchmark, request, device, dtype, backend, shape):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device (torch.cuda.is_available() is False)")
    why = anchors_skip_reason(need_cv2=True)
    if why:
        pytest.skip(why)
    data = _inputs(shape, dtype, device)
    hm, flipped = data["heatmaps"], data["flipped"]
    index = flip_index_from_pairs(COCO_FLIP_PAIRS, shape[1])
    why = _backend_skip_reason("flip_merge", backend, device, (hm, flipped, index, True))
    if why:
        pytest.skip(why)

    B, K, H, W = shape
    nbytes = B * K * H * W * hm.element_size()
    benchmark.group = f"flip_merge shift {shape_id(shape)} {DTYPE_IDS[dtype]} {device}"
    record(
        benchmark, op="flip_merge", backend=backend, mode="shift", device=device,
        device_name=device_name(device), shape=shape_id(shape), dtype=dtype_name(dtype),
        bytes_read=2 * nbytes, bytes_written=nbytes, bytes_moved=3 * nbytes,
    )

    if backend == "numpy":
        fn = _numpy_flip_fn(hm, flipped)
        out = run(benchmark, request, device, backend, fn, 3 * nbytes)
    else:
        def fn():
            return mipnet_kernels.flip_merge(hm, flipped, COCO_FLIP_PAIRS, shift=True)

        # The roof allocates its output as flip_merge does: with out= it would not pay the
        # allocator's fresh pages, which near the L3 size cost ~15 % (48x17x64x48 fp32, 1
        # thread, Zen 5 VM: torch.add out= 355 us, allocating 410 us).
        roof = ("torch.add(heatmaps, flipped)", lambda: torch.add(hm, flipped))
        kernel = None
        if backend == "cpu":
            kernel = _cpu_kernel_op("flip_merge", _flip_kernel_args(
                hm, flipped, _flip_index(COCO_FLIP_PAIRS, hm.shape[1]), True))
        with use_backend(backend):
            out = run(benchmark, request, device, backend, fn, 3 * nbytes, roof=roof, kernel=kernel)

    ref = _reference(
        "flip_merge", ("flip", shape, dtype, device),
        lambda: mipnet_kernels.flip_merge(hm, flipped, COCO_FLIP_PAIRS, shift=True),
    )
    diff = (out.float().cpu() - ref.float().cpu()).abs().max().item()
    record(benchmark, max_abs_diff_vs_reference=diff)
    if backend != "numpy":
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        assert diff <= tol * max(1.0, ref.float().abs().max().item()), f"{backend} flip_merge differs by {diff:.3g}"
