"""Shared helpers for the op tests: backend/device parametrization, inputs, tolerances, and
the MIMB helpers (official-layer / ``MIMB`` pairs, cases, the flash-attention error rules).
The outside references themselves (NumPy anchors, the official SELambdaLayer) are in
``anchors.py``.

Backends are tested on the devices they serve: ``reference`` and ``cpu`` on CPU tensors,
``cuda`` on CUDA tensors, ``triton`` on CUDA tensors and -- under ``TRITON_INTERPRET=1``
(set by ``conftest.py`` when there is no GPU) -- on CPU tensors with a reduced case list,
because the interpreter is slow.  A backend that cannot run in this process is skipped
with the reason the library gives (``available_backends()`` / ``backends_for()``).
"""

from __future__ import annotations

import copy
import importlib.util
import math
import zlib
from typing import Iterable

import pytest
import torch
import torch.nn.functional as F

import anchors
import mipnet_kernels as mk
from mipnet_kernels import _backends
from mipnet_kernels.nn import MIMB
from mipnet_kernels._numerics import (  # noqa: F401  (one definition of each rule, shared with the self-test)
    _reflect101_index,
    affine_px_scale,
    affine_rounding_tol,
    decode_spec_f64,
    max_abs,
    refined_error,
)

HAS_CUDA = torch.cuda.is_available()

#: (backend, device) pairs, in the order the tests list them.
BACKEND_DEVICES = (
    ("reference", "cpu"),
    ("cpu", "cpu"),
    ("triton", "cpu"),
    ("reference", "cuda"),
    ("cuda", "cuda"),
    ("triton", "cuda"),
)


def _marks(backend: str, device: str) -> list:
    marks = []
    if device == "cuda":
        marks.append(pytest.mark.cuda)
    if backend == "triton":
        marks.append(pytest.mark.triton)
    return marks


def is_interpreted(backend: str, device: str) -> bool:
    """True for Triton on CPU tensors (TRITON_INTERPRET): use the reduced case list."""
    return backend == "triton" and device == "cpu"


def _case_id(case) -> str:
    if not isinstance(case, (tuple, list)):
        case = (case,)
    parts = []
    for c in case:
        if isinstance(c, torch.dtype):
            parts.append(str(c).replace("torch.", ""))
        elif isinstance(c, (tuple, list)):
            parts.append("x".join(str(v) for v in c))
        else:
            parts.append(str(c))
    return "-".join(parts)


def backend_params(cases: Iterable = ((),), interp_cases: Iterable | None = None) -> list:
    """``pytest.param(backend, device, *case)`` for every backend/device pair and case.

    ``interp_cases`` replaces ``cases`` for Triton under the interpreter (CPU tensors);
    by default it is ``cases``.  Use with
    ``@pytest.mark.parametrize("backend, device, a, b", backend_params([...]))``.
    """
    cases = list(cases)
    interp_cases = cases if interp_cases is None else list(interp_cases)
    params = []
    for backend, device in BACKEND_DEVICES:
        for case in interp_cases if is_interpreted(backend, device) else cases:
            case = tuple(case) if isinstance(case, (tuple, list)) else (case,)
            ident = "-".join(p for p in (backend, device, _case_id(case)) if p)
            params.append(pytest.param(backend, device, *case, marks=_marks(backend, device), id=ident))
    return params


def backend_device_params() -> list:
    """``pytest.param(backend, device)`` for every pair (no extra cases)."""
    return [
        pytest.param(b, d, marks=_marks(b, d), id=f"{b}-{d}") for b, d in BACKEND_DEVICES
    ]


_TRITON_MODULE = "mipnet_kernels.triton.decode"


def skip_unless_runs(backend: str, device: str) -> torch.device:
    """Skip the test (with the library's reason) unless ``backend`` runs ``device`` tensors."""
    if device == "cuda" and not HAS_CUDA:
        pytest.skip("no CUDA device (torch.cuda.is_available() is False)")
    info = mk.available_backends()[backend]
    if not info["available"]:
        pytest.skip(f"backend {backend!r} unavailable: {info['reason']}")
    dev = torch.device(device)
    why = _backends.device_unsupported_reason(backend, dev)
    if why is not None:
        pytest.skip(f"backend {backend!r}: {why}")
    if backend == "triton" and importlib.util.find_spec(_TRITON_MODULE) is None:
        pytest.skip("backend 'triton': mipnet_kernels/triton/decode.py does not exist yet")
    return dev


