"""How the NMS ops reach the kernels: the kernel tables of ``oks_nms_sorted`` /
``soft_oks_nms_sorted`` (one kernel per backend) and the segmentation that turns the
candidates of many images into the sorted rows + offsets those kernels take."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..._backends import Kernel, define_kernels, dispatch
from ...keypoints import COCO_SIGMAS
from .reference import METHOD_ID, compute_dtype, oks_nms_sorted_reference, soft_oks_nms_sorted_reference

# --------------------------------------------------------------------------- kernel tables
def _example_sorted(device):
    g = torch.Generator().manual_seed(0)
    kp = (torch.rand(64, 17, 3, generator=g) * 100).to(device)
    areas = torch.full((64,), 2000.0, device=device)
    offsets = torch.tensor([0, 10, 40, 64], device=device)
    sigmas = torch.tensor(COCO_SIGMAS, dtype=torch.float32, device=device)
    return kp, areas, offsets, sigmas, 0.9, math.nan


def _example_soft(device):
    kp, areas, offsets, sigmas, thr, vis = _example_sorted(device)
    scores = torch.linspace(1, 0.1, 64, device=device)
    return kp, areas, scores, offsets, sigmas, METHOD_ID["gaussian"], thr, vis, 0.0, 20


# The backends see sorted rows + segment offsets only (csrc/schemas.h oks_nms_sorted /
# soft_oks_nms_sorted): the compiled ops (csrc/cpu/nms_kernel.cpp, csrc/cuda/nms_kernel.cu)
# and the Triton launchers (triton/nms.py) take exactly the reference's arguments.  The op
# layer has converted every float to the compute dtype, float32 or float64.
_COMPUTE_DTYPES = (torch.float32, torch.float64)
OKS_NMS_SORTED_KERNELS = define_kernels(
    "oks_nms_sorted", ("keypoints", "areas", "offsets", "sigmas", "threshold", "vis_threshold"),
    tensor_args=("keypoints", "areas", "sigmas"), example_inputs=_example_sorted,
    reference=oks_nms_sorted_reference,
    cpu=Kernel(symbol="oks_nms_sorted", dtypes=_COMPUTE_DTYPES),
    cuda=Kernel(symbol="oks_nms_sorted", dtypes=_COMPUTE_DTYPES),
    triton=Kernel(symbol="oks_nms_sorted_triton", dtypes=_COMPUTE_DTYPES),
)
SOFT_OKS_NMS_SORTED_KERNELS = define_kernels(
    "soft_oks_nms_sorted",
    ("keypoints", "areas", "scores", "offsets", "sigmas", "method", "threshold", "vis_threshold",
     "score_threshold", "max_dets"),
    tensor_args=("keypoints", "areas", "scores", "sigmas"), example_inputs=_example_soft,
    reference=soft_oks_nms_sorted_reference,
    cpu=Kernel(symbol="soft_oks_nms_sorted", dtypes=_COMPUTE_DTYPES),
    cuda=Kernel(symbol="soft_oks_nms_sorted", dtypes=_COMPUTE_DTYPES),
    triton=Kernel(symbol="soft_oks_nms_sorted_triton", dtypes=_COMPUTE_DTYPES),
)


# --------------------------------------------------------------------------- segmentation
def _segment(scores: Tensor, batch_idx: Tensor, num_images: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(order, image_of_row, offsets)``: rows grouped by ascending image, inside an image by
    descending score, ties by lower index (two stable sorts); ``offsets [num_images + 1]``.
    No host synchronisation."""
    by_score = torch.sort(scores, descending=True, stable=True).indices
    # The ids are sorted as float64 (exact below 2**53): torch's int64 CPU sort was 4-5x
    # slower at 200,000 rows (torch 2.13, 2 threads).
    by_image = torch.sort(batch_idx[by_score].to(torch.float64), stable=True)
    order = by_score[by_image.indices]
    bounds = torch.arange(num_images + 1, dtype=torch.float64, device=scores.device)
    offsets = torch.searchsorted(by_image.values, bounds)
    return order, by_image.values.to(torch.int64), offsets


def _sorted_inputs(keypoints, scores, areas, order, dtype):
    return (
        keypoints.index_select(0, order).to(dtype).contiguous(),
        scores.index_select(0, order).to(dtype).contiguous(),
        areas.index_select(0, order).to(dtype).contiguous(),
    )


def _vis_arg(vis_threshold: Optional[float]) -> float:
    return math.nan if vis_threshold is None else float(vis_threshold)


def _segment_sums(flags: Tensor, offsets: Tensor) -> Tensor:
    """Per image, the number of true ``flags`` (sorted rows) -- without a sync."""
    cs = torch.zeros(flags.shape[0] + 1, dtype=torch.int64, device=flags.device)
    torch.cumsum(flags.to(torch.int64), 0, out=cs[1:])
    return cs[offsets[1:]] - cs[offsets[:-1]]


def _run_hard(keypoints, scores, areas, batch_idx, num_images, sigmas, threshold, vis_threshold):
    """``(order, image_of_row, offsets, keep_sorted)`` for M > 0."""
    dt = compute_dtype(keypoints)
    order, image, offsets = _segment(scores, batch_idx, num_images)
    kp, _, ar = _sorted_inputs(keypoints, scores, areas, order, dt)
    keep = dispatch("oks_nms_sorted", keypoints.device, kp, ar, offsets, sigmas.to(dt).contiguous(),
                              float(threshold), _vis_arg(vis_threshold))
    return order, image, offsets, keep


def _run_soft(keypoints, scores, areas, batch_idx, num_images, sigmas, method, threshold, vis_threshold,
              score_threshold, max_dets):
    """``(order, image_of_row, offsets, rank_sorted, new_scores_sorted)`` for M > 0."""
    dt = compute_dtype(keypoints)
    order, image, offsets = _segment(scores, batch_idx, num_images)
    kp, sc, ar = _sorted_inputs(keypoints, scores, areas, order, dt)
    rank, new = dispatch(
        "soft_oks_nms_sorted", keypoints.device, kp, ar, sc, offsets, sigmas.to(dt).contiguous(),
        METHOD_ID[method], float(threshold), _vis_arg(vis_threshold), float(score_threshold),
        0 if max_dets is None else int(max_dets),
    )
    return order, image, offsets, rank, new
