"""Argument checks of the NMS ops (each error names the argument) and the per-joint sigmas."""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from ...keypoints import COCO_SIGMAS, CROWDPOSE_SIGMAS
from .reference import METHODS

DEFAULT_SIGMAS = {17: COCO_SIGMAS, 14: CROWDPOSE_SIGMAS}
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

SigmasLike = Union[Tensor, Sequence[float], None]


# --------------------------------------------------------------------------- validation
def _check_tensor(t, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _check_float(t, name: str) -> None:
    _check_tensor(t, name)
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _check_same_device(t: Tensor, name: str, ref: Tensor, ref_name: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def _check_keypoints(kp, name: str) -> None:
    _check_float(kp, name)
    if kp.dim() != 3 or kp.shape[2] != 3 or kp.shape[1] < 1:
        raise ValueError(f"{name} must have shape [M, K, 3] (x, y, score) with K >= 1, got {list(kp.shape)}")


def _check_vector(t, name: str, M: int, kp: Tensor, kp_name: str, *, integer: bool = False) -> None:
    """``t`` must be ``[M]`` with ``M = kp_name.shape[0]``, on ``kp``'s device."""
    if integer:
        _check_tensor(t, name)
        if t.dtype != torch.int64:
            raise ValueError(f"{name} must be int64, got {t.dtype}")
    else:
        _check_float(t, name)
    if t.dim() != 1 or t.shape[0] != M:
        raise ValueError(f"{name} must have shape [{M}] ({kp_name}.shape[0]), got {list(t.shape)}")
    _check_same_device(t, name, kp, kp_name)


def _check_sigmas(sigmas, K: int, kp: Tensor) -> None:
    _check_float(sigmas, "sigmas")
    if sigmas.dim() != 1 or sigmas.shape[0] != K:
        raise ValueError(f"sigmas must have shape [K] = [{K}] (K = keypoints.shape[1]), got {list(sigmas.shape)}")
    _check_same_device(sigmas, "sigmas", kp, "keypoints")


def _check_number(value, name: str, lo: float, hi: float, *, lo_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    ok = (lo < value if lo_open else lo <= value) and value <= hi  # False for NaN
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")


def _check_vis(vis_threshold) -> None:
    if vis_threshold is not None:
        _check_number(vis_threshold, "vis_threshold", -math.inf, math.inf)


def _check_nms_shapes(keypoints, scores, areas, batch_idx, sigmas) -> None:
    _check_keypoints(keypoints, "keypoints")
    M, K = keypoints.shape[:2]
    _check_vector(scores, "scores", M, keypoints, "keypoints")
    _check_vector(areas, "areas", M, keypoints, "keypoints")
    _check_vector(batch_idx, "batch_idx", M, keypoints, "keypoints", integer=True)
    _check_sigmas(sigmas, K, keypoints)


def _check_num_images(num_images, M: int) -> None:
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 0:
        raise ValueError(f"num_images must be an int >= 0, got {num_images!r}")
    if M > 0 and num_images == 0:
        raise ValueError(f"num_images is 0 but there are M = {M} candidates")


def _check_soft_params(method, threshold, score_threshold, max_dets) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    # Gaussian divides by the threshold.
    _check_number(threshold, "threshold", 0.0, 1.0, lo_open=method == "gaussian")
    _check_number(score_threshold, "score_threshold", -math.inf, math.inf)
    if max_dets is not None and (isinstance(max_dets, bool) or not isinstance(max_dets, int) or max_dets < 1):
        raise ValueError(f"max_dets must be an int >= 1 or None, got {max_dets!r}")


def _all_finite(t: Tensor) -> Tensor:
    """0-d bool: every value of ``t`` finite (aminmax propagates NaN: one pass)."""
    if t.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=t.device)
    lo, hi = torch.aminmax(t)
    return torch.isfinite(lo) & torch.isfinite(hi)


def _raise_first(checks: list[tuple[Tensor, str]]) -> None:
    """``ValueError`` with the message of the first 0-d bool that is true; the conditions are
    read back together (one host synchronisation on GPU tensors)."""
    bad = torch.stack([c for c, _ in checks]).tolist()
    for is_bad, (_, message) in zip(bad, checks):
        if is_bad:
            raise ValueError(message)


def _sigma_check(sigmas: Tensor) -> tuple[Tensor, str]:
    return ~((sigmas > 0) & torch.isfinite(sigmas)).all(), "sigmas must be positive and finite"


def _area_check(areas: Tensor, name: str) -> tuple[Tensor, str]:
    return ~(areas >= 0).all(), f"{name} must be >= 0 (found a negative or NaN area)"  # NaN fails


def _check_values(keypoints: Tensor, scores: Tensor, areas: Tensor, batch_idx: Tensor, sigmas: Tensor,
                  num_images: Optional[int] = None) -> None:
    """The checks that read the data (one host synchronisation on GPU tensors)."""
    if keypoints.numel() == 0:
        return
    id_lo, id_hi = torch.aminmax(batch_idx)
    _raise_first([
        (~_all_finite(keypoints), "keypoints must be finite (found NaN or inf)"),
        (torch.isnan(scores).any(), "scores contain NaN"),
        _area_check(areas, "areas"),
        (id_lo < 0, "batch_idx must be >= 0 (found a negative image index)"),
        (id_hi >= (num_images if num_images is not None else id_hi + 1),
         f"batch_idx must be < num_images = {num_images}"),
        _sigma_check(sigmas),
    ])


def _check_oks_iou_values(kpts_a: Tensor, areas_a: Tensor, kpts_b: Tensor, areas_b: Tensor,
                          sigmas: Tensor) -> None:
    """oks_iou's value checks, the NMS ops' (a negative area gave OKS = inf, a zero sigma NaN)."""
    _raise_first([
        (~_all_finite(kpts_a), "kpts_a must be finite (found NaN or inf)"),
        (~_all_finite(kpts_b), "kpts_b must be finite (found NaN or inf)"),
        _area_check(areas_a, "areas_a"),
        _area_check(areas_b, "areas_b"),
        _sigma_check(sigmas),
    ])


def _check_oks_iou_args(kpts_a, areas_a, kpts_b, areas_b, sigmas, vis_threshold) -> None:
    _check_keypoints(kpts_a, "kpts_a")
    _check_keypoints(kpts_b, "kpts_b")
    K = kpts_a.shape[1]
    if kpts_b.shape[1] != K:
        raise ValueError(f"kpts_b has K = {kpts_b.shape[1]} joints but kpts_a has K = {K}")
    _check_same_device(kpts_b, "kpts_b", kpts_a, "kpts_a")
    _check_vector(areas_a, "areas_a", kpts_a.shape[0], kpts_a, "kpts_a")
    _check_vector(areas_b, "areas_b", kpts_b.shape[0], kpts_b, "kpts_b")
    _check_float(sigmas, "sigmas")
    if sigmas.dim() != 1 or sigmas.shape[0] != K:
        raise ValueError(f"sigmas must have shape [K] = [{K}] (K = kpts_a.shape[1]), got {list(sigmas.shape)}")
    _check_same_device(sigmas, "sigmas", kpts_a, "kpts_a")
    _check_vis(vis_threshold)


# --------------------------------------------------------------------------- sigmas
_sigma_cache: dict[tuple, Tensor] = {}


def resolve_sigmas(sigmas: SigmasLike, K: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``sigmas`` as a ``[K]`` tensor of ``dtype`` on ``device`` (COCO / CrowdPose by K when None).

    A tensor must already be on ``device``; sequences are uploaded once and cached, so the
    GPU path makes no host-to-device copy per call.
    """
    if isinstance(sigmas, Tensor):
        _check_float(sigmas, "sigmas")
        if sigmas.device != device:
            raise ValueError(f"sigmas is on {sigmas.device} but keypoints is on {device}")
        return sigmas.to(dtype)
    if sigmas is None:
        if K not in DEFAULT_SIGMAS:
            raise ValueError(
                f"sigmas is required for K = {K} joints (defaults exist for K = 17 (COCO) and K = 14 "
                "(CrowdPose)); pass sigmas=[...] with one value per joint"
            )
        sigmas = DEFAULT_SIGMAS[K]
    try:
        values = tuple(float(s) for s in sigmas)
    except (TypeError, ValueError):
        raise TypeError(f"sigmas must be a tensor or a sequence of floats, got {type(sigmas).__name__}") from None
    if len(values) != K:
        raise ValueError(f"sigmas must have K = {K} values (K = keypoints.shape[1]), got {len(values)}")
    if torch.compiler.is_compiling():
        return torch.tensor(values, dtype=dtype, device=device)
    key = (values, device, dtype)
    t = _sigma_cache.get(key)
    if t is None:
        t = _sigma_cache[key] = torch.tensor(values, dtype=dtype, device=device)
    return t
