"""The NMS ops as ``torch.ops.mipnet.*`` (forward, fake; none is differentiable): validate,
segment, dispatch to the kernel table, put the result back in the caller's order."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._registry import define_op, detached
from .checks import (_check_nms_shapes, _check_num_images, _check_number, _check_oks_iou_args,
                     _check_oks_iou_values, _check_soft_params, _check_values, _check_vis)
from .kernels import _run_hard, _run_soft, _segment_sums
from .reference import compute_dtype, oks_matrix_reference


def _num_images_of(batch_idx: Tensor) -> int:
    return int(batch_idx.max()) + 1


def _dynamic_length() -> int:
    return torch.library.get_ctx().new_dynamic_size()


def _oks_iou_forward(kpts_a: Tensor, areas_a: Tensor, kpts_b: Tensor, areas_b: Tensor, sigmas: Tensor,
                     vis_threshold: Optional[float]) -> Tensor:
    kpts_a, areas_a, kpts_b, areas_b, sigmas = map(detached, (kpts_a, areas_a, kpts_b, areas_b, sigmas))
    _check_oks_iou_args(kpts_a, areas_a, kpts_b, areas_b, sigmas, vis_threshold)
    _check_oks_iou_values(kpts_a, areas_a, kpts_b, areas_b, sigmas)
    dt = compute_dtype(kpts_a, kpts_b)
    return oks_matrix_reference(kpts_a.to(dt), areas_a.to(dt), kpts_b.to(dt), areas_b.to(dt), sigmas.to(dt),
                                vis_threshold)


def _oks_iou_fake(kpts_a, areas_a, kpts_b, areas_b, sigmas, vis_threshold):
    _check_oks_iou_args(kpts_a, areas_a, kpts_b, areas_b, sigmas, vis_threshold)
    return kpts_a.new_empty((kpts_a.shape[0], kpts_b.shape[0]), dtype=compute_dtype(kpts_a, kpts_b))


_oks_iou_op = define_op("oks_iou", _oks_iou_forward, fake=_oks_iou_fake)


def _oks_nms_forward(keypoints: Tensor, scores: Tensor, areas: Tensor, batch_idx: Tensor, sigmas: Tensor,
                     threshold: float, vis_threshold: Optional[float]) -> Tensor:
    keypoints, scores, areas, sigmas = map(detached, (keypoints, scores, areas, sigmas))
    _check_nms_shapes(keypoints, scores, areas, batch_idx, sigmas)
    _check_number(threshold, "threshold", 0.0, 1.0)
    _check_vis(vis_threshold)
    _check_values(keypoints, scores, areas, batch_idx, sigmas)
    if keypoints.shape[0] == 0:
        return batch_idx.new_empty((0,))
    order, _, _, keep = _run_hard(keypoints, scores, areas, batch_idx, _num_images_of(batch_idx), sigmas,
                                  threshold, vis_threshold)
    return order[keep]


def _oks_nms_fake(keypoints, scores, areas, batch_idx, sigmas, threshold, vis_threshold):
    _check_nms_shapes(keypoints, scores, areas, batch_idx, sigmas)
    return batch_idx.new_empty((_dynamic_length(),))


_oks_nms_op = define_op("oks_nms", _oks_nms_forward, fake=_oks_nms_fake)


def _oks_nms_mask_forward(keypoints: Tensor, scores: Tensor, areas: Tensor, batch_idx: Tensor, num_images: int,
                          sigmas: Tensor, threshold: float, vis_threshold: Optional[float],
                          validate: bool) -> tuple[Tensor, Tensor]:
    keypoints, scores, areas, sigmas = map(detached, (keypoints, scores, areas, sigmas))
    _check_nms_shapes(keypoints, scores, areas, batch_idx, sigmas)
    _check_num_images(num_images, keypoints.shape[0])
    _check_number(threshold, "threshold", 0.0, 1.0)
    _check_vis(vis_threshold)
    if validate:
        _check_values(keypoints, scores, areas, batch_idx, sigmas, num_images)
    M = keypoints.shape[0]
    if M == 0:
        return batch_idx.new_zeros((0,), dtype=torch.bool), batch_idx.new_zeros((num_images,))
    if not validate:
        batch_idx = batch_idx.clamp(0, num_images - 1)
    order, _, offsets, keep = _run_hard(keypoints, scores, areas, batch_idx, num_images, sigmas, threshold,
                                        vis_threshold)
    mask = torch.empty_like(keep).index_copy_(0, order, keep)
    return mask, _segment_sums(keep, offsets)


def _oks_nms_mask_fake(keypoints, scores, areas, batch_idx, num_images, sigmas, threshold, vis_threshold, validate):
    _check_nms_shapes(keypoints, scores, areas, batch_idx, sigmas)
    _check_num_images(num_images, keypoints.shape[0])
    return (batch_idx.new_empty((keypoints.shape[0],), dtype=torch.bool), batch_idx.new_empty((num_images,)))


_oks_nms_mask_op = define_op("oks_nms_mask", _oks_nms_mask_forward, fake=_oks_nms_mask_fake)


def _check_soft_op_args(keypoints, scores, areas, batch_idx, sigmas, method, threshold, vis_threshold,
                        score_threshold, max_dets) -> None:
    _check_nms_shapes(keypoints, scores, areas, batch_idx, sigmas)
    _check_soft_params(method, threshold, score_threshold, max_dets)
    _check_vis(vis_threshold)


def _soft_oks_nms_forward(keypoints: Tensor, scores: Tensor, areas: Tensor, batch_idx: Tensor, sigmas: Tensor,
                          method: str, threshold: float, vis_threshold: Optional[float], score_threshold: float,
                          max_dets: Optional[int]) -> tuple[Tensor, Tensor]:
    keypoints, scores, areas, sigmas = map(detached, (keypoints, scores, areas, sigmas))
    _check_soft_op_args(keypoints, scores, areas, batch_idx, sigmas, method, threshold, vis_threshold,
                        score_threshold, max_dets)
    _check_values(keypoints, scores, areas, batch_idx, sigmas)
    M, dt = keypoints.shape[0], compute_dtype(keypoints)
    if M == 0:
        return batch_idx.new_empty((0,)), keypoints.new_empty((0,), dtype=dt)
    order, image, _, rank, new = _run_soft(keypoints, scores, areas, batch_idx, _num_images_of(batch_idx),
                                           sigmas, method, threshold, vis_threshold, score_threshold, max_dets)
    picked = (rank >= 0).nonzero().squeeze(1)
    rows = picked[torch.argsort(image[picked] * M + rank[picked])]  # by image, then pick order
    return order[rows], new[rows]


def _soft_oks_nms_fake(keypoints, scores, areas, batch_idx, sigmas, method, threshold, vis_threshold, score_threshold, max_dets):
    _check_soft_op_args(keypoints, scores, areas, batch_idx, sigmas, method, threshold, vis_threshold,
                        score_threshold, max_dets)
    n = _dynamic_length()
    return batch_idx.new_empty((n,)), keypoints.new_empty((n,), dtype=compute_dtype(keypoints))


_soft_oks_nms_op = define_op("soft_oks_nms", _soft_oks_nms_forward, fake=_soft_oks_nms_fake)


def _soft_oks_nms_mask_forward(keypoints: Tensor, scores: Tensor, areas: Tensor, batch_idx: Tensor, num_images: int,
                               sigmas: Tensor, method: str, threshold: float, vis_threshold: Optional[float],
                               score_threshold: float, max_dets: Optional[int],
                               validate: bool) -> tuple[Tensor, Tensor, Tensor]:
    keypoints, scores, areas, sigmas = map(detached, (keypoints, scores, areas, sigmas))
    _check_soft_op_args(keypoints, scores, areas, batch_idx, sigmas, method, threshold, vis_threshold,
                        score_threshold, max_dets)
    _check_num_images(num_images, keypoints.shape[0])
    if validate:
        _check_values(keypoints, scores, areas, batch_idx, sigmas, num_images)
    M, dt = keypoints.shape[0], compute_dtype(keypoints)
    if M == 0:
        return (batch_idx.new_empty((0,)), keypoints.new_empty((0,), dtype=dt), batch_idx.new_zeros((num_images,)))
    if not validate:
        batch_idx = batch_idx.clamp(0, num_images - 1)
    order, _, offsets, rank, new = _run_soft(keypoints, scores, areas, batch_idx, num_images, sigmas, method,
                                             threshold, vis_threshold, score_threshold, max_dets)
    return (
        torch.empty_like(rank).index_copy_(0, order, rank),
        torch.empty_like(new).index_copy_(0, order, new),
        _segment_sums(rank >= 0, offsets),
    )


def _soft_oks_nms_mask_fake(keypoints, scores, areas, batch_idx, num_images, sigmas, method, threshold, vis_threshold, score_threshold,
                            max_dets, validate):
    _check_soft_op_args(keypoints, scores, areas, batch_idx, sigmas, method, threshold, vis_threshold,
                        score_threshold, max_dets)
    _check_num_images(num_images, keypoints.shape[0])
    M = keypoints.shape[0]
    return (batch_idx.new_empty((M,)), keypoints.new_empty((M,), dtype=compute_dtype(keypoints)),
            batch_idx.new_empty((num_images,)))


_soft_oks_nms_mask_op = define_op("soft_oks_nms_mask", _soft_oks_nms_mask_forward, fake=_soft_oks_nms_mask_fake)
