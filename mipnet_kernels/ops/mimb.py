"""The Multi-Instance Modulation Block (MIMB, MIPNet paper section 3.2).

Public ops (each also under ``torch.ops.mipnet``):

``mimb_scale(x, w1, w2, v) -> y``
    ``s = mean_hw(x)``, ``e = sigmoid(relu(s @ w1.T) @ w2.T)``, ``y = x * (e * v)[:, :, None, None]``.
    ``x [B, C, H, W]``, ``w1 [C/r, C]``, ``w2 [C, C/r]``, ``v [B, C]`` (the instance embedding,
    given).  Differentiable w.r.t. ``x, w1, w2, v``.  Used in training, where the official
    embedding has a BatchNorm1d on batch statistics.

``mimb(x, lam, w1, w2, e1, b1, e2, b2) -> y``
    The whole block: ``v = sigmoid(relu(lam @ e1.T + b1) @ e2.T + b2)`` then ``mimb_scale``.
    ``lam [B, N]`` float (one-hot or soft), ``e1 [K, N]``, ``b1 [K]``, ``e2 [C, K]``, ``b2 [C]``
    (the official layer has ``K = C/r`` and a BatchNorm between the two Linear layers, which
    :class:`mipnet_kernels.nn.MIMB` folds into ``e1, b1`` in eval mode).  Differentiable
    w.r.t. ``x``, ``lam`` and every weight.

``mimb_instances(x, w1, w2, table) -> y [N*B, C, H, W]``
    Inference for all N instances at once, instance-major:
    ``y[n*B + b] = x[b] * (e[b] * table[n])[:, None, None]`` with ``table [N, C]``.
    Inference only (see its docstring).

``mimb_scale_grouped(xs, w1s, w2s, vs) -> ys`` / ``mimb_instances_grouped(xs, w1s, w2s, tables)``
    The same on a list of branch tensors (HRNet: 4 branches of different C, H, W) in one op
    call, so a kernel can do one launch; the reference loops over the branches.

Dtypes and layouts (every backend):

* ``x``: float32 / float16 / bfloat16 (the compiled kernels), float64 (reference backend
  only: it exists for ``gradcheck``).  Any strides; the op hands the backends ``x``
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

Autograd structure (what is saved: only ``x``, the small operands and per-(sample, channel)
vectors -- never a full-size intermediate):

* ``mipnet::mimb_scale_fwd(x, w1, w2, v) -> (y, s)``: the forward phase; ``s [B, C]`` (the
  channel means, float32; float64 for float64 x) is saved for backward and is a
  non-differentiable output.  Its autograd formula calls
* ``mipnet::mimb_scale_bwd(dy, x, w1, w2, v, s) -> (dx, dw1, dw2, dv)``::

      z1 = s @ w1.T;  h = relu(z1);  e = sigmoid(h @ w2.T);  a = e * v
      g_a = sum_hw(dy * x);  g_v = g_a * e;  g_z2 = g_a * v * e * (1 - e)
      dw2 = g_z2.T @ h;  g_z1 = (g_z2 @ w2) * (z1 > 0);  dw1 = g_z1.T @ s;  g_s = g_z1 @ w1
      dx = dy * a[:, :, None, None] + g_s[:, :, None, None] / (H * W)

* ``mipnet::mimb_scale(x, w1, w2, v) -> y`` is ``mimb_scale_fwd(...)[0]`` (a
  CompositeImplicitAutograd op: autograd and ``torch.compile`` see ``mimb_scale_fwd``).
* ``mipnet::mimb_fwd(x, lam, w1, w2, e1, b1, e2, b2) -> (y, s)`` dispatches its own entry
  ``mimb_fwd`` (the cpu backend: ``torch.ops.mipnet_cpu.mimb_fwd``, the embedding computed
  inside the kernel); a backend without it (or declining the inputs) gets the tiny
  embedding ``v`` from plain tensor ops and runs the ``mimb_scale_fwd`` backends; its
  backward recomputes the embedding (``O(B*N*K + B*K*C)``), calls ``mimb_scale_bwd`` and
  back-propagates ``dv`` through the embedding MLP explicitly.  ``mipnet::mimb`` is
  ``mimb_fwd(...)[0]`` (CompositeImplicitAutograd), like ``mimb_scale``.
* The grouped forms have the same structure (``mimb_scale_grouped_fwd`` / ``_bwd``).
* The backward runs on the backend forced when the forward ran (``use_backend`` is a
  per-thread choice, and the autograd engine runs CUDA backward on its own threads).
* Eager fast path: in plain eager mode (:func:`_eager_plain`: no ``torch.compile`` /
  export / TorchScript tracing, functorch transform, tensor subclass, torch-function or
  dispatch mode) the public ``mimb``, ``mimb_scale`` and ``mimb_instances`` run the same
  checks, dispatcher calls and autograd formulas as the ops above through plain
  ``torch.autograd.Function``s, skipping the ``torch.library`` layers (bit-identical
  results, ~80 µs less per forward + backward on a small CPU tensor).  Everything else
  goes through ``torch.ops.mipnet.*``.
* The training step of the whole official block, the embedding's BatchNorm on batch
  statistics included, is :func:`mipnet_kernels.ops.mimb_train.mimb_train` (what
  :class:`mipnet_kernels.MIMB` runs in eager training).

Backends: ``mimb_scale_fwd``, ``mimb_fwd``, ``mimb_scale_bwd``, ``mimb_instances`` and their grouped forms
dispatch through :mod:`mipnet_kernels._backends`.  The ``cpu`` backend calls
``torch.ops.mipnet_cpu.{mimb_scale_fwd, mimb_fwd, mimb_scale_bwd, mimb_instances}`` (csrc/schemas.h;
the grouped forms loop over those) and declares itself unsupported ("not built") when the
loaded extension lacks them, so the automatic choice falls back to the reference.  The
``triton`` backend (:mod:`mipnet_kernels.triton.mimb`: two launches per op, the per-sample
MLP in the reduction's last program; float64 too) and the ``cuda`` backend
(``csrc/cuda/mimb_kernel.cu``: a single-pass cooperative kernel when the launch fits on the
device, else two phases; the grouped forms in one launch for up to four branches) serve
CUDA tensors; the triton kernels also run on CPU under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .. import _backends, _extension
from .._backends import register

#: dtypes the ops accept for ``x`` and the small operands (float64: reference backend only).
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
#: dtypes the compiled kernels accept.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_DTYPE_NAMES = "float32, float16, bfloat16 or float64"


# --------------------------------------------------------------------------- helpers
def compute_dtype(x: Tensor) -> torch.dtype:
    """The arithmetic dtype for input ``x``: float64 for float64 ``x``, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def out_memory_format(x: Tensor) -> torch.memory_format:
    """The memory format of ``y``/``dx`` for input ``x`` (see the module docstring)."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _dense(x: Tensor) -> Tensor:
    """``x`` itself when contiguous or channels_last, else a contiguous copy."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return x
    return x.contiguous()


