"""Correctly rounded arithmetic for the Triton kernels (shared ``@triton.jit`` helpers).

Triton lowers float32 ``/`` to ``div.full.f32`` (an approximation, up to 2 ulp) and
``tl.exp`` to ``ex2.approx.f32`` of ``x * log2(e)`` (the product's rounding alone costs up
to ``|x| * 1.44 * 2^-24`` relative, tens of ulp for ``|x| ~ 80``).  Where a result is
compared with the reference (a keep/drop decision) or must equal the CUDA backend's, the
kernels use these instead:

* :func:`div` -- IEEE division, round to nearest (``div.rn.f32``; float64 ``/`` already
  is ``div.rn.f64``), what torch and the C++/CUDA kernels compute.
* :func:`exp` -- libdevice's ``exp`` (``__nv_expf`` / ``__nv_exp``): the function CUDA's
  ``expf`` / ``exp`` call, so the Triton and CUDA backends agree bit for bit, within 1 ulp
  of the reference's (torch's CPU ``exp`` is Sleef's 1-ulp ``expf``; its CUDA ``exp`` is
  ``expf``).  Its PTX still contains one ``ex2.approx.ftz.f32``, on an argument reduced
  exactly by ``fma.rn`` (no non-``ftz`` ``ex2.approx.f32``: that form is Triton's own
  lowering, which the compile gate rejects).

* :func:`log` -- libdevice's ``log`` (``__nv_logf``, CUDA's ``logf``), named explicitly:
  Triton 3.9 lowers ``tl.log`` to it as well (checked in the PTX), but an approximate
  ``lg2.approx.f32`` lowering would move DARK / UDP, whose Newton steps difference logs of
  nearly equal samples; the compile gate rejects ``lg2.approx.f32`` in the decode kernels.

Under ``TRITON_INTERPRET=1`` libdevice does not exist; the same helpers run numpy's
``exp`` and ``/`` there (correctly rounded in practice), so interpreter tests see
reference numerics either way.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice

@triton.jit
def div(x, y):
    """``x / y`` rounded to nearest (IEEE) in the operands' float dtype."""
    q = x / y  # float32: div.full.f32, dead code once replaced below; float64: div.rn.f64
    if not _INTERPRETED:
        if q.dtype == tl.float32:
            q = tl.math.div_rn(x, y)
    return q


@triton.jit
def exp(x):
    """libdevice ``exp`` (CUDA's ``expf`` / ``exp``) of a float32 / float64 tensor."""
    if _INTERPRETED:
        return tl.exp(x)
    else:
        return libdevice.exp(x)


@triton.jit
def log(x):
    """libdevice ``log`` (CUDA's ``logf`` / ``log``) of a float32 / float64 tensor."""
    if _INTERPRETED:
        return tl.log(x)
    else:
        return libdevice.log(x)


# Under TRITON_INTERPRET=1, @triton.jit gives an InterpretedFunction (not a JITFunction).
_INTERPRETED = tl.constexpr(not isinstance(exp, triton.runtime.JITFunction))
