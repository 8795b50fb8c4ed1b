"""Launch parameters and the one launch path shared by the Triton kernels.

``num_warps`` derives warps from a tile size in one place (as Liger's ``calculate_settings``).

Every launcher starts its kernels through :func:`launch`.  Normally it is
``kernel[grid](*args, **kwargs)``; inside :func:`record_launches` it records the launch
instead of running it, so the compile gate (``tests/test_triton_compile.py``) and
``benchmarks/gpu_resources.py`` enumerate exactly the specialisations (argument types,
constexprs, ``num_warps``...) the launchers choose, without a GPU and without the
interpreter: the launchers run on CPU tensors and nothing is launched.  Outputs of a
recorded call are garbage (nothing ran); only the recorded launches mean anything.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Any, Iterator


def num_warps(tile_elems: int) -> int:
    """Warps for a program that streams ``tile_elems`` elements per step."""
    if tile_elems >= 2048:
        return 8
    if tile_elems >= 1024:
        return 4
    if tile_elems >= 256:
        return 2
    return 1


@dataclass(frozen=True)
class Launch:
    """One recorded launch: the ``@triton.jit`` kernel, its grid and its arguments."""

    kernel: Any
    grid: tuple
    args: tuple
    kwargs: dict


_RECORDER: contextvars.ContextVar[list[Launch] | None] = contextvars.ContextVar("mipnet_triton_recorder", default=None)


def launch(kernel, grid: tuple, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``, or recorded inside :func:`record_launches`."""
    recorded = _RECORDER.get()
    if recorded is not None:
        recorded.append(Launch(kernel, tuple(grid), args, dict(kwargs)))
        return
    kernel[grid](*args, **kwargs)


@contextlib.contextmanager
def record_launches() -> Iterator[list[Launch]]:
    """Record (do not run) every :func:`launch` of this thread / task; yields the list."""
    recorded: list[Launch] = []
    token = _RECORDER.set(recorded)
    try:
        yield recorded
    finally:
        _RECORDER.reset(token)
