"""Shared helpers for the op tests: backend/device parametrization, inputs, tolerances.

Backends are tested on the devices they serve: ``reference`` and ``cpu`` on CPU tensors,
``cuda`` on CUDA tensors, ``triton`` on CUDA tensors and -- under ``TRITON_INTERPRET=1``
(set by ``conftest.py`` when there is no GPU) -- on CPU tensors with a reduced case list,
because the interpreter is slow.  A backend that cannot run in this process is skipped
with the reason the library gives (``available_backends()`` / ``not_supported_reasons``).
"""

from __future__ import annotations

import importlib.util
from typing import Iterable

import pytest
import torch

import mipnet_kernels as mk
from mipnet_kernels import _backends
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
        reasons = _backends.not_supported_reasons("decode_heatmaps", backend, heatmaps.device, *args)
        if reasons:
            pytest.skip(f"backend {backend!r} does not support these inputs: {'; '.join(reasons)}")
    with mk.use_backend(backend):
        return mk.decode_heatmaps(*args)


def flip_merge_on(backend: str, heatmaps, flipped, flip_pairs, shift=True):
    """``flip_merge`` forced onto ``backend`` (skips on declared unsupported inputs)."""
    from mipnet_kernels.ops.decode import flip_index_from_pairs

    if heatmaps.numel() > 0:
        index = flip_index_from_pairs(flip_pairs, heatmaps.shape[1])
        reasons = _backends.not_supported_reasons(
            "flip_merge", backend, heatmaps.device, heatmaps, flipped, index, bool(shift)
        )
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


