"""Triton kernels for the Multi-Instance Modulation Block (two-phase path).

The specification is the PyTorch reference in :mod:`mipnet_kernels.ops.mimb`
(``mimb_scale_fwd_reference``, ``mimb_scale_bwd_reference``, ``mimb_instances_reference``).

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

Two launches per op (the two-phase path of the issue's design; a single-pass cooperative
kernel is not written for Triton):

1. ``_mimb_reduce_mlp_kernel``: per ``(b, channel block, HW split)`` program, the sum over
   its share of HW of ``x`` (forward, instances) or ``dy * x`` (backward) into a
   ``[B, SPLIT, C]`` partial buffer.  ``SPLIT > 1`` only when ``B * C`` alone gives too few
   programs to fill the GPU (small batch, large maps).  Each program then takes a ticket
   from a per-sample atomic counter; the last program of a sample to arrive sums the
   partials in a fixed order (deterministic, no float atomics) and runs the tiny
   per-sample MLP (``O(C * C/r)``) over ``[C/r, MLP_C]`` weight tiles: forward the scale
   ``a = sigmoid(W2 relu(W1 s)) * v`` (or ``* table[n]`` for every instance ``n``);
   backward also ``dv``, ``g_s / HW`` and the per-sample vectors ``g_z2, h, g_z1`` whose
   batch sums ``g_z2.T @ h`` and ``g_z1.T @ s`` are ``dw2`` and ``dw1`` (backward only:
   ``_batch_outer_kernel``, two small launches, float32 FMA -- not torch matmuls, whose
   precision follows the user's global TF32 setting, ``torch.backends.cuda.matmul.allow_tf32``
   / ``torch.set_float32_matmul_precision``).
2. ``_mimb_scale_kernel``: ``out[n*B + b] = in[b] * a[n, b, :] (+ bias[b, :])`` over
   ``[BLOCK_C, BLOCK_P]`` tiles, the input tile loaded once and ``N`` outputs written
   (forward: ``N = 1``, ``in = x``; backward: ``in = dy``, ``bias = g_s / HW``; instances:
   ``a[n, b] = e[b] * table[n]``).

Arithmetic is float32 (float64 for float64 inputs, so gradcheck can run through these
kernels) and every output is rounded once to its dtype.  The sigmoid and the means use
IEEE division and libdevice ``exp`` (:mod:`._math`), not Triton's default ``div.full.f32``
and ``ex2.approx.f32``: the MLP runs once per sample in one program, so exactness costs
nothing measurable, and the result is the CUDA backend's ``1.0f / (1.0f + expf(-z))`` bit
for bit and within 1 ulp of the reference's sigmoid (the approximate ``exp`` of ``-z`` is
off by up to ``|z| * 1.44 * 2^-24`` relative, ~20 ulp of ``e`` at ``|z| = 16``).

Bytes moved: forward reads x twice and writes y once (the single-pass kernel will read it
once where the sample fits on chip); backward reads x and dy, then dy again, and writes dx.

The kernels are launched with ``enable_fp_fusion=False`` so that ``dy * a + bias`` is a
separate multiply and add, as in the reference (memory-bound: costs nothing).
"""

from __future__ import annotations

import contextlib
import math
from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..ops.mimb import (
    _dense,
    _instances_branch,
    _scale_bwd_branch,
    _scale_fwd_branch,
    compute_dtype,
    out_memory_format,
)
from . import _math
from ._launch import launch, num_warps

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
    split, chunk = _split(B, C, HW, t["BLOCK_C"], t["BLOCK_P"])
    return dict(t, SPLIT=split, CHUNK=chunk)


