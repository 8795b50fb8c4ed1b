"""Backends, declared once, and the kernel table of every op: which backend runs an op.

A backend (``cuda | triton | cpu | reference``) is one :class:`Backend` declaration in
:data:`DECLARATIONS` -- the device types it runs, the floating dtypes its kernels take, its
limits, how its kernels are reached and a probe saying why it cannot run in this process --
in the manner of xformers' per-backend classes.  An op is one :class:`KernelTable`: a row
``backend -> Kernel``.  Every reason a backend gives against inputs is derived from these
two, in this order (the first that applies is reported):

1. the backend is unavailable in this process (its probe: extension not built, no GPU, ...);
2. it does not run tensors of this device type (``devices``);
3. the op has no kernel in its column, or the kernel's compiled op / launcher is missing
   (``Kernel.symbol``, resolved by the backend's ``resolve``);
4. a tensor argument has a dtype the kernel does not take (``dtypes``, per argument named
   in the table's ``tensor_args``; lists of tensors are checked per branch);
5. op-specific reasons, the only hand-written ones (``Kernel.reasons``).

The backend is chosen, most specific first, by

1. :func:`use_backend` (a context manager, per thread / task),
2. :func:`set_backend` (process-wide),
3. the environment variable ``MIPNET_KERNELS_BACKEND``,
4. automatically: the first backend, in :data:`BACKENDS` order, that declares the input's
   device type in ``auto`` and has no reasons against the inputs (CUDA tensors: cuda,
   triton, reference; CPU tensors: cpu, reference).

A backend chosen explicitly (1-3) that cannot run the inputs raises a ``RuntimeError`` with
its reasons; it never falls back silently.  ``"auto"`` (or ``None``) restores the automatic
choice; ``use_backend("auto")`` forces it inside a block.  :func:`backends_for` tells the
caller, for given inputs, which backends can run an op and why the others cannot.

Profiling: while a ``torch.profiler`` (or any autograd profiler) records, every dispatched
call is wrapped in ``record_function("mipnet::<op>[<backend>]")``, so traces name the op
and the backend that ran it; with ``MIPNET_KERNELS_NVTX=1`` (read at import) calls on CUDA
tensors are also NVTX ranges of the same name (for Nsight Systems).  PyTorch has no public
"is a profiler recording" query: the check reads the Python flag that ``torch.profiler`` /
``torch.autograd.profiler`` set on entry and exit (``torch.autograd.profiler._is_profiler_enabled``,
the flag torch's own dynamo and inductor read for the same purpose), with a getattr default
so a torch without it only loses the labels.  When neither is on the cost is one attribute
read per dispatch.

Adding a backend: one declaration here (a :class:`Backend` in :data:`DECLARATIONS`, in the
automatic order's place), the module(s) holding its kernels, and one column (a ``Kernel``
entry) in each op's table that it implements; docs/ops.md lists the steps.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.autograd.profiler as _autograd_profiler
from torch import Tensor

from ._extension import BUILD_COMMAND, cpu_extension, cuda_extension, missing_kernel

ENV_VAR = "MIPNET_KERNELS_BACKEND"
NVTX_ENV_VAR = "MIPNET_KERNELS_NVTX"

_F32_F16_BF16 = (torch.float32, torch.float16, torch.bfloat16)
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                torch.float64: "float64"}


# --------------------------------------------------------------------------- declarations
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


def _probe_reference() -> str | None:
    return None


def _probe_cpu() -> str | None:
    ok, why = cpu_extension()
    return None if ok else why


def _probe_cuda() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    ok, why = cuda_extension()
    return None if ok else why


def _probe_triton() -> str | None:
    why = _triton_import_error()
    if why is not None:
        return why
    if not torch.cuda.is_available() and not _triton_interpret():
        return "no CUDA device (set TRITON_INTERPRET=1 before importing triton to run on CPU)"
    return None


def _triton_on_cpu() -> str | None:
    return None if _triton_interpret() else "triton runs CPU tensors only under TRITON_INTERPRET=1"


def _resolve_compiled(namespace: str, symbol: str) -> tuple[Callable | None, str | None]:
    """``torch.ops.<namespace>.<symbol>``, or why it is missing ("not built")."""
    why = missing_kernel(namespace, symbol)
    if why:
        return None, why[0]
    # the overload itself: a call skips the overload packet's Python layer
    return getattr(getattr(torch.ops, namespace), symbol).default, None


def _resolve_triton(symbol: str) -> tuple[Callable | None, str | None]:
    """The launcher ``symbol`` of :mod:`mipnet_kernels.triton` (the one way launchers are
    reached: the package's lazy table names the module that holds it)."""
    from .triton import launcher_module  # imports no triton: the package loads modules lazily

    module = launcher_module(symbol)
    if module is None:
        return None, f"mipnet_kernels.triton has no launcher {symbol}"
    if importlib.util.find_spec(module) is None:
        return None, f"{module} is missing from this installation (no {symbol})"
    fn = getattr(importlib.import_module(module), symbol, None)
    if fn is None:
        return None, f"{module} has no {symbol}"
    return fn, None


@dataclass(frozen=True)
class Backend:
    """One backend: what it runs and how its kernels are reached.

    ``devices`` maps each device type it runs to ``None`` or a probe giving why it cannot
    right now (Triton runs CPU tensors only under the interpreter); ``auto`` are the device
    types where the automatic choice considers it.  ``dtypes``: the floating dtypes its
    kernels take (``None``: any; a kernel may declare its own).  ``limits``: sizes its
    kernels cannot exceed, named, for the op-specific reasons to quote.  ``resolve(symbol)``
    returns ``(callable, None)`` or ``(None, reason)`` for a kernel named by symbol.
    """

    name: str
    summary: str
    probe: Callable[[], str | None]
    devices: Mapping[str, Callable[[], str | None] | None] | None  # None: every device type
    auto: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...] | None = None
    limits: Mapping[str, int] = field(default_factory=dict)
    resolve: Callable[[str], tuple[Callable | None, str | None]] | None = None

    def unavailable_reason(self) -> str | None:
        """Why this backend cannot run anything in this process (None: it can)."""
        return self.probe()

    def device_reason(self, device: torch.device) -> str | None:
        """Why this backend cannot run tensors on ``device`` (None: it can)."""
        if self.devices is None:
            return None
        rule = self.devices.get(device.type, _NOT_RUN)
        if rule is None:
            return None
        if rule is _NOT_RUN:
            return f"the {self.name} backend runs {_device_names(self.devices)} tensors, got {device.type} tensors"
        return rule()


