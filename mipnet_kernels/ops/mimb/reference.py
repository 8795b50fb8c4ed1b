"""MIMB in plain PyTorch: the specification every kernel is tested against, the instance
embedding's forward and backward (written once, used by every backend that does not fuse
the embedding into a kernel), and the training step's saved-state layout.

Formulas (``ct``: float32, float64 for float64 ``x``)::

    s = mean_hw(x);  z1 = s @ w1.T;  h = relu(z1);  e = sigmoid(h @ w2.T);  a = e * v
    y = x * a[:, :, None, None]
    backward:  g_a = sum_hw(dy * x);  g_v = g_a * e;  g_z2 = g_a * v * e * (1 - e)
               dw2 = g_z2.T @ h;  g_z1 = (g_z2 @ w2) * (z1 > 0);  dw1 = g_z1.T @ s
               g_s = g_z1 @ w1;  dx = dy * a[:, :, None, None] + g_s[:, :, None, None] / (H * W)

    embedding: z = lam @ e1.T + b1;  zn = (z - mean_B(z)) * invstd (BatchNorm on batch
               statistics, biased variance) or zn = z (no BatchNorm);
               u = gamma * zn + beta (or zn);  v = sigmoid(relu(u) @ e2.T + b2)
"""

from __future__ import annotations

import torch
from torch import Tensor

from .contract import (
    _instances_branch,
    _scale_bwd_branch,
    _scale_fwd_branch,
    compute_dtype,
    empty_like_x,
    out_memory_format,
)


