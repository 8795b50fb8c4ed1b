"""The OKS and the sorted-NMS kernel contracts in PyTorch: the specification every backend
matches (csrc/schemas.h ``oks_nms_sorted`` / ``soft_oks_nms_sorted``; the formulas are in
:mod:`mipnet_kernels.ops.nms`)."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

OKS_EPS = 2.220446049250313e-16
METHODS = ("gaussian", "linear")
#: Method ids of the kernels (csrc/schemas.h).
METHOD_ID = {"gaussian": 0, "linear": 1}



def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 when any of ``tensors`` (the keypoints) is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


# --------------------------------------------------------------------------- reference
#: Elements of the [rows, n, K] OKS temporaries of the reference, per chunk of rows.
_REF_CHUNK_ELEMS = 1 << 22


def oks_matrix_reference(ka: Tensor, aa: Tensor, kb: Tensor, ab: Tensor, sigmas: Tensor,
                         vis_threshold: Optional[float]) -> Tensor:
    """``[Ma, Mb]`` OKS in the dtype of the (already converted) inputs; the op's specification."""
    vars_ = (sigmas * 2) ** 2
    xa, ya, va = (c.contiguous() for c in ka.unbind(-1))
    xb, yb, vb = (c.contiguous() for c in kb.unbind(-1))
    out = []
    step = max(1, _REF_CHUNK_ELEMS // max(1, kb.shape[0] * ka.shape[1]))
    for r0 in range(0, ka.shape[0], step):
        sl = slice(r0, r0 + step)
        s = (aa[sl, None] + ab[None, :]) / 2 + OKS_EPS
        # t = exp(-((dx^2 + dy^2) / vars / s / 2)), in place, in HRNet's order of operations
        t = xb[None, :, :] - xa[sl, None, :]
        dy = yb[None, :, :] - ya[sl, None, :]
        t.mul_(t).add_(dy.mul_(dy)).div_(vars_).div_(s[..., None]).div_(2).neg_().exp_()
        if vis_threshold is None:
            out.append(t.sum(-1) / t.shape[-1])
        else:
            both = (va[sl, None, :] > vis_threshold) & (vb[None, :, :] > vis_threshold)
            count = both.sum(-1)
            total = t.mul_(both).sum(-1)  # exp(-e) is finite: masking by multiplication is exact
            out.append(torch.where(count > 0, total / count.clamp_min(1), 0))
    if not out:
        return ka.new_zeros((ka.shape[0], kb.shape[0]))
    return torch.cat(out)


def _vis_or_none(vis_threshold: float) -> Optional[float]:
    return None if math.isnan(vis_threshold) else vis_threshold


def oks_nms_sorted_reference(keypoints: Tensor, areas: Tensor, offsets: Tensor, sigmas: Tensor,
                             threshold: float, vis_threshold: float) -> Tensor:
    """The ``oks_nms_sorted`` kernel contract in PyTorch, one image at a time.

    Per image: ``S[i, j] = oks(i, j) > threshold`` for ``i < j`` (sorted rows), then the
    greedy keep vector as the fixed point of ``keep[j] = not any_i<j (keep[i] and S[i, j])``,
    iterated with a matmul from ``keep = all``: after t rounds the first t rows are final,
    and the system has one solution -- the greedy scan -- so the first repeat is the answer
    (a few rounds on real data: the depth of suppression chains).
    """
    keep = torch.ones(keypoints.shape[0], dtype=torch.bool, device=keypoints.device)
    vis = _vis_or_none(vis_threshold)
    bounds = offsets.tolist()
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if hi - lo < 2:
            continue
        kp, ar = keypoints[lo:hi], areas[lo:hi]
        oks = oks_matrix_reference(kp, ar, kp, ar, sigmas, vis)
        # (the Python threshold is compared in the OKS dtype, as the kernels do)
        S = torch.triu(oks > threshold, diagonal=1).to(torch.float32)
        k = torch.ones(hi - lo, dtype=torch.bool, device=keypoints.device)
        while True:
            new = (k.to(torch.float32) @ S) == 0
            if torch.equal(new, k):
                break
            k = new
        keep[lo:hi] = k
    return keep


def _rescale(s: Tensor, f: Tensor) -> Tensor:
    """A score times its soft-NMS factor; ``inf * 0`` (NaN) -> 0 for +inf, -inf for -inf, as
    every backend does (csrc/cpu/nms_kernel.cpp ``rescale``)."""
    p = s * f
    return torch.where(torch.isnan(p), torch.where(s > 0, torch.zeros_like(s), s), p)


def soft_oks_nms_sorted_reference(keypoints: Tensor, areas: Tensor, scores: Tensor, offsets: Tensor,
                                  sigmas: Tensor, method: int, threshold: float, vis_threshold: float,
                                  score_threshold: float, max_dets: int) -> tuple[Tensor, Tensor]:
    """The ``soft_oks_nms_sorted`` kernel contract in PyTorch, one image at a time."""
    M = keypoints.shape[0]
    rank = torch.full((M,), -1, dtype=torch.int64, device=keypoints.device)
    new_scores = scores.clone()
    vis = _vis_or_none(vis_threshold)
    bounds = offsets.tolist()
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        n = hi - lo
        if n == 0:
            continue
        kp, ar = keypoints[lo:hi], areas[lo:hi]
        oks = oks_matrix_reference(kp, ar, kp, ar, sigmas, vis)
        cur = scores[lo:hi].clone()
        alive = torch.ones(n, dtype=torch.bool, device=kp.device)
        picks = n if max_dets <= 0 else min(n, max_dets)
        final = cur.clone()  # the score each row has at its pick, or when the loop stops
        for p in range(picks):
            # First maximum among the rows still alive (lower row on ties).  Masking the dead
            # rows with -inf instead would tie with alive -inf scores and pick a row twice.
            rows = alive.nonzero().flatten()
            best = int(rows[cur[rows].argmax()])
            if bool(cur[best] < score_threshold):
                break
            rank[lo + best] = p
            final[best] = cur[best]
            alive[best] = False
            o = oks[best]
            if method == METHOD_ID["gaussian"]:
                rescored = _rescale(cur, torch.exp(-(o * o) / threshold))
            else:
                rescored = torch.where(o >= threshold, _rescale(cur, 1 - o), cur)
            cur = torch.where(alive, rescored, cur)
        new_scores[lo:hi] = torch.where(alive, cur, final)
    return rank, new_scores
