"""How an op becomes ``torch.ops.mipnet.<name>``: one :func:`define_op` call per op.

Each op is one primitive: a forward (validates, handles empty inputs, calls
``_backends.dispatch`` on its kernel table), a fake (shapes only, for FakeTensor /
torch.compile) and, where it has one, a backward.  :func:`define_op` registers them with
public ``torch.library`` calls only:

* ``Library.define`` with the schema inferred from the forward's annotations
  (``torch.library.infer_schema``), tagged ``pt2_compliant_tag``;
* ``Library.impl(..., "CompositeExplicitAutograd")``: the forward, for every device;
* ``torch.library.register_fake``: the fake;
* ``torch.library.register_autograd`` with a ``backward``; without one,
  ``torch.library.fallthrough_kernel`` on ``Autograd``: the op is not differentiable (its
  outputs never require grad; a forward given tensors that require grad detaches them,
  :func:`detached`, so its inner ops record no graph either).

Why ``Library.define`` + ``impl`` rather than ``torch.library.custom_op``: the call goes
straight from the dispatcher to the forward, ~7 µs less per call (measured in issue 15,
see docs/ops.md); the op is the same to opcheck, FakeTensor and torch.compile.  An op with
no backward falls through the autograd layer in C++, so an inference call pays for no
extra Python hop.

The returned ``OpOverload`` is what the public wrapper calls (cheaper than going through
``torch.ops.mipnet.<name>``'s overload packet).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

NAMESPACE = "mipnet"
_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")


def define_op(
    name: str,
    forward: Callable,
    *,
    fake: Callable,
    backward: Optional[Callable] = None,
    setup_context: Optional[Callable] = None,
) -> Callable:
    """Register ``torch.ops.mipnet.<name>`` (see the module docstring); returns its overload.

    ``forward``'s annotations give the schema (as ``torch.library.custom_op`` infers it);
    ``backward`` / ``setup_context`` follow ``torch.library.register_autograd``.
    """
    schema = torch.library.infer_schema(forward, mutates_args=())
    _LIB.define(name + schema, tags=(torch.Tag.pt2_compliant_tag,))
    _LIB.impl(name, forward, "CompositeExplicitAutograd")
    qualname = f"{NAMESPACE}::{name}"
    torch.library.register_fake(qualname, fake, lib=_LIB)
    if backward is not None:
        torch.library.register_autograd(qualname, backward, setup_context=setup_context, lib=_LIB)
    else:
        _LIB.impl(name, torch.library.fallthrough_kernel, "Autograd")
    return getattr(getattr(torch.ops, NAMESPACE), name).default


def detached(t):
    """``t`` detached when it requires grad (a non-differentiable op's forward applies it
    to its floating inputs: cheaper than ``torch.no_grad()`` on the common path)."""
    return t.detach() if t is not None and t.requires_grad else t
