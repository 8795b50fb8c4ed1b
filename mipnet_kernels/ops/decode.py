"""Sub-pixel heatmap decoding and the flip-test merge.

Public ops (also ``torch.ops.mipnet.decode_heatmaps`` / ``torch.ops.mipnet.flip_merge``):

``decode_heatmaps(heatmaps, mode="quarter", affine=None, blur_kernel=11) -> (coords, scores)``
    ``heatmaps [B, K, H, W]`` (float32/float16/bfloat16, any strides) ->
    ``coords [B, K, 2]`` float32 ``(x, y) = (column, row)`` and ``scores [B, K]`` float32,
    the heatmap maximum.  ``affine [B, 2, 3]`` maps heatmap pixels ``(x, y, 1)`` to output
    coordinates; it is applied after the refinement.

``flip_merge(heatmaps, flipped, flip_pairs, shift=True) -> merged``
    HRNet's flip test: mirror ``flipped`` horizontally, swap left/right joints, shift one
    pixel right (column 0 keeps its value) when ``shift``, and average with ``heatmaps``.

Decoding semantics (every backend implements exactly these; see ARCHITECTURE.md):

* ``argmax``: the first maximum in row-major order.  All arithmetic is float32 after
  loading the heatmap value.
* ``quarter`` (HRNet ``get_final_preds``): if ``1 < px < W-1 and 1 < py < H-1``, add
  ``0.25 * sign(hm[py, px+1] - hm[py, px-1])`` to x and ``0.25 * sign(hm[py+1, px] -
  hm[py-1, px])`` to y.  ``sign`` of a NaN difference is 0.
* ``dark`` (DarkPose, Zhang et al. CVPR 2020): blur with a ``blur_kernel``-sized Gaussian
  (OpenCV ``getGaussianKernel(k, 0)``, i.e. sigma ``0.3*((k-1)*0.5-1)+0.8`` and OpenCV's
  fixed tables for k <= 9) on the zero-padded map, rescale so the blurred max equals the
  original max, ``L = log(max(hm, 1e-10))``, and take one Newton step from the integer
  argmax with central differences when ``1 < px < W-2 and 1 < py < H-2`` and the Hessian
  determinant is non-zero.  Where DarkPose divides by zero (original max <= 0 or blurred
  max == 0) and returns NaN, or the rescale factor makes every sample clamp, no step is
  taken (the integer argmax is returned).
* ``udp`` (MMPose ``post_dark_udp``): blur the map with OpenCV's default border
  (reflect-101), clip to ``[0.001, 50]``, log, edge-pad by one pixel and take the
  regularised Newton step ``-(H + eps*I)^-1 g`` (eps = float32 eps) at the argmax, always
  (no interior guard); skipped only when that matrix is singular.
* ``dark`` and ``udp`` take their Newton step only when its offset is finite: a map with
  an infinite value (an fp16 map that overflowed at its peak, a map of -inf with one finite
  peak) keeps its integer argmax, as ``quarter`` does.

Differences to the original code, on purpose: we never zero or set to -1 the coordinates
of heatmaps whose maximum is <= 0 (HRNet and MMPose do); scores tell the caller.  A heatmap
containing NaN gives NaN coordinates and a NaN score on every backend; +-inf values never
give NaN coordinates (the score is the maximum, +inf if it is).

Fused kernels read each heatmap once: the argmax scan is the only full pass; the
refinement re-reads a small window around the argmax (DARK: 15x15 for k=11) and evaluates
the blur only at the 13 points the Newton step needs.  The max-preserving rescale only
shifts ``L`` by ``log(c)``, which cancels in every difference, unless the 1e-10 clamp bites;
the kernels detect that case (original max <= 0 or a blurred sample < 2e-10) and then
compute the blurred maximum of the whole map to stay exact.
"""

from __future__ import annotations

import functools

import math
import operator
import struct
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .._backends import Kernel, define_kernels, dispatch
from ._registry import define_op, detached

MODES = ("argmax", "quarter", "dark", "udp")
#: Mode ids shared with the C++/CUDA/Triton kernels (csrc/decode.h).
MODE_ID = {"argmax": 0, "quarter": 1, "dark": 2, "udp": 3}
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_BLUR_KERNEL = 31
DARK_LOG_FLOOR = 1e-10
UDP_CLIP = (0.001, 50.0)
UDP_EPS = float(torch.finfo(torch.float32).eps)

