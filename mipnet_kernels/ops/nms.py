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
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .. import _backends, _extension
from .._backends import register
from ..keypoints import COCO_SIGMAS, CROWDPOSE_SIGMAS

#: ``np.spacing(1)``, added to the mean area of a pair (HRNet / MMPose).
OKS_EPS = 2.220446049250313e-16
METHODS = ("gaussian", "linear")
#: Method ids of the kernels (csrc/schemas.h).
METHOD_ID = {"gaussian": 0, "linear": 1}
DEFAULT_SIGMAS = {17: COCO_SIGMAS, 14: CROWDPOSE_SIGMAS}
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

SigmasLike = Union[Tensor, Sequence[float], None]


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 when any of ``tensors`` (the keypoints) is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


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


register("oks_nms_sorted", "reference")(oks_nms_sorted_reference)
register("soft_oks_nms_sorted", "reference")(soft_oks_nms_sorted_reference)


# --------------------------------------------------------------------------- compiled backends
def _compiled_reasons(namespace: str, name: str):
    """"not built" while the loaded extension has no ``torch.ops.<namespace>.<name>``."""
    def reasons(*args) -> list[str]:
        return _extension.missing_kernel(namespace, name)
    return reasons


def _compiled_call(namespace: str, name: str):
    def run(*args):
        return getattr(getattr(torch.ops, namespace), name)(*args)
    return run


_TRITON_MODULE = "mipnet_kernels.triton.nms"


@functools.lru_cache(maxsize=None)
def _triton_launcher_of(module: str, name: str):
    if importlib.util.find_spec(module) is None:
        return None, f"{module} is missing from this installation (no Triton OKS-NMS kernels)"
    fn = getattr(importlib.import_module(module), name, None)
    if fn is None:
        return None, f"{module} has no {name}"
    return fn, None


def _triton_launcher(name: str):
    """The launcher ``name`` of mipnet_kernels/triton/nms.py, or the reason it is missing
    (looked up once per module and name)."""
    return _triton_launcher_of(_TRITON_MODULE, name)


def _triton_reasons(name: str):
    def reasons(*args) -> list[str]:
        _, why = _triton_launcher(name)
        return [why] if why else []
    return reasons


def _triton_call(name: str):
    def run(*args):
        fn, why = _triton_launcher(name)
        if fn is None:
            raise RuntimeError(f"mipnet_kernels: the triton backend cannot run {name}: {why}")
        return fn(*args)
    return run


for _name in ("oks_nms_sorted", "soft_oks_nms_sorted"):
    register(_name, "cpu", reasons=_compiled_reasons("mipnet_cpu", _name))(
        _compiled_call("mipnet_cpu", _name))
    register(_name, "cuda", reasons=_compiled_reasons("mipnet_cuda", _name))(
        _compiled_call("mipnet_cuda", _name))
    register(_name, "triton", reasons=_triton_reasons(f"{_name}_triton"))(_triton_call(f"{_name}_triton"))


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


_backends.define_op("oks_nms_sorted", example_inputs=_example_sorted)
_backends.define_op("soft_oks_nms_sorted", example_inputs=_example_soft)


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
    keep = _backends.dispatch("oks_nms_sorted", keypoints.device, kp, ar, offsets, sigmas.to(dt).contiguous(),
                              float(threshold), _vis_arg(vis_threshold))
    return order, image, offsets, keep


def _run_soft(keypoints, scores, areas, batch_idx, num_images, sigmas, method, threshold, vis_threshold,
              score_threshold, max_dets):
    """``(order, image_of_row, offsets, rank_sorted, new_scores_sorted)`` for M > 0."""
    dt = compute_dtype(keypoints)
    order, image, offsets = _segment(scores, batch_idx, num_images)
    kp, sc, ar = _sorted_inputs(keypoints, scores, areas, order, dt)
    rank, new = _backends.dispatch(
        "soft_oks_nms_sorted", keypoints.device, kp, ar, sc, offsets, sigmas.to(dt).contiguous(),
        METHOD_ID[method], float(threshold), _vis_arg(vis_threshold), float(score_threshold),
        0 if max_dets is None else int(max_dets),
    )
    return order, image, offsets, rank, new


def _num_images_of(batch_idx: Tensor) -> int:
    return int(batch_idx.max()) + 1


def _dynamic_length() -> int:
    return torch.library.get_ctx().new_dynamic_size()


# --------------------------------------------------------------------------- custom ops
@torch.library.custom_op("mipnet::oks_iou", mutates_args=())
def _oks_iou_op(kpts_a: Tensor, areas_a: Tensor, kpts_b: Tensor, areas_b: Tensor, sigmas: Tensor,
                vis_threshold: Optional[float]) -> Tensor:
    _check_oks_iou_args(kpts_a, areas_a, kpts_b, areas_b, sigmas, vis_threshold)
    _check_oks_iou_values(kpts_a, areas_a, kpts_b, areas_b, sigmas)
    dt = compute_dtype(kpts_a, kpts_b)
    return oks_matrix_reference(kpts_a.to(dt), areas_a.to(dt), kpts_b.to(dt), areas_b.to(dt), sigmas.to(dt),
                                vis_threshold)


