"""Batched OKS-NMS and soft OKS-NMS: the pose candidates of many images in one call.

Public ops (each also under ``torch.ops.mipnet``):

``oks_iou(kpts_a [Ma, K, 3], areas_a [Ma], kpts_b [Mb, K, 3], areas_b [Mb], sigmas [K], vis_threshold=None) -> [Ma, Mb]``
    The object keypoint similarity of every pair (HRNet / MMPose NMS semantics,
    ARCHITECTURE.md "OKS")::

        oks = mean_k exp(-e_k),  e_k = d_k^2 / vars_k / ((area_a + area_b) / 2 + eps) / 2

    with ``vars = (2 sigma)^2``, ``eps = 2.220446049250313e-16`` (``np.spacing(1)``) and the
    mean over all K joints or, with a visibility threshold ``t``, over the joints whose
    scores are both ``> t`` (MMPose's ``&``; a pair with none has OKS 0).

``oks_nms(keypoints [M, K, 3], scores [M], areas [M], batch_idx [M] int64, sigmas=None, threshold=0.9, vis_threshold=None) -> keep``
    Greedy OKS-NMS as in HRNet's ``oks_nms`` for every image at once: inside each image,
    visit candidates by descending score (ties: lower index first), keep one unless its OKS
    with an already kept candidate of the same image is ``> threshold``.  Candidates of
    different images never suppress each other.  ``keep`` holds int64 indices into the
    inputs, ordered by image, then by descending score.

``soft_oks_nms(keypoints, scores, areas, batch_idx, sigmas=None, method="gaussian", threshold=0.9, vis_threshold=None, score_threshold=0.0, max_dets=20) -> (keep, new_scores)``
    HRNet / MMPose ``soft_oks_nms`` per image: repeatedly pick the remaining candidate with
    the highest current score (ties: the one first in the initial order), then rescore the
    others with their OKS ``o`` against it -- ``gaussian``: ``s * exp(-o^2 / threshold)``;
    ``linear``: ``s * (1 - o)`` where ``o >= threshold`` -- until ``max_dets`` picks (``None``:
    no limit; HRNet / MMPose hard-code 20), nothing remains, or the best current score is
    ``< score_threshold``.  ``keep`` is ordered by image, then pick order; ``new_scores[j]`` is
    the (rescored) score of ``keep[j]`` when it was picked.  Scores may be +-inf: where a
    factor of 0 meets an infinite score (``inf * 0``), +inf becomes 0 and -inf stays -inf, on
    every backend (never NaN).

``oks_nms_mask(keypoints, scores, areas, batch_idx, num_images, ...) -> (keep_mask [M] bool, counts [num_images] int64)``
``soft_oks_nms_mask(keypoints, scores, areas, batch_idx, num_images, ...) -> (rank [M] int64, new_scores [M], counts [num_images] int64)``
    The same without any device-to-host copy, for pipelines that stay on the GPU: outputs in
    input order with shapes known in advance (``keep_mask``: kept or not; ``rank``: pick
    number inside the image or -1; ``new_scores``: score at pick time, or the current score
    when the loop stopped for candidates never picked; ``counts``: kept / picked per
    image).  Value checks need a synchronisation, so they run only when ``validate`` is true
    (default: on CPU tensors, where they cost nothing extra).  Without them, ids of
    ``batch_idx`` outside ``[0, num_images)`` are clamped into that range, and NaN scores or
    areas give an unspecified (but memory-safe) result.

Shared conventions: ``keypoints`` are ``(x, y, score)`` per joint; floats of any dtype;
the OKS (and soft rescoring) run in float64 when ``keypoints`` is float64, else float32,
and ``new_scores`` have that dtype; ``threshold`` and ``vis_threshold`` are compared in that
dtype too.  ``sigmas`` default to COCO's for K = 17 and CrowdPose's for K = 14 (other K:
pass them).  Empty inputs give empty outputs.

How it runs: the op layer validates, sorts the candidates once (stable sort by score
descending, then stable by image, both on the device) and computes per-image segment
offsets (``searchsorted`` on the device); the backends (:mod:`mipnet_kernels._backends`)
then see only sorted rows + offsets -- the contract of ``oks_nms_sorted`` /
``soft_oks_nms_sorted`` in ``csrc/schemas.h``:

* ``reference``: vectorised PyTorch per image (any device; syncs per image);
* ``cpu``: ``torch.ops.mipnet_cpu.*`` (C++: lazy OKS against kept rows only, OpenMP across
  images);
* ``cuda``: ``torch.ops.mipnet_cuda.*``; ``triton``: ``mipnet_kernels/triton/nms.py``
  (``oks_nms_sorted_triton`` / ``soft_oks_nms_sorted_triton``).  Each declares itself
  unsupported, with the reason, while it is not built / not written.

Files: ``reference.py`` (the OKS and the sorted-kernel contracts in PyTorch), ``checks.py``
(argument checks, sigmas), ``kernels.py`` (the kernel tables and the segmentation),
``library.py`` (the ``torch.ops.mipnet`` ops); this file: the public API.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from .checks import (DEFAULT_SIGMAS, FLOAT_DTYPES, SigmasLike, _check_keypoints, _check_nms_shapes,
                     _check_num_images, resolve_sigmas)
from .kernels import OKS_NMS_SORTED_KERNELS, SOFT_OKS_NMS_SORTED_KERNELS
from .library import _oks_iou_op, _oks_nms_mask_op, _oks_nms_op, _soft_oks_nms_mask_op, _soft_oks_nms_op
from .reference import (METHOD_ID, METHODS, OKS_EPS, compute_dtype, oks_matrix_reference,
                        oks_nms_sorted_reference, soft_oks_nms_sorted_reference)

# --------------------------------------------------------------------------- public API
def _prepare(keypoints, scores, areas, batch_idx, sigmas) -> Tensor:
    """Shape/type checks naming the argument; returns ``sigmas`` as a tensor."""
    _check_keypoints(keypoints, "keypoints")
    sig = resolve_sigmas(sigmas, keypoints.shape[1], keypoints.device, compute_dtype(keypoints))
    _check_nms_shapes(keypoints, scores, areas, batch_idx, sig)
    return sig


def _public_max_dets(max_dets, M: int) -> Optional[int]:
    """``max_dets`` checked here (torch's argument parser would reject 10**20 with an
    unrelated message and turn True into 1) and clamped to ``max(M, 1)``: picks beyond the
    candidate count change nothing."""
    if max_dets is not None and (isinstance(max_dets, bool) or not isinstance(max_dets, int) or max_dets < 1):
        raise ValueError(f"max_dets must be an int >= 1 or None, got {max_dets!r}")
    return None if max_dets is None else min(max_dets, max(M, 1))


def _public_num_images(num_images, M: int) -> int:
    """``num_images`` checked before torch's argument parser turns True into 1."""
    _check_num_images(num_images, M)
    return num_images


