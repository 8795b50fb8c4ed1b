"""A cross-backend battery of weird-but-valid inputs, and a table of bad inputs (issue 13).

Property-based (hypothesis, derandomized: the same examples every run, so CI is stable):
each example draws a shape, dtype, memory layout and a set of special values (NaN, +-inf,
+-3e38, subnormals, zeros, ties) -- for NMS, crowds of candidates with tied or infinite
scores, both methods, float32 / float64 -- and checks every usable backend against the reference
with the self-test's checkers (``mipnet_kernels.selftest``: the op's documented bound,
NaN patterns included).  The Triton backend runs under the interpreter on the CPU, so it
gets fewer examples.  The bad-input table asserts a ``ValueError`` / ``TypeError`` naming
the argument for every entry.
"""

from __future__ import annotations

import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import mipnet_kernels as mk  # noqa: E402
from mipnet_kernels import selftest  # noqa: E402
from utils import skip_unless_runs  # noqa: E402

#: Examples per backend (the Triton interpreter is ~100x slower than the C++ kernels).
EXAMPLES = {"cpu": 300, "triton": 60}
SPECIALS = (math.nan, math.inf, -math.inf, 3e38, -3e38, 1e-40, -1e-40, 0.0, -0.0, "tie")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(fn, *args, **kwargs):
    """A self-test checker; a backend declining the input (``selftest.Skip``) is no failure."""
    try:
        m = fn(*args, **kwargs)
    except selftest.Skip:
        return
    assert not m.problems, m.problems


