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
            result = (False, f"mipnet_kernels/{name}*.so not built")
        else:
            try:
                torch.ops.load_library(str(path))
                result = (True, None)
            except OSError as exc:  # wrong torch / missing CUDA runtime
                result = (False, f"{path.name} failed to load: {exc}")
    _STATE[name] = result
    return result


def cpu_extension() -> tuple[bool, str | None]:
    """(loaded, reason) of the C++ CPU extension."""
    return _load("_C")


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
    """One warning, at import, naming what is missing and how to build it."""
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
            + ". Falling back to the other backends (the PyTorch reference always works). "
            + f"Build with: {BUILD_COMMAND}",
            RuntimeWarning,
            stacklevel=3,
        )
