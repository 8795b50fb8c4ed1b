"""Triton kernels of greedy OKS-NMS and soft OKS-NMS over many images in one call.

Contract: ``oks_nms_sorted`` / ``soft_oks_nms_sorted`` in ``csrc/schemas.h``.  The rows are
already sorted by (image, score descending); image ``i`` owns rows
``offsets[i] .. offsets[i+1]-1``; ``vis_threshold`` NaN means "every joint counts".  OKS as in
ARCHITECTURE.md (HRNet / MMPose ``oks_iou``): for rows ``a, b`` and joint ``k``,
``e_k = d_k^2 / (2 sigma_k)^2 / ((area_a + area_b)/2 + eps) / 2`` and ``oks = mean exp(-e_k)``
over the joints that count (``oks = 0`` when none does), computed in the inputs' dtype
(float32 or float64).  Everything runs on the device the tensors live on; under
``TRITON_INTERPRET=1`` the same kernels run on CPU tensors.

Hard NMS (``oks_nms_sorted_triton``): all images in one launch of ``_nms_small_kernel``,
one program per image.  Greedy NMS is sequential inside an image (whether row ``j`` is kept
depends on every earlier decision), so the parallelism is across images and, inside an image,
across the candidate rows a kept row is compared with.  Two paths, picked per image by size:

* small images (``n <= crossover`` rows; the real distribution: 1-300 candidates per image):
  the program holds the image's ``alive`` flags in registers (``BLOCK`` lanes, the largest
  small image rounded up to a power of two) and runs the greedy scan row-vs-all: take the
  next alive row (one ``min`` reduction, so suppressed rows cost nothing), keep it, compute
  its OKS against every later alive row (joints in chunks of ``KC``: a ``[BLOCK, KC]`` tile
  per step), clear the rows above the threshold.  Kept rows are exactly the rows still alive
  at the end.  Work is ``kept * n * K`` instead of the ``n^2 * K`` of a full OKS matrix; the
  image's keypoints are re-read per kept row from L1/L2 (a 300-row image of 17 joints is
  61 KB in float32).
* large images (``n > crossover``; crowded scenes with thousands of candidates): the small
  kernel only registers the image in a compact list (an atomic counter), then
  ``_nms_mask_kernel`` computes the upper triangle of the ``OKS > threshold`` matrix as
  64-bit words, one 64x64 tile per program over a 2-D grid of (row block, column block)
  per large image, so the quadratic part runs on the whole GPU, and ``_nms_scan_kernel``
  (one program per large image) does the sequential greedy scan over the words: for each
  row not yet removed, keep it and OR its word row into the ``removed`` bits (held in
  registers).  This is the bitmask technique of the "Faster R-CNN" GPU NMS (as in
  torchvision's ``nms_kernel.cu``), written here for OKS and with the scan on the GPU.

``crossover`` (``CROSSOVER_ROWS``) trades the small path's serial ``kept``-long chain per
image against the bitmask path's ``n^2 / 2`` OKS evaluations; the GPU benchmark decides it.

Sync-free: nothing is copied to the host except, when ``max_segment`` (the largest image's
row count, which sizes ``BLOCK`` and the mask grid) is not given, one ``.item()`` to compute
it.  Pass ``max_segment`` (an upper bound is fine) to keep a pipeline free of syncs.  The
number of large images is bounded on the host by ``min(I, M // (crossover + 1))``; programs
beyond the real count (read on the device) exit at once.  The mask buffer holds
``M x ceil(max_segment / 64)`` words (8 bytes each) and is only allocated when some image
may be large.

Soft NMS (``soft_oks_nms_sorted_triton``): one program per image, iterative argmax over the
current scores (ties: the lower row) with the rescoring fused into the same pass over the
image in ``CHUNK``-row chunks, so any image size works (the work is ``picks * n * K``: fine
for images of up to a few thousand rows).  The current scores and ranks live in the output
tensors; a barrier closes every pass.

The kernels are launched with ``enable_fp_fusion=False`` (no multiply-add contraction: the
OKS rounds like the reference's separate operations; the cost is nil next to the ``exp``).
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _math
from ._launch import launch, num_warps

#: Largest image (rows) that takes the small, register-resident path; larger ones take the
#: bitmask path.  Placeholder until the GPU benchmark (benchmarks/, crowded vs COCO-like
#: workloads) measures where the bitmask path starts to win; tests override it per call.
CROSSOVER_ROWS = 512
#: Rows per chunk of the soft-NMS pass (the whole image when smaller).
SOFT_CHUNK_ROWS = 256
#: Elements of the small kernel's ``[BLOCK, KC]`` OKS tile (joint chunk ``KC``).
_TILE_ELEMS = 4096
#: Joints per chunk at most.
_MAX_JOINT_CHUNK = 32
_MIN_BLOCK = 16
_WORD = 64  # bits per mask word = rows of a mask tile side
#: numpy.spacing(1), as in HRNet's oks_iou (a constexpr: read inside the kernels).
_EPS = tl.constexpr(2.220446049250313e-16)
_GAUSSIAN, _LINEAR = 0, 1


def _device_guard(t: Tensor):
    # Triton launches on the current CUDA device; make it the tensor's device.
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


# --------------------------------------------------------------------------- jit helpers
@triton.jit
def _rescale(s, f):
    """A score times its soft-NMS factor; inf * 0 -> 0 for +inf, -inf for -inf (the rule of
    every backend, csrc/cpu/nms_kernel.cpp rescale)."""
    p = s * f
    return tl.where(p != p, tl.where(s > 0.0, 0.0, s), p)


@triton.jit
def _oks_vs_row(
    kp_ptr,  # keypoints, shape (M, K, 3), contiguous, float32/float64
    sig_ptr,  # sigmas, shape (K,), keypoints' dtype
    p,  # global row of the pivot (int64 scalar)
    rows,  # global rows compared with it, shape (BLOCK,), int64
    live,  # which of ``rows`` to compute, shape (BLOCK,)
    area_p,  # pivot's area (scalar)
    area,  # areas of ``rows``, shape (BLOCK,)
    K,
    vis,  # visibility threshold in the keypoints' dtype (read iff HAS_VIS)
    HAS_VIS: tl.constexpr,
    KC: tl.constexpr,  # joints per chunk (power of two)
):
    """OKS of row ``p`` with each of ``rows`` (0 where not ``live``), shape (BLOCK,)."""
    half_inv = _math.div(0.5, (area_p + area) * 0.5 + _EPS)  # 1 / ((a_p + a_j) / 2 + eps) / 2
    acc = tl.zeros_like(half_inv)
    cnt = tl.zeros(half_inv.shape, tl.int32)
    stride = 3 * K
    for k0 in range(0, K, KC):
        ks = k0 + tl.arange(0, KC)
        km = ks < K
        sg = tl.load(sig_ptr + ks, mask=km, other=1.0)
        inv_var = _math.div(1.0, 4.0 * sg * sg)  # 1 / (2 sigma)^2
        pk = kp_ptr + p * stride + 3 * ks
        px = tl.load(pk, mask=km, other=0.0)
        py = tl.load(pk + 1, mask=km, other=0.0)
        m2 = live[:, None] & km[None, :]
        rk = kp_ptr + rows[:, None] * stride + 3 * ks[None, :]
        dx = tl.load(rk, mask=m2, other=0.0) - px[None, :]
        dy = tl.load(rk + 1, mask=m2, other=0.0) - py[None, :]
        e = (dx * dx + dy * dy) * inv_var[None, :] * half_inv[:, None]
        if HAS_VIS:
            pv = tl.load(pk + 2, mask=km, other=0.0)
            rv = tl.load(rk + 2, mask=m2, other=0.0)
            m2 = m2 & (rv > vis) & (pv > vis)[None, :]
            cnt += tl.sum(m2.to(tl.int32), axis=1)
        acc += tl.sum(tl.where(m2, _math.exp(-e), 0.0), axis=1)
    if HAS_VIS:
        oks = tl.where(cnt > 0, _math.div(acc, tl.maximum(cnt, 1).to(acc.dtype)), 0.0)
    else:
        oks = _math.div(acc, tl.full([], K, acc.dtype))
    return tl.where(live, oks, 0.0)


# --------------------------------------------------------------------------- hard NMS
@triton.jit
def _nms_small_kernel(
    kp_ptr,  # keypoints, shape (M, K, 3), contiguous, float32/float64
    area_ptr,  # areas, shape (M,), keypoints' dtype
    off_ptr,  # image offsets, shape (I + 1,), int64
    sig_ptr,  # sigmas, shape (K,), keypoints' dtype
    keep_ptr,  # output keep flags, shape (M,), bool
    large_ptr,  # output: the large images' ids, shape (>= number of large images,), int32
    nlarge_ptr,  # output: number of large images, shape (1,), int32, zero on entry
    K,
    threshold: tl.float64,  # rounded to the keypoints' dtype in the kernel, as the reference
    vis: tl.float64,
    crossover,  # images with more rows go to the bitmask path
    HAS_VIS: tl.constexpr,
    BLOCK: tl.constexpr,  # >= min(largest image, crossover), power of two
    KC: tl.constexpr,
):
    DT = kp_ptr.dtype.element_ty
    thr = tl.full([], threshold, DT)
    vis_t = tl.full([], vis, DT)
    img = tl.program_id(0)
    start = tl.load(off_ptr + img)
    n = (tl.load(off_ptr + img + 1) - start).to(tl.int32)
    if n > crossover:
        slot = tl.atomic_add(nlarge_ptr, 1)
        tl.store(large_ptr + slot, img)
    else:
        lanes = tl.arange(0, BLOCK)
        rows = start + lanes
        alive = lanes < n
        area = tl.load(area_ptr + rows, mask=alive, other=0.0)
        cur = tl.min(tl.where(alive, lanes, BLOCK))
        while cur < n:  # ``cur`` is alive, hence kept
            later = alive & (lanes > cur)
            p = start + cur
            oks = _oks_vs_row(kp_ptr, sig_ptr, p, rows, later, tl.load(area_ptr + p), area, K, vis_t, HAS_VIS, KC)
            alive = alive & ~(later & (oks > thr))
            cur = tl.min(tl.where(alive & (lanes > cur), lanes, BLOCK))
        tl.store(keep_ptr + rows, alive, mask=lanes < n)


@triton.jit
def _nms_mask_kernel(
    kp_ptr,  # keypoints, shape (M, K, 3), contiguous, float32/float64
    area_ptr,  # areas, shape (M,)
    off_ptr,  # image offsets, shape (I + 1,), int64
    sig_ptr,  # sigmas, shape (K,)
    large_ptr,  # the large images' ids, shape (>= nlarge,), int32
    nlarge_ptr,  # number of large images, shape (1,), int32
    mask_ptr,  # output words, shape (M, NW), uint64: bit c of word (r, w) = OKS(r, 64w + c) > thr
    NW,  # words per row (>= ceil(largest image / 64))
    K,
    threshold: tl.float64,  # rounded to the keypoints' dtype in the kernel, as the reference
    vis: tl.float64,
    HAS_VIS: tl.constexpr,
):
    DT = kp_ptr.dtype.element_ty
    thr = tl.full([], threshold, DT)
    vis_t = tl.full([], vis, DT)
    slot = tl.program_id(0)
    rb = tl.program_id(1)
    cb = tl.program_id(2)
    if (slot < tl.load(nlarge_ptr)) & (cb >= rb):
        img = tl.load(large_ptr + slot)
        start = tl.load(off_ptr + img)
        n = (tl.load(off_ptr + img + 1) - start).to(tl.int32)
        if cb * 64 < n:  # then rb * 64 < n too
            r = rb * 64 + tl.arange(0, 64)
            c = cb * 64 + tl.arange(0, 64)
            rm = r < n
            cm = c < n
            ra = tl.load(area_ptr + start + r, mask=rm, other=0.0)
            ca = tl.load(area_ptr + start + c, mask=cm, other=0.0)
            half_inv = _math.div(0.5, (ra[:, None] + ca[None, :]) * 0.5 + _EPS)
            acc = tl.zeros_like(half_inv)
            cnt = tl.zeros(half_inv.shape, tl.int32)
            rk = kp_ptr + (start + r) * (3 * K)
            ck = kp_ptr + (start + c) * (3 * K)
            # One joint per step: the [64, 64] pair tile is the unit of work, the joint's
            # row and column coordinates are two [64] vectors.
            for k in range(0, K):
                sg = tl.load(sig_ptr + k)
                inv_var = _math.div(1.0, 4.0 * sg * sg)
                rx = tl.load(rk + 3 * k, mask=rm, other=0.0)
                ry = tl.load(rk + 3 * k + 1, mask=rm, other=0.0)
                dx = rx[:, None] - tl.load(ck + 3 * k, mask=cm, other=0.0)[None, :]
                dy = ry[:, None] - tl.load(ck + 3 * k + 1, mask=cm, other=0.0)[None, :]
                t = _math.exp(-((dx * dx + dy * dy) * inv_var * half_inv))
                if HAS_VIS:
                    rv = tl.load(rk + 3 * k + 2, mask=rm, other=0.0)
                    cv = tl.load(ck + 3 * k + 2, mask=cm, other=0.0)
                    ok = (rv > vis_t)[:, None] & (cv > vis_t)[None, :]
                    cnt += ok.to(tl.int32)
                    t = tl.where(ok, t, 0.0)
                acc += t
            if HAS_VIS:
                oks = tl.where(cnt > 0, _math.div(acc, tl.maximum(cnt, 1).to(acc.dtype)), 0.0)
            else:
                oks = _math.div(acc, tl.full([], K, acc.dtype))
            hit = (oks > thr) & (c[None, :] > r[:, None]) & cm[None, :]
            bit = tl.full([64], 1, tl.uint64) << tl.arange(0, 64).to(tl.uint64)
            word = tl.sum(tl.where(hit, bit[None, :], 0), axis=1)  # distinct bits: sum = OR
            tl.store(mask_ptr + (start + r) * NW + cb, word, mask=rm)


@triton.jit
def _nms_scan_kernel(
    off_ptr,  # image offsets, shape (I + 1,), int64
    large_ptr,  # the large images' ids, shape (>= nlarge,), int32
    nlarge_ptr,  # number of large images, shape (1,), int32
    mask_ptr,  # words from _nms_mask_kernel, shape (M, NW), uint64
    keep_ptr,  # output keep flags, shape (M,), bool
    NW,
    NWB: tl.constexpr,  # >= words of the largest image, power of two
):
    slot = tl.program_id(0)
    if slot < tl.load(nlarge_ptr):
        img = tl.load(large_ptr + slot)
        start = tl.load(off_ptr + img)
        n = (tl.load(off_ptr + img + 1) - start).to(tl.int32)
        words = tl.arange(0, NWB)
        bits = tl.arange(0, 64)
        one = tl.full([], 1, tl.uint64)
        removed = tl.zeros([NWB], tl.uint64)  # bit c of word w: row 64w + c is suppressed
        for wb in range(0, tl.cdiv(n, 64)):
            cur = tl.sum(tl.where(words == wb, removed, 0))  # word wb of removed
            kept = tl.zeros([], tl.uint64)
            for b in range(0, tl.minimum(64, n - wb * 64)):
                if ((cur >> b) & one) == 0:
                    kept = kept | (one << b)
                    row = mask_ptr + (start + wb * 64 + b) * NW
                    # Words left of the diagonal were never written: masked out.
                    removed = removed | tl.load(row + words, mask=(words >= wb) & (words < NW), other=0)
                    cur = cur | tl.load(row + wb)
            lanes = wb * 64 + bits
            flags = ((kept >> bits.to(tl.uint64)) & one) != 0
            tl.store(keep_ptr + start + lanes, flags, mask=lanes < n)


# --------------------------------------------------------------------------- soft NMS
@triton.jit
def _soft_nms_kernel(
    kp_ptr,  # keypoints, shape (M, K, 3), contiguous, float32/float64
    area_ptr,  # areas, shape (M,)
    score_ptr,  # scores, shape (M,)
    off_ptr,  # image offsets, shape (I + 1,), int64
    sig_ptr,  # sigmas, shape (K,)
    rank_ptr,  # output pick numbers, shape (M,), int64 (-1: not picked)
    new_ptr,  # output scores, shape (M,), scores' dtype
    K,
    threshold: tl.float64,  # the three rounded to the keypoints' dtype in the kernel
    vis: tl.float64,
    score_threshold: tl.float64,
    max_dets,  # <= 0: no limit
    METHOD: tl.constexpr,  # 0 gaussian, 1 linear
    HAS_VIS: tl.constexpr,
    CHUNK: tl.constexpr,  # rows per chunk (power of two)
    KC: tl.constexpr,
):
    DT = kp_ptr.dtype.element_ty
    thr = tl.full([], threshold, DT)
    vis_t = tl.full([], vis, DT)
    score_thr = tl.full([], score_threshold, DT)
    img = tl.program_id(0)
    start = tl.load(off_ptr + img)
    n = (tl.load(off_ptr + img + 1) - start).to(tl.int32)
    lanes = tl.arange(0, CHUNK)
    # Pass 0: current scores = scores, nothing picked; first argmax (ties: lower row).
    best = tl.full([], float("-inf"), new_ptr.dtype.element_ty)
    best_row = n  # n: none
    for c0 in range(0, n, CHUNK):
        local = c0 + lanes
        m = local < n
        s = tl.load(score_ptr + start + local, mask=m, other=float("-inf"))
        tl.store(new_ptr + start + local, s, mask=m)
        tl.store(rank_ptr + start + local, tl.full([CHUNK], -1, tl.int64), mask=m)
        cmax = tl.max(tl.where(m, s, float("-inf")))
        crow = tl.min(tl.where(m & (s == cmax), local, n))
        take = (crow < n) & ((best_row == n) | (cmax > best))
        best = tl.where(take, cmax, best)
        best_row = tl.where(take, crow, best_row)
    tl.debug_barrier()
    picks = tl.zeros([], tl.int32)
    while (best_row < n) & ((max_dets <= 0) | (picks < max_dets)) & ~(best < score_thr):
        p = start + best_row
        area_p = tl.load(area_ptr + p)
        best = tl.full([], float("-inf"), new_ptr.dtype.element_ty)
        pick = best_row
        best_row = n
        # One pass: mark the pick, rescore the remaining rows against it, next argmax.
        for c0 in range(0, n, CHUNK):
            local = c0 + lanes
            m = local < n
            rank = tl.load(rank_ptr + start + local, mask=m, other=0)
            s = tl.load(new_ptr + start + local, mask=m, other=float("-inf"))
            rest = m & (rank < 0) & (local != pick)
            area = tl.load(area_ptr + start + local, mask=rest, other=0.0)
            oks = _oks_vs_row(kp_ptr, sig_ptr, p, start + local, rest, area_p, area, K, vis_t, HAS_VIS, KC)
            if METHOD == 0:  # gaussian: s * exp(-oks^2 / thr)
                s = tl.where(rest, _rescale(s, _math.exp(-_math.div(oks * oks, thr))), s)
            else:  # linear: s * (1 - oks) where oks >= thr
                s = tl.where(rest & (oks >= thr), _rescale(s, 1.0 - oks), s)
            rank = tl.where(local == pick, picks.to(tl.int64), rank)
            tl.store(new_ptr + start + local, s, mask=m)
            tl.store(rank_ptr + start + local, rank, mask=m)
            cmax = tl.max(tl.where(rest, s, float("-inf")))
            crow = tl.min(tl.where(rest & (s == cmax), local, n))
            take = (crow < n) & ((best_row == n) | (cmax > best))
            best = tl.where(take, cmax, best)
            best_row = tl.where(take, crow, best_row)
        tl.debug_barrier()
        picks += 1


# --------------------------------------------------------------------------- launchers
def _check(keypoints: Tensor, areas: Tensor, offsets: Tensor, sigmas: Tensor, scores: Tensor | None = None) -> None:
    """The schema's contract (cheap checks only: shapes, dtypes, devices, contiguity)."""
    if keypoints.dim() != 3 or keypoints.shape[2] != 3:
        raise ValueError(f"keypoints must have shape [M, K, 3], got {list(keypoints.shape)}")
    dt = keypoints.dtype
    if dt not in (torch.float32, torch.float64):
        raise TypeError(f"keypoints must be float32 or float64, got {dt}")
    M, K, _ = keypoints.shape
    named = {"areas": (areas, (M,)), "sigmas": (sigmas, (K,))}
    if scores is not None:
        named["scores"] = (scores, (M,))
    for name, (t, shape) in named.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
        if t.dtype != dt:
            raise TypeError(f"{name} must have the dtype of keypoints ({dt}), got {t.dtype}")
    if offsets.dtype != torch.int64 or offsets.dim() != 1 or offsets.numel() < 1:
        raise ValueError(f"offsets must be a non-empty 1-D int64 tensor, got {offsets.dtype} {list(offsets.shape)}")
    for name, t in (("keypoints", keypoints), ("areas", areas), ("offsets", offsets), ("sigmas", sigmas)) + (
        (("scores", scores),) if scores is not None else ()
    ):
        if t.device != keypoints.device:
            raise ValueError(f"{name} is on {t.device}, keypoints on {keypoints.device}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if K == 0:
        raise ValueError("keypoints must have at least one joint (K >= 1)")


def _max_segment(offsets: Tensor, max_segment: int | None) -> int:
    """The largest image's row count: ``max_segment`` as given, else one device sync."""
    if max_segment is not None:
        if max_segment < 0:
            raise ValueError(f"max_segment must be >= 0, got {max_segment}")
        return int(max_segment)
    if offsets.numel() < 2:
        return 0
    return int((offsets[1:] - offsets[:-1]).max().item())


def _joint_chunk(rows: int, K: int) -> int:
    return min(triton.next_power_of_2(K), _MAX_JOINT_CHUNK, max(_TILE_ELEMS // rows, 1))


def oks_nms_sorted_triton(
    keypoints: Tensor,
    areas: Tensor,
    offsets: Tensor,
    sigmas: Tensor,
    threshold: float,
    vis_threshold: float,
    *,
    max_segment: int | None = None,
    crossover: int | None = None,
) -> Tensor:
    """Greedy OKS-NMS of every image in one call; ``keep [M]`` bool in the sorted order.

    Args:
        keypoints: ``[M, K, 3]`` (x, y, score) float32/float64, rows sorted by (image,
            score descending).  areas ``[M]``, sigmas ``[K]``: same dtype.
        offsets: ``[I + 1]`` int64, image ``i`` owns rows ``offsets[i] .. offsets[i+1]-1``.
        threshold: a later row is dropped when its OKS with a kept row is ``> threshold``.
        vis_threshold: NaN: all joints count; else only joints with both scores above it.
        max_segment: an upper bound on the rows of one image.  ``None``: computed on the
            host (one device sync); give it to stay sync-free.
        crossover: images with more rows take the bitmask path (default
            ``CROSSOVER_ROWS``; tests and benchmarks override it).
    """
    _check(keypoints, areas, offsets, sigmas)
    M, K, _ = keypoints.shape
    device = keypoints.device
    keep = torch.empty(M, dtype=torch.bool, device=device)
    num_images = offsets.numel() - 1
    if M == 0 or num_images == 0:
        return keep
    crossover = CROSSOVER_ROWS if crossover is None else int(crossover)
    if crossover < 0:
        raise ValueError(f"crossover must be >= 0, got {crossover}")
    longest = min(_max_segment(offsets, max_segment), M)
    has_vis = not math.isnan(vis_threshold)
    vis = 0.0 if not has_vis else float(vis_threshold)
    block = max(triton.next_power_of_2(min(longest, crossover)), _MIN_BLOCK)
    kc = _joint_chunk(block, K)
    # Large images: at most min(I, M // (crossover + 1)); their ids are listed on the device.
    max_large = min(num_images, M // (crossover + 1)) if longest > crossover else 0
    large = torch.empty(max(max_large, 1), dtype=torch.int32, device=device)
    nlarge = torch.zeros(1, dtype=torch.int32, device=device)
    with _device_guard(keypoints):
        launch(
            _nms_small_kernel, (num_images,),
            keypoints, areas, offsets, sigmas, keep, large, nlarge, K, float(threshold), vis, crossover,
            HAS_VIS=has_vis, BLOCK=block, KC=kc, num_warps=num_warps(block * kc), enable_fp_fusion=False,
        )
        if max_large > 0:
            nb = triton.cdiv(longest, _WORD)
            words = torch.empty((M, nb), dtype=torch.uint64, device=device)
            launch(
                _nms_mask_kernel, (max_large, nb, nb),
                keypoints, areas, offsets, sigmas, large, nlarge, words, nb, K, float(threshold), vis,
                # 8 warps: the [64, 64] pair tiles at 16 elements per thread.  At 4 warps
                # ptxas -v (sm_90) spills: float64 with visibility 1588/1116 B, float64 532/480 B,
                # float32 with visibility 80/80 B; at 8 warps none (237-254 registers float64,
                # 153-170 float32), the same 8 resident warps per SM.
                HAS_VIS=has_vis, num_warps=8, enable_fp_fusion=False,
            )
            launch(
                _nms_scan_kernel, (max_large,),
                offsets, large, nlarge, words, keep, nb, NWB=max(triton.next_power_of_2(nb), 2), num_warps=1,
                enable_fp_fusion=False,  # nothing to fuse; explicit to keep Triton >= 3.9 quiet
            )
    return keep


def soft_oks_nms_sorted_triton(
    keypoints: Tensor,
    areas: Tensor,
    scores: Tensor,
    offsets: Tensor,
    sigmas: Tensor,
    method: int,
    threshold: float,
    vis_threshold: float,
    score_threshold: float,
    max_dets: int,
    *,
    max_segment: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Soft OKS-NMS of every image in one launch: ``(rank [M] int64, new_scores [M])``.

    Per image: repeatedly pick the remaining row with the highest current score (ties: the
    lower row), rescore the other remaining rows against it (``method`` 0 gaussian
    ``s * exp(-oks^2 / threshold)``, 1 linear ``s * (1 - oks)`` where ``oks >= threshold``),
    until ``max_dets`` picks (``<= 0``: no limit), nothing remains, or the best current score
    is ``< score_threshold``.  ``rank``: the pick number inside the image or -1;
    ``new_scores``: the score at pick time (unpicked rows: their final current score).
    ``max_segment`` only sizes the chunk (never synced for); other arguments as
    :func:`oks_nms_sorted_triton`.
    """
    _check(keypoints, areas, offsets, sigmas, scores)
    if method not in (_GAUSSIAN, _LINEAR):
        raise ValueError(f"method must be 0 (gaussian) or 1 (linear), got {method}")
    if method == _GAUSSIAN and not threshold > 0:
        raise ValueError(f"threshold (the gaussian's sigma) must be > 0, got {threshold}")
    M, K, _ = keypoints.shape
    device = keypoints.device
    rank = torch.empty(M, dtype=torch.int64, device=device)
    new_scores = torch.empty(M, dtype=scores.dtype, device=device)
    num_images = offsets.numel() - 1
    if M == 0 or num_images == 0:
        return rank, new_scores
    has_vis = not math.isnan(vis_threshold)
    rows = M if max_segment is None else max(min(int(max_segment), M), 1)
    chunk = max(min(triton.next_power_of_2(rows), SOFT_CHUNK_ROWS), _MIN_BLOCK)
    kc = _joint_chunk(chunk, K)
    with _device_guard(keypoints):
        launch(
            _soft_nms_kernel, (num_images,),
            keypoints, areas, scores, offsets, sigmas, rank, new_scores, K, float(threshold),
            0.0 if not has_vis else float(vis_threshold), float(score_threshold), int(max_dets),
            METHOD=int(method), HAS_VIS=has_vis, CHUNK=chunk, KC=kc, num_warps=num_warps(chunk * kc),
            enable_fp_fusion=False,
        )
    return rank, new_scores


__all__ = ["CROSSOVER_ROWS", "oks_nms_sorted_triton", "soft_oks_nms_sorted_triton"]