def _default_validate(validate: Optional[bool], keypoints: Tensor) -> bool:
    return keypoints.device.type == "cpu" if validate is None else bool(validate)


def oks_iou(kpts_a: Tensor, areas_a: Tensor, kpts_b: Tensor, areas_b: Tensor, sigmas: SigmasLike = None,
            vis_threshold: Optional[float] = None) -> Tensor:
    """OKS of every pair: ``[Ma, Mb]`` (see the module docstring for the formula).

    Args:
        kpts_a, kpts_b: ``[Ma, K, 3]`` / ``[Mb, K, 3]`` keypoints ``(x, y, score)``.
        areas_a, areas_b: ``[Ma]`` / ``[Mb]`` object areas.
        sigmas: ``[K]`` per-joint sigmas (tensor or sequence); default COCO (K=17) / CrowdPose (K=14).
        vis_threshold: count only joints with both scores ``> vis_threshold`` (None: all).
    """
    _check_keypoints(kpts_a, "kpts_a")
    sig = resolve_sigmas(sigmas, kpts_a.shape[1], kpts_a.device, compute_dtype(kpts_a))
    return _oks_iou_op(kpts_a, areas_a, kpts_b, areas_b, sig,
                                    None if vis_threshold is None else float(vis_threshold))


def oks_nms(keypoints: Tensor, scores: Tensor, areas: Tensor, batch_idx: Tensor, sigmas: SigmasLike = None,
            threshold: float = 0.9, vis_threshold: Optional[float] = None) -> Tensor:
    """Greedy OKS-NMS of all images at once (HRNet ``oks_nms`` semantics per image).

    Args:
        keypoints: ``[M, K, 3]`` candidate poses ``(x, y, score)``.
        scores: ``[M]`` candidate scores.  areas: ``[M]`` object areas (>= 0).
        batch_idx: ``[M]`` int64 image of each candidate (>= 0, any order).
        sigmas: ``[K]``; default COCO (K=17) / CrowdPose (K=14), required otherwise.
        threshold: a candidate whose OKS with a kept one is ``> threshold`` is dropped.
        vis_threshold: count only joints with both scores ``> vis_threshold`` (None: all).

    Returns:
        int64 indices of the kept candidates, by image, then descending score (ties: lower
        index).  Synchronises (the output length); see :func:`oks_nms_mask` for GPU pipelines.
    """
    sig = _prepare(keypoints, scores, areas, batch_idx, sigmas)
    return _oks_nms_op(keypoints, scores, areas, batch_idx, sig, threshold,
                                    None if vis_threshold is None else float(vis_threshold))


