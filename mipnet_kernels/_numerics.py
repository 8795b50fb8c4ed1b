"""Error bounds shared by the test suite (``tests/``) and :mod:`mipnet_kernels.selftest`.

One definition of each rule, so that ``python -m mipnet_kernels.selftest`` on a user's machine
judges a kernel exactly as the tests do:

* **exact** (argmax / quarter decode, all decode scores, ``flip_merge``, hard NMS ``keep``):
  same values bit for bit, NaN where the reference has NaN (:func:`exact_mismatch`).
* **affine rounding** (argmax / quarter with an affine): within float32 rounding of
  ``A @ (x, y, 1)``, ``1e-6 * (|a0 x| + |a1 y| + |a2|)`` (:func:`affine_rounding_tol`).
* **refined decode** (dark / udp): ``|out - spec64| <= 2 |ref32 - spec64| + (1e-4 px + 2 noise)
  * scale + 2 affine rounding`` per coordinate (:func:`refined_error`), with ``spec64`` the spec
  evaluated in float64 (:func:`decode_spec_f64`) -- flash-attention's rule plus a first-order
  bound on the float32 error of the Newton step.
* **flash** (MIMB outputs and gradients): ``max|out - truth| <= 2 max|eager - truth| + 1e-5
  max|truth|`` (+ half a unit in the last place of ``max|truth|`` in float16 / bfloat16), with
  ``truth`` the float64 evaluation and ``eager`` the same code in the test dtype
  (:func:`flash_bound`).

Everything here works on CPU copies in float64 and never raises on a mismatch; the callers
decide (the tests assert, the self-test reports).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "affine_px_scale",
    "affine_rounding_tol",
    "decode_spec_f64",
    "exact_mismatch",
    "flash_bound",
    "max_abs",
    "nan_aware_max_abs",
    "refined_error",
]


def _cpu64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().double()


# --------------------------------------------------------------------------- exact
def exact_mismatch(actual: torch.Tensor, expected: torch.Tensor) -> tuple[str | None, float]:
    """``(why, max_abs_diff)``: ``why`` is None when ``actual`` equals ``expected`` bit for bit
    (same shape and dtype, NaN where expected has NaN), else a one-line description."""
    actual, expected = actual.detach().cpu(), expected.detach().cpu()
    if actual.shape != expected.shape:
        return f"shape {tuple(actual.shape)} != {tuple(expected.shape)}", math.inf
    if actual.dtype != expected.dtype:
        return f"dtype {actual.dtype} != {expected.dtype}", math.inf
    if not actual.is_floating_point():
        if torch.equal(actual, expected):
            return None, 0.0
        diff = actual != expected
        return f"{int(diff.sum())} of {actual.numel()} values differ", max_abs(actual, expected)
    nan_a, nan_e = torch.isnan(actual), torch.isnan(expected)
    if not torch.equal(nan_a, nan_e):
        return f"NaN pattern differs at {(nan_a != nan_e).nonzero()[:3].tolist()}", math.inf
    err = nan_aware_max_abs(actual, expected)
    if torch.equal(actual[~nan_a], expected[~nan_e]):
        return None, err
    diff = (actual != expected) & ~nan_a
    idx = diff.nonzero()[:3].tolist()
    samples = [(i, actual[tuple(i)].item(), expected[tuple(i)].item()) for i in idx]
    return f"{int(diff.sum())} of {actual.numel()} values differ; (index, got, expected): {samples}", err


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b|`` in float64 (0 for empty tensors)."""
    d = (_cpu64(a) - _cpu64(b)).abs()
    return float(d.max()) if d.numel() else 0.0