_NOT_RUN = object()


def _device_names(devices) -> str:
    names = [("CUDA" if d == "cuda" else d.upper()) for d in devices]
    return " or ".join(names)


#: Every backend, in the automatic order (fastest first).  One entry per backend.
DECLARATIONS: tuple[Backend, ...] = (
    Backend(
        "cuda", "CUDA kernels of the compiled extension (torch.ops.mipnet_cuda)",
        probe=_probe_cuda, devices={"cuda": None}, auto=("cuda",), dtypes=_F32_F16_BF16,
        limits={"sample_elems": 2**30},  # int32 offsets inside one sample
        resolve=functools.partial(_resolve_compiled, "mipnet_cuda"),
    ),
    Backend(
        "triton", "Triton kernels (mipnet_kernels/triton)",
        probe=_probe_triton, devices={"cuda": None, "cpu": _triton_on_cpu}, auto=("cuda",),
        dtypes=_F32_F16_BF16 + (torch.float64,), resolve=_resolve_triton,
    ),
    Backend(
        "cpu", "C++ kernels of the compiled extension (torch.ops.mipnet_cpu)",
        probe=_probe_cpu, devices={"cpu": None}, auto=("cpu",), dtypes=_F32_F16_BF16,
        resolve=functools.partial(_resolve_compiled, "mipnet_cpu"),
    ),
    Backend(
        "reference", "pure PyTorch, the specification of every kernel",
        probe=_probe_reference, devices=None, auto=("cuda", "cpu"),
    ),
)

BACKEND = {b.name: b for b in DECLARATIONS}
BACKENDS = tuple(BACKEND)


def _backend(name: str) -> Backend:
    try:
        return BACKEND[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}") from None


@functools.lru_cache(maxsize=None)
def auto_order(device_type: str) -> tuple[str, ...]:
    """The backends the automatic choice tries for tensors of ``device_type``, in order."""
    order = tuple(b.name for b in DECLARATIONS if device_type in b.auto)
    return order or ("reference",)


def backend_unavailable_reason(name: str) -> str | None:
    """Why backend ``name`` cannot run anything in this process (None: it can)."""
    return _backend(name).unavailable_reason()


