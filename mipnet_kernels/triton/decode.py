"""Triton kernels for heatmap decoding (argmax / quarter / DARK / UDP + affine) and flip merge.

The specification is the PyTorch reference in :mod:`mipnet_kernels.ops.decode`
(``decode_heatmaps_reference`` / ``flip_merge_reference``); the refinement mirrors
``csrc/decode.h`` (the 13 DARK points and their order, the DARK fast path and exact
fallback, reflect-101, the UDP step, the affine order), so every backend evaluates the same
float32 expressions in the same order, up to the summation order of the blur.

``decode_heatmaps_triton`` is ONE launch.  A program decodes ``MAPS`` heatmaps at once as
``[MAPS, ...]`` tensors (``MAPS`` = 1 for realistic 64x48+ maps):

1. argmax scan over the row-major flat pixel index in ``BLOCK``-sized chunks.  Every lane
   keeps its running maximum and the flat index where it first saw it (strict ``>``), and
   the final reduction takes the lowest index among the lanes holding the maximum: the
   first maximum in row-major order, as ``torch.argmax``.  NaN never wins a comparison; a
   per-map flag turns that map's result into NaN.
2. refinement at the argmax, specialised on ``MODE`` (a ``tl.constexpr``): quarter reads
   4 pixels; DARK / UDP load one ``WIN x WIN`` register window around the argmax (the
   ``k+4`` / ``k+2`` pixels the stencil reaches) and evaluate the separable blur only at
   the 13 / 7 points the Newton step needs (a row pass for each of the 5 / 3 column
   centres, then a column pass per point).  DARK's rare exact fallback (max > 0 but a
   blurred sample < 2e-10, where the 1e-10 log floor may bite) computes the blurred
   maximum of the whole map inside the same program.
3. the affine ``(a00*x + a01*y) + a02`` and the stores.

Why several maps per program for small maps: a program's fixed cost (index set-up, the
reductions, the refinement's scalar-per-map control flow) is the same for a 9x11 map as for
a 64x48 one, so maps of at most 1024 pixels are packed ``MAPS`` to a program
(``MAPS * BLOCK <= 2048``) and the whole refinement is vectorised over maps
(per-map windows are gathers).  Realistic maps (64x48 .. 96x72) get one map per program and
B*K (joints x images x instances) programs, hundreds to thousands, which fills an H100.
Under ``TRITON_INTERPRET=1`` the cost is per program and per op, not per element, so the
packing also keeps the CPU CI fast.

All arithmetic is float32 after the load; divisions are IEEE (``tl.math.div_rn``, not
Triton's default approximate ``div.full.f32``), as in C++/CUDA.  The decode kernel is launched
with ``enable_fp_fusion=False``: with Triton's default the affine compiles to two
``fma.rn.f32`` (checked in the sm_90 PTX of Triton 3.6 and 3.9), which rounds differently
from the reference's separate multiply and add; without it there is no FMA (and ptxas gets
``--fmad=false``), so argmax/quarter + affine are bit-identical to the reference
(``csrc/decode.h`` uses ``__fmul_rn``/``__fadd_rn`` for the same reason).  The Newton step
then also rounds like the reference.  The scan does no float multiply-adds, so this costs
nothing measurable.

``flip_merge_triton`` is one launch of ``[BLOCK_R, BLOCK_W]`` tiles over the ``B*K*H`` rows
of the output (several small maps per program), vectorised along W.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _math
from ._launch import launch, num_warps

# Mode ids shared with csrc/decode.h and mipnet_kernels.ops.decode.MODE_ID.
_ARGMAX, _QUARTER, _DARK, _UDP = 0, 1, 2, 3
_MAX_BLUR_KERNEL = 31

# Tile sizes, in elements.  Register counts: ptxas -v for sm_90a, benchmarks/gpu_resources.md
# (Triton 3.9).  Single-map configurations stay well under 255 registers without spills; the
# packed DARK refinement does not: [16 maps, 16x16] windows (BLOCK 16..64) take 250-255
# registers, and with BLOCK=64 (maps of 33-64 pixels) spill 20/20 B (float32) to 76/76 B
# (float16/bfloat16) -- a cost to weigh against packing fewer maps, not yet measured on a GPU.
#: argmax-scan chunk of one map: covers 64x48 in one step and 96x72 in two, 16 elements in
#: flight per thread at 8 warps (~80 registers).
_TILE_ELEMS = 4096
#: [MAPS, BLOCK] scan tile when small maps are packed several to a program.  The per-map
#: [MAPS] vectors of the refinement dominate the registers (see above), not this tile.
_PACKED_ELEMS = 2048
#: [MAPS, WIN, WIN] DARK/UDP refinement window (k=11: WIN=16, at most 16 maps).
_WINDOW_ELEMS = 4096
#: Pixels per step of DARK's rare whole-map blurred maximum.  Small on purpose: at 4096 it
#: alone pushed the kernel to ~250 registers, capping the scan at one program per SM.
_FALLBACK_ELEMS = 1024
_MIN_BLOCK = 16
_INT32_MAX = 2**31 - 1


# --------------------------------------------------------------------------- launch settings


def _decode_settings(num_maps: int, height: int, width: int, ksize: int) -> dict:
    """Launch parameters of ``_decode_heatmaps_kernel``.

    ``BLOCK``: argmax-scan chunk, the pixel count rounded up to a power of two, clamped to
    [16, 4096] (small maps get small blocks).  ``MAPS``: maps per program: 1 for maps of
    more than 1024 pixels, else as many as fit ``MAPS * BLOCK <= 2048`` and the refinement
    window ``MAPS * WIN^2 <= 4096``, and no more than there are maps.  ``WIN``: side of the register window around the argmax, a power of
    two >= k + 4 (DARK's reach; UDP needs k + 2).  ``FB_BLOCK``: pixels per step of DARK's
    exact fallback (``MAPS * FB_BLOCK <= 1024``).  ``num_warps`` from the largest tile.
    ``ksize`` is 1 for argmax/quarter.
    """
    block = min(max(triton.next_power_of_2(height * width), _MIN_BLOCK), _TILE_ELEMS)
    win = triton.next_power_of_2(ksize + 4)
    maps = 1
    if 2 * block <= _PACKED_ELEMS:  # small maps: pack several per program
        maps = min(
            _PACKED_ELEMS // block,
            max(_WINDOW_ELEMS // (win * win), 1) if ksize > 1 else _PACKED_ELEMS,
            triton.next_power_of_2(num_maps),
        )
    fb_block = max(min(block, _FALLBACK_ELEMS // maps), _MIN_BLOCK)
    return dict(
        MAPS=maps, BLOCK=block, WIN=win, FB_BLOCK=fb_block,
        num_warps=num_warps(max(maps * block, maps * win * win if ksize > 1 else 0)),
    )


def _flip_settings(num_rows: int, width: int) -> dict:
    """Launch parameters of ``_flip_merge_kernel``: ``BLOCK_R, BLOCK_W, num_warps``.

    Tiles of at most 4096 elements: ``BLOCK_W`` covers the row (up to 256 columns), and
    ``BLOCK_R`` rows of the flattened ``B*K*H`` rows fill the rest.
    """
    block_w = min(max(triton.next_power_of_2(width), _MIN_BLOCK), 256)
    block_r = min(triton.next_power_of_2(num_rows), max(_TILE_ELEMS // block_w, 1))
    return dict(BLOCK_R=block_r, BLOCK_W=block_w, num_warps=num_warps(block_r * block_w))


def _device_guard(t: Tensor):
    # Triton launches on the current CUDA device; make it the tensor's device.
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


# --------------------------------------------------------------------------- jit helpers
# Small helpers are written inline in the kernels: the GPU compiler inlines them anyway, and
# under TRITON_INTERPRET=1 every @triton.jit call costs milliseconds per program.


@triton.jit
def _dark_blurred_max(
    map_ptr,  # pointers to the first pixel of each map, shape (MAPS,)
    need,  # maps whose blurred maximum is needed, shape (MAPS,) bool
    g_ptr,  # 1-D Gaussian taps, shape (KSIZE,) float32
    H, W, stride_h, stride_w,
    KSIZE: tl.constexpr, MAPS: tl.constexpr, BLOCK: tl.constexpr,
):
    """Maximum over the whole map of the zero-padded separable blur (DARK's exact path).

    Rare (only when a blurred sample near the peak is < 2e-10 while the max is > 0), so it
    trades speed for simplicity: KSIZE^2 masked gathers per pixel, row filter then column
    filter in tap order as csrc/decode.h blur_zero.  Returns ``(MAPS,)`` float32 (-inf for
    maps not in ``need``).
    """
    R: tl.constexpr = KSIZE // 2
    lanes = tl.arange(0, BLOCK)
    best = tl.full([MAPS, BLOCK], float("-inf"), tl.float32)
    for start in range(0, H * W, BLOCK):
        idx = start + lanes
        inb = idx < H * W
        y = idx // W
        x = idx - y * W
        acc = tl.zeros([MAPS, BLOCK], tl.float32)
        for i in range(KSIZE):
            yy = y + (i - R)
            ymask = inb & (yy >= 0) & (yy < H)
            row = tl.zeros([MAPS, BLOCK], tl.float32)
            for j in range(KSIZE):
                xx = x + (j - R)
                m = ymask & (xx >= 0) & (xx < W)
                offs = yy.to(tl.int64) * stride_h + xx.to(tl.int64) * stride_w
                v = tl.load(
                    map_ptr[:, None] + offs[None, :], mask=need[:, None] & m[None, :], other=0.0
                ).to(tl.float32)
                row += tl.load(g_ptr + j) * v
            acc += tl.load(g_ptr + i) * row
        best = tl.maximum(best, tl.where(inb[None, :], acc, float("-inf")))
    return tl.max(best, axis=1)


@triton.jit
def _refine_dark(
    map_ptr,  # pointers to the first pixel of each map, shape (MAPS,)
    live,  # maps that exist (the last program's tail is masked), shape (MAPS,) bool
    g_ptr,  # 1-D Gaussian taps, shape (KSIZE,) float32
    px, py,  # integer argmax, shape (MAPS,) int32
    x, y,  # coordinates so far, shape (MAPS,) float32
    vmax,  # map maxima, shape (MAPS,) float32
    has_nan,  # maps containing NaN, shape (MAPS,) bool
    H, W, stride_h, stride_w,
    KSIZE: tl.constexpr, MAPS: tl.constexpr, FB_BLOCK: tl.constexpr, WIN: tl.constexpr,
):
    """DarkPose Newton step at (px, py) (csrc/decode.h dark_samples / dark_step)."""
    R: tl.constexpr = KSIZE // 2
    t = tl.arange(0, WIN)
    # Window rows py-2-R .. py+2+R and columns px-2-R .. px+2+R; zero padding outside.
    rows = py[:, None] - (2 + R) + t[None, :]  # (MAPS, WIN)
    cols = px[:, None] - (2 + R) + t[None, :]
    inwin = (t < KSIZE + 4)[None, :]
    rmask = live[:, None] & inwin & (rows >= 0) & (rows < H)
    cmask = inwin & (cols >= 0) & (cols < W)
    roff = rows.to(tl.int64) * stride_h
    coff = cols.to(tl.int64) * stride_w
    tile = tl.load(
        map_ptr[:, None, None] + roff[:, :, None] + coff[:, None, :],
        mask=rmask[:, :, None] & cmask[:, None, :],
        other=0.0,
    ).to(tl.float32)  # (MAPS, WIN, WIN)
    # Taps of a centre offset d in -2..2 sit at window shift d + 2: taps_s[t] = g[t - s].
    m0 = t < KSIZE
    m1 = (t >= 1) & (t < KSIZE + 1)
    m2 = (t >= 2) & (t < KSIZE + 2)
    m3 = (t >= 3) & (t < KSIZE + 3)
    m4 = (t >= 4) & (t < KSIZE + 4)
    g0 = tl.load(g_ptr + t, mask=m0, other=0.0)
    g1 = tl.load(g_ptr + (t - 1), mask=m1, other=0.0)
    g2 = tl.load(g_ptr + (t - 2), mask=m2, other=0.0)
    g3 = tl.load(g_ptr + (t - 3), mask=m3, other=0.0)
    g4 = tl.load(g_ptr + (t - 4), mask=m4, other=0.0)
    # Row pass for the 5 column centres dx = -2..2 -> (MAPS, WIN) over window rows.  The
    # where() keeps an inf outside a tap's support from turning 0 * inf into NaN.
    c_m2 = tl.sum(tl.where(m0[None, None, :], tile * g0[None, None, :], 0.0), axis=2)
    c_m1 = tl.sum(tl.where(m1[None, None, :], tile * g1[None, None, :], 0.0), axis=2)
    c_0 = tl.sum(tl.where(m2[None, None, :], tile * g2[None, None, :], 0.0), axis=2)
    c_p1 = tl.sum(tl.where(m3[None, None, :], tile * g3[None, None, :], 0.0), axis=2)
    c_p2 = tl.sum(tl.where(m4[None, None, :], tile * g4[None, None, :], 0.0), axis=2)
    # Column pass: the 13 blurred samples in csrc/decode.h's order (dark_dy / dark_dx).
    s0 = tl.sum(tl.where(m2[None, :], c_0 * g2[None, :], 0.0), axis=1)  # (0, 0)
    s1 = tl.sum(tl.where(m2[None, :], c_p1 * g2[None, :], 0.0), axis=1)  # (0, +1)
    s2 = tl.sum(tl.where(m2[None, :], c_m1 * g2[None, :], 0.0), axis=1)  # (0, -1)
    s3 = tl.sum(tl.where(m3[None, :], c_0 * g3[None, :], 0.0), axis=1)  # (+1, 0)
    s4 = tl.sum(tl.where(m1[None, :], c_0 * g1[None, :], 0.0), axis=1)  # (-1, 0)
    s5 = tl.sum(tl.where(m2[None, :], c_p2 * g2[None, :], 0.0), axis=1)  # (0, +2)
    s6 = tl.sum(tl.where(m2[None, :], c_m2 * g2[None, :], 0.0), axis=1)  # (0, -2)
    s7 = tl.sum(tl.where(m4[None, :], c_0 * g4[None, :], 0.0), axis=1)  # (+2, 0)
    s8 = tl.sum(tl.where(m0[None, :], c_0 * g0[None, :], 0.0), axis=1)  # (-2, 0)
    s9 = tl.sum(tl.where(m3[None, :], c_p1 * g3[None, :], 0.0), axis=1)  # (+1, +1)
    s10 = tl.sum(tl.where(m1[None, :], c_p1 * g1[None, :], 0.0), axis=1)  # (-1, +1)
    s11 = tl.sum(tl.where(m3[None, :], c_m1 * g3[None, :], 0.0), axis=1)  # (+1, -1)
    s12 = tl.sum(tl.where(m1[None, :], c_m1 * g1[None, :], 0.0), axis=1)  # (-1, -1)

    interior = (px > 1) & (px < W - 2) & (py > 1) & (py < H - 2)
    smin = tl.minimum(tl.minimum(tl.minimum(s0, s1), tl.minimum(s2, s3)), tl.minimum(s4, s5))
    smin = tl.minimum(smin, tl.minimum(tl.minimum(s6, s7), tl.minimum(s8, s9)))
    smin = tl.minimum(smin, tl.minimum(tl.minimum(s10, s11), s12))
    fast = smin >= 2e-10  # kDarkFastFloor
    # Fast path (max > 0 and every sample >= 2e-10): c = max / blurred max >= 1, the 1e-10
    # floor never bites and log(c) cancels in every difference: L = log(s).  Otherwise, for
    # a map with max > 0 (max <= 0 takes no step) the exact rescale needs the blurred
    # maximum of the whole map.
    need = live & interior & (vmax > 0.0) & (~fast) & (~has_nan)
    bmax = vmax
    if tl.max(need.to(tl.int32), axis=0) > 0:
        bmax_all = _dark_blurred_max(
            map_ptr, need, g_ptr, H, W, stride_h, stride_w, KSIZE, MAPS, FB_BLOCK
        )
        bmax = tl.where(need, bmax_all, vmax)
    valid = (vmax > 0.0) & (bmax != 0.0)  # dark_rescale_valid
    c = tl.where(need & valid, tl.math.div_rn(vmax, tl.where(valid, bmax, 1.0)), 1.0)
    # c == 1 on the fast path, where the floor is a no-op since every s >= 2e-10.
    L0 = _math.log(tl.maximum(s0 * c, 1e-10))
    L1 = _math.log(tl.maximum(s1 * c, 1e-10))
    L2 = _math.log(tl.maximum(s2 * c, 1e-10))
    L3 = _math.log(tl.maximum(s3 * c, 1e-10))
    L4 = _math.log(tl.maximum(s4 * c, 1e-10))
    L5 = _math.log(tl.maximum(s5 * c, 1e-10))
    L6 = _math.log(tl.maximum(s6 * c, 1e-10))
    L7 = _math.log(tl.maximum(s7 * c, 1e-10))
    L8 = _math.log(tl.maximum(s8 * c, 1e-10))
    L9 = _math.log(tl.maximum(s9 * c, 1e-10))
    L10 = _math.log(tl.maximum(s10 * c, 1e-10))
    L11 = _math.log(tl.maximum(s11 * c, 1e-10))
    L12 = _math.log(tl.maximum(s12 * c, 1e-10))
    # Newton step (csrc/decode.h dark_step).
    dx = 0.5 * (L1 - L2)
    dy = 0.5 * (L3 - L4)
    dxx = 0.25 * (L5 - 2.0 * L0 + L6)
    dyy = 0.25 * (L7 - 2.0 * L0 + L8)
    dxy = 0.25 * (L9 - L10 - L11 + L12)
    return _newton_offset(interior & valid, dx, dy, dxx, dyy, dxy, x, y)


@triton.jit
def _newton_offset(apply, gx, gy, hxx, hyy, hxy, x, y):
    """csrc/decode.h newton_offset: ``(x, y) - H^-1 g`` where ``apply``, the Hessian is
    invertible and the offset is finite (an infinite sample keeps the integer argmax)."""
    det = hxx * hyy - hxy * hxy
    apply = apply & (det != 0.0)
    safe = tl.where(apply, det, 1.0)
    ox = -tl.math.div_rn(hyy * gx - hxy * gy, safe)
    oy = -tl.math.div_rn(hxx * gy - hxy * gx, safe)
    apply = apply & ((ox - ox) == 0.0) & ((oy - oy) == 0.0)  # finite
    return tl.where(apply, x + ox, x), tl.where(apply, y + oy, y)


@triton.jit
def _refine_udp(
    map_ptr,  # pointers to the first pixel of each map, shape (MAPS,)
    live,  # maps that exist, shape (MAPS,) bool
    g_ptr,  # 1-D Gaussian taps, shape (KSIZE,) float32
    px, py,  # integer argmax, shape (MAPS,) int32
    x, y,  # coordinates so far, shape (MAPS,) float32
    H, W, stride_h, stride_w,
    KSIZE: tl.constexpr, WIN: tl.constexpr,
):
    """MMPose post_dark_udp step at (px, py) (csrc/decode.h refine_udp)."""
    R: tl.constexpr = KSIZE // 2
    t = tl.arange(0, WIN)
    # Window rows py-1-R .. py+1+R and columns px-1-R .. px+1+R, reflect-101 into the map
    # (OpenCV's default border; any index, any size >= 1: n == 1 gives period 1 -> 0).
    rows = py[:, None] - (1 + R) + t[None, :]  # (MAPS, WIN)
    period = tl.maximum(rows * 0 + (2 * H - 2), 1)
    rows = rows % period
    rows = tl.where(rows < 0, rows + period, rows)  # C-style remainder of a negative index
    rows = tl.where(rows >= H, period - rows, rows)
    cols = px[:, None] - (1 + R) + t[None, :]
    period = tl.maximum(cols * 0 + (2 * W - 2), 1)
    cols = cols % period
    cols = tl.where(cols < 0, cols + period, cols)
    cols = tl.where(cols >= W, period - cols, cols)
    inwin = (t < KSIZE + 2)[None, :]
    roff = rows.to(tl.int64) * stride_h
    coff = cols.to(tl.int64) * stride_w
    tile = tl.load(
        map_ptr[:, None, None] + roff[:, :, None] + coff[:, None, :],
        mask=(live[:, None] & inwin)[:, :, None] & inwin[:, None, :],
        other=0.0,
    ).to(tl.float32)  # (MAPS, WIN, WIN)
    # The 7 sample points are edge-clamped (edge padding of the log map): the centre of
    # offset d is clamp(p + d) = p + d' with d' in {-1, 0, 1}, at window shift d' + 1.
    sx_m = (tl.maximum(px - 1, 0) - px + 1)[:, None]  # (MAPS, 1)
    sx_p = (tl.minimum(px + 1, W - 1) - px + 1)[:, None]
    sy_m = (tl.maximum(py - 1, 0) - py + 1)[:, None]
    sy_p = (tl.minimum(py + 1, H - 1) - py + 1)[:, None]
    tt = t[None, :]
    mc = (t >= 1) & (t < KSIZE + 1)  # (WIN,)
    mxm = (tt >= sx_m) & (tt < sx_m + KSIZE)  # (MAPS, WIN)
    mxp = (tt >= sx_p) & (tt < sx_p + KSIZE)
    mym = (tt >= sy_m) & (tt < sy_m + KSIZE)
    myp = (tt >= sy_p) & (tt < sy_p + KSIZE)
    gc = tl.load(g_ptr + (t - 1), mask=mc, other=0.0)
    gxm = tl.load(g_ptr + (tt - sx_m), mask=mxm, other=0.0)
    gxp = tl.load(g_ptr + (tt - sx_p), mask=mxp, other=0.0)
    gym = tl.load(g_ptr + (tt - sy_m), mask=mym, other=0.0)
    gyp = tl.load(g_ptr + (tt - sy_p), mask=myp, other=0.0)
    # Row pass for the 3 column centres -> (MAPS, WIN) over window rows.
    c_m = tl.sum(tl.where(mxm[:, None, :], tile * gxm[:, None, :], 0.0), axis=2)
    c_0 = tl.sum(tl.where(mc[None, None, :], tile * gc[None, None, :], 0.0), axis=2)
    c_p = tl.sum(tl.where(mxp[:, None, :], tile * gxp[:, None, :], 0.0), axis=2)
    # Column pass at the 7 points.
    b0 = tl.sum(tl.where(mc[None, :], c_0 * gc[None, :], 0.0), axis=1)  # (0, 0)
    bx1 = tl.sum(tl.where(mc[None, :], c_p * gc[None, :], 0.0), axis=1)  # (0, +1)
    bx1_ = tl.sum(tl.where(mc[None, :], c_m * gc[None, :], 0.0), axis=1)  # (0, -1)
    by1 = tl.sum(tl.where(myp, c_0 * gyp, 0.0), axis=1)  # (+1, 0)
    by1_ = tl.sum(tl.where(mym, c_0 * gym, 0.0), axis=1)  # (-1, 0)
    bx1y1 = tl.sum(tl.where(myp, c_p * gyp, 0.0), axis=1)  # (+1, +1)
    bx1_y1_ = tl.sum(tl.where(mym, c_m * gym, 0.0), axis=1)  # (-1, -1)
    i0 = _math.log(tl.minimum(tl.maximum(b0, 0.001), 50.0))
    ix1 = _math.log(tl.minimum(tl.maximum(bx1, 0.001), 50.0))
    ix1_ = _math.log(tl.minimum(tl.maximum(bx1_, 0.001), 50.0))
    iy1 = _math.log(tl.minimum(tl.maximum(by1, 0.001), 50.0))
    iy1_ = _math.log(tl.minimum(tl.maximum(by1_, 0.001), 50.0))
    ix1y1 = _math.log(tl.minimum(tl.maximum(bx1y1, 0.001), 50.0))
    ix1_y1_ = _math.log(tl.minimum(tl.maximum(bx1_y1_, 0.001), 50.0))
    dx = 0.5 * (ix1 - ix1_)
    dy = 0.5 * (iy1 - iy1_)
    hxx = (ix1 - 2.0 * i0 + ix1_) + 1.1920928955078125e-07  # + float32 eps
    hyy = (iy1 - 2.0 * i0 + iy1_) + 1.1920928955078125e-07
    hxy = 0.5 * (ix1y1 - ix1 - iy1 + i0 + i0 - ix1_ - iy1_ + ix1_y1_)
    return _newton_offset(px >= 0, dx, dy, hxx, hyy, hxy, x, y)  # UDP: no interior guard


# --------------------------------------------------------------------------- decode kernel
@triton.jit
def _decode_heatmaps_kernel(
    hm_ptr,  # heatmaps, shape (B, K, H, W), any strides, float32/float16/bfloat16
    affine_ptr,  # affine transforms, shape (B, 2, 3), contiguous float32 (read iff HAS_AFFINE)
    g_ptr,  # 1-D Gaussian taps, shape (KSIZE,), float32 (read iff MODE is dark/udp)
    coords_ptr,  # output (x, y) per keypoint, shape (B, K, 2), contiguous float32
    scores_ptr,  # output heatmap maxima, shape (B, K), contiguous float32
    num_maps,  # B * K
    K,  # joints per image
    H,  # heatmap rows
    W,  # heatmap columns
    stride_b,  # heatmap strides, in elements
    stride_k,
    stride_h,
    stride_w,
    MODE: tl.constexpr,  # 0 argmax, 1 quarter, 2 dark, 3 udp
    HAS_AFFINE: tl.constexpr,
    KSIZE: tl.constexpr,  # blur taps (dark/udp); 1 otherwise
    MAPS: tl.constexpr,  # heatmaps per program (power of two)
    BLOCK: tl.constexpr,  # argmax-scan chunk (power of two)
    WIN: tl.constexpr,  # refinement window side (power of two >= KSIZE + 4)
    FLAT_HW: tl.constexpr,  # pixel (y, x) sits at offset y*W + x: no div/mod in the scan
    FB_BLOCK: tl.constexpr,  # pixels per step of DARK's rare whole-map blur (few registers)
):
    pid = tl.program_id(0)
    maps = pid * MAPS + tl.arange(0, MAPS)  # flat (b, k) map ids, shape (MAPS,)
    live = maps < num_maps
    b = maps // K
    k = maps - b * K
    map_ptr = hm_ptr + (b.to(tl.int64) * stride_b + k.to(tl.int64) * stride_k)
    N = H * W

    # ---- argmax scan: per-lane running max and the flat index where it was first seen.
    lanes = tl.arange(0, BLOCK)
    run_max = tl.full([MAPS, BLOCK], float("-inf"), tl.float32)
    run_idx = tl.zeros([MAPS, BLOCK], tl.int32) + lanes[None, :]  # all -inf -> index 0
    nan_seen = tl.zeros([MAPS, BLOCK], tl.int1)
    for start in range(0, N, BLOCK):
        idx = start + lanes
        if FLAT_HW:
            offs = idx
        else:
            row = idx // W
            offs = row.to(tl.int64) * stride_h + (idx - row * W).to(tl.int64) * stride_w
        v = tl.load(
            map_ptr[:, None] + offs[None, :],
            mask=live[:, None] & (idx < N)[None, :],
            other=float("-inf"),
        ).to(tl.float32)
        better = v > run_max  # strict: a lane keeps its first maximum; NaN never wins
        run_max = tl.where(better, v, run_max)
        run_idx = tl.where(better, idx[None, :], run_idx)
        nan_seen = nan_seen | (v != v)
    vmax = tl.max(run_max, axis=1)  # (MAPS,)
    amax = tl.min(tl.where(run_max == vmax[:, None], run_idx, N), axis=1)  # first maximum
    has_nan = tl.max(nan_seen.to(tl.int32), axis=1) > 0
    py = amax // W
    px = amax - py * W
    x = px.to(tl.float32)
    y = py.to(tl.float32)

    # ---- sub-pixel refinement at (px, py).
    if MODE == 1:
        # HRNet quarter offset; indices clamped so the loads stay inside the map.
        interior = (px > 1) & (px < W - 1) & (py > 1) & (py < H - 1)
        yoff = py.to(tl.int64) * stride_h
        xoff = px.to(tl.int64) * stride_w
        right = tl.load(map_ptr + yoff + tl.minimum(px + 1, W - 1).to(tl.int64) * stride_w, mask=live)
        left = tl.load(map_ptr + yoff + tl.maximum(px - 1, 0).to(tl.int64) * stride_w, mask=live)
        down = tl.load(map_ptr + tl.minimum(py + 1, H - 1).to(tl.int64) * stride_h + xoff, mask=live)
        up = tl.load(map_ptr + tl.maximum(py - 1, 0).to(tl.int64) * stride_h + xoff, mask=live)
        ddx = right.to(tl.float32) - left.to(tl.float32)
        ddy = down.to(tl.float32) - up.to(tl.float32)
        # sign() with sign(NaN) = 0 (csrc/decode.h sign0)
        sx = (ddx > 0.0).to(tl.float32) - (ddx < 0.0).to(tl.float32)
        sy = (ddy > 0.0).to(tl.float32) - (ddy < 0.0).to(tl.float32)
        x = tl.where(interior, x + 0.25 * sx, x)
        y = tl.where(interior, y + 0.25 * sy, y)
    elif MODE == 2:
        x, y = _refine_dark(
            map_ptr, live, g_ptr, px, py, x, y, vmax, has_nan, H, W, stride_h, stride_w,
            KSIZE, MAPS, FB_BLOCK, WIN,
        )
    elif MODE == 3:
        x, y = _refine_udp(
            map_ptr, live, g_ptr, px, py, x, y, H, W, stride_h, stride_w, KSIZE, WIN
        )

    # ---- affine back-transform, in the reference's order (no FMA: enable_fp_fusion=False).
    if HAS_AFFINE:
        a_ptr = affine_ptr + b.to(tl.int64) * 6
        a00 = tl.load(a_ptr + 0, mask=live)
        a01 = tl.load(a_ptr + 1, mask=live)
        a02 = tl.load(a_ptr + 2, mask=live)
        a10 = tl.load(a_ptr + 3, mask=live)
        a11 = tl.load(a_ptr + 4, mask=live)
        a12 = tl.load(a_ptr + 5, mask=live)
        nx = (a00 * x + a01 * y) + a02
        ny = (a10 * x + a11 * y) + a12
        x = nx
        y = ny

    out = maps.to(tl.int64)
    tl.store(coords_ptr + 2 * out, tl.where(has_nan, float("nan"), x), mask=live)
    tl.store(coords_ptr + 2 * out + 1, tl.where(has_nan, float("nan"), y), mask=live)
    tl.store(scores_ptr + out, tl.where(has_nan, float("nan"), vmax), mask=live)


def decode_heatmaps_triton(
    heatmaps: Tensor, mode_id: int, affine: Tensor | None, blur_weights: Tensor
) -> tuple[Tensor, Tensor]:
    """Fused decode of ``heatmaps [B, K, H, W]`` in one launch.

    Args:
        heatmaps: float32/float16/bfloat16, any strides (read in place, never copied).
        mode_id: 0 argmax, 1 quarter, 2 dark, 3 udp (``ops.decode.MODE_ID``).
        affine: ``[B, 2, 3]`` float32 or None.
        blur_weights: float32 1-D Gaussian taps (odd length <= 31) for dark/udp, empty
            otherwise.

    Returns:
        ``coords [B, K, 2]`` float32 and ``scores [B, K]`` float32.
    """
    B, K, H, W = heatmaps.shape
    device = heatmaps.device
    coords = torch.empty((B, K, 2), dtype=torch.float32, device=device)
    scores = torch.empty((B, K), dtype=torch.float32, device=device)
    if B * K == 0:
        return coords, scores
    mode_id = int(mode_id)
    if mode_id not in (_ARGMAX, _QUARTER, _DARK, _UDP):
        raise ValueError(f"mode_id must be 0 (argmax), 1 (quarter), 2 (dark) or 3 (udp), got {mode_id}")
    if H * W == 0:
        raise ValueError(f"heatmaps has an empty spatial size {H}x{W}; no maximum to decode")
    if H * W > _INT32_MAX:
        raise ValueError(f"heatmaps maps of {H}x{W} pixels exceed the int32 pixel index")

    if mode_id in (_DARK, _UDP):
        ksize = blur_weights.numel()
        if ksize < 1 or ksize % 2 == 0 or ksize > _MAX_BLUR_KERNEL:
            raise ValueError(
                f"blur_weights must hold an odd number of taps in [1, {_MAX_BLUR_KERNEL}], got {ksize}"
            )
        g = blur_weights.to(device=device, dtype=torch.float32).contiguous()
    else:
        ksize = 1
        g = scores  # never read: a valid float32 pointer for the unused argument
    if affine is not None:
        if tuple(affine.shape) != (B, 2, 3):
            raise ValueError(f"affine must have shape [{B}, 2, 3], got {tuple(affine.shape)}")
        a = affine.to(device=device, dtype=torch.float32).contiguous()
    else:
        a = scores  # never read

    sb, sk, sh, sw = heatmaps.stride()
    settings = _decode_settings(B * K, H, W, ksize if mode_id in (_DARK, _UDP) else 1)
    grid = (triton.cdiv(B * K, settings["MAPS"]),)
    with _device_guard(heatmaps):
        launch(
            _decode_heatmaps_kernel, grid,
            heatmaps,
            a,
            g,
            coords,
            scores,
            B * K,
            K,
            H,
            W,
            sb,
            sk,
            sh,
            sw,
            MODE=mode_id,
            HAS_AFFINE=affine is not None,
            KSIZE=ksize,
            FLAT_HW=(H == 1 or sh == W) and (W == 1 or sw == 1),
            enable_fp_fusion=False,
            **settings,
        )
    return coords, scores


# --------------------------------------------------------------------------- flip merge
@triton.jit
def _flip_merge_kernel(
    hm_ptr,  # heatmaps of the original images, shape (B, K, H, W), any strides
    fl_ptr,  # heatmaps of the flipped images, shape (B, K, H, W), any strides, same dtype
    flip_index_ptr,  # joint permutation, shape (K,), int64: out joint k <- flipped joint idx[k]
    out_ptr,  # merged heatmaps, shape (B, K, H, W), contiguous, dtype of hm
    num_rows,  # B * K * H
    K,
    H,
    W,
    hs_b,  # strides of hm, in elements
    hs_k,
    hs_h,
    hs_w,
    fs_b,  # strides of fl, in elements
    fs_k,
    fs_h,
    fs_w,
    SHIFT: tl.constexpr,  # HRNet's one-pixel shift right of the mirrored map
    BLOCK_R: tl.constexpr,  # rows of the flattened (B*K*H, W) output per tile
    BLOCK_W: tl.constexpr,  # columns per tile
    ROWS_I64: tl.constexpr,  # row ids B*K*H (+ a tile) overflow int32
):
    pid_r = tl.program_id(0)
    pid_w = tl.program_id(1)
    if ROWS_I64:
        r = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # output rows, (BLOCK_R,)
    else:
        r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    xs = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)  # output columns, shape (BLOCK_W,)
    rmask = r < num_rows
    mask = rmask[:, None] & (xs < W)[None, :]
    m = r // H  # map id b*K + k
    yy = r - m * H
    b = m // K
    k = m - b * K
    kf = tl.load(flip_index_ptr + k, mask=rmask, other=0)
    if SHIFT:
        xsrc = tl.where(xs >= 1, xs - 1, xs)  # column 0 keeps its value
    else:
        xsrc = xs
    xf = W - 1 - xsrc  # mirrored column in the flipped map

    y64 = yy.to(tl.int64)
    hrow = b.to(tl.int64) * hs_b + k.to(tl.int64) * hs_k + y64 * hs_h  # (BLOCK_R,)
    frow = b.to(tl.int64) * fs_b + kf.to(tl.int64) * fs_k + y64 * fs_h
    a = tl.load(
        hm_ptr + hrow[:, None] + xs.to(tl.int64)[None, :] * hs_w, mask=mask, other=0.0
    ).to(tl.float32)
    f = tl.load(
        fl_ptr + frow[:, None] + xf.to(tl.int64)[None, :] * fs_w, mask=mask, other=0.0
    ).to(tl.float32)
    merged = (a + f) * 0.5
    if out_ptr.dtype.element_ty == tl.bfloat16:
        # Round to nearest even on the float32 bits (as torch does), so the cast below is
        # exact: the GPU's cvt.rn gives the same bits, and TRITON_INTERPRET=1, whose
        # float32 -> bfloat16 cast truncates, agrees with the GPU.  NaN stays NaN.
        bits = merged.to(tl.uint32, bitcast=True)
        hi = bits >> 16
        lo = bits & 0xFFFF
        up = (lo > 0x8000) | ((lo == 0x8000) & ((hi & 1) == 1))
        rounded = ((hi + up.to(tl.uint32)) << 16).to(tl.float32, bitcast=True)
        merged = tl.where(merged != merged, merged, rounded)
    tl.store(
        out_ptr + r.to(tl.int64)[:, None] * W + xs[None, :],
        merged.to(out_ptr.dtype.element_ty),
        mask=mask,
    )


def flip_merge_triton(heatmaps: Tensor, flipped: Tensor, flip_index: Tensor, shift: bool) -> Tensor:
    """``((heatmaps + mirror(flipped)[:, flip_index]) * 0.5)`` in float32, rounded to the dtype.

    Args:
        heatmaps, flipped: ``[B, K, H, W]``, same dtype, any strides (read in place).
        flip_index: int64 ``[K]`` on the heatmaps' device (merged joint k <- flipped joint
            ``flip_index[k]``).
        shift: shift the mirrored map one pixel right (column 0 keeps its value).

    Returns:
        The merged heatmaps, contiguous, dtype of ``heatmaps``.
    """
    B, K, H, W = heatmaps.shape
    out = torch.empty((B, K, H, W), dtype=heatmaps.dtype, device=heatmaps.device)
    if out.numel() == 0:
        return out
    if flipped.shape != heatmaps.shape or flipped.dtype != heatmaps.dtype:
        raise ValueError(
            f"flipped must match heatmaps ({tuple(heatmaps.shape)}, {heatmaps.dtype}), "
            f"got ({tuple(flipped.shape)}, {flipped.dtype})"
        )
    if flip_index.numel() != K:
        raise ValueError(f"flip_index must have K={K} entries, got {flip_index.numel()}")
    index = flip_index.to(device=heatmaps.device, dtype=torch.int64).contiguous()

    num_rows = B * K * H
    settings = _flip_settings(num_rows, W)
    grid = (triton.cdiv(num_rows, settings["BLOCK_R"]), triton.cdiv(W, settings["BLOCK_W"]))
    hs, fs = heatmaps.stride(), flipped.stride()
    with _device_guard(heatmaps):
        launch(
            _flip_merge_kernel, grid,
            heatmaps,
            flipped,
            index,
            out,
            num_rows,
            K,
            H,
            W,
            hs[0],
            hs[1],
            hs[2],
            hs[3],
            fs[0],
            fs[1],
            fs[2],
            fs[3],
            SHIFT=bool(shift),
            ROWS_I64=num_rows + settings["BLOCK_R"] > _INT32_MAX,
            enable_fp_fusion=False,  # nothing to fuse; explicit to keep Triton >= 3.9 quiet
            **settings,
        )
    return out
