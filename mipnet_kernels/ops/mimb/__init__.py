"""The Multi-Instance Modulation Block (MIMB, MIPNet paper section 3.2).

Public ops (each also under ``torch.ops.mipnet``; contracts in their docstrings, :mod:`.api`):

``mimb_scale(x, w1, w2, v) -> y``
    ``y = x * (sigmoid(relu(mean_hw(x) @ w1.T) @ w2.T) * v)[:, :, None, None]``, ``v [B, C]``
    given.  Differentiable w.r.t. ``x, w1, w2, v``.
``mimb(x, lam, w1, w2, e1, b1, e2, b2) -> y``
    The whole block: ``v = sigmoid(relu(lam @ e1.T + b1) @ e2.T + b2)`` then ``mimb_scale``
    (a BatchNorm folded into ``e1, b1``).  Differentiable w.r.t. every input.
``mimb_train(x, lam, w1, w2, e1, b1, gamma, beta, e2, b2, running_mean, running_var, ...)``
    A training step of the official block, the embedding's BatchNorm on batch statistics
    included (what :class:`mipnet_kernels.MIMB` runs in eager training).
``mimb_instances(x, w1, w2, table) -> y [N*B, C, H, W]``
    All N instances from one read of ``x``.  Differentiable w.r.t. ``x, w1, w2, table``.
``mimb_scale_grouped`` / ``mimb_instances_grouped``
    The same on lists of branch tensors (HRNet's 4 branches) in one op call.

Where things live:

* :mod:`.contract` -- dtypes, output layout, argument checks, empty-input rules;
* :mod:`.reference` -- the PyTorch specification, the embedding's forward and backward
  (written once), the training step's saved-state layout;
* :mod:`.kernels` -- the kernel table: each backend's kernels (cpu: ``csrc/cpu/mimb_kernel.cpp``;
  cuda: ``csrc/cuda/mimb_kernel.cu``; triton: :mod:`mipnet_kernels.triton.mimb`), the
  entries derived for what a backend does not fuse, and the reasons a backend declines;
* :mod:`.autograd` -- the primitives (scale, embed + scale, instances): one forward and one
  backward each, registered as ``torch.library`` operators (the training step: an autograd
  function, it mutates the running statistics);
* :mod:`.api` -- the public functions.
"""

from __future__ import annotations

from .api import (
    mimb,
    mimb_instances,
    mimb_instances_grouped,
    mimb_scale,
    mimb_scale_grouped,
    mimb_train,
)
from .contract import KERNEL_DTYPES, SUPPORTED_DTYPES, compute_dtype, out_memory_format
from .reference import (
    mimb_embedding_reference,
    mimb_fwd_reference,
    mimb_instances_reference,
    mimb_reference,
    mimb_scale_bwd_reference,
    mimb_scale_fwd_reference,
    mimb_train_bwd_reference,
    mimb_train_fwd_reference,
)

__all__ = [
    "KERNEL_DTYPES",
    "SUPPORTED_DTYPES",
    "compute_dtype",
    "mimb",
    "mimb_embedding_reference",
    "mimb_fwd_reference",
    "mimb_instances",
    "mimb_instances_grouped",
    "mimb_instances_reference",
    "mimb_reference",
    "mimb_scale",
    "mimb_scale_bwd_reference",
    "mimb_scale_fwd_reference",
    "mimb_scale_grouped",
    "mimb_train",
    "mimb_train_bwd_reference",
    "mimb_train_fwd_reference",
    "out_memory_format",
]
