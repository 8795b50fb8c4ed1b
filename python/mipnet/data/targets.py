"""Multi-instance heatmap targets of MIPNet (Khirodkar et al., ICCV 2021, §3.1 and Eq. 1).

For a crop drawn around person box ``B0`` (the *primary*, instance 0), the other annotated
people of the image are candidate instances.  :func:`select_instances` picks instances
``1 … N-1``; :func:`build_targets` renders Gaussian heatmaps and per-joint weights for all N.

Two selection rules:

``selection="paper"`` (default): the other people ordered by the distance of their box
    centre to ``B0``'s centre (ties: annotation order); every one with at least
    ``min_keypoints`` (k = 3) labelled keypoints inside the (augmented) crop becomes the
    next instance, until N-1 are found.  Instances that cannot be filled fall back to the
    primary (Eq. 1: ``L_i = MSE(y_0, P(x, λ=i))`` for ``i >= n``).
``selection="official"``: what the released code (rawalkhirodkar/MIPNet,
    ``lib/dataset/coco_lambda.py`` + ``JointsLambdaDataset.py``) does: only the single
    nearest person by box-centre distance is a candidate; it becomes instance 1 when
    *more than* ``min_keypoints`` (there: ``sum(vis) <= 3`` -> fall back, i.e. at least 4)
    of its labelled keypoints land inside the crop; otherwise, and for every instance
    beyond 1, the primary's target is used.  So a near person with too few keypoints in
    the crop hides a farther one that qualifies, and N > 2 gets no extra people.

Conventions: "labelled" is COCO ``v > 0`` (``v = 1``, occluded but annotated, counts and
is trained on, as in HRNet); "inside the crop" is ``0 <= x < W`` and ``0 <= y < H`` in
crop pixels.  A joint's target weight is 1 when it is labelled and inside the crop, else 0
(and its heatmap is all zero).  Heatmaps are unnormalised Gaussians ``exp(-d² / 2σ²)``
centred on the keypoint's exact sub-pixel heatmap position (the unbiased encoding of
DARK, Zhang et al. 2020), so the continuous peak is the keypoint itself; HRNet instead
rounds the centre to the nearest heatmap pixel and truncates at 3σ.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

SELECTIONS = ("paper", "official")


def default_sigma(heatmap_size: Sequence[int]) -> float:
    """σ of the paper's configs: 2 for 64×48 heatmaps (256×192 input), 3 for 96×72 (384×288)."""
    return float(heatmap_size[0]) / 32.0


def visible_in_crop(keypoints: np.ndarray, input_size: Sequence[int]) -> np.ndarray:
    """``[..., K]`` bool: labelled (``v > 0``) and inside the crop, for ``[..., K, 3]`` crop-pixel keypoints."""
    H, W = input_size
    x, y, v = keypoints[..., 0], keypoints[..., 1], keypoints[..., 2]
    return (v > 0) & (x >= 0) & (x < W) & (y >= 0) & (y < H)


def select_instances(
    primary: int,
    centers: np.ndarray,
    keypoints: np.ndarray,
    num_instances: int,
    input_size: Sequence[int],
    min_keypoints: int = 3,
    selection: str = "paper",
) -> np.ndarray:
    """Indices ``[N]`` into the image's people: instance 0 is ``primary``, fallbacks repeat it.

    Args:
        primary: index of the person the crop was drawn for.
        centers: ``[M, 2]`` box centres of the image's M people (image pixels; any
            similarity transform of them gives the same order).
        keypoints: ``[M, K, 3]`` keypoints in *crop* pixels after augmentation, ``v`` third.
        num_instances: N >= 1.
        input_size: crop ``(height, width)``.
        min_keypoints: k of the paper.
        selection: ``"paper"`` or ``"official"`` (see the module docstring).
    """
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    if int(num_instances) < 1:
        raise ValueError(f"num_instances must be >= 1, got {num_instances}")
    centers = np.asarray(centers, dtype=np.float64)
    M = len(centers)
    if not 0 <= primary < M:
        raise ValueError(f"primary index {primary} is out of range for {M} people")
    if keypoints.shape[0] != M:
        raise ValueError(f"keypoints has {keypoints.shape[0]} people but centers has {M}")
    chosen = np.full(int(num_instances), primary, dtype=np.int64)
    if num_instances == 1 or M == 1:
        return chosen
    counts = visible_in_crop(keypoints, input_size).sum(axis=-1)
    dist = ((centers - centers[primary]) ** 2).sum(axis=-1)
    dist[primary] = np.inf
    if selection == "official":
        nearest = int(np.argmin(dist))
        if counts[nearest] > min_keypoints:
            chosen[1] = nearest
        return chosen
    order = [i for i in np.argsort(dist, kind="stable") if i != primary]
    qualified = [i for i in order if counts[i] >= min_keypoints][: num_instances - 1]
    chosen[1 : 1 + len(qualified)] = qualified
    return chosen


def gaussian_heatmaps(
    keypoints: np.ndarray, weights: np.ndarray, heatmap_size: Sequence[int], sigma: float
) -> np.ndarray:
    """``[..., K, h, w]`` float32 Gaussians at ``[..., K, 2]`` heatmap-pixel keypoints (zero where ``weights == 0``)."""
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    h, w = heatmap_size
    kp = np.asarray(keypoints, dtype=np.float64)
    xs = np.arange(w, dtype=np.float64)
    ys = np.arange(h, dtype=np.float64)
    gx = np.exp(-((xs - kp[..., 0:1]) ** 2) / (2 * sigma**2))  # [..., K, w]
    gy = np.exp(-((ys - kp[..., 1:2]) ** 2) / (2 * sigma**2))  # [..., K, h]
    maps = gy[..., :, None] * gx[..., None, :]
    maps *= (np.asarray(weights) > 0)[..., None, None]
    return maps.astype(np.float32)


def build_targets(
    keypoints: np.ndarray,
    centers: np.ndarray,
    primary: int,
    num_instances: int,
    input_size: Sequence[int],
    heatmap_size: Sequence[int],
    sigma: float | None = None,
    min_keypoints: int = 3,
    selection: str = "paper",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Targets of Eq. 1 for one crop.

    Args:
        keypoints: ``[M, K, 3]`` every person of the image in crop pixels (after the
            crop affine and, when flipped, the left/right channel swap).
        centers: ``[M, 2]`` their box centres; ``primary``: the crop's person.
        num_instances, input_size, min_keypoints, selection: as :func:`select_instances`.
        heatmap_size: ``(h, w)``; crop pixels are divided by the stride ``W/w``, ``H/h``.
        sigma: Gaussian σ in heatmap pixels (default :func:`default_sigma`).

    Returns:
        ``heatmaps [N, K, h, w]`` float32, ``target_weight [N, K]`` float32 and the chosen
        people ``[N]`` (indices into M; fallbacks repeat ``primary``).
    """
    keypoints = np.asarray(keypoints, dtype=np.float64)
    if keypoints.ndim != 3 or keypoints.shape[2] < 3:
        raise ValueError(f"keypoints must have shape [M, K, 3], got {keypoints.shape}")
    chosen = select_instances(
        primary, centers, keypoints, num_instances, input_size, min_keypoints, selection
    )
    H, W = input_size
    h, w = heatmap_size
    sel = keypoints[chosen]
    weight = visible_in_crop(sel, input_size).astype(np.float32)
    hm_xy = sel[..., :2] * np.array([w / W, h / H])
    sigma = default_sigma(heatmap_size) if sigma is None else sigma
    return gaussian_heatmaps(hm_xy, weight, heatmap_size, sigma), weight, chosen