@_oks_iou_op.register_fake
def _(kpts_a, areas_a, kpts_b, areas_b, sigmas, vis_threshold):
    _check_oks_iou_args(kpts_a, areas_a, kpts_b, areas_b, sigmas, vis_threshold)
    return kpts_a.new_empty((kpts_a.shape[0], kpts_b.shape[0]), dtype=compute_dtype(kpts_a, kpts_b))


@torch.library.custom_op("mipnet::oks_nms", mutates_args=())
def _oks_nms_op(keypoints: Tensor, scores: Tensor, areas: Tensor, batch_idx: Tensor, sigmas: Tensor,
                threshold: float, vis_threshold: Optional[float]) -> Tensor:
    _check_nms_shapes(keypoints, scores, areas, batch_idx, sigmas)
    _check_number(threshold, "threshold", 0.0, 1.0)
    _check_vis(vis_threshold)
    _check_values(keypoints, scores, areas, batch_idx, sigmas)
    if keypoints.shape[0] == 0:
        return batch_idx.new_empty((0,))
    order, _, _, keep = _run_hard(keypoints, scores, areas, batch_idx, _num_images_of(batch_idx), sigmas,
                                  threshold, vis_threshold)
    return order[keep]


@_oks_nms_op.register_fake
def _(keypoints, scores, areas, batch_idx, sigmas, threshold, vis_threshold):
    _check_nms_shapes(keypoints, scores, areas, batch_idx, sigmas)
    return batch_idx.new_empty((_dynamic_length(),))


@torch.library.custom_op("mipnet::oks_nms_mask", mutates_args=())
def _oks_nms_mask_op(keypoints: Tensor, scores: Tensor, areas: Tensor, batch_idx: Tensor, num_images: int,
                     sigmas: Tensor, threshold: float, vis_threshold: Optional[float],
                     validate: bool) -> tuple[Tensor, Tensor]:
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


@_oks_nms_mask_op.register_fake
def _(keypoints, scores, areas, batch_idx, num_images, sigmas, threshold, vis_threshold, validate):
    _check_nms_shapes(keypoints, scores, areas, batch_idx, sigmas)
    _check_num_images(num_images, keypoints.shape[0])
    return (batch_idx.new_empty((keypoints.shape[0],), dtype=torch.bool), batch_idx.new_empty((num_images,)))


def _check_soft_op_args(keypoints, scores, areas, batch_idx, sigmas, method, threshold, vis_threshold,
                        score_threshold, max_dets) -> None:
    _check_nms_shapes(keypoints, scores, areas, batch_idx, sigmas)
    _check_soft_params(method, threshold, score_threshold, max_dets)
    _check_vis(vis_threshold)


@torch.library.custom_op("mipnet::soft_oks_nms", mutates_args=())
def _soft_oks_nms_op(keypoints: Tensor, scores: Tensor, areas: Tensor, batch_idx: Tensor, sigmas: Tensor,
                     method: str, threshold: float, vis_threshold: Optional[float], score_threshold: float,
                     max_dets: Optional[int]) -> tuple[Tensor, Tensor]:
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


@_soft_oks_nms_op.register_fake
def _(keypoints, scores, areas, batch_idx, sigmas, method, threshold, vis_threshold, score_threshold, max_dets):
    _check_soft_op_args(keypoints, scores, areas, batch_idx, sigmas, method, threshold, vis_threshold,
                        score_threshold, max_dets)
    n = _dynamic_length()
    return batch_idx.new_empty((n,)), keypoints.new_empty((n,), dtype=compute_dtype(keypoints))


@torch.library.custom_op("mipnet::soft_oks_nms_mask", mutates_args=())
def _soft_oks_nms_mask_op(keypoints: Tensor, scores: Tensor, areas: Tensor, batch_idx: Tensor, num_images: int,
                          sigmas: Tensor, method: str, threshold: float, vis_threshold: Optional[float],
                          score_threshold: float, max_dets: Optional[int],
                          validate: bool) -> tuple[Tensor, Tensor, Tensor]:
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


@_soft_oks_nms_mask_op.register_fake
def _(keypoints, scores, areas, batch_idx, num_images, sigmas, method, threshold, vis_threshold, score_threshold,
      max_dets, validate):
    _check_soft_op_args(keypoints, scores, areas, batch_idx, sigmas, method, threshold, vis_threshold,
                        score_threshold, max_dets)
    _check_num_images(num_images, keypoints.shape[0])
    M = keypoints.shape[0]
    return (batch_idx.new_empty((M,)), keypoints.new_empty((M,), dtype=compute_dtype(keypoints)),
            batch_idx.new_empty((num_images,)))


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
    return torch.ops.mipnet.oks_iou(kpts_a, areas_a, kpts_b, areas_b, sig,
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
    return torch.ops.mipnet.oks_nms(keypoints, scores, areas, batch_idx, sig, threshold,
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
    return torch.ops.mipnet.oks_nms_mask(keypoints, scores, areas, batch_idx, num_images, sig, threshold,
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
    return torch.ops.mipnet.soft_oks_nms(keypoints, scores, areas, batch_idx, sig, method, threshold,
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
    return torch.ops.mipnet.soft_oks_nms_mask(keypoints, scores, areas, batch_idx, num_images, sig, method,
                                              threshold, None if vis_threshold is None else float(vis_threshold),
                                              score_threshold, max_dets, _default_validate(validate, keypoints))