def oks_nms_mask(keypoints: Tensor, scores: Tensor, areas: Tensor, batch_idx: Tensor, num_images: int,
                 sigmas: SigmasLike = None, threshold: float = 0.9, vis_threshold: Optional[float] = None,
                 validate: Optional[bool] = None) -> tuple[Tensor, Tensor]:
    """:func:`oks_nms` as ``(keep_mask [M] bool in input order, counts [num_images] int64)``
    with no device-to-host copy (``batch_idx`` values must be ``< num_images``).

    ``validate``: run the value checks (finite keypoints, no NaN score, areas >= 0, batch_idx
    in range), which synchronise; default True on CPU tensors, False on GPU tensors.

    Sync-free on the ``cuda`` backend (the default for CUDA tensors).  The ``triton`` backend
    reads the largest image's candidate count once (one synchronisation) to size its launch.
    """
    sig = _prepare(keypoints, scores, areas, batch_idx, sigmas)
    num_images = _public_num_images(num_images, keypoints.shape[0])
    return _oks_nms_mask_op(keypoints, scores, areas, batch_idx, num_images, sig, threshold,
                                         None if vis_threshold is None else float(vis_threshold),
                                         _default_validate(validate, keypoints))


def soft_oks_nms(keypoints: Tensor, scores: Tensor, areas: Tensor, batch_idx: Tensor, sigmas: SigmasLike = None,
                 method: str = "gaussian", threshold: float = 0.9, vis_threshold: Optional[float] = None,
                 score_threshold: float = 0.0, max_dets: Optional[int] = 20) -> tuple[Tensor, Tensor]:
    """Soft OKS-NMS of all images at once (HRNet / MMPose ``soft_oks_nms`` per image).

    Args: as :func:`oks_nms`, plus ``method`` (``"gaussian"``: ``s * exp(-oks^2 / threshold)``;
    ``"linear"``: ``s * (1 - oks)`` where ``oks >= threshold``), ``score_threshold`` (stop an
    image when its best current score is below it) and ``max_dets`` (picks per image;
    None: no limit).

    Returns:
        ``(keep, new_scores)``: int64 indices by image, then pick order; the rescored score
        of each kept candidate when it was picked (float64 for float64 keypoints, else float32).
    """
    sig = _prepare(keypoints, scores, areas, batch_idx, sigmas)
    max_dets = _public_max_dets(max_dets, keypoints.shape[0])
    return _soft_oks_nms_op(keypoints, scores, areas, batch_idx, sig, method, threshold,
                                         None if vis_threshold is None else float(vis_threshold),
                                         score_threshold, max_dets)


def soft_oks_nms_mask(keypoints: Tensor, scores: Tensor, areas: Tensor, batch_idx: Tensor, num_images: int,
                      sigmas: SigmasLike = None, method: str = "gaussian", threshold: float = 0.9,
                      vis_threshold: Optional[float] = None, score_threshold: float = 0.0,
                      max_dets: Optional[int] = 20, validate: Optional[bool] = None) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`soft_oks_nms` with no device-to-host copy: ``(rank [M] int64, new_scores [M],
    counts [num_images] int64)`` in input order (``rank``: pick number inside the image, -1
    if not picked).  ``validate`` as in :func:`oks_nms_mask`."""
    sig = _prepare(keypoints, scores, areas, batch_idx, sigmas)
    num_images = _public_num_images(num_images, keypoints.shape[0])
    max_dets = _public_max_dets(max_dets, keypoints.shape[0])
    return _soft_oks_nms_mask_op(keypoints, scores, areas, batch_idx, num_images, sig, method,
                                              threshold, None if vis_threshold is None else float(vis_threshold),
                                              score_threshold, max_dets, _default_validate(validate, keypoints))


__all__ = [
    "DEFAULT_SIGMAS", "FLOAT_DTYPES", "METHODS", "METHOD_ID", "OKS_EPS", "OKS_NMS_SORTED_KERNELS",
    "SOFT_OKS_NMS_SORTED_KERNELS", "compute_dtype", "oks_iou", "oks_matrix_reference", "oks_nms",
    "oks_nms_mask", "oks_nms_sorted_reference", "resolve_sigmas", "soft_oks_nms", "soft_oks_nms_mask",
    "soft_oks_nms_sorted_reference",
]