def _empty_like_x(x: Tensor, batch: int | None = None) -> Tensor:
    B, C, H, W = x.shape
    return torch.empty(
        (B if batch is None else batch, C, H, W),
        dtype=x.dtype,
        device=x.device,
        memory_format=out_memory_format(x),
    )


# --------------------------------------------------------------------------- eager fast path
_PLAIN = (Tensor, torch.nn.Parameter)


def _is_compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - old torch
        return False


def _eager_plain(*tensors: Tensor) -> bool:
    """True when nothing but eager autograd sees these tensors: no torch.compile / export
    tracing, TorchScript tracing, functorch transform, tensor subclass, torch-function or
    dispatch mode (FakeTensor, make_fx, FlopCounterMode, ...).  Then the public functions
    skip the ``torch.library`` custom-op layer (~25 µs per call forward, more backward, on
    this project's CPU) and call the dispatcher straight away -- the same checks, kernels
    and saved tensors; everything else goes through ``torch.ops.mipnet.*``."""
    return (
        not _is_compiling()
        and not torch._C._are_functorch_transforms_active()
        and torch._C._len_torch_dispatch_stack() == 0
        and torch._C._len_torch_function_stack() == 0
        and not torch._C._get_tracing_state()
        and all(type(t) in _PLAIN for t in tensors)
    )


# --------------------------------------------------------------------------- validation
def _check_tensor(t, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _check_float(t, name: str) -> None:
    _check_tensor(t, name)
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name} must be {_DTYPE_NAMES}, got {t.dtype}")


def _check_device(t: Tensor, name: str, x: Tensor, xname: str) -> None:
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but {xname} is on {x.device}")


def _check_shape(t: Tensor, name: str, want: tuple, what: str) -> None:
    if tuple(t.shape) != tuple(want):
        raise ValueError(
            f"{name} must have shape {what} = {list(want)}, got {list(t.shape)}"
        )


def _check_x(x, name: str = "x") -> None:
    _check_float(x, name)
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D [B, C, H, W], got shape {list(x.shape)}")
    B, C, H, W = x.shape
    if B * C > 0 and H * W == 0:
        raise ValueError(
            f"{name} has an empty spatial size {H}x{W}; the squeeze (mean over H*W) is undefined"
        )


def _check_excite(x: Tensor, w1, w2, p: str = "", xname: str = "x") -> None:
    """``w1 [Cr, C]``, ``w2 [C, Cr]`` for ``x [B, C, H, W]`` (names prefixed/suffixed by ``p``)."""
    n1, n2 = f"w1{p}", f"w2{p}"
    C = x.shape[1]
    _check_float(w1, n1)
    if w1.dim() != 2 or w1.shape[1] != C or w1.shape[0] < 1:
        raise ValueError(
            f"{n1} must have shape [C/r, C] with C = {xname}.shape[1] = {C} and C/r >= 1, "
            f"got {list(w1.shape)}"
        )
    _check_device(w1, n1, x, xname)
    _check_float(w2, n2)
    _check_shape(w2, n2, (C, w1.shape[0]), f"[C, C/r] (C/r = {n1}.shape[0])")
    _check_device(w2, n2, x, xname)


def _check_v(x: Tensor, v, name: str, xname: str) -> None:
    _check_float(v, name)
    _check_shape(v, name, tuple(x.shape[:2]), f"[B, C] (from {xname})")
    _check_device(v, name, x, xname)


def _fast_xw(x, w1, w2) -> bool:
    """True when ``x, w1, w2`` certainly pass the checks (plain attribute access only)."""
    T, D = Tensor, SUPPORTED_DTYPES
    if not (isinstance(x, T) and isinstance(w1, T) and isinstance(w2, T)):
        return False
    xs, s1, s2 = x.shape, w1.shape, w2.shape
    if len(xs) != 4 or len(s1) != 2 or len(s2) != 2:
        return False
    dev = x.device
    return (
        x.dtype in D and w1.dtype in D and w2.dtype in D
        and xs[2] * xs[3] > 0 and s1[0] >= 1 and s1[1] == xs[1]
        and s2[0] == xs[1] and s2[1] == s1[0]
        and w1.device == dev and w2.device == dev
    )


def _fast_bc(x, t) -> bool:
    """True when ``t`` is a supported float ``[B, C]`` tensor on ``x``'s device."""
    if not isinstance(t, Tensor) or t.dtype not in SUPPORTED_DTYPES or t.device != x.device:
        return False
    ts, xs = t.shape, x.shape
    return len(ts) == 2 and ts[0] == xs[0] and ts[1] == xs[1]


def _check_scale_args(x, w1, w2, v, p: str = "") -> None:
    if _fast_xw(x, w1, w2) and _fast_bc(x, v):
        return
    xname = f"x{p}"
    _check_x(x, xname)
    _check_excite(x, w1, w2, p, xname)
    _check_v(x, v, f"v{p}", xname)


def _check_embed_args(x: Tensor, lam, e1, b1, e2, b2) -> None:
    B, C = x.shape[:2]
    _check_float(lam, "lam")
    if lam.dim() != 2 or lam.shape[0] != B or lam.shape[1] < 1:
        raise ValueError(
            f"lam must have shape [B, N] with B = x.shape[0] = {B} and N >= 1, got {list(lam.shape)}"
        )
    _check_device(lam, "lam", x, "x")
    N = lam.shape[1]
    _check_float(e1, "e1")
    if e1.dim() != 2 or e1.shape[1] != N or e1.shape[0] < 1:
        raise ValueError(
            f"e1 must have shape [K, N] (K = C/r) with N = lam.shape[1] = {N} and K >= 1, "
            f"got {list(e1.shape)}"
        )
    K = e1.shape[0]
    for t, name, want, what in (
        (b1, "b1", (K,), "[K] (K = e1.shape[0])"),
        (e2, "e2", (C, K), "[C, K] (C = x.shape[1], K = e1.shape[0])"),
        (b2, "b2", (C,), "[C] (C = x.shape[1])"),
    ):
        _check_float(t, name)
        _check_shape(t, name, want, what)
    for t, name in ((e1, "e1"), (b1, "b1"), (e2, "e2"), (b2, "b2")):
        _check_device(t, name, x, "x")


def _fast_embed(x, lam, e1, b1, e2, b2) -> bool:
    """True when the embedding operands certainly pass :func:`_check_embed_args`."""
    T, D, dev = Tensor, SUPPORTED_DTYPES, x.device
    for t in (lam, e1, b1, e2, b2):
        if not isinstance(t, T) or t.dtype not in D or t.device != dev:
            return False
    xs, ls, s1, sb1, s2, sb2 = x.shape, lam.shape, e1.shape, b1.shape, e2.shape, b2.shape
    return (
        len(ls) == 2 and len(s1) == 2 and len(sb1) == 1 and len(s2) == 2 and len(sb2) == 1
        and ls[0] == xs[0] and ls[1] >= 1 and s1[1] == ls[1] and s1[0] >= 1
        and sb1[0] == s1[0] and s2[0] == xs[1] and s2[1] == s1[0] and sb2[0] == xs[1]
    )


