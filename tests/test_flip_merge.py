"""``flip_merge`` (HRNet's flip test): bit-exact against the reference and against HRNet's
``flip_back`` + ``SHIFT_HEATMAP`` + average (NumPy anchor), for every backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mipnet_kernels as mk
import anchors as na
from mipnet_kernels.ops.decode import flip_index_from_pairs, flip_merge_reference
from utils import (
    assert_exact,
    backend_device_params,
    backend_params,
    flip_merge_on,
    relayout,
    round_to,
    skip_unless_runs,
)

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
COCO, CROWD = mk.COCO_FLIP_PAIRS, mk.CROWDPOSE_FLIP_PAIRS


def _pairs_for(K):
    return {17: COCO, 14: CROWD}.get(K, ((0, K - 1),) if K >= 2 else ())


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hm = torch.randn(shape, generator=g).to(dtype)
    fl = torch.randn(shape, generator=g).to(dtype)
    return hm, fl


def _anchor(hm, fl, pairs, shift, backend="reference", device="cpu"):
    """HRNet's code in float32 on the upcast inputs, rounded once to the input dtype."""
    out = na.hrnet_flip_merge(hm.float().numpy(), fl.float().numpy(), pairs, shift)
    return round_to(torch.from_numpy(np.ascontiguousarray(out)), hm.dtype, backend, device)


def _reference(hm, fl, pairs, shift, backend="reference", device="cpu"):
    """The reference's float32 merge, rounded to the dtype as ``backend`` rounds."""
    merged32 = flip_merge_reference(hm.cpu().float(), fl.cpu().float(), flip_index_from_pairs(pairs, hm.shape[1]), shift)
    want = round_to(merged32, hm.dtype, backend, device)
    if (backend, device) == ("reference", "cpu"):
        assert_exact(want, flip_merge_reference(hm.cpu(), fl.cpu(), flip_index_from_pairs(pairs, hm.shape[1]), shift))
    return want


SHAPES = [(2, 17, 64, 48), (1, 14, 7, 5), (3, 17, 5, 1), (2, 2, 1, 3), (1, 1, 1, 1), (2, 17, 33, 27)]
INTERP_SHAPES = [(1, 14, 7, 5), (3, 17, 5, 1), (1, 1, 1, 1), (2, 2, 9, 33)]
CASES = [(s, d, sh) for s in SHAPES for d in (F32, F16, BF16) for sh in (True, False)]
INTERP_CASES = [(s, F32, sh) for s in INTERP_SHAPES for sh in (True, False)] + [
    ((1, 14, 7, 5), d, True) for d in (F16, BF16)
]


@pytest.mark.parametrize("backend, device, shape, dtype, shift", backend_params(CASES, INTERP_CASES))
def test_matches_reference_and_hrnet(backend, device, shape, dtype, shift):
    dev = skip_unless_runs(backend, device)
    hm, fl = _inputs(shape, dtype, seed=sum(shape))
    pairs = _pairs_for(shape[1])
    out = flip_merge_on(backend, hm.to(dev), fl.to(dev), pairs, shift)
    assert out.dtype == dtype and out.shape == hm.shape and out.is_contiguous()
    assert out.device.type == dev.type
    assert_exact(out, _reference(hm, fl, pairs, shift, backend, device), "vs reference")
    assert_exact(out, _anchor(hm, fl, pairs, shift, backend, device), "vs HRNet flip_back + shift + average")


def test_reference_matches_hand_formula():
    """merged[b,k,y,x] = (hm[b,k,y,x] + fl[b,idx[k],y,W-1-xs]) / 2, xs = x-1 if shift and x >= 1."""
    B, K, H, W = 1, 17, 2, 5
    hm = torch.zeros(B, K, H, W)
    x = torch.arange(W, dtype=torch.float32)
    fl = (100 * torch.arange(K, dtype=torch.float32)[:, None, None] + x).expand(B, K, H, W).contiguous()
    idx = flip_index_from_pairs(COCO, K)
    assert idx[1] == 2 and idx[2] == 1 and idx[0] == 0 and idx[16] == 15
    for shift in (True, False):
        out = mk.flip_merge(hm, fl, COCO, shift)
        for k in range(K):
            for xx in range(W):
                xs = xx - 1 if shift and xx >= 1 else xx
                assert out[0, k, 1, xx].item() == 0.5 * (100 * idx[k] + (W - 1 - xs)), (shift, k, xx)