def device_unsupported_reason(name: str, device: torch.device) -> str | None:
    """Why backend ``name`` cannot run tensors on ``device`` (None: it can)."""
    return _backend(name).device_reason(device)


def available_backends() -> dict[str, dict[str, Any]]:
    """Per backend: ``{"available": bool, "reason": str | None}`` in this process."""
    out = {}
    for b in DECLARATIONS:
        why = b.unavailable_reason()
        out[b.name] = {"available": why is None, "reason": why}
    return out


# --------------------------------------------------------------------------- kernel tables
@dataclass(frozen=True)
class Kernel:
    """One cell of a kernel table: how ``backend`` runs the op.

    Either ``fn`` (a Python kernel taking the op's kernel arguments) or ``symbol`` (a
    compiled op / Triton launcher, reached through the backend's ``resolve``; ``adapt``
    turns the op's kernel arguments into the symbol's, ``finish`` its result into the op's).
    ``dtypes`` overrides the backend's; ``reasons(*args)`` adds op-specific reasons.
    """

    fn: Callable[..., Any] | None = None
    symbol: str | None = None
    adapt: Callable[..., tuple] | None = None
    finish: Callable[[Any], Any] | None = None
    dtypes: tuple[torch.dtype, ...] | None = None
    reasons: Callable[..., list[str]] | None = None


class _Forgetting(dict):
    """A dict that calls ``on_change()`` after every change (a kernel table's columns and
    resolved kernels: the remembered automatic choices depend on them)."""

    def __init__(self, on_change: Callable[[], None], *args, **kw):
        super().__init__(*args, **kw)
        self._on_change = on_change

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self._on_change()

    def __delitem__(self, key):
        super().__delitem__(key)
        self._on_change()

    def pop(self, *args):
        out = super().pop(*args)
        self._on_change()
        return out

    def popitem(self):
        out = super().popitem()
        self._on_change()
        return out

    def clear(self):
        super().clear()
        self._on_change()

    def update(self, *args, **kw):
        super().update(*args, **kw)
        self._on_change()

    def setdefault(self, key, default=None):
        out = super().setdefault(key, default)
        self._on_change()
        return out