def _check_mimb_args(x, lam, w1, w2, e1, b1, e2, b2) -> None:
    if _fast_xw(x, w1, w2) and _fast_embed(x, lam, e1, b1, e2, b2):
        return
    _check_x(x)
    _check_excite(x, w1, w2)
    _check_embed_args(x, lam, e1, b1, e2, b2)


def _check_bwd_args(dy, x, w1, w2, v, s, p: str = "") -> None:
    _check_scale_args(x, w1, w2, v, p)
    xname = f"x{p}"
    _check_tensor(dy, f"dy{p}")
    if dy.shape != x.shape or dy.dtype != x.dtype:
        raise ValueError(
            f"dy{p} must have {xname}'s shape {list(x.shape)} and dtype {x.dtype}, "
            f"got {list(dy.shape)} {dy.dtype}"
        )
    _check_device(dy, f"dy{p}", x, xname)
    _check_v(x, s, f"s{p}", xname)


def _check_instances_args(x, w1, w2, table, p: str = "") -> None:
    if (_fast_xw(x, w1, w2) and isinstance(table, Tensor) and table.dtype in SUPPORTED_DTYPES
            and table.device == x.device and len(table.shape) == 2 and table.shape[1] == x.shape[1]):
        return
    xname = f"x{p}"
    _check_x(x, xname)
    _check_excite(x, w1, w2, p, xname)
    name = f"table{p}"
    _check_float(table, name)
    C = x.shape[1]
    if table.dim() != 2 or table.shape[1] != C:
        raise ValueError(
            f"{name} must have shape [N, C] with C = {xname}.shape[1] = {C}, got {list(table.shape)}"
        )
    _check_device(table, name, x, xname)


def _check_list(t, name: str) -> None:
    if not isinstance(t, (list, tuple)):
        raise TypeError(f"{name} must be a list of tensors, got {type(t).__name__}")


def _check_grouped(lists: Sequence, names: Sequence[str]) -> int:
    for lst, name in zip(lists, names):
        _check_list(lst, name)
    n = len(lists[0])
    if n == 0:
        raise ValueError(f"{names[0]} must be a non-empty list of branch tensors")
    for lst, name in zip(lists[1:], names[1:]):
        if len(lst) != n:
            raise ValueError(f"{name} has {len(lst)} tensors but {names[0]} has {n}")
    x0 = lists[0][0]
    _check_tensor(x0, f"{names[0]}[0]")
    for i, x in enumerate(lists[0]):
        _check_tensor(x, f"{names[0]}[{i}]")
        if x.device != x0.device:
            raise ValueError(f"{names[0]}[{i}] is on {x.device} but {names[0]}[0] is on {x0.device}")
    return n


def _check_scale_grouped_args(xs, w1s, w2s, vs) -> None:
    n = _check_grouped((xs, w1s, w2s, vs), ("xs", "w1s", "w2s", "vs"))
    for i in range(n):
        _check_scale_args(xs[i], w1s[i], w2s[i], vs[i], p=f"s[{i}]")


def _check_scale_grouped_bwd_args(dys, xs, w1s, w2s, vs, ss) -> None:
    n = _check_grouped((xs, dys, w1s, w2s, vs, ss), ("xs", "dys", "w1s", "w2s", "vs", "ss"))
    for i in range(n):
        _check_bwd_args(dys[i], xs[i], w1s[i], w2s[i], vs[i], ss[i], p=f"s[{i}]")


def _check_instances_grouped_args(xs, w1s, w2s, tables) -> None:
    n = _check_grouped((xs, w1s, w2s, tables), ("xs", "w1s", "w2s", "tables"))
    for i in range(n):
        _check_instances_args(xs[i], w1s[i], w2s[i], tables[i], p=f"s[{i}]")