def _split(B: int, C: int, HW: int, block_c: int, block_p: int) -> tuple[int, int]:
    """``(SPLIT, CHUNK)`` of the reduction for ``[block_c, block_p]`` tiles."""
    programs = B * triton.cdiv(C, block_c)
    tiles = triton.cdiv(HW, block_p)
    split = max(1, min(tiles, _TARGET_PROGRAMS // max(programs, 1)))
    chunk = triton.cdiv(tiles, split) * block_p
    return triton.cdiv(HW, chunk), chunk


def _device_guard(t: Tensor):
    # Triton launches on the current CUDA device; make it the tensor's device.
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


# --------------------------------------------------------------------------- kernels
@triton.jit
def _mimb_mlp_hidden(part_ptr, s_ptr, w1_ptr, b, C, CR, HW, SPLIT, sw1_r, sw1_c,
                     FROM_PARTIALS: tl.constexpr, MLP_C: tl.constexpr, CR_PAD: tl.constexpr):
    """``z1 = W1 @ s`` of sample ``b`` (``[CR_PAD]``, zero past CR).

    FROM_PARTIALS: ``s`` is the sum of the ``SPLIT`` partial rows of ``part`` over ``HW``,
    and is stored to ``s_ptr``; else ``s`` is read from ``s_ptr``.
    """
    ACC = part_ptr.dtype.element_ty
    rs = tl.arange(0, CR_PAD)
    rmask = rs < CR
    cols = tl.arange(0, MLP_C)
    b64 = b.to(tl.int64)
    z1 = tl.zeros([CR_PAD], ACC)
    for c0 in range(0, C, MLP_C):
        cc = c0 + cols
        cm = cc < C
        if FROM_PARTIALS:
            sc = tl.zeros([MLP_C], ACC)
            for sp in range(SPLIT):  # fixed order: deterministic
                # .cg: read from L2, never a stale L1 line (the partials come from other SMs)
                sc += tl.load(part_ptr + (b64 * SPLIT + sp) * C + cc, mask=cm, other=0.0,
                              cache_modifier=".cg")
            sc = _math.div(sc, tl.full([], HW, ACC))
            tl.store(s_ptr + b64 * C + cc, sc, mask=cm)
        else:
            sc = tl.load(s_ptr + b64 * C + cc, mask=cm, other=0.0)
        wm = rmask[:, None] & cm[None, :]
        w1t = tl.load(w1_ptr + rs[:, None] * sw1_r + cc[None, :] * sw1_c, mask=wm, other=0.0).to(ACC)
        # Padded lanes masked out of the sum, not zero-filled: 0 * inf = NaN would make a
        # sample with one infinite mean NaN everywhere (the reference's NaN is per element).
        z1 += tl.sum(tl.where(wm, w1t * sc[None, :], 0.0), axis=1)
    return z1


@triton.jit
def _mimb_excite_chunk(w2_ptr, h, cc, cm, CR, sw2_c, sw2_r, CR_PAD: tl.constexpr):
    """``e = sigmoid(W2[cc] @ h)`` for the channels ``cc`` (and the ``W2[cc]`` tile)."""
    ACC = h.dtype
    rs = tl.arange(0, CR_PAD)
    wm = cm[:, None] & (rs < CR)[None, :]
    w2t = tl.load(w2_ptr + cc[:, None] * sw2_c + rs[None, :] * sw2_r, mask=wm, other=0.0).to(ACC)
    z2 = tl.sum(tl.where(wm, w2t * h[None, :], 0.0), axis=1)  # padded lanes out (0 * inf)
    # IEEE division and libdevice exp: the CUDA backend's 1.0f / (1.0f + expf(-z)), bit for bit.
    return _math.div(tl.full([], 1.0, ACC), 1.0 + _math.exp(-z2)), w2t


@triton.jit
def _reduce_mlp_program(
    pid,  # program id within this launch (within the branch for grouped launches)
    x_ptr,  # input, shape (B, C, H, W), NCHW or NHWC (strides below), float16/bfloat16/float32/float64
    dy_ptr,  # upstream gradient, x's shape, layout and dtype (read iff MODE == 2)
    part_ptr,  # scratch partial sums, shape (B, SPLIT, C), contiguous, accumulation dtype ACC
    count_ptr,  # per-sample arrival tickets, shape (B,), int32, zero on entry
    w1_ptr,  # squeeze weight, shape (CR, C), any strides/float dtype
    w2_ptr,  # excite weight, shape (C, CR), any strides/float dtype
    mult_ptr,  # MODE 0/2: v (B, C); MODE 1: table (N, C); any strides/float dtype
    s_ptr,  # (B, C) ACC: MODE 0/1 output mean_hw(x); MODE 2 input (the forward's s)
    a_ptr,  # output per-channel scales, shape (NA, B, C), ACC: a[n, b] = e[b] * mult[row]
    dv_ptr,  # MODE 2 outputs, all (B, .) ACC: dv = g_a * e        (B, C)
    gz2_ptr,  #   g_z2 = g_a * v * e * (1 - e)                      (B, C)
    h_ptr,  #     h = relu(z1)                                       (B, CR)
    gz1_ptr,  #   g_z1 = (g_z2 @ W2) * (z1 > 0)                      (B, CR)
    bias_ptr,  #  g_s / HW = (g_z1 @ W1) / HW                        (B, C)
    B,  # samples
    C,  # channels
    CR,  # hidden width C / r
    HW,  # pixels per channel, H * W
    stride_c,  # element stride of a channel (HW for NCHW, 1 for NHWC)
    stride_p,  # element stride of a pixel (1 for NCHW, C for NHWC)
    CHUNK,  # pixels per split (a multiple of BLOCK_P)
    num_cblocks,  # cdiv(C, BLOCK_C)
    SPLIT,  # HW splits per (b, channel block)
    NA,  # rows of a: 1 (MODE 0/2) or N (MODE 1)
    sw1_r, sw1_c, sw2_c, sw2_r, smult_r, smult_c,  # element strides of w1, w2, mult
    MODE: tl.constexpr,  # 0 forward (mult = v), 1 instances (mult = table), 2 backward
    BLOCK_C: tl.constexpr,  # channels per reduction tile (power of two)
    BLOCK_P: tl.constexpr,  # pixels per reduction tile (power of two)
    MLP_C: tl.constexpr,  # channels per step of the MLP (power of two)
    CR_PAD: tl.constexpr,  # next power of two >= CR
):
    ACC = part_ptr.dtype.element_ty
    # pid = ((b * num_cblocks) + cblock) * SPLIT + split
    split = pid % SPLIT
    bc = pid // SPLIT
    b = bc // num_cblocks
    cblk = bc - b * num_cblocks
    b64 = b.to(tl.int64)

    # ---- phase 1: this program's share of sum_hw(x) (or sum_hw(dy * x)) -> partials
    cs = cblk * BLOCK_C + tl.arange(0, BLOCK_C)  # channels, shape (BLOCK_C,)
    cmask = cs < C
    base = b64 * C * HW  # first element of sample b
    coff = cs * stride_c  # shape (BLOCK_C,)
    lanes = tl.arange(0, BLOCK_P)
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, HW)
    acc = tl.zeros([BLOCK_C, BLOCK_P], ACC)
    for p0 in range(start, end, BLOCK_P):
        ps = p0 + lanes
        offs = base + coff[:, None] + (ps * stride_p)[None, :]
        m = cmask[:, None] & (ps < end)[None, :]
        v = tl.load(x_ptr + offs, mask=m, other=0.0).to(ACC)
        if MODE == 2:
            v = v * tl.load(dy_ptr + offs, mask=m, other=0.0).to(ACC)
        acc += v
    tl.store(part_ptr + (b64 * SPLIT + split) * C + cs, tl.sum(acc, axis=1), mask=cmask)

    # ---- phase 2: the last program of sample b to arrive runs the tiny MLP.  The barrier
    # orders every thread's partial stores before the ticket's release (the atomic is
    # acq_rel at GPU scope), the "last block" pattern of CUDA's threadFenceReduction sample.
    tl.debug_barrier()
    ticket = tl.atomic_add(count_ptr + b, 1)
    if ticket == num_cblocks * SPLIT - 1:
        cols = tl.arange(0, MLP_C)
        rs = tl.arange(0, CR_PAD)
        rmask = rs < CR
        z1 = _mimb_mlp_hidden(part_ptr, s_ptr, w1_ptr, b, C, CR, HW, SPLIT, sw1_r, sw1_c,
                              MODE != 2, MLP_C, CR_PAD)
        h = tl.where(z1 < 0.0, 0.0, z1)  # relu with NaN propagating, as torch.relu
        if MODE == 2:
            gz1 = tl.zeros([CR_PAD], ACC)
        for c0 in range(0, C, MLP_C):
            cc = c0 + cols
            cm = cc < C
            e, w2t = _mimb_excite_chunk(w2_ptr, h, cc, cm, CR, sw2_c, sw2_r, CR_PAD)
            if MODE == 1:
                for n in range(NA):
                    t = tl.load(mult_ptr + n * smult_r + cc * smult_c, mask=cm, other=0.0).to(ACC)
                    tl.store(a_ptr + (n * B + b64) * C + cc, e * t, mask=cm)
            else:
                vv = tl.load(mult_ptr + b64 * smult_r + cc * smult_c, mask=cm, other=0.0).to(ACC)
                tl.store(a_ptr + b64 * C + cc, e * vv, mask=cm)
                if MODE == 2:
                    g_a = tl.zeros([MLP_C], ACC)
                    for sp in range(SPLIT):
                        g_a += tl.load(part_ptr + (b64 * SPLIT + sp) * C + cc, mask=cm, other=0.0,
                                       cache_modifier=".cg")
                    tl.store(dv_ptr + b64 * C + cc, g_a * e, mask=cm)
                    g_z2 = g_a * vv * e * (1.0 - e)
                    tl.store(gz2_ptr + b64 * C + cc, g_z2, mask=cm)
                    gz1 += tl.sum(tl.where(cm[:, None] & rmask[None, :], w2t * g_z2[:, None], 0.0), axis=0)
        if MODE == 2:
            gz1 = tl.where(z1 > 0.0, gz1, 0.0)
            tl.store(h_ptr + b64 * CR + rs, h, mask=rmask)
            tl.store(gz1_ptr + b64 * CR + rs, gz1, mask=rmask)
            for c0 in range(0, C, MLP_C):
                cc = c0 + cols
                cm = cc < C
                w1t = tl.load(w1_ptr + rs[:, None] * sw1_r + cc[None, :] * sw1_c,
                              mask=rmask[:, None] & cm[None, :], other=0.0).to(ACC)
                g_s = tl.sum(tl.where(rmask[:, None] & cm[None, :], w1t * gz1[:, None], 0.0), axis=0)
                tl.store(bias_ptr + b64 * C + cc, _math.div(g_s, tl.full([], HW, ACC)), mask=cm)


@triton.jit
def _scale_program(
    pid,  # program id within this launch (within the branch for grouped launches)
    in_ptr,  # input (x, or dy in backward), shape (B, C, H, W), NCHW or NHWC (strides below)
    a_ptr,  # per-channel scales, shape (N, B, C), contiguous, accumulation dtype
    bias_ptr,  # per-channel additive term, shape (B, C), a's dtype (read iff HAS_BIAS)
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
    ACC = a_ptr.dtype.element_ty
    # pid = ((b * num_cblocks) + cblock) * num_pblocks + pblock
    pblk = pid % num_pblocks
    bc = pid // num_pblocks
    b = bc // num_cblocks
    cblk = bc - b * num_cblocks
    cs = cblk * BLOCK_C + tl.arange(0, BLOCK_C)  # channels, shape (BLOCK_C,)
    ps = pblk * BLOCK_P + tl.arange(0, BLOCK_P)  # pixels, shape (BLOCK_P,)
    cmask = cs < C
    m = cmask[:, None] & (ps < HW)[None, :]
    offs = cs[:, None] * stride_c + ps[None, :] * stride_p  # within a sample, int32
    v = tl.load(in_ptr + b.to(tl.int64) * C * HW + offs, mask=m, other=0.0).to(ACC)
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


# Single-op kernels: the programs above with every size a kernel argument (Triton
# specialises unit strides and 16-divisible sizes, so the loads vectorise).
@triton.jit
def _mimb_reduce_mlp_kernel(
    x_ptr, dy_ptr, part_ptr, count_ptr, w1_ptr, w2_ptr, mult_ptr, s_ptr, a_ptr,
    dv_ptr, gz2_ptr, h_ptr, gz1_ptr, bias_ptr,
    B, C, CR, HW, stride_c, stride_p, CHUNK, num_cblocks, SPLIT, NA,
    sw1_r, sw1_c, sw2_c, sw2_r, smult_r, smult_c,
    MODE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    MLP_C: tl.constexpr, CR_PAD: tl.constexpr,
):
    _reduce_mlp_program(
        tl.program_id(0), x_ptr, dy_ptr, part_ptr, count_ptr, w1_ptr, w2_ptr, mult_ptr, s_ptr, a_ptr,
        dv_ptr, gz2_ptr, h_ptr, gz1_ptr, bias_ptr,
        B, C, CR, HW, stride_c, stride_p, CHUNK, num_cblocks, SPLIT, NA,
        sw1_r, sw1_c, sw2_c, sw2_r, smult_r, smult_c,
        MODE, BLOCK_C, BLOCK_P, MLP_C, CR_PAD,
    )


@triton.jit
def _mimb_scale_kernel(
    in_ptr, a_ptr, bias_ptr, out_ptr, B, C, HW, N, stride_c, stride_p, num_pblocks, num_cblocks,
    HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    _scale_program(tl.program_id(0), in_ptr, a_ptr, bias_ptr, out_ptr, B, C, HW, N, stride_c, stride_p,
                   num_pblocks, num_cblocks, HAS_BIAS, BLOCK_C, BLOCK_P)


@triton.jit
def _batch_outer_kernel(
    a_ptr,  # shape (B, M), contiguous, float32/float64
    b_ptr,  # shape (B, N), contiguous, a's dtype
    out_ptr,  # output a.T @ b, shape (M, N), contiguous, a's dtype
    B, M, N,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """``out = a.T @ b`` as ``B`` rank-1 updates in a's dtype (the weight gradients: B is the
    batch, a few dozen at most, so the tile stays in registers and no tensor core -- no TF32
    -- is involved)."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mm = rm < M
    mn = rn < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], out_ptr.dtype.element_ty)
    for i in range(B):  # fixed order: deterministic
        av = tl.load(a_ptr + i * M + rm, mask=mm, other=0.0)
        bv = tl.load(b_ptr + i * N + rn, mask=mn, other=0.0)
        acc += av[:, None] * bv[None, :]
    tl.store(out_ptr + rm[:, None] * N + rn[None, :], acc, mask=mm[:, None] & mn[None, :])


@triton.jit(do_not_specialize=[f"v{i}" for i in range(24)])
def _meta_row_kernel(
    out_ptr,  # output: one row of a meta table, shape (NCOL,), int32
    v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, v10, v11,  # the row's values (int32 scalars)
    v12, v13, v14, v15, v16, v17, v18, v19, v20, v21, v22, v23,
    NCOL: tl.constexpr,  # <= 24 values stored
):
    """Writes a meta-table row from kernel arguments: no host-to-device copy, so a CUDA
    graph can capture it (the values are baked into the launch)."""
    vals = (v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, v10, v11,
            v12, v13, v14, v15, v16, v17, v18, v19, v20, v21, v22, v23)
    for i in tl.static_range(NCOL):
        tl.store(out_ptr + i, vals[i])


# Grouped kernels: up to four branch tensors (HRNet's branches: different C, H, W; one dtype
# and layout) in one launch.  Program ids are concatenated branch by branch; each branch's
# sizes and workspace offsets are a row of an int32 ``meta`` table (written on the device by
# ``_meta_row_kernel`` from kernel arguments and cached per shape signature, so no launch
# copies from the host and CUDA graphs can capture even a first call); its tensors are
# kernel arguments.  The tiles are common to the group (those
# of its largest branch); the unit stride is a literal (LAYOUT), and ALIGNED promises that
# every branch's contiguous extent is a multiple of 16 so the loads still vectorise (checked
# in the sm_90 PTX: 128-bit loads and stores, as the single-op kernel).
@triton.jit
def _branch_of(pid, meta_ptr, G: tl.constexpr, NCOL: tl.constexpr):
    """The branch owning program ``pid``: the last whose first program (column 0) is <= pid."""
    g = pid * 0
    for i in tl.static_range(1, G):
        g = tl.where(pid >= tl.load(meta_ptr + i * NCOL), i, g)
    return g


@triton.jit
def _pick(g, p0, p1, p2, p3, G: tl.constexpr):
    """``(p0, p1, p2, p3)[g]`` for the first ``G``."""
    p = p0
    if G > 1:
        if g == 1:
            p = p1
    if G > 2:
        if g == 2:
            p = p2
    if G > 3:
        if g == 3:
            p = p3
    return p


_RM_COLS = ("start", "B", "C", "CR", "HW", "chunk", "num_cblocks", "split", "na", "sw1_r", "sw1_c",
            "sw2_c", "sw2_r", "smult_r", "smult_c", "part", "s", "a", "dv", "gz2", "h", "gz1", "bias", "count")
_SC_COLS = ("start", "B", "C", "HW", "N", "num_pblocks", "num_cblocks", "a", "bias")


@triton.jit
def _mimb_reduce_mlp_grouped_kernel(
    meta_ptr,  # int32 (G, 24): the _RM_COLS of each branch
    ws_ptr,  # accumulation-dtype workspace: every branch's part, s, a, dv, gz2, h, gz1, bias
    count_ptr,  # int32 tickets, zero on entry
    x0, x1, x2, x3, dy0, dy1, dy2, dy3, w1_0, w1_1, w1_2, w1_3, w2_0, w2_1, w2_2, w2_3, m0, m1, m2, m3,
    G: tl.constexpr, LAYOUT: tl.constexpr, ALIGNED: tl.constexpr, MODE: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, MLP_C: tl.constexpr, CR_PAD: tl.constexpr,
):
    NCOL: tl.constexpr = 24
    pid = tl.program_id(0)
    g = _branch_of(pid, meta_ptr, G, NCOL)
    row = meta_ptr + g * NCOL
    C = tl.load(row + 2)
    HW = tl.load(row + 4)
    # The unit stride a literal and, when ALIGNED, the contiguous extent marked a multiple
    # of 16 (and so the sample offsets b * C * HW): the loads and stores vectorise.  Written
    # inline: hints applied inside a called @jit function do not reach this kernel's loads.
    if LAYOUT == 0:
        if ALIGNED:
            HW = tl.multiple_of(HW, 16)
        stride_c = HW
        stride_p = 1
    else:
        if ALIGNED:
            C = tl.multiple_of(C, 16)
        stride_c = 1
        stride_p = C
    _reduce_mlp_program(
        pid - tl.load(row + 0),
        _pick(g, x0, x1, x2, x3, G), _pick(g, dy0, dy1, dy2, dy3, G),
        ws_ptr + tl.load(row + 15), count_ptr + tl.load(row + 23),
        _pick(g, w1_0, w1_1, w1_2, w1_3, G), _pick(g, w2_0, w2_1, w2_2, w2_3, G), _pick(g, m0, m1, m2, m3, G),
        ws_ptr + tl.load(row + 16), ws_ptr + tl.load(row + 17), ws_ptr + tl.load(row + 18),
        ws_ptr + tl.load(row + 19), ws_ptr + tl.load(row + 20), ws_ptr + tl.load(row + 21),
        ws_ptr + tl.load(row + 22),
        tl.load(row + 1), C, tl.load(row + 3), HW, stride_c, stride_p,
        tl.load(row + 5), tl.load(row + 6), tl.load(row + 7), tl.load(row + 8),
        tl.load(row + 9), tl.load(row + 10), tl.load(row + 11), tl.load(row + 12),
        tl.load(row + 13), tl.load(row + 14),
        MODE, BLOCK_C, BLOCK_P, MLP_C, CR_PAD,
    )


@triton.jit
def _mimb_scale_grouped_kernel(
    meta_ptr,  # int32 (G, 9): the _SC_COLS of each branch
    ws_ptr,  # the reduction's workspace (a and bias of every branch)
    in0, in1, in2, in3, out0, out1, out2, out3,
    G: tl.constexpr, LAYOUT: tl.constexpr, ALIGNED: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    NCOL: tl.constexpr = 9
    pid = tl.program_id(0)
    g = _branch_of(pid, meta_ptr, G, NCOL)
    row = meta_ptr + g * NCOL
    C = tl.load(row + 2)
    HW = tl.load(row + 3)
    # The unit stride a literal and, when ALIGNED, the contiguous extent marked a multiple
    # of 16 (and so the sample offsets b * C * HW): the loads and stores vectorise.  Written
    # inline: hints applied inside a called @jit function do not reach this kernel's loads.
    if LAYOUT == 0:
        if ALIGNED:
            HW = tl.multiple_of(HW, 16)
        stride_c = HW
        stride_p = 1
    else:
        if ALIGNED:
            C = tl.multiple_of(C, 16)
        stride_c = 1
        stride_p = C
    _scale_program(
        pid - tl.load(row + 0), _pick(g, in0, in1, in2, in3, G),
        ws_ptr + tl.multiple_of(tl.load(row + 7), 16), ws_ptr + tl.multiple_of(tl.load(row + 8), 16),
        _pick(g, out0, out1, out2, out3, G),
        tl.load(row + 1), C, HW, tl.load(row + 4), stride_c, stride_p,
        tl.load(row + 5), tl.load(row + 6), HAS_BIAS, BLOCK_C, BLOCK_P,
    )


# --------------------------------------------------------------------------- launch helpers
def _check_sizes(x: Tensor) -> None:
    B, C, H, W = x.shape
    if B * C == 0 or H * W == 0:
        raise ValueError(f"x must be non-empty with H*W > 0, got shape {list(x.shape)}")
    if (C + _MAX_BLOCK_C) * (H * W + _MAX_BLOCK_P) > _INT32_MAX:
        raise ValueError(f"x samples of {C}x{H}x{W} elements exceed the kernels' int32 offsets")


def _mlp_settings(C: int, CR: int, warps: int) -> dict:
    """``MLP_C, CR_PAD``: the MLP steps over ``[CR_PAD, MLP_C]`` weight tiles of at most
    ``1024 * warps`` elements (32 per thread) and at least 16 channels."""
    cr_pad = triton.next_power_of_2(max(CR, 1))
    mlp_c = max(16, min(triton.next_power_of_2(C), min(4096, 1024 * warps) // cr_pad))
    return dict(MLP_C=mlp_c, CR_PAD=cr_pad)


def _reduce_mlp(mode: int, x: Tensor, dy: Tensor | None, w1: Tensor, w2: Tensor, mult: Tensor,
                s: Tensor | None) -> dict:
    """Launch ``_mimb_reduce_mlp_kernel``; returns its outputs by name (see the kernel).

    mode 0: ``s, a [1, B, C]``; mode 1 (``mult = table``): ``s, a [N, B, C]``;
    mode 2 (``s`` given): ``a, dv, gz2, h, gz1, bias``.
    """
    B, C, H, W = x.shape
    HW = H * W
    CR = w1.shape[0]
    acc = compute_dtype(x)
    stride_c, stride_p, cl = _strides(x)
    settings = _reduce_settings(B, C, HW, cl)
    split, chunk = settings.pop("SPLIT"), settings.pop("CHUNK")
    settings.update(_mlp_settings(C, CR, settings["num_warps"]))
    num_cblocks = triton.cdiv(C, settings["BLOCK_C"])
    na = mult.shape[0] if mode == 1 else 1

    def buf(*shape):
        return torch.empty(shape, dtype=acc, device=x.device)

    out = {"a": buf(na, B, C)}
    if mode == 2:
        out.update(dv=buf(B, C), gz2=buf(B, C), h=buf(B, CR), gz1=buf(B, CR), bias=buf(B, C))
        out["s"] = s.to(acc).contiguous()
    else:
        out["s"] = buf(B, C)
    part = buf(B, split, C)
    count = torch.zeros(B, dtype=torch.int32, device=x.device)
    o = lambda k: out.get(k, part)  # noqa: E731  (unused outputs point at scratch)
    with _device_guard(x):
        launch(
            _mimb_reduce_mlp_kernel, (B * num_cblocks * split,),
            x, x if dy is None else dy, part, count, w1, w2, mult,
            out["s"], out["a"], o("dv"), o("gz2"), o("h"), o("gz1"), o("bias"),
            B, C, CR, HW, stride_c, stride_p, chunk, num_cblocks, split, na,
            w1.stride(0), w1.stride(1), w2.stride(0), w2.stride(1), mult.stride(0), mult.stride(1),
            MODE=mode,
            enable_fp_fusion=False,
            **settings,
        )
    return out


def _scale(inp: Tensor, a: Tensor, bias: Tensor | None, out: Tensor) -> Tensor:
    """``out[n*B + b] = inp[b] * a[n, b] (+ bias[b])`` with ``a [N, B, C]`` contiguous."""
    B, C, H, W = inp.shape
    HW = H * W
    N = a.shape[0]
    stride_c, stride_p, cl = _strides(inp)
    settings = _tile_settings(C, HW, cl)
    num_pblocks = triton.cdiv(HW, settings["BLOCK_P"])
    num_cblocks = triton.cdiv(C, settings["BLOCK_C"])
    with _device_guard(inp):
        launch(
            _mimb_scale_kernel, (B * num_cblocks * num_pblocks,),
            inp, a, a if bias is None else bias, out,
            B, C, HW, N, stride_c, stride_p, num_pblocks, num_cblocks,
            HAS_BIAS=bias is not None,
            enable_fp_fusion=False,
            **settings,
        )
    return out


def _outer_settings(M: int, N: int) -> dict:
    """``BLOCK_M, BLOCK_N, num_warps`` of ``_batch_outer_kernel`` (tiles of <= 64 x 64)."""
    bm = min(triton.next_power_of_2(M), 64)
    bn = min(triton.next_power_of_2(N), 64)
    return dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=num_warps(bm * bn))


def _batch_outer(a: Tensor, b: Tensor) -> Tensor:
    """``a.T @ b`` for ``a [B, M]``, ``b [B, N]`` contiguous, in their dtype, precision
    independent of torch's matmul settings."""
    B, M = a.shape
    N = b.shape[1]
    out = torch.empty((M, N), dtype=a.dtype, device=a.device)
    settings = _outer_settings(M, N)
    with _device_guard(a):
        launch(
            _batch_outer_kernel, (triton.cdiv(M, settings["BLOCK_M"]), triton.cdiv(N, settings["BLOCK_N"])),
            a, b, out, B, M, N, enable_fp_fusion=True,  # FMA: one rounding per update
            **settings,
        )
    return out


def _weight_grads(r: dict) -> tuple[Tensor, Tensor]:
    """``(dw1, dw2) = (g_z1.T @ s, g_z2.T @ h)`` in the accumulation dtype."""
    return _batch_outer(r["gz1"], r["s"]), _batch_outer(r["gz2"], r["h"])


# --------------------------------------------------------------------------- launchers
def mimb_scale_fwd_triton(x: Tensor, w1: Tensor, w2: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Forward: ``(y, s)``, ``y`` in ``x``'s dtype and layout, ``s [B, C]`` in the compute dtype."""
    x = _dense(x)
    _check_sizes(x)
    r = _reduce_mlp(0, x, None, w1, w2, v, None)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=out_memory_format(x))
    _scale(x, r["a"], None, y)
    return y, r["s"]


def mimb_scale_bwd_triton(
    dy: Tensor, x: Tensor, w1: Tensor, w2: Tensor, v: Tensor, s: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward: ``(dx, dw1, dw2, dv)`` (formulas in :mod:`mipnet_kernels.ops.mimb`).

    The per-sample MLP backward runs in the reduction kernel; the two batch sums of the
    weight gradients (``dw2 = g_z2.T @ h``, ``dw1 = g_z1.T @ s``) in ``_batch_outer_kernel``.
    """
    x = _dense(x)
    _check_sizes(x)
    fmt = out_memory_format(x)
    dy = dy.contiguous(memory_format=fmt)  # no copy when dy already has x's layout
    r = _reduce_mlp(2, x, dy, w1, w2, v, s)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    _scale(dy, r["a"], r["bias"], dx)
    dw1, dw2 = _weight_grads(r)
    return (
        dx,
        dw1.to(w1.dtype).contiguous(),
        dw2.to(w2.dtype).contiguous(),
        r["dv"].to(v.dtype),
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
    r = _reduce_mlp(1, x, None, w1, w2, table, None)
    _scale(x, r["a"], None, y)
    return y


# --------------------------------------------------------------------------- grouped launches
#: Branches per grouped launch (the kernels take four tensor slots per argument).
_GROUP = 4
_META_CACHE: dict = {}
_META_CACHE_MAX = 256


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _meta(rows: list[tuple[int, ...]], device: torch.device) -> Tensor:
    """The int32 meta table of a grouped launch, cached per (device, contents).

    Written on the device by ``_meta_row_kernel`` (one launch per row, values as kernel
    arguments), never copied from host memory, so a first call inside a CUDA-graph capture
    works.  A table made during a capture lives in the graph's memory pool and holds its
    values only once the graph replays: it is not cached, and a capture never reads the
    cache either (an eviction would free memory the graph still reads).
    """
    capturing = _capturing(device)
    key = (device, tuple(rows))
    table = None if capturing else _META_CACHE.get(key)
    if table is None:
        if any(not -(2**31) <= v < 2**31 for row in rows for v in row):
            raise ValueError("grouped MIMB launch: a size or offset exceeds int32")
        ncol = len(rows[0])
        table = torch.empty((len(rows), ncol), dtype=torch.int32, device=device)
        with _device_guard(table):
            for i, row in enumerate(rows):
                launch(_meta_row_kernel, (1,), table[i], *row, *([0] * (24 - ncol)), NCOL=ncol,
                       num_warps=1, enable_fp_fusion=False)
        if not capturing:
            if len(_META_CACHE) >= _META_CACHE_MAX:
                _META_CACHE.clear()
            _META_CACHE[key] = table
    return table


def _layout_class(x: Tensor) -> int:
    """0: pixels contiguous (NCHW), 1: channels contiguous (NHWC) -- see ``_strides``."""
    return 0 if _strides(x)[1] == 1 else 1


def _groups(xs: Sequence[Tensor], *others: Sequence[Tensor]) -> list[list[int]]:
    """Branch indices in launch groups of at most ``_GROUP`` with one layout and one dtype
    per argument slot (the kernels' tensor slots share a pointer type)."""
    by_key: dict = {}
    for i, x in enumerate(xs):
        key = (_layout_class(x), x.dtype) + tuple(o[i].dtype for o in others)
        by_key.setdefault(key, []).append(i)
    return [idx[k:k + _GROUP] for idx in by_key.values() for k in range(0, len(idx), _GROUP)]


def _four(ts: Sequence[Tensor]) -> list[Tensor]:
    return list(ts) + [ts[0]] * (_GROUP - len(ts))


def _group_tiles(xs: Sequence[Tensor]) -> tuple[int, dict, bool]:
    """``(LAYOUT, tile settings of the largest branch, ALIGNED)`` of a launch group."""
    layout = _layout_class(xs[0])
    big = max(xs, key=lambda t: t.numel())
    B, C, H, W = big.shape
    tiles = _tile_settings(C, H * W, layout == 1)
    aligned = all((x.shape[2] * x.shape[3] if layout == 0 else x.shape[1]) % 16 == 0 for x in xs)
    return layout, tiles, aligned


class _Workspace:
    """Regions of one accumulation-dtype buffer, each starting at a multiple of 16 elements."""

    def __init__(self) -> None:
        self.size = 0

    def region(self, n: int) -> int:
        offset = self.size
        self.size += triton.cdiv(max(n, 1), 16) * 16
        return offset


def _grouped_reduce_mlp(mode: int, xs, dys, w1s, w2s, mults, ss) -> tuple[Tensor, list[dict], tuple]:
    """One ``_mimb_reduce_mlp_grouped_kernel`` launch over a launch group.

    Returns the workspace, per branch the views of its outputs (as ``_reduce_mlp``), and the
    group's tile settings (reused by the scale launch).
    """
    acc = compute_dtype(xs[0])
    device = xs[0].device
    layout, tiles, aligned = _group_tiles(xs)
    mlp = _mlp_settings(max(x.shape[1] for x in xs), max(w.shape[0] for w in w1s), tiles["num_warps"])
    ws, rows, regions = _Workspace(), [], []
    start = count = 0
    for x, w1, w2, mult in zip(xs, w1s, w2s, mults):
        B, C, H, W = x.shape
        CR = w1.shape[0]
        split, chunk = _split(B, C, H * W, tiles["BLOCK_C"], tiles["BLOCK_P"])
        num_cblocks = triton.cdiv(C, tiles["BLOCK_C"])
        na = mult.shape[0] if mode == 1 else 1
        r = {"part": ws.region(B * split * C), "s": ws.region(B * C), "a": ws.region(na * B * C)}
        sizes = {"s": (B, C), "a": (na, B, C)}
        if mode == 2:
            for k, shape in (("dv", (B, C)), ("gz2", (B, C)), ("h", (B, CR)), ("gz1", (B, CR)), ("bias", (B, C))):
                r[k] = ws.region(math.prod(shape))
                sizes[k] = shape
        rows.append((start, B, C, CR, H * W, chunk, num_cblocks, split, na, *w1.stride(), *w2.stride(),
                     *mult.stride(), *(r.get(k, 0) for k in ("part", "s", "a", "dv", "gz2", "h", "gz1", "bias")),
                     count))
        regions.append((r, sizes))
        start += B * num_cblocks * split
        count += B
    buf = torch.empty(ws.size, dtype=acc, device=device)
    views = [{k: buf[r[k]:r[k] + math.prod(shape)].view(shape) for k, shape in sizes.items()}
             for r, sizes in regions]
    if mode == 2:
        for v, s in zip(views, ss):
            v["s"].copy_(s)
    tickets = torch.zeros(count, dtype=torch.int32, device=device)
    meta = _meta(rows, device)
    with _device_guard(xs[0]):
        launch(
            _mimb_reduce_mlp_grouped_kernel, (start,),
            meta, buf, tickets,
            *_four(xs), *_four(dys if dys is not None else xs), *_four(w1s), *_four(w2s), *_four(mults),
            G=len(xs), LAYOUT=layout, ALIGNED=aligned, MODE=mode,
            BLOCK_C=tiles["BLOCK_C"], BLOCK_P=tiles["BLOCK_P"], num_warps=tiles["num_warps"],
            enable_fp_fusion=False, **mlp,
        )
    return buf, views, (layout, tiles, aligned, [r for r, _ in regions])


def _grouped_scale(ins, outs, buf: Tensor, group: tuple, has_bias: bool) -> None:
    """One ``_mimb_scale_grouped_kernel`` launch: ``outs[i] = ins[i] * a_i (+ bias_i)``."""
    layout, tiles, aligned, regions = group
    rows, start = [], 0
    for inp, out, r in zip(ins, outs, regions):
        B, C, H, W = inp.shape
        num_pblocks = triton.cdiv(H * W, tiles["BLOCK_P"])
        num_cblocks = triton.cdiv(C, tiles["BLOCK_C"])
        rows.append((start, B, C, H * W, out.shape[0] // B, num_pblocks, num_cblocks, r["a"], r.get("bias", 0)))
        start += B * num_cblocks * num_pblocks
    meta = _meta(rows, buf.device)
    with _device_guard(ins[0]):
        launch(
            _mimb_scale_grouped_kernel, (start,),
            meta, buf, *_four(ins), *_four(outs),
            G=len(ins), LAYOUT=layout, ALIGNED=aligned, HAS_BIAS=has_bias,
            BLOCK_C=tiles["BLOCK_C"], BLOCK_P=tiles["BLOCK_P"], num_warps=tiles["num_warps"],
            enable_fp_fusion=False,
        )


def _by_groups(n: int, nonempty: Sequence[int], groups: list[list[int]], run_group, run_single) -> list:
    """Results for branches ``0..n-1``: launch groups over ``nonempty``, ``run_single`` else."""
    out: list = [None] * n
    for group in groups:
        idx = [nonempty[k] for k in group]
        for i, res in zip(idx, run_group(idx)):
            out[i] = res
    for i in range(n):
        if out[i] is None:
            out[i] = run_single(i)
    return out


def mimb_scale_grouped_fwd_triton(xs, w1s, w2s, vs) -> tuple[list[Tensor], list[Tensor]]:
    """``mimb_scale_fwd_triton`` over branch lists: two launches per launch group."""
    xs = [_dense(x) for x in xs]
    live = [i for i, x in enumerate(xs) if x.numel() > 0]
    for i in live:
        _check_sizes(xs[i])

    def run(idx):
        gx = [xs[i] for i in idx]
        buf, views, group = _grouped_reduce_mlp(0, gx, None, [w1s[i] for i in idx], [w2s[i] for i in idx],
                                                [vs[i] for i in idx], None)
        ys = [torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=out_memory_format(x)) for x in gx]
        _grouped_scale(gx, ys, buf, group, False)
        return [(y, v["s"].clone()) for y, v in zip(ys, views)]  # own storage: outputs must not alias

    single = _scale_fwd_branch(mimb_scale_fwd_triton)
    groups = _groups([xs[i] for i in live], [w1s[i] for i in live], [w2s[i] for i in live],
                     [vs[i] for i in live])
    res = _by_groups(len(xs), live, groups, run, lambda i: single(xs[i], w1s[i], w2s[i], vs[i]))
    return [r[0] for r in res], [r[1] for r in res]


def mimb_scale_grouped_bwd_triton(dys, xs, w1s, w2s, vs, ss):
    """``mimb_scale_bwd_triton`` over branch lists: two launches per launch group (plus the
    two weight-gradient launches per branch)."""
    xs = [_dense(x) for x in xs]
    dys = [dy.contiguous(memory_format=out_memory_format(x)) for dy, x in zip(dys, xs)]
    live = [i for i, x in enumerate(xs) if x.numel() > 0]
    for i in live:
        _check_sizes(xs[i])

    def run(idx):
        gx, gdy = [xs[i] for i in idx], [dys[i] for i in idx]
        buf, views, group = _grouped_reduce_mlp(2, gx, gdy, [w1s[i] for i in idx], [w2s[i] for i in idx],
                                                [vs[i] for i in idx], [ss[i] for i in idx])
        dxs = [torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=out_memory_format(x)) for x in gx]
        _grouped_scale(gdy, dxs, buf, group, True)
        out = []
        for dx, r, i in zip(dxs, views, idx):
            dw1, dw2 = _weight_grads(r)
            out.append((dx, dw1.to(w1s[i].dtype), dw2.to(w2s[i].dtype), r["dv"].to(vs[i].dtype, copy=True)))
        return out

    single = _scale_bwd_branch(mimb_scale_bwd_triton)
    groups = _groups([xs[i] for i in live], [dys[i] for i in live], [w1s[i] for i in live],
                     [w2s[i] for i in live], [vs[i] for i in live])
    res = _by_groups(len(xs), live, groups, run,
                     lambda i: single(dys[i], xs[i], w1s[i], w2s[i], vs[i], ss[i]))
    return tuple([r[k] for r in res] for k in range(4))


def mimb_instances_grouped_triton(xs, w1s, w2s, tables) -> list[Tensor]:
    """``mimb_instances_triton`` over branch lists: two launches per launch group."""
    xs = [_dense(x) for x in xs]
    live = [i for i, x in enumerate(xs) if x.numel() > 0 and tables[i].shape[0] > 0]
    for i in live:
        _check_sizes(xs[i])

    def run(idx):
        gx = [xs[i] for i in idx]
        gt = [tables[i] for i in idx]
        buf, _, group = _grouped_reduce_mlp(1, gx, None, [w1s[i] for i in idx], [w2s[i] for i in idx], gt, None)
        ys = [torch.empty((t.shape[0] * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device,
                          memory_format=out_memory_format(x)) for x, t in zip(gx, gt)]
        _grouped_scale(gx, ys, buf, group, False)
        return ys

    single = _instances_branch(mimb_instances_triton)
    groups = _groups([xs[i] for i in live], [w1s[i] for i in live], [w2s[i] for i in live],
                     [tables[i] for i in live])
    return _by_groups(len(xs), live, groups, run, lambda i: single(xs[i], w1s[i], w2s[i], tables[i]))


__all__ = [
    "mimb_instances_grouped_triton",
    "mimb_instances_triton",
    "mimb_scale_bwd_triton",
    "mimb_scale_fwd_triton",
    "mimb_scale_grouped_bwd_triton",
    "mimb_scale_grouped_fwd_triton",
]
