"""``decode_heatmaps``: every backend against the reference (the spec), edge cases, errors,
opcheck / torch.compile, and independent checks against the NumPy anchors (HRNet,
DarkPose, MMPose) written from the published code.

Tolerances:
* argmax / quarter coordinates and all scores: bit-exact (``torch.equal``, NaN-aware);
  with an affine, within float32 rounding of ``A @ (x, y, 1)`` (rtol 1e-6 of
  ``|a0 x| + |a1 y| + |a2|``).
* dark / udp: ``|out - spec64| <= 1e-4 px + 2 |ref32 - spec64| + 2 noise`` per coordinate
  (``utils.check_refined``): ``spec64`` is the spec evaluated in float64, ``ref32 - spec64`` the
  float32 reference's own error (flash-attention's rule) and ``noise`` a first-order bound on
  the float32 error of the Newton step from the conditioning of its Hessian.  Both are
  ~1e-5 px on Gaussian blobs (bound ~2e-4 px) and only grow where the problem is
  ill-conditioned (2x3 maps, kernels wider than the map).  On realistic map sizes
  additionally ``|out - ref32| <= 1e-4 px``.
* float16 / bfloat16: the op loads then computes in float32, so it must match the
  reference run on the same low-precision input, and its error against the float32 decode
  of the original float32 heatmap may be at most 2x the reference's (+1e-4 px).
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch

import mipnet_kernels as mk
import anchors as na
from mipnet_kernels.ops.decode import decode_heatmaps_reference, gaussian_kernel_1d
from utils import (
    LAYOUTS,
    affine_rounding_tol,
    assert_exact,
    backend_device_params,
    backend_params,
    blob_heatmaps,
    check_refined,
    decode_on,
    decode_spec_f64,
    gaussian_blob,
    max_abs,
    random_affine,
    relayout,
    skip_unless_runs,
)

MODES = ("argmax", "quarter", "dark", "udp")
EXACT_MODES = ("argmax", "quarter")
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DTYPES = (F32, F16, BF16)

# Odd sizes: nothing is a multiple of anything; K covers 1, CrowdPose, COCO, COCO-WholeBody.
SHAPES = [
    (1, 1, 1, 1),
    (2, 1, 2, 3),
    (2, 14, 7, 5),
    (1, 17, 33, 27),
    (2, 17, 64, 48),
    (1, 133, 64, 48),
    (2, 3, 96, 72),  # 384x288 input: more than one 4096-pixel scan chunk
]
# Triton under the interpreter (CPU): few, small maps.
INTERP_SHAPES = [(1, 1, 1, 1), (2, 1, 2, 3), (1, 3, 7, 5), (1, 2, 33, 27), (1, 1, 96, 72)]

REALISTIC_MIN_SIDE = 27  # maps this large hold a whole blob: the 1e-4 px bound applies directly


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def _reference(hm, mode, affine=None, blur_kernel=11):
    """The spec, always evaluated on CPU (cuDNN's TF32 must not blur the yardstick)."""
    return decode_heatmaps_reference(
        hm.detach().cpu(), mode, None if affine is None else affine.detach().cpu(), blur_kernel
    )


def _check_outputs(coords, scores, B, K, device):
    assert coords.shape == (B, K, 2) and scores.shape == (B, K)
    assert coords.dtype == torch.float32 and scores.dtype == torch.float32
    assert coords.device.type == device.type and scores.device.type == device.type
    assert coords.is_contiguous() and scores.is_contiguous()


def _check_against_reference(coords, scores, hm, mode, affine=None, blur_kernel=11, what=""):
    ref_c, ref_s = _reference(hm, mode, affine, blur_kernel)
    assert_exact(scores, ref_s, f"{what} scores")
    if mode in EXACT_MODES:
        if affine is None:
            assert_exact(coords, ref_c, f"{what} coords")
        else:
            hm_c, _ = _reference(hm, mode, None, blur_kernel)
            tol = affine_rounding_tol(hm_c, affine)
            err = (coords.detach().cpu().double() - ref_c.double()).abs()
            assert bool((err <= tol).all()), f"{what}: affine coords off by {float((err - tol).max()):.3g} beyond rtol 1e-6"
    else:
        check_refined(coords, hm, mode, affine, blur_kernel, ref_c, what=what)
    return ref_c, ref_s


# --------------------------------------------------------------------------- vs reference
MAIN_CASES = [(s, m, d) for s in SHAPES for m in MODES for d in DTYPES]
INTERP_MAIN = [(s, m, F32) for s in INTERP_SHAPES for m in MODES] + [
    ((1, 3, 7, 5), m, d) for m in MODES for d in (F16, BF16)
]


@pytest.mark.parametrize("backend, device, shape, mode, dtype", backend_params(MAIN_CASES, INTERP_MAIN))
def test_matches_reference(backend, device, shape, mode, dtype):
    dev = skip_unless_runs(backend, device)
    B, K, H, W = shape
    hm32, _ = blob_heatmaps(*shape, seed=_seed(shape))
    hm = hm32.to(dtype)
    hm_dev = hm.to(dev)
    coords, scores = decode_on(backend, hm_dev, mode)
    _check_outputs(coords, scores, B, K, dev)
    assert torch.equal(hm_dev.cpu(), hm), "the op must not modify its input"
    ref_c, _ = _check_against_reference(coords, scores, hm, mode, what=f"{backend}/{mode}/{dtype}")
    if mode not in EXACT_MODES and min(H, W) >= REALISTIC_MIN_SIDE:
        assert max_abs(coords, ref_c) <= 1e-4, f"{backend}/{mode}: {max_abs(coords, ref_c):.3g} px from the reference"
    if dtype != F32:
        # Flash-attention's rule against the float32 decode of the original float32 map.
        truth, _ = _reference(hm32, mode)
        err, ref_err = max_abs(coords, truth), max_abs(ref_c, truth)
        assert err <= 2 * ref_err + 1e-4, f"{dtype} error {err:.3g} px > 2 x reference's {ref_err:.3g} px"


def test_reference_matches_float64_spec_on_blobs():
    """The float32 reference is within 5e-5 px of the float64 reading of the spec."""
    hm, _ = blob_heatmaps(3, 17, 64, 48, seed=11)
    for mode in MODES:
        ref, _ = decode_heatmaps_reference(hm, mode, None, 11)
        spec, _ = decode_spec_f64(hm, mode, None, 11)
        assert max_abs(ref, spec) <= (0 if mode in EXACT_MODES else 5e-5), mode


def test_dark_udp_recover_blob_centres():
    """Sanity of the spec itself: on noise-free sigma-2 blobs well inside the map, DARK and
    UDP recover the sub-pixel centre to < 0.02 px, quarter to <= 0.25 px, argmax to <= 0.5."""
    hm, centres = blob_heatmaps(4, 17, 64, 48, seed=5, noise=0.0, margin=8)
    bounds = {"argmax": 0.5 + 1e-6, "quarter": 0.25 + 1e-6, "dark": 0.02, "udp": 0.02}
    for mode, bound in bounds.items():
        coords, _ = decode_heatmaps_reference(hm, mode, None, 11)
        assert max_abs(coords, centres) <= bound, (mode, max_abs(coords, centres))


# --------------------------------------------------------------------------- strides
LAYOUT_CASES = [(lay, m, d) for lay in LAYOUTS for m in MODES for d in (F32, BF16)]
INTERP_LAYOUT = [(lay, m, F32) for lay in LAYOUTS for m in ("quarter", "dark", "udp")]


@pytest.mark.parametrize("backend, device, layout, mode, dtype", backend_params(LAYOUT_CASES, INTERP_LAYOUT))
def test_strides(backend, device, layout, mode, dtype):
    dev = skip_unless_runs(backend, device)
    hm32, _ = blob_heatmaps(3, 5, 17, 13, seed=_seed("layout", layout))
    hm = relayout(hm32.to(dtype).to(dev), layout)
    coords, scores = decode_on(backend, hm, mode)
    _check_outputs(coords, scores, 3, 5, dev)
    _check_against_reference(coords, scores, hm, mode, what=f"{backend}/{layout}/{mode}")
    if layout == "expanded":  # every batch entry is the same map
        assert_exact(coords, coords[:1].expand_as(coords).contiguous(), "expanded batch")


# --------------------------------------------------------------------------- affine
AFFINE_CASES = [(m, kind) for m in MODES for kind in ("float32", "float64", "strided")]
INTERP_AFFINE = [(m, "float32") for m in MODES] + [("quarter", "float64")]


@pytest.mark.parametrize("backend, device, mode, kind", backend_params(AFFINE_CASES, INTERP_AFFINE))
def test_affine(backend, device, mode, kind):
    dev = skip_unless_runs(backend, device)
    shape = (2, 3, 33, 27) if device == "cpu" and backend == "triton" else (3, 17, 64, 48)
    B, K = shape[:2]
    hm, _ = blob_heatmaps(*shape, seed=_seed("affine", mode))
    hm = hm.to(dev)
    A = random_affine(B, seed=B + K, device=dev)
    if kind == "float64":
        A_in = A.double()
    elif kind == "strided":
        A_in = A.transpose(1, 2).contiguous().transpose(1, 2)
        assert not A_in.is_contiguous()
    else:
        A_in = A
    coords, scores = decode_on(backend, hm, mode, A_in)
    _check_outputs(coords, scores, B, K, dev)
    _check_against_reference(coords, scores, hm, mode, A, what=f"{backend}/{mode}/affine {kind}")
    if kind != "float32":  # the op rounds the affine to contiguous float32 first
        same, _ = decode_on(backend, hm, mode, A)
        assert_exact(coords, same, f"{kind} affine vs its float32 contiguous copy")
    # The affine is applied after the refinement: out(A) == A @ out(None) up to rounding.
    plain, plain_s = decode_on(backend, hm, mode, None)
    assert_exact(scores, plain_s, "scores do not depend on the affine")
    expected = torch.einsum("bij,bkj->bki", A.cpu().double()[:, :, :2], plain.cpu().double()) + A.cpu().double()[:, None, :, 2]
    tol = 2 * affine_rounding_tol(plain, A)
    err = (coords.cpu().double() - expected).abs()
    assert bool((err <= tol).all()), f"affine not applied to the refined coordinates: {float((err - tol).max()):.3g}"


# --------------------------------------------------------------------------- ties, borders
def _tie_maps(dtype):
    """Maps with several equal maxima and the first maximum (row-major) they must give."""
    H, W = 12, 11
    g = torch.Generator().manual_seed(3)
    base = 0.3 * torch.rand(6, H, W, generator=g)
    maps, expected = [], []

    m = base[0].clone(); m[3, 5] = m[3, 9] = m[7, 2] = 1.0; maps.append(m); expected.append((5, 3))
    m = base[1].clone(); m[6, 8] = m[6, 3] = 1.0; maps.append(m); expected.append((3, 6))
    maps.append(torch.full((H, W), 0.5)); expected.append((0, 0))  # constant map
    m = base[3].clone(); m[H - 1, W - 1] = m[0, 0] = 1.0; maps.append(m); expected.append((0, 0))
    m = base[4].clone(); m[4:7, 4:7] = 1.0; maps.append(m); expected.append((4, 4))  # plateau
    # 1 + 2^-12 is a strict maximum in float32 but rounds to 1.0 in float16 / bfloat16: a tie.
    m = base[5].clone(); m[1, 8] = 1.0; m[5, 5] = 1.0 + 2.0**-12; maps.append(m)
    expected.append((5, 5) if dtype == F32 else (8, 1))
    hm = torch.stack(maps)[None].to(dtype)
    return hm, torch.tensor(expected, dtype=torch.float32)[None]


@pytest.mark.parametrize(
    "backend, device, dtype, layout",
    backend_params([(d, lay) for d in DTYPES for lay in ("contiguous", "channels_last")], [(F32, "contiguous"), (BF16, "channels_last")]),
)
def test_ties_first_maximum_wins(backend, device, dtype, layout):
    dev = skip_unless_runs(backend, device)
    hm, expected = _tie_maps(dtype)
    hm = relayout(hm, layout)
    coords, scores = decode_on(backend, hm.to(dev), "argmax")
    assert_exact(coords, expected, "argmax of tied maxima")
    for mode in MODES:
        coords, scores = decode_on(backend, hm.to(dev), mode)
        _check_against_reference(coords, scores, hm, mode, what=f"ties/{mode}")
    # plateau: quarter offset toward the plateau's interior on both axes
    q, _ = decode_on(backend, hm.to(dev), "quarter")
    assert q[0, 4].tolist() == [4.25, 4.25]


def _long_map_cases(H, W):
    """(flat indices set to the maximum, NaN flat index or None) for maps longer than one
    scan chunk / vector: ties straddling chunk (4096) and lane (8, 16, 32, 64) boundaries."""
    n = H * W
    return [
        ([4095, 4096], None),
        ([4096, 5000], None),
        ([n - 1], None),
        ([0, 1], None),
        ([63, 64], None),
        ([15, 16, 31, 32], None),
        ([n - 2, n - 1], None),
        (list(range(97, n, 97)), None),
        ([17], n - 1),  # NaN at the very end
        ([5000], 4096),  # NaN at a chunk start, maximum later
        ([7], 8),
    ]


@pytest.mark.parametrize(
    "backend, device, shape, layout",
    backend_params(
        [((1, 11, 96, 72), "contiguous"), ((1, 11, 128, 96), "channels_last"), ((2, 11, 72, 96), "sliced")],
        [((1, 11, 96, 72), "contiguous"), ((1, 11, 72, 96), "channels_last")],
    ),
)
def test_long_maps_first_maximum_and_nan(backend, device, shape, layout):
    dev = skip_unless_runs(backend, device)
    B, K, H, W = shape
    cases = _long_map_cases(H, W)
    assert len(cases) == K
    g = torch.Generator().manual_seed(8)
    hm = 0.5 * torch.rand(B, K, H * W, generator=g)
    expected = torch.empty(B, K, 2)
    nan_maps = torch.zeros(B, K, dtype=torch.bool)
    for k, (tied, nan_at) in enumerate(cases):
        hm[:, k, tied] = 1.0
        first = min(tied)
        expected[:, k] = torch.tensor([first % W, first // W], dtype=torch.float32)
        if nan_at is not None:
            hm[:, k, nan_at] = float("nan")
            nan_maps[:, k] = True
    hm = relayout(hm.reshape(B, K, H, W).to(dev), layout)
    coords, scores = decode_on(backend, hm, "argmax")
    coords, scores = coords.cpu(), scores.cpu()
    assert bool(torch.isnan(coords[nan_maps]).all()) and bool(torch.isnan(scores[nan_maps]).all())
    assert_exact(coords[~nan_maps], expected[~nan_maps], "first maximum of long maps")
    assert_exact(scores[~nan_maps], torch.ones(int((~nan_maps).sum())), "scores")
    for mode in MODES[1:]:
        c, s = decode_on(backend, hm, mode)
        _check_against_reference(c, s, hm, mode, what=f"long maps/{mode}")


def _border_maps(H=13, W=11):
    """One blob per map with its peak pixel on / next to the borders and corners; the centre
    sits at (+0.3, -0.2) px from the peak pixel so the refinements have a direction."""
    peaks = [
        (0, 0), (W - 1, 0), (0, H - 1), (W - 1, H - 1), (1, 1), (2, 2), (W - 2, H - 2), (W - 3, H - 3),
        (5, 0), (0, 6), (1, 6), (2, 6), (W - 2, 6), (W - 3, 6), (5, 1), (5, 2), (5, H - 2), (5, H - 3),
    ]
    maps = [gaussian_blob(H, W, x + 0.3, y - 0.2, sigma=1.5) for x, y in peaks]
    return torch.stack(maps)[None], peaks


@pytest.mark.parametrize("backend, device", backend_device_params())
def test_maxima_at_borders_and_corners(backend, device):
    dev = skip_unless_runs(backend, device)
    hm, peaks = _border_maps()
    H, W = hm.shape[-2:]
    results = {}
    for mode in MODES:
        coords, scores = decode_on(backend, hm.to(dev), mode)
        _check_against_reference(coords, scores, hm, mode, what=f"borders/{mode}")
        results[mode] = coords.cpu()[0]
    for k, (x, y) in enumerate(peaks):
        assert results["argmax"][k].tolist() == [x, y]
        inner_q = 1 < x < W - 1 and 1 < y < H - 1  # HRNet's guard
        assert results["quarter"][k].tolist() == ([x + 0.25, y - 0.25] if inner_q else [x, y]), (x, y)
        inner_d = 1 < x < W - 2 and 1 < y < H - 2  # DarkPose's guard
        if not inner_d:
            assert results["dark"][k].tolist() == [x, y], (x, y)
        else:  # refined toward the blob centre
            assert results["dark"][k][0] > x and results["dark"][k][1] < y, (x, y, results["dark"][k])
        # UDP has no guard; its reflect-101 blur mirrors blobs this close to an edge, so
        # its answers here are checked against MMPose's post_dark_udp instead
        # (test_anchors_at_borders), not by hand.


@pytest.mark.parametrize("backend, device", backend_device_params())
def test_quarter_hand_computed(backend, device):
    dev = skip_unless_runs(backend, device)
    hm = torch.zeros(1, 3, 6, 7)
    hm[0, 0, 3, 2] = 5.0  # peak at x=2, y=3
    hm[0, 0, 3, 3], hm[0, 0, 3, 1] = 2.0, 1.0  # right > left -> +0.25
    hm[0, 0, 4, 2], hm[0, 0, 2, 2] = 1.0, 3.0  # below < above -> -0.25
    hm[0, 1, 2, 4] = 5.0  # equal neighbours on both axes -> no offset
    hm[0, 1] -= 1.0
    hm[0, 2].fill_(float("-inf"))  # -inf - -inf is NaN: sign 0, no offset
    hm[0, 2, 3, 3] = 1.0
    coords, scores = decode_on(backend, hm.to(dev), "quarter")
    assert coords.cpu().tolist() == [[[2.25, 2.75], [4.0, 2.0], [3.0, 3.0]]]
    assert scores.cpu().tolist() == [[5.0, 4.0, 1.0]]


# --------------------------------------------------------------------------- DARK fallback
def _dark_fallback_maps():
    """Maps where the 1e-10 log floor or a non-positive blurred maximum matters, i.e. where
    the rescale ``c = max(hm) / max(blur)`` does not cancel in the finite differences."""
    H, W = 20, 18
    cx, cy = 8.3, 9.6
    maps, names = [], []
    for amp in (1e-11, 5e-11, 1e-10, 1.2e-10, 1.5e-10, 2e-10, 3e-10, 5e-10, 1e-9, 1e-7):
        maps.append(gaussian_blob(H, W, cx, cy, amp=amp)); names.append(f"tiny amplitude {amp:g}")
    m = gaussian_blob(H, W, cx, cy); m[8:12, 10:13] = -3.0  # negative block right of the peak
    maps.append(m); names.append("negative block near the peak")
    m = gaussian_blob(H, W, cx, cy); m[8:12, 10] = 0.0; m[7, 7:10] = -0.05
    maps.append(m); names.append("zeros and small negatives near the peak")
    m = gaussian_blob(H, W, cx, cy, sigma=1.0, amp=1.3) - 1.0  # max 0.3 > 0, blurred max < 0: c < 0
    maps.append(m); names.append("positive peak, negative blurred maximum")
    m = torch.full((H, W), -1.0); m[10, 8] = 0.01
    maps.append(m); names.append("positive spike in a negative map")
    m = gaussian_blob(H, W, cx, cy, amp=0.5) - 1.0  # max < 0: no step
    maps.append(m); names.append("negative maximum")
    m = gaussian_blob(H, W, cx, cy); m[0:3, :] = -2.0; m[:, 15:] = -2.0  # far away: fast path
    maps.append(m); names.append("negative far from the peak")
    m = gaussian_blob(H, W, 2.4, 2.3, amp=1e-10)  # tiny blob next to the zero padding
    maps.append(m); names.append("tiny blob at the border")
    return torch.stack(maps)[None], names


@pytest.mark.parametrize("backend, device", backend_device_params())
def test_dark_exact_fallback(backend, device):
    dev = skip_unless_runs(backend, device)
    hm, names = _dark_fallback_maps()
    coords, scores = decode_on(backend, hm.to(dev), "dark")
    ref_c, ref_s = decode_heatmaps_reference(hm, "dark", None, 11)
    assert_exact(scores, ref_s, "scores")
    for k, name in enumerate(names):
        check_refined(coords[:, k : k + 1], hm[:, k : k + 1], "dark", None, 11, ref_c[:, k : k + 1], what=name)
    # The maps exercise the slow path: skipping the rescale (log(s) instead of log(c*s))
    # would move these (checked on the reference so this test cannot go vacuous).
    for name in ("tiny amplitude 1.5e-10", "positive peak, negative blurred maximum"):
        assert ref_c[0, names.index(name)].tolist() != [8.0, 10.0], name
    # no step at all when the original maximum is <= 0 (DarkPose divides by it)
    k = names.index("negative maximum")
    assert coords.cpu()[0, k].tolist() == [8.0, 10.0]


def test_dark_fallback_reference_matches_darkpose():
    """The spec's rescale/clamp semantics are DarkPose's (positive maxima: DarkPose zeroes
    the coordinates of maps whose maximum is <= 0)."""
    hm, names = _dark_fallback_maps()
    ref, _ = decode_heatmaps_reference(hm, "dark", None, 11)
    anchor, maxvals = na.darkpose_get_final_preds(hm.numpy(), None, 11)
    spec, _ = decode_spec_f64(hm, "dark", None, 11)
    positive = torch.from_numpy(maxvals[..., 0] > 0)
    for k, name in enumerate(names):
        if not positive[0, k]:
            continue
        tol = 1e-4 + 2 * (ref[0, k].double() - spec[0, k]).abs()
        err = (torch.from_numpy(anchor[0, k]).double() - ref[0, k].double()).abs()
        assert bool((err <= tol).all()), (name, anchor[0, k], ref[0, k])


# --------------------------------------------------------------------------- blur sizes, grid
BLUR_CASES = [(k, m, s) for k in (1, 3, 5, 7, 9, 13, 21, 31) for m in ("dark", "udp") for s in ((2, 5, 33, 27), (1, 3, 7, 5))]
INTERP_BLUR = [(1, "dark", (1, 3, 7, 5)), (3, "udp", (1, 3, 7, 5)), (31, "udp", (1, 3, 7, 5)), (31, "dark", (1, 2, 33, 27))]


@pytest.mark.parametrize("backend, device, blur_kernel, mode, shape", backend_params(BLUR_CASES, INTERP_BLUR))
def test_blur_kernel_sizes(backend, device, blur_kernel, mode, shape):
    """Every odd size up to 31, including kernels far wider than the map (reflect-101 wraps)."""
    dev = skip_unless_runs(backend, device)
    hm, _ = blob_heatmaps(*shape, seed=_seed("blur", blur_kernel, shape))
    coords, scores = decode_on(backend, hm.to(dev), mode, None, blur_kernel)
    _check_against_reference(coords, scores, hm, mode, None, blur_kernel, what=f"{mode} k={blur_kernel}")


@pytest.mark.slow
@pytest.mark.parametrize("backend, device, shape", backend_params([((1, 70000, 3, 2),), ((70000, 1, 2, 3),)], []))
def test_many_maps(backend, device, shape):
    """More maps than a CUDA grid's y/z dimension holds (65535)."""
    dev = skip_unless_runs(backend, device)
    hm = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    for mode in MODES:
        coords, scores = decode_on(backend, hm.to(dev), mode)
        _check_against_reference(coords, scores, hm, mode, what=f"many maps/{mode}")


# --------------------------------------------------------------------------- degenerate maps
@pytest.mark.parametrize("backend, device, dtype", backend_params([F32, BF16], [F32]))
def test_constant_and_zero_maps(backend, device, dtype):
    dev = skip_unless_runs(backend, device)
    maps = [torch.zeros(9, 8), torch.full((9, 8), 0.5), torch.full((9, 8), -2.0), torch.full((9, 8), -math.inf)]
    hm = torch.stack(maps)[None].to(dtype)
    for mode in MODES:
        coords, scores = decode_on(backend, hm.to(dev), mode)
        assert coords.cpu().tolist() == [[[0.0, 0.0]] * 4], mode
        assert scores.cpu().tolist() == [[0.0, 0.5, -2.0, -math.inf]], mode
    one = torch.rand(2, 3, 1, 1, generator=torch.Generator().manual_seed(0)).to(dtype)  # 1x1 maps
    for mode in MODES:
        coords, scores = decode_on(backend, one.to(dev), mode)
        assert coords.cpu().tolist() == [[[0.0, 0.0]] * 3] * 2, mode
        assert_exact(scores, one.float()[..., 0, 0], f"1x1 scores/{mode}")


def _nan_maps():
    hm, _ = blob_heatmaps(2, 4, 9, 8, seed=7)
    nan = float("nan")
    hm[0, 0, 0, 0] = nan  # first element
    hm[0, 2, 8, 7] = nan  # last element
    hm[1, 1, 4, 4] = nan  # next to / at the peak region
    hm[1, 3] = nan  # all NaN
    poisoned = torch.zeros(2, 4, dtype=torch.bool)
    poisoned[0, 0] = poisoned[0, 2] = poisoned[1, 1] = poisoned[1, 3] = True
    return hm, poisoned


@pytest.mark.parametrize("backend, device, mode", backend_params(MODES))
def test_nan_maps(backend, device, mode):
    dev = skip_unless_runs(backend, device)
    hm, poisoned = _nan_maps()
    clean, _ = blob_heatmaps(2, 4, 9, 8, seed=7)
    coords, scores = decode_on(backend, hm.to(dev), mode)
    coords, scores = coords.cpu(), scores.cpu()
    assert bool(torch.isnan(scores[poisoned]).all()), "a map containing NaN must score NaN"
    assert bool(torch.isnan(coords[poisoned]).all()), "a map containing NaN must give NaN coordinates"
    assert not bool(torch.isnan(scores[~poisoned]).any()) and not bool(torch.isnan(coords[~poisoned]).any())
    # the other maps are decoded as if the NaN maps were not there
    want_c, want_s = decode_on(backend, clean.to(dev), mode)
    assert_exact(scores[~poisoned], want_s.cpu()[~poisoned], "scores of clean maps")
    assert_exact(coords[~poisoned], want_c.cpu()[~poisoned], "coords of clean maps")
    if mode not in EXACT_MODES:
        ref_clean, _ = _reference(clean, mode)
        check_refined(coords[~poisoned][None], clean[~poisoned][None], mode, None, 11, ref_clean[~poisoned][None])
    ref_c, ref_s = _reference(hm, mode)
    assert_exact(scores, ref_s, "scores vs reference")
    if mode in EXACT_MODES:
        assert_exact(coords, ref_c, "coords vs reference")


@pytest.mark.parametrize("backend, device, mode", backend_params(MODES))
def test_infinite_values(backend, device, mode):
    """+inf is the maximum (score inf); -inf around the peak gives no quarter offset."""
    dev = skip_unless_runs(backend, device)
    hm = torch.rand(1, 3, 9, 8, generator=torch.Generator().manual_seed(1))
    hm[0, 0, 4, 3] = float("inf")
    hm[0, 1].fill_(float("-inf")); hm[0, 1, 5, 5] = 1.0
    hm[0, 2, 2, 2] = float("-inf")
    coords, scores = decode_on(backend, hm.to(dev), mode)
    ref_c, ref_s = _reference(hm, mode)
    assert_exact(scores, ref_s, "scores")
    assert scores[0, 0].item() == math.inf
    if mode in EXACT_MODES:
        assert_exact(coords, ref_c, "coords")
        assert coords.cpu()[0, 1].tolist() == [5.0, 5.0]  # sign(-inf - -inf) = sign(NaN) = 0
    if mode == "argmax":
        assert coords.cpu()[0, 0].tolist() == [3.0, 4.0]
    # +-inf never gives NaN coordinates (issue 13: DARK returned NaN for an +inf peak); the
    # refined modes keep the integer argmax where the Newton offset is not finite.
    assert torch.isfinite(coords).all(), coords
    if mode in ("dark", "udp"):
        assert coords.cpu()[0, 1].tolist() == [5.0, 5.0]


@pytest.mark.parametrize("backend, device", backend_params())
@pytest.mark.parametrize("mode", ["dark", "udp"])
def test_overflowed_fp16_peak_keeps_integer_argmax(backend, device, mode):
    """An fp16 map that overflowed at its peak ((7e4 * gaussian).half(): a block of +inf):
    finite coordinates on every backend, the integer argmax (issue 13)."""
    dev = skip_unless_runs(backend, device)
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(48.0), indexing="ij")
    hm = (7e4 * torch.exp(-((xx - 20.3) ** 2 + (yy - 30.6) ** 2) / 8)).half()[None, None]
    assert torch.isinf(hm).any()
    coords, scores = decode_on(backend, hm.to(dev), mode)
    assert coords.cpu()[0, 0].tolist() == [20.0, 30.0] and scores.cpu()[0, 0].item() == math.inf


# --------------------------------------------------------------------------- empty inputs
@pytest.mark.parametrize(
    "backend, device, shape",
    backend_params([(s,) for s in [(0, 17, 64, 48), (2, 0, 64, 48), (0, 0, 5, 5), (0, 3, 0, 0), (3, 0, 0, 4)]]),
)
def test_empty(backend, device, shape):
    dev = skip_unless_runs(backend, device)
    B, K = shape[:2]
    hm = torch.rand(shape, device=dev)
    for mode in MODES:
        for affine in (None, torch.rand(B, 2, 3, device=dev)):
            coords, scores = decode_on(backend, hm, mode, affine)
            _check_outputs(coords, scores, B, K, dev)


# --------------------------------------------------------------------------- bad input
def _hm(*shape, **kw):
    return torch.rand(*(shape or (2, 3, 8, 6)), **kw)


BAD_INPUTS = [
    pytest.param(lambda: (_hm(3, 8, 6), "quarter", None, 11), ValueError, r"heatmaps must be 4-D", id="rank3"),
    pytest.param(lambda: (_hm(1, 2, 3, 8, 6), "quarter", None, 11), ValueError, r"heatmaps must be 4-D", id="rank5"),
    pytest.param(lambda: (_hm().to(torch.int32), "quarter", None, 11), ValueError, r"heatmaps must be float32.*int32", id="int32"),
    pytest.param(lambda: (_hm() > 0.5, "quarter", None, 11), ValueError, r"heatmaps must be float32.*bool", id="bool"),
    pytest.param(lambda: (_hm().double(), "dark", None, 11), ValueError, r"heatmaps must be float32.*float64", id="float64"),
    pytest.param(lambda: (_hm(1, 17, 0, 48), "quarter", None, 11), ValueError, r"heatmaps has an empty spatial size 0x48", id="H0"),
    pytest.param(lambda: (_hm(1, 1, 5, 0), "argmax", None, 11), ValueError, r"heatmaps has an empty spatial size 5x0", id="W0"),
    pytest.param(lambda: (_hm(), "bogus", None, 11), ValueError, r"mode must be one of .*'bogus'", id="mode"),
    pytest.param(lambda: (_hm(), "DARK", None, 11), ValueError, r"mode must be one of", id="mode-case"),
    pytest.param(lambda: (_hm(), "dark", None, 10), ValueError, r"blur_kernel must be an odd int .* got 10", id="k-even"),
    pytest.param(lambda: (_hm(), "dark", None, 33), ValueError, r"blur_kernel must be an odd int in \[1, 31\]", id="k-too-large"),
    pytest.param(lambda: (_hm(), "dark", None, 0), ValueError, r"blur_kernel", id="k-zero"),
    pytest.param(lambda: (_hm(), "udp", None, -3), ValueError, r"blur_kernel", id="k-negative"),
    pytest.param(lambda: (_hm(), "udp", None, True), ValueError, r"blur_kernel", id="k-bool"),
    pytest.param(lambda: (_hm(), "quarter", torch.rand(2, 3, 3), 11), ValueError, r"affine must have shape \[B, 2, 3\] = \[2, 2, 3\].*\(2, 3, 3\)", id="affine-3x3"),
    pytest.param(lambda: (_hm(), "quarter", torch.rand(3, 2, 3), 11), ValueError, r"affine must have shape", id="affine-batch"),
    pytest.param(lambda: (_hm(), "quarter", torch.rand(2, 3), 11), ValueError, r"affine must have shape", id="affine-2d"),
    pytest.param(lambda: (_hm(), "quarter", torch.ones(2, 2, 3, dtype=torch.int64), 11), ValueError, r"affine must be a floating-point tensor", id="affine-int"),
    pytest.param(lambda: (_hm(), "quarter", torch.rand(2, 2, 3, device="meta"), 11), ValueError, r"affine is on meta but heatmaps is on cpu", id="affine-device"),
    pytest.param(lambda: ([[1.0, 2.0]], "quarter", None, 11), (TypeError, RuntimeError), r"heatmaps", id="not-a-tensor"),
    pytest.param(lambda: (_hm(), "quarter", [[1.0, 0, 0], [0, 1.0, 0]], 11), (TypeError, RuntimeError), r"affine", id="affine-list"),
    pytest.param(lambda: (_hm(), "dark", None, 3.0), (TypeError, RuntimeError, ValueError), r"blur_kernel", id="k-float"),
]


@pytest.mark.parametrize("make_args, exc, match", BAD_INPUTS)
def test_bad_input(make_args, exc, match, request):
    args = make_args()
    with pytest.raises(exc, match=match):
        mk.decode_heatmaps(*args)
    if request.node.callspec.id == "k-bool":
        return  # torch's schema parser turns True into 1 before the op sees it: the wrapper's job
    with pytest.raises(exc, match=match):  # the op itself, not only the Python wrapper
        torch.ops.mipnet.decode_heatmaps(*args)


@pytest.mark.cuda
def test_bad_input_device_mismatch_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device (torch.cuda.is_available() is False)")
    with pytest.raises(ValueError, match=r"affine is on cpu but heatmaps is on cuda"):
        mk.decode_heatmaps(_hm(device="cuda"), "dark", torch.rand(2, 2, 3))


# --------------------------------------------------------------------------- opcheck / compile
OPCHECK_CASES = [(m, a) for m in MODES for a in (False, True)]
INTERP_OPCHECK = [("quarter", True), ("dark", False), ("udp", True)]


@pytest.mark.parametrize("backend, device, mode, with_affine", backend_params(OPCHECK_CASES, INTERP_OPCHECK))
def test_opcheck_decode(backend, device, mode, with_affine):
    dev = skip_unless_runs(backend, device)
    hm, _ = blob_heatmaps(2, 3, 9, 8, seed=2)
    hm = hm.to(dev)
    affine = random_affine(2, device=dev) if with_affine else None
    decode_on(backend, hm, mode, affine)  # skips if the backend declares these inputs unsupported
    with mk.use_backend(backend):
        torch.library.opcheck(torch.ops.mipnet.decode_heatmaps.default, (hm, mode, affine, 11))


def _decode_and_merge(hm, flipped, affine):
    merged = mk.flip_merge(hm, flipped, mk.COCO_FLIP_PAIRS)
    coords, scores = mk.decode_heatmaps(merged, "dark", affine)
    q, _ = mk.decode_heatmaps(hm, "quarter", affine, 11)
    return coords * 2.0, scores + 1.0, q


_compiled = {}


@pytest.mark.parametrize("backend, device", backend_device_params())
def test_torch_compile_fullgraph(backend, device):
    dev = skip_unless_runs(backend, device)
    fn = _compiled.setdefault("fn", torch.compile(_decode_and_merge, fullgraph=True, backend="aot_eager"))
    hm, _ = blob_heatmaps(2, 17, 16, 12, seed=4)
    flipped, _ = blob_heatmaps(2, 17, 16, 12, seed=5)
    affine = random_affine(2)
    args = (hm.to(dev), flipped.to(dev), affine.to(dev))
    decode_on(backend, args[0], "dark", args[2])
    with mk.use_backend(backend):
        got = fn(*args)
        want = _decode_and_merge(*args)
    for g, w in zip(got, want):
        assert_exact(g, w, "compiled vs eager")


# --------------------------------------------------------------------------- NumPy anchors
ANCHOR_SHAPE = (4, 17, 64, 48)
INTERP_ANCHOR_SHAPE = (2, 3, 20, 17)


def _anchor_inputs(backend, device, seed):
    shape = INTERP_ANCHOR_SHAPE if (backend, device) == ("triton", "cpu") else ANCHOR_SHAPE
    hm, _ = blob_heatmaps(*shape, seed=seed)
    assert bool((hm.flatten(2).amax(-1) > 0).all())  # the anchors zero / -1 non-positive maxima
    B = shape[0]
    g = np.random.default_rng(seed)
    affines = []
    for b in range(B):  # HRNet's heatmap -> image transform for a random person box
        w, h = g.uniform(40, 300), g.uniform(60, 400)
        center, scale = na.box_to_center_scale(g.uniform(0, 400), g.uniform(0, 300), w, h)
        affines.append(na.get_affine_transform(center, scale, 0, [shape[3], shape[2]], inv=1))
    return hm, np.stack(affines)


@pytest.mark.parametrize("backend, device", backend_device_params())
def test_hrnet_get_final_preds(backend, device):
    dev = skip_unless_runs(backend, device)
    hm, affine_np = _anchor_inputs(backend, device, seed=21)
    affine = torch.from_numpy(affine_np)  # float64, as HRNet builds it
    for mode, post in (("argmax", False), ("quarter", True)):
        want_hm, maxvals = na.hrnet_get_final_preds(hm.numpy(), None, post_process=post)
        coords, scores = decode_on(backend, hm.to(dev), mode)
        assert_exact(coords, torch.from_numpy(want_hm), f"{mode} vs HRNet (heatmap pixels)")
        assert_exact(scores, torch.from_numpy(maxvals[..., 0]), "scores vs HRNet maxvals")
        want, _ = na.hrnet_get_final_preds(hm.numpy(), affine_np, post_process=post)
        coords, _ = decode_on(backend, hm.to(dev), mode, affine.to(dev))
        tol = 4 * affine_rounding_tol(coords.new_tensor(want_hm), affine)
        err = (coords.cpu().double() - torch.from_numpy(want)).abs()
        assert bool((err <= tol).all()), f"{mode}: {float(err.max()):.3g} px from HRNet get_final_preds"


@pytest.mark.parametrize("backend, device, blur_kernel", backend_params([3, 9, 11], [11]))
def test_darkpose(backend, device, blur_kernel):
    dev = skip_unless_runs(backend, device)
    hm, affine_np = _anchor_inputs(backend, device, seed=22)
    want, _ = na.darkpose_get_final_preds(hm.numpy(), None, blur_kernel)
    coords, _ = decode_on(backend, hm.to(dev), "dark", None, blur_kernel)
    err = max_abs(coords, torch.from_numpy(want))
    assert err <= 1e-4, f"dark k={blur_kernel}: {err:.3g} px from DarkPose"
    want_img, _ = na.darkpose_get_final_preds(hm.numpy(), affine_np, blur_kernel)
    coords_img, _ = decode_on(backend, hm.to(dev), "dark", torch.from_numpy(affine_np).to(dev), blur_kernel)
    scale = float(np.abs(affine_np[:, :, :2]).sum(-1).max())
    err = max_abs(coords_img, torch.from_numpy(want_img))
    assert err <= 1e-4 * scale + 1e-3, f"dark k={blur_kernel}: {err:.3g} image px from DarkPose"


@pytest.mark.parametrize("backend, device, blur_kernel", backend_params([3, 9, 11], [11]))
def test_mmpose_post_dark_udp(backend, device, blur_kernel):
    dev = skip_unless_runs(backend, device)
    hm, affine_np = _anchor_inputs(backend, device, seed=23)
    want, _ = na.mmpose_udp_decode(hm.numpy(), None, blur_kernel)
    coords, _ = decode_on(backend, hm.to(dev), "udp", None, blur_kernel)
    err = max_abs(coords, torch.from_numpy(want))
    assert err <= 1e-4, f"udp k={blur_kernel}: {err:.3g} px from MMPose post_dark_udp"
    want_img, _ = na.mmpose_udp_decode(hm.numpy(), affine_np, blur_kernel)
    coords_img, _ = decode_on(backend, hm.to(dev), "udp", torch.from_numpy(affine_np).to(dev), blur_kernel)
    scale = float(np.abs(affine_np[:, :, :2]).sum(-1).max())
    err = max_abs(coords_img, torch.from_numpy(want_img))
    assert err <= 1e-4 * scale + 1e-3, f"udp k={blur_kernel}: {err:.3g} image px from MMPose"


@pytest.mark.parametrize("backend, device", backend_device_params())
def test_anchors_at_borders(backend, device):
    """The border guards agree with the original code (peaks on and next to the edges)."""
    dev = skip_unless_runs(backend, device)
    hm, _ = _border_maps()
    q, _ = decode_on(backend, hm.to(dev), "quarter")
    assert_exact(q, torch.from_numpy(na.hrnet_get_final_preds(hm.numpy())[0]), "quarter vs HRNet")
    d, _ = decode_on(backend, hm.to(dev), "dark")
    assert max_abs(d, torch.from_numpy(na.darkpose_get_final_preds(hm.numpy())[0])) <= 1e-4
    u, _ = decode_on(backend, hm.to(dev), "udp")
    assert max_abs(u, torch.from_numpy(na.mmpose_udp_decode(hm.numpy())[0])) <= 1e-4


@pytest.mark.parametrize("ksize", range(1, 32, 2))
def test_gaussian_kernel_matches_opencv(ksize):
    cv2 = pytest.importorskip("cv2")
    ours = np.array(gaussian_kernel_1d(ksize), dtype=np.float32)
    want = cv2.getGaussianKernel(ksize, 0).ravel()  # float64
    np.testing.assert_allclose(ours, want, rtol=1e-6, atol=0, err_msg=f"ksize={ksize}")
    want32 = cv2.getGaussianKernel(ksize, 0, ktype=cv2.CV_32F).ravel()
    ulps = np.abs(ours.view(np.int32).astype(np.int64) - want32.view(np.int32).astype(np.int64))
    assert ulps.max() <= 1, f"ksize={ksize}: {ulps.max()} ulp from OpenCV's float32 kernel"
    assert np.array_equal(ours, ours[::-1])
