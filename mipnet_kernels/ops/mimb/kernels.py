"""MIMB's kernel table: which function runs each dispatch entry on each backend, and why a
backend declines an input.

Dispatch entries (:mod:`mipnet_kernels._backends`), each implemented on every backend:

==========================  =========================================================
``mimb_scale_fwd``          ``(x, w1, w2, v) -> (y, s)``: the block, ``v`` given
``mimb_scale_bwd``          ``(dy, x, w1, w2, v, s) -> (dx, dw1, dw2, dv)``
``mimb_instances``          ``(x, w1, w2, table) -> y [N*B, C, H, W]``
``mimb_instances_bwd``      ``(dy, x, w1, w2, table) -> (dx, dw1, dw2, dtable)``: fused
                            where a backend has the kernel, else its grouped scale
                            backward summed over the instances (``reference``)
``mimb_scale_grouped_fwd``  the four above on lists of branch tensors
``mimb_scale_grouped_bwd``
``mimb_instances_grouped``
``mimb_instances_grouped_bwd``
``mimb_fwd``                ``(x, lam, w1, w2, e1, b1, e2, b2) -> (y, s)``: ``mimb``'s
                            forward when nothing is recorded for backward
``mimb_train_fwd``          the training step, embedding (BatchNorm on / off) + block:
``mimb_train_bwd``          ``-> (y, state)`` and back (state: :mod:`.reference`)
==========================  =========================================================

Each entry is one kernel table (:func:`mipnet_kernels._backends.define_kernels`): a
backend's column names its compiled kernel / Triton launcher (``symbol``) where it has
one; every entry a backend does not fuse is derived from its block kernels
(``mimb_scale_fwd`` / ``_bwd`` / ``mimb_instances``) and the torch embedding (the
composites of :mod:`.reference`, :func:`_derived`), the grouped forms loop over the single
kernel where a backend has no one-launch kernel.  Reasons come from the backend
declarations (availability, device, "not built", dtypes); by hand only: the cuda kernels'
``sample_elems`` limit, the cpu training kernel's float32 running statistics, and -- for a
derived entry -- the reasons of the block kernel it runs.  Adding a backend: its column in
each table (``symbol=``), or nothing for the entries derived from its block kernels.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..._backends import BACKEND, Kernel, define_kernels, kernel, table
from .contract import (
    SUPPORTED_DTYPES,
    _instances_branch,
    _scale_bwd_branch,
    _scale_fwd_branch,
    compute_dtype,
)
from .reference import (
    _loop,
    mimb_fwd_composite,
    mimb_instances_bwd_composite,
    mimb_instances_reference,
    mimb_scale_bwd_reference,
    mimb_scale_fwd_reference,
    state_numel,
    train_bwd_composite,
    train_fwd_composite,
)

_COMPILED = ("cpu", "cuda")
_SAMPLE_ELEMS = BACKEND["cuda"].limits["sample_elems"]


def _cuda_x_reasons(x: Tensor) -> list[str]:
    """The cuda kernels index one sample with int32 offsets."""
    n = x.shape[1] * x.shape[2] * x.shape[3]
    if n > _SAMPLE_ELEMS:
        return [f"x has C*H*W = {n} elements per sample; the cuda kernels take at most "
                f"2^{_SAMPLE_ELEMS.bit_length() - 1}"]
    return []


def _cuda_reasons(x_at: int, grouped: bool = False) -> Callable:
    """The cuda kernels' reasons (:func:`_cuda_x_reasons`) on the kernel argument at
    ``x_at`` (``x``: 0, or 1 after ``dy``), per branch of list arguments when ``grouped``."""
    def single(*args) -> list[str]:
        return _cuda_x_reasons(args[x_at])

    return _per_branch(single) if grouped else single


def _per_branch(single):
    """``single``'s reasons for each branch of list arguments, prefixed by the branch."""
    def reasons(*lists) -> list[str]:
        out: list[str] = []
        for i, args in enumerate(zip(*lists)):
            out += [f"branch {i}: {r}" for r in single(*args)]
        return out

    return reasons


def _block_reasons(entry: str, backend: str, pick: Callable) -> Callable:
    """The reasons of ``backend``'s ``entry`` kernel (a block kernel) on the arguments
    ``pick(*args)`` gives -- for an entry derived from that kernel."""
    def reasons(*args) -> list[str]:
        block_args = pick(*args)
        return table(entry).reasons(backend, block_args[1 if entry == "mimb_scale_bwd" else 0].device,
                                    *block_args)

    return reasons


def _block(entry: str, backend: str) -> Callable:
    """``backend``'s block kernel ``entry``, looked up when called."""
    return lambda *args: kernel(entry, backend)(*args)


_V_LIKE: dict = {}


