"""Triton kernels for the Multi-Instance Modulation Block (two-phase path).

The specification is the PyTorch reference in :mod:`mipnet_kernels.ops.mimb`
(``mimb_scale_fwd_reference``, ``mimb_scale_bwd_reference``, ``mimb_instances_reference``).
All arithmetic is float32 after the load; every output is rounded once to its dtype.

Layouts.  The op layer hands these launchers ``x`` NCHW-contiguous or channels_last (NHWC).
Both are addressed the same way: sample ``b``, channel ``c``, pixel ``p = h*W + w`` sits at
``b*C*HW + c*stride_c + p*stride_p`` with ``(stride_c, stride_p) = (HW, 1)`` for NCHW and
``(1, C)`` for NHWC.  The kernels take the two strides as ordinary integer arguments: Triton
specialises an integer argument equal to 1, so the unit stride is a compile-time constant,
the coalescing pass sees which tile axis is contiguous and vectorises along it (HW for NCHW,
C for NHWC).  The launch settings (``_tile_settings``) shape the ``[BLOCK_C, BLOCK_P]`` tile
so that its contiguous axis is the long one.  When ``HW == 1`` or ``C == 1`` the two layouts
are the same bytes and the NHWC (resp. NCHW) view is used, whose contiguous axis is the
non-trivial one.  ``y`` / ``dx`` get ``x``'s layout (``ops.mimb.out_memory_format``); ``dy``
is brought to ``x``'s layout (a copy only when autograd hands a different one).

Two phases (the fallback of the issue's design; the single-pass cooperative kernel is not
written yet):

1. ``_mimb_reduce_kernel``: per ``(b, channel block, HW split)`` program, the float32 sum
   over its share of HW of ``x`` (forward, instances) or ``dy * x`` (backward) into a
   ``[B, SPLIT, C]`` float32 partial buffer.  ``SPLIT > 1`` only when ``B * C`` alone gives
   too few programs to fill the GPU (small batch, large maps); the partials are then summed
   in a fixed order (deterministic, no atomics).
2. The tiny per-sample MLP (``O(B * C * C/r)``) in plain torch ops on ``[B, C]`` float32
   tensors, written exactly as the reference writes it.
3. ``_mimb_scale_kernel``: ``out[n*B + b] = in[b] * a[n, b, :] (+ bias[b, :])`` over
   ``[BLOCK_C, BLOCK_P]`` tiles, the input tile loaded once and ``N`` outputs written
   (forward: ``N = 1``, ``in = x``; backward: ``in = dy``, ``bias = g_s / HW``; instances:
   ``a[n, b] = e[b] * table[n]``).

Bytes moved: forward reads x twice and writes y once (the single-pass kernel will read it
once where the sample fits on chip); backward reads x and dy, then dy again, and writes dx.

The kernels are launched with ``enable_fp_fusion=False`` so that ``dy * a + bias`` is a
separate multiply and add, as in the reference (memory-bound: costs nothing).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..ops.mimb import _dense, _excite, out_memory_format
from ._launch import num_warps

#: Elements per tile of both kernels: 16 float32 per thread at 8 warps (4 x 16-byte vectors).
_TILE_ELEMS = 4096
#: Widest channel block in the NHWC layout (a 256-channel row is 1 KiB of float32).
_MAX_BLOCK_C = 256
#: Longest pixel block in the NCHW layout.
_MAX_BLOCK_P = 1024
#: The reduction splits HW until it has about this many programs (~8 per SM on an H100).
_TARGET_PROGRAMS = 1024
_INT32_MAX = 2**31 - 1


# --------------------------------------------------------------------------- launch settings


def _strides(x: Tensor) -> tuple[int, int, bool]:
    """``(stride_c, stride_p, channels_last)`` of the dense view of ``x [B, C, H, W]``."""
    B, C, H, W = x.shape
    HW = H * W
    if HW == 1:  # both layouts are the same bytes: channels contiguous
        return 1, C, True
    if C == 1:  # same again: pixels contiguous
        return HW, 1, False
    if x.is_contiguous():
        return HW, 1, False
    if x.is_contiguous(memory_format=torch.channels_last):
        return 1, C, True
    raise ValueError("x must be NCHW-contiguous or channels_last")  # the op layer ensures it


def _fit_block(n: int, block: int, floor: int) -> int:
    """Halve ``block`` (not below ``floor``) while the masked tail of ``n`` exceeds n/8.

    E.g. C = 384 gets 128-channel blocks (no tail) instead of 256 + a half-empty 256.
    """
    while block > floor and triton.cdiv(n, block) * block - n > n // 8:
        block //= 2
    return block


def _tile_settings(C: int, HW: int, channels_last: bool) -> dict:
    """``BLOCK_C, BLOCK_P, num_warps`` of a ``[BLOCK_C, BLOCK_P]`` tile (channels x pixels).

    The contiguous axis gets the long side (NCHW: pixels, up to 1024; NHWC: channels, up to
    256; halved by ``_fit_block`` while that leaves a large masked tail) and the other axis
    fills the tile to at most ``_TILE_ELEMS`` elements; neither side
    exceeds the tensor's extent rounded up to a power of two.
    """
    c2, p2 = triton.next_power_of_2(C), triton.next_power_of_2(HW)
    if channels_last:
        block_c = _fit_block(C, min(c2, _MAX_BLOCK_C), 32)
        block_p = min(p2, max(_TILE_ELEMS // block_c, 1))
    else:
        block_p = _fit_block(HW, min(p2, _MAX_BLOCK_P), 128)
        block_c = min(c2, max(_TILE_ELEMS // block_p, 1))
    return dict(BLOCK_C=block_c, BLOCK_P=block_p, num_warps=num_warps(block_c * block_p))


def _reduce_settings(B: int, C: int, HW: int, channels_last: bool) -> dict:
    """Tile settings of the reduction plus ``SPLIT`` (HW chunks) and ``CHUNK`` (pixels each).

    ``CHUNK`` is a multiple of ``BLOCK_P``; ``SPLIT`` grows until there are about
    ``_TARGET_PROGRAMS`` programs or every chunk is a single tile.
    """
    t = _tile_settings(C, HW, channels_last)
    programs = B * triton.cdiv(C, t["BLOCK_C"])
    tiles = triton.cdiv(HW, t["BLOCK_P"])
    split = max(1, min(tiles, _TARGET_PROGRAMS // max(programs, 1)))
    chunk = triton.cdiv(tiles, split) * t["BLOCK_P"]
    split = triton.cdiv(HW, chunk)
    return dict(t, SPLIT=split, CHUNK=chunk)


def _device_guard(t: Tensor):
    # Triton launches on the current CUDA device; make it the tensor's device.
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


# --------------------------------------------------------------------------- kernels
@triton.jit
def _mimb_reduce_kernel(
    x_ptr,  # input, shape (B, C, H, W), NCHW or NHWC (strides below), float32/float16/bfloat16
    dy_ptr,  # upstream gradient, shape (B, C, H, W), x's layout and dtype (read iff PRODUCT)
    part_ptr,  # output partial sums, shape (B, SPLIT, C), contiguous float32
    C,  # channels
    HW,  # pixels per channel, H * W
    stride_c,  # element stride of a channel (HW for NCHW, 1 for NHWC)
    stride_p,  # element stride of a pixel (1 for NCHW, C for NHWC)
    CHUNK,  # pixels per split (a multiple of BLOCK_P)
    num_cblocks,  # cdiv(C, BLOCK_C)
    SPLIT,  # HW splits per (b, channel block)
    PRODUCT: tl.constexpr,  # sum dy * x (backward) instead of x
    BLOCK_C: tl.constexpr,  # channels per tile (power of two)
    BLOCK_P: tl.constexpr,  # pixels per tile (power of two)
):
    pid = tl.program_id(0)  # ((b * num_cblocks) + cblock) * SPLIT + split
    split = pid % SPLIT
    bc = pid // SPLIT
    b = bc // num_cblocks
    cblk = bc - b * num_cblocks
    cs = cblk * BLOCK_C + tl.arange(0, BLOCK_C)  # channels, shape (BLOCK_C,)
    cmask = cs < C
    base = b.to(tl.int64) * C * HW  # first element of sample b
    coff = cs * stride_c  # shape (BLOCK_C,)
    lanes = tl.arange(0, BLOCK_P)
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, HW)
    acc = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
    for p0 in range(start, end, BLOCK_P):
        ps = p0 + lanes
        offs = base + coff[:, None] + (ps * stride_p)[None, :]
        m = cmask[:, None] & (ps < end)[None, :]
        v = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        if PRODUCT:
            v = v * tl.load(dy_ptr + offs, mask=m, other=0.0).to(tl.float32)
        acc += v
    total = tl.sum(acc, axis=1)  # shape (BLOCK_C,)
    tl.store(part_ptr + (b.to(tl.int64) * SPLIT + split) * C + cs, total, mask=cmask)


@triton.jit
def _mimb_scale_kernel(
    in_ptr,  # input (x, or dy in backward), shape (B, C, H, W), NCHW or NHWC (strides below)
    a_ptr,  # per-channel scales, shape (N, B, C), contiguous float32
    bias_ptr,  # per-channel additive term, shape (B, C), contiguous float32 (read iff HAS_BIAS)
    out_ptr,  # output, shape (N*B, C, H, W), in's layout and dtype
    B,  # samples
    C,  # channels
    HW,  # pixels per channel, H * W
    N,  # outputs per input (instances; 1 for mimb_scale fwd/bwd)
    stride_c,  # element stride of a channel (HW for NCHW, 1 for NHWC)
    stride_p,  # element stride of a pixel (1 for NCHW, C for NHWC)
    num_pblocks,  # cdiv(HW, BLOCK_P)
    num_cblocks,  # cdiv(C, BLOCK_C)
    HAS_BIAS: tl.constexpr,
    BLOCK_C: tl.constexpr,  # channels per tile (power of two)
    BLOCK_P: tl.constexpr,  # pixels per tile (power of two)
):
    pid = tl.program_id(0)  # ((b * num_cblocks) + cblock) * num_pblocks + pblock
    pblk = pid % num_pblocks
    bc = pid // num_pblocks
    b = bc // num_cblocks
    cblk = bc - b * num_cblocks
    cs = cblk * BLOCK_C + tl.arange(0, BLOCK_C)  # channels, shape (BLOCK_C,)
    ps = pblk * BLOCK_P + tl.arange(0, BLOCK_P)  # pixels, shape (BLOCK_P,)
    cmask = cs < C
    m = cmask[:, None] & (ps < HW)[None, :]
    offs = cs[:, None] * stride_c + ps[None, :] * stride_p  # within a sample, int32
    v = tl.load(in_ptr + b.to(tl.int64) * C * HW + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + b * C + cs, mask=cmask, other=0.0)
    for n in range(N):
        a = tl.load(a_ptr + (n * B + b).to(tl.int64) * C + cs, mask=cmask, other=0.0)
        y = v * a[:, None]
        if HAS_BIAS:
            y = y + bias[:, None]
        if out_ptr.dtype.element_ty == tl.bfloat16:
            # Round to nearest even on the float32 bits (as torch does), so the cast below is
            # exact: the GPU's cvt.rn gives the same bits, and TRITON_INTERPRET=1, whose
            # float32 -> bfloat16 cast truncates, agrees with the GPU.  NaN stays NaN.
            bits = y.to(tl.uint32, bitcast=True)
            hi = bits >> 16
            lo = bits & 0xFFFF
            up = (lo > 0x8000) | ((lo == 0x8000) & ((hi & 1) == 1))
            rounded = ((hi + up.to(tl.uint32)) << 16).to(tl.float32, bitcast=True)
            y = tl.where(y != y, y, rounded)
        tl.store(
            out_ptr + (n * B + b).to(tl.int64) * C * HW + offs,
            y.to(out_ptr.dtype.element_ty),
            mask=m,
        )


# --------------------------------------------------------------------------- launch helpers
def _check_sizes(x: Tensor) -> None:
    B, C, H, W = x.shape
    if B * C == 0 or H * W == 0:
        raise ValueError(f"x must be non-empty with H*W > 0, got shape {list(x.shape)}")
    if (C + _MAX_BLOCK_C) * (H * W + _MAX_BLOCK_P) > _INT32_MAX:
        raise ValueError(f"x samples of {C}x{H}x{W} elements exceed the kernels' int32 offsets")


def _reduce(x: Tensor, dy: Tensor | None) -> Tensor:
    """``sum_hw(x)`` (or ``sum_hw(dy * x)``) as ``[B, C]`` float32."""
    B, C, H, W = x.shape
    HW = H * W
    stride_c, stride_p, cl = _strides(x)
    settings = _reduce_settings(B, C, HW, cl)
    split, chunk = settings.pop("SPLIT"), settings.pop("CHUNK")
    num_cblocks = triton.cdiv(C, settings["BLOCK_C"])
    part = torch.empty((B, split, C), dtype=torch.float32, device=x.device)
    with _device_guard(x):
        _mimb_reduce_kernel[(B * num_cblocks * split,)](
            x,
            x if dy is None else dy,
            part,
            C,
            HW,
            stride_c,
            stride_p,
            chunk,
            num_cblocks,
            split,
            PRODUCT=dy is not None,
            enable_fp_fusion=False,
            **settings,
        )
    return part[:, 0] if split == 1 else part.sum(dim=1)


def _scale(inp: Tensor, a: Tensor, bias: Tensor | None, out: Tensor) -> Tensor:
    """``out[n*B + b] = inp[b] * a[n, b] (+ bias[b])`` with ``a [N, B, C]`` float32."""
    B, C, H, W = inp.shape
    HW = H * W
    N = a.shape[0]
    stride_c, stride_p, cl = _strides(inp)
    settings = _tile_settings(C, HW, cl)
    num_pblocks = triton.cdiv(HW, settings["BLOCK_P"])
    num_cblocks = triton.cdiv(C, settings["BLOCK_C"])
    a = a.contiguous()
    with _device_guard(inp):
        _mimb_scale_kernel[(B * num_cblocks * num_pblocks,)](
            inp,
            a,
            a if bias is None else bias.contiguous(),
            out,
            B,
            C,
            HW,
            N,
            stride_c,
            stride_p,
            num_pblocks,
            num_cblocks,
            HAS_BIAS=bias is not None,
            enable_fp_fusion=False,
            **settings,
        )
    return out








# --------------------------------------------------------------------------- launchers
def mimb_scale_fwd_triton(x: Tensor, w1: Tensor, w2: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Forward phase: ``(y, s)``, ``y`` in ``x``'s dtype and layout, ``s [B, C]`` float32."""
    x = _dense(x)
    _check_sizes(x)
    B, C, H, W = x.shape
    s = _reduce(x, None) / (H * W)
    _, _, e = _excite(s, w1, w2)
    a = e * v.to(torch.float32)
    y = torch.empty((B, C, H, W), dtype=x.dtype, device=x.device, memory_format=out_memory_format(x))
    _scale(x, a[None], None, y)
    return y, s


