"""The Triton kernels of the Multi-Instance Modulation Block (``@triton.jit`` functions
only); :mod:`.mimb` holds the launchers, their settings and the design notes.
"""

import triton
import triton.language as tl

from . import _math

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
    dy_ptr,  # upstream gradient (read iff MODE >= 2), x's layout and dtype: MODE 2 x's
    #          shape; MODE 3 (NA*B, C, H, W), instance-major (dy_n = rows n*B .. n*B+B-1)
    part_ptr,  # scratch partial sums, contiguous, accumulation dtype ACC: (B, SPLIT, C) of
    #            sum_hw(x) (MODE 0/1/3) or sum_hw(dy * x) (MODE 2); MODE 3 then (NA, B, SPLIT, C)
    #            of sum_hw(dy_n * x)
    count_ptr,  # per-sample arrival tickets, shape (B,), int32, zero on entry
    w1_ptr,  # squeeze weight, shape (CR, C), any strides/float dtype
    w2_ptr,  # excite weight, shape (C, CR), any strides/float dtype
    mult_ptr,  # (NA, B, C), any strides/float dtype: MODE 0/2 v[None]; MODE 1/3 the table
    #            t[n, b] (a [N, C] table: stride 0 over b)
    s_ptr,  # (B, C) ACC: MODE 0/1/3 output mean_hw(x); MODE 2 input (the forward's s)
    a_ptr,  # output per-channel scales, shape (NA, B, C), ACC: a[n, b] = e[b] * mult[n, b]
    dv_ptr,  # MODE 2/3 outputs, ACC: dv = g_a * e                  (NA, B, C)
    gz2_ptr,  #   g_z2 = g_e * e * (1 - e), g_e = sum_n g_a[n] * mult[n]  (B, C)
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
    NA,  # rows of a (and of mult): 1 (MODE 0/2) or N (MODE 1/3)
    NG,  # MODE 3: instance groups of NB per (b, channel block, split), cdiv(NA, NB); else 1
    sw1_r, sw1_c, sw2_c, sw2_r, smult_n, smult_b, smult_c,  # element strides of w1, w2, mult
    MODE: tl.constexpr,  # 0 forward (mult = v), 1 instances (mult = table), 2 backward,
    #                      3 instances backward (mult = table)
    BLOCK_C: tl.constexpr,  # channels per reduction tile (power of two)
    BLOCK_P: tl.constexpr,  # pixels per reduction tile (power of two)
    MLP_C: tl.constexpr,  # channels per step of the MLP (power of two)
    CR_PAD: tl.constexpr,  # next power of two >= CR
    NB: tl.constexpr,  # MODE 3: instances per program (power of two); else 1
):
    ACC = part_ptr.dtype.element_ty
    # pid = (((b * num_cblocks) + cblock) * SPLIT + split) * NG + instance group
    grp = pid % NG
    pid_s = pid // NG
    split = pid_s % SPLIT
    bc = pid_s // SPLIT
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
    if MODE == 3:
        # Instances n = grp*NB .. grp*NB + NB-1: the x tile is loaded once and multiplied
        # into the NB dy_n tiles ([NB, BLOCK_C, BLOCK_P]: one load, no per-tile reduction).
        ns = grp * NB + tl.arange(0, NB)
        nmask = ns < NA
        dyoff = ns.to(tl.int64) * B * C * HW  # first element of dy_n's sample 0
        acc_n = tl.zeros([NB, BLOCK_C, BLOCK_P], ACC)
    for p0 in range(start, end, BLOCK_P):
        ps = p0 + lanes
        offs = base + coff[:, None] + (ps * stride_p)[None, :]
        m = cmask[:, None] & (ps < end)[None, :]
        v = tl.load(x_ptr + offs, mask=m, other=0.0).to(ACC)
        if MODE == 3:
            d = tl.load(dy_ptr + dyoff[:, None, None] + offs[None, :, :],
                        mask=nmask[:, None, None] & m[None, :, :], other=0.0).to(ACC)
            acc_n += v[None, :, :] * d
        if MODE == 2:
            v = v * tl.load(dy_ptr + offs, mask=m, other=0.0).to(ACC)
        acc += v
    if grp == 0:  # (MODE 3: every instance group sums x; the first one stores it)
        tl.store(part_ptr + (b64 * SPLIT + split) * C + cs, tl.sum(acc, axis=1), mask=cmask)
    if MODE == 3:
        ga_part = part_ptr + B * SPLIT * C
        tl.store(ga_part + ((ns.to(tl.int64)[:, None] * B + b64) * SPLIT + split) * C + cs[None, :],
                 tl.sum(acc_n, axis=2), mask=nmask[:, None] & cmask[None, :])

    # ---- phase 2: the last program of sample b to arrive runs the tiny MLP.  The barrier
    # orders every thread's partial stores before the ticket's release (the atomic is
    # acq_rel at GPU scope), the "last block" pattern of CUDA's threadFenceReduction sample.
    tl.debug_barrier()
    ticket = tl.atomic_add(count_ptr + b, 1)
    if ticket == num_cblocks * SPLIT * NG - 1:
        cols = tl.arange(0, MLP_C)
        rs = tl.arange(0, CR_PAD)
        rmask = rs < CR
        z1 = _mimb_mlp_hidden(part_ptr, s_ptr, w1_ptr, b, C, CR, HW, SPLIT, sw1_r, sw1_c,
                              MODE != 2, MLP_C, CR_PAD)
        h = tl.where(z1 < 0.0, 0.0, z1)  # relu with NaN propagating, as torch.relu
        if MODE >= 2:
            gz1 = tl.zeros([CR_PAD], ACC)
        for c0 in range(0, C, MLP_C):
            cc = c0 + cols
            cm = cc < C
            e, w2t = _mimb_excite_chunk(w2_ptr, h, cc, cm, CR, sw2_c, sw2_r, CR_PAD)
            if MODE == 1:
                for n in range(NA):
                    t = tl.load(mult_ptr + n * smult_n + b64 * smult_b + cc * smult_c, mask=cm,
                                other=0.0).to(ACC)
                    tl.store(a_ptr + (n * B + b64) * C + cc, e * t, mask=cm)
            elif MODE == 3:
                # The instances share the excite: g_e = sum_n g_a[n] * t[n, b] (fixed order),
                # dv[n] = g_a[n] * e; the rest is the scale backward's with g_a * v -> g_e.
                g_e = tl.zeros([MLP_C], ACC)
                for n in range(NA):
                    t = tl.load(mult_ptr + n * smult_n + b64 * smult_b + cc * smult_c, mask=cm,
                                other=0.0).to(ACC)
                    row = n * B + b64
                    tl.store(a_ptr + row * C + cc, e * t, mask=cm)
                    g_a = tl.zeros([MLP_C], ACC)
                    for sp in range(SPLIT):
                        g_a += tl.load(ga_part + (row * SPLIT + sp) * C + cc, mask=cm, other=0.0,
                                       cache_modifier=".cg")
                    tl.store(dv_ptr + row * C + cc, g_a * e, mask=cm)
                    g_e += g_a * t
                g_z2 = g_e * e * (1.0 - e)
            else:
                vv = tl.load(mult_ptr + b64 * smult_b + cc * smult_c, mask=cm, other=0.0).to(ACC)
                tl.store(a_ptr + b64 * C + cc, e * vv, mask=cm)
                if MODE == 2:
                    g_a = tl.zeros([MLP_C], ACC)
                    for sp in range(SPLIT):
                        g_a += tl.load(part_ptr + (b64 * SPLIT + sp) * C + cc, mask=cm, other=0.0,
                                       cache_modifier=".cg")
                    tl.store(dv_ptr + b64 * C + cc, g_a * e, mask=cm)
                    g_z2 = g_a * vv * e * (1.0 - e)
            if MODE >= 2:
                tl.store(gz2_ptr + b64 * C + cc, g_z2, mask=cm)
                gz1 += tl.sum(tl.where(cm[:, None] & rmask[None, :], w2t * g_z2[:, None], 0.0), axis=0)
        if MODE >= 2:
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
def _store_rounded(ptr, y, mask):
    """Store ``y`` (accumulation dtype) rounded once to ``ptr``'s element type."""
    if ptr.dtype.element_ty == tl.bfloat16:
        # Round to nearest even on the float32 bits (as torch does), so the cast below is
        # exact: the GPU's cvt.rn gives the same bits, and TRITON_INTERPRET=1, whose
        # float32 -> bfloat16 cast truncates, agrees with the GPU.  NaN stays NaN.
        bits = y.to(tl.uint32, bitcast=True)
        hi = bits >> 16
        lo = bits & 0xFFFF
        up = (lo > 0x8000) | ((lo == 0x8000) & ((hi & 1) == 1))
        rounded = ((hi + up.to(tl.uint32)) << 16).to(tl.float32, bitcast=True)
        y = tl.where(y != y, y, rounded)
    tl.store(ptr, y.to(ptr.dtype.element_ty), mask=mask)


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
        _store_rounded(out_ptr + (n * B + b).to(tl.int64) * C * HW + offs, y, m)


