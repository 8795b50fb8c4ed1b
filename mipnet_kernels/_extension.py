"""Loading of the compiled extensions.

Two shared objects, built by ``setup.py`` (or CMake) next to this file:

* ``_C``       -- C++ CPU kernels, registered as ``torch.ops.mipnet_cpu.*``;
* ``_C_cuda``  -- CUDA kernels, registered as ``torch.ops.mipnet_cuda.*``.

Both use PyTorch's stable C ABI and register their operators from static
initialisers, so they are loaded with ``torch.ops.load_library`` rather than
imported as Python modules.  Neither is required: every op has a pure-PyTorch
reference, and a missing extension only removes a backend.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import os
import warnings
from pathlib import Path

import torch

BUILD_COMMAND = "pip install --no-build-isolation -e ."

_HERE = Path(__file__).resolve().parent

# name -> (loaded, reason it is not loaded)
_STATE: dict[str, tuple[bool, str | None]] = {}


def _find(name: str) -> Path | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES + [".so"]:
        path = _HERE / f"{name}{suffix}"
        if path.exists():
            return path
    # CMake builds put a plain lib<name>.so here.
    path = _HERE / f"lib{name}.so"
    return path if path.exists() else None


def _load(name: str) -> tuple[bool, str | None]:
    if name in _STATE:
        return _STATE[name]
    if os.environ.get("MIPNET_KERNELS_NO_EXTENSIONS", "") not in ("", "0"):
        result = (False, "disabled by MIPNET_KERNELS_NO_EXTENSIONS")
    else:
        path = _find(name)
        if path is None:
            result = (False, f"mipnet_kernels/{name}*.so not built; build with: {BUILD_COMMAND}")
        else:
            try:
                torch.ops.load_library(str(path))
                result = (True, None)
            except OSError as exc:  # wrong torch / missing CUDA runtime
                result = (False, f"{path.name} failed to load: {exc}; rebuild with: {BUILD_COMMAND}")
            if result[0] and name == "_C":
                result = _apply_isa_env()
    _STATE[name] = result
    return result


def cpu_extension() -> tuple[bool, str | None]:
    """(loaded, reason) of the C++ CPU extension."""
    return _load("_C")


# --------------------------------------------------------------------------- CPU vector path
# The C++ kernels' vector path (csrc/cpu/isa.h), one process-wide setting: the best this
# CPU and build support unless MIPNET_KERNELS_CPU_ISA or set_cpu_isa() chose another.
CPU_ISAS = ("scalar", "avx2", "avx512")
ISA_ENV = "MIPNET_KERNELS_CPU_ISA"


def _isa_ops():
    ops = torch.ops.mipnet_cpu
    return ops if hasattr(ops, "set_cpu_isa") else None


def _isa_error(name: str) -> str | None:
    """Why ``name`` cannot be the path here (None: it can)."""
    if name not in CPU_ISAS:
        return f"{name!r} is not one of {', '.join(CPU_ISAS)}"
    ops = _isa_ops()
    if ops is None:
        return f"the loaded C++ extension predates the ISA switch (rebuild with: {BUILD_COMMAND})"
    if not ops.cpu_isa_supported(CPU_ISAS.index(name)):
        return (f"this CPU (or build) cannot run the {name} path; available: "
                f"{', '.join(_supported_isas(ops))}")
    return None


def _supported_isas(ops) -> list[str]:
    return [n for i, n in enumerate(CPU_ISAS) if ops.cpu_isa_supported(i)]


def _apply_isa_env() -> tuple[bool, str | None]:
    """Applies MIPNET_KERNELS_CPU_ISA after loading ``_C``: an unknown or unsupported value
    makes the cpu backend unavailable with that reason (never a silent other path)."""
    want = os.environ.get(ISA_ENV, "").strip().lower()
    if not want:
        return (True, None)
    why = _isa_error(want)
    if why is not None:
        return (False, f"{ISA_ENV}={want}: {why}")
    _isa_ops().set_cpu_isa(CPU_ISAS.index(want))
    return (True, None)


def cpu_isas() -> list[str]:
    """The vector paths of the C++ CPU kernels this machine can run (``[]`` without them)."""
    ok, _ = cpu_extension()
    ops = _isa_ops() if ok else None
    return _supported_isas(ops) if ops is not None else []


def get_cpu_isa() -> str | None:
    """The C++ CPU kernels' vector path in use (``scalar``, ``avx2`` or ``avx512``), or None
    when the CPU extension is not loaded."""
    ok, _ = cpu_extension()
    ops = _isa_ops() if ok else None
    return CPU_ISAS[ops.cpu_isa()] if ops is not None else None


def set_cpu_isa(name: str) -> str:
    """Chooses the C++ CPU kernels' vector path for the whole process (``scalar``, ``avx2``
    or ``avx512``; ``MIPNET_KERNELS_CPU_ISA`` sets it at load).  Returns the previous one.
    Raises ``ValueError`` naming ``name`` when it is unknown or this CPU cannot run it, and
    ``RuntimeError`` when the CPU extension is not loaded."""
    ok, why = cpu_extension()
    if not ok:
        raise RuntimeError(f"set_cpu_isa: the C++ CPU extension is not loaded ({why})")
    why = _isa_error(str(name).strip().lower() if isinstance(name, str) else repr(name))
    if why is not None:
        raise ValueError(f"set_cpu_isa: name={name!r}: {why}")
    ops = _isa_ops()
    return CPU_ISAS[ops.set_cpu_isa(CPU_ISAS.index(name.strip().lower()))]


@contextlib.contextmanager
def use_cpu_isa(name: str):
    """``set_cpu_isa(name)`` for the ``with`` block, then the previous path again."""
    before = set_cpu_isa(name)
    try:
        yield
    finally:
        set_cpu_isa(before)


def cuda_extension() -> tuple[bool, str | None]:
    """(loaded, reason) of the CUDA extension (only attempted when torch has CUDA)."""
    if torch.version.cuda is None:
        return (False, "torch was built without CUDA")
    return _load("_C_cuda")


def extension_path(name: str) -> Path | None:
    return _find(name)


_EXTENSION_OF = {"mipnet_cpu": "C++", "mipnet_cuda": "CUDA"}


_FOUND: set[tuple[str, str]] = set()


def missing_kernel(namespace: str, name: str) -> list[str]:
    """The backend reason "not built" while the loaded extension has no
    ``torch.ops.<namespace>.<name>`` (``namespace``: ``mipnet_cpu`` or ``mipnet_cuda``)."""
    if (namespace, name) in _FOUND:
        return []
    if hasattr(getattr(torch.ops, namespace), name):
        _FOUND.add((namespace, name))  # ops are never unregistered: cache the hits only
        return []
    return [f"torch.ops.{namespace}.{name} is not built into the loaded {_EXTENSION_OF[namespace]} "
            f"extension (rebuild with: {BUILD_COMMAND})"]


def warn_if_missing() -> None:
    """One warning, at import, naming what is missing and why (each reason says how to
    build what is not built)."""
    missing = []
    ok, why = cpu_extension()
    if not ok:
        missing.append(f"C++ CPU extension ({why})")
    if torch.cuda.is_available():
        ok, why = cuda_extension()
        if not ok:
            missing.append(f"CUDA extension ({why})")
    if missing and os.environ.get("MIPNET_KERNELS_NO_EXTENSIONS", "") in ("", "0"):
        warnings.warn(
            "mipnet_kernels: " + "; ".join(missing)
            + ". Falling back to the other backends (the PyTorch reference always works).",
            RuntimeWarning,
            stacklevel=3,
        )
