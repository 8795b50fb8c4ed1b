"""Triton launchers for the Multi-Instance Modulation Block (two-phase path); the
``@triton.jit`` kernels are in :mod:`.mimb_kernels`.

The specification is the PyTorch reference in :mod:`mipnet_kernels.ops.mimb.reference`
(``mimb_scale_fwd_reference``, ``mimb_scale_bwd_reference``, ``mimb_instances_reference``);
the fused instances backward's is the sum over the instances of ``mimb_scale_bwd_reference``
(``csrc/schemas.h``, ``mimb_instances_bwd``).

Layouts.  The op layer hands these launchers ``x`` NCHW-contiguous or channels_last (NHWC).
Both are addressed the same way: sample ``b``, channel ``c``, pixel ``p = h*W + w`` sits at
``b*C*HW + c*stride_c + p*stride_p`` with ``(stride_c, stride_p) = (HW, 1)`` for NCHW and
``(1, C)`` for NHWC.  The kernels take the two strides as ordinary integer arguments: Triton
specialises an integer argument equal to 1, so the unit stride is a compile-time constant,
the coalescing pass sees which tile axis is contiguous and vectorises along it (HW for NCHW,
C for NHWC).  The launch settings (``_tile_settings``) shape the ``[BLOCK_C, BLOCK_P]`` tile
so that its contiguous axis is the long one.  When ``HW == 1`` or ``C == 1`` the two layouts
are the same bytes and the NHWC (resp. NCHW) view is used, whose contiguous axis is the
non-trivial one.  ``y`` / ``dx`` get ``x``'s layout (``ops.mimb.contract.out_memory_format``); ``dy``
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
   ``a = sigmoid(W2 relu(W1 s)) * v`` (or ``* t[n, b]`` for every instance ``n``: the table
   is addressed as ``t [N, B, C]``, a ``[N, C]`` table with stride 0 over ``b``);
   backward also ``dv``, ``g_s / HW`` and the per-sample vectors ``g_z2, h, g_z1`` whose
   batch sums ``g_z2.T @ h`` and ``g_z1.T @ s`` are ``dw2`` and ``dw1`` (backward only:
   ``_batch_outer_kernel``, two small launches, float32 FMA -- not torch matmuls, whose
   precision follows the user's global TF32 setting, ``torch.backends.cuda.matmul.allow_tf32``
   / ``torch.set_float32_matmul_precision``).
2. ``_mimb_scale_kernel``: ``out[n*B + b] = in[b] * a[n, b, :] (+ bias[b, :])`` over
   ``[BLOCK_C, BLOCK_P]`` tiles, the input tile loaded once and ``N`` outputs written
   (forward: ``N = 1``, ``in = x``; backward: ``in = dy``, ``bias = g_s / HW``; instances:
   ``a[n, b] = e[b] * t[n, b]``).

The fused instances backward (``mimb_instances_bwd_triton``, reduction mode 3) has the same
two launches.  Its reduction programs each take a group of up to ``_MAX_NB`` instances: the
``x`` tile is loaded once and multiplied into the group's ``dy_n`` tiles (one
``[NB, BLOCK_C, BLOCK_P]`` load; the tile is ``NB`` times smaller), giving the partials of
``g_a[n] = sum_hw(dy_n * x)`` and of ``sum_hw(x)`` (so ``s`` is not an input).  The MLP
backward runs once per sample: the instances share the excite, whose gradient is ``g_e =
sum_n g_a[n] * t[n, b]`` (in instance order), and ``dv[n] = g_a[n] * e``.  The apply pass
(``_mimb_gather_kernel``) writes ``dx = sum_n dy_n * a[n] + g_s / HW``, each ``dy_n`` tile read
once.  Bytes: ``x`` once per instance group, each ``dy_n`` twice, ``dx`` once (N separate
scale backwards: ``x`` N times, each ``dy_n`` twice, N ``dx`` writes and their sum).

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
from torch import Tensor

from ..ops.mimb.contract import (
    _instances_branch,
    _scale_bwd_branch,
    _scale_fwd_branch,
    compute_dtype,
    dense as _dense,
    out_memory_format,
)
from ._launch import launch, num_warps
from .mimb_kernels import (
    META_MAX,
    _batch_outer_kernel,
    _meta_row_kernel,
    _mimb_gather_grouped_kernel,
    _mimb_gather_kernel,
    _mimb_reduce_mlp_grouped_kernel,
    _mimb_reduce_mlp_kernel,
    _mimb_scale_grouped_kernel,
    _mimb_scale_kernel,
)

#: Elements per tile of both kernels: 16 float32 per thread at 8 warps (4 x 16-byte vectors).
_TILE_ELEMS = 4096
#: Widest channel block in the NHWC layout (a 256-channel row is 1 KiB of float32).
_MAX_BLOCK_C = 256
#: Longest pixel block in the NCHW layout.
_MAX_BLOCK_P = 1024
#: The reduction splits HW until it has about this many programs (~8 per SM on an H100).
_TARGET_PROGRAMS = 1024
#: Instances per program of the instances backward's reduction (its x tile is read once per
#: group of this many instances; the tile shrinks so that ``NB`` dy tiles fit).
_MAX_NB = 8
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


def _tile_settings(C: int, HW: int, channels_last: bool, nb: int = 1) -> dict:
    """``BLOCK_C, BLOCK_P, num_warps`` of a ``[BLOCK_C, BLOCK_P]`` tile (channels x pixels).

    The contiguous axis gets the long side (NCHW: pixels, up to 1024; NHWC: channels, up to
    256; halved by ``_fit_block`` while that leaves a large masked tail) and the other axis
    fills the tile to at most ``_TILE_ELEMS / nb`` elements (``nb`` tiles per step: the
    instances backward's reduction); neither side exceeds the tensor's extent rounded up to
    a power of two.
    """
    c2, p2 = triton.next_power_of_2(C), triton.next_power_of_2(HW)
    elems = _TILE_ELEMS // nb
    if channels_last:
        block_c = _fit_block(C, min(c2, _MAX_BLOCK_C, elems), min(32, elems))
        block_p = min(p2, max(elems // block_c, 1))
    else:
        block_p = _fit_block(HW, min(p2, _MAX_BLOCK_P, elems), min(128, elems))
        block_c = min(c2, max(elems // block_p, 1))
    return dict(BLOCK_C=block_c, BLOCK_P=block_p, num_warps=num_warps(nb * block_c * block_p))


def _reduce_settings(B: int, C: int, HW: int, channels_last: bool, nb: int = 1, groups: int = 1) -> dict:
    """Tile settings of the reduction plus ``SPLIT`` (HW chunks) and ``CHUNK`` (pixels each).

    ``CHUNK`` is a multiple of ``BLOCK_P``; ``SPLIT`` grows until there are about
    ``_TARGET_PROGRAMS`` programs (``groups`` instance groups per sample) or every chunk is
    a single tile.
    """
    t = _tile_settings(C, HW, channels_last, nb)
    split, chunk = _split(B * groups, C, HW, t["BLOCK_C"], t["BLOCK_P"])
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


# --------------------------------------------------------------------------- launch helpers
def _check_sizes(x: Tensor) -> None:
    B, C, H, W = x.shape
    if B * C == 0 or H * W == 0:
        raise ValueError(f"x must be non-empty with H*W > 0, got shape {list(x.shape)}")
    if (C + _MAX_BLOCK_C) * (H * W + _MAX_BLOCK_P) > _INT32_MAX:
        raise ValueError(f"x samples of {C}x{H}x{W} elements exceed the kernels' int32 offsets")


def _mlp_settings(C: int, CR: int, warps: int, mode: int = 0, acc: torch.dtype = torch.float32) -> dict:
    """``MLP_C, CR_PAD``: the MLP steps over ``[CR_PAD, MLP_C]`` weight tiles of at most
    ``1024 * warps`` elements (32 per thread) and at least 16 channels; half that for the
    float64 instances backward (mode 3), whose step also carries ``g_e`` and the instance
    loop: float64 takes two registers per value (it spilled ~190 bytes at full size)."""
    cr_pad = triton.next_power_of_2(max(CR, 1))
    budget = min(4096, 1024 * warps) // (2 if mode == 3 and acc == torch.float64 else 1)
    mlp_c = max(16, min(triton.next_power_of_2(C), budget // cr_pad))
    return dict(MLP_C=mlp_c, CR_PAD=cr_pad)


def _table3(table: Tensor, B: int) -> Tensor:
    """The instance table as ``t [N, B, C]``: a ``[N, C]`` table expanded over the batch
    (stride 0, no copy), a ``[N, B, C]`` one as is."""
    if table.dim() == 2:
        return table[:, None, :].expand(table.shape[0], B, table.shape[1])
    if table.dim() != 3 or table.shape[1] != B:
        raise ValueError(f"table must have shape [N, C] or [N, B, C] with B = x.shape[0] = {B}, "
                         f"got {list(table.shape)}")
    return table


def _reduce_mlp(mode: int, x: Tensor, dy: Tensor | None, w1: Tensor, w2: Tensor, mult: Tensor,
                s: Tensor | None) -> dict:
    """Launch ``_mimb_reduce_mlp_kernel``; returns its outputs by name (see the kernel).

    ``mult [NA, B, C]``: ``v[None]`` (modes 0, 2) or the table as ``t [N, B, C]`` (modes 1, 3).
    mode 0: ``s, a [1, B, C]``; mode 1: ``s, a [N, B, C]``;
    mode 2 (``s`` given): ``a, dv, gz2, h, gz1, bias``;
    mode 3 (``dy [N*B, C, H, W]``): ``s``, ``a`` and ``dv [N, B, C]``, ``gz2, h, gz1, bias``.
    """
    B, C, H, W = x.shape
    HW = H * W
    CR = w1.shape[0]
    acc = compute_dtype(x)
    stride_c, stride_p, cl = _strides(x)
    na = mult.shape[0]
    nb = min(triton.next_power_of_2(na), _MAX_NB) if mode == 3 else 1
    ng = triton.cdiv(na, nb) if mode == 3 else 1
    settings = _reduce_settings(B, C, HW, cl, nb, ng)
    split, chunk = settings.pop("SPLIT"), settings.pop("CHUNK")
    settings.update(_mlp_settings(C, CR, settings["num_warps"], mode, acc))
    num_cblocks = triton.cdiv(C, settings["BLOCK_C"])

    def buf(*shape):
        return torch.empty(shape, dtype=acc, device=x.device)

    out = {"a": buf(na, B, C)}
    if mode >= 2:
        out.update(dv=buf(B, C) if mode == 2 else buf(na, B, C), gz2=buf(B, C), h=buf(B, CR), gz1=buf(B, CR), bias=buf(B, C))
    out["s"] = s.to(acc).contiguous() if mode == 2 else buf(B, C)
    # mode 3: the sums of x, then those of dy_n * x per instance
    part = buf((1 + na if mode == 3 else 1) * B * split * C)
    count = torch.zeros(B, dtype=torch.int32, device=x.device)
    o = lambda k: out.get(k, part)  # noqa: E731  (unused outputs point at scratch)
    with _device_guard(x):
        launch(
            _mimb_reduce_mlp_kernel, (B * num_cblocks * split * ng,),
            x, x if dy is None else dy, part, count, w1, w2, mult,
            out["s"], out["a"], o("dv"), o("gz2"), o("h"), o("gz1"), o("bias"),
            B, C, CR, HW, stride_c, stride_p, chunk, num_cblocks, split, na, ng,
            w1.stride(0), w1.stride(1), w2.stride(0), w2.stride(1), *mult.stride(),
            MODE=mode, NB=nb,
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


def _gather(dy: Tensor, a: Tensor, bias: Tensor, out: Tensor) -> Tensor:
    """``out[b] = sum_n dy[n*B + b] * a[n, b] + bias[b]`` with ``a [N, B, C]`` contiguous."""
    B, C, H, W = out.shape
    HW = H * W
    stride_c, stride_p, cl = _strides(out)
    settings = _tile_settings(C, HW, cl)
    num_pblocks = triton.cdiv(HW, settings["BLOCK_P"])
    num_cblocks = triton.cdiv(C, settings["BLOCK_C"])
    with _device_guard(dy):
        launch(
            _mimb_gather_kernel, (B * num_cblocks * num_pblocks,),
            dy, a, bias, out, B, C, HW, a.shape[0], stride_c, stride_p, num_pblocks, num_cblocks,
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
    r = _reduce_mlp(0, x, None, w1, w2, v[None], None)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=out_memory_format(x))
    _scale(x, r["a"], None, y)
    return y, r["s"]


def mimb_scale_bwd_triton(
    dy: Tensor, x: Tensor, w1: Tensor, w2: Tensor, v: Tensor, s: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward: ``(dx, dw1, dw2, dv)`` (formulas in :mod:`mipnet_kernels.ops.mimb.reference`).

    The per-sample MLP backward runs in the reduction kernel; the two batch sums of the
    weight gradients (``dw2 = g_z2.T @ h``, ``dw1 = g_z1.T @ s``) in ``_batch_outer_kernel``.
    """
    x = _dense(x)
    _check_sizes(x)
    fmt = out_memory_format(x)
    dy = dy.contiguous(memory_format=fmt)  # no copy when dy already has x's layout
    r = _reduce_mlp(2, x, dy, w1, w2, v[None], s)
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
    """All instances from one read of ``x``: ``y[n*B + b] = x[b] * (e[b] * t[n, b])`` with
    ``t[n, b] = table[n]`` (``[N, C]``) or ``table[n, b]`` (``[N, B, C]``)."""
    x = _dense(x)
    _check_sizes(x)
    B, C, H, W = x.shape
    t = _table3(table, B)
    N = t.shape[0]
    y = torch.empty((N * B, C, H, W), dtype=x.dtype, device=x.device, memory_format=out_memory_format(x))
    if N == 0:
        return y
    r = _reduce_mlp(1, x, None, w1, w2, t, None)
    _scale(x, r["a"], None, y)
    return y


def mimb_instances_bwd_triton(
    dy: Tensor, x: Tensor, w1: Tensor, w2: Tensor, table: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fused instances backward: ``(dx, dw1, dw2, dtable)``, the sum over ``n`` of
    ``mimb_scale_bwd(dy[n*B:(n+1)*B], x, w1, w2, v=t[n])`` (``csrc/schemas.h``).

    Two launches plus the weight gradients', as the scale backward: the reduction reads
    ``x`` once per group of up to ``_MAX_NB`` instances and each ``dy_n`` once, and its last
    program per sample runs the MLP backward once (the excite is shared: its gradient is
    ``g_e = sum_n g_a[n] * t[n]``); the apply pass reads each ``dy_n`` once and writes
    ``dx = sum_n dy_n * (e * t[n]) + g_s / HW`` once.
    """
    x = _dense(x)
    B, C, H, W = x.shape
    t = _table3(table, B)
    N = t.shape[0]
    if tuple(dy.shape) != (N * B, C, H, W):
        raise ValueError(f"dy must have shape [N*B, C, H, W] = {[N * B, C, H, W]}, got {list(dy.shape)}")
    fmt = out_memory_format(x)
    if N == 0 or x.numel() == 0:  # nothing reaches x, the weights or the table: zeros
        return (torch.zeros_like(x, memory_format=fmt),
                torch.zeros(w1.shape, dtype=w1.dtype, device=x.device),
                torch.zeros(w2.shape, dtype=w2.dtype, device=x.device),
                torch.zeros(table.shape, dtype=table.dtype, device=x.device))
    _check_sizes(x)
    dy = dy.contiguous(memory_format=fmt)  # no copy when dy already has x's layout
    r = _reduce_mlp(3, x, dy, w1, w2, t, None)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    _gather(dy, r["a"], r["bias"], dx)
    dw1, dw2 = _weight_grads(r)
    dv = r["dv"] if table.dim() == 3 else r["dv"].sum(dim=1)  # sum over b: a fixed-order reduction
    return (
        dx,
        dw1.to(w1.dtype).contiguous(),
        dw2.to(w2.dtype).contiguous(),
        dv.to(table.dtype).contiguous(),
    )


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
                launch(_meta_row_kernel, (1,), table[i], *row, *([0] * (META_MAX - ncol)), NCOL=ncol,
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


def _group_tiles(xs: Sequence[Tensor], nb: int = 1) -> tuple[int, dict, bool]:
    """``(LAYOUT, tile settings of the largest branch, ALIGNED)`` of a launch group (``nb``:
    as ``_tile_settings``)."""
    layout = _layout_class(xs[0])
    big = max(xs, key=lambda t: t.numel())
    B, C, H, W = big.shape
    tiles = _tile_settings(C, H * W, layout == 1, nb)
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
    nb = min(triton.next_power_of_2(max(m.shape[0] for m in mults)), _MAX_NB) if mode == 3 else 1
    layout, tiles, aligned = _group_tiles(xs, nb)
    mlp = _mlp_settings(max(x.shape[1] for x in xs), max(w.shape[0] for w in w1s), tiles["num_warps"], mode, acc)
    ws, rows, regions = _Workspace(), [], []
    start = count = 0
    for x, w1, w2, mult in zip(xs, w1s, w2s, mults):
        B, C, H, W = x.shape
        CR = w1.shape[0]
        na = mult.shape[0]
        ng = triton.cdiv(na, nb) if mode == 3 else 1
        split, chunk = _split(B * ng, C, H * W, tiles["BLOCK_C"], tiles["BLOCK_P"])
        num_cblocks = triton.cdiv(C, tiles["BLOCK_C"])
        r = {"part": ws.region((1 + na if mode == 3 else 1) * B * split * C), "s": ws.region(B * C),
             "a": ws.region(na * B * C)}
        sizes = {"s": (B, C), "a": (na, B, C)}
        if mode >= 2:
            dv = (B, C) if mode == 2 else (na, B, C)
            for k, shape in (("dv", dv), ("gz2", (B, C)), ("h", (B, CR)), ("gz1", (B, CR)), ("bias", (B, C))):
                r[k] = ws.region(math.prod(shape))
                sizes[k] = shape
        rows.append((start, B, C, CR, H * W, chunk, num_cblocks, split, na, *w1.stride(), *w2.stride(),
                     *mult.stride(), *(r.get(k, 0) for k in ("part", "s", "a", "dv", "gz2", "h", "gz1", "bias")),
                     count, ng))
        regions.append((r, sizes))
        start += B * num_cblocks * split * ng
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
            G=len(xs), LAYOUT=layout, ALIGNED=aligned, MODE=mode, NB=nb,
            BLOCK_C=tiles["BLOCK_C"], BLOCK_P=tiles["BLOCK_P"], num_warps=tiles["num_warps"],
            enable_fp_fusion=False, **mlp,
        )
    return buf, views, (layout, tiles, aligned, [r for r, _ in regions])


def _grouped_scale(ins, outs, buf: Tensor, group: tuple, has_bias: bool, gather: bool = False) -> None:
    """One ``_mimb_scale_grouped_kernel`` launch: ``outs[i] = ins[i] * a_i (+ bias_i)``; or
    (``gather``) one ``_mimb_gather_grouped_kernel`` launch: ``outs[i] = sum_n ins[i]_n * a_i[n]
    + bias_i``."""
    layout, tiles, aligned, regions = group
    rows, start = [], 0
    for inp, out, r in zip(ins, outs, regions):
        C, H, W = inp.shape[1:]
        B, NB = (out.shape[0], inp.shape[0]) if gather else (inp.shape[0], out.shape[0])
        num_pblocks = triton.cdiv(H * W, tiles["BLOCK_P"])
        num_cblocks = triton.cdiv(C, tiles["BLOCK_C"])
        rows.append((start, B, C, H * W, NB // B, num_pblocks, num_cblocks, r["a"], r.get("bias", 0)))
        start += B * num_cblocks * num_pblocks
    meta = _meta(rows, buf.device)
    flags = {} if gather else dict(HAS_BIAS=has_bias)
    with _device_guard(ins[0]):
        launch(
            _mimb_gather_grouped_kernel if gather else _mimb_scale_grouped_kernel, (start,),
            meta, buf, *_four(ins), *_four(outs),
            G=len(ins), LAYOUT=layout, ALIGNED=aligned, **flags,
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
                                                [vs[i][None] for i in idx], None)
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
                                                [vs[i][None] for i in idx], [ss[i] for i in idx])
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
        gt = [_table3(tables[i], xs[i].shape[0]) for i in idx]
        buf, _, group = _grouped_reduce_mlp(1, gx, None, [w1s[i] for i in idx], [w2s[i] for i in idx], gt, None)
        ys = [torch.empty((t.shape[0] * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device,
                          memory_format=out_memory_format(x)) for x, t in zip(gx, gt)]
        _grouped_scale(gx, ys, buf, group, False)
        return ys

    single = _instances_branch(mimb_instances_triton)
    groups = _groups([xs[i] for i in live], [w1s[i] for i in live], [w2s[i] for i in live],
                     [tables[i] for i in live])
    return _by_groups(len(xs), live, groups, run, lambda i: single(xs[i], w1s[i], w2s[i], tables[i]))


def mimb_instances_grouped_bwd_triton(dys, xs, w1s, w2s, tables):
    """``mimb_instances_bwd_triton`` over branch lists: ``(dxs, dw1s, dw2s, dtables)``, two
    launches per launch group (plus the two weight-gradient launches per branch)."""
    xs = [_dense(x) for x in xs]
    t3s = [_table3(t, x.shape[0]) for t, x in zip(tables, xs)]
    for i, (dy, x, t) in enumerate(zip(dys, xs, t3s)):
        want = (t.shape[0] * x.shape[0], *x.shape[1:])
        if tuple(dy.shape) != want:
            raise ValueError(f"dys[{i}] must have shape [N*B, C, H, W] = {list(want)}, got {list(dy.shape)}")
    dys = [dy.contiguous(memory_format=out_memory_format(x)) for dy, x in zip(dys, xs)]
    live = [i for i, x in enumerate(xs) if x.numel() > 0 and t3s[i].shape[0] > 0]
    for i in live:
        _check_sizes(xs[i])

    def run(idx):
        gx, gdy = [xs[i] for i in idx], [dys[i] for i in idx]
        buf, views, group = _grouped_reduce_mlp(3, gx, gdy, [w1s[i] for i in idx], [w2s[i] for i in idx],
                                                [t3s[i] for i in idx], None)
        dxs = [torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=out_memory_format(x)) for x in gx]
        # the apply pass streams one dy tile per step: the full-size tiles, not the reduction's
        _grouped_scale(gdy, dxs, buf, (*_group_tiles(gx), group[3]), True, gather=True)
        out = []
        for dx, r, i in zip(dxs, views, idx):
            dw1, dw2 = _weight_grads(r)
            dv = r["dv"] if tables[i].dim() == 3 else r["dv"].sum(dim=1)
            out.append((dx, dw1.to(w1s[i].dtype), dw2.to(w2s[i].dtype), dv.to(tables[i].dtype, copy=True)))
        return out

    groups = _groups([xs[i] for i in live], [dys[i] for i in live], [w1s[i] for i in live],
                     [w2s[i] for i in live], [tables[i] for i in live])
    res = _by_groups(len(xs), live, groups, run,
                     lambda i: mimb_instances_bwd_triton(dys[i], xs[i], w1s[i], w2s[i], tables[i]))
    return tuple([r[k] for r in res] for k in range(4))


__all__ = [
    "mimb_instances_bwd_triton",
    "mimb_instances_grouped_bwd_triton",
    "mimb_instances_grouped_triton",
    "mimb_instances_triton",
    "mimb_scale_bwd_triton",
    "mimb_scale_fwd_triton",
    "mimb_scale_grouped_bwd_triton",
    "mimb_scale_grouped_fwd_triton",
]