def mimb_scale_bwd_triton(
    dy: Tensor, x: Tensor, w1: Tensor, w2: Tensor, v: Tensor, s: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward phase: ``(dx, dw1, dw2, dv)`` (formulas in :mod:`mipnet_kernels.ops.mimb`)."""
    x = _dense(x)
    _check_sizes(x)
    B, C, H, W = x.shape
    fmt = out_memory_format(x)
    dy = dy.contiguous(memory_format=fmt)  # no copy when dy already has x's layout
    ct = torch.float32
    s = s.to(ct)
    vf = v.to(ct)
    z1, h, e = _excite(s, w1, w2)
    a = e * vf
    g_a = _reduce(x, dy)
    g_v = g_a * e
    g_z2 = g_a * vf * e * (1 - e)
    dw2 = g_z2.T @ h
    g_z1 = (g_z2 @ w2.to(ct)) * (z1 > 0).to(ct)
    dw1 = g_z1.T @ s
    g_s = g_z1 @ w1.to(ct)
    dx = torch.empty((B, C, H, W), dtype=x.dtype, device=x.device, memory_format=fmt)
    _scale(dy, a[None], g_s / (H * W), dx)
    return (
        dx,
        dw1.to(w1.dtype).contiguous(),
        dw2.to(w2.dtype).contiguous(),
        g_v.to(v.dtype).contiguous(),
    )


def mimb_instances_triton(x: Tensor, w1: Tensor, w2: Tensor, table: Tensor) -> Tensor:
    """All instances from one read of ``x``: ``y[n*B + b] = x[b] * (e[b] * table[n])``."""
    x = _dense(x)
    _check_sizes(x)
    B, C, H, W = x.shape
    N = table.shape[0]
    y = torch.empty((N * B, C, H, W), dtype=x.dtype, device=x.device, memory_format=out_memory_format(x))
    if N == 0:
        return y
    s = _reduce(x, None) / (H * W)
    _, _, e = _excite(s, w1, w2)
    a = e[None, :, :] * table.to(torch.float32)[:, None, :]  # (N, B, C)
    _scale(x, a, None, y)
    return y


__all__ = ["mimb_instances_triton", "mimb_scale_bwd_triton", "mimb_scale_fwd_triton"]
