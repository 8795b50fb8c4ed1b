"""Shared helpers for the op tests: backend/device parametrization, inputs, tolerances.

Backends are tested on the devices they serve: ``reference`` and ``cpu`` on CPU tensors,
``cuda`` on CUDA tensors, ``triton`` on CUDA tensors and -- under ``TRITON_INTERPRET=1``
(set by ``conftest.py`` when there is no GPU) -- on CPU tensors with a reduced case list,
because the interpreter is slow.  A backend that cannot run in this process is skipped
with the reason the library gives (``available_backends()`` / ``not_supported_reasons``).
"""

from __future__ import annotations

import importlib.util
import math
from typing import Iterable

import pytest
import torch

import mipnet_kernels as mk
from mipnet_kernels import _backends
from mipnet_kernels.ops.decode import gaussian_kernel_1d

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


def affine_rounding_tol(coords_hm: torch.Tensor, affine: torch.Tensor | None, rtol: float = 1e-6) -> torch.Tensor:
    """Per-coordinate bound for float32 rounding of ``A @ (x, y, 1)``: ``rtol * (|a0 x| + |a1 y| + |a2|)``."""
    if affine is None:
        return torch.zeros_like(coords_hm, dtype=torch.float64)
    A = affine.detach().cpu().double()[:, None]  # [B, 1, 2, 3]
    x = coords_hm.detach().cpu().double()[..., 0:1].abs()
    y = coords_hm.detach().cpu().double()[..., 1:2].abs()
    mag = A[..., 0].abs() * x + A[..., 1].abs() * y + A[..., 2].abs()
    return rtol * mag + 1e-30


def affine_px_scale(affine: torch.Tensor | None, K: int) -> torch.Tensor:
    """``[B, K, 2]`` factor turning a heatmap-pixel error into an output-coordinate error."""
    if affine is None:
        return torch.tensor(1.0, dtype=torch.float64)
    A = affine.detach().cpu().double()
    s = A[:, :, 0].abs() + A[:, :, 1].abs()  # [B, 2]
    return s[:, None, :].expand(-1, K, -1)


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    d = (a.detach().cpu().double() - b.detach().cpu().double()).abs()
    return float(d.max()) if d.numel() else 0.0


# --------------------------------------------------------------------------- float64 spec
def _reflect101_index(n: int, r: int) -> torch.Tensor:
    i = torch.arange(-r, n + r)
    if n == 1:
        return torch.zeros_like(i)
    period = 2 * n - 2
    i = i.remainder(period)
    return torch.where(i >= n, period - i, i)