def _v_like(x: Tensor) -> Tensor:
    """A stand-in for the embedding ``v`` (computed in float32, float64 for float64 x) in
    the reasons of a block kernel: an empty tensor of its dtype, one per (dtype, device)."""
    key = (x.dtype == torch.float64, x.device)
    t = _V_LIKE.get(key)
    if t is None:
        t = _V_LIKE[key] = x.new_empty(0, dtype=compute_dtype(x))
    return t


# --------------------------------------------------------------------------- block kernels
_SCALE_FWD_ARGS = ("x", "w1", "w2", "v")
_SCALE_BWD_ARGS = ("dy", "x", "w1", "w2", "v", "s")
_INSTANCES_ARGS = ("x", "w1", "w2", "table")


def _symbols(name: str, cuda_reasons) -> dict:
    return dict(cpu=Kernel(symbol=name), cuda=Kernel(symbol=name, reasons=cuda_reasons),
                triton=Kernel(symbol=f"{name}_triton"))


# Example inputs for `python -m mipnet_kernels.info`: HRNet-W32 stage-4 branch 0 at 256x192.
def _example_scale(device):
    x = torch.randn(2, 32, 64, 48, device=device)
    return (x, torch.randn(8, 32, device=device), torch.randn(32, 8, device=device),
            torch.rand(2, 32, device=device))


def _example_scale_bwd(device):
    x, w1, w2, v = _example_scale(device)
    return (torch.randn_like(x), x, w1, w2, v, x.mean((2, 3)))


SCALE_FWD = define_kernels(
    "mimb_scale_fwd", _SCALE_FWD_ARGS, tensor_args=_SCALE_FWD_ARGS, example_inputs=_example_scale,
    reference=mimb_scale_fwd_reference,
    **_symbols("mimb_scale_fwd", _cuda_reasons(0)))
SCALE_BWD = define_kernels(
    "mimb_scale_bwd", _SCALE_BWD_ARGS, tensor_args=_SCALE_BWD_ARGS, example_inputs=_example_scale_bwd,
    reference=mimb_scale_bwd_reference,
    **_symbols("mimb_scale_bwd", _cuda_reasons(1)))
INSTANCES = define_kernels(
    "mimb_instances", _INSTANCES_ARGS, tensor_args=_INSTANCES_ARGS, example_inputs=_example_scale,
    reference=mimb_instances_reference,
    **_symbols("mimb_instances", _cuda_reasons(0)))


# --------------------------------------------------------------------------- grouped forms
def _listed(out):
    """The cuda grouped kernels return tuples of lists as tuples of tuples."""
    return tuple(list(o) for o in out) if isinstance(out, tuple) else list(out)


def _grouped_loop(entry: str, backend: str) -> Callable:
    """A grouped entry as a loop over ``backend``'s single kernel (empty branches answered
    by the op layer's rules)."""
    single = _block(entry, backend)
    if entry == "mimb_scale_fwd":
        one = _scale_fwd_branch(single)
        return lambda xs, w1s, w2s, vs: tuple(_loop(one, xs, w1s, w2s, vs))
    if entry == "mimb_scale_bwd":
        one = _scale_bwd_branch(single)
        return lambda *lists: tuple(_loop(one, *lists))
    one = _instances_branch(single)
    return lambda xs, w1s, w2s, tables: [one(*a) for a in zip(xs, w1s, w2s, tables)]


def _grouped_table(name: str, single: str, args: tuple, example) -> None:
    x_at = 1 if single == "mimb_scale_bwd" else 0
    # the cpu loop: the single kernel's reasons per branch ("not built" included)
    cpu_reasons = _per_branch(lambda *a: table(single).reasons("cpu", a[x_at].device, *a))
    define_kernels(
        name, args, tensor_args=args, example_inputs=example,
        reference=_grouped_loop(single, "reference"),
        cpu=Kernel(fn=_grouped_loop(single, "cpu"), reasons=cpu_reasons),
        cuda=Kernel(symbol=name, finish=_listed,
                    reasons=_cuda_reasons(x_at, grouped=True)),
        triton=Kernel(symbol=f"{name}_triton"),
    )


_grouped_table("mimb_scale_grouped_fwd", "mimb_scale_fwd", ("xs", "w1s", "w2s", "vs"),
               lambda d: tuple([t] for t in _example_scale(d)))
_grouped_table("mimb_scale_grouped_bwd", "mimb_scale_bwd", ("dys", "xs", "w1s", "w2s", "vs", "ss"),
               lambda d: tuple([t] for t in _example_scale_bwd(d)))
_grouped_table("mimb_instances_grouped", "mimb_instances", ("xs", "w1s", "w2s", "tables"),
               lambda d: tuple([t] for t in _example_scale(d)))


