"""The outside references: the published code the ops are checked against (tests) and the
pipelines they are timed against (benchmarks), restated in one place so the two never drift.

* **NumPy anchors** for heatmap decoding, the flip test and OKS-NMS, written from the
  published code of HRNet (Sun et al., CVPR 2019, ``lib/core/inference.py`` /
  ``lib/utils/transforms.py``), DarkPose (Zhang et al., CVPR 2020, ``lib/core/inference.py``)
  and MMPose 0.x (``mmpose/core/evaluation/top_down_eval.py`` ``_get_max_preds`` /
  ``post_dark_udp``); OKS-NMS from HRNet's ``lib/nms/nms.py`` (``oks_iou`` / ``oks_nms`` /
  ``soft_oks_nms``), see its section below.  They keep the original structure -- the
  per-joint Python loops included -- because they are also "the pipeline we beat".
* **The official MIPNet layer** (Khirodkar et al., ICCV 2021,
  ``lib/models/pose_hrnet_se_lambda.py`` ``SELambdaLayer``), as a module
  (:class:`OfficialSELambdaLayer`, :func:`official_se_lambda`) and written out in plain
  torch functions (:func:`official_scale`, :func:`official_embed`, :func:`official_mimb`,
  :func:`official_instances`); see its section at the end.

This module deliberately does NOT import ``mipnet_kernels``: it is the outside check of the
ops.  Tests import it as ``anchors`` (``tests/`` is on ``sys.path``), benchmarks through
``benchmarks/common.py``.

Where the original code and our op differ on purpose:

* HRNet/DarkPose ``get_max_preds`` zero the coordinates of a heatmap whose maximum is
  <= 0 and MMPose's ``_get_max_preds`` sets them to -1; ``mipnet_kernels`` does neither
  (the score tells the caller).  Compare only heatmaps with positive maxima.
* HRNet's ``transform_preds`` builds the inverse affine from (center, scale); here the
  ``[2, 3]`` heatmap -> image matrix is an input (``get_affine_transform`` is provided to
  build it the HRNet way).
* MMPose's ``post_dark_udp`` calls ``np.linalg.inv`` unconditionally (a singular matrix
  raises) and ends with ``.squeeze()`` (which breaks for N == 1 or K == 1); here a reshape
  replaces the squeeze.  DarkPose inverts the Hessian only when its determinant is non-zero.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

try:  # OpenCV is what the original code blurs with; the anchors need it for dark/udp.
    import cv2
except ImportError:  # pragma: no cover - opencv is a test dependency
    cv2 = None


def _require_cv2():
    if cv2 is None:
        raise ImportError("anchors: dark/udp anchors need opencv-python(-headless)")


# --------------------------------------------------------------------------- affine (HRNet)
def get_dir(src_point, rot_rad):
    sn, cs = np.sin(rot_rad), np.cos(rot_rad)
    src_result = [0, 0]
    src_result[0] = src_point[0] * cs - src_point[1] * sn
    src_result[1] = src_point[0] * sn + src_point[1] * cs
    return src_result


def get_3rd_point(a, b):
    direct = a - b
    return b + np.array([-direct[1], direct[0]], dtype=np.float32)


def get_affine_transform(center, scale, rot, output_size, shift=np.array([0, 0], dtype=np.float32), inv=0):
    """HRNet ``get_affine_transform``: image -> output (or output -> image with ``inv``), [2, 3] float64."""
    _require_cv2()
    if not isinstance(scale, np.ndarray) and not isinstance(scale, list):
        scale = np.array([scale, scale])
    scale_tmp = np.asarray(scale) * 200.0
    src_w = scale_tmp[0]
    dst_w = output_size[0]
    dst_h = output_size[1]

    rot_rad = np.pi * rot / 180
    src_dir = get_dir([0, src_w * -0.5], rot_rad)
    dst_dir = np.array([0, dst_w * -0.5], np.float32)

    src = np.zeros((3, 2), dtype=np.float32)
    dst = np.zeros((3, 2), dtype=np.float32)
    src[0, :] = center + scale_tmp * shift
    src[1, :] = center + src_dir + scale_tmp * shift
    dst[0, :] = [dst_w * 0.5, dst_h * 0.5]
    dst[1, :] = np.array([dst_w * 0.5, dst_h * 0.5]) + dst_dir
    src[2:, :] = get_3rd_point(src[0, :], src[1, :])
    dst[2:, :] = get_3rd_point(dst[0, :], dst[1, :])

    if inv:
        trans = cv2.getAffineTransform(np.float32(dst), np.float32(src))
    else:
        trans = cv2.getAffineTransform(np.float32(src), np.float32(dst))
    return trans


def affine_transform(pt, t):
    new_pt = np.array([pt[0], pt[1], 1.0]).T
    new_pt = np.dot(t, new_pt)
    return new_pt[:2]


def transform_preds(coords, trans):
    """HRNet ``transform_preds`` with the [2, 3] matrix given instead of (center, scale)."""
    target_coords = np.zeros(coords.shape)
    for p in range(coords.shape[0]):
        target_coords[p, 0:2] = affine_transform(coords[p, 0:2], trans)
    return target_coords


def box_to_center_scale(x, y, w, h, aspect_ratio=192.0 / 256.0, pixel_std=200.0, padding=1.25):
    """HRNet ``COCODataset._xywh2cs``: box -> (center [2], scale [2]) with ``padding``."""
    center = np.zeros((2), dtype=np.float32)
    center[0] = x + w * 0.5
    center[1] = y + h * 0.5
    if w > aspect_ratio * h:
        h = w * 1.0 / aspect_ratio
    elif w < aspect_ratio * h:
        w = h * aspect_ratio
    scale = np.array([w * 1.0 / pixel_std, h * 1.0 / pixel_std], dtype=np.float32)
    if center[0] != -1:
        scale = scale * padding
    return center, scale


# --------------------------------------------------------------------------- HRNet
def get_max_preds(batch_heatmaps):
    """HRNet ``get_max_preds``: integer argmax (first maximum) and maxima.

    Returns ``preds [N, K, 2]`` float32 (x, y) and ``maxvals [N, K, 1]``; coordinates of maps
    with a maximum <= 0 are zeroed (HRNet's mask).
    """
    assert isinstance(batch_heatmaps, np.ndarray), "batch_heatmaps should be numpy.ndarray"
    assert batch_heatmaps.ndim == 4, "batch_images should be 4-ndim"

    batch_size = batch_heatmaps.shape[0]
    num_joints = batch_heatmaps.shape[1]
    width = batch_heatmaps.shape[3]
    heatmaps_reshaped = batch_heatmaps.reshape((batch_size, num_joints, -1))
    idx = np.argmax(heatmaps_reshaped, 2)
    maxvals = np.amax(heatmaps_reshaped, 2)

    maxvals = maxvals.reshape((batch_size, num_joints, 1))
    idx = idx.reshape((batch_size, num_joints, 1))

    preds = np.tile(idx, (1, 1, 2)).astype(np.float32)

    preds[:, :, 0] = (preds[:, :, 0]) % width
    preds[:, :, 1] = np.floor((preds[:, :, 1]) / width)

    pred_mask = np.tile(np.greater(maxvals, 0.0), (1, 1, 2))
    pred_mask = pred_mask.astype(np.float32)

    preds *= pred_mask
    return preds, maxvals


def hrnet_get_final_preds(batch_heatmaps, affine=None, post_process=True):
    """HRNet ``get_final_preds``: argmax, quarter offset (per-joint loop), then the affine.

    ``affine``: ``[N, 2, 3]`` heatmap -> output matrices (HRNet builds them from center and
    scale with ``get_affine_transform(..., inv=1)``), or None to stay in heatmap pixels.
    Returns ``(preds [N, K, 2], maxvals [N, K, 1])``.
    """
    coords, maxvals = get_max_preds(batch_heatmaps)

    heatmap_height = batch_heatmaps.shape[2]
    heatmap_width = batch_heatmaps.shape[3]

    # post-processing
    if post_process:
        for n in range(coords.shape[0]):
            for p in range(coords.shape[1]):
                hm = batch_heatmaps[n][p]
                px = int(math.floor(coords[n][p][0] + 0.5))
                py = int(math.floor(coords[n][p][1] + 0.5))
                if 1 < px < heatmap_width - 1 and 1 < py < heatmap_height - 1:
                    diff = np.array(
                        [
                            hm[py][px + 1] - hm[py][px - 1],
                            hm[py + 1][px] - hm[py - 1][px],
                        ]
                    )
                    coords[n][p] += np.sign(diff) * 0.25

    preds = coords.copy()
    if affine is None:
        return preds, maxvals
    preds = preds.astype(np.float64)
    # Transform back
    for i in range(coords.shape[0]):
        preds[i] = transform_preds(coords[i], affine[i])
    return preds, maxvals


# --------------------------------------------------------------------------- DarkPose
def darkpose_gaussian_blur(hm, kernel):
    """DarkPose ``gaussian_blur``: zero-padded Gaussian blur, rescaled to keep each map's max.

    Modifies ``hm`` (float32 [N, K, H, W]) in place and returns it.
    """
    _require_cv2()
    border = (kernel - 1) // 2
    batch_size = hm.shape[0]
    num_joints = hm.shape[1]
    height = hm.shape[2]
    width = hm.shape[3]
    for i in range(batch_size):
        for j in range(num_joints):
            origin_max = np.max(hm[i, j])
            dr = np.zeros((height + 2 * border, width + 2 * border))
            # (the original slices ``border:-border``, which is empty for kernel == 1)
            dr[border: border + height, border: border + width] = hm[i, j].copy()
            dr = cv2.GaussianBlur(dr, (kernel, kernel), 0)
            hm[i, j] = dr[border: border + height, border: border + width].copy()
            hm[i, j] *= origin_max / np.max(hm[i, j])
    return hm


def darkpose_taylor(hm, coord):
    """DarkPose ``taylor``: one Newton step on the log-heatmap ``hm`` [H, W] from ``coord``."""
    heatmap_height = hm.shape[0]
    heatmap_width = hm.shape[1]
    px = int(coord[0])
    py = int(coord[1])
    if 1 < px < heatmap_width - 2 and 1 < py < heatmap_height - 2:
        dx = 0.5 * (hm[py][px + 1] - hm[py][px - 1])
        dy = 0.5 * (hm[py + 1][px] - hm[py - 1][px])
        dxx = 0.25 * (hm[py][px + 2] - 2 * hm[py][px] + hm[py][px - 2])
        dxy = 0.25 * (hm[py + 1][px + 1] - hm[py - 1][px + 1] - hm[py + 1][px - 1] + hm[py - 1][px - 1])
        dyy = 0.25 * (hm[py + 2 * 1][px] - 2 * hm[py][px] + hm[py - 2 * 1][px])
        derivative = np.array([[dx], [dy]])
        hessian = np.array([[dxx, dxy], [dxy, dyy]])
        if dxx * dyy - dxy**2 != 0:
            hessianinv = np.linalg.inv(hessian)
            offset = -hessianinv @ derivative
            offset = np.squeeze(np.array(offset.T), axis=0)
            coord += offset
    return coord


def darkpose_get_final_preds(hm, affine=None, kernel=11):
    """DarkPose ``get_final_preds``: argmax, blur, log, per-joint Taylor step, affine.

    ``hm``: float32 [N, K, H, W] (copied, not modified).  Returns ``(preds, maxvals)``.
    """
    hm = np.array(hm, dtype=np.float32, copy=True)
    coords, maxvals = get_max_preds(hm)

    # post-processing
    hm = darkpose_gaussian_blur(hm, kernel)
    hm = np.maximum(hm, 1e-10)
    hm = np.log(hm)
    for n in range(coords.shape[0]):
        for p in range(coords.shape[1]):
            coords[n, p] = darkpose_taylor(hm[n][p], coords[n][p])

    preds = coords.copy()
    if affine is None:
        return preds, maxvals
    preds = preds.astype(np.float64)
    # Transform back
    for i in range(coords.shape[0]):
        preds[i] = transform_preds(coords[i], affine[i])
    return preds, maxvals


# --------------------------------------------------------------------------- MMPose (UDP)
def mmpose_get_max_preds(heatmaps):
    """MMPose ``_get_max_preds``: argmax; coordinates of maps with max <= 0 become -1."""
    assert isinstance(heatmaps, np.ndarray), "heatmaps should be numpy.ndarray"
    assert heatmaps.ndim == 4, "batch_images should be 4-ndim"

    N, K, _, W = heatmaps.shape
    heatmaps_reshaped = heatmaps.reshape((N, K, -1))
    idx = np.argmax(heatmaps_reshaped, 2).reshape((N, K, 1))
    maxvals = np.amax(heatmaps_reshaped, 2).reshape((N, K, 1))

    preds = np.tile(idx, (1, 1, 2)).astype(np.float32)
    preds[:, :, 0] = preds[:, :, 0] % W
    preds[:, :, 1] = preds[:, :, 1] // W

    preds = np.where(np.tile(maxvals, (1, 1, 2)) > 0.0, preds, -1)
    return preds, maxvals


def mmpose_post_dark_udp(coords, batch_heatmaps, kernel=3):
    """MMPose ``post_dark_udp``: blur (OpenCV default border) in place, clip, log, edge pad,
    7-point gradient/Hessian, ``coords -= inv(H + eps*I) @ g``.

    ``coords``: [N, K, 2] float; ``batch_heatmaps``: float32 [B, K, H, W] (modified in place,
    as in MMPose).  Returns the refined ``coords``.
    """
    _require_cv2()
    B, K, H, W = batch_heatmaps.shape
    N = coords.shape[0]
    assert B == 1 or B == N
    for heatmaps in batch_heatmaps:
        for heatmap in heatmaps:
            cv2.GaussianBlur(heatmap, (kernel, kernel), 0, heatmap)
    np.clip(batch_heatmaps, 0.001, 50, batch_heatmaps)
    np.log(batch_heatmaps, batch_heatmaps)

    batch_heatmaps_pad = np.pad(batch_heatmaps, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="edge").flatten()

    index = coords[..., 0] + 1 + (coords[..., 1] + 1) * (W + 2)
    index += (W + 2) * (H + 2) * np.arange(0, B * K).reshape(-1, K)
    index = index.astype(int).reshape(-1, 1)
    i_ = batch_heatmaps_pad[index]
    ix1 = batch_heatmaps_pad[index + 1]
    iy1 = batch_heatmaps_pad[index + W + 2]
    ix1y1 = batch_heatmaps_pad[index + W + 3]
    ix1_y1_ = batch_heatmaps_pad[index - W - 3]
    ix1_ = batch_heatmaps_pad[index - 1]
    iy1_ = batch_heatmaps_pad[index - 2 - W]

    dx = 0.5 * (ix1 - ix1_)
    dy = 0.5 * (iy1 - iy1_)
    derivative = np.concatenate([dx, dy], axis=1)
    derivative = derivative.reshape(N, K, 2, 1)
    dxx = ix1 - 2 * i_ + ix1_
    dyy = iy1 - 2 * i_ + iy1_
    dxy = 0.5 * (ix1y1 - ix1 - iy1 + i_ + i_ - ix1_ - iy1_ + ix1_y1_)
    hessian = np.concatenate([dxx, dxy, dxy, dyy], axis=1)
    hessian = hessian.reshape(N, K, 2, 2)
    hessian = np.linalg.inv(hessian + np.finfo(np.float32).eps * np.eye(2))
    coords -= np.einsum("ijmn,ijnk->ijmk", hessian, derivative).reshape(N, K, 2)
    return coords


def mmpose_udp_decode(heatmaps, affine=None, kernel=11):
    """MMPose's UDP decode for Gaussian heatmaps: ``_get_max_preds`` + ``post_dark_udp``,
    then the ``[N, 2, 3]`` affine (MMPose's own UDP ``transform_preds`` is one such affine).
    ``heatmaps`` is copied.  Returns ``(preds, maxvals)``.
    """
    hm = np.array(heatmaps, dtype=np.float32, copy=True)
    preds, maxvals = mmpose_get_max_preds(hm)
    preds = mmpose_post_dark_udp(preds, hm, kernel=kernel)
    if affine is None:
        return preds, maxvals
    out = np.zeros(preds.shape, dtype=np.float64)
    for i in range(preds.shape[0]):
        out[i] = transform_preds(preds[i], affine[i])
    return out, maxvals


# --------------------------------------------------------------------------- flip test
def hrnet_flip_back(output_flipped, matched_parts):
    """HRNet ``flip_back``: mirror the width axis and swap left/right joints ([N, K, H, W])."""
    assert output_flipped.ndim == 4, "output_flipped should be [batch_size, num_joints, height, width]"
    output_flipped = output_flipped[:, :, :, ::-1]
    for pair in matched_parts:
        tmp = output_flipped[:, pair[0], :, :].copy()
        output_flipped[:, pair[0], :, :] = output_flipped[:, pair[1], :, :]
        output_flipped[:, pair[1], :, :] = tmp
    return output_flipped


def hrnet_flip_merge(output, output_flipped, matched_parts, shift=True):
    """HRNet's flip test as in ``function.validate``: flip_back, SHIFT_HEATMAP, average.

    Computes in the inputs' dtype (pass float32 arrays for the float32 answer).
    """
    output_flipped = hrnet_flip_back(np.array(output_flipped, copy=True), matched_parts)
    output_flipped = output_flipped.copy()
    if shift:
        output_flipped[:, :, :, 1:] = output_flipped.copy()[:, :, :, 0:-1]
    return (output + output_flipped) * 0.5


# --------------------------------------------------------------------------- OKS-NMS (HRNet)
# HRNet ``lib/nms/nms.py`` (``oks_iou``, ``oks_nms``, ``soft_oks_nms``, ``rescore``), with
# MMPose 0.x's fixes (``mmpose/core/post_processing/nms.py``).  Per image and per candidate
# in Python, as the original.  Differences to the original code, on purpose:
#
# * ties are deterministic: candidates are ordered by descending score, equal scores by
#   lower index (``argsort(-scores, kind="stable")``; HRNet's ``argsort()[::-1]`` puts the
#   higher index first); in soft NMS, equal current scores go to the candidate that came
#   first in that initial order;
# * the visibility threshold keeps joints with both scores above it (MMPose's ``&``; HRNet's
#   ``list(a) and list(b)`` keeps only the second list);
# * the OKS is float64 (MMPose stores it in float32);
# * soft NMS: ``method`` picks HRNet's ``rescore`` type (HRNet always calls the gaussian
#   one), ``max_dets`` is a parameter (both hard-code 20; None: no limit), the loop also
#   stops when the best current score is ``< score_threshold``, and the scores at pick time
#   are returned with the kept indices.
# ``hrnet_oks_nms_batched`` / ``hrnet_soft_oks_nms_batched`` are the evaluation loop around them: one call
# per image, results concatenated by ascending image id.
def hrnet_oks_iou(g, d, a_g, a_d, sigmas, vis_thr=None):
    """OKS of one pose ``g`` (flat ``[K*3]``) with each row of ``d`` (``[n, K*3]``)."""
    sigmas = np.asarray(sigmas, dtype=np.float64)
    vars_ = (sigmas * 2) ** 2
    xg, yg, vg = g[0::3], g[1::3], g[2::3]
    ious = np.zeros(d.shape[0], dtype=np.float64)
    for n_d in range(d.shape[0]):
        xd, yd, vd = d[n_d, 0::3], d[n_d, 1::3], d[n_d, 2::3]
        dx = xd - xg
        dy = yd - yg
        e = (dx**2 + dy**2) / vars_ / ((a_g + a_d[n_d]) / 2 + np.spacing(1)) / 2
        if vis_thr is not None:
            ind = (vg > vis_thr) & (vd > vis_thr)
            e = e[ind]
        ious[n_d] = np.sum(np.exp(-e)) / e.shape[0] if e.shape[0] != 0 else 0.0
    return ious


def hrnet_oks_nms(kpts, scores, areas, thr, sigmas, vis_thr=None):
    """Greedy OKS-NMS of one image: indices kept, in visiting order (``> thr`` suppresses)."""
    kpts = np.asarray(kpts, dtype=np.float64).reshape(len(scores), -1)
    order = np.argsort(-np.asarray(scores), kind="stable")
    keep = []
    while order.size > 0:
        i = order[0]
        keep.append(i)
        oks_ovr = hrnet_oks_iou(kpts[i], kpts[order[1:]], areas[i], areas[order[1:]], sigmas, vis_thr)
        inds = np.where(oks_ovr <= thr)[0]
        order = order[inds + 1]
    return keep


def hrnet_rescore(overlap, scores, thr, method="gaussian"):
    """HRNet's ``rescore``: linear ``s * (1 - o)`` where ``o >= thr``; gaussian ``s * exp(-o^2 / thr)``."""
    if method == "linear":
        inds = np.where(overlap >= thr)[0]
        scores[inds] = scores[inds] * (1 - overlap[inds])
    else:
        scores = scores * np.exp(-(overlap**2) / thr)
    return scores


def hrnet_soft_oks_nms(kpts, scores, areas, thr, sigmas, vis_thr=None, method="gaussian", max_dets=20,
                 score_threshold=0.0):
    """Soft OKS-NMS of one image: ``(keep, scores at pick time)`` in pick order."""
    kpts = np.asarray(kpts, dtype=np.float64).reshape(len(scores), -1)
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    first = np.arange(order.size)  # position in the initial order: the tie-break
    scores = scores[order]
    keep, kept_scores = [], []
    while order.size > 0 and (max_dets is None or len(keep) < max_dets):
        if scores[0] < score_threshold:
            break
        i = order[0]
        keep.append(i)
        kept_scores.append(scores[0])
        oks_ovr = hrnet_oks_iou(kpts[i], kpts[order[1:]], areas[i], areas[order[1:]], sigmas, vis_thr)
        order, first = order[1:], first[1:]
        scores = hrnet_rescore(oks_ovr, scores[1:], thr, method)
        tmp = np.lexsort((first, -scores))
        order, first, scores = order[tmp], first[tmp], scores[tmp]
    return keep, kept_scores


def _per_image(batch_idx):
    """``(image id, global indices)`` of each image with candidates, ascending ids."""
    batch_idx = np.asarray(batch_idx)
    by_image = np.argsort(batch_idx, kind="stable")
    ids, starts = np.unique(batch_idx[by_image], return_index=True)
    return zip(ids, np.split(by_image, starts[1:]))


def hrnet_oks_nms_batched(keypoints, scores, areas, batch_idx, thr, sigmas, vis_thr=None):
    """``oks_nms`` per image; global indices, by image then visiting order (int64)."""
    keypoints, scores, areas = (np.asarray(a, dtype=np.float64) for a in (keypoints, scores, areas))
    keep = [idx[hrnet_oks_nms(keypoints[idx], scores[idx], areas[idx], thr, sigmas, vis_thr)]
            for _, idx in _per_image(batch_idx)]
    return np.concatenate(keep).astype(np.int64) if keep else np.zeros(0, dtype=np.int64)


def hrnet_soft_oks_nms_batched(keypoints, scores, areas, batch_idx, thr, sigmas, vis_thr=None, method="gaussian",
                         max_dets=20, score_threshold=0.0):
    """``soft_oks_nms`` per image: ``(keep int64, new scores float64)`` by image then pick order."""
    keypoints, scores, areas = (np.asarray(a, dtype=np.float64) for a in (keypoints, scores, areas))
    keep, new = [np.zeros(0, dtype=np.int64)], [np.zeros(0)]
    for _, idx in _per_image(batch_idx):
        k, s = hrnet_soft_oks_nms(keypoints[idx], scores[idx], areas[idx], thr, sigmas, vis_thr, method, max_dets,
                            score_threshold)
        keep.append(idx[np.asarray(k, dtype=np.int64)])
        new.append(np.asarray(s, dtype=np.float64))
    return np.concatenate(keep).astype(np.int64), np.concatenate(new)


# --------------------------------------------------------------------------- MIPNet SELambdaLayer
# lib/models/pose_hrnet_se_lambda.py (Khirodkar et al., ICCV 2021): the squeeze-excite scale
# times the instance embedding fc_lambda(lambda_vec).
class OfficialSELambdaLayer(nn.Module):
    """SELambdaLayer as published, with Linear(2, .) generalised to Linear(N, .) and an
    optional Identity in place of the BatchNorm (for ``embed_norm=False``)."""

    def __init__(self, channel, reduction=4, num_instances=2, embed_norm=True):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(
            nn.Linear(channel, channel // reduction, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(channel // reduction, channel, bias=False),
            nn.Sigmoid(),
        )
        self.fc_lambda = nn.Sequential(
            nn.Linear(num_instances, channel // reduction),
            nn.BatchNorm1d(channel // reduction) if embed_norm else nn.Identity(),
            nn.ReLU(inplace=True),
            nn.Linear(channel // reduction, channel),
            nn.Sigmoid(),
        )

    def forward(self, x, lambda_vec):
        b, c, _, _ = x.size()
        y = self.avg_pool(x).view(b, c)
        y = self.fc(y).view(b, c, 1, 1)
        z = self.fc_lambda(lambda_vec).view(b, c, 1, 1)
        return x * y.expand_as(x) * z.expand_as(x)


def official_se_lambda(C, N=2, r=4, embed_norm=True, *, seed=0, stats=True, generator=None):
    """An :class:`OfficialSELambdaLayer` moved away from its initialisation so every parameter
    matters: initialised under ``torch.manual_seed(seed)``, then ``0.3 * N(0, 1)`` added to every
    parameter and, with ``embed_norm and stats``, BatchNorm running statistics set to
    non-trivial values, all drawn from ``generator`` (default: a new one seeded ``seed + 1``)."""
    torch.manual_seed(seed)
    off = OfficialSELambdaLayer(C, r, N, embed_norm)
    g = torch.Generator().manual_seed(seed + 1) if generator is None else generator
    with torch.no_grad():
        for p in off.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
        if embed_norm and stats:
            bn = off.fc_lambda[1]
            bn.running_mean.copy_(0.5 * torch.randn(bn.running_mean.shape, generator=g))
            bn.running_var.copy_(0.5 + torch.rand(bn.running_var.shape, generator=g))
    return off


# SELambdaLayer.forward written out in plain torch, with the embedding v given (the scale
# op), or computed by the BN-free / BN-folded embedding MLP.
def official_scale(x, w1, w2, v):
    b, c, _, _ = x.size()
    y = F.adaptive_avg_pool2d(x, 1).view(b, c)
    y = torch.sigmoid(F.linear(F.relu(F.linear(y, w1)), w2)).view(b, c, 1, 1)
    z = v.view(b, c, 1, 1)
    return x * y.expand_as(x) * z.expand_as(x)


def official_embed(lam, e1, b1, e2, b2):
    return torch.sigmoid(F.linear(F.relu(F.linear(lam, e1, b1)), e2, b2))


def official_mimb(x, lam, w1, w2, e1, b1, e2, b2):
    return official_scale(x, w1, w2, official_embed(lam, e1, b1, e2, b2))


def official_instances(x, w1, w2, table):
    B, C = x.shape[:2]
    return torch.cat([official_scale(x, w1, w2, table[n].expand(B, C)) for n in range(table.shape[0])])