def _settings(backend: str):
    return settings(max_examples=EXAMPLES[backend], deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


def _backends():
    return [pytest.param("cpu", id="cpu"), pytest.param("triton", id="triton", marks=pytest.mark.triton)]


@st.composite
def weird_maps(draw, max_side: int = 12):
    """A CPU tensor [B, K, H, W] of smooth-ish values with special values sprinkled in."""
    B, K = draw(st.integers(1, 3)), draw(st.integers(1, 5))
    H, W = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.rand(B, K, H, W, generator=g)
    for _ in range(draw(st.integers(0, 4))):
        value = draw(st.sampled_from(SPECIALS))
        b, k = draw(st.integers(0, B - 1)), draw(st.integers(0, K - 1))
        y, x0 = draw(st.integers(0, H - 1)), draw(st.integers(0, W - 1))
        if value == "tie":  # the map's maximum repeated elsewhere
            x[b, k, y, x0] = x[b, k].max()
        else:
            x[b, k, y, x0] = value
    return x.to(draw(st.sampled_from(DTYPES)))


LAYOUTS = ("contiguous", "channels_last", "sliced")


@pytest.mark.parametrize("backend", _backends())
def test_decode_battery(backend):
    dev = skip_unless_runs(backend, "cpu")

    @_settings(backend)
    @given(hm=weird_maps(), mode=st.sampled_from(("argmax", "quarter", "dark", "udp")),
           layout=st.sampled_from(LAYOUTS), affine=st.booleans())
    def run(hm, mode, layout, affine):
        _check(selftest.check_decode, backend, dev, None, mode, None, layout, affine, heatmaps=hm)

    run()


@pytest.mark.parametrize("backend", _backends())
def test_flip_merge_battery(backend):
    dev = skip_unless_runs(backend, "cpu")

    @_settings(backend)
    @given(hm=weird_maps(), seed=st.integers(0, 1000), layout=st.sampled_from(LAYOUTS), shift=st.booleans())
    def run(hm, seed, layout, shift):
        fl = torch.rand(hm.shape, generator=torch.Generator().manual_seed(seed)).to(hm.dtype)
        _check(selftest.check_flip, backend, dev, None, None, layout, shift, maps=(hm, fl))

    run()


@pytest.mark.parametrize("backend", _backends())
def test_mimb_battery(backend):
    dev = skip_unless_runs(backend, "cpu")

    @_settings(backend)
    @given(x=weird_maps(max_side=7), layout=st.sampled_from(("contiguous", "channels_last")),
           op=st.sampled_from(("mimb_scale", "mimb", "mimb_instances")), grad=st.booleans(),
           r=st.sampled_from((1, 2, 4)))
    def run(x, layout, op, grad, r):
        B, K, H, W = x.shape  # K plays C
        if K % r:
            r = 1
        # Gradients only without huge finite values: where float32 intermediates of the
        # backward overflow (3e38 * dy), which of them become inf or NaN depends on the
        # order of the products, which the contract does not fix (forward: it does).
        grad = grad and not bool((x.float().abs() > 1e30).any())
        _check(selftest.check_mimb, op, backend, dev, (B, K, H, W, r), x.dtype, layout, grad, x=x)

    run()


@st.composite
def crowds(draw):
    """Candidates of a few images (``selftest.clustered_candidates``) with drawn sizes, tied
    or infinite scores, kept clear of the threshold (OKS rounding may flip a pair at it)."""
    K = draw(st.sampled_from((17, 14, 5)))
    sizes = draw(st.lists(st.integers(0, 12), min_size=1, max_size=4))
    data = selftest.clustered_candidates(sizes, K, seed=draw(st.integers(0, 2**31 - 1)),
                                         ties=draw(st.booleans()))
    M = data["scores"].numel()
    for _ in range(draw(st.integers(0, 2)) if M else 0):
        data["scores"][draw(st.integers(0, M - 1))] = draw(st.sampled_from((math.inf, -math.inf)))
    thr = draw(st.sampled_from((0.3, 0.5, 0.9)))
    vis = draw(st.sampled_from((None, 0.2)))
    return selftest.drop_near_threshold(data, K, thr, vis), K, thr, vis


@pytest.mark.parametrize("backend", _backends())
def test_nms_battery(backend):
    dev = skip_unless_runs(backend, "cpu")

    @_settings(backend)
    @given(case=crowds(), op=st.sampled_from(("oks_nms", "oks_nms_mask", "soft_oks_nms", "soft_oks_nms_mask")),
           method=st.sampled_from(("gaussian", "linear")), dtype=st.sampled_from((torch.float32, torch.float64)),
           max_dets=st.sampled_from((None, 1, 3, 20)))
    def run(case, op, method, dtype, max_dets):
        data, K, thr, vis = case
        _check(selftest.check_nms, op, backend, dev, "random", K, thr, vis, dtype, True, method, max_dets,
               data=data)

    run()


# --------------------------------------------------------------------------- bad inputs
def _hm(*shape, dtype=torch.float32):
    return torch.rand(*shape, dtype=dtype)


def _nms_args(M=4, K=17):
    g = torch.Generator().manual_seed(0)
    return (torch.rand(M, K, 3, generator=g) * 100, torch.rand(M, generator=g),
            torch.rand(M, generator=g) * 100 + 1, torch.zeros(M, dtype=torch.int64))


def _mimb_args(B=2, C=8, H=3, W=3):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, C, H, W, generator=g), torch.randn(C // 4, C, generator=g),
            torch.randn(C, C // 4, generator=g), torch.rand(B, C, generator=g))


def _replace(args, i, value):
    args = list(args)
    args[i] = value
    return args


BAD_INPUTS = [
    # (id, call, exception, message naming the argument)
    ("decode-rank", lambda: mk.decode_heatmaps(_hm(2, 3, 4)), ValueError, "heatmaps must be 4-D"),
    ("decode-int", lambda: mk.decode_heatmaps(torch.ones(1, 1, 4, 4, dtype=torch.int32)), ValueError, "heatmaps must be float"),
    ("decode-mode", lambda: mk.decode_heatmaps(_hm(1, 1, 4, 4), mode="gauss"), ValueError, "mode must be one of"),
    ("decode-blur-even", lambda: mk.decode_heatmaps(_hm(1, 1, 4, 4), mode="dark", blur_kernel=4), ValueError, "blur_kernel"),
    ("decode-blur-bool", lambda: mk.decode_heatmaps(_hm(1, 1, 4, 4), mode="dark", blur_kernel=True), ValueError, "blur_kernel"),
    ("decode-empty-map", lambda: mk.decode_heatmaps(_hm(1, 1, 0, 4)), ValueError, "empty spatial size"),
    ("decode-affine-type", lambda: mk.decode_heatmaps(_hm(1, 1, 4, 4), affine=[[1, 0, 0], [0, 1, 0]]), TypeError, "affine"),
    ("flip-shape", lambda: mk.flip_merge(_hm(1, 3, 4, 4), _hm(1, 3, 4, 5), []), ValueError, "flipped must have the shape"),
    ("flip-dtype", lambda: mk.flip_merge(_hm(1, 3, 4, 4), _hm(1, 3, 4, 4).half(), []), ValueError, "flipped is"),
    ("flip-float-pairs", lambda: mk.flip_merge(_hm(1, 3, 4, 4), _hm(1, 3, 4, 4), [(0.5, 1.5)]), ValueError, "flip_pairs"),
    ("flip-pair-range", lambda: mk.flip_merge(_hm(1, 3, 4, 4), _hm(1, 3, 4, 4), [(0, 3)]), ValueError, "flip_pairs index 3"),
    ("flip-shift-str", lambda: mk.flip_merge(_hm(1, 3, 4, 4), _hm(1, 3, 4, 4), [], shift="no"), TypeError, "shift"),
    ("mimb-x-rank", lambda: mk.mimb_scale(*_replace(_mimb_args(), 0, torch.rand(2, 8, 3))), ValueError, "x"),
    ("mimb-w1-shape", lambda: mk.mimb_scale(*_replace(_mimb_args(), 1, torch.rand(3, 8))), ValueError, "w1"),
    ("mimb-v-shape", lambda: mk.mimb_scale(*_replace(_mimb_args(), 3, torch.rand(2, 7))), ValueError, "v"),
    ("mimb-x-int", lambda: mk.mimb_scale(*_replace(_mimb_args(), 0, torch.ones(2, 8, 3, 3, dtype=torch.int64))), ValueError, "x"),
    ("mimb-empty-hw", lambda: mk.mimb_scale(*_replace(_mimb_args(), 0, torch.rand(2, 8, 0, 3))), ValueError, "H\\*W"),
    ("nms-kpt-nan", lambda: mk.oks_nms(*_replace(_nms_args(), 0, torch.full((4, 17, 3), math.nan))), ValueError, "keypoints must be finite"),
    ("nms-score-nan", lambda: mk.oks_nms(*_replace(_nms_args(), 1, torch.full((4,), math.nan))), ValueError, "scores contain NaN"),
    ("nms-area-neg", lambda: mk.oks_nms(*_replace(_nms_args(), 2, -torch.ones(4))), ValueError, "areas must be >= 0"),
    ("nms-batch-neg", lambda: mk.oks_nms(*_replace(_nms_args(), 3, -torch.ones(4, dtype=torch.int64))), ValueError, "batch_idx"),
    ("nms-batch-float", lambda: mk.oks_nms(*_replace(_nms_args(), 3, torch.zeros(4))), ValueError, "batch_idx"),
    ("nms-threshold", lambda: mk.oks_nms(*_nms_args(), threshold=1.5), ValueError, "threshold"),
    ("nms-sigmas-k", lambda: mk.oks_nms(*_nms_args(K=5)), ValueError, "sigmas"),
    ("nms-num-images-bool", lambda: mk.oks_nms_mask(*_nms_args(), True), ValueError, "num_images"),
    ("soft-max-dets-0", lambda: mk.soft_oks_nms(*_nms_args(), max_dets=0), ValueError, "max_dets"),
    ("soft-method", lambda: mk.soft_oks_nms(*_nms_args(), method="box"), ValueError, "method"),
    ("oks-iou-area", lambda: mk.oks_iou(*_nms_args()[:1], -torch.ones(4), *_nms_args()[:1], torch.ones(4)), ValueError, "areas_a"),
    ("cpu-isa", lambda: mk.set_cpu_isa("sse9"), ValueError, "name='sse9'"),
]


@pytest.mark.parametrize("call, exc, message", [pytest.param(c, e, m, id=i) for i, c, e, m in BAD_INPUTS])
def test_bad_input_names_the_argument(call, exc, message):
    with pytest.raises(exc, match=message):
        call()