def decode_on(backend: str, heatmaps, mode="quarter", affine=None, blur_kernel=11):
    """``decode_heatmaps`` forced onto ``backend``; skips when the backend declares the
    inputs unsupported (with its reasons)."""
    args = (heatmaps, mode, affine, blur_kernel)
    if heatmaps.shape[0] * heatmaps.shape[1] > 0:
        reasons = mk.backends_for("decode_heatmaps", heatmaps.device, *args)[backend]
        if reasons:
            pytest.skip(f"backend {backend!r} does not support these inputs: {'; '.join(reasons)}")
    with mk.use_backend(backend):
        return mk.decode_heatmaps(*args)


def flip_merge_on(backend: str, heatmaps, flipped, flip_pairs, shift=True):
    """``flip_merge`` forced onto ``backend`` (skips on declared unsupported inputs)."""
    from mipnet_kernels.ops.decode import flip_index_from_pairs

    if heatmaps.numel() > 0:
        index = flip_index_from_pairs(flip_pairs, heatmaps.shape[1])
        reasons = mk.backends_for("flip_merge", heatmaps.device, heatmaps, flipped, index, bool(shift))[backend]
        if reasons:
            pytest.skip(f"backend {backend!r} does not support these inputs: {'; '.join(reasons)}")
    with mk.use_backend(backend):
        return mk.flip_merge(heatmaps, flipped, flip_pairs, shift)


def round_to(x32: torch.Tensor, dtype: torch.dtype, backend: str, device: str) -> torch.Tensor:
    """``x32`` rounded to ``dtype`` as every backend must: round to nearest even.  (Triton
    3.9's interpreter casts float32 -> bfloat16 by truncation, so the Triton kernels round
    explicitly; the exact expectation is the same everywhere.)"""
    return x32.to(dtype)


# --------------------------------------------------------------------------- inputs
def blob_heatmaps(
    B: int,
    K: int,
    H: int,
    W: int,
    *,
    seed: int = 0,
    sigma: float = 2.0,
    noise: float = 0.01,
    margin: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Network-like float32 heatmaps: one Gaussian per map at a sub-pixel centre
    (uniform in ``[margin, W-1-margin] x [margin, H-1-margin]``, amplitude in [0.6, 1]),
    plus ``noise`` * N(0, 1).  Returns ``(heatmaps [B, K, H, W], centres [B, K, 2])``."""
    g = torch.Generator().manual_seed(seed)
    lo_x, hi_x = min(margin, (W - 1) / 2), max(W - 1 - margin, (W - 1) / 2)
    lo_y, hi_y = min(margin, (H - 1) / 2), max(H - 1 - margin, (H - 1) / 2)
    cx = lo_x + (hi_x - lo_x) * torch.rand(B, K, generator=g, dtype=torch.float64)
    cy = lo_y + (hi_y - lo_y) * torch.rand(B, K, generator=g, dtype=torch.float64)
    amp = 0.6 + 0.4 * torch.rand(B, K, generator=g, dtype=torch.float64)
    ys = torch.arange(H, dtype=torch.float64)[:, None]
    xs = torch.arange(W, dtype=torch.float64)[None, :]
    d2 = (xs - cx[..., None, None]) ** 2 + (ys - cy[..., None, None]) ** 2
    hm = amp[..., None, None] * torch.exp(-d2 / (2 * sigma * sigma))
    if noise:
        hm = hm + noise * torch.randn(B, K, H, W, generator=g, dtype=torch.float64)
    return hm.float(), torch.stack([cx, cy], dim=-1)


def random_affine(B: int, *, seed: int = 0, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """Heatmap -> image-like affines: scale 2..6, small rotation/shear, offsets 0..500."""
    g = torch.Generator().manual_seed(seed)
    s = 2 + 4 * torch.rand(B, generator=g, dtype=torch.float64)
    th = 0.3 * (torch.rand(B, generator=g, dtype=torch.float64) - 0.5)
    A = torch.zeros(B, 2, 3, dtype=torch.float64)
    A[:, 0, 0] = s * torch.cos(th)
    A[:, 0, 1] = -s * torch.sin(th) + 0.1 * torch.rand(B, generator=g, dtype=torch.float64)
    A[:, 1, 0] = s * torch.sin(th)
    A[:, 1, 1] = s * torch.cos(th)
    A[:, :, 2] = 500 * torch.rand(B, 2, generator=g, dtype=torch.float64)
    return A.to(device=device, dtype=dtype)


LAYOUTS = ("contiguous", "channels_last", "sliced", "permuted", "expanded")
_GARBAGE = 1000.0  # what lies between the elements of a sliced view: a kernel reading it fails


def relayout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The values of ``x`` [B, K, H, W] with other strides (``expanded``: ``x[:1]`` repeated
    over the batch with stride 0)."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "sliced":
        B, K, H, W = x.shape
        big = torch.full((B, 2 * K + 1, H + 3, 2 * W + 1), _GARBAGE, dtype=x.dtype, device=x.device)
        view = big[:, 1::2, 2 : H + 2, 1::2]
        view.copy_(x)
        assert view.shape == x.shape and not view.is_contiguous()
        return view
    if layout == "permuted":  # H, W outermost in memory
        return x.permute(2, 3, 0, 1).contiguous().permute(2, 3, 0, 1)
    if layout == "expanded":
        return x[:1].expand(x.shape)
    raise ValueError(layout)


# --------------------------------------------------------------------------- comparisons
def assert_exact(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Same shape, dtype and values bit for bit (NaN where expected has NaN)."""
    actual, expected = actual.detach().cpu(), expected.detach().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    nan_a, nan_e = torch.isnan(actual), torch.isnan(expected)
    if not torch.equal(nan_a, nan_e):
        bad = (nan_a != nan_e).nonzero()[:5].tolist()
        raise AssertionError(f"{what}: NaN pattern differs at {bad}")
    a, e = actual[~nan_a], expected[~nan_e]
    if not torch.equal(a, e):
        diff = actual != expected
        diff &= ~nan_a
        idx = diff.nonzero()[:5].tolist()
        samples = [(i, actual[tuple(i)].item(), expected[tuple(i)].item()) for i in idx]
        raise AssertionError(
            f"{what}: {int(diff.sum())} of {actual.numel()} values differ; (index, got, expected): {samples}"
        )


# --------------------------------------------------------------------------- float64 spec
def check_refined(out_coords, heatmaps, mode, affine, blur_kernel, ref_coords, *, atol_px=1e-4, what=""):
    """dark/udp: ``|out - spec64| <= atol + 2 |ref32 - spec64| + 2 noise`` per coordinate,
    where ``spec64`` is the exact (float64) answer, ``ref32`` the float32 reference (the
    flash-attention rule) and ``noise`` the first-order float32 error bound of the Newton
    step (see :func:`decode_spec_f64`) -- ~1e-5 px on Gaussian blobs, so there the bound is
    ~``atol_px`` = 1e-4 px; larger only where the problem is ill-conditioned.  Heatmap pixels
    are scaled by the affine, whose own float32 rounding is added.  Where the reference is
    NaN the output must be NaN.
    """
    err, tol, spec = refined_error(out_coords, heatmaps, mode, affine, blur_kernel, ref_coords, atol_px=atol_px)
    ref = ref_coords.detach().cpu().double()
    out = out_coords.detach().cpu().double()
    nan_ref = torch.isnan(ref)
    if not torch.equal(torch.isnan(out), nan_ref):
        raise AssertionError(f"{what}: NaN pattern differs from the reference")
    bad = ~(err <= tol) & ~nan_ref
    if bool(bad.any()):
        idx = bad.nonzero()[:5].tolist()
        samples = [
            (i, out[tuple(i)].item(), ref[tuple(i)].item(), spec[tuple(i)].item(), tol[tuple(i)].item())
            for i in idx
        ]
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} coordinates outside tolerance; "
            f"(index, got, reference fp32, spec fp64, tol): {samples}"
        )


