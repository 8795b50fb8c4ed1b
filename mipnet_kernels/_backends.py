"""Which backend runs an op: ``cuda | triton | cpu | reference``.

Every public op is one ``torch.library.custom_op`` whose implementation calls
:func:`dispatch`.  Each backend registers an implementation per op together with a
function that lists the reasons it cannot run given inputs (the xformers
``not_supported_reasons`` pattern).  The backend is chosen, most specific first, by

1. :func:`use_backend` (a context manager, per thread / task),
2. :func:`set_backend` (process-wide),
3. the environment variable ``MIPNET_KERNELS_BACKEND``,
4. automatically: the first backend, in the op's order for the input's device, that
   has no reasons against the inputs (CUDA tensors: cuda, triton, reference;
   CPU tensors: cpu, reference).

A backend chosen explicitly (1-3) that cannot run the inputs raises a
``RuntimeError`` with its reasons; it never falls back silently.  ``"auto"`` (or
``None``) restores the automatic choice; ``use_backend("auto")`` forces it inside a block.

Profiling: while a ``torch.profiler`` (or any autograd profiler) is recording, every
dispatched call is wrapped in ``record_function("mipnet::<op>[<backend>]")``, so traces
name the op and the backend that ran it; with ``MIPNET_KERNELS_NVTX=1`` (read at import)
calls on CUDA tensors are also NVTX ranges of the same name (for Nsight Systems).  When
neither is on, the cost is one C call per dispatch (~0.1 µs on CPU).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from . import _extension

BACKENDS = ("cuda", "triton", "cpu", "reference")
ENV_VAR = "MIPNET_KERNELS_BACKEND"
NVTX_ENV_VAR = "MIPNET_KERNELS_NVTX"

#: Default automatic order per device type; an op may register its own.
DEFAULT_AUTO_ORDER = {
    "cuda": ("cuda", "triton", "reference"),
    "cpu": ("cpu", "reference"),
}


# --------------------------------------------------------------------------- backends
def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # pragma: no cover - broken installs only
        return f"triton failed to import: {exc}"
    return None


def backend_unavailable_reason(name: str) -> str | None:
    """Why backend ``name`` cannot run anything in this process (None: it can)."""
    if name == "reference":
        return None
    if name == "cpu":
        ok, why = _extension.cpu_extension()
        return None if ok else why
    if name == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device (torch.cuda.is_available() is False)"
        ok, why = _extension.cuda_extension()
        return None if ok else why
    if name == "triton":
        why = _triton_import_error()
        if why is not None:
            return why
        if not torch.cuda.is_available() and not _triton_interpret():
            return "no CUDA device (set TRITON_INTERPRET=1 before importing triton to run on CPU)"
        return None
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")


def device_unsupported_reason(name: str, device: torch.device) -> str | None:
    """Why backend ``name`` cannot run tensors on ``device`` (None: it can)."""
    if name == "reference":
        return None
    if name == "cpu" and device.type != "cpu":
        return f"the cpu backend runs CPU tensors, got {device.type} tensors"
    if name == "cuda" and device.type != "cuda":
        return f"the cuda backend runs CUDA tensors, got {device.type} tensors"
    if name == "triton":
        if device.type == "cpu" and not _triton_interpret():
            return "triton runs CPU tensors only under TRITON_INTERPRET=1"
        if device.type not in ("cpu", "cuda"):
            return f"triton does not run {device.type} tensors"
    return None


def available_backends() -> dict[str, dict[str, Any]]:
    """Per backend: ``{"available": bool, "reason": str | None}`` in this process."""
    out = {}
    for name in BACKENDS:
        why = backend_unavailable_reason(name)
        out[name] = {"available": why is None, "reason": why}
    return out


# --------------------------------------------------------------------------- selection
_AUTO = "auto"  # use_backend("auto"/None): automatic choice, whatever the setter/env say
_context_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "mipnet_kernels_backend", default=None
)
_global_backend: str | None = None


def _normalise(name: str | None, what: str) -> str | None:
    if name is None or name == "auto":
        return None
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"{what} must be one of {BACKENDS} or 'auto', got {name!r}")
    return name


def set_backend(name: str | None) -> None:
    """Force backend ``name`` for every op in this process (``None``/``"auto"``: automatic)."""
    global _global_backend
    _global_backend = _normalise(name, "backend")


def get_backend() -> str | None:
    """The backend forced right now (context, setter, then env var), or None for automatic."""
    name = _context_backend.get()
    if name == _AUTO:
        return None
    if name is not None:
        return name
    if _global_backend is not None:
        return _global_backend
    env = os.environ.get(ENV_VAR, "")
    if env:
        return _normalise(env, f"environment variable {ENV_VAR}")
    return None


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Run the ops inside the ``with`` block on backend ``name``.

    ``"auto"`` forces the automatic choice inside the block (overriding :func:`set_backend`
    and the environment variable); ``None`` leaves the outer choice in force.

    >>> with mipnet_kernels.use_backend("triton"):
    ...     coords, scores = mipnet_kernels.decode_heatmaps(hm)
    """
    token = _context_backend.set(_AUTO if name == _AUTO else _normalise(name, "backend"))
    try:
        yield
    finally:
        _context_backend.reset(token)