@dataclass
class KernelTable:
    """The kernels of one op, one per backend, and what is needed to derive reasons.

    ``tensor_args``: the names of the positional kernel arguments whose dtypes the kernels
    take as they are (checked against the kernel's / backend's dtypes; the others, e.g. an
    affine matrix converted to float32 first, are not).  ``example_inputs(device)`` feeds
    ``python -m mipnet_kernels.info``.
    """

    name: str
    args: tuple[str, ...]
    tensor_args: tuple[str, ...] = ()
    kernels: dict[str, Kernel] = field(default_factory=dict)
    example_inputs: Callable[[torch.device], tuple] | None = None
    _resolved: dict[str, Callable] = field(default_factory=dict, repr=False)
    # The automatic choice per (device type, dtypes of the tensor arguments), where no
    # faster backend was ruled out by an op-specific (input-dependent) reason: see _choose.
    _auto: dict[tuple, str] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        unknown = set(self.tensor_args) - set(self.args)
        if unknown:
            raise ValueError(f"{self.name}: tensor_args {sorted(unknown)} are not among args {self.args}")
        self._tensor_pos = tuple((self.args.index(n), n) for n in self.tensor_args)
        # Any change to a column or to a resolved kernel (a test's monkeypatch included,
        # and its undo) forgets the remembered choices.
        self.kernels = _Forgetting(self._auto.clear, self.kernels)
        self._resolved = _Forgetting(self._auto.clear, self._resolved)

    # the column of each backend -------------------------------------------------------
    def kernel(self, backend: str, kernel: Kernel | Callable | None = None, **kw):
        """Put ``kernel`` (a :class:`Kernel`, or a Python function, or ``Kernel(**kw)``)
        into ``backend``'s column; as a decorator when neither is given."""
        _backend(backend)

        def put(k):
            self.kernels[backend] = k if isinstance(k, Kernel) else Kernel(fn=k, **kw)
            self._resolved.pop(backend, None)
            return k

        if kernel is None and not kw:
            return put
        return put(kernel if kernel is not None else Kernel(**kw))

    def callable(self, backend: str) -> tuple[Callable | None, str | None]:
        """``backend``'s kernel as one callable taking the op's kernel arguments, or the
        reason there is none (cached once resolved: ops are never unregistered)."""
        fn = self._resolved.get(backend)
        if fn is not None:
            return fn, None
        k = self.kernels.get(backend)
        if k is None:
            return None, f"{self.name} has no {backend} implementation"
        if k.fn is not None:
            fn = k.fn
        elif BACKEND[backend].resolve is None:
            return None, f"the {backend} backend runs Python kernels only (fn=), not symbol {k.symbol!r}"
        else:
            fn, why = BACKEND[backend].resolve(k.symbol)
            if fn is None:
                return None, why
        if k.adapt is not None or k.finish is not None:
            fn = _adapted(fn, k.adapt, k.finish)
        self._resolved[backend] = fn
        return fn, None

    # reasons ----------------------------------------------------------------------------
    def reasons(self, backend: str, device: torch.device, *args) -> list[str]:
        """Every reason ``backend`` cannot run this op on these kernel arguments (empty: it
        can), derived from the declarations as listed in the module docstring."""
        return self._reasons(backend, device, args)[0]

    def _reasons(self, backend: str, device: torch.device, args: tuple) -> tuple[list[str], bool]:
        """:meth:`reasons`, and whether they follow from the device type and the tensor
        arguments' dtypes alone (rules 1-4), so hold for any inputs with those."""
        b = BACKEND.get(backend) or _backend(backend)
        why = b.probe() or b.device_reason(device)
        if why is not None:
            return [why], True
        if backend not in self._resolved:
            fn, why = self.callable(backend)
            if fn is None:
                return [why], True
        if not args:  # only "can it run at all" (info, selftest)
            return [], True
        k = self.kernels[backend]
        dtypes = k.dtypes if k.dtypes is not None else b.dtypes
        if dtypes is not None:
            out = _dtype_reasons(backend, dtypes, self._tensor_pos, args)
            if out:
                return out, True
        if k.reasons is None:
            return [], True
        return list(k.reasons(*args)), False

    def _dtype_key(self, args: tuple) -> tuple:
        """The dtypes of the tensor arguments (per branch for lists): with the device type,
        all that rules 1-4 depend on."""
        key = []
        for i, _ in self._tensor_pos:
            a = args[i]
            if isinstance(a, Tensor):
                key.append(a.dtype)
            elif isinstance(a, (list, tuple)):
                key.append(tuple(t.dtype if isinstance(t, Tensor) else None for t in a))
            else:
                key.append(None)
        return tuple(key)


def _adapted(fn, adapt, finish):
    if finish is None:
        return lambda *args: fn(*adapt(*args))
    if adapt is None:
        return lambda *args: finish(fn(*args))
    return lambda *args: finish(fn(*adapt(*args)))


def _dtype_reasons(backend: str, dtypes: tuple, positions: tuple, args: tuple) -> list[str]:
    """"``x`` is float64; the cpu kernels take ..." for each tensor argument (each branch of
    a list) whose dtype ``dtypes`` lacks; the backends that do take it are named."""
    bad = []
    for i, name in positions:
        a = args[i]
        if isinstance(a, Tensor):
            if a.dtype not in dtypes:
                bad.append((name, a.dtype))
        elif isinstance(a, (list, tuple)):
            bad += [(f"branch {j}: {name}", t.dtype) for j, t in enumerate(a)
                    if isinstance(t, Tensor) and t.dtype not in dtypes]
    if not bad:
        return []
    takes = ", ".join(_DTYPE_NAMES.get(d, str(d)) for d in dtypes)
    out = []
    for name, dt in bad:
        others = [b.name for b in DECLARATIONS if b.name != backend and (b.dtypes is None or dt in b.dtypes)]
        out.append(f"{name} is {dt}; the {backend} kernels take {takes} "
                   f"({_DTYPE_NAMES.get(dt, str(dt))} runs on the {' and '.join(others)} backends)")
    return out


_TABLES: dict[str, KernelTable] = {}


def define_kernels(name: str, args: Sequence[str], *, tensor_args: Sequence[str] = (),
                   example_inputs: Callable[[torch.device], tuple] | None = None,
                   **columns: Kernel | Callable) -> KernelTable:
    """Declare the kernel table of op ``name``: ``args`` are the kernel arguments' names
    (what :func:`dispatch` passes), ``columns`` one kernel per backend (more may be added
    with :meth:`KernelTable.kernel`)."""
    if name in _TABLES:
        raise ValueError(f"op {name!r} already has a kernel table")
    table = KernelTable(name, tuple(args), tuple(tensor_args), example_inputs=example_inputs)
    for backend, k in columns.items():
        table.kernel(backend, k)
    _TABLES[name] = table
    return table