# OpenCV's fixed kernels for odd sizes <= 9 when sigma <= 0 (getGaussianKernel's
# small_gaussian_tab in imgproc/src/smooth.dispatch.cpp), in 1/256 units.
_OPENCV_SMALL_GAUSSIAN = {
    1: [256],
    3: [64, 128, 64],
    5: [16, 64, 96, 64, 16],
    7: [8, 28, 56, 72, 56, 28, 8],
    9: [4, 13, 30, 51, 60, 51, 30, 13, 4],
}


def gaussian_kernel_1d(ksize: int) -> list[float]:
    """OpenCV's ``getGaussianKernel(ksize, sigma=0)`` as float32 values (in a Python list)."""
    if ksize in _OPENCV_SMALL_GAUSSIAN:
        taps = [t / 256 for t in _OPENCV_SMALL_GAUSSIAN[ksize]]
    else:
        sigma = 0.3 * ((ksize - 1) * 0.5 - 1) + 0.8
        scale2 = -0.5 / (sigma * sigma)
        taps = [math.exp(scale2 * (i - (ksize - 1) * 0.5) ** 2) for i in range(ksize)]
        total = sum(taps)
        taps = [t / total for t in taps]
    # OpenCV computes in double and stores float32 for CV_32F images (rounded to nearest
    # by struct's "f" format, with no tensor: this also runs while a CUDA graph captures).
    return [struct.unpack("f", struct.pack("f", t))[0] for t in taps]


# Small constant tensors the kernels take (blur taps, flip index), cached per (values,
# dtype, device) and never evicted, so a captured CUDA graph may keep reading them.
_const_cache: dict[tuple, Tensor] = {}


