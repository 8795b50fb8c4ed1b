"""Benchmarks of batched OKS-NMS (``oks_nms``, ``soft_oks_nms``): every image in one call.

Workloads (K = 17 COCO joints, float32 candidates; see :func:`make_workload`):

* ``coco_val_n2`` -- COCO-val-like: 5,000 images, 100,000 detector boxes (HRNet's load with
  the AP-56 person detections: most images 1-60 boxes, a few hundreds; log-normal sizes),
  doubled by MIPNet's N=2 instances per box to 200,000 candidates;
* ``crowded`` -- 500 images x 1,000 candidates;
* ``small_batch`` -- 24 images x 20 candidates (one online batch).

Per image, ``ceil(boxes / 3)`` people; each box is drawn on one of them and its two
instances are jittered copies (0-15 % of the person's size) of that person and of another
person of the image, so OKS spans 0..1 and thresholds bite as on real data.

Rows (``extra_info``: op, mode = threshold / method, backend, workload, candidates, images):

* ``cpu`` (C++), ``reference`` (vectorised PyTorch per image) on CPU tensors; ``cuda``,
  ``triton``, ``reference`` on CUDA tensors (CUDA-event device time), each through the
  public op with ``use_backend``; ``cuda`` / ``triton`` also time the sync-free mask form
  (mode ``mask``).  A backend that cannot run here is skipped with its reason.
* ``numpy``: the pipeline we beat, HRNet's per-image ``oks_nms`` / ``soft_oks_nms`` from
  ``tests/anchors.py`` (on CUDA input: after a ``.cpu()`` copy).  It and the
  ``reference`` are slow on 1,000-candidate images (minutes for ``crowded``), so they run
  ``crowded_subset`` instead (``NUMPY_CROWDED_IMAGES`` images x 1,000 candidates from the
  same generator), which the CPU backends run too, so each ``x numpy`` compares equal work.

Slow rows (``numpy``; ``reference`` except on ``small_batch``) run once (one round, no
warm-up; ``extra_info["single_run"]``).  Every row's ``keep`` is compared with the ``cpu``
backend's (a gross check: float32 decisions may flip for pairs within ~1e-6 of the
threshold; exactness is the tests' job); the difference is recorded.  Smoke mode
(``--benchmark-disable``) runs each body once on ``small_batch`` and on the first 1 % of
the images of the large workloads, and skips the slow baselines on the crowded ones.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mipnet_kernels
from mipnet_kernels import COCO_SIGMAS, use_backend

from . import _timing
from .common import NO_CUDA, anchors, anchors_skip_reason, device_name, run, skip_reason

K = 17
THRESHOLD = 0.9  # HRNet / MIPNet OKS-NMS threshold
NUMPY_CROWDED_IMAGES = 5
#: name -> (images, boxes per image or None for the COCO-like size distribution, total boxes, N)
WORKLOADS = {
    "coco_val_n2": (5000, None, 100_000, 2),
    "crowded": (500, 500, None, 2),
    "crowded_subset": (NUMPY_CROWDED_IMAGES, 500, None, 2),
    "small_batch": (24, 10, None, 2),
}
LARGE = ("coco_val_n2", "crowded")
BACKENDS = {"cpu": ("cpu", "reference", "numpy"), "cuda": ("cuda", "triton", "reference", "numpy")}


def _coco_like_sizes(rng, images: int, total: int) -> np.ndarray:
    """Boxes per image: log-normal (median ~12, long tail to hundreds), summing to ``total``."""
    sizes = np.clip(np.round(rng.lognormal(2.5, 1.0, images) * total / (images * 20.0)), 1, 600).astype(np.int64)
    while sizes.sum() != total:  # nudge random images until the total is exact
        diff = total - int(sizes.sum())
        idx = rng.integers(0, images, abs(diff))
        np.add.at(sizes, idx, 1 if diff > 0 else -1)
        sizes = np.clip(sizes, 1, None)
    return sizes


def make_workload(name: str, seed: int = 0) -> dict:
    """Candidates of workload ``name``: float32 ``keypoints [M, K, 3]``, ``scores``, ``areas``,
    int64 ``batch_idx`` (rows grouped by box, boxes in image order, as a pipeline emits them)."""
    images, per_image, total, n_inst = WORKLOADS[name]
    rng = np.random.default_rng(seed)
    boxes = _coco_like_sizes(rng, images, total) if per_image is None else np.full(images, per_image)
    people = np.maximum(1, np.ceil(boxes / 3)).astype(np.int64)
    first_person = np.concatenate([[0], np.cumsum(people)[:-1]])
    P = int(people.sum())
    side = rng.uniform(30, 250, P)
    centre = rng.uniform((0, 0), (640, 480), (P, 2))
    base = centre[:, None, :] + side[:, None, None] * rng.normal(0, 0.3, (P, K, 2))
    box_image = np.repeat(np.arange(images), boxes)
    B = box_image.size
    primary = first_person[box_image] + rng.integers(0, people[box_image])
    other = first_person[box_image] + rng.integers(0, people[box_image])
    who = np.stack([primary, other], axis=1)[:, :n_inst].reshape(-1)  # instance-major per box
    M = who.size
    jitter = side[who] * rng.uniform(0, 0.15, M)
    xy = base[who] + jitter[:, None, None] * rng.normal(size=(M, K, 2))
    kp = np.concatenate([xy, rng.uniform(0, 1, (M, K, 1))], axis=2).astype(np.float32)
    return {
        "keypoints": torch.from_numpy(kp),
        "scores": torch.from_numpy(rng.uniform(0, 1, M).astype(np.float32)),
        "areas": torch.from_numpy((side[who] ** 2 * rng.uniform(0.8, 1.2, M)).astype(np.float32)),
        "batch_idx": torch.from_numpy(np.repeat(box_image, n_inst)).long(),
        "images": images,
    }


def _smoke_slice(data: dict, fraction: float = 0.01) -> dict:
    """The first ``fraction`` of the images (smoke mode)."""
    keep_images = max(1, int(data["images"] * fraction))
    rows = data["batch_idx"] < keep_images
    out = {k: v[rows] for k, v in data.items() if k != "images"}
    out["images"] = keep_images
    return out


_input_cache: dict = {}


def _inputs(name: str, device: str, smoke: bool) -> dict:
    key = (name, device, smoke)
    if key not in _input_cache:
        data = make_workload(name)
        if smoke and name in LARGE:
            data = _smoke_slice(data)
        _input_cache[key] = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in data.items()}
    return _input_cache[key]


# --------------------------------------------------------------------------- running
def _skip_reason(backend: str, device: str) -> str | None:
    if backend == "numpy":
        return NO_CUDA if device == "cuda" and not torch.cuda.is_available() else anchors_skip_reason()
    return skip_reason(backend, device, {"oks_nms_sorted": (), "soft_oks_nms_sorted": ()})


def _run(benchmark, request, device: str, backend: str, fn, slow: bool):
    """Time ``fn`` (:func:`benchmarks.common.run`, no warm-up calls); ``slow`` rows run exactly once."""
    return run(benchmark, request, device, backend, fn, single_run=slow, warmup_calls=0)


def _numpy_fn(data: dict, op: str):
    def run():
        kp, sc, ar, b = (data[k].cpu().numpy() for k in ("keypoints", "scores", "areas", "batch_idx"))
        if op == "oks_nms":
            return anchors.hrnet_oks_nms_batched(kp, sc, ar, b, THRESHOLD, COCO_SIGMAS)
        return anchors.hrnet_soft_oks_nms_batched(kp, sc, ar, b, THRESHOLD, COCO_SIGMAS)[0]

    return run


def _op_fn(data: dict, op: str, mode: str):
    args = (data["keypoints"], data["scores"], data["areas"], data["batch_idx"])
    if mode == "mask":
        return lambda: mipnet_kernels.oks_nms_mask(*args, data["images"], threshold=THRESHOLD)
    if op == "oks_nms":
        return lambda: mipnet_kernels.oks_nms(*args, threshold=THRESHOLD)
    return lambda: mipnet_kernels.soft_oks_nms(*args, threshold=THRESHOLD)[0]


#: float32 decisions may flip for pairs whose OKS is within ~1e-6 of the threshold (the
#: tests check exactness on data without such pairs); the benchmarks only catch gross errors.
MAX_KEEP_DIFF_FRACTION = 1e-4
_check_cache: dict = {}


def _checker() -> str:
    """The backend every row's ``keep`` is compared with: the C++ kernel (checked exactly
    against the NumPy anchor by the tests), else the PyTorch reference."""
    return "cpu" if _skip_reason("cpu", "cpu") is None else "reference"


def _check_keep(name: str, smoke: bool, op: str, data: dict) -> torch.Tensor:
    key = (name, smoke, op)
    if key not in _check_cache:
        with use_backend(_checker()):
            cpu_data = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in data.items()}
            _check_cache[key] = _op_fn(cpu_data, op, "index")().cpu()
    return _check_cache[key]


def _cases():
    for device, backends in BACKENDS.items():
        for backend in backends:
            modes = ("index", "mask") if backend in ("cuda", "triton") else ("index",)
            for mode in modes:
                marks = [pytest.mark.cuda] if device == "cuda" else []
                if device == "cuda" and backend != "numpy":
                    marks.append(pytest.mark.benchmark(timer=_timing.CUDA_EVENT_TIMER))
                yield pytest.param(device, backend, mode, id=f"{device}-{backend}-{mode}", marks=marks)


def _workload_cases():
    for name in WORKLOADS:
        for op in ("oks_nms", "soft_oks_nms"):
            if op == "soft_oks_nms" and name == "crowded":
                continue  # soft NMS on 1,000-candidate images: rows of the subset only
            yield pytest.param(name, op, id=f"{op}-{name}")


@pytest.mark.parametrize("name, op", list(_workload_cases()))
@pytest.mark.parametrize("device, backend, mode", list(_cases()))
def test_oks_nms(benchmark, request, device, backend, mode, name, op):
    why = _skip_reason(backend, device)
    if why:
        pytest.skip(why)
    if backend in ("numpy", "reference") and name == "crowded":
        pytest.skip(f"{backend} runs the {NUMPY_CROWDED_IMAGES}-image crowded_subset (minutes otherwise)")
    if mode == "mask" and op != "oks_nms":
        pytest.skip("the mask form is timed for hard NMS")
    if device == "cuda" and name == "crowded_subset" and backend != "numpy":
        pytest.skip("crowded_subset exists for the NumPy comparison on CPU")
    smoke = benchmark.disabled
    slow = backend == "numpy" or (backend == "reference" and name != "small_batch")
    if smoke and slow and name.startswith("crowded"):
        pytest.skip("smoke mode: the slow baselines run on the other workloads (the same code)")
    data = _inputs(name, device, smoke)
    M = int(data["scores"].numel())
    peer_mode = f"thr{THRESHOLD:g}" if op == "oks_nms" else f"gaussian,thr{THRESHOLD:g},max20"
    benchmark.group = f"{op} {name} {device}"
    benchmark.extra_info.update(
        op=op, mode=f"{peer_mode}/mask" if mode == "mask" else peer_mode, peer_mode=peer_mode,
        backend=backend, device=device, workload=name, shape=f"{data['images']}img-{M}",
        dtype="float32", candidates=M, images=data["images"], threshold=THRESHOLD,
        device_name=device_name(device),
        bytes_read=M * (K * 3 + 3) * 4, bytes_written=M * 8, bytes_moved=M * (K * 3 + 5) * 4,
        single_run=slow,
    )
    if backend == "numpy":
        keep = torch.from_numpy(np.asarray(_run(benchmark, request, device, backend, _numpy_fn(data, op), slow)))
    else:
        with use_backend(backend):
            out = _run(benchmark, request, device, backend, _op_fn(data, op, mode), slow)
        keep = out[0].nonzero().squeeze(1) if mode == "mask" else out
    keep = keep.cpu()
    benchmark.extra_info["kept"] = int(keep.numel())
    if backend == _checker() and device == "cpu":
        return
    want = _check_keep(name, smoke, op, data)
    if mode == "index" and op == "oks_nms":
        agree = keep.numel() == want.numel() and torch.equal(keep, want)
    else:
        agree = None  # set comparison below (mask form: input order; soft: exact pick order may differ)
    diff = len(set(keep.tolist()) ^ set(want.tolist()))
    benchmark.extra_info.update(keep_equal_to_checker=agree, keep_diff_vs_checker=diff, checker=_checker())
    assert diff <= max(1, MAX_KEEP_DIFF_FRACTION * M), (
        f"{backend} keeps {diff} candidates differently from {_checker()}")