def table(op: str) -> KernelTable:
    """The kernel table of ``op`` (a ``ValueError`` naming the known ops otherwise)."""
    try:
        return _TABLES[op]
    except KeyError:
        raise ValueError(f"unknown op {op!r}; known: {sorted(_TABLES)}") from None


def tables() -> dict[str, KernelTable]:
    """Every kernel table, by op name."""
    return dict(_TABLES)


# --------------------------------------------------------------------------- selection
_AUTO = "auto"  # use_backend("auto"/None): automatic choice, whatever the setter/env say
_context_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "mipnet_kernels_backend", default=None
)
_global_backend: str | None = None


def _normalise(name: str | None, what: str) -> str | None:
    if name is None or name == "auto":
        return None
    if not isinstance(name, str) or name not in BACKEND:
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


def not_supported_reasons(op: str, backend: str, device: torch.device, *args) -> list[str]:
    """Every reason ``backend`` cannot run ``op`` on these kernel arguments (empty: it can;
    no arguments: whether it can run ``op`` at all on ``device``)."""
    return table(op).reasons(backend, device, *args)


def backends_for(op: str, device: torch.device, *args) -> dict[str, list[str]]:
    """Every backend, in the automatic order, mapped to the reasons it cannot run ``op`` on
    these kernel arguments on ``device`` (an empty list: it can).  With no arguments: which
    backends can run ``op`` at all on ``device``.

    >>> mipnet_kernels.backends_for("decode_heatmaps", hm.device, hm, "dark", None, 11)
    {'cuda': ['the cuda backend runs CUDA tensors, got cpu tensors'], 'triton': [...],
     'cpu': [], 'reference': []}
    """
    t = table(op)
    return {name: t.reasons(name, torch.device(device), *args) for name in BACKENDS}


def preferred_backend(device: torch.device) -> str | None:
    """The backend an op on ``device`` tries first now: the forced one, else the first of
    the automatic order that is available and runs ``device`` (None: none is)."""
    forced = get_backend()
    if forced is not None:
        return forced
    for name in auto_order(device.type):
        b = BACKEND[name]
        if b.unavailable_reason() is None and b.device_reason(device) is None:
            return name
    return None


def kernel(op: str, backend: str) -> Callable:
    """``backend``'s kernel of ``op`` as a callable taking the kernel arguments (no checks:
    ask :func:`backends_for` / :func:`not_supported_reasons` first)."""
    fn, why = table(op).callable(backend)
    if fn is None:
        raise RuntimeError(f"mipnet_kernels: backend '{backend}' cannot run {op}: {why}")
    return fn


def select(op: str, device: torch.device, *args) -> tuple[str, dict[str, list[str]]]:
    """The backend that would run ``op`` on these kernel arguments, and the reasons against
    the faster ones it skipped."""
    t = table(op)
    forced = get_backend()
    if forced is not None:
        reasons = t.reasons(forced, device, *args)
        if reasons:
            raise RuntimeError(
                f"mipnet_kernels: backend '{forced}' was requested but cannot run {op}: "
                + "; ".join(reasons)
            )
        return forced, {}
    skipped: dict[str, list[str]] = {}
    for name in auto_order(device.type):
        reasons = t.reasons(name, device, *args)
        if not reasons:
            return name, skipped
        skipped[name] = reasons
    raise RuntimeError(
        f"mipnet_kernels: no backend can run {op} on {device}: "
        + "; ".join(f"{k}: {', '.join(v)}" for k, v in skipped.items())
    )


# --------------------------------------------------------------------------- running
_NVTX = os.environ.get(NVTX_ENV_VAR, "") not in ("", "0")


def _profiling() -> bool:
    """True while a torch.profiler / autograd profiler records (see the module docstring)."""
    return getattr(_autograd_profiler, "_is_profiler_enabled", False)


@contextlib.contextmanager
def _profiled(label: str, device: torch.device) -> Iterator[None]:
    """``label`` as a profiler event (when one records) and an NVTX range (when requested)."""
    nvtx = _NVTX and device.type == "cuda"
    with contextlib.ExitStack() as stack:
        if _profiling():
            stack.enter_context(torch.profiler.record_function(label))
        if nvtx:
            stack.enter_context(torch.cuda.nvtx.range(label))
        yield