def decode_spec_f64(heatmaps: torch.Tensor, mode: str, affine=None, blur_kernel: int = 11, *, return_noise: bool = False):
    """The decode of ARCHITECTURE.md / ops/decode.py written again, in float64 on CPU.

    Used as the exact answer against which the float32 reference's and the kernels' errors
    are measured, and as a second, independent reading of the spec.  Finite inputs only.
    Gaussian taps are the op's float32 taps (so only arithmetic differs).

    With ``return_noise`` also returns, per coordinate (heatmap pixels, before the affine),
    a first-order bound on how far ANY faithful float32 evaluation may land from this exact
    answer: the Newton step ``-H^-1 g`` moves by ``|H^-1| (|dg| + |dH| |step|)`` when the
    log-samples carry an error ``dL``; ``dL`` is the float32 error of a ``k x k`` blur (relative
    ``(2k + 2) u`` times the sum's condition ``blur(|hm|) / |blur(hm)|``) plus the rounding of
    the log (``u |L|``), ``u = 2^-24``.  Large for near-singular Hessians (tiny maps, kernels
    wider than the map), ~1e-5 px for Gaussian blobs; infinite where that error could make
    the Hessian singular (no float32 evaluation is meaningful there).
    """
    x = heatmaps.detach().cpu().double()
    B, K, H, W = x.shape
    x = x.reshape(B * K, H, W)
    flat = x.reshape(B * K, H * W)
    idx = flat.argmax(dim=1)
    px, py = idx % W, idx // W
    cx, cy = px.double(), py.double()
    rows = torch.arange(B * K)
    noise = torch.zeros(B * K, dtype=torch.float64)

    def at(f, dy, dx):
        return f[rows, (py + dy).clamp(0, H - 1), (px + dx).clamp(0, W - 1)]

    if mode == "quarter":
        inner = (px > 1) & (px < W - 1) & (py > 1) & (py < H - 1)
        cx = cx + torch.where(inner, 0.25 * torch.sign(at(x, 0, 1) - at(x, 0, -1)), 0.0)
        cy = cy + torch.where(inner, 0.25 * torch.sign(at(x, 1, 0) - at(x, -1, 0)), 0.0)
    elif mode in ("dark", "udp"):
        g = torch.tensor(gaussian_kernel_1d(blur_kernel), dtype=torch.float64)
        r = blur_kernel // 2

        def blur(a, pad):  # separable (float64: same as the 2-D kernel up to ~1e-16)
            a = torch.nn.functional.conv2d(a[:, None], g.view(1, 1, 1, -1), padding=(0, pad))
            return torch.nn.functional.conv2d(a, g.view(1, 1, -1, 1), padding=(pad, 0))[:, 0]

        if mode == "dark":
            blurred, blurred_abs = blur(x, r), blur(x.abs(), r)
            m = flat.max(dim=1).values
            bm = blurred.reshape(B * K, -1).max(dim=1).values
            ok = (m > 0) & (bm != 0)
            c = torch.where(ok, m / torch.where(ok, bm, 1.0), 1.0)
            L = torch.log(torch.clamp(blurred * c[:, None, None], min=1e-10))
            dx = 0.5 * (at(L, 0, 1) - at(L, 0, -1))
            dy = 0.5 * (at(L, 1, 0) - at(L, -1, 0))
            hxx = 0.25 * (at(L, 0, 2) - 2 * at(L, 0, 0) + at(L, 0, -2))
            hyy = 0.25 * (at(L, 2, 0) - 2 * at(L, 0, 0) + at(L, -2, 0))
            hxy = 0.25 * (at(L, 1, 1) - at(L, -1, 1) - at(L, 1, -1) + at(L, -1, -1))
            step = ok & (px > 1) & (px < W - 2) & (py > 1) & (py < H - 2)
            points = [(0, 0), (0, 1), (0, -1), (1, 0), (-1, 0), (0, 2), (0, -2), (2, 0), (-2, 0), (1, 1), (-1, 1), (1, -1), (-1, -1)]
        else:
            padded = x[:, _reflect101_index(H, r)][:, :, _reflect101_index(W, r)]
            blurred, blurred_abs = blur(padded, 0), blur(padded.abs(), 0)
            L = torch.log(blurred.clamp(0.001, 50.0))
            i0, ix, ix_, iy, iy_ = at(L, 0, 0), at(L, 0, 1), at(L, 0, -1), at(L, 1, 0), at(L, -1, 0)
            eps = float(torch.finfo(torch.float32).eps)
            dx, dy = 0.5 * (ix - ix_), 0.5 * (iy - iy_)
            hxx = ix - 2 * i0 + ix_ + eps
            hyy = iy - 2 * i0 + iy_ + eps
            hxy = 0.5 * (at(L, 1, 1) - ix - iy + 2 * i0 - ix_ - iy_ + at(L, -1, -1))
            step = torch.ones(B * K, dtype=torch.bool)
            points = [(0, 0), (0, 1), (0, -1), (1, 0), (-1, 0), (1, 1), (-1, -1)]
        det = hxx * hyy - hxy * hxy
        step = step & (det != 0)
        det = torch.where(step, det, 1.0)
        ox, oy = -(hyy * dx - hxy * dy) / det, -(hxx * dy - hxy * dx) / det
        cx = torch.where(step, cx + ox, cx)
        cy = torch.where(step, cy + oy, cy)
        if return_noise:
            u = 2.0**-24
            cond = (blurred_abs / blurred.abs().clamp_min(1e-300)).clamp(max=1e12)
            dL = torch.stack([(2 * blur_kernel + 2) * u * at(cond, a, b) + u * at(L, a, b).abs() for a, b in points]).amax(0)
            half = 0.5 * (hxx + hyy)
            rad = torch.sqrt((0.5 * (hxx - hyy)) ** 2 + hxy**2)
            lam_min = torch.minimum((half - rad).abs(), (half + rad).abs())
            hinv = 1.0 / lam_min.clamp_min(1e-300)
            size = torch.sqrt(ox**2 + oy**2)
            noise = torch.where(step, hinv * dL * (1 + 8 * size), 0.0).nan_to_num(nan=math.inf)
            # Beyond first order: an error this size could make H singular -- no bound at all
            # (UDP's eps*I on a map whose log is flat along an axis, e.g. everything clipped).
            noise = torch.where(step & (hinv * 8 * dL >= 0.5), math.inf, noise)
    elif mode != "argmax":
        raise ValueError(mode)
    coords = torch.stack([cx, cy], -1).reshape(B, K, 2)
    if affine is not None:
        A = affine.detach().cpu().float().double()  # the op rounds the affine to float32
        coords = torch.einsum("bij,bkj->bki", A[:, :, :2], coords) + A[:, None, :, 2]
    scores = flat.max(dim=1).values.reshape(B, K)
    if return_noise:
        return coords, scores, noise.reshape(B, K, 1).expand(B, K, 2)
    return coords, scores


def check_refined(out_coords, heatmaps, mode, affine, blur_kernel, ref_coords, *, atol_px=1e-4, what=""):
    """dark/udp: ``|out - spec64| <= atol + 2 |ref32 - spec64| + 2 noise`` per coordinate,
    where ``spec64`` is the exact (float64) answer, ``ref32`` the float32 reference (the
    flash-attention rule) and ``noise`` the first-order float32 error bound of the Newton
    step (see :func:`decode_spec_f64`) -- ~1e-5 px on Gaussian blobs, so there the bound is
    ~``atol_px`` = 1e-4 px; larger only where the problem is ill-conditioned.  Heatmap pixels
    are scaled by the affine, whose own float32 rounding is added.  Where the reference is
    NaN the output must be NaN.
    """
    spec, _, noise = decode_spec_f64(heatmaps, mode, None, blur_kernel, return_noise=True)
    coords_hm = spec
    if affine is not None:
        spec = decode_spec_f64(heatmaps, mode, affine, blur_kernel)[0]
    K = heatmaps.shape[1]
    ref = ref_coords.detach().cpu().double()
    out = out_coords.detach().cpu().double()
    nan_ref = torch.isnan(ref)
    if not torch.equal(torch.isnan(out), nan_ref):
        raise AssertionError(f"{what}: NaN pattern differs from the reference")
    scale = affine_px_scale(affine, K)
    ref_err = (ref - spec).abs()
    tol = 2 * ref_err + (atol_px + 2 * noise) * scale + 2 * affine_rounding_tol(coords_hm, affine)
    err = (out - spec).abs()
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


