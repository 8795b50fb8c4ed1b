"""Kernel-level tests of the OKS-NMS kernels (contract: ``csrc/schemas.h``, OKS-NMS section).

The Triton launchers (``mipnet_kernels.triton.nms``) and the CUDA ops
(``torch.ops.mipnet_cuda.oks_nms_sorted`` / ``soft_oks_nms_sorted``) are called directly on
pre-sorted rows and compared with the plain-PyTorch float64 greedy / soft NMS below (the
op-level tests, with sorting and validation, live elsewhere).  Triton runs on CPU tensors
under ``TRITON_INTERPRET=1`` (set by conftest.py without a GPU) with small cases; both
paths are exercised there by forcing the bitmask path with a tiny ``crossover``.  The CUDA
cases (ids ``cuda-cuda-...``, marked ``cuda``: the Makefile's ``sanitize`` target runs them
under compute-sanitizer) force the paths with the test hooks ``MIPNET_OKS_NMS_CROSSOVER``
(rows above which an image takes the bitmask path) and ``MIPNET_OKS_NMS_MASK_WORDS``
(bitmask workspace words per row; 0 sends every large image to the block-greedy fallback).

Float32 kernels are compared with float64 greedy run on the same (float32-valued) inputs;
each case first checks that no decision of the reference lies within ``1e-5`` of a
threshold (a property of the fixed-seed data), so a float32 rounding cannot flip it.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from mipnet_kernels import _extension

HAS_CUDA = torch.cuda.is_available()
EPS = 2.220446049250313e-16
DECISION_MARGIN = 1e-5


# --------------------------------------------------------------------------- float64 spec
def oks_matrix(kp: torch.Tensor, areas: torch.Tensor, sigmas: torch.Tensor, vis: float | None) -> torch.Tensor:
    """OKS of every pair of rows of one image, float64 ``[n, n]`` (HRNet's ``oks_iou``)."""
    kp, areas, sigmas = kp.double(), areas.double(), sigmas.double()
    variances = (2 * sigmas) ** 2
    d2 = (kp[:, None, :, 0] - kp[None, :, :, 0]) ** 2 + (kp[:, None, :, 1] - kp[None, :, :, 1]) ** 2
    mean_area = (areas[:, None] + areas[None, :]) / 2
    e = d2 / variances / (mean_area[..., None] + EPS) / 2
    counted = torch.ones_like(e, dtype=torch.bool)
    if vis is not None:
        visible = kp[..., 2] > vis
        counted = visible[:, None, :] & visible[None, :, :]
    n_counted = counted.sum(-1)
    total = torch.where(counted, torch.exp(-e), 0.0).sum(-1)
    return torch.where(n_counted > 0, total / n_counted.clamp(min=1), 0.0)


def greedy_nms(kp, areas, offsets, sigmas, thr, vis):
    """``(keep [M] bool, margin)``: greedy NMS in row order per image, float64; ``margin`` is
    the smallest ``|oks - thr|`` over the (kept row, later row) pairs that decided something."""
    keep = torch.zeros(kp.shape[0], dtype=torch.bool)
    margin = math.inf
    for s, e in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
        oks = oks_matrix(kp[s:e], areas[s:e], sigmas, vis)
        alive = torch.ones(e - s, dtype=torch.bool)
        for i in range(e - s):
            if alive[i]:
                later = oks[i, i + 1 :]
                gaps = (later - thr).abs()[alive[i + 1 :]]
                if gaps.numel():
                    margin = min(margin, float(gaps.min()))
                alive[i + 1 :] &= ~(later > thr)
        keep[s:e] = alive
    return keep, margin


def soft_nms(kp, areas, scores, offsets, sigmas, method, thr, vis, score_thr, max_dets):
    """``(rank, new_scores, margin)`` of soft OKS-NMS per image, float64; ``margin`` is the
    smallest relative gap of an argmax (best vs runner-up) or ``|oks - thr|`` (linear)."""
    rank = torch.full((kp.shape[0],), -1, dtype=torch.int64)
    new = scores.double().clone()
    margin = math.inf
    for s, e in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
        n = e - s
        oks = oks_matrix(kp[s:e], areas[s:e], sigmas, vis)
        cur = new[s:e].clone()
        remaining = torch.ones(n, dtype=torch.bool)
        picks = 0
        while remaining.any() and (max_dets <= 0 or picks < max_dets):
            vals = torch.where(remaining, cur, -math.inf)
            best = vals.max()
            i = int(torch.nonzero(remaining & (vals == best))[0])
            if remaining.sum() > 1:
                second = torch.where(torch.arange(n) == i, -math.inf, vals).max()
                margin = min(margin, float((best - second) / best.abs().clamp(min=1e-30)))
            margin = min(margin, abs(float(best) - score_thr) / max(abs(score_thr), 1e-30))
            if best < score_thr:
                break
            rank[s + i] = picks
            picks += 1
            remaining[i] = False
            o = oks[i]
            if method == 0:
                cur = torch.where(remaining, cur * torch.exp(-(o**2) / thr), cur)
            else:
                sel = remaining & (o >= thr)
                if remaining.any():
                    margin = min(margin, float((o - thr).abs()[remaining].min()))
                cur = torch.where(sel, cur * (1 - o), cur)
        new[s:e] = cur
    return rank, new, margin


# --------------------------------------------------------------------------- inputs
def clustered_poses(sizes, K, *, seed, dtype):
    """Rows of several images (``sizes`` rows each, in the order given), each image a few
    people with jittered duplicate candidates of very different spreads, so OKS spans (0, 1).
    Returns ``(keypoints [M, K, 3], areas [M], scores [M] descending per image, offsets)``."""
    g = torch.Generator().manual_seed(seed)
    kps, areas, scores = [], [], []
    for n in sizes:
        people = max(1, n // 10)
        centre = torch.rand(people, 1, 2, generator=g, dtype=torch.float64) * 400
        scale = 20 + 80 * torch.rand(people, 1, 1, generator=g, dtype=torch.float64)
        pose = centre + scale * (torch.rand(people, K, 2, generator=g, dtype=torch.float64) - 0.5)
        who = torch.randint(0, people, (n,), generator=g)
        spread = scale[who] * 10 ** (-2.0 + 1.5 * torch.rand(n, 1, 1, generator=g, dtype=torch.float64))
        xy = pose[who] + spread * torch.randn(n, K, 2, generator=g, dtype=torch.float64)
        vis = torch.rand(n, K, 1, generator=g, dtype=torch.float64)
        kps.append(torch.cat([xy, vis], -1))
        areas.append((scale[who].flatten() ** 2) * (0.5 + torch.rand(n, generator=g, dtype=torch.float64)))
        scores.append(torch.sort(torch.rand(n, generator=g, dtype=torch.float64), descending=True).values)
    kp = torch.cat(kps) if kps else torch.zeros(0, K, 3, dtype=torch.float64)
    offsets = torch.tensor([0] + list(sizes), dtype=torch.int64).cumsum(0)
    return kp.to(dtype), torch.cat(areas).to(dtype), torch.cat(scores).to(dtype), offsets


def sigmas_for(K, dtype):
    g = torch.Generator().manual_seed(K)
    return (0.025 + 0.08 * torch.rand(K, generator=g, dtype=torch.float64)).to(dtype)


# --------------------------------------------------------------------------- runners
def _cuda_ops():
    ok, why = _extension.cuda_extension()
    if not ok:
        pytest.skip(f"CUDA extension not loaded: {why}")
    ops = torch.ops.mipnet_cuda
    if not hasattr(ops, "oks_nms_sorted"):
        pytest.skip("mipnet_cuda was built without oks_nms_sorted (rebuild the extension)")
    return ops


def _setup(impl: str, monkeypatch, crossover: int | None, mask_words: int | None = None):
    """Skip unless ``impl`` ('triton-cpu', 'triton-cuda', 'cuda-cuda') runs here; return the
    device and a ``(hard, soft)`` pair of callables with the launchers' signatures."""
    backend, device = impl.split("-")
    if device == "cuda" and not HAS_CUDA:
        pytest.skip("no CUDA device (torch.cuda.is_available() is False)")
    if backend == "triton":
        if device == "cpu" and not _interpreted():
            pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
        pytest.importorskip("triton")
        from mipnet_kernels.triton import oks_nms_sorted_triton, soft_oks_nms_sorted_triton

        def hard(*args):
            return oks_nms_sorted_triton(*args, crossover=crossover)

        return torch.device(device), hard, soft_oks_nms_sorted_triton
    ops = _cuda_ops()
    if crossover is not None:
        monkeypatch.setenv("MIPNET_OKS_NMS_CROSSOVER", str(crossover))
    if mask_words is not None:
        monkeypatch.setenv("MIPNET_OKS_NMS_MASK_WORDS", str(mask_words))
    return torch.device(device), ops.oks_nms_sorted, ops.soft_oks_nms_sorted


def _interpreted() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _impls():
    return [
        pytest.param("triton-cpu", marks=pytest.mark.triton, id="triton-cpu"),
        pytest.param("triton-cuda", marks=[pytest.mark.triton, pytest.mark.cuda], id="triton-cuda"),
        pytest.param("cuda-cuda", marks=pytest.mark.cuda, id="cuda-cuda"),
    ]


IMPLS = _impls()

# (sizes, K, dtype, threshold, vis, crossover): small interpreter-sized cases.  crossover
# None: the default (every image small); 8/16: images above go through the bitmask path
# (70 rows: two 64-bit words per row).  Sizes include empty images (repeated offsets).
HARD_CASES = [
    ((5, 0, 13, 1, 9), 17, torch.float64, 0.9, None, None),
    ((5, 0, 13, 1, 9), 17, torch.float32, 0.5, 0.2, None),
    ((60, 45, 64), 17, torch.float32, 0.7, None, None),
    ((0, 7, 40, 0, 0, 3), 14, torch.float64, 0.3, None, 16),
    ((20, 70, 2), 17, torch.float32, 0.7, None, 16),
    ((70, 11), 14, torch.float32, 0.95, 0.5, 8),
    ((9, 30), 133, torch.float64, 0.6, 0.3, None),
    ((9, 30), 133, torch.float32, 0.8, None, 16),
]


def _case_id(case):
    sizes, K, dtype, thr, vis, cross = case
    return f"n{'_'.join(map(str, sizes))}-K{K}-{str(dtype)[6:]}-thr{thr}-vis{vis}-x{cross}"


@functools.lru_cache(maxsize=16)
def _hard_case(sizes: tuple, K, dtype, thr, vis, seed):
    """Inputs and float64 greedy answer of one case (cached: shared by the implementations)."""
    kp, areas, _, offsets = clustered_poses(sizes, K, seed=seed, dtype=dtype)
    sigmas = sigmas_for(K, dtype)
    return (kp, areas, offsets, sigmas) + greedy_nms(kp, areas, offsets, sigmas, thr, vis)


def _run_hard(impl, monkeypatch, sizes, K, dtype, thr, vis, crossover, *, seed=0, mask_words=None):
    device, hard, _ = _setup(impl, monkeypatch, crossover, mask_words)
    kp, areas, offsets, sigmas, expected, margin = _hard_case(tuple(sizes), K, dtype, thr, vis, seed)
    assert margin > DECISION_MARGIN, f"test data decides within {margin:.2e} of the threshold; change the seed"
    keep = hard(
        kp.to(device), areas.to(device), offsets.to(device), sigmas.to(device), thr,
        math.nan if vis is None else vis,
    )
    assert keep.dtype == torch.bool and keep.shape == (kp.shape[0],) and keep.device.type == device.type
    # Guard against a trivial pass: the data must make NMS keep some rows and drop others.
    assert 0 < int(expected.sum()) < expected.numel()
    assert torch.equal(keep.cpu(), expected), (
        f"keep differs at rows {(keep.cpu() != expected).nonzero().flatten().tolist()}"
    )


@pytest.mark.parametrize("case", HARD_CASES, ids=[_case_id(c) for c in HARD_CASES])
@pytest.mark.parametrize("impl", IMPLS)
def test_oks_nms_matches_greedy(impl, case, monkeypatch):
    _run_hard(impl, monkeypatch, *case)


@pytest.mark.parametrize("impl", IMPLS)
def test_oks_nms_empty(impl, monkeypatch):
    device, hard, soft = _setup(impl, monkeypatch, None)
    for offsets in ([0], [0, 0, 0]):
        kp = torch.zeros(0, 17, 3, device=device)
        empty = torch.zeros(0, device=device)
        off = torch.tensor(offsets, dtype=torch.int64, device=device)
        sig = sigmas_for(17, torch.float32).to(device)
        keep = hard(kp, empty, off, sig, 0.9, math.nan)
        assert keep.shape == (0,) and keep.dtype == torch.bool
        rank, new = soft(kp, empty, empty, off, sig, 0, 0.3, math.nan, 0.0, 20)
        assert rank.shape == (0,) and rank.dtype == torch.int64 and new.shape == (0,)


@pytest.mark.parametrize("crossover", [None, 4])
@pytest.mark.parametrize("impl", IMPLS)
def test_oks_nms_identical_and_single(impl, crossover, monkeypatch):
    """Identical candidates (OKS 1) collapse to the first row; a single row is kept."""
    device, hard, _ = _setup(impl, monkeypatch, crossover)
    K = 17
    pose = torch.rand(1, K, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 100
    kp = torch.cat([pose.expand(9, K, 3), pose + 50]).float()
    areas = torch.full((10,), 900.0)
    offsets = torch.tensor([0, 9, 9, 10])
    sigmas = sigmas_for(K, torch.float32)
    keep = hard(kp.to(device), areas.to(device), offsets.to(device), sigmas.to(device), 0.99, math.nan)
    expected = torch.zeros(10, dtype=torch.bool)
    expected[[0, 9]] = True
    assert torch.equal(keep.cpu(), expected)


# (sizes, K, dtype, method, thr, vis, score_thr, max_dets)
SOFT_CASES = [
    ((6, 0, 11, 1), 17, torch.float64, 0, 0.3, None, 0.0, 20),
    ((6, 0, 11, 1), 17, torch.float32, 1, 0.4, 0.2, 0.0, 0),
    ((25,), 14, torch.float64, 1, 0.6, None, 0.05, 1),
    ((13, 9), 133, torch.float32, 0, 0.5, 0.3, 0.1, 5),
]


def _soft_id(c):
    sizes, K, dtype, method, thr, vis, score_thr, max_dets = c
    return f"n{'_'.join(map(str, sizes))}-K{K}-{str(dtype)[6:]}-m{method}-thr{thr}-vis{vis}-st{score_thr}-md{max_dets}"


@pytest.mark.parametrize("case", SOFT_CASES, ids=[_soft_id(c) for c in SOFT_CASES])
@pytest.mark.parametrize("impl", IMPLS)
def test_soft_oks_nms_matches_reference(impl, case, monkeypatch):
    sizes, K, dtype, method, thr, vis, score_thr, max_dets = case
    device, _, soft = _setup(impl, monkeypatch, None)
    kp, areas, scores, offsets = clustered_poses(sizes, K, seed=1, dtype=dtype)
    sigmas = sigmas_for(K, dtype)
    exp_rank, exp_new, margin = soft_nms(kp, areas, scores, offsets, sigmas, method, thr, vis, score_thr, max_dets)
    assert margin > DECISION_MARGIN, f"test data decides within {margin:.2e}; change the seed"
    rank, new = soft(
        kp.to(device), areas.to(device), scores.to(device), offsets.to(device), sigmas.to(device),
        method, thr, math.nan if vis is None else vis, score_thr, max_dets,
    )
    assert rank.dtype == torch.int64 and new.dtype == dtype
    assert (exp_rank >= 0).any()
    assert torch.equal(rank.cpu(), exp_rank), f"rank {rank.cpu().tolist()} != {exp_rank.tolist()}"
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(new.cpu().double(), exp_new, rtol=rtol, atol=1e-30)


@pytest.mark.parametrize("method", [0, 1])
@pytest.mark.parametrize("impl", IMPLS)
def test_soft_oks_nms_ties_pick_lower_row(impl, method, monkeypatch):
    """Identical poses with equal scores stay tied after every rescoring: picks go in row
    order (the contract's tie rule), each rescored by the OKS of 1 once per earlier pick."""
    device, _, soft = _setup(impl, monkeypatch, None)
    K = 14
    pose = torch.rand(1, K, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 50
    kp, areas = pose.expand(6, K, 3).contiguous(), torch.full((6,), 400.0, dtype=torch.float64)
    scores, offsets = torch.full((6,), 0.8, dtype=torch.float64), torch.tensor([0, 6])
    sigmas = sigmas_for(K, torch.float64)
    thr = 0.5
    exp_rank, exp_new, _ = soft_nms(kp, areas, scores, offsets, sigmas, method, thr, None, 0.0, 4)
    rank, new = soft(
        kp.to(device), areas.to(device), scores.to(device), offsets.to(device), sigmas.to(device),
        method, thr, math.nan, 0.0, 4,
    )
    assert exp_rank.tolist() == [0, 1, 2, 3, -1, -1]
    assert torch.equal(rank.cpu(), exp_rank)
    torch.testing.assert_close(new.cpu(), exp_new, rtol=1e-12, atol=0.0)


# --------------------------------------------------------------------------- GPU-sized
# (impl, crossover, mask_words): the default split; the bitmask path from 65 rows; CUDA's
# in-block fallback when the bitmask workspace is full (0 words); every image of 2+ rows on
# the bitmask path.
GPU_CASES = [
    pytest.param(p.values[0], crossover, words, marks=p.marks, id=f"{p.id}-{name}")
    for p in IMPLS
    if "cuda" in p.id
    for name, crossover, words in (
        ("default", None, None), ("bitmask", 64, None), ("fallback", 64, 0), ("all-bitmask", 1, None)
    )
    if words is None or p.id == "cuda-cuda"
]


@pytest.mark.parametrize("impl, crossover, mask_words", GPU_CASES)
def test_oks_nms_gpu_sizes(impl, crossover, mask_words, monkeypatch):
    """Many images, some above the crossover (up to 700 rows: 11 words per row)."""
    g = torch.Generator().manual_seed(5)
    sizes = [int(v) for v in torch.randint(0, 60, (40,), generator=g)] + [0, 1, 200, 700, 129, 64, 65]
    # Seeds whose data decides nothing within DECISION_MARGIN of the threshold.
    configs = ((17, torch.float32, None, 17), (14, torch.float64, 0.3, 14), (133, torch.float32, 0.2, 1))
    for K, dtype, vis, seed in configs:
        _run_hard(impl, monkeypatch, sizes, K, dtype, 0.7, vis, crossover, seed=seed, mask_words=mask_words)