LAYOUT_CASES = [(a, b) for a in ("contiguous", "channels_last", "sliced", "permuted", "expanded") for b in ("contiguous", "sliced", "channels_last")]
INTERP_LAYOUT = [("channels_last", "sliced"), ("sliced", "contiguous"), ("expanded", "permuted")]


@pytest.mark.parametrize("backend, device, layout_hm, layout_fl", backend_params(LAYOUT_CASES, INTERP_LAYOUT))
def test_strides(backend, device, layout_hm, layout_fl):
    dev = skip_unless_runs(backend, device)
    hm, fl = _inputs((3, 17, 9, 7), BF16, seed=3)
    hm_in, fl_in = relayout(hm.to(dev), layout_hm), relayout(fl.to(dev), layout_fl)
    for shift in (True, False):
        out = flip_merge_on(backend, hm_in, fl_in, COCO, shift)
        assert out.is_contiguous()
        assert_exact(out, _reference(hm_in, fl_in, COCO, shift, backend, device), f"shift={shift}")


@pytest.mark.parametrize("backend, device", backend_device_params())
def test_float16_rounds_once_in_float32(backend, device):
    """Computed in float32 and rounded once: 60000 + 60000 overflows float16, the mean does not."""
    dev = skip_unless_runs(backend, device)
    hm = torch.full((1, 2, 3, 4), 60000.0, dtype=F16)
    fl = torch.full((1, 2, 3, 4), 60000.0, dtype=F16)
    hm[0, 1] = 65504.0  # float16 max
    out = flip_merge_on(backend, hm.to(dev), fl.to(dev), (), True)
    assert torch.isfinite(out.float()).all()
    assert out.cpu()[0, 0].unique().tolist() == [60000.0]
    assert out.cpu()[0, 1].unique().tolist() == [62752.0]  # (65504 + 60000) / 2, exact in float16
    assert_exact(out, flip_merge_reference(hm, fl, [0, 1], True))


@pytest.mark.parametrize("backend, device", backend_device_params())
def test_pairs_forms_and_nan(backend, device):
    dev = skip_unless_runs(backend, device)
    hm, fl = _inputs((2, 14, 6, 5), F32, seed=9)
    hm[0, 3, 2, 2] = float("nan")
    fl[1, 0, 0, 4] = float("nan")
    want = flip_merge_reference(hm, fl, flip_index_from_pairs(CROWD, 14), True)
    for pairs in (CROWD, [list(p) for p in CROWD], torch.tensor(CROWD), np.array(CROWD), [(b, a) for a, b in CROWD]):
        out = flip_merge_on(backend, hm.to(dev), fl.to(dev), pairs)
        assert_exact(out, want, f"pairs as {type(pairs).__name__}")
    assert torch.isnan(want[0, 3, 2, 2]) and torch.isnan(want[1, 1, 0, 1])  # joint 0 <-> 1, x 4 -> 0 -> shifted 1


@pytest.mark.parametrize("backend, device", backend_device_params())
def test_empty(backend, device):
    dev = skip_unless_runs(backend, device)
    for shape, pairs in (((0, 17, 8, 6), COCO), ((2, 0, 8, 6), ()), ((0, 0, 3, 3), ())):
        hm = torch.rand(shape, device=dev)
        out = flip_merge_on(backend, hm, hm.clone(), pairs)
        assert out.shape == shape and out.dtype == hm.dtype and out.device.type == dev.type


# --------------------------------------------------------------------------- bad input
def _hm(shape=(2, 17, 8, 6), **kw):
    return torch.rand(shape, **kw)


BAD_PAIRS = [
    pytest.param(((1, 17),), r"flip_pairs index 17 is out of range for K=17", id="out-of-range"),
    pytest.param(((-1, 2),), r"flip_pairs index -1 is out of range", id="negative"),
    pytest.param(((1, 2), (2, 3)), r"flip_pairs lists joint 2 more than once", id="duplicate"),
    pytest.param(((1, 2), (1, 2)), r"flip_pairs lists joint 1 more than once", id="repeated-pair"),
    pytest.param(((3, 3),), r"flip_pairs (pairs joint 3 with itself|lists joint 3 more than once)", id="self-pair"),
    pytest.param(((1, 2, 3),), r"flip_pairs entries must be pairs", id="triple"),
    pytest.param((("a", "b"),), r"flip_pairs must be a sequence of \(left, right\) joint index pairs", id="not-ints"),
    pytest.param((1, 2), r"flip_pairs must be a sequence", id="flat"),
]


@pytest.mark.parametrize("pairs, match", BAD_PAIRS)
def test_bad_pairs(pairs, match):
    with pytest.raises(ValueError, match=match):
        mk.flip_merge(_hm(), _hm(), pairs)


