"""MIMB's primitives: each one forward and one backward definition, registered once as a
``torch.library`` operator (what eager mode, autograd, ``torch.compile``, export and
dispatch modes all see) -- there is no second, eager-only route.

Primitives (``torch.ops.mipnet.*``; the backends behind them: :mod:`.kernels`):

* **scale** -- ``mimb_scale_fwd(x, w1, w2, v) -> (y, s)`` and its backward
  ``mimb_scale_bwd(dy, x, w1, w2, v, s) -> (dx, dw1, dw2, dv)``; ``s [B, C]`` (the channel
  means) is saved for backward and is a non-differentiable output.  The grouped variant
  ``mimb_scale_grouped_fwd`` / ``_bwd`` is the same definition on lists of branches.
  ``mimb_scale`` / ``mimb_scale_grouped`` are ``[0]`` of them (CompositeImplicitAutograd).
* **embed + scale** -- ``mimb_fwd(x, lam, w1, w2, e1, b1, e2, b2) -> (y, s)``: the
  embedding without BatchNorm (``mimb``, folded) and the block.  Its backward recomputes
  the tiny embedding, runs ``mimb_scale_bwd`` and :func:`.reference.embed_backward`.
  With a BatchNorm on batch statistics (training) the same primitive is
  :class:`TrainStep` (``batch_norm`` on / off, one saved state on every backend); it
  mutates the running statistics, so it is an autograd function, not an operator.
* **instances** -- ``mimb_instances(x, w1, w2, table) -> y [N*B, C, H, W]`` (and grouped;
  ``table`` one row per instance ``[N, C]`` or per output sample ``[N, B, C]``): ``x`` read
  once, ``N`` scaled outputs.  Its backward ``mimb_instances(_grouped)_bwd(dy, x, w1, w2,
  table) -> (dx, dw1, dw2, dtable)`` is the scale backward summed over the instances: a
  fused kernel where the backend has one, else that sum (issue 16); saved: ``x`` and the
  small operands only.

Inference forms: a call that records nothing for backward (grad mode off, or no input
requiring grad) goes to ``mimb_scale_inference`` / ``mimb_inference`` / ``mimb_instances(_grouped)_inference`` -- the same forward
definition, registered without an autograd formula, so the dispatcher falls through the
autograd layer in C++ instead of entering ``register_autograd``'s Python wrapper (~10 us
per call on a loaded 2-core CPU).  The public functions choose.

The operators are defined by :func:`mipnet_kernels.ops._registry.define_op`
(``torch.library.Library`` define + one ``CompositeExplicitAutograd`` implementation +
``register_fake`` + ``register_autograd``), much cheaper per call than
``torch.library.custom_op``, so the public functions call them directly: no eager-only
shortcut, no private ``torch._C`` checks.  A backward runs on the backend forced when its forward ran
(``use_backend`` is per thread; autograd runs CUDA backward on its own threads).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from ..._backends import dispatch, dispatch_named, dispatch_on, get_backend, use_backend
from .._registry import define_op
from .kernels import MIMB_FWD as _MIMB_TABLE  # noqa: F401  (defines the kernel tables)
from .contract import (
    _check_bwd_args,
    _check_instances_args,
    _check_instances_bwd_args,
    _check_instances_grouped_args,
    _check_instances_grouped_bwd_args,
    _check_mimb_args,
    _check_scale_args,
    _check_scale_grouped_args,
    _check_scale_grouped_bwd_args,
    _instances_branch,
    _scale_bwd_branch,
    _scale_fwd_branch,
    compute_dtype,
    dense,
    empty_like_x,
)
from .reference import embed_backward, embed_forward, embedding

_LIB = torch.library.Library("mipnet", "FRAGMENT")  # the CompositeImplicitAutograd ops

def _composite(schema: str, fn) -> None:
    """``mipnet::<schema>`` as a CompositeImplicitAutograd op (autograd sees ``fn``'s ops)."""
    _LIB.define(schema)
    _LIB.impl(schema.split("(", 1)[0], fn, "CompositeImplicitAutograd")


def _refuse_grad(name: str, *tensors: Tensor, message: str | None = None) -> None:
    """An inference form (no autograd formula: its outputs never require grad) refuses
    inputs that would need one, rather than returning a result autograd cannot see."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise RuntimeError(message or (
            f"mipnet::{name} is an inference form (not differentiable): call it under "
            "torch.no_grad() / torch.inference_mode() or with tensors that do not require grad"))


def _forced_backend() -> str:
    """The backend choice in force now, to re-apply in backward (another thread on CUDA)."""
    return get_backend() or "auto"


def _zeros_if_none(grads, like):
    """An output that did not reach the loss has a None gradient: zeros instead."""
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, like)]


# --------------------------------------------------------------------------- scale
# The ops' bodies once their arguments are checked (built once: a call of a forward builds
# no closures, and the inference forms check their arguments once, not twice).
_scale_run = _scale_fwd_branch(lambda x, *a: dispatch("mimb_scale_fwd", x.device, x, *a))
_scale_bwd_run = _scale_bwd_branch(lambda dy, x, *a: dispatch("mimb_scale_bwd", x.device, dy, x, *a))
_instances_run = _instances_branch(lambda x, *a: dispatch("mimb_instances", x.device, x, *a))


def scale_forward(x: Tensor, w1: Tensor, w2: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    _check_scale_args(x, w1, w2, v)
    return _scale_run(x, w1, w2, v)


def scale_backward(dy: Tensor, x: Tensor, w1: Tensor, w2: Tensor, v: Tensor, s: Tensor
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _check_bwd_args(dy, x, w1, w2, v, s)
    return _scale_bwd_run(dy, x, w1, w2, v, s)


def _scale_fake(x, w1, w2, v):
    _check_scale_args(x, w1, w2, v)
    return empty_like_x(x), x.new_empty(x.shape[:2], dtype=compute_dtype(x))


def _scale_bwd_fake(dy, x, w1, w2, v, s):
    _check_bwd_args(dy, x, w1, w2, v, s)
    cf = torch.contiguous_format
    return (empty_like_x(x), torch.empty_like(w1, memory_format=cf),
            torch.empty_like(w2, memory_format=cf), torch.empty_like(v, memory_format=cf))


def _scale_setup(ctx, inputs, output):
    ctx.grouped = isinstance(inputs[0], (list, tuple))
    ctx.n = len(inputs[0]) if ctx.grouped else 1
    flat = [t for arg in inputs for t in (arg if ctx.grouped else [arg])]
    s = output[1] if ctx.grouped else [output[1]]
    ctx.save_for_backward(*flat, *s)
    ctx.mark_non_differentiable(*s)
    ctx.backend = _forced_backend()


def _scale_grad(ctx, dy, _ds):
    """The scale primitive's backward (single or grouped): ``mimb_scale(_grouped)_bwd``."""
    n, saved = ctx.n, ctx.saved_tensors
    xs, w1s, w2s, vs, ss = (list(saved[i * n:(i + 1) * n]) for i in range(5))
    with use_backend(ctx.backend):
        if not ctx.grouped:
            return SCALE_BWD(dy, xs[0], w1s[0], w2s[0], vs[0], ss[0])
        return SCALE_GROUPED_BWD(_zeros_if_none(dy, xs), xs, w1s, w2s, vs, ss)


SCALE_BWD = define_op("mimb_scale_bwd", scale_backward, fake=_scale_bwd_fake)
SCALE_FWD = define_op("mimb_scale_fwd", scale_forward, fake=_scale_fake, backward=_scale_grad,
                      setup_context=_scale_setup)
_composite("mimb_scale(Tensor x, Tensor w1, Tensor w2, Tensor v) -> Tensor",
           lambda x, w1, w2, v: SCALE_FWD(x, w1, w2, v)[0])


def scale_inference(x: Tensor, w1: Tensor, w2: Tensor, v: Tensor) -> Tensor:
    """The scale primitive's forward when nothing is recorded (``y`` only)."""
    _check_scale_args(x, w1, w2, v)
    _refuse_grad("mimb_scale_inference", x, w1, w2, v)
    return _scale_run(x, w1, w2, v)[0]


SCALE_INFERENCE = define_op("mimb_scale_inference", scale_inference,
                            fake=lambda x, w1, w2, v: _scale_fake(x, w1, w2, v)[0])


# grouped variant: the same definition on lists (one launch per group of branches)
def _scale_grouped_forward(xs: list[Tensor], w1s: list[Tensor], w2s: list[Tensor], vs: list[Tensor]
                           ) -> tuple[list[Tensor], list[Tensor]]:
    _check_scale_grouped_args(xs, w1s, w2s, vs)
    ys, ss = dispatch("mimb_scale_grouped_fwd", xs[0].device, [dense(x) for x in xs], w1s, w2s, vs)
    return list(ys), list(ss)


def _scale_grouped_backward(dys: list[Tensor], xs: list[Tensor], w1s: list[Tensor], w2s: list[Tensor],
                            vs: list[Tensor], ss: list[Tensor]
                            ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    _check_scale_grouped_bwd_args(dys, xs, w1s, w2s, vs, ss)
    out = dispatch("mimb_scale_grouped_bwd", xs[0].device, dys, [dense(x) for x in xs], w1s, w2s, vs, ss)
    return tuple(list(o) for o in out)


def _scale_grouped_fake(xs, w1s, w2s, vs):
    _check_scale_grouped_args(xs, w1s, w2s, vs)
    return ([empty_like_x(x) for x in xs],
            [x.new_empty(x.shape[:2], dtype=compute_dtype(x)) for x in xs])


def _scale_grouped_bwd_fake(dys, xs, w1s, w2s, vs, ss):
    _check_scale_grouped_bwd_args(dys, xs, w1s, w2s, vs, ss)
    cf = torch.contiguous_format
    return ([empty_like_x(x) for x in xs], [torch.empty_like(w, memory_format=cf) for w in w1s],
            [torch.empty_like(w, memory_format=cf) for w in w2s],
            [torch.empty_like(v, memory_format=cf) for v in vs])


SCALE_GROUPED_BWD = define_op("mimb_scale_grouped_bwd", _scale_grouped_backward,
                              fake=_scale_grouped_bwd_fake)
SCALE_GROUPED_FWD = define_op("mimb_scale_grouped_fwd", _scale_grouped_forward,
                              fake=_scale_grouped_fake, backward=_scale_grad,
                              setup_context=_scale_setup)
_composite("mimb_scale_grouped(Tensor[] xs, Tensor[] w1s, Tensor[] w2s, Tensor[] vs) -> Tensor[]",
           lambda xs, w1s, w2s, vs: SCALE_GROUPED_FWD(xs, w1s, w2s, vs)[0])


# --------------------------------------------------------------------------- embed + scale
def mimb_forward(x: Tensor, lam: Tensor, w1: Tensor, w2: Tensor, e1: Tensor, b1: Tensor, e2: Tensor,
                 b2: Tensor) -> tuple[Tensor, Tensor]:
    """``mimb``'s forward: the fused kernel (``mimb_fwd`` entry) when nothing is recorded for
    backward, else the torch embedding and the scale primitive -- so a recorded forward uses
    the ``v`` its backward recomputes (bit-identical to ``mimb_scale(x, w1, w2,
    mimb_embedding_reference(...))``; a fused embedding may differ by ~1 ulp)."""
    _check_mimb_args(x, lam, w1, w2, e1, b1, e2, b2)
    args = (dense(x), lam, w1, w2, e1, b1, e2, b2)
    return _mimb_run(args, not any(t.requires_grad for t in args))


def _mimb_run(args, fused: bool):
    x, lam, w1, w2, e1, b1, e2, b2 = args
    if fused and x.numel() > 0:
        return dispatch("mimb_fwd", x.device, *args)
    return scale_forward(x, w1, w2, embedding(lam, e1, b1, e2, b2, compute_dtype(x))[0])


def _mimb_fake(x, lam, w1, w2, e1, b1, e2, b2):
    _check_mimb_args(x, lam, w1, w2, e1, b1, e2, b2)
    return empty_like_x(x), x.new_empty(x.shape[:2], dtype=compute_dtype(x))


def _mimb_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.backend = _forced_backend()


def _mimb_grad(ctx, dy, _ds):
    x, lam, w1, w2, e1, b1, e2, b2, s = ctx.saved_tensors
    v, z = embedding(lam, e1, b1, e2, b2, compute_dtype(x))  # recomputed: O(B*N*K + B*K*C)
    with use_backend(ctx.backend):
        dx, dw1, dw2, dv = SCALE_BWD(dy, x, w1, w2, v, s)
    dlam = de1 = db1 = de2 = db2 = None
    if any(ctx.needs_input_grad[i] for i in (1, 4, 5, 6, 7)):
        dlam, de1, db1, _, _, de2, db2 = embed_backward(dv, lam, e1, None, None, e2, v, z, None, False)
    return dx, dlam, dw1, dw2, de1, db1, de2, db2


MIMB_FWD = define_op("mimb_fwd", mimb_forward, fake=_mimb_fake, backward=_mimb_grad,
                     setup_context=_mimb_setup)
_composite("mimb(Tensor x, Tensor lam, Tensor w1, Tensor w2, Tensor e1, Tensor b1, Tensor e2, "
           "Tensor b2) -> Tensor", lambda *a: MIMB_FWD(*a)[0])


def mimb_inference(x: Tensor, lam: Tensor, w1: Tensor, w2: Tensor, e1: Tensor, b1: Tensor,
                   e2: Tensor, b2: Tensor) -> Tensor:
    """The embed + scale primitive's forward when nothing is recorded (``y`` only): the
    fused kernel where the backend has one."""
    _check_mimb_args(x, lam, w1, w2, e1, b1, e2, b2)
    _refuse_grad("mimb_inference", x, lam, w1, w2, e1, b1, e2, b2)
    return _mimb_run((dense(x), lam, w1, w2, e1, b1, e2, b2), True)[0]


MIMB_INFERENCE = define_op("mimb_inference", mimb_inference, fake=lambda *a: _mimb_fake(*a)[0])


# --------------------------------------------------------------------------- training step
_NULL = contextlib.nullcontext()


def _no_autocast(device_type: str):
    """Autocast off inside the step (its arithmetic is float32 whatever the autocast dtype,
    like the operators above, which autocast does not see)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return _NULL


class TrainStep(torch.autograd.Function):
    """The embed + scale primitive with the embedding's BatchNorm on batch statistics
    (``batch_norm=True``) or without: forward ``mimb_train_fwd -> (y, state)``, backward
    ``mimb_train_bwd`` on the forward's backend; ``state`` has one layout on every backend
    (:mod:`.reference`).  Arguments as ``torch.ops.mipnet_cpu.mimb_train_fwd``
    (csrc/schemas.h); validated by the caller."""

    @staticmethod
    def forward(ctx, x, lam, w1, w2, e1, b1, gamma, beta, e2, b2, running_mean, running_var,
                momentum, eps, batch_norm):
        # ctx-style (no setup_context): Function.apply then skips an inspect.signature bind
        # per call, ~25 % of this step's overhead on small maps.
        with _no_autocast(x.device.type):
            ctx.backend, (y, state) = dispatch_named(
                "mimb_train_fwd", x.device, x, lam, w1, w2, e1, b1, gamma, beta, e2, b2,
                running_mean, running_var, momentum, eps, batch_norm)
        ctx.save_for_backward(x, lam, w1, w2, e1, gamma, beta, e2, state)
        ctx.batch_norm = batch_norm
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, lam, w1, w2, e1, gamma, beta, e2, state = ctx.saved_tensors
        bn = ctx.batch_norm
        with _no_autocast(x.device.type):
            dx, dlam, dw1, dw2, de1, db1, dgamma, dbeta, de2, db2 = dispatch_on(
                ctx.backend, "mimb_train_bwd", x.device, dy, x, lam, w1, w2, e1, gamma, beta,
                e2, state, bn)
        return (dx, dlam, dw1, dw2, de1, db1, dgamma if bn else None, dbeta if bn else None,
                de2, db2, None, None, None, None, None)


class TrainEmbedding(torch.autograd.Function):
    """The training step's embedding alone: ``v [R, C]`` of the selectors ``lam [R, N]``,
    the BatchNorm (``batch_norm=True``) on the ``R`` rows' batch statistics, its path in
    float64 (:func:`.reference.embed_forward` / :func:`.reference.embed_backward`, the
    embedding every backend's training step runs) -- the per-sample table of
    ``mimb_instances`` in training (``MIMB.instances``).  ``v`` in ``ct``; the running
    statistics updated in place unless empty.  Arguments validated by the caller."""

    @staticmethod
    def forward(ctx, lam, e1, b1, gamma, beta, e2, b2, running_mean, running_var, momentum, eps,
                batch_norm, ct):
        with _no_autocast(lam.device.type):
            v, zn, invstd = embed_forward(lam, e1, b1, gamma, beta, e2, b2, running_mean,
                                          running_var, momentum, eps, batch_norm, ct)
        ctx.save_for_backward(lam, e1, gamma, beta, e2, v, zn, invstd)
        ctx.batch_norm = batch_norm
        return v

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dv):
        lam, e1, gamma, beta, e2, v, zn, invstd = ctx.saved_tensors
        bn = ctx.batch_norm
        with _no_autocast(lam.device.type):
            dlam, de1, db1, dgamma, dbeta, de2, db2 = embed_backward(
                dv, lam, e1, gamma, beta, e2, v, zn, invstd, bn)
        return (dlam, de1, db1, dgamma if bn else None, dbeta if bn else None, de2, db2,
                None, None, None, None, None, None)


# --------------------------------------------------------------------------- instances
# y[n*B + b] = x[b] * e(x)[b] * t[n, b].  The backward is its own primitive,
# mimb_instances(_grouped)_bwd (contract: csrc/schemas.h): a fused kernel where the backend
# has one (reads x and each dy_n once per pass, nothing full-size saved), else the sum over
# the instances of the backend's scale backward (reference.mimb_instances_bwd_composite).
# Saved: x, w1, w2, table only (s = mean_hw(x) is recomputed by the backward).
def instances_forward(x: Tensor, w1: Tensor, w2: Tensor, table: Tensor) -> Tensor:
    _check_instances_args(x, w1, w2, table)
    return _instances_run(x, w1, w2, table)


def _instances_fake(x, w1, w2, table):
    _check_instances_args(x, w1, w2, table)
    return empty_like_x(x, x.shape[0] * table.shape[0])


def _instances_grouped_forward(xs: list[Tensor], w1s: list[Tensor], w2s: list[Tensor],
                               tables: list[Tensor]) -> list[Tensor]:
    _check_instances_grouped_args(xs, w1s, w2s, tables)
    return _instances_grouped_run(xs, w1s, w2s, tables)


def _instances_grouped_run(xs, w1s, w2s, tables) -> list[Tensor]:
    return list(dispatch("mimb_instances_grouped", xs[0].device, [dense(x) for x in xs], w1s, w2s, tables))


def _instances_grouped_fake(xs, w1s, w2s, tables):
    _check_instances_grouped_args(xs, w1s, w2s, tables)
    return [empty_like_x(x, x.shape[0] * t.shape[0]) for x, t in zip(xs, tables)]


def _instances_grads_zero(x, w1, w2, table):
    cf = torch.contiguous_format
    return (empty_like_x(x).zero_(), torch.zeros_like(w1, memory_format=cf),
            torch.zeros_like(w2, memory_format=cf), torch.zeros_like(table, memory_format=cf))


def _instances_bwd_empty(x, table) -> bool:
    return x.numel() == 0 or table.shape[0] == 0


def instances_backward(dy: Tensor, x: Tensor, w1: Tensor, w2: Tensor, table: Tensor
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _check_instances_bwd_args(dy, x, w1, w2, table)
    if _instances_bwd_empty(x, table):
        return _instances_grads_zero(x, w1, w2, table)
    return tuple(dispatch("mimb_instances_bwd", x.device, dy, dense(x), w1, w2, table))


def _instances_bwd_fake(dy, x, w1, w2, table):
    _check_instances_bwd_args(dy, x, w1, w2, table)
    cf = torch.contiguous_format
    return (empty_like_x(x), torch.empty_like(w1, memory_format=cf),
            torch.empty_like(w2, memory_format=cf), torch.empty_like(table, memory_format=cf))


def _instances_grouped_backward(dys: list[Tensor], xs: list[Tensor], w1s: list[Tensor],
                                w2s: list[Tensor], tables: list[Tensor]
                                ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    _check_instances_grouped_bwd_args(dys, xs, w1s, w2s, tables)
    out = [list(_instances_grads_zero(*a)) for a in zip(xs, w1s, w2s, tables)]
    live = [i for i in range(len(xs)) if not _instances_bwd_empty(xs[i], tables[i])]
    if live:
        got = dispatch("mimb_instances_grouped_bwd", xs[0].device,
                       *([lst[i] for i in live] for lst in (dys, [dense(x) for x in xs], w1s, w2s, tables)))
        for k, i in enumerate(live):
            out[i] = [g[k] for g in got]
    return tuple([o[j] for o in out] for j in range(4))


def _instances_grouped_bwd_fake(dys, xs, w1s, w2s, tables):
    _check_instances_grouped_bwd_args(dys, xs, w1s, w2s, tables)
    outs = [_instances_bwd_fake(*a) for a in zip(dys, xs, w1s, w2s, tables)]
    return tuple([o[j] for o in outs] for j in range(4))


INSTANCES_BWD = define_op("mimb_instances_bwd", instances_backward, fake=_instances_bwd_fake)
INSTANCES_GROUPED_BWD = define_op("mimb_instances_grouped_bwd", _instances_grouped_backward,
                                  fake=_instances_grouped_bwd_fake)


def _instances_setup(ctx, inputs, output):
    ctx.grouped = isinstance(inputs[0], (list, tuple))
    ctx.n = len(inputs[0]) if ctx.grouped else 1
    ctx.save_for_backward(*(t for arg in inputs for t in (arg if ctx.grouped else [arg])))
    ctx.backend = _forced_backend()


def _instances_grad(ctx, dy):
    """The instances primitive's backward (single or grouped): ``mimb_instances(_grouped)_bwd``
    on the backend forced when the forward ran (an output that did not reach the loss: a
    zero ``dy``)."""
    n, saved = ctx.n, ctx.saved_tensors
    xs, w1s, w2s, tables = (list(saved[i * n:(i + 1) * n]) for i in range(4))
    with use_backend(ctx.backend):
        if not ctx.grouped:
            return INSTANCES_BWD(dy, xs[0], w1s[0], w2s[0], tables[0])
        ys = [empty_like_x(x, x.shape[0] * t.shape[0]) for x, t in zip(xs, tables)]
        return INSTANCES_GROUPED_BWD(_zeros_if_none(dy, ys), xs, w1s, w2s, tables)


INSTANCES = define_op("mimb_instances", instances_forward, fake=_instances_fake,
                      backward=_instances_grad, setup_context=_instances_setup)
INSTANCES_GROUPED = define_op("mimb_instances_grouped", _instances_grouped_forward,
                              fake=_instances_grouped_fake, backward=_instances_grad,
                              setup_context=_instances_setup)


# inference forms: the same forward definitions without an autograd formula (see above)
def _instances_inference(x: Tensor, w1: Tensor, w2: Tensor, table: Tensor) -> Tensor:
    _check_instances_args(x, w1, w2, table)
    _refuse_grad("mimb_instances_inference", x, w1, w2, table)
    return _instances_run(x, w1, w2, table)


def _instances_grouped_inference(xs: list[Tensor], w1s: list[Tensor], w2s: list[Tensor],
                                 tables: list[Tensor]) -> list[Tensor]:
    _check_instances_grouped_args(xs, w1s, w2s, tables)
    _refuse_grad("mimb_instances_grouped_inference", *xs, *w1s, *w2s, *tables)
    return _instances_grouped_run(xs, w1s, w2s, tables)


INSTANCES_INFERENCE = define_op("mimb_instances_inference", _instances_inference,
                                fake=_instances_fake)
INSTANCES_GROUPED_INFERENCE = define_op("mimb_instances_grouped_inference",
                                        _instances_grouped_inference, fake=_instances_grouped_fake)