# --------------------------------------------------------------------------- instances backward
# A fused kernel where a backend has one -- cpu (mimb_instances_bwd_cpu), triton and cuda
# (one-launch grouped forms) read x and each dy_n once for the reductions and each dy_n once
# more for dx; elsewhere (reference) the backend's grouped scale backward on every (branch,
# instance) pair, summed (reference.mimb_instances_bwd_composite: the work of N scale
# backwards).  The grouped entry: the one-launch kernel, a loop over the fused single
# kernel, or the composite over all branches at once.
_INSTANCES_BWD_ARGS = ("dy", "x", "w1", "w2", "table")
_INSTANCES_GROUPED_BWD_ARGS = ("dys", "xs", "w1s", "w2s", "tables")


def _example_instances_bwd(device):
    x, w1, w2, v = _example_scale(device)
    table = v[:1].expand(2, -1).contiguous()
    return (torch.randn(2 * x.shape[0], *x.shape[1:], device=device), x, w1, w2, table)


def _scale_bwd_pick(dy, x, w1, w2, table):
    """The scale backward's arguments standing for the instances backward's (its reasons)."""
    return (x, x, w1, w2, _v_like(x), _v_like(x))


def _instances_bwd_composite(backend: str) -> Callable:
    """``backend``'s grouped scale backward summed over the instances (lists of branches)."""
    return mimb_instances_bwd_composite(lambda *lists: kernel("mimb_scale_grouped_bwd", backend)(*lists))


def _instances_bwd_column(backend: str, fused: str | None) -> Kernel:
    if fused is not None:
        return Kernel(symbol=fused, reasons=_cuda_reasons(1) if backend == "cuda" else None)
    grouped = _instances_bwd_composite(backend)
    return Kernel(fn=lambda *args: tuple(o[0] for o in grouped(*([a] for a in args))),
                  reasons=_block_reasons("mimb_scale_bwd", backend, _scale_bwd_pick))


def _instances_grouped_bwd_column(backend: str, fused: str | None, grouped: str | None) -> Kernel:
    if grouped is not None:  # a one-launch grouped kernel
        return Kernel(symbol=grouped, finish=_listed,
                      reasons=_cuda_reasons(1, grouped=True) if backend == "cuda" else None)
    if fused is None:  # one grouped scale backward over every (branch, instance)
        return Kernel(fn=_instances_bwd_composite(backend), reasons=_per_branch(
            _block_reasons("mimb_scale_bwd", backend, _scale_bwd_pick)))
    single = _block("mimb_instances_bwd", backend)
    return Kernel(fn=lambda *lists: tuple(_loop(single, *lists)),
                  reasons=_per_branch(lambda *a: table("mimb_instances_bwd").reasons(backend, a[1].device, *a)))


#: each backend's fused instances backward: (single kernel, one-launch grouped kernel); None:
#: the composite (single), or the loop over the single kernel / the composite (grouped)
_FUSED_INSTANCES_BWD = {
    "cpu": ("mimb_instances_bwd", None),
    "cuda": ("mimb_instances_bwd", "mimb_instances_grouped_bwd"),
    "triton": ("mimb_instances_bwd_triton", "mimb_instances_grouped_bwd_triton"),
    "reference": (None, None),
}
INSTANCES_BWD = define_kernels(
    "mimb_instances_bwd", _INSTANCES_BWD_ARGS, tensor_args=_INSTANCES_BWD_ARGS,
    example_inputs=_example_instances_bwd,
    **{b: _instances_bwd_column(b, f) for b, (f, _) in _FUSED_INSTANCES_BWD.items()})
INSTANCES_GROUPED_BWD = define_kernels(
    "mimb_instances_grouped_bwd", _INSTANCES_GROUPED_BWD_ARGS, tensor_args=_INSTANCES_GROUPED_BWD_ARGS,
    example_inputs=lambda d: tuple([t] for t in _example_instances_bwd(d)),
    **{b: _instances_grouped_bwd_column(b, f, g) for b, (f, g) in _FUSED_INSTANCES_BWD.items()})


# --------------------------------------------------------------------------- embed + scale
_MIMB_ARGS = ("x", "lam", "w1", "w2", "e1", "b1", "e2", "b2")


def _example_mimb(device):
    x, w1, w2, _ = _example_scale(device)
    lam = torch.eye(2, device=device)
    return (x, lam, w1, w2, torch.randn(8, 2, device=device), torch.randn(8, device=device),
            torch.randn(32, 8, device=device), torch.randn(32, device=device))