def gaussian_blob(H: int, W: int, cx: float, cy: float, sigma: float = 2.0, amp: float = 1.0) -> torch.Tensor:
    ys = torch.arange(H, dtype=torch.float64)[:, None]
    xs = torch.arange(W, dtype=torch.float64)[None, :]
    return (amp * torch.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * sigma * sigma))).float()


def to_numpy_f32(x: torch.Tensor):
    return x.detach().cpu().float().numpy()




# --------------------------------------------------------------------------- MIMB
def seed_of(*parts) -> int:
    """A stable seed from any repr-able parts (a case's parameters)."""
    return zlib.crc32(repr(parts).encode())


def make_pair(C, N=2, r=4, embed_norm=True, seed=0, stats=True):
    """(ours, official) with identical weights; non-trivial BN running statistics
    (:func:`anchors.official_se_lambda`)."""
    off = anchors.official_se_lambda(C, N, r, embed_norm, seed=seed, stats=stats)
    ours = MIMB(C, N, r, embed_norm)
    ours.load_state_dict(off.state_dict())
    return ours, off


def make_x(B, C, H, W, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, H, W, generator=g) + 2 * torch.randn(1, C, 1, 1, generator=g)


def require_backend(backend, device):
    """Skip unless ``backend`` runs the MIMB forward on ``device`` tensors (with its reasons)."""
    dev = skip_unless_runs(backend, device)
    x = torch.zeros(1, 4, 1, 1, device=dev)
    reasons = mk.backends_for(
        "mimb_scale_fwd", dev, x, torch.zeros(1, 4, device=dev), torch.zeros(4, 1, device=dev), torch.zeros(1, 4, device=dev)
    )[backend]
    if reasons:
        pytest.skip(f"backend {backend!r} cannot run mimb_scale_fwd: {'; '.join(reasons)}")
    return dev