# --------------------------------------------------------------------------- reference
def _excite(s: Tensor, w1: Tensor, w2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(z1, h, e)`` of the squeeze-excite MLP on ``s [B, C]`` in ``s``'s dtype."""
    z1 = s @ w1.to(s.dtype).T
    h = torch.relu(z1)
    e = torch.sigmoid(h @ w2.to(s.dtype).T)
    return z1, h, e


def mimb_embedding_reference(lam: Tensor, e1: Tensor, b1: Tensor, e2: Tensor, b2: Tensor,
                             dtype: torch.dtype = torch.float32) -> Tensor:
    """The instance embedding ``v = sigmoid(relu(lam @ e1.T + b1) @ e2.T + b2)`` in ``dtype``."""
    h = torch.relu(lam.to(dtype) @ e1.to(dtype).T + b1.to(dtype))
    return torch.sigmoid(h @ e2.to(dtype).T + b2.to(dtype))


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


def mimb_fwd_reference(x: Tensor, lam: Tensor, w1: Tensor, w2: Tensor, e1: Tensor, b1: Tensor,
                       e2: Tensor, b2: Tensor) -> tuple[Tensor, Tensor]:
    """Pure-PyTorch forward phase of ``mimb``: ``(y, s)`` (the embedding, then the scale)."""
    v = mimb_embedding_reference(lam, e1, b1, e2, b2, compute_dtype(x))
    return mimb_scale_fwd_reference(x, w1, w2, v)


def mimb_instances_reference(x: Tensor, w1: Tensor, w2: Tensor, table: Tensor) -> Tensor:
    """Pure-PyTorch ``mimb_instances``: ``y[n*B + b] = x[b] * (e[b] * table[n])``."""
    ct = compute_dtype(x)
    s = x.mean(dim=(2, 3), dtype=ct)
    _, _, e = _excite(s, w1, w2)
    xf = x.to(ct)
    t = table.to(ct)
    fmt = out_memory_format(x)
    outs = [(xf * (e * t[n])[:, :, None, None]).to(x.dtype) for n in range(t.shape[0])]
    if not outs:
        return _empty_like_x(x, 0)
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


# ------------------------------------------------------- per-branch empty-input handling
# Backends see non-empty inputs only; the public ops answer empty ones themselves.
def _scale_fwd_branch(kernel):
    def run(x, w1, w2, v):
        x = _dense(x)
        if x.numel() == 0:
            return _empty_like_x(x), x.new_zeros(x.shape[:2], dtype=compute_dtype(x))
        return kernel(x, w1, w2, v)

    return run


def _scale_bwd_branch(kernel):
    def run(dy, x, w1, w2, v, s):
        x = _dense(x)
        if x.numel() == 0:
            return (
                _empty_like_x(x),
                torch.zeros_like(w1, memory_format=torch.contiguous_format),
                torch.zeros_like(w2, memory_format=torch.contiguous_format),
                torch.zeros_like(v, memory_format=torch.contiguous_format),
            )
        return kernel(dy, x, w1, w2, v, s)

    return run


def _instances_branch(kernel):
    def run(x, w1, w2, table):
        x = _dense(x)
        if x.numel() == 0 or table.shape[0] == 0:
            return _empty_like_x(x, x.shape[0] * table.shape[0])
        return kernel(x, w1, w2, table)

    return run


# --------------------------------------------------------------------------- backends
register("mimb_scale_fwd", "reference")(mimb_scale_fwd_reference)
register("mimb_scale_bwd", "reference")(mimb_scale_bwd_reference)
register("mimb_fwd", "reference")(mimb_fwd_reference)
register("mimb_instances", "reference")(mimb_instances_reference)
register("mimb_scale_grouped_fwd", "reference")(mimb_scale_grouped_fwd_reference)
register("mimb_scale_grouped_bwd", "reference")(mimb_scale_grouped_bwd_reference)
register("mimb_instances_grouped", "reference")(mimb_instances_grouped_reference)


def _cpu_missing(name: str) -> list[str]:
    return _extension.missing_kernel("mipnet_cpu", name)


def _kernel_dtype_reasons(**tensors: Tensor) -> list[str]:
    if all(t.dtype in KERNEL_DTYPES for t in tensors.values()):
        return []
    return [
        f"{name} is {t.dtype}; the compiled kernels take float32, float16 or bfloat16 "
        "(float64 runs on the reference and triton backends)"
        for name, t in tensors.items()
        if t.dtype not in KERNEL_DTYPES
    ]


def _triton_dtype_reasons(**tensors: Tensor) -> list[str]:
    """The Triton kernels also run float64 (accumulating in float64), e.g. for gradcheck."""
    return [
        f"{name} is {t.dtype}; the Triton kernels take {_DTYPE_NAMES}"
        for name, t in tensors.items()
        if t.dtype not in SUPPORTED_DTYPES
    ]


def _cpu_scale_fwd_reasons(x, w1, w2, v) -> list[str]:
    return _cpu_missing("mimb_scale_fwd") or _kernel_dtype_reasons(x=x, w1=w1, w2=w2, v=v)


def _cpu_mimb_fwd_reasons(x, lam, w1, w2, e1, b1, e2, b2) -> list[str]:
    return _cpu_missing("mimb_fwd") or _kernel_dtype_reasons(
        x=x, lam=lam, w1=w1, w2=w2, e1=e1, b1=b1, e2=e2, b2=b2
    )


def _cpu_scale_bwd_reasons(dy, x, w1, w2, v, s) -> list[str]:
    return _cpu_missing("mimb_scale_bwd") or _kernel_dtype_reasons(dy=dy, x=x, w1=w1, w2=w2, v=v, s=s)


def _cpu_instances_reasons(x, w1, w2, table) -> list[str]:
    return _cpu_missing("mimb_instances") or _kernel_dtype_reasons(x=x, w1=w1, w2=w2, table=table)


def _grouped_reasons(single, *lists) -> list[str]:
    """The reasons of ``single`` for each branch, prefixed by the branch (once if all agree)."""
    out: list[str] = []
    for i, args in enumerate(zip(*lists)):
        out += [f"branch {i}: {r}" for r in single(*args)]
    return out


def _cpu_grouped_reasons(name: str, single, *lists) -> list[str]:
    return _cpu_missing(name) or _grouped_reasons(single, *lists)


@register("mimb_scale_fwd", "cpu", reasons=_cpu_scale_fwd_reasons)
def _mimb_scale_fwd_cpu(x, w1, w2, v):
    return torch.ops.mipnet_cpu.mimb_scale_fwd(x, w1, w2, v)


@register("mimb_fwd", "cpu", reasons=_cpu_mimb_fwd_reasons)
def _mimb_fwd_cpu(x, lam, w1, w2, e1, b1, e2, b2):
    return torch.ops.mipnet_cpu.mimb_fwd(x, lam, w1, w2, e1, b1, e2, b2)


@register("mimb_scale_bwd", "cpu", reasons=_cpu_scale_bwd_reasons)
def _mimb_scale_bwd_cpu(dy, x, w1, w2, v, s):
    return torch.ops.mipnet_cpu.mimb_scale_bwd(dy, x, w1, w2, v, s)


@register("mimb_instances", "cpu", reasons=_cpu_instances_reasons)
def _mimb_instances_cpu(x, w1, w2, table):
    return torch.ops.mipnet_cpu.mimb_instances(x, w1, w2, table)


@register(
    "mimb_scale_grouped_fwd", "cpu",
    reasons=lambda *a: _cpu_grouped_reasons("mimb_scale_fwd", _cpu_scale_fwd_reasons, *a),
)
def _mimb_scale_grouped_fwd_cpu(xs, w1s, w2s, vs):
    return tuple(_loop(_scale_fwd_branch(_mimb_scale_fwd_cpu), xs, w1s, w2s, vs))


@register(
    "mimb_scale_grouped_bwd", "cpu",
    reasons=lambda *a: _cpu_grouped_reasons("mimb_scale_bwd", _cpu_scale_bwd_reasons, *a),
)
def _mimb_scale_grouped_bwd_cpu(dys, xs, w1s, w2s, vs, ss):
    return tuple(_loop(_scale_bwd_branch(_mimb_scale_bwd_cpu), dys, xs, w1s, w2s, vs, ss))


@register(
    "mimb_instances_grouped", "cpu",
    reasons=lambda *a: _cpu_grouped_reasons("mimb_instances", _cpu_instances_reasons, *a),
)
def _mimb_instances_grouped_cpu(xs, w1s, w2s, tables):
    branch = _instances_branch(_mimb_instances_cpu)
    return [branch(*args) for args in zip(xs, w1s, w2s, tables)]


# Triton: the two-phase kernels of mipnet_kernels/triton/mimb.py (reduce with the tiny MLP
# run by the last program of each sample, then scale); float64 too.  The grouped forms run
# up to four branches per launch (two launches per group of branches).
def _triton_scale_fwd(x, w1, w2, v):
    from ..triton import mimb_scale_fwd_triton

    return mimb_scale_fwd_triton(x, w1, w2, v)


def _triton_scale_bwd(dy, x, w1, w2, v, s):
    from ..triton import mimb_scale_bwd_triton

    return mimb_scale_bwd_triton(dy, x, w1, w2, v, s)


def _triton_instances(x, w1, w2, table):
    from ..triton import mimb_instances_triton

    return mimb_instances_triton(x, w1, w2, table)


register("mimb_scale_fwd", "triton",
         reasons=lambda x, w1, w2, v: _triton_dtype_reasons(x=x, w1=w1, w2=w2, v=v))(_triton_scale_fwd)
register("mimb_scale_bwd", "triton",
         reasons=lambda dy, x, w1, w2, v, s: _triton_dtype_reasons(dy=dy, x=x, w1=w1, w2=w2, v=v, s=s))(
    _triton_scale_bwd)
register("mimb_instances", "triton",
         reasons=lambda x, w1, w2, t: _triton_dtype_reasons(x=x, w1=w1, w2=w2, table=t))(_triton_instances)


@register("mimb_scale_grouped_fwd", "triton",
          reasons=lambda *a: _grouped_reasons(lambda x, w1, w2, v: _triton_dtype_reasons(x=x, w1=w1, w2=w2, v=v), *a))
def _mimb_scale_grouped_fwd_triton(xs, w1s, w2s, vs):
    from ..triton import mimb_scale_grouped_fwd_triton

    return mimb_scale_grouped_fwd_triton(xs, w1s, w2s, vs)


@register("mimb_scale_grouped_bwd", "triton",
          reasons=lambda *a: _grouped_reasons(
              lambda dy, x, w1, w2, v, s: _triton_dtype_reasons(dy=dy, x=x, w1=w1, w2=w2, v=v, s=s), *a))
def _mimb_scale_grouped_bwd_triton(dys, xs, w1s, w2s, vs, ss):
    from ..triton import mimb_scale_grouped_bwd_triton

    return mimb_scale_grouped_bwd_triton(dys, xs, w1s, w2s, vs, ss)


@register("mimb_instances_grouped", "triton",
          reasons=lambda *a: _grouped_reasons(lambda x, w1, w2, t: _triton_dtype_reasons(x=x, w1=w1, w2=w2, table=t), *a))
def _mimb_instances_grouped_triton(xs, w1s, w2s, tables):
    from ..triton import mimb_instances_grouped_triton

    return mimb_instances_grouped_triton(xs, w1s, w2s, tables)


# CUDA: csrc/cuda/mimb_kernel.cu -- a single-pass cooperative kernel when the launch fits on
# the device, else two phases (see the file header; MIPNET_MIMB_CUDA_PATH forces one).  The
# grouped forms are kernels of their own: up to four branches per launch.
_CUDA_MAX_SAMPLE_ELEMS = 2**30


def _cuda_missing(name: str) -> list[str]:
    return _extension.missing_kernel("mipnet_cuda", name)


def _cuda_x_reasons(x: Tensor) -> list[str]:
    n = x.shape[1] * x.shape[2] * x.shape[3]
    if n > _CUDA_MAX_SAMPLE_ELEMS:
        return [f"x has C*H*W = {n} elements per sample; the cuda kernels take at most 2^30"]
    return []


def _cuda_scale_fwd_reasons(x, w1, w2, v) -> list[str]:
    return (_cuda_missing("mimb_scale_fwd") or _kernel_dtype_reasons(x=x, w1=w1, w2=w2, v=v)
            or _cuda_x_reasons(x))


def _cuda_mimb_fwd_reasons(x, lam, w1, w2, e1, b1, e2, b2) -> list[str]:
    return _cuda_missing("mimb_fwd") or _kernel_dtype_reasons(
        x=x, lam=lam, w1=w1, w2=w2, e1=e1, b1=b1, e2=e2, b2=b2
    ) or _cuda_x_reasons(x)


def _cuda_scale_bwd_reasons(dy, x, w1, w2, v, s) -> list[str]:
    return (_cuda_missing("mimb_scale_bwd")
            or _kernel_dtype_reasons(dy=dy, x=x, w1=w1, w2=w2, v=v, s=s) or _cuda_x_reasons(x))


def _cuda_instances_reasons(x, w1, w2, table) -> list[str]:
    return (_cuda_missing("mimb_instances")
            or _kernel_dtype_reasons(x=x, w1=w1, w2=w2, table=table) or _cuda_x_reasons(x))


def _cuda_grouped_reasons(name: str, single, *lists) -> list[str]:
    return _cuda_missing(name) or _grouped_reasons(single, *lists)


@register("mimb_scale_fwd", "cuda", reasons=_cuda_scale_fwd_reasons)
def _mimb_scale_fwd_cuda(x, w1, w2, v):
    return torch.ops.mipnet_cuda.mimb_scale_fwd(x, w1, w2, v)


@register("mimb_fwd", "cuda", reasons=_cuda_mimb_fwd_reasons)
def _mimb_fwd_cuda(x, lam, w1, w2, e1, b1, e2, b2):
    return torch.ops.mipnet_cuda.mimb_fwd(x, lam, w1, w2, e1, b1, e2, b2)


@register("mimb_scale_bwd", "cuda", reasons=_cuda_scale_bwd_reasons)
def _mimb_scale_bwd_cuda(dy, x, w1, w2, v, s):
    return torch.ops.mipnet_cuda.mimb_scale_bwd(dy, x, w1, w2, v, s)


@register("mimb_instances", "cuda", reasons=_cuda_instances_reasons)
def _mimb_instances_cuda(x, w1, w2, table):
    return torch.ops.mipnet_cuda.mimb_instances(x, w1, w2, table)


@register(
    "mimb_scale_grouped_fwd", "cuda",
    reasons=lambda *a: _cuda_grouped_reasons("mimb_scale_grouped_fwd", _cuda_scale_fwd_reasons, *a),
)
def _mimb_scale_grouped_fwd_cuda(xs, w1s, w2s, vs):
    ys, ss = torch.ops.mipnet_cuda.mimb_scale_grouped_fwd(xs, w1s, w2s, vs)
    return list(ys), list(ss)


@register(
    "mimb_scale_grouped_bwd", "cuda",
    reasons=lambda *a: _cuda_grouped_reasons("mimb_scale_grouped_bwd", _cuda_scale_bwd_reasons, *a),
)
def _mimb_scale_grouped_bwd_cuda(dys, xs, w1s, w2s, vs, ss):
    return tuple(list(o) for o in torch.ops.mipnet_cuda.mimb_scale_grouped_bwd(dys, xs, w1s, w2s, vs, ss))


@register(
    "mimb_instances_grouped", "cuda",
    reasons=lambda *a: _cuda_grouped_reasons("mimb_instances_grouped", _cuda_instances_reasons, *a),
)
def _mimb_instances_grouped_cuda(xs, w1s, w2s, tables):
    return list(torch.ops.mipnet_cuda.mimb_instances_grouped(xs, w1s, w2s, tables))


# Example inputs for `python -m mipnet_kernels.info`: HRNet-W32 stage-4 branch 0 at 256x192.
def _example_scale(device):
    x = torch.randn(2, 32, 64, 48, device=device)
    return (x, torch.randn(8, 32, device=device), torch.randn(32, 8, device=device),
            torch.rand(2, 32, device=device))


def _example_scale_bwd(device):
    x, w1, w2, v = _example_scale(device)
    return (torch.randn_like(x), x, w1, w2, v, x.mean((2, 3)))


def _example_mimb(device):
    x, w1, w2, _ = _example_scale(device)
    lam = torch.eye(2, device=device)
    return (x, lam, w1, w2, torch.randn(8, 2, device=device), torch.randn(8, device=device),
            torch.randn(32, 8, device=device), torch.randn(32, device=device))


def _example_instances(device):
    x, w1, w2, v = _example_scale(device)
    return (x, w1, w2, v)


def _example_grouped(device):
    return tuple([t] for t in _example_scale(device))


def _example_grouped_bwd(device):
    return tuple([t] for t in _example_scale_bwd(device))


_backends.define_op("mimb_scale_fwd", example_inputs=_example_scale)
_backends.define_op("mimb_scale_bwd", example_inputs=_example_scale_bwd)
_backends.define_op("mimb_fwd", example_inputs=_example_mimb)
_backends.define_op("mimb_instances", example_inputs=_example_instances)
_backends.define_op("mimb_scale_grouped_fwd", example_inputs=_example_grouped)
_backends.define_op("mimb_scale_grouped_bwd", example_inputs=_example_grouped_bwd)
_backends.define_op("mimb_instances_grouped", example_inputs=_example_grouped)


def _dispatch_scale_fwd(x, w1, w2, v):
    return _scale_fwd_branch(lambda *a: _backends.dispatch("mimb_scale_fwd", x.device, *a))(x, w1, w2, v)


def _fused_mimb_backend(x: Tensor, args: tuple) -> str | None:
    """The backend with a fused ``mimb_fwd`` kernel that runs these inputs now, or None.

    The backend in force (or, automatically, the first one of the device's order that can
    run anything on this device) is used when it has a ``mimb_fwd`` implementation with no
    reasons against the inputs; otherwise (None) the embedding runs in torch and
    ``mimb_scale_fwd`` is dispatched as usual (a backend that has only ``mimb_scale_fwd``,
    or a fused kernel that declines these dtypes)."""
    entry = _backends._OPS["mimb_fwd"]
    forced = _backends.get_backend()
    order = (forced,) if forced is not None else entry.auto_order.get(x.device.type, ("reference",))
    for name in order:
        if forced is None and (
            _backends.backend_unavailable_reason(name) is not None
            or _backends.device_unsupported_reason(name, x.device) is not None
        ):
            continue
        if name in entry.impls and not _backends.not_supported_reasons("mimb_fwd", name, x.device, *args):
            return name
        return None
    return None


def _dispatch_mimb_fwd(x, lam, w1, w2, e1, b1, e2, b2):
    x = _dense(x)
    args = (x, lam, w1, w2, e1, b1, e2, b2)
    # The fused kernel only when no input requires grad: the backward recomputes v with the
    # torch ops below, so a recorded forward uses the same v (bit-identical to
    # mimb_scale(x, w1, w2, mimb_embedding_reference(...))); the fused embedding may differ
    # from it by float rounding (~1 ulp).
    if x.numel() > 0 and not any(t.requires_grad for t in args):
        name = _fused_mimb_backend(x, args)
        if name is not None:
            return _backends._OPS["mimb_fwd"].impls[name].fn(*args)
    v = mimb_embedding_reference(lam, e1, b1, e2, b2, compute_dtype(x))
    return _dispatch_scale_fwd(x, w1, w2, v)


def _forced_backend() -> str:
    """The backend choice in force now, to re-apply in backward (another thread on CUDA)."""
    return _backends.get_backend() or "auto"


# --------------------------------------------------------------------------- mimb_scale
@torch.library.custom_op("mipnet::mimb_scale_fwd", mutates_args=())
def _mimb_scale_fwd_op(x: Tensor, w1: Tensor, w2: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    _check_scale_args(x, w1, w2, v)
    return _dispatch_scale_fwd(x, w1, w2, v)


@_mimb_scale_fwd_op.register_fake
def _(x, w1, w2, v):
    _check_scale_args(x, w1, w2, v)
    return _empty_like_x(x), x.new_empty(x.shape[:2], dtype=compute_dtype(x))


def _scale_bwd_direct(dy, x, w1, w2, v, s):
    """``mimb_scale_bwd`` below the custom-op layer: checks, then the dispatcher."""
    _check_bwd_args(dy, x, w1, w2, v, s)
    return _scale_bwd_branch(lambda *a: _backends.dispatch("mimb_scale_bwd", x.device, *a))(
        dy, x, w1, w2, v, s
    )


@torch.library.custom_op("mipnet::mimb_scale_bwd", mutates_args=())
def _mimb_scale_bwd_op(
    dy: Tensor, x: Tensor, w1: Tensor, w2: Tensor, v: Tensor, s: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _scale_bwd_direct(dy, x, w1, w2, v, s)


@_mimb_scale_bwd_op.register_fake
def _(dy, x, w1, w2, v, s):
    _check_bwd_args(dy, x, w1, w2, v, s)
    return (
        _empty_like_x(x),
        torch.empty_like(w1, memory_format=torch.contiguous_format),
        torch.empty_like(w2, memory_format=torch.contiguous_format),
        torch.empty_like(v, memory_format=torch.contiguous_format),
    )


def _scale_setup_context(ctx, inputs, output):
    x, w1, w2, v = inputs
    _, s = output
    ctx.save_for_backward(x, w1, w2, v, s)
    ctx.mark_non_differentiable(s)
    ctx.backend = _forced_backend()


def _scale_backward(ctx, dy, _ds):
    x, w1, w2, v, s = ctx.saved_tensors
    with _backends.use_backend(ctx.backend):
        dx, dw1, dw2, dv = torch.ops.mipnet.mimb_scale_bwd(dy, x, w1, w2, v, s)
    return dx, dw1, dw2, dv


_mimb_scale_fwd_op.register_autograd(_scale_backward, setup_context=_scale_setup_context)

torch.library.define("mipnet::mimb_scale", "(Tensor x, Tensor w1, Tensor w2, Tensor v) -> Tensor")


@torch.library.impl("mipnet::mimb_scale", "CompositeImplicitAutograd")
def _mimb_scale_composite(x, w1, w2, v):
    return torch.ops.mipnet.mimb_scale_fwd(x, w1, w2, v)[0]


# --------------------------------------------------------------------------- mimb
@torch.library.custom_op("mipnet::mimb_fwd", mutates_args=())
def _mimb_fwd_op(
    x: Tensor, lam: Tensor, w1: Tensor, w2: Tensor, e1: Tensor, b1: Tensor, e2: Tensor, b2: Tensor
) -> tuple[Tensor, Tensor]:
    _check_mimb_args(x, lam, w1, w2, e1, b1, e2, b2)
    return _dispatch_mimb_fwd(x, lam, w1, w2, e1, b1, e2, b2)


@_mimb_fwd_op.register_fake
def _(x, lam, w1, w2, e1, b1, e2, b2):
    _check_mimb_args(x, lam, w1, w2, e1, b1, e2, b2)
    return _empty_like_x(x), x.new_empty(x.shape[:2], dtype=compute_dtype(x))


def _mimb_setup_context(ctx, inputs, output):
    _, s = output
    ctx.save_for_backward(*inputs, s)
    ctx.mark_non_differentiable(s)
    ctx.backend = _forced_backend()


def _mimb_backward(ctx, dy, _ds, scale_bwd=None):
    """``mimb``'s backward; ``scale_bwd`` (default: the ``mipnet::mimb_scale_bwd`` op) runs
    the block's part."""
    scale_bwd = torch.ops.mipnet.mimb_scale_bwd if scale_bwd is None else scale_bwd
    x, lam, w1, w2, e1, b1, e2, b2, s = ctx.saved_tensors
    ct = compute_dtype(x)
    # Recompute the tiny embedding (B x N -> B x K -> B x C) instead of saving it.
    lamf, E1, B1, E2, B2 = (t.to(ct) for t in (lam, e1, b1, e2, b2))
    zh = lamf @ E1.T + B1
    h = torch.relu(zh)
    v = torch.sigmoid(h @ E2.T + B2)
    with _backends.use_backend(ctx.backend):
        dx, dw1, dw2, dv = scale_bwd(dy, x, w1, w2, v, s)
    dlam = de1 = db1 = de2 = db2 = None
    if any(ctx.needs_input_grad[i] for i in (1, 4, 5, 6, 7)):
        g_zv = dv * v * (1 - v)
        de2 = (g_zv.T @ h).to(e2.dtype)
        db2 = g_zv.sum(0).to(b2.dtype)
        g_zh = (g_zv @ E2) * (zh > 0).to(ct)
        de1 = (g_zh.T @ lamf).to(e1.dtype)
        db1 = g_zh.sum(0).to(b1.dtype)
        dlam = (g_zh @ E1).to(lam.dtype)
    return dx, dlam, dw1, dw2, de1, db1, de2, db2


_mimb_fwd_op.register_autograd(_mimb_backward, setup_context=_mimb_setup_context)

torch.library.define(
    "mipnet::mimb",
    "(Tensor x, Tensor lam, Tensor w1, Tensor w2, Tensor e1, Tensor b1, Tensor e2, Tensor b2) -> Tensor",
)


@torch.library.impl("mipnet::mimb", "CompositeImplicitAutograd")
def _mimb_composite(x, lam, w1, w2, e1, b1, e2, b2):
    return torch.ops.mipnet.mimb_fwd(x, lam, w1, w2, e1, b1, e2, b2)[0]


# --------------------------------------------------------------------------- mimb_instances
_INFERENCE_ONLY = (
    "mimb_instances is inference-only (no autograd): call it under torch.no_grad() or "
    "torch.inference_mode(), or pass detached tensors; to train, run mimb / mimb_scale once per "
    "instance"
)


def _instances_direct(x, w1, w2, table):
    """``mimb_instances`` below the custom-op layer: checks, then the dispatcher."""
    _check_instances_args(x, w1, w2, table)
    return _instances_branch(lambda *a: _backends.dispatch("mimb_instances", x.device, *a))(
        x, w1, w2, table
    )


@torch.library.custom_op("mipnet::mimb_instances", mutates_args=())
def _mimb_instances_op(x: Tensor, w1: Tensor, w2: Tensor, table: Tensor) -> Tensor:
    return _instances_direct(x, w1, w2, table)


@_mimb_instances_op.register_fake
def _(x, w1, w2, table):
    _check_instances_args(x, w1, w2, table)
    return _empty_like_x(x, x.shape[0] * table.shape[0])


def _no_grad_setup_context(ctx, inputs, output):
    pass


def _inference_only_backward(ctx, *grads):
    raise RuntimeError(_INFERENCE_ONLY)


_mimb_instances_op.register_autograd(_inference_only_backward, setup_context=_no_grad_setup_context)


# --------------------------------------------------------------------------- grouped
@torch.library.custom_op("mipnet::mimb_scale_grouped_fwd", mutates_args=())
def _mimb_scale_grouped_fwd_op(
    xs: list[Tensor], w1s: list[Tensor], w2s: list[Tensor], vs: list[Tensor]
) -> tuple[list[Tensor], list[Tensor]]:
    _check_scale_grouped_args(xs, w1s, w2s, vs)
    ys, ss = _backends.dispatch(
        "mimb_scale_grouped_fwd", xs[0].device, [_dense(x) for x in xs], w1s, w2s, vs
    )
    return list(ys), list(ss)


@_mimb_scale_grouped_fwd_op.register_fake
def _(xs, w1s, w2s, vs):
    _check_scale_grouped_args(xs, w1s, w2s, vs)
    return (
        [_empty_like_x(x) for x in xs],
        [x.new_empty(x.shape[:2], dtype=compute_dtype(x)) for x in xs],
    )


@torch.library.custom_op("mipnet::mimb_scale_grouped_bwd", mutates_args=())
def _mimb_scale_grouped_bwd_op(
    dys: list[Tensor], xs: list[Tensor], w1s: list[Tensor], w2s: list[Tensor],
    vs: list[Tensor], ss: list[Tensor],
) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    _check_scale_grouped_bwd_args(dys, xs, w1s, w2s, vs, ss)
    out = _backends.dispatch(
        "mimb_scale_grouped_bwd", xs[0].device, dys, [_dense(x) for x in xs], w1s, w2s, vs, ss
    )
    return tuple(list(o) for o in out)


@_mimb_scale_grouped_bwd_op.register_fake
def _(dys, xs, w1s, w2s, vs, ss):
    _check_scale_grouped_bwd_args(dys, xs, w1s, w2s, vs, ss)
    cf = torch.contiguous_format
    return (
        [_empty_like_x(x) for x in xs],
        [torch.empty_like(w, memory_format=cf) for w in w1s],
        [torch.empty_like(w, memory_format=cf) for w in w2s],
        [torch.empty_like(v, memory_format=cf) for v in vs],
    )


def _grouped_setup_context(ctx, inputs, output):
    xs, w1s, w2s, vs = inputs
    _, ss = output
    ctx.n = len(xs)
    ctx.save_for_backward(*xs, *w1s, *w2s, *vs, *ss)
    ctx.mark_non_differentiable(*ss)
    ctx.backend = _forced_backend()


def _grouped_backward(ctx, dys, _dss):
    n = ctx.n
    saved = ctx.saved_tensors
    xs, w1s, w2s, vs, ss = (list(saved[i * n:(i + 1) * n]) for i in range(5))
    # An output that did not reach the loss has a None (or zero) gradient: pass zeros.
    dys = [torch.zeros_like(x) if dy is None else dy for dy, x in zip(dys, xs)]
    with _backends.use_backend(ctx.backend):
        dxs, dw1s, dw2s, dvs = torch.ops.mipnet.mimb_scale_grouped_bwd(dys, xs, w1s, w2s, vs, ss)
    return dxs, dw1s, dw2s, dvs


_mimb_scale_grouped_fwd_op.register_autograd(_grouped_backward, setup_context=_grouped_setup_context)

torch.library.define(
    "mipnet::mimb_scale_grouped",
    "(Tensor[] xs, Tensor[] w1s, Tensor[] w2s, Tensor[] vs) -> Tensor[]",
)


@torch.library.impl("mipnet::mimb_scale_grouped", "CompositeImplicitAutograd")
def _mimb_scale_grouped_composite(xs, w1s, w2s, vs):
    return torch.ops.mipnet.mimb_scale_grouped_fwd(xs, w1s, w2s, vs)[0]


@torch.library.custom_op("mipnet::mimb_instances_grouped", mutates_args=())
def _mimb_instances_grouped_op(
    xs: list[Tensor], w1s: list[Tensor], w2s: list[Tensor], tables: list[Tensor]
) -> list[Tensor]:
    _check_instances_grouped_args(xs, w1s, w2s, tables)
    return list(
        _backends.dispatch("mimb_instances_grouped", xs[0].device, [_dense(x) for x in xs], w1s, w2s, tables)
    )


@_mimb_instances_grouped_op.register_fake
def _(xs, w1s, w2s, tables):
    _check_instances_grouped_args(xs, w1s, w2s, tables)
    return [_empty_like_x(x, x.shape[0] * t.shape[0]) for x, t in zip(xs, tables)]


_mimb_instances_grouped_op.register_autograd(
    _inference_only_backward, setup_context=_no_grad_setup_context
)


# --------------------------------------------------------------------------- eager path
# The autograd of the custom ops above, as torch.autograd.Functions that the public
# functions call directly in plain eager mode (see _eager_plain): same forward, same saved
# tensors, same backward kernels, without the torch.library layers.
class _MimbScaleFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, w2, v):
        y, s = _dispatch_scale_fwd(x, w1, w2, v)
        _scale_setup_context(ctx, (x, w1, w2, v), (y, s))
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, w1, w2, v, s = ctx.saved_tensors
        with _backends.use_backend(ctx.backend):
            return _scale_bwd_direct(dy, x, w1, w2, v, s)


class _MimbFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lam, w1, w2, e1, b1, e2, b2):
        inputs = (x, lam, w1, w2, e1, b1, e2, b2)
        y, s = _dispatch_mimb_fwd(*inputs)
        _mimb_setup_context(ctx, inputs, (y, s))
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        return _mimb_backward(ctx, dy, None, _scale_bwd_direct)


def _records_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


# --------------------------------------------------------------------------- public API
_mimb_scale_fwd_default = torch.ops.mipnet.mimb_scale_fwd.default
_mimb_fwd_default = torch.ops.mipnet.mimb_fwd.default
_mimb_instances_default = torch.ops.mipnet.mimb_instances.default

def _check_no_grad(*tensors: Tensor) -> None:
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise RuntimeError(_INFERENCE_ONLY)


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
    if _eager_plain(x, w1, w2, v):
        _check_scale_args(x, w1, w2, v)
        if _records_grad(x, w1, w2, v):
            return _MimbScaleFn.apply(x, w1, w2, v)
        return _dispatch_scale_fwd(x, w1, w2, v)[0]
    # Validated once, in the op; mimb_scale is mimb_scale_fwd(...)[0] (saves the composite hop).
    return _mimb_scale_fwd_default(x, w1, w2, v)[0]


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
    args = (x, lam, w1, w2, e1, b1, e2, b2)
    if _eager_plain(*args):
        _check_mimb_args(*args)
        if _records_grad(*args):
            return _MimbFn.apply(*args)
        return _dispatch_mimb_fwd(*args)[0]
    # Validated once, in the op; mimb is mimb_fwd(...)[0] (saves the composite hop).
    return _mimb_fwd_default(*args)[0]


def mimb_instances(x: Tensor, w1: Tensor, w2: Tensor, table: Tensor) -> Tensor:
    """All N instances of the block from one read of ``x`` (inference only).

    Args:
        x: ``[B, C, H, W]`` (as in :func:`mimb_scale`).
        w1, w2: the squeeze-excite weights ``[C/r, C]``, ``[C, C/r]``.
        table: ``[N, C]`` the per-instance embedding (``v`` of each one-hot selector).

    Returns:
        ``y [N*B, C, H, W]``, instance-major: ``y[n*B + b] = x[b] * (e[b] * table[n])``, in
        ``x``'s dtype and memory format.

    Not differentiable: raises ``RuntimeError`` when grad mode is on and an input requires
    grad (run it under ``torch.no_grad()`` / ``torch.inference_mode()``).  Calling
    ``torch.ops.mipnet.mimb_instances`` directly on such inputs raises the same error in
    backward.
    """
    if torch.is_grad_enabled():  # else the op's own check is the only one needed
        _check_instances_args(x, w1, w2, table)
        _check_no_grad(x, w1, w2, table)
    if _eager_plain(x, w1, w2, table):
        return _instances_direct(x, w1, w2, table)
    return _mimb_instances_default(x, w1, w2, table)


def mimb_scale_grouped(xs: Sequence[Tensor], w1s: Sequence[Tensor], w2s: Sequence[Tensor],
                       vs: Sequence[Tensor]) -> list[Tensor]:
    """:func:`mimb_scale` on a list of branch tensors (HRNet: different C, H, W) in one op.

    Each branch ``i`` is ``mimb_scale(xs[i], w1s[i], w2s[i], vs[i])``; all tensors on one
    device.  Differentiable like :func:`mimb_scale`.
    """
    _check_scale_grouped_args(xs, w1s, w2s, vs)
    return list(torch.ops.mipnet.mimb_scale_grouped(list(xs), list(w1s), list(w2s), list(vs)))


def mimb_instances_grouped(xs: Sequence[Tensor], w1s: Sequence[Tensor], w2s: Sequence[Tensor],
                           tables: Sequence[Tensor]) -> list[Tensor]:
    """:func:`mimb_instances` on a list of branch tensors in one op (inference only)."""
    _check_instances_grouped_args(xs, w1s, w2s, tables)
    _check_no_grad(*xs, *w1s, *w2s, *tables)
    return list(torch.ops.mipnet.mimb_instances_grouped(list(xs), list(w1s), list(w2s), list(tables)))


def mimb_reference(x: Tensor, lam: Tensor, w1: Tensor, w2: Tensor, e1: Tensor, b1: Tensor,
                   e2: Tensor, b2: Tensor) -> Tensor:
    """Pure-PyTorch ``mimb`` (forward only, autograd through plain ops): the specification."""
    v = mimb_embedding_reference(lam, e1, b1, e2, b2, compute_dtype(x))
    return mimb_scale_fwd_reference(x, w1, w2, v)[0]


__all__ = [
    "KERNEL_DTYPES",
    "SUPPORTED_DTYPES",
    "compute_dtype",
    "mimb",
    "mimb_embedding_reference",
    "mimb_instances",
    "mimb_instances_grouped",
    "mimb_instances_reference",
    "mimb_reference",
    "mimb_scale",
    "mimb_scale_bwd_reference",
    "mimb_scale_fwd_reference",
    "mimb_scale_grouped",
    "out_memory_format",
]