def nan_aware_max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b|`` over the elements where neither is NaN; equal infinities count as 0."""
    a, b = _cpu64(a), _cpu64(b)
    ok = ~(torch.isnan(a) | torch.isnan(b))
    same = (a == b) & ok
    d = torch.where(same, 0.0, (a - b).abs())[ok]
    return float(d.max()) if d.numel() else 0.0


# --------------------------------------------------------------------------- flash rule
def flash_bound(out: torch.Tensor, eager: torch.Tensor, truth: torch.Tensor, dtype: torch.dtype,
                *, rtol: float = 1e-5) -> tuple[float, float]:
    """Flash-attention's rule: ``(err, bound)`` with ``err = max|out - truth|`` and
    ``bound = 2 max|eager - truth| + rtol * max|truth|`` (+ half a unit in the last place of
    ``max|truth|`` for float16 / bfloat16: what one correct rounding of the output costs).
    Passes when ``err <= bound``.  NaN-aware: elements NaN in ``truth`` are left out (the caller
    checks the NaN pattern); an infinite ``truth`` element must be matched exactly."""
    out, eager, truth = _cpu64(out), _cpu64(eager), _cpu64(truth)
    if truth.numel() == 0:
        return 0.0, 0.0
    finite = torch.isfinite(truth)
    if not bool(finite.all()):
        inf = torch.isinf(truth)
        if not torch.equal(out[inf], truth[inf]):
            return math.inf, 0.0
        out, eager, truth = out[finite], eager[finite], truth[finite]
        if truth.numel() == 0:
            return 0.0, 0.0
    scale = float(truth.abs().max())
    atol = rtol * scale
    if dtype in (torch.float16, torch.bfloat16):
        atol += 0.5 * torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(max(scale, 1e-30)))
    err = float((out - truth).abs().max())
    if math.isnan(err):
        err = math.inf
    ref_err = float((eager - truth).abs().nan_to_num(nan=0.0).max())
    return err, 2 * ref_err + atol


# --------------------------------------------------------------------------- decode
def affine_rounding_tol(coords_hm: torch.Tensor, affine: torch.Tensor | None, rtol: float = 1e-6) -> torch.Tensor:
    """Per-coordinate bound for float32 rounding of ``A @ (x, y, 1)``: ``rtol * (|a0 x| + |a1 y| + |a2|)``."""
    if affine is None:
        return torch.zeros_like(coords_hm, dtype=torch.float64)
    A = _cpu64(affine)[:, None]  # [B, 1, 2, 3]
    x = _cpu64(coords_hm)[..., 0:1].abs()
    y = _cpu64(coords_hm)[..., 1:2].abs()
    mag = A[..., 0].abs() * x + A[..., 1].abs() * y + A[..., 2].abs()
    return rtol * mag + 1e-30


def affine_px_scale(affine: torch.Tensor | None, K: int) -> torch.Tensor:
    """``[B, K, 2]`` factor turning a heatmap-pixel error into an output-coordinate error."""
    if affine is None:
        return torch.tensor(1.0, dtype=torch.float64)
    A = _cpu64(affine)
    s = A[:, :, 0].abs() + A[:, :, 1].abs()  # [B, 2]
    return s[:, None, :].expand(-1, K, -1)


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
    from .ops.decode import gaussian_kernel_1d

    x = _cpu64(heatmaps)
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


def refined_error(out_coords, heatmaps, mode, affine, blur_kernel, ref_coords, *, atol_px: float = 1e-4):
    """dark / udp: per coordinate ``(err, tol, spec)`` with ``err = |out - spec64|`` and
    ``tol = 2 |ref32 - spec64| + (atol + 2 noise) * scale + 2 affine rounding`` (see the module
    docstring and :func:`decode_spec_f64`).  A coordinate passes when ``err <= tol`` or the
    reference is NaN there (the caller checks that the NaN patterns agree).  Finite heatmaps only."""
    spec, _, noise = decode_spec_f64(heatmaps, mode, None, blur_kernel, return_noise=True)
    coords_hm = spec
    if affine is not None:
        spec = decode_spec_f64(heatmaps, mode, affine, blur_kernel)[0]
    K = heatmaps.shape[1]
    ref = _cpu64(ref_coords)
    out = _cpu64(out_coords)
    scale = affine_px_scale(affine, K)
    ref_err = (ref - spec).abs()
    tol = 2 * ref_err + (atol_px + 2 * noise) * scale + 2 * affine_rounding_tol(coords_hm, affine)
    err = (out - spec).abs()
    return err, tol, spec