def flash(ours, eager, truth, what):
    """Flash-attention's rule: ``|ours - truth| <= 2 |eager32 - truth| + 1e-5 max(|truth|, 1)``
    (max over the tensor), ``truth`` the official layer in float64.  Needed for gradients that
    are zero in exact arithmetic (the bias before a training-mode BatchNorm), where both float32
    results are rounding noise."""
    ours, eager, truth = (t.detach().cpu().double() for t in (ours, eager, truth))
    err = float((ours - truth).abs().max())
    ref_err = float((eager - truth).abs().max())
    atol = 1e-5 * max(float(truth.abs().max()), 1.0)
    assert err <= 2 * ref_err + atol, f"{what}: error {err:.3g} > 2 x official float32's {ref_err:.3g} + {atol:.3g}"


def run_official64(off, x, lam, dy):
    """The official layer in float64 (a copy, same mode): output, input grads, param grads."""
    off64 = copy.deepcopy(off).double()
    off64.zero_grad()
    x64 = x.detach().double().requires_grad_(True)
    lam64 = lam.detach().double().requires_grad_(lam.requires_grad)
    y = off64(x64, lam64)
    y.backward(dy.double())
    return y, x64.grad, lam64.grad, named_grads(off64)


def named_grads(m):
    return {n: p.grad for n, p in m.named_parameters()}


def eager_with_grads(fn, dy, *inputs):
    """``fn(*inputs)`` and the gradients of ``(fn * dy).sum()`` w.r.t. every input (CPU)."""
    leaves = [t.detach().cpu().clone().requires_grad_(True) for t in inputs]
    y = fn(*leaves)
    if dy is None:
        return y.detach(), []
    y.backward(dy.detach().cpu().to(y.dtype))
    return y.detach(), [t.grad for t in leaves]


def make_case(B, C, H, W, r, N=2, *, seed=0, soft=False):
    """Float32 inputs of the MIMB ops with realistic magnitudes: per-channel offsets so the
    squeeze is not ~0 and the ReLUs are partly active; embeddings in (0, 1)."""
    g = torch.Generator().manual_seed(seed)
    Cr = max(C // r, 1)
    x = torch.randn(B, C, H, W, generator=g) + 2 * torch.randn(1, C, 1, 1, generator=g)
    w1 = torch.randn(Cr, C, generator=g) / math.sqrt(C)
    w2 = 2 * torch.randn(C, Cr, generator=g) / math.sqrt(Cr)
    v = 0.1 + 0.8 * torch.rand(B, C, generator=g)
    if soft:
        lam = torch.softmax(2 * torch.randn(B, N, generator=g), dim=1)
    else:
        lam = F.one_hot(torch.randint(0, N, (B,), generator=g), N).float()
    e1 = torch.randn(Cr, N, generator=g)
    b1 = 0.5 * torch.randn(Cr, generator=g)
    e2 = 2 * torch.randn(C, Cr, generator=g) / math.sqrt(Cr)
    b2 = 0.5 * torch.randn(C, generator=g)
    table = 0.1 + 0.8 * torch.rand(N, C, generator=g)
    return dict(x=x, w1=w1, w2=w2, v=v, lam=lam, e1=e1, b1=b1, e2=e2, b2=b2, table=table)


#: The MIMB op's inputs, in its argument order.
MIMB_KEYS = ("x", "lam", "w1", "w2", "e1", "b1", "e2", "b2")


def expected_format(x):
    return torch.channels_last if (not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)) else torch.contiguous_format


def check_output(out, like, batch=None):
    B, C, H, W = like.shape
    assert out.shape == ((B if batch is None else batch), C, H, W)
    assert out.dtype == like.dtype and out.device == like.device
    assert out.is_contiguous(memory_format=expected_format(like)), "y must have x's memory format"


def check_flash(out, eager, truth, dtype, what):
    """Flash-attention's rule for the MIMB ops: ``|out - truth| <= 2 |eager - truth| +
    1e-5 max|truth|`` (+ half an ulp of ``max|truth|`` in float16 / bfloat16)."""
    out, eager, truth = (t.detach().cpu().double() for t in (out, eager, truth))
    assert out.shape == truth.shape, f"{what}: shape {tuple(out.shape)} != {tuple(truth.shape)}"
    if truth.numel() == 0:
        return
    scale = float(truth.abs().max())
    atol = 1e-5 * scale
    if dtype in (torch.float16, torch.bfloat16):
        atol += 0.5 * torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(max(scale, 1e-30)))
    err = float((out - truth).abs().max())
    ref_err = float((eager - truth).abs().max())
    assert err <= 2 * ref_err + atol, (
        f"{what} ({dtype}): error {err:.3g} > 2 x eager's {ref_err:.3g} + {atol:.3g} (max |truth| {scale:.3g})"
    )