# --------------------------------------------------------------------------- the block
def _excite(s: Tensor, w1: Tensor, w2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(z1, h, e)`` of the squeeze-excite MLP on ``s [B, C]`` in ``s``'s dtype."""
    z1 = s @ w1.to(s.dtype).T
    h = torch.relu(z1)
    e = torch.sigmoid(h @ w2.to(s.dtype).T)
    return z1, h, e


def mimb_scale_fwd_reference(x: Tensor, w1: Tensor, w2: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Pure-PyTorch forward phase, the specification of every kernel: ``(y, s)``."""
    ct = compute_dtype(x)
    s = x.mean(dim=(2, 3), dtype=ct)
    _, _, e = _excite(s, w1, w2)
    a = e * v.to(ct)
    y = (x.to(ct) * a[:, :, None, None]).to(x.dtype)
    return y.contiguous(memory_format=out_memory_format(x)), s


def mimb_scale_bwd_reference(
    dy: Tensor, x: Tensor, w1: Tensor, w2: Tensor, v: Tensor, s: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Pure-PyTorch backward phase: ``(dx, dw1, dw2, dv)`` (formulas in the module docstring)."""
    ct = compute_dtype(x)
    B, C, H, W = x.shape
    s = s.to(ct)
    vf = v.to(ct)
    z1, h, e = _excite(s, w1, w2)
    a = e * vf
    dyf = dy.to(ct)
    g_a = (dyf * x.to(ct)).sum(dim=(2, 3))
    g_v = g_a * e
    g_z2 = g_a * vf * e * (1 - e)
    dw2 = g_z2.T @ h
    g_z1 = (g_z2 @ w2.to(ct)) * (z1 > 0).to(ct)
    dw1 = g_z1.T @ s
    g_s = g_z1 @ w1.to(ct)
    dx = dyf * a[:, :, None, None] + (g_s / (H * W))[:, :, None, None]
    return (
        dx.to(x.dtype).contiguous(memory_format=out_memory_format(x)),
        dw1.to(w1.dtype).contiguous(),
        dw2.to(w2.dtype).contiguous(),
        g_v.to(v.dtype).contiguous(),
    )


def mimb_instances_reference(x: Tensor, w1: Tensor, w2: Tensor, table: Tensor) -> Tensor:
    """Pure-PyTorch ``mimb_instances``: ``y[n*B + b] = x[b] * (e[b] * t[n, b])`` with
    ``t[n, b] = table[n]`` (``[N, C]``) or ``table[n, b]`` (``[N, B, C]``; ``e * t[n]``
    broadcasts either way)."""
    ct = compute_dtype(x)
    s = x.mean(dim=(2, 3), dtype=ct)
    _, _, e = _excite(s, w1, w2)
    xf = x.to(ct)
    t = table.to(ct)
    fmt = out_memory_format(x)
    outs = [(xf * (e * t[n])[:, :, None, None]).to(x.dtype) for n in range(t.shape[0])]
    if not outs:
        return empty_like_x(x, 0)
    return torch.cat(outs, dim=0).contiguous(memory_format=fmt)


def _loop(fn, *lists):
    return [list(r) for r in zip(*(fn(*args) for args in zip(*lists)))]


def mimb_scale_grouped_fwd_reference(xs, w1s, w2s, vs) -> tuple[list[Tensor], list[Tensor]]:
    ys, ss = _loop(_scale_fwd_branch(mimb_scale_fwd_reference), xs, w1s, w2s, vs)
    return ys, ss


def mimb_scale_grouped_bwd_reference(dys, xs, w1s, w2s, vs, ss):
    return tuple(_loop(_scale_bwd_branch(mimb_scale_bwd_reference), dys, xs, w1s, w2s, vs, ss))


def mimb_instances_grouped_reference(xs, w1s, w2s, tables) -> list[Tensor]:
    branch = _instances_branch(mimb_instances_reference)
    return [branch(*args) for args in zip(xs, w1s, w2s, tables)]


def mimb_instances_bwd_composite(scale_grouped_bwd):
    """The instances backward (grouped form, non-empty branches) from a grouped scale
    backward ``scale_grouped_bwd(dys, xs, w1s, w2s, vs, ss)``.

    Given ``x`` (hence ``s`` and ``e``), instance ``n`` of ``y`` is ``mimb_scale(x, w1, w2,
    t[n])`` and the scale backward is linear in ``(dy, v)``; so the instances backward is
    the sum over ``n`` of the scale backwards on ``(dy_n, x, t[n])``: ``dx``, ``dw1``,
    ``dw2`` summed over ``n``, ``dtable[n]`` instance ``n``'s ``dv`` (summed over the batch
    for an ``[N, C]`` table).  ONE grouped call over every (branch, instance) pair; ``s``
    is recomputed (one read of ``x``).  The specification of ``mimb_instances_bwd`` and
    the kernel of every backend without a fused one; ``dx`` is the in-place sum of the N
    ``dx_n``, each rounded to ``x``'s dtype first (a fused kernel sums in float32).
    """
    def run(dys, xs, w1s, w2s, tables):
        lists = ([], [], [], [], [], [])  # dys, xs, w1s, w2s, vs, ss of the grouped call
        for dy, x, w1, w2, t in zip(dys, xs, w1s, w2s, tables):
            B, N = x.shape[0], t.shape[0]
            v = t if t.dim() == 3 else t[:, None, :].expand(N, B, t.shape[1])
            s = x.mean(dim=(2, 3), dtype=compute_dtype(x))
            lists[0].extend(dy.unflatten(0, (N, B)).unbind(0))
            lists[4].extend(v.contiguous().unbind(0))
            for lst, val in zip((lists[1], lists[2], lists[3], lists[5]), (x, w1, w2, s)):
                lst.extend([val] * N)
        gx, gw1, gw2, gv = scale_grouped_bwd(*lists)
        dxs, dw1s, dw2s, dts = [], [], [], []
        j = 0
        for w1, w2, t in zip(w1s, w2s, tables):
            N = t.shape[0]
            dx = gx[j]
            for k in range(1, N):  # in place: gx[j] is this backward's own buffer
                dx.add_(gx[j + k])
            dxs.append(dx)
            for out, g, like in ((dw1s, gw1, w1), (dw2s, gw2, w2)):
                out.append(g[j] if N == 1 else torch.stack(g[j:j + N]).sum(
                    0, dtype=torch.promote_types(like.dtype, torch.float32)).to(like.dtype))
            dv = torch.stack(gv[j:j + N])  # [N, B, C]
            dts.append(dv.to(t.dtype).contiguous() if t.dim() == 3 else dv.sum(
                1, dtype=torch.promote_types(t.dtype, torch.float32)).to(t.dtype))
            j += N
        return dxs, dw1s, dw2s, dts

    return run


def mimb_instances_grouped_bwd_reference(dys, xs, w1s, w2s, tables):
    """The specification of ``mimb_instances_grouped_bwd`` (non-empty branches)."""
    return mimb_instances_bwd_composite(mimb_scale_grouped_bwd_reference)(dys, xs, w1s, w2s, tables)


def mimb_instances_bwd_reference(dy: Tensor, x: Tensor, w1: Tensor, w2: Tensor, table: Tensor):
    """The specification of ``mimb_instances_bwd`` (csrc/schemas.h): ``(dx, dw1, dw2, dtable)``."""
    return tuple(o[0] for o in mimb_instances_grouped_bwd_reference([dy], [x], [w1], [w2], [table]))


# --------------------------------------------------------------------------- the embedding
def embedding(lam: Tensor, e1: Tensor, b1: Tensor, e2: Tensor, b2: Tensor,
              dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(v, z)`` of the embedding without BatchNorm in ``dtype`` (``mimb``'s, folded)."""
    z = lam.to(dtype) @ e1.to(dtype).T + b1.to(dtype)
    v = torch.sigmoid(torch.relu(z) @ e2.to(dtype).T + b2.to(dtype))
    return v, z


def mimb_embedding_reference(lam: Tensor, e1: Tensor, b1: Tensor, e2: Tensor, b2: Tensor,
                             dtype: torch.dtype = torch.float32) -> Tensor:
    """The instance embedding ``v = sigmoid(relu(lam @ e1.T + b1) @ e2.T + b2)`` in ``dtype``."""
    return embedding(lam, e1, b1, e2, b2, dtype)[0]


# The training embedding's BatchNorm path -- z = lam @ e1.T + b1, its batch statistics, and
# backward dz, de1, db1, dlam -- runs in float64 (``bn_dtype``), as in the cpu kernel: it is
# O(B * K * N), and it is ill-conditioned when the batch's selectors are close (few samples,
# soft lam), where std_b(z) ~ 1 % of |z| amplifies float32 rounding ~100x
# (csrc/cpu/mimb_kernel.cpp, "Precision of the BatchNorm path", has the numbers).
def bn_dtype(ct: torch.dtype, device: torch.device) -> torch.dtype:
    """float64 for the BatchNorm path where the device has it (not on MPS), else ``ct``."""
    return ct if device.type == "mps" else torch.float64


def embed_forward(lam, e1, b1, gamma, beta, e2, b2, running_mean, running_var, momentum, eps,
                  batch_norm: bool, ct: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """``(v, zn, invstd)`` of the training embedding: ``v`` in ``ct``, ``zn`` (``z`` without
    BatchNorm) and ``invstd`` (empty without) in :func:`bn_dtype`; ``running_mean`` /
    ``running_var`` updated in place as ``nn.BatchNorm1d`` does unless they are empty."""
    bt = bn_dtype(ct, lam.device)
    z = torch.addmm(b1.to(bt), lam.to(bt), e1.to(bt).T)
    if batch_norm:
        rm = rv = None
        if running_mean.numel():  # kept in the statistics' own dtype, as nn.BatchNorm1d does
            rm, rv = running_mean.to(bt), running_var.to(bt)
        u, mean, invstd = torch.native_batch_norm(z, gamma.to(bt), beta.to(bt), rm, rv, True,
                                                  momentum, eps)
        if rm is not None and rm is not running_mean:
            running_mean.copy_(rm)
            running_var.copy_(rv)
        zn = (z - mean) * invstd
    else:
        u, zn, invstd = z, z, z.new_empty(0)
    v = torch.sigmoid(torch.addmm(b2.to(ct), torch.relu(u.to(ct)), e2.to(ct).T))
    return v, zn, invstd


def embed_backward(dv, lam, e1, gamma, beta, e2, v, zn, invstd, batch_norm: bool):
    """``(dlam, de1, db1, dgamma, dbeta, de2, db2)`` of the embedding from ``dv``: the one
    Python backward of the embedding (``mimb`` and the training step on every backend but
    the cpu kernel, which fuses it).  ``v`` in the arithmetic dtype, ``zn`` / ``invstd`` in
    the BatchNorm path's (:func:`embed_forward`); ``dgamma`` / ``dbeta`` are empty without
    the BatchNorm.  Each gradient comes back in its operand's dtype."""
    ct, bt = v.dtype, zn.dtype
    u = gamma.to(bt) * zn + beta.to(bt) if batch_norm else zn
    u_ct = u.to(ct)
    du = torch.ops.aten.sigmoid_backward(dv.to(ct), v)
    de2, db2 = du.T @ torch.relu(u_ct), du.sum(0)
    da = torch.ops.aten.threshold_backward(du @ e2.to(ct), u_ct, 0).to(bt)  # through relu
    if batch_norm:
        # BatchNorm on batch statistics (eps enters through invstd only), g = da * gamma:
        # dz = invstd * (g - mean_B(g) - zn * mean_B(g * zn))
        dgamma, dbeta = (da * zn).sum(0).to(gamma.dtype), da.sum(0).to(beta.dtype)
        g = da * gamma.to(bt)
        dz = invstd * (g - g.mean(0) - zn * (g * zn).mean(0))
    else:
        dz = da
        dgamma = dbeta = e1.new_empty(0)
    return (
        (dz @ e1.to(bt)).to(lam.dtype), (dz.T @ lam.to(bt)).to(e1.dtype), dz.sum(0).to(e1.dtype),
        dgamma, dbeta, de2.to(e2.dtype), db2.to(e2.dtype),
    )


# --------------------------------------------------------------------------- training state
# The training step saves one 1-D tensor on every backend (the cpu kernel's layout,
# csrc/cpu/mimb_kernel.cpp ``TrainState``), in the arithmetic dtype (float32; float64 for
# float64 x):
#   [ s: B*C | v: B*C | e: B*C | z1: B*Cr | zn: B*K | zn_lo: B*K | invstd: 2K (BatchNorm) ]
# e and z1 are the excite MLP's; zn and invstd are the BatchNorm path's float64 values as
# (hi, lo) pairs, hi = float(d), lo = float(d - hi).  Any backend's backward reads any
# backend's state.
def state_numel(B: int, C: int, Cr: int, K: int, batch_norm: bool) -> int:
    return B * (3 * C + Cr + 2 * K) + (2 * K if batch_norm else 0)


def _split(d: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    hi = d.to(dtype)
    return hi, (d - hi.to(d.dtype)).to(dtype)


def pack_state(s, v, e, z1, zn, invstd, batch_norm: bool) -> Tensor:
    dt = s.dtype
    parts = [s, v.to(dt), e.to(dt), z1.to(dt), *_split(zn, dt)]
    if batch_norm:
        parts += _split(invstd, dt)
    return torch.cat([p.reshape(-1) for p in parts])


def unpack_state(state: Tensor, B: int, C: int, Cr: int, K: int, batch_norm: bool):
    """``(s, v, e, z1, zn, invstd)`` from a state; ``zn`` / ``invstd`` in :func:`bn_dtype`."""
    bt = bn_dtype(state.dtype, state.device)
    sizes = [B * C, B * C, B * C, B * Cr, B * K, B * K] + ([K, K] if batch_norm else [])
    parts = state.split(sizes)
    s, v, e, z1 = (p.view(B, n) for p, n in zip(parts[:4], (C, C, C, Cr)))
    zn = (parts[4].to(bt) + parts[5].to(bt)).view(B, K)
    invstd = parts[6].to(bt) + parts[7].to(bt) if batch_norm else state.new_empty(0, dtype=bt)
    return s, v, e, z1, zn, invstd


# --------------------------------------------------------------------------- composites
def mimb_fwd_composite(scale_fwd):
    """``mimb_fwd`` as the torch embedding plus a backend's ``mimb_scale_fwd``."""
    def run(x, lam, w1, w2, e1, b1, e2, b2):
        return scale_fwd(x, w1, w2, mimb_embedding_reference(lam, e1, b1, e2, b2, compute_dtype(x)))

    return run


def train_fwd_composite(scale_fwd):
    """``mimb_train_fwd`` as :func:`embed_forward` plus a backend's ``mimb_scale_fwd``."""
    def run(x, lam, w1, w2, e1, b1, gamma, beta, e2, b2, running_mean, running_var, momentum,
            eps, batch_norm):
        ct = compute_dtype(x)
        v, zn, invstd = embed_forward(lam, e1, b1, gamma, beta, e2, b2, running_mean,
                                      running_var, momentum, eps, batch_norm, ct)
        y, s = scale_fwd(x, w1, w2, v)
        z1, _, e = _excite(s, w1, w2)
        return y, pack_state(s, v, e, z1, zn, invstd, batch_norm)

    return run


def train_bwd_composite(scale_bwd):
    """``mimb_train_bwd`` as a backend's ``mimb_scale_bwd`` plus :func:`embed_backward`."""
    def run(dy, x, lam, w1, w2, e1, gamma, beta, e2, state, batch_norm):
        B, C = x.shape[:2]
        s, v, _, _, zn, invstd = unpack_state(state, B, C, w1.shape[0], e1.shape[0], batch_norm)
        dx, dw1, dw2, dv = scale_bwd(dy, x, w1, w2, v, s)
        dlam, de1, db1, dgamma, dbeta, de2, db2 = embed_backward(
            dv, lam, e1, gamma, beta, e2, v, zn, invstd, batch_norm)
        return dx, dlam, dw1, dw2, de1, db1, dgamma, dbeta, de2, db2

    return run


mimb_fwd_reference = mimb_fwd_composite(mimb_scale_fwd_reference)
mimb_fwd_reference.__doc__ = "Pure-PyTorch forward phase of ``mimb``: ``(y, s)`` (the embedding, then the scale)."
mimb_train_fwd_reference = train_fwd_composite(_scale_fwd_branch(mimb_scale_fwd_reference))
mimb_train_fwd_reference.__doc__ = "Pure-PyTorch ``mimb_train_fwd``: ``(y, state)``."
mimb_train_bwd_reference = train_bwd_composite(_scale_bwd_branch(mimb_scale_bwd_reference))
mimb_train_bwd_reference.__doc__ = "Pure-PyTorch ``mimb_train_bwd`` (the gradients of every input)."


def mimb_reference(x: Tensor, lam: Tensor, w1: Tensor, w2: Tensor, e1: Tensor, b1: Tensor,
                   e2: Tensor, b2: Tensor) -> Tensor:
    """Pure-PyTorch ``mimb`` (forward only, autograd through plain ops): the specification."""
    return mimb_fwd_reference(x, lam, w1, w2, e1, b1, e2, b2)[0]
