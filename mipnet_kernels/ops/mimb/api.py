"""MIMB's public functions: the contract of each op is its docstring here (and
``csrc/schemas.h`` for the kernels).

Dtypes and layouts (every op, every backend):

* ``x``: float32 / float16 / bfloat16 (the compiled kernels), float64 (reference and triton
  backends: it exists for ``gradcheck``).  Any strides; the op hands the backends ``x``
  contiguous (NCHW) or channels_last (NHWC), copying other layouts to NCHW first.
* The small operands (``w1, w2, v, lam, e1, b1, e2, b2, table``): any of those float dtypes,
  independent of ``x``'s (autocast / ``.half()`` models).
* Arithmetic is float32 (float64 for float64 ``x``) after loading; each output is rounded
  once to its dtype.  ``y`` (and ``dx``) have ``x``'s dtype and memory format: contiguous
  when ``x.is_contiguous()``, else channels_last when ``x`` is channels_last, else contiguous.
  Weight gradients come back contiguous in the weights' dtypes.
* Empty batches / zero channels give empty outputs; ``H*W == 0`` with ``B*C > 0`` is an
  error (the mean over H*W is undefined).
* Non-finite values follow IEEE arithmetic in float32 as the reference computes it, on
  every backend: a NaN in a sample of ``x``, or a squeeze that overflows float32 (``x`` of
  +-3e38), makes that sample's ``y`` (and ``dx``) NaN everywhere; a NaN weight makes every
  sample NaN; ``relu`` and ``sigmoid`` keep NaN, ``sigmoid(-inf) = 0`` and
  ``sigmoid(+inf) = 1``.  Never a finite value computed from a NaN.
* Saved for backward: only ``x``, the small operands and per-(sample, channel) vectors --
  never a full-size intermediate.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .autograd import (
    INSTANCES,
    INSTANCES_GROUPED,
    INSTANCES_GROUPED_INFERENCE,
    INSTANCES_INFERENCE,
    MIMB_FWD,
    MIMB_INFERENCE,
    SCALE_FWD,
    SCALE_GROUPED_FWD,
    SCALE_INFERENCE,
    TrainStep,
)
from .contract import (
    _check_instances_grouped_args,
    _check_scale_grouped_args,
    _check_tensor,
    _check_train_args,
    dense,
)


def _records(*tensors) -> bool:
    """Whether autograd records this call (else the op's inference form runs); a non-tensor
    argument goes to the differentiable op, whose checks name it."""
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if not isinstance(t, Tensor) or t.requires_grad:
            return True
    return False


def mimb_scale(x: Tensor, w1: Tensor, w2: Tensor, v: Tensor) -> Tensor:
    """Squeeze, excite and scale by a given instance embedding, in one fused op.

    Args:
        x: ``[B, C, H, W]`` float32/float16/bfloat16 (float64 on the reference backend),
            contiguous or channels_last (other strides are copied to contiguous first).
        w1: ``[C/r, C]`` the squeeze Linear's weight (official ``fc.0.weight``).
        w2: ``[C, C/r]`` the excite Linear's weight (official ``fc.2.weight``).
        v: ``[B, C]`` the instance embedding (official ``fc_lambda(lambda_vec)``).

    Returns:
        ``y = x * (sigmoid(relu(mean_hw(x) @ w1.T) @ w2.T) * v)[:, :, None, None]`` in ``x``'s
        dtype and memory format (float32 arithmetic).  Differentiable w.r.t. all inputs.
    """
    if _records(x, w1, w2, v):
        return SCALE_FWD(x, w1, w2, v)[0]
    return SCALE_INFERENCE(x, w1, w2, v)


def mimb(x: Tensor, lam: Tensor, w1: Tensor, w2: Tensor, e1: Tensor, b1: Tensor, e2: Tensor,
         b2: Tensor) -> Tensor:
    """The whole Multi-Instance Modulation Block in one fused op.

    Args:
        x: ``[B, C, H, W]`` (as in :func:`mimb_scale`).
        lam: ``[B, N]`` float instance selector, one-hot (instance ``n``) or soft.
        w1, w2: the squeeze-excite weights ``[C/r, C]``, ``[C, C/r]``.
        e1, b1, e2, b2: the instance-embedding MLP ``[K, N]``, ``[K]``, ``[C, K]``, ``[C]``
            (``K = C/r`` in MIPNet); a BatchNorm in between must be folded into ``e1, b1``
            (:meth:`mipnet_kernels.nn.MIMB.folded_embedding`).

    Returns:
        ``mimb_scale(x, w1, w2, sigmoid(relu(lam @ e1.T + b1) @ e2.T + b2))``.  Differentiable
        w.r.t. ``x``, ``lam`` and every weight.
    """
    if _records(x, lam, w1, w2, e1, b1, e2, b2):
        return MIMB_FWD(x, lam, w1, w2, e1, b1, e2, b2)[0]
    return MIMB_INFERENCE(x, lam, w1, w2, e1, b1, e2, b2)


def mimb_instances(x: Tensor, w1: Tensor, w2: Tensor, table: Tensor) -> Tensor:
    """All N instances of the block from one read of ``x``.

    Args:
        x: ``[B, C, H, W]`` (as in :func:`mimb_scale`).
        w1, w2: the squeeze-excite weights ``[C/r, C]``, ``[C, C/r]``.
        table: the instance embedding, ``[N, C]`` (one row per instance: ``v`` of each
            one-hot selector, inference) or ``[N, B, C]`` (one row per output sample:
            training, where the λ-embedding's BatchNorm runs on the batch statistics of all
            ``N*B`` selectors, so ``v`` differs per sample).  Write ``t[n, b]`` for
            ``table[n]`` or ``table[n, b]``.

    Returns:
        ``y [N*B, C, H, W]``, instance-major: ``y[n*B + b] = x[b] * (e[b] * t[n, b])``, in
        ``x``'s dtype and memory format.  Differentiable w.r.t. ``x``, ``w1``, ``w2`` and
        ``table``: the backward (``mimb_instances_bwd``, csrc/schemas.h) is the sum over the
        instances of :func:`mimb_scale`'s backward, fused on the cpu backend (``x`` and
        each instance's ``dy`` read once per pass); nothing full-size is saved.
    """
    if _records(x, w1, w2, table):
        return INSTANCES(x, w1, w2, table)
    return INSTANCES_INFERENCE(x, w1, w2, table)


def mimb_scale_grouped(xs: Sequence[Tensor], w1s: Sequence[Tensor], w2s: Sequence[Tensor],
                       vs: Sequence[Tensor]) -> list[Tensor]:
    """:func:`mimb_scale` on a list of branch tensors (HRNet: different C, H, W) in one op.

    Each branch ``i`` is ``mimb_scale(xs[i], w1s[i], w2s[i], vs[i])``; all tensors on one
    device.  Differentiable like :func:`mimb_scale`.
    """
    _check_scale_grouped_args(xs, w1s, w2s, vs)
    return list(SCALE_GROUPED_FWD(list(xs), list(w1s), list(w2s), list(vs))[0])


def mimb_instances_grouped(xs: Sequence[Tensor], w1s: Sequence[Tensor], w2s: Sequence[Tensor],
                           tables: Sequence[Tensor]) -> list[Tensor]:
    """:func:`mimb_instances` on a list of branch tensors in one op; differentiable like it."""
    _check_instances_grouped_args(xs, w1s, w2s, tables)
    args = (list(xs), list(w1s), list(w2s), list(tables))
    if _records(*args[0], *args[1], *args[2], *args[3]):
        return list(INSTANCES_GROUPED(*args))
    return list(INSTANCES_GROUPED_INFERENCE(*args))


def mimb_train(x: Tensor, lam: Tensor, w1: Tensor, w2: Tensor, e1: Tensor, b1: Tensor,
               gamma: Tensor | None, beta: Tensor | None, e2: Tensor, b2: Tensor,
               running_mean: Tensor | None = None, running_var: Tensor | None = None,
               momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """The official MIMB in training mode, embedding BatchNorm included, as one fused step.

    ``z = lam @ e1.T + b1``; ``zn = (z - mean) * invstd`` with the batch mean and biased
    variance (``invstd = 1 / sqrt(var + eps)``); ``v = sigmoid(relu(gamma * zn + beta) @ e2.T
    + b2)``; then the block as :func:`mimb_scale`.  ``running_mean`` / ``running_var`` are
    updated in place as ``nn.BatchNorm1d`` does (``(1 - momentum) * running + momentum *
    batch``, the variance unbiased).  Without the BatchNorm (``gamma = beta = None``, the
    layer's ``embed_norm=False``) ``zn = z``: the embedding of :func:`mimb`.

    Args:
        x: ``[B, C, H, W]`` (as :func:`mimb_scale`), ``B >= 2`` with the BatchNorm.
        lam: ``[B, N]`` float instance selector.
        w1, w2: squeeze-excite weights ``[C/r, C]``, ``[C, C/r]`` (``fc.0`` / ``fc.2``).
        e1, b1: ``fc_lambda.0`` ``[K, N]``, ``[K]``;  e2, b2: ``fc_lambda.3`` ``[C, K]``, ``[C]``.
        gamma, beta: ``fc_lambda.1`` weight and bias ``[K]``; both None: no BatchNorm.
        running_mean, running_var: ``[K]``, updated in place with ``momentum`` (the
            factor ``nn.BatchNorm1d`` would use this step); None: not tracked.
        eps: the BatchNorm's epsilon.

    Returns:
        ``y``, differentiable w.r.t. ``x``, ``lam`` and every weight (not twice).  Under
        autocast the step runs with autocast off (float32 arithmetic, ``y`` in ``x``'s
        dtype).  The BatchNorm path (``z``, its statistics and their backward) runs in
        float64, as the cpu kernel does (ill-conditioned for close selectors).  Eager
        autograd only (an autograd function: it mutates the running statistics).
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
    return TrainStep.apply(dense(x), lam, w1, w2, e1, b1, gamma, beta, e2, b2, running_mean,
                             running_var, float(momentum), float(eps), batch_norm)