def _mimb_fwd(backend: str) -> Callable:
    """``mimb_fwd`` on ``backend``: its fused kernel (embedding inside, ``FUSED_MIMB``)
    when it has one that takes these inputs, else the torch embedding and its block kernel
    (a fused kernel that declines, e.g., a float64 ``lam`` leaves the block there)."""
    composite = mimb_fwd_composite(_block("mimb_scale_fwd", backend))
    if backend not in _COMPILED:
        return composite
    dtypes = BACKEND[backend].dtypes

    def run(*args):
        if backend not in FUSED_MIMB:
            FUSED_MIMB[backend] = BACKEND[backend].resolve("mimb_fwd")[0]
        fused = FUSED_MIMB[backend]
        if fused is None or any(t.dtype not in dtypes for t in args):
            return composite(*args)
        return fused(*args)

    return run


#: the fused ``mimb_fwd`` kernels, resolved on first use (None: the loaded extension lacks it)
FUSED_MIMB: dict[str, Callable | None] = {}


def _mimb_column(backend: str) -> Kernel:
    """The block kernel's reasons: x, w1, w2 in the backend's dtypes (the derived check; ``v``
    is computed in float32, float64 only for float64 x), the block kernel built, the cuda
    sample limit."""
    def reasons(x, *_):
        why = table("mimb_scale_fwd").callable(backend)[1]
        if why is not None:
            return [why]
        return _cuda_x_reasons(x) if backend == "cuda" else []

    return Kernel(fn=_mimb_fwd(backend), reasons=reasons)


MIMB_FWD = define_kernels("mimb_fwd", _MIMB_ARGS, tensor_args=("x", "w1", "w2"),
                          example_inputs=_example_mimb, **{b: _mimb_column(b) for b in BACKEND})


# --------------------------------------------------------------------------- training step
_TRAIN_FWD_ARGS = ("x", "lam", "w1", "w2", "e1", "b1", "gamma", "beta", "e2", "b2",
                   "running_mean", "running_var", "momentum", "eps", "batch_norm")
_TRAIN_BWD_ARGS = ("dy", "x", "lam", "w1", "w2", "e1", "gamma", "beta", "e2", "state", "batch_norm")


def _running_reasons(*args) -> list[str]:
    """The cpu kernel updates float32 contiguous running statistics in place."""
    if not args[14]:
        return []
    return [
        f"{name} is {t.dtype}{'' if t.is_contiguous() else ', non-contiguous'}; the cpu kernel "
        "updates float32 contiguous running statistics"
        for name, t in (("running_mean", args[10]), ("running_var", args[11]))
        if t.numel() and (t.dtype != torch.float32 or not t.is_contiguous())
    ]


def _example_train_fwd(device):
    x, lam, w1, w2, e1, b1, e2, b2 = _example_mimb(device)
    K = e1.shape[0]
    return (x, lam, w1, w2, e1, b1, torch.ones(K, device=device), torch.zeros(K, device=device),
            e2, b2, torch.zeros(K, device=device), torch.ones(K, device=device), 0.1, 1e-5, True)


def _example_train_bwd(device):
    x, lam, w1, w2, e1, _, gamma, beta, e2, *_ = _example_train_fwd(device)
    B, C = x.shape[:2]
    state = torch.zeros(state_numel(B, C, w1.shape[0], e1.shape[0], True), device=device)
    return (torch.randn_like(x), x, lam, w1, w2, e1, gamma, beta, e2, state, True)


def _derived(entry: str, backend: str) -> Kernel:
    """A training entry from ``backend``'s block kernel and the torch embedding."""
    if entry == "mimb_train_fwd":
        fn = train_fwd_composite(_scale_fwd_branch(_block("mimb_scale_fwd", backend)))
        pick = lambda x, lam, w1, w2, *_: (x, w1, w2, _v_like(x))  # noqa: E731
        return Kernel(fn=fn, dtypes=SUPPORTED_DTYPES, reasons=_block_reasons("mimb_scale_fwd", backend, pick))
    fn = train_bwd_composite(_scale_bwd_branch(_block("mimb_scale_bwd", backend)))
    pick = lambda dy, x, lam, w1, w2, *_: (dy, x, w1, w2, _v_like(x), _v_like(x))  # noqa: E731
    return Kernel(fn=fn, dtypes=SUPPORTED_DTYPES, reasons=_block_reasons("mimb_scale_bwd", backend, pick))


TRAIN_FWD = define_kernels(
    "mimb_train_fwd", _TRAIN_FWD_ARGS, tensor_args=_TRAIN_FWD_ARGS[:10],
    example_inputs=_example_train_fwd,
    cpu=Kernel(symbol="mimb_train_fwd", reasons=_running_reasons),
    **{b: _derived("mimb_train_fwd", b) for b in ("cuda", "triton", "reference")})
TRAIN_BWD = define_kernels(
    "mimb_train_bwd", _TRAIN_BWD_ARGS, tensor_args=_TRAIN_BWD_ARGS[:9],
    example_inputs=_example_train_bwd, cpu=Kernel(symbol="mimb_train_bwd"),
    **{b: _derived("mimb_train_bwd", b) for b in ("cuda", "triton", "reference")})