def _device_constant(values: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``values`` as a 1-D ``dtype`` tensor on ``device``, built by device-side ops only (a
    ``zeros`` and one ``fill_`` per non-zero value), never copied from host memory: a
    pageable host-to-device copy is illegal inside a CUDA-graph capture, and the first call
    may be the one captured.  A tensor made during a capture holds its values only once the
    graph replays, so it is not cached then; later captures and eager calls use the cache."""
    key = (values, dtype, device)
    t = _const_cache.get(key)
    if t is None:
        t = torch.zeros(len(values), dtype=dtype, device=device)
        for i, v in enumerate(values):
            if v != 0:
                t[i].fill_(v)
        if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            _const_cache[key] = t
    return t


def _blur_weights(mode: str, ksize: int, device: torch.device) -> Tensor:
    """1-D float32 Gaussian taps on ``device`` for dark/udp, an empty tensor otherwise
    (capture-safe: :func:`_device_constant`; the taps are exact float32 values)."""
    taps = tuple(gaussian_kernel_1d(ksize)) if mode in ("dark", "udp") else ()
    return _device_constant(taps, torch.float32, device)


# --------------------------------------------------------------------------- validation
def _check_heatmaps(heatmaps, name: str = "heatmaps") -> None:
    if not isinstance(heatmaps, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(heatmaps).__name__}")
    if heatmaps.dim() != 4:
        raise ValueError(f"{name} must be 4-D [B, K, H, W], got shape {tuple(heatmaps.shape)}")
    if heatmaps.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"{name} must be float32, float16 or bfloat16, got {heatmaps.dtype}"
        )
    B, K, H, W = heatmaps.shape
    if B * K > 0 and H * W == 0:
        raise ValueError(f"{name} has an empty spatial size {H}x{W}; no maximum to decode")


def _check_decode_args(heatmaps, mode, affine, blur_kernel) -> None:
    _check_heatmaps(heatmaps)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if (
        not isinstance(blur_kernel, int)
        or isinstance(blur_kernel, bool)
        or blur_kernel < 1
        or blur_kernel % 2 == 0
        or blur_kernel > MAX_BLUR_KERNEL
    ):
        raise ValueError(
            f"blur_kernel must be an odd int in [1, {MAX_BLUR_KERNEL}], got {blur_kernel!r}"
        )
    if affine is not None:
        if not isinstance(affine, Tensor):
            raise TypeError(f"affine must be a torch.Tensor or None, got {type(affine).__name__}")
        B = heatmaps.shape[0]
        if tuple(affine.shape) != (B, 2, 3):
            raise ValueError(
                f"affine must have shape [B, 2, 3] = [{B}, 2, 3] to match heatmaps, "
                f"got {tuple(affine.shape)}"
            )
        if not affine.is_floating_point():
            raise ValueError(f"affine must be a floating-point tensor, got {affine.dtype}")
        if affine.device != heatmaps.device:
            raise ValueError(
                f"affine is on {affine.device} but heatmaps is on {heatmaps.device}"
            )


def _joint_index(j) -> int:
    """An integer joint index (Python / NumPy / 0-d tensor ints); floats and bools are refused
    rather than truncated (``1.7`` is not joint 1)."""
    if isinstance(j, Tensor):
        if j.dim() != 0 or j.is_floating_point() or j.dtype == torch.bool:
            raise TypeError(f"{j!r} is not an integer index")
        return int(j)
    if isinstance(j, bool) or not hasattr(j, "__index__"):
        raise TypeError(f"{j!r} is not an integer index")
    return operator.index(j)


def flip_index_from_pairs(flip_pairs, num_joints: int) -> list[int]:
    """Permutation ``idx`` with ``merged joint k <- flipped joint idx[k]`` from left/right pairs."""
    if isinstance(flip_pairs, Tensor):
        if flip_pairs.is_floating_point() or flip_pairs.is_complex() or flip_pairs.dtype == torch.bool:
            raise ValueError(f"flip_pairs must hold integer joint indices, got a {flip_pairs.dtype} tensor")
        flip_pairs = flip_pairs.tolist()
    try:
        pairs = [tuple(_joint_index(j) for j in p) for p in flip_pairs]
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"flip_pairs must be a sequence of (left, right) joint index pairs of integers ({exc})"
        ) from None
    index = list(range(num_joints))
    seen: set[int] = set()
    for pair in pairs:
        if len(pair) != 2:
            raise ValueError(f"flip_pairs entries must be pairs, got {pair}")
        a, b = pair
        for j in (a, b):
            if not 0 <= j < num_joints:
                raise ValueError(
                    f"flip_pairs index {j} is out of range for K={num_joints} joints"
                )
            if j in seen:
                raise ValueError(f"flip_pairs lists joint {j} more than once")
            seen.add(j)
        if a == b:
            raise ValueError(f"flip_pairs pairs joint {a} with itself")
        index[a], index[b] = b, a
    return index


def _check_flip_args(heatmaps, flipped, flip_index) -> None:
    _check_heatmaps(heatmaps, "heatmaps")
    _check_heatmaps(flipped, "flipped")
    if flipped.shape != heatmaps.shape:
        raise ValueError(
            f"flipped must have the shape of heatmaps {tuple(heatmaps.shape)}, "
            f"got {tuple(flipped.shape)}"
        )
    if flipped.dtype != heatmaps.dtype:
        raise ValueError(f"flipped is {flipped.dtype} but heatmaps is {heatmaps.dtype}")
    if flipped.device != heatmaps.device:
        raise ValueError(f"flipped is on {flipped.device} but heatmaps is on {heatmaps.device}")
    K = heatmaps.shape[1]
    if len(flip_index) != K or sorted(flip_index) != list(range(K)):
        raise ValueError(
            f"flip_index must be a permutation of range(K={K}), got {list(flip_index)}"
        )


# --------------------------------------------------------------------------- reference
def _sign(d: Tensor) -> Tensor:
    # 0 for NaN differences, unlike torch.sign.
    return (d > 0).to(d.dtype) - (d < 0).to(d.dtype)


def _reflect101(n: int, r: int, device) -> Tensor:
    """OpenCV BORDER_REFLECT_101 indices for positions -r .. n-1+r of a length-n axis."""
    i = torch.arange(-r, n + r, device=device)
    if n == 1:
        return torch.zeros_like(i)
    period = 2 * n - 2
    i = torch.remainder(i, period)
    return torch.where(i >= n, period - i, i)


def _blur_separable(padded: Tensor, g: Tensor, H: int, W: int) -> Tensor:
    """Valid separable filtering of ``padded [M, H+k-1, W+k-1]``: rows first, then columns,
    as OpenCV's separable filter.  Written as shifted multiply-adds rather than conv2d so
    no backend (cuDNN's TF32, oneDNN's Winograd) changes the arithmetic."""
    k = g.numel()
    rows = sum(g[j] * padded[:, :, j : j + W] for j in range(k))
    return sum(g[i] * rows[:, i : i + H, :] for i in range(k))


def decode_heatmaps_reference(
    heatmaps: Tensor, mode: str, affine: Optional[Tensor], blur_kernel: int
) -> tuple[Tensor, Tensor]:
    """Pure-PyTorch decode (float32 arithmetic); the specification of every kernel."""
    B, K, H, W = heatmaps.shape
    x = heatmaps.float().reshape(B * K, H, W)
    flat = x.reshape(B * K, H * W)
    idx = flat.argmax(dim=1)  # first maximum
    scores = flat.gather(1, idx[:, None])[:, 0]
    px, py = idx % W, idx // W
    cx, cy = px.float(), py.float()

    def at(field: Tensor, dy: int, dx: int) -> Tensor:
        yy = (py + dy).clamp(0, H - 1)
        xx = (px + dx).clamp(0, W - 1)
        return field.reshape(B * K, H * W).gather(1, (yy * W + xx)[:, None])[:, 0]

    if mode == "quarter":
        interior = (px > 1) & (px < W - 1) & (py > 1) & (py < H - 1)
        ox = 0.25 * _sign(at(x, 0, 1) - at(x, 0, -1))
        oy = 0.25 * _sign(at(x, 1, 0) - at(x, -1, 0))
        cx = torch.where(interior, cx + ox, cx)
        cy = torch.where(interior, cy + oy, cy)
    elif mode in ("dark", "udp"):
        g = _blur_weights(mode, blur_kernel, x.device)
        r = blur_kernel // 2
        if mode == "dark":
            blurred = _blur_separable(F.pad(x, (r, r, r, r)), g, H, W)
            bmax = blurred.reshape(B * K, -1).amax(dim=1)
            valid = (scores > 0) & (bmax != 0)
            c = torch.where(valid, scores / torch.where(valid, bmax, 1.0), 1.0)
            L = torch.log(torch.clamp_min(blurred * c[:, None, None], DARK_LOG_FLOOR))
            f0 = at(L, 0, 0)
            dx = 0.5 * (at(L, 0, 1) - at(L, 0, -1))
            dy = 0.5 * (at(L, 1, 0) - at(L, -1, 0))
            dxx = 0.25 * (at(L, 0, 2) - 2 * f0 + at(L, 0, -2))
            dyy = 0.25 * (at(L, 2, 0) - 2 * f0 + at(L, -2, 0))
            dxy = 0.25 * (at(L, 1, 1) - at(L, -1, 1) - at(L, 1, -1) + at(L, -1, -1))
            interior = (px > 1) & (px < W - 2) & (py > 1) & (py < H - 2)
            hxx, hyy = dxx, dyy
            apply = interior & valid
        else:
            rows = _reflect101(H, r, x.device)
            cols = _reflect101(W, r, x.device)
            blurred = _blur_separable(x[:, rows][:, :, cols], g, H, W)
            L = torch.log(torch.clamp(blurred, *UDP_CLIP))
            i0 = at(L, 0, 0)
            ix1, ix1_ = at(L, 0, 1), at(L, 0, -1)
            iy1, iy1_ = at(L, 1, 0), at(L, -1, 0)
            dx = 0.5 * (ix1 - ix1_)
            dy = 0.5 * (iy1 - iy1_)
            hxx = (ix1 - 2 * i0 + ix1_) + UDP_EPS
            hyy = (iy1 - 2 * i0 + iy1_) + UDP_EPS
            dxy = 0.5 * (at(L, 1, 1) - ix1 - iy1 + i0 + i0 - ix1_ - iy1_ + at(L, -1, -1))
            apply = torch.ones_like(px, dtype=torch.bool)
        # The step is taken where the Hessian is invertible and the offset finite (an
        # infinite sample keeps the integer argmax; csrc/decode.h newton_offset).
        det = hxx * hyy - dxy * dxy
        apply = apply & (det != 0)
        safe = torch.where(apply, det, 1.0)
        ox = -(hyy * dx - dxy * dy) / safe
        oy = -(hxx * dy - dxy * dx) / safe
        apply = apply & torch.isfinite(ox) & torch.isfinite(oy)
        cx = torch.where(apply, cx + ox, cx)
        cy = torch.where(apply, cy + oy, cy)

    if affine is not None:
        A = affine.float().repeat_interleave(K, dim=0)
        cx, cy = (
            A[:, 0, 0] * cx + A[:, 0, 1] * cy + A[:, 0, 2],
            A[:, 1, 0] * cx + A[:, 1, 1] * cy + A[:, 1, 2],
        )
    coords = torch.stack([cx, cy], dim=-1)
    has_nan = torch.isnan(flat).any(dim=1)
    if bool(has_nan.any()):
        coords = torch.where(has_nan[:, None], float("nan"), coords)
        scores = torch.where(has_nan, float("nan"), scores)
    return coords.reshape(B, K, 2), scores.reshape(B, K)


def flip_merge_reference(heatmaps: Tensor, flipped: Tensor, flip_index: Sequence[int], shift: bool) -> Tensor:
    """HRNet's ``flip_back`` + optional one-pixel shift + average, in float32."""
    f = flipped.float()[:, list(flip_index)].flip(-1)
    if shift and f.shape[-1] > 1:
        f = torch.cat([f[..., :1], f[..., :-1]], dim=-1)
    return ((heatmaps.float() + f) * 0.5).to(heatmaps.dtype).contiguous()


# --------------------------------------------------------------------------- kernel tables
def _affine_f32(affine: Optional[Tensor]) -> Optional[Tensor]:
    if affine is None or (affine.dtype is torch.float32 and affine.is_contiguous()):
        return affine  # the common case, without two calls through torch's argument parser
    return affine.to(torch.float32).contiguous()


def _flip_index_tensor(flip_index: Sequence[int], device: torch.device) -> Tensor:
    """``flip_index`` as an int64 ``[K]`` tensor on ``device`` (capture-safe, cached:
    :func:`_device_constant`)."""
    return _device_constant(tuple(flip_index), torch.int64, device)  # ints: the op's int[]


def _decode_kernel_args(heatmaps, mode, affine, blur_kernel):
    """The op's arguments as the kernels take them (csrc/schemas.h ``decode_heatmaps``)."""
    return heatmaps, MODE_ID[mode], _affine_f32(affine), _blur_weights(mode, blur_kernel, heatmaps.device)


def _flip_kernel_args(heatmaps, flipped, flip_index, shift):
    """The op's arguments as the kernels take them (csrc/schemas.h ``flip_merge``)."""
    return heatmaps, flipped, _flip_index_tensor(flip_index, heatmaps.device), shift


def _example_decode(device):
    hm = torch.rand(2, 17, 64, 48, device=device)
    return (hm, "dark", None, 11)


def _example_flip(device):
    hm = torch.rand(2, 17, 64, 48, device=device)
    return (hm, hm.clone(), list(range(17)), True)


# One kernel per backend.  The compiled ops (csrc/cpu/decode_kernel.cpp,
# csrc/cuda/decode_kernel.cu) and the Triton launchers (triton/decode.py) share one calling
# convention, the C++ schema; the reference takes the op's own arguments.
_DECODE = Kernel(symbol="decode_heatmaps", adapt=_decode_kernel_args)
DECODE_KERNELS = define_kernels(
    "decode_heatmaps", ("heatmaps", "mode", "affine", "blur_kernel"), tensor_args=("heatmaps",),
    example_inputs=_example_decode,
    reference=decode_heatmaps_reference,
    cpu=_DECODE,
    cuda=_DECODE,
    triton=Kernel(symbol="decode_heatmaps_triton", adapt=_decode_kernel_args),
)
_FLIP = Kernel(symbol="flip_merge", adapt=_flip_kernel_args)
FLIP_MERGE_KERNELS = define_kernels(
    "flip_merge", ("heatmaps", "flipped", "flip_index", "shift"), tensor_args=("heatmaps", "flipped"),
    example_inputs=_example_flip,
    reference=flip_merge_reference,
    cpu=_FLIP,
    cuda=_FLIP,
    triton=Kernel(symbol="flip_merge_triton", adapt=_flip_kernel_args),
)


# --------------------------------------------------------------------------- torch.library ops
def _decode_heatmaps_forward(
    heatmaps: Tensor, mode: str, affine: Optional[Tensor], blur_kernel: int
) -> tuple[Tensor, Tensor]:
    _check_decode_args(heatmaps, mode, affine, blur_kernel)
    B, K = heatmaps.shape[:2]
    if B * K == 0:
        return _decode_heatmaps_fake(heatmaps, mode, affine, blur_kernel)
    return dispatch("decode_heatmaps", heatmaps.device, detached(heatmaps), mode, detached(affine), blur_kernel)


def _decode_heatmaps_fake(heatmaps, mode, affine, blur_kernel):
    _check_decode_args(heatmaps, mode, affine, blur_kernel)
    B, K = heatmaps.shape[:2]
    return (
        heatmaps.new_empty((B, K, 2), dtype=torch.float32),
        heatmaps.new_empty((B, K), dtype=torch.float32),
    )


def _flip_merge_forward(heatmaps: Tensor, flipped: Tensor, flip_index: list[int], shift: bool) -> Tensor:
    _check_flip_args(heatmaps, flipped, flip_index)
    if heatmaps.numel() == 0:
        return torch.empty_like(heatmaps, memory_format=torch.contiguous_format)
    return dispatch("flip_merge", heatmaps.device, detached(heatmaps), detached(flipped), flip_index, shift)


def _flip_merge_fake(heatmaps, flipped, flip_index, shift):
    _check_flip_args(heatmaps, flipped, flip_index)
    return torch.empty_like(heatmaps, memory_format=torch.contiguous_format)


_decode_heatmaps_op = define_op("decode_heatmaps", _decode_heatmaps_forward, fake=_decode_heatmaps_fake)
_flip_merge_op = define_op("flip_merge", _flip_merge_forward, fake=_flip_merge_fake)


def decode_heatmaps(
    heatmaps: Tensor,
    mode: str = "quarter",
    affine: Optional[Tensor] = None,
    blur_kernel: int = 11,
) -> tuple[Tensor, Tensor]:
    """Decode keypoints from heatmaps in one fused pass.

    Args:
        heatmaps: ``[B, K, H, W]`` float32/float16/bfloat16, any strides.
        mode: ``"argmax"``, ``"quarter"`` (HRNet), ``"dark"`` (DarkPose) or ``"udp"`` (MMPose UDP).
        affine: optional ``[B, 2, 3]`` mapping heatmap pixel ``(x, y, 1)`` to output coordinates.
        blur_kernel: odd Gaussian size for ``dark``/``udp`` (OpenCV's sigma rule).

    Returns:
        ``coords [B, K, 2]`` float32 ``(x, y)`` and ``scores [B, K]`` float32 (heatmap maxima).
        See the module docstring for the exact formulas, border guards and NaN behaviour.
    """
    # Arguments that torch's argument parser would refuse with its own message, or convert
    # (blur_kernel=True into 1), are checked here; the op's forward checks the rest (the
    # same function: one full check per call, which costs ~5 us on a cold cache).
    if not (isinstance(heatmaps, Tensor) and isinstance(mode, str) and type(blur_kernel) is int
            and (affine is None or isinstance(affine, Tensor))):
        _check_decode_args(heatmaps, mode, affine, blur_kernel)
    return _decode_heatmaps_op(heatmaps, mode, affine, blur_kernel)


def flip_merge(heatmaps: Tensor, flipped: Tensor, flip_pairs, shift: bool = True) -> Tensor:
    """Merge the heatmaps of a horizontally flipped input into ``heatmaps`` (HRNet flip test).

    Args:
        heatmaps: ``[B, K, H, W]`` heatmaps of the original images.
        flipped: ``[B, K, H, W]`` heatmaps of the flipped images (same dtype and device).
        flip_pairs: ``(left, right)`` joint pairs, e.g. ``COCO_FLIP_PAIRS``; a list or an int
            tensor ``[P, 2]``.
        shift: shift the mirrored maps one pixel right as HRNet's ``SHIFT_HEATMAP`` does.

    Returns:
        ``0.5 * (heatmaps + mirror(flipped))`` in the dtype of ``heatmaps``, contiguous.
        Computed in float32.  Not differentiable (an inference op).
    """
    if not (isinstance(heatmaps, Tensor) and heatmaps.dim() == 4):  # the op checks the rest
        _check_heatmaps(heatmaps, "heatmaps")
    if not isinstance(shift, bool):  # bool('no') is True: refuse rather than guess
        raise TypeError(f"shift must be a bool, got {type(shift).__name__} {shift!r}")
    return _flip_merge_op(heatmaps, flipped, _flip_index(flip_pairs, heatmaps.shape[1]), shift)


def _flip_index(flip_pairs, num_joints: int) -> list[int]:
    """:func:`flip_index_from_pairs`, cached for pairs given as plain ints (the usual
    constant lists: ~7 µs of validation per call otherwise, issue 12's flip_merge roofline).
    Only exact ``int`` entries are cached, so ``1.0`` or ``True`` still meet the checks."""
    if isinstance(flip_pairs, (list, tuple)):
        try:
            key = tuple(tuple(p) for p in flip_pairs)
        except TypeError:
            key = None
        if key is not None and all(type(j) is int for p in key for j in p):
            return list(_flip_index_cached(key, num_joints))
    return flip_index_from_pairs(flip_pairs, num_joints)


@functools.lru_cache(maxsize=64)
def _flip_index_cached(pairs: tuple, num_joints: int) -> tuple[int, ...]:
    return tuple(flip_index_from_pairs(pairs, num_joints))