def _run(t: KernelTable, name: str, device: torch.device, args: tuple):
    fn = t._resolved[name]  # resolved by the reasons that chose it
    if not (_NVTX or _profiling()):
        return fn(*args)
    with _profiled(f"mipnet::{t.name}[{name}]", device):
        return fn(*args)


def _choose(op: str, device: torch.device, args: tuple) -> str:
    """The backend :func:`select` picks, for :func:`dispatch`.

    The automatic choice is remembered per (op, device type, dtypes of the tensor
    arguments) when every faster backend was ruled out by rules 1-4 of the module docstring
    alone, which depend on nothing else (backends are probed once per process in practice,
    and any change to a table's columns or resolved kernels forgets its choices).  A later
    call with that key re-checks only the chosen kernel's op-specific reasons, and takes the
    full selection if they object.  The saving is per call: on a cold cache (after a large
    kernel has streamed through it) the full selection cost ~10-30 us (issue 12's
    measurements, docs/ops.md)."""
    t = _TABLES.get(op) or table(op)
    if get_backend() is None:
        key = (device.type, t._dtype_key(args))
        name = t._auto.get(key)
        if name is not None:
            k = t.kernels[name]
            if k.reasons is None or not k.reasons(*args):
                return name
        name, cacheable = _auto_select(t, device, args)
        if cacheable:
            t._auto[key] = name
        return name
    return select(op, device, *args)[0]


def _auto_select(t: KernelTable, device: torch.device, args: tuple) -> tuple[str, bool]:
    """The automatic choice (as :func:`select`), and whether it may be remembered."""
    cacheable = True
    for name in auto_order(device.type):
        reasons, static = t._reasons(name, device, args)
        if not reasons:
            return name, cacheable
        cacheable = cacheable and static
    return select(t.name, device, *args)[0], False  # raises with every backend's reasons


def dispatch(op: str, device: torch.device, *args):
    """Run ``op`` on the selected backend (a named range when profiling, see the module doc)."""
    return _run(_TABLES[op], _choose(op, device, args), device, args)


def dispatch_named(op: str, device: torch.device, *args) -> tuple[str, Any]:
    """:func:`dispatch`, also returning the name of the backend that ran."""
    name = _choose(op, device, args)
    return name, _run(_TABLES[op], name, device, args)


def dispatch_on(name: str, op: str, device: torch.device, *args):
    """Run ``op`` on backend ``name`` (e.g. a backward on its forward's backend, whatever
    the thread's choice is now); a ``RuntimeError`` with the reasons when it cannot."""
    t = table(op)
    reasons = t.reasons(name, device, *args)
    if reasons:
        raise RuntimeError(
            f"mipnet_kernels: backend '{name}' ran the forward but cannot run {op}: "
            + "; ".join(reasons)
        )
    return _run(t, name, device, args)


__all__ = [
    "BACKEND", "BACKENDS", "BUILD_COMMAND", "Backend", "DECLARATIONS", "ENV_VAR", "Kernel",
    "KernelTable", "auto_order", "available_backends", "backend_unavailable_reason",
    "backends_for", "define_kernels", "device_unsupported_reason", "dispatch", "dispatch_named",
    "dispatch_on", "get_backend", "kernel", "not_supported_reasons", "preferred_backend",
    "select", "set_backend", "table", "tables", "use_backend",
]


# --------------------------------------------------------------------------- wrapping kernels
class KernelHandle:
    """``ops()[op].impls[backend]``: the kernel ``dispatch`` calls, as ``fn`` -- readable, and
    settable to wrap it (``monkeypatch.setattr(handle, "fn", wrapped)`` in tests: the
    self-test's "kernel off by a little" checks; setting it back restores the kernel)."""

    def __init__(self, t: KernelTable, backend: str):
        self._table, self._backend = t, backend

    @property
    def fn(self) -> Callable:
        return kernel(self._table.name, self._backend)

    @fn.setter
    def fn(self, value: Callable) -> None:
        self._table._resolved[self._backend] = value


class _TableHandle:
    def __init__(self, t: KernelTable):
        self.name, self.example_inputs = t.name, t.example_inputs
        self.impls = {b: KernelHandle(t, b) for b in t.kernels}


def ops() -> dict[str, _TableHandle]:
    """Per op, ``.example_inputs`` and ``.impls[backend].fn`` (see :class:`KernelHandle`)."""
    return {name: _TableHandle(t) for name, t in _TABLES.items()}
