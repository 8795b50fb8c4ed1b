"""Triton kernels, one module per op (``decode``: heatmap decoding and the flip-test merge;
``mimb``: the Multi-Instance Modulation Block, two-phase; ``nms``: batched greedy and soft
OKS-NMS).

Importing this package does not import ``triton``: the kernels' modules are loaded on first
use, so ``TRITON_INTERPRET=1`` (which must be set before ``triton`` is imported) can still be
set after ``import mipnet_kernels``.  The public ops in :mod:`mipnet_kernels.ops` route here
when the ``triton`` backend is selected, always through :func:`launcher_module` (the
backend's ``resolve`` in :mod:`mipnet_kernels._backends`); these launchers are not part of
the public API.  A new launcher is one line in ``_LAZY``.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "decode_heatmaps_triton": "decode",
    "flip_merge_triton": "decode",
    "mimb_scale_fwd_triton": "mimb",
    "mimb_scale_bwd_triton": "mimb",
    "mimb_instances_triton": "mimb",
    "mimb_instances_bwd_triton": "mimb",
    "mimb_scale_grouped_fwd_triton": "mimb",
    "mimb_scale_grouped_bwd_triton": "mimb",
    "mimb_instances_grouped_triton": "mimb",
    "mimb_instances_grouped_bwd_triton": "mimb",
    "oks_nms_sorted_triton": "nms",
    "soft_oks_nms_sorted_triton": "nms",
}
__all__ = sorted(_LAZY)


def launcher_module(name: str) -> str | None:
    """The full name of the module holding launcher ``name`` (None: no such launcher)."""
    module = _LAZY.get(name)
    return None if module is None else f"{__name__}.{module}"


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