def test_wrong_k_for_pairs():
    with pytest.raises(ValueError, match=r"flip_pairs index 1[45] is out of range for K=14"):
        mk.flip_merge(_hm((2, 14, 8, 6)), _hm((2, 14, 8, 6)), COCO)


BAD_TENSORS = [
    pytest.param(lambda: (_hm(), _hm().half()), r"flipped is torch.float16 but heatmaps is torch.float32", id="dtype-mismatch"),
    pytest.param(lambda: (_hm(), _hm((2, 17, 8, 7))), r"flipped must have the shape of heatmaps \(2, 17, 8, 6\), got \(2, 17, 8, 7\)", id="shape-mismatch"),
    pytest.param(lambda: (_hm(), _hm(device="meta")), r"flipped is on meta but heatmaps is on cpu", id="device-mismatch"),
    pytest.param(lambda: (_hm(), _hm((17, 8, 6))), r"flipped must be 4-D", id="flipped-rank"),
    pytest.param(lambda: (_hm((17, 8, 6)), _hm((17, 8, 6))), r"heatmaps must be 4-D", id="rank"),
    pytest.param(lambda: (_hm().double(), _hm().double()), r"heatmaps must be float32, float16 or bfloat16, got torch.float64", id="float64"),
    pytest.param(lambda: (_hm(), (_hm() * 10).int()), r"flipped must be float32, float16 or bfloat16, got torch.int32", id="int"),
    pytest.param(lambda: (_hm((1, 17, 0, 6)), _hm((1, 17, 0, 6))), r"heatmaps has an empty spatial size 0x6", id="empty-spatial"),
]


@pytest.mark.parametrize("make, match", BAD_TENSORS)
def test_bad_tensors(make, match):
    hm, fl = make()
    with pytest.raises(ValueError, match=match):
        mk.flip_merge(hm, fl, COCO)


def test_op_rejects_non_permutation():
    hm = _hm()
    for index in ([0] * 17, list(range(16)), list(range(1, 18))):
        with pytest.raises(ValueError, match=r"flip_index must be a permutation of range\(K=17\)"):
            torch.ops.mipnet.flip_merge(hm, hm, index, True)


@pytest.mark.cuda
def test_device_mismatch_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device (torch.cuda.is_available() is False)")
    with pytest.raises(ValueError, match=r"flipped is on cpu but heatmaps is on cuda"):
        mk.flip_merge(_hm(device="cuda"), _hm(), COCO)


# --------------------------------------------------------------------------- opcheck
@pytest.mark.parametrize("backend, device, dtype, shift", backend_params([(F32, True), (BF16, False)], [(F32, True)]))
def test_opcheck_flip_merge(backend, device, dtype, shift):
    dev = skip_unless_runs(backend, device)
    hm, fl = _inputs((2, 17, 6, 5), dtype, seed=1)
    hm, fl = hm.to(dev), fl.to(dev)
    flip_merge_on(backend, hm, fl, COCO, shift)  # skips if declared unsupported
    index = flip_index_from_pairs(COCO, 17)
    with mk.use_backend(backend):
        torch.library.opcheck(torch.ops.mipnet.flip_merge.default, (hm, fl, index, shift))


# --------------------------------------------------------------------------- issue 13: no silent truncation
@pytest.mark.parametrize("pairs", [[(1.7, 2.2)], [(True, 2)], torch.tensor([[1.0, 2.0]]), [("1", 2)]],
                         ids=["float", "bool", "float-tensor", "str"])
def test_flip_pairs_must_be_integers(pairs):
    hm = torch.rand(1, 3, 4, 4)
    with pytest.raises(ValueError, match="flip_pairs"):
        mk.flip_merge(hm, hm, pairs)


def test_flip_pairs_accept_numpy_and_tensor_ints():
    hm = torch.rand(1, 3, 4, 4)
    fl = torch.rand(1, 3, 4, 4)
    want = mk.flip_merge(hm, fl, [(1, 2)])
    for pairs in ([(np.int64(1), np.int32(2))], torch.tensor([[1, 2]]), [(torch.tensor(1), 2)]):
        torch.testing.assert_close(mk.flip_merge(hm, fl, pairs), want, rtol=0, atol=0)


@pytest.mark.parametrize("shift", ["no", 1, None])
def test_shift_must_be_bool(shift):
    hm = torch.rand(1, 3, 4, 4)
    with pytest.raises(TypeError, match="shift must be a bool"):
        mk.flip_merge(hm, hm, [(1, 2)], shift=shift)
