"""A training step of the whole MIMB in one forward and one backward call.

In training mode the official ``SELambdaLayer`` computes its instance embedding
``v = fc_lambda(lam)`` with a BatchNorm1d on batch statistics (so there is no per-instance
table to fold, unlike eval mode).  Run as plain modules, that embedding is ~5 modules
forward and ~8 autograd nodes backward around the fused ``mimb_scale``; on small feature
maps those fixed costs are most of a training step.  :func:`mimb_train` is the whole block
instead, embedding and BatchNorm included, as one ``torch.autograd.Function``:

forward  ``mimb_train_fwd(x, lam, w1, w2, e1, b1, gamma, beta, e2, b2, running_mean,
         running_var, momentum, eps, batch_norm) -> (y, state)``::

             z = lam @ e1.T + b1;  mean, var = batch mean / biased variance of z
             zn = (z - mean) * invstd,  invstd = 1 / sqrt(var + eps)
             v = sigmoid(relu(gamma * zn + beta) @ e2.T + b2)
             (y, s) = mimb_scale_fwd(x, w1, w2, v)

         and ``running_mean`` / ``running_var`` updated in place as ``nn.BatchNorm1d`` does
         (``(1 - momentum) * running + momentum * batch``, the variance unbiased); empty
         running tensors are not updated.  ``batch_norm=False`` (the layer built with
         ``embed_norm=False``): ``zn = z``, no statistics.
backward ``mimb_train_bwd(dy, x, lam, w1, w2, e1, gamma, beta, e2, state, batch_norm)
         -> (dx, dlam, dw1, dw2, de1, db1, dgamma, dbeta, de2, db2)``: the
         block's backward (``mimb_scale_bwd``) for ``dx, dw1, dw2, dv``, then ``dv``
         through the embedding (sigmoid, Linear, ReLU, BatchNorm with batch statistics,
         Linear).

Saved for backward: ``x``, the small operands and ``state``, a tuple of per-sample vectors
the backend defines (the torch composites: ``(s [B, C], v [B, C], z [B, K], a [B, K],
mean [K], invstd [K])``;
the cpu kernel: one float32 tensor that also holds the excite MLP's ``e`` and ``z1``, so its
backward does not recompute them) -- no full-size intermediate, as ``mimb_scale``.  The
backward runs on the backend that ran the forward.

Backends (``mipnet_kernels._backends``, ops ``mimb_train_fwd`` / ``mimb_train_bwd``):

* ``cpu``: ``torch.ops.mipnet_cpu.mimb_train_fwd`` / ``_bwd`` (csrc/cpu/mimb_kernel.cpp),
  everything in one C++ call each way (compiled-kernel dtypes; float32 running stats).
* ``cuda`` / ``triton`` / ``reference``: the embedding with the modules' own ATen kernels and the
  backend's own ``mimb_scale_fwd`` / ``mimb_scale_bwd`` kernels.

:class:`mipnet_kernels.nn.MIMB` uses this in training mode when it runs eagerly (not under
``torch.compile``, functorch transforms, a tensor-subclass or dispatch mode, or with hooks
on its embedding modules -- there it runs its modules and ``mimb_scale``, which compile and
trace as usual).  Under autocast the op runs with autocast off: float32 arithmetic, ``y``
in ``x``'s dtype, gradients in the operands' dtypes.  The forward is not twice
differentiable (as the BatchNorm path through ``mimb_scale`` is not either).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .. import _backends, _extension
from .._backends import register
from .mimb import (
    KERNEL_DTYPES,
    SUPPORTED_DTYPES,
    _check_embed_args,
    _check_excite,
    _check_tensor,
    _check_x,
    _dense,
    _fast_embed,
    _fast_xw,
    _kernel_dtype_reasons,
    _scale_bwd_branch,
    _scale_fwd_branch,
    _triton_dtype_reasons,
    compute_dtype,
    mimb_scale_bwd_reference,
    mimb_scale_fwd_reference,
)

__all__ = ["mimb_train", "mimb_train_bwd_reference", "mimb_train_fwd_reference"]


# --------------------------------------------------------------------------- embedding
# The composite (reference, triton, cuda) runs the embedding with the same ATen kernels as
# the official modules -- addmm, native_batch_norm (which also updates the running
# statistics), relu, sigmoid -- and their backward kernels, so on a GPU it launches no more
# kernels than the modules do (plus the casts); its saved state is (s, v, z, a, mean, invstd).
#
# The BatchNorm path -- z = lam @ e1.T + b1, its batch statistics, and backward dz, de1, db1,
# dlam -- runs in float64 (``_bn_dtype``), as in the cpu kernel: it is O(B * K * N), and it
# is ill-conditioned when the batch's selectors are close (few samples, soft lam), where
# std_b(z) ~ 1 % of |z| amplifies float32 rounding ~100x (csrc/cpu/mimb_kernel.cpp,
# "Precision of the BatchNorm path", has the numbers).  The rest stays in ``ct``.
def _bn_dtype(ct: torch.dtype, device: torch.device) -> torch.dtype:
    """float64 for the BatchNorm path where the device has it (not on MPS), else ``ct``."""
    return ct if device.type == "mps" else torch.float64


def _embed_fwd(lam, e1, b1, gamma, beta, e2, b2, running_mean, running_var, momentum, eps,
               batch_norm, ct):
    """``(v, z, a, mean, invstd)`` of the training-mode embedding: ``v`` in dtype ``ct``,
    the BatchNorm path (``z, a, mean, invstd``) in ``_bn_dtype``."""
    bt = _bn_dtype(ct, lam.device)
    z = torch.addmm(b1.to(bt), lam.to(bt), e1.to(bt).T)
    if batch_norm:
        rm = rv = None
        if running_mean.numel():  # kept in the statistics' own dtype, as nn.BatchNorm1d does
            rm, rv = running_mean.to(bt), running_var.to(bt)
        a, mean, invstd = torch.native_batch_norm(z, gamma.to(bt), beta.to(bt), rm, rv, True,
                                                  momentum, eps)
        if rm is not None and rm is not running_mean:
            running_mean.copy_(rm)
            running_var.copy_(rv)
    else:
        a, mean, invstd = z, z.new_empty(0), z.new_empty(0)
    v = torch.sigmoid(torch.addmm(b2.to(ct), torch.relu(a.to(ct)), e2.to(ct).T))
    return v, z, a, mean, invstd


def _embed_bwd(dv, lam, e1, gamma, e2, v, z, a, mean, invstd, batch_norm):
    """``(dlam, de1, db1, dgamma, dbeta, de2, db2)`` from ``dv`` (``v``'s dtype)."""
    ct, bt = v.dtype, z.dtype
    du = torch.ops.aten.sigmoid_backward(dv.to(ct), v)
    a_ct = a.to(ct)
    de2, db2 = du.T @ torch.relu(a_ct), du.sum(0)
    da = torch.ops.aten.threshold_backward(du @ e2.to(ct), a_ct, 0).to(bt)
    if batch_norm:
        # Training mode: the saved batch statistics are used and eps is not.
        dz, dgamma, dbeta = torch.ops.aten.native_batch_norm_backward(
            da, z, gamma.to(bt), None, None, mean, invstd, True, 0.0, [True, True, True])
        dgamma, dbeta = dgamma.to(gamma.dtype), dbeta.to(gamma.dtype)
    else:
        dz = da
        dgamma = dbeta = e1.new_empty(0)
    return (
        (dz @ e1.to(bt)).to(lam.dtype), (dz.T @ lam.to(bt)).to(e1.dtype), dz.sum(0).to(e1.dtype),
        dgamma, dbeta, de2.to(e2.dtype), db2.to(e2.dtype),
    )


def _composite_fwd(scale_fwd):
    """``mimb_train_fwd`` as the torch embedding plus a backend's ``mimb_scale_fwd``."""
    def run(x, lam, w1, w2, e1, b1, gamma, beta, e2, b2, running_mean, running_var, momentum,
            eps, batch_norm):
        v, z, a, mean, invstd = _embed_fwd(lam, e1, b1, gamma, beta, e2, b2, running_mean,
                                           running_var, momentum, eps, batch_norm,
                                           compute_dtype(x))
        y, s = scale_fwd(x, w1, w2, v)
        return y, (s, v, z, a, mean, invstd)

    return run


def _composite_bwd(scale_bwd):
    """``mimb_train_bwd`` as a backend's ``mimb_scale_bwd`` plus the torch embedding backward."""
    def run(dy, x, lam, w1, w2, e1, gamma, beta, e2, state, batch_norm):
        s, v, z, a, mean, invstd = state
        dx, dw1, dw2, dv = scale_bwd(dy, x, w1, w2, v, s)
        dlam, de1, db1, dgamma, dbeta, de2, db2 = _embed_bwd(
            dv, lam, e1, gamma, e2, v, z, a, mean, invstd, batch_norm)
        return dx, dlam, dw1, dw2, de1, db1, dgamma, dbeta, de2, db2

    return run


mimb_train_fwd_reference = _composite_fwd(mimb_scale_fwd_reference)
mimb_train_fwd_reference.__doc__ = "Pure-PyTorch ``mimb_train_fwd``: ``(y, (s, v, z, a, mean, invstd))``."
mimb_train_bwd_reference = _composite_bwd(mimb_scale_bwd_reference)
mimb_train_bwd_reference.__doc__ = "Pure-PyTorch ``mimb_train_bwd`` (the gradients of every input)."


# --------------------------------------------------------------------------- backends
def _example_fwd(device):
    g = torch.Generator().manual_seed(0)
    B, C, H, W, N = 4, 32, 64, 48, 2
    K = C // 4

    def r(*shape):
        return torch.randn(*shape, generator=g).to(device)

    lam = torch.nn.functional.one_hot(torch.arange(B) % N, N).float().to(device)
    return (r(B, C, H, W), lam, r(K, C), r(C, K), r(K, N), r(K), r(K), r(K), r(C, K), r(C),
            torch.zeros(K, device=device), torch.ones(K, device=device), 0.1, 1e-5, True)


def _example_bwd(device):
    x, lam, w1, w2, e1, b1, gamma, beta, e2, b2, rm, rv, m, eps, bn = _example_fwd(device)
    # The state of whichever backend the automatic choice runs (the backward needs its own).
    _, (y, state) = _backends.dispatch_named("mimb_train_fwd", torch.device(device), x, lam, w1,
                                             w2, e1, b1, gamma, beta, e2, b2, rm, rv, m, eps, bn)
    return (torch.randn_like(y), x, lam, w1, w2, e1, gamma, beta, e2, state, bn)


_backends.define_op("mimb_train_fwd", example_inputs=_example_fwd)
_backends.define_op("mimb_train_bwd", example_inputs=_example_bwd)

register("mimb_train_fwd", "reference")(mimb_train_fwd_reference)
register("mimb_train_bwd", "reference")(mimb_train_bwd_reference)


def _running_reasons(running_mean, running_var) -> list[str]:
    return [
        f"{name} is {t.dtype}{'' if t.is_contiguous() else ', non-contiguous'}; the cpu kernel "
        "updates float32 contiguous running statistics"
        for name, t in (("running_mean", running_mean), ("running_var", running_var))
        if t.numel() and (t.dtype != torch.float32 or not t.is_contiguous())
    ]


_FWD_NAMES = ("x", "lam", "w1", "w2", "e1", "b1", "gamma", "beta", "e2", "b2")
_BWD_NAMES = ("dy", "x", "lam", "w1", "w2", "e1", "gamma", "beta", "e2")


def _dtype_reasons(names: tuple, tensors: tuple, batch_norm: bool) -> list[str]:
    """The compiled-kernel dtype reasons (gamma / beta only with the BatchNorm)."""
    for t in tensors:  # the common case without building messages
        if t.dtype not in KERNEL_DTYPES:
            break
    else:
        return []
    named = {n: t for n, t in zip(names, tensors) if batch_norm or n not in ("gamma", "beta")}
    return _kernel_dtype_reasons(**named)


def _cpu_fwd_reasons(x, lam, w1, w2, e1, b1, gamma, beta, e2, b2, running_mean, running_var,
                     momentum, eps, batch_norm) -> list[str]:
    small = (x, lam, w1, w2, e1, b1) + ((gamma, beta) if batch_norm else ()) + (e2, b2)
    names = _FWD_NAMES if batch_norm else _FWD_NAMES[:6] + _FWD_NAMES[8:]
    return (_extension.missing_kernel("mipnet_cpu", "mimb_train_fwd")
            or _dtype_reasons(names, small, batch_norm)
            or (_running_reasons(running_mean, running_var) if batch_norm else []))


def _cpu_bwd_reasons(dy, x, lam, w1, w2, e1, gamma, beta, e2, state, batch_norm) -> list[str]:
    small = (dy, x, lam, w1, w2, e1) + ((gamma, beta) if batch_norm else ()) + (e2,)
    names = _BWD_NAMES if batch_norm else _BWD_NAMES[:6] + _BWD_NAMES[8:]
    reasons = (_extension.missing_kernel("mipnet_cpu", "mimb_train_bwd")
               or _dtype_reasons(names, small, batch_norm))
    if not reasons and len(state) != 1:
        reasons = ["state is not the cpu kernel's: the forward did not run on the cpu backend"]
    return reasons


@register("mimb_train_fwd", "cpu", reasons=_cpu_fwd_reasons)
def _train_fwd_cpu(*args):
    y, state = torch.ops.mipnet_cpu.mimb_train_fwd(*args)
    return y, (state,)


@register("mimb_train_bwd", "cpu", reasons=_cpu_bwd_reasons)
def _train_bwd_cpu(dy, x, lam, w1, w2, e1, gamma, beta, e2, state, batch_norm):
    return torch.ops.mipnet_cpu.mimb_train_bwd(dy, x, lam, w1, w2, e1, gamma, beta, e2, state[0],
                                               batch_norm)


def _scale_impl(op: str, backend: str):
    """The ``backend`` implementation of ``op`` (looked up at call time), behind the op's
    own handling of empty inputs and layouts (as ``mimb_scale`` runs it)."""
    branch = _scale_fwd_branch if op == "mimb_scale_fwd" else _scale_bwd_branch

    def run(*args):
        return branch(_backends._OPS[op].impls[backend].fn)(*args)

    return run


def _scale_fwd_reasons(backend: str):
    def reasons(x, lam, w1, w2, *rest) -> list[str]:
        # v is computed here in float32 (float64 for float64 x): a dtype every backend takes.
        v = x.new_empty(0, dtype=compute_dtype(x))
        return _backends.not_supported_reasons("mimb_scale_fwd", backend, x.device, x, w1, w2, v)

    return reasons


def _scale_bwd_reasons(backend: str):
    def reasons(dy, x, lam, w1, w2, e1, gamma, beta, e2, state, batch_norm) -> list[str]:
        if len(state) != 6:
            return [f"state is not the {backend} backend's: the forward ran on another backend"]
        s, v = state[:2]
        return _backends.not_supported_reasons("mimb_scale_bwd", backend, x.device,
                                               dy, x, w1, w2, v, s)

    return reasons


for _name in ("cuda", "triton"):
    register("mimb_train_fwd", _name, reasons=_scale_fwd_reasons(_name))(
        _composite_fwd(_scale_impl("mimb_scale_fwd", _name)))
    register("mimb_train_bwd", _name, reasons=_scale_bwd_reasons(_name))(
        _composite_bwd(_scale_impl("mimb_scale_bwd", _name)))


# --------------------------------------------------------------------------- autograd
_NULL = contextlib.nullcontext()


def _no_autocast(device_type: str):
    """Autocast off inside the op (its arithmetic is float32 whatever the autocast dtype,
    like the other MIMB custom ops, which autocast does not see)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return _NULL


class _MimbTrain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lam, w1, w2, e1, b1, gamma, beta, e2, b2, running_mean, running_var,
                momentum, eps, batch_norm):
        with _no_autocast(x.device.type):
            ctx.backend, (y, state) = _backends.dispatch_named(
                "mimb_train_fwd", x.device, x, lam, w1, w2, e1, b1, gamma, beta, e2, b2,
                running_mean, running_var, momentum, eps, batch_norm)
        ctx.save_for_backward(x, lam, w1, w2, e1, gamma, beta, e2, *state)
        ctx.batch_norm = batch_norm
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, lam, w1, w2, e1, gamma, beta, e2, *state = ctx.saved_tensors
        bn = ctx.batch_norm
        # On the backend that ran the forward (the saved state is that backend's).
        with _no_autocast(x.device.type):
            dx, dlam, dw1, dw2, de1, db1, dgamma, dbeta, de2, db2 = _backends.dispatch_on(
                ctx.backend, "mimb_train_bwd", x.device, dy, x, lam, w1, w2, e1, gamma, beta,
                e2, tuple(state), bn)
        return (dx, dlam, dw1, dw2, de1, db1, dgamma if bn else None, dbeta if bn else None,
                de2, db2, None, None, None, None, None)


def _check_train_args(x, lam, w1, w2, e1, b1, gamma, beta, e2, b2, running_mean, running_var,
                      batch_norm) -> None:
    if not (_fast_xw(x, w1, w2) and _fast_embed(x, lam, e1, b1, e2, b2)):
        _check_x(x)
        _check_excite(x, w1, w2)
        _check_embed_args(x, lam, e1, b1, e2, b2)
    if not batch_norm:
        return
    K = e1.shape[0]
    for t, name in ((gamma, "gamma"), (beta, "beta")):
        if not isinstance(t, Tensor) or t.dtype not in SUPPORTED_DTYPES or tuple(t.shape) != (K,):
            raise ValueError(f"{name} must be a float tensor [K] = [{K}] (K = e1.shape[0])")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    for t, name in ((running_mean, "running_mean"), (running_var, "running_var")):
        if not isinstance(t, Tensor) or not t.is_floating_point() or tuple(t.shape) not in ((K,), (0,)):
            raise ValueError(f"{name} must be a float tensor [K] = [{K}] (or empty: not tracked)")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if x.shape[0] < 2:
        raise ValueError(
            f"the embedding's BatchNorm needs more than 1 sample per batch in training (batch "
            f"statistics), got x.shape[0] = {x.shape[0]}"
        )


def mimb_train(x: Tensor, lam: Tensor, w1: Tensor, w2: Tensor, e1: Tensor, b1: Tensor,
               gamma: Tensor | None, beta: Tensor | None, e2: Tensor, b2: Tensor,
               running_mean: Tensor | None = None, running_var: Tensor | None = None,
               momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """The official MIMB in training mode, embedding BatchNorm included, as one fused step.

    Args:
        x: ``[B, C, H, W]`` (as :func:`~mipnet_kernels.mimb_scale`), ``B >= 2`` with the BatchNorm.
        lam: ``[B, N]`` float instance selector.
        w1, w2: squeeze-excite weights ``[C/r, C]``, ``[C, C/r]`` (``fc.0`` / ``fc.2``).
        e1, b1: ``fc_lambda.0`` ``[K, N]``, ``[K]``;  e2, b2: ``fc_lambda.3`` ``[C, K]``, ``[C]``.
        gamma, beta: ``fc_lambda.1`` weight and bias ``[K]``; both None: no BatchNorm
            (``embed_norm=False``).
        running_mean, running_var: ``[K]``, updated in place with ``momentum`` (the
            factor ``nn.BatchNorm1d`` would use this step); None: not tracked.
        eps: the BatchNorm's epsilon.

    Returns:
        ``y = x * (e * v)[:, :, None, None]``, differentiable w.r.t. ``x``, ``lam`` and every
        weight (the module-level docstring gives the formulas).
    """
    if (gamma is None) != (beta is None):
        raise ValueError("gamma and beta must both be tensors (BatchNorm) or both None (none)")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be tensors or both None")
    batch_norm = gamma is not None
    if not batch_norm or running_mean is None:
        _check_tensor(x, "x")
        empty = x.new_empty(0, dtype=torch.float32)
        if not batch_norm:
            gamma = beta = empty
        if running_mean is None:
            running_mean = running_var = empty
    _check_train_args(x, lam, w1, w2, e1, b1, gamma, beta, e2, b2, running_mean, running_var,
                      batch_norm)
    return _MimbTrain.apply(_dense(x), lam, w1, w2, e1, b1, gamma, beta, e2, b2, running_mean,
                            running_var, float(momentum), float(eps), batch_norm)