@triton.jit
def _gather_program(
    pid,  # program id within this launch (within the branch for grouped launches)
    in_ptr,  # input dy, shape (N*B, C, H, W), instance-major, NCHW or NHWC (strides below)
    a_ptr,  # per-channel scales, shape (N, B, C), contiguous, accumulation dtype
    bias_ptr,  # per-channel additive term, shape (B, C), a's dtype
    out_ptr,  # output dx, shape (B, C, H, W), in's layout and dtype
    B, C, HW, N, stride_c, stride_p, num_pblocks, num_cblocks,  # as _scale_program
    BLOCK_C: tl.constexpr,  # channels per tile (power of two)
    BLOCK_P: tl.constexpr,  # pixels per tile (power of two)
):
    """The instances backward's apply pass, ``out[b] = sum_n in[n*B + b] * a[n, b] + bias[b]``
    (sum in instance order, then the bias; rounded once): each ``dy_n`` tile read once, ``dx``
    written once."""
    ACC = a_ptr.dtype.element_ty
    pblk = pid % num_pblocks
    bc = pid // num_pblocks
    b = bc // num_cblocks
    cblk = bc - b * num_cblocks
    cs = cblk * BLOCK_C + tl.arange(0, BLOCK_C)
    ps = pblk * BLOCK_P + tl.arange(0, BLOCK_P)
    cmask = cs < C
    m = cmask[:, None] & (ps < HW)[None, :]
    offs = cs[:, None] * stride_c + ps[None, :] * stride_p  # within a sample, int32
    y = tl.zeros([BLOCK_C, BLOCK_P], ACC)
    for n in range(N):
        row = (n * B + b).to(tl.int64)
        v = tl.load(in_ptr + row * C * HW + offs, mask=m, other=0.0).to(ACC)
        a = tl.load(a_ptr + row * C + cs, mask=cmask, other=0.0)
        y += v * a[:, None]
    bias = tl.load(bias_ptr + b * C + cs, mask=cmask, other=0.0)
    _store_rounded(out_ptr + b.to(tl.int64) * C * HW + offs, y + bias[:, None], m)