# --------------------------------------------------------------------------- registry
@dataclass
class _Impl:
    fn: Callable[..., Any]
    reasons: Callable[..., list[str]] | None


@dataclass
class _Op:
    name: str
    impls: dict[str, _Impl] = field(default_factory=dict)
    auto_order: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(DEFAULT_AUTO_ORDER))
    example_inputs: Callable[[torch.device], tuple] | None = None


_OPS: dict[str, _Op] = {}


def define_op(
    name: str,
    *,
    example_inputs: Callable[[torch.device], tuple] | None = None,
    auto_order: dict[str, tuple[str, ...]] | None = None,
) -> None:
    """Declare a dispatchable op.  ``example_inputs(device)`` feeds ``mipnet_kernels.info``."""
    op = _OPS.setdefault(name, _Op(name))
    if example_inputs is not None:
        op.example_inputs = example_inputs
    if auto_order is not None:
        op.auto_order.update(auto_order)


def register(op: str, backend: str, *, reasons: Callable[..., list[str]] | None = None):
    """Decorator: ``fn`` implements ``op`` on ``backend``.

    ``reasons(*args)`` returns why this implementation cannot run these inputs
    (device support and backend availability are checked separately).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}")

    def deco(fn):
        _OPS.setdefault(op, _Op(op)).impls[backend] = _Impl(fn, reasons)
        return fn

    return deco


def not_supported_reasons(op: str, backend: str, device: torch.device, *args) -> list[str]:
    """Every reason ``backend`` cannot run ``op`` on these inputs (empty: it can)."""
    entry = _OPS[op]
    impl = entry.impls.get(backend)
    if impl is None:
        return [f"{op} has no {backend} implementation"]
    why = backend_unavailable_reason(backend)
    if why is not None:
        return [why]
    why = device_unsupported_reason(backend, device)
    if why is not None:
        return [why]
    return list(impl.reasons(*args)) if impl.reasons is not None else []


def select(op: str, device: torch.device, *args) -> tuple[str, dict[str, list[str]]]:
    """The backend that would run ``op`` on these inputs, and the reasons against the others."""
    forced = get_backend()
    if forced is not None:
        reasons = not_supported_reasons(op, forced, device, *args)
        if reasons:
            raise RuntimeError(
                f"mipnet_kernels: backend '{forced}' was requested but cannot run {op}: "
                + "; ".join(reasons)
            )
        return forced, {}
    skipped: dict[str, list[str]] = {}
    order = _OPS[op].auto_order.get(device.type, ("reference",))
    for name in order:
        reasons = not_supported_reasons(op, name, device, *args)
        if not reasons:
            return name, skipped
        skipped[name] = reasons
    raise RuntimeError(
        f"mipnet_kernels: no backend can run {op} on {device}: "
        + "; ".join(f"{k}: {', '.join(v)}" for k, v in skipped.items())
    )


# --------------------------------------------------------------------------- profiling
#: True while any autograd/kineto profiler records (covers torch.profiler and emit_nvtx).
_profiler_enabled = torch._C._autograd._profiler_enabled
_NVTX = os.environ.get(NVTX_ENV_VAR, "") not in ("", "0")


@contextlib.contextmanager
def _profiled(label: str, device: torch.device) -> Iterator[None]:
    """``label`` as a profiler event (when one records) and an NVTX range (when requested)."""
    nvtx = _NVTX and device.type == "cuda"
    with contextlib.ExitStack() as stack:
        if _profiler_enabled():
            stack.enter_context(torch.profiler.record_function(label))
        if nvtx:
            stack.enter_context(torch.cuda.nvtx.range(label))
        yield


def _run(op: str, name: str, device: torch.device, args: tuple):
    fn = _OPS[op].impls[name].fn
    if not (_NVTX or _profiler_enabled()):
        return fn(*args)
    with _profiled(f"mipnet::{op}[{name}]", device):
        return fn(*args)


def dispatch(op: str, device: torch.device, *args):
    """Run ``op`` on the selected backend (a named range when profiling, see the module doc)."""
    name, _ = select(op, device, *args)
    return _run(op, name, device, args)


def dispatch_named(op: str, device: torch.device, *args) -> tuple[str, Any]:
    """:func:`dispatch`, also returning the name of the backend that ran."""
    name, _ = select(op, device, *args)
    return name, _run(op, name, device, args)


def dispatch_on(name: str, op: str, device: torch.device, *args):
    """Run ``op`` on backend ``name`` (e.g. a backward on its forward's backend, whatever
    the thread's choice is now); a ``RuntimeError`` with the reasons when it cannot."""
    reasons = not_supported_reasons(op, name, device, *args)
    if reasons:
        raise RuntimeError(
            f"mipnet_kernels: backend '{name}' ran the forward but cannot run {op}: "
            + "; ".join(reasons)
        )
    return _run(op, name, device, args)


def ops() -> dict[str, _Op]:
    return dict(_OPS)
