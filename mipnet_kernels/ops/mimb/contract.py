"""MIMB's contract in code: accepted dtypes, output layout, argument checks, and the
empty-input rules every backend relies on.

The contract itself (shapes, dtypes, layouts, non-finite values) is written in the public
functions' docstrings (:mod:`.api`) and ``csrc/schemas.h``; this module enforces it.  Each
``_check_*`` raises ``TypeError`` / ``ValueError`` naming the argument; the ``_fast_*``
predicates accept the common valid case with plain attribute reads before the full checks.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

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


def dense(x: Tensor) -> Tensor:
    """``x`` itself when contiguous or channels_last, else a contiguous copy."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return x
    return x.contiguous()


def empty_like_x(x: Tensor, batch: int | None = None) -> Tensor:
    B, C, H, W = x.shape
    return torch.empty(
        (B if batch is None else batch, C, H, W),
        dtype=x.dtype,
        device=x.device,
        memory_format=out_memory_format(x),
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
            and table.device == x.device and table.shape[-1] == x.shape[1]
            and (len(table.shape) == 2 or (len(table.shape) == 3 and table.shape[1] == x.shape[0]))):
        return
    xname = f"x{p}"
    _check_x(x, xname)
    _check_excite(x, w1, w2, p, xname)
    name = f"table{p}"
    _check_float(table, name)
    B, C = x.shape[:2]
    if not ((table.dim() == 2 and table.shape[1] == C)
            or (table.dim() == 3 and table.shape[1] == B and table.shape[2] == C)):
        raise ValueError(
            f"{name} must have shape [N, C] (one row per instance) or [N, B, C] (one row per "
            f"output sample) with B, C = {xname}.shape[:2] = {B}, {C}, got {list(table.shape)}"
        )
    _check_device(table, name, x, xname)


def _check_instances_bwd_args(dy, x, w1, w2, table, p: str = "") -> None:
    _check_instances_args(x, w1, w2, table, p)
    xname = f"x{p}"
    _check_tensor(dy, f"dy{p}")
    want = (x.shape[0] * table.shape[0], *x.shape[1:])
    if tuple(dy.shape) != want or dy.dtype != x.dtype:
        raise ValueError(
            f"dy{p} must have shape [N*B, C, H, W] = {list(want)} and {xname}'s dtype {x.dtype}, "
            f"got {list(dy.shape)} {dy.dtype}"
        )
    _check_device(dy, f"dy{p}", x, xname)


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


def _check_instances_grouped_bwd_args(dys, xs, w1s, w2s, tables) -> None:
    n = _check_grouped((xs, dys, w1s, w2s, tables), ("xs", "dys", "w1s", "w2s", "tables"))
    for i in range(n):
        _check_instances_bwd_args(dys[i], xs[i], w1s[i], w2s[i], tables[i], p=f"s[{i}]")


# ------------------------------------------------------- per-branch empty-input handling
# Backends see non-empty inputs only; the public ops answer empty ones themselves.
def _scale_fwd_branch(kernel):
    def run(x, w1, w2, v):
        x = dense(x)
        if x.numel() == 0:
            return empty_like_x(x), x.new_zeros(x.shape[:2], dtype=compute_dtype(x))
        return kernel(x, w1, w2, v)

    return run


def _scale_bwd_branch(kernel):
    def run(dy, x, w1, w2, v, s):
        x = dense(x)
        if x.numel() == 0:
            return (
                empty_like_x(x),
                torch.zeros_like(w1, memory_format=torch.contiguous_format),
                torch.zeros_like(w2, memory_format=torch.contiguous_format),
                torch.zeros_like(v, memory_format=torch.contiguous_format),
            )
        return kernel(dy, x, w1, w2, v, s)

    return run


def _instances_branch(kernel):
    def run(x, w1, w2, table):
        x = dense(x)
        if x.numel() == 0 or table.shape[0] == 0:
            return empty_like_x(x, x.shape[0] * table.shape[0])
        return kernel(x, w1, w2, table)

    return run


def _check_train_args(x, lam, w1, w2, e1, b1, gamma, beta, e2, b2, running_mean, running_var,
                      batch_norm: bool) -> None:
    """The training step's operands (:func:`~mipnet_kernels.ops.mimb.mimb_train`)."""
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