@triton.jit
def _mimb_gather_kernel(
    in_ptr, a_ptr, bias_ptr, out_ptr, B, C, HW, N, stride_c, stride_p, num_pblocks, num_cblocks,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    _gather_program(tl.program_id(0), in_ptr, a_ptr, bias_ptr, out_ptr, B, C, HW, N, stride_c, stride_p,
                    num_pblocks, num_cblocks, BLOCK_C, BLOCK_P)


# Single-op kernels: the programs above with every size a kernel argument (Triton
# specialises unit strides and 16-divisible sizes, so the loads vectorise).
@triton.jit
def _mimb_reduce_mlp_kernel(
    x_ptr, dy_ptr, part_ptr, count_ptr, w1_ptr, w2_ptr, mult_ptr, s_ptr, a_ptr,
    dv_ptr, gz2_ptr, h_ptr, gz1_ptr, bias_ptr,
    B, C, CR, HW, stride_c, stride_p, CHUNK, num_cblocks, SPLIT, NA, NG,
    sw1_r, sw1_c, sw2_c, sw2_r, smult_n, smult_b, smult_c,
    MODE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    MLP_C: tl.constexpr, CR_PAD: tl.constexpr, NB: tl.constexpr,
):
    _reduce_mlp_program(
        tl.program_id(0), x_ptr, dy_ptr, part_ptr, count_ptr, w1_ptr, w2_ptr, mult_ptr, s_ptr, a_ptr,
        dv_ptr, gz2_ptr, h_ptr, gz1_ptr, bias_ptr,
        B, C, CR, HW, stride_c, stride_p, CHUNK, num_cblocks, SPLIT, NA, NG,
        sw1_r, sw1_c, sw2_c, sw2_r, smult_n, smult_b, smult_c,
        MODE, BLOCK_C, BLOCK_P, MLP_C, CR_PAD, NB,
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


#: Values per meta-table row at most (``_meta_row_kernel``'s arguments).
META_MAX = 28


@triton.jit(do_not_specialize=[f"v{i}" for i in range(META_MAX)])
def _meta_row_kernel(
    out_ptr,  # output: one row of a meta table, shape (NCOL,), int32
    v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, v10, v11, v12, v13,  # the row's values (int32)
    v14, v15, v16, v17, v18, v19, v20, v21, v22, v23, v24, v25, v26, v27,
    NCOL: tl.constexpr,  # <= META_MAX values stored
):
    """Writes a meta-table row from kernel arguments: no host-to-device copy, so a CUDA
    graph can capture it (the values are baked into the launch)."""
    vals = (v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, v10, v11, v12, v13,
            v14, v15, v16, v17, v18, v19, v20, v21, v22, v23, v24, v25, v26, v27)
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
            "sw2_c", "sw2_r", "smult_n", "smult_b", "smult_c", "part", "s", "a", "dv", "gz2", "h", "gz1",
            "bias", "count", "ng")
_SC_COLS = ("start", "B", "C", "HW", "N", "num_pblocks", "num_cblocks", "a", "bias")


@triton.jit
def _mimb_reduce_mlp_grouped_kernel(
    meta_ptr,  # int32 (G, 26): the _RM_COLS of each branch
    ws_ptr,  # accumulation-dtype workspace: every branch's part, s, a, dv, gz2, h, gz1, bias
    count_ptr,  # int32 tickets, zero on entry
    x0, x1, x2, x3, dy0, dy1, dy2, dy3, w1_0, w1_1, w1_2, w1_3, w2_0, w2_1, w2_2, w2_3, m0, m1, m2, m3,
    G: tl.constexpr, LAYOUT: tl.constexpr, ALIGNED: tl.constexpr, MODE: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, MLP_C: tl.constexpr, CR_PAD: tl.constexpr,
    NB: tl.constexpr,  # MODE 3: instances per program (common to the group); else 1
):
    NCOL: tl.constexpr = 26
    pid = tl.program_id(0)
    g = _branch_of(pid, meta_ptr, G, NCOL)
    row = meta_ptr + g * NCOL
    if MODE == 3:
        NG = tl.load(row + 25)
    else:
        NG = 1
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
        ws_ptr + tl.load(row + 16), count_ptr + tl.load(row + 24),
        _pick(g, w1_0, w1_1, w1_2, w1_3, G), _pick(g, w2_0, w2_1, w2_2, w2_3, G), _pick(g, m0, m1, m2, m3, G),
        ws_ptr + tl.load(row + 17), ws_ptr + tl.load(row + 18), ws_ptr + tl.load(row + 19),
        ws_ptr + tl.load(row + 20), ws_ptr + tl.load(row + 21), ws_ptr + tl.load(row + 22),
        ws_ptr + tl.load(row + 23),
        tl.load(row + 1), C, tl.load(row + 3), HW, stride_c, stride_p,
        tl.load(row + 5), tl.load(row + 6), tl.load(row + 7), tl.load(row + 8), NG,
        tl.load(row + 9), tl.load(row + 10), tl.load(row + 11), tl.load(row + 12),
        tl.load(row + 13), tl.load(row + 14), tl.load(row + 15),
        MODE, BLOCK_C, BLOCK_P, MLP_C, CR_PAD, NB,
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


@triton.jit
def _mimb_gather_grouped_kernel(
    meta_ptr,  # int32 (G, 9): the _SC_COLS of each branch
    ws_ptr,  # the reduction's workspace (a and bias of every branch)
    in0, in1, in2, in3, out0, out1, out2, out3,
    G: tl.constexpr, LAYOUT: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """``_mimb_gather_kernel`` over the branches of a grouped instances backward."""
    NCOL: tl.constexpr = 9
    pid = tl.program_id(0)
    g = _branch_of(pid, meta_ptr, G, NCOL)
    row = meta_ptr + g * NCOL
    C = tl.load(row + 2)
    HW = tl.load(row + 3)
    # (the hints as in _mimb_scale_grouped_kernel)
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
    _gather_program(
        pid - tl.load(row + 0), _pick(g, in0, in1, in2, in3, G),
        ws_ptr + tl.multiple_of(tl.load(row + 7), 16), ws_ptr + tl.multiple_of(tl.load(row + 8), 16),
        _pick(g, out0, out1, out2, out3, G),
        tl.load(row + 1), C, HW, tl.load(row + 4), stride_c, stride_p,
        tl.load(row + 5), tl.load(row + 6), BLOCK_C, BLOCK_P,
    )
