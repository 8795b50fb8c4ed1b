"""Tests of batched OKS-NMS (``mipnet_kernels.oks_iou / oks_nms / soft_oks_nms`` and the
sync-free mask forms) on every backend, against the independent NumPy anchors of HRNet's
``oks_iou`` / ``oks_nms`` / ``soft_oks_nms`` (``tests/numpy_anchors.py``, float64, ties by
lower index).

Inputs are crowds of jittered copies of a few poses per image (so OKS spans 0..1), images
of 1..300 candidates (1..100 for K = 133: the anchor is slow) in shuffled input order,
K = 14 / 17 / 133.  All values are float32 numbers (held in float64 tensors for the
float64 runs), so a float32 run sees exactly the
anchor's inputs and differs only in arithmetic: the float32 OKS is within ~1e-6 of the
float64 one, and a greedy decision can flip only for a pair whose OKS lies that close to
the threshold.  The hard-NMS data therefore drop every candidate of a pair whose float64
OKS is within ``NEAR_THRESHOLD`` of the threshold (dropping candidates changes no other
pair's OKS), after which float32 must give exactly the anchor's ``keep``.  Visibility
thresholds are float32-exact (0.25, 0.5) for the same reason.  Scores are distinct float32
values except in the tie test.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import mipnet_kernels as mk
import anchors as na
from mipnet_kernels import _backends
from utils import backend_params, skip_unless_runs

#: |oks - threshold| below which a pair is removed from the hard-NMS data (see the docstring).
NEAR_THRESHOLD = 1e-5

# (K, threshold, vis_threshold)
HARD_CASES = [(17, 0.9, None), (17, 0.5, 0.25), (14, 0.3, None), (14, 0.95, 0.5), (133, 0.7, None),
              (133, 0.9, 0.25)]
DTYPES = (torch.float64, torch.float32)
INTERP_SIZES = [1, 3, 7, 12]  # Triton under the interpreter: a handful of small images


def sigmas_for(K: int):
    """COCO / CrowdPose for 17 / 14 (the op's defaults, passed as None); fixed random for others."""
    if K in (14, 17):
        return None
    return tuple(np.random.default_rng(K).uniform(0.02, 0.1, K).astype(np.float32).tolist())


def anchor_sigmas(K: int):
    return {17: mk.COCO_SIGMAS, 14: mk.CROWDPOSE_SIGMAS}.get(K) or sigmas_for(K)


def image_sizes(seed: int, big: int = 300) -> list[int]:
    """Many small images, a few medium, one crowded: 1..300 candidates."""
    rng = np.random.default_rng(seed)
    sizes = [1] * 4 + rng.integers(2, 30, 20).tolist() + rng.integers(30, 120, 5).tolist() + [big]
    rng.shuffle(sizes)
    return sizes


def clustered_candidates(sizes, K: int, seed: int, *, ties: bool = False) -> dict:
    """Crowds of jittered poses: per image ``ceil(n / 2..8)`` people of side 30-200 px, each
    candidate a copy of one of them with joints jittered by 0-15 % of the side (OKS 0..1),
    joint scores U(0, 1), area side^2 * U(0.8, 1.2).  Rows are shuffled across images.
    Scores are distinct (``ties``: five levels).  float32 values in float64 tensors."""
    rng = np.random.default_rng(seed)
    kps, areas, images = [], [], []
    for img, n in enumerate(sizes):
        people = max(1, math.ceil(n / rng.integers(2, 9)))
        centre = rng.uniform((0, 0), (640, 480), (people, 2))
        side = rng.uniform(30, 200, people)
        base = centre[:, None, :] + side[:, None, None] * rng.normal(0, 0.3, (people, K, 2))
        who = rng.integers(0, people, n)
        jitter = side[who] * rng.uniform(0, 0.15, n)
        xy = base[who] + jitter[:, None, None] * rng.normal(size=(n, K, 2))
        kps.append(np.concatenate([xy, rng.uniform(0, 1, (n, K, 1))], axis=2))
        areas.append(side[who] ** 2 * rng.uniform(0.8, 1.2, n))
        images.append(np.full(n, img))
    M = sum(sizes)
    scores = rng.integers(0, 5, M) / 4 if ties else (rng.permutation(M) + 0.5) / M
    perm = rng.permutation(M)
    f32 = lambda a: torch.from_numpy(np.concatenate(a)[perm] if isinstance(a, list) else a[perm]).float().double()
    return {
        "keypoints": f32(kps) if M else torch.zeros(0, K, 3, dtype=torch.float64),
        "scores": f32(scores),
        "areas": f32(areas) if M else torch.zeros(0, dtype=torch.float64),
        "batch_idx": torch.from_numpy(np.concatenate(images)[perm] if M else np.zeros(0)).long(),
    }


def drop_near_threshold(data: dict, K: int, thr: float, vis) -> dict:
    """Remove one candidate of every same-image pair with |oks64 - thr| < NEAR_THRESHOLD."""
    kp, ar, b = data["keypoints"], data["areas"], data["batch_idx"]
    drop = torch.zeros_like(b, dtype=torch.bool)
    with mk.use_backend("reference"):
        for img in torch.unique(b).tolist():
            rows = (b == img).nonzero().squeeze(1)
            oks = mk.oks_iou(kp[rows], ar[rows], kp[rows], ar[rows], sigmas_for(K) or anchor_sigmas(K), vis)
            near = torch.triu((oks - thr).abs() < NEAR_THRESHOLD, diagonal=1)
            drop[rows[near.any(dim=0)]] = True  # the later row of each near pair
    return {k: v[~drop] for k, v in data.items()}


@functools.lru_cache(maxsize=None)
def hard_case(K: int, thr: float, vis, small: bool = False):
    sizes = INTERP_SIZES if small else image_sizes(seed=K + int(thr * 100), big=300 if K < 100 else 100)
    data = drop_near_threshold(clustered_candidates(sizes, K, seed=K * 7 + int(thr * 100)), K, thr, vis)
    expected = na.hrnet_oks_nms_batched(
        data["keypoints"].numpy(), data["scores"].numpy(), data["areas"].numpy(), data["batch_idx"].numpy(),
        thr, anchor_sigmas(K), vis,
    )
    return data, torch.from_numpy(expected)


def require(backend: str, device: str) -> torch.device:
    """Skip unless ``backend`` runs ``device`` tensors and has the NMS kernels (with its reason)."""
    dev = skip_unless_runs(backend, device)
    for op in ("oks_nms_sorted", "soft_oks_nms_sorted"):
        reasons = _backends.not_supported_reasons(op, backend, dev)
        if reasons:
            pytest.skip(f"backend {backend!r} cannot run {op}: {'; '.join(reasons)}")
    return dev


def on(backend: str, device: str, data: dict, dtype=torch.float64) -> dict:
    """The inputs on ``device`` (keypoints, scores and areas in ``dtype``); skips as :func:`require`."""
    dev = require(backend, device)
    out = {k: v.to(dev) for k, v in data.items()}
    for k in ("keypoints", "scores", "areas"):
        out[k] = out[k].to(dtype)
    return out


def assert_keep_equal(keep: torch.Tensor, expected: torch.Tensor, batch_idx: torch.Tensor, what: str = ""):
    keep, expected, batch_idx = keep.cpu(), expected.cpu(), batch_idx.cpu()
    assert keep.dtype == torch.int64, f"{what}: keep is {keep.dtype}"
    for img in torch.unique(batch_idx).tolist():
        got = set(keep[batch_idx[keep] == img].tolist())
        want = set(expected[batch_idx[expected] == img].tolist())
        assert got == want, f"{what}: image {img}: extra {sorted(got - want)[:8]}, missing {sorted(want - got)[:8]}"
    assert torch.equal(keep, expected), f"{what}: same sets per image but a different order"


# --------------------------------------------------------------------------- oks_iou
@pytest.mark.parametrize("K, vis", [(17, None), (17, 0.25), (133, None), (14, 0.5)])
def test_oks_iou_matches_anchor(K, vis):
    data = clustered_candidates([12, 9], K, seed=K)
    kp, ar = data["keypoints"], data["areas"]
    got = mk.oks_iou(kp[:12], ar[:12], kp, ar, sigmas_for(K), vis)
    assert got.shape == (12, kp.shape[0]) and got.dtype == torch.float64
    flat = kp.reshape(kp.shape[0], -1).numpy()
    want = np.stack([na.hrnet_oks_iou(flat[i], flat, ar[i].item(), ar.numpy(), anchor_sigmas(K), vis)
                     for i in range(12)])
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-15)
    assert 0.05 < float(got.std()), "the test data should span a range of OKS values"
    got32 = mk.oks_iou(kp[:12].float(), ar[:12].float(), kp.float(), ar.float(), sigmas_for(K), vis)
    assert got32.dtype == torch.float32
    np.testing.assert_allclose(got32.double().numpy(), want, rtol=0, atol=2e-6)


def test_oks_iou_no_visible_joint_is_zero():
    kp = torch.rand(2, 17, 3)
    kp[0, :, 2] = 0.1  # nothing above 0.5 in the first pose
    o = mk.oks_iou(kp, torch.full((2,), 100.0), kp, torch.full((2,), 100.0), vis_threshold=0.5)
    assert o[0].tolist() == [0.0, 0.0] and o[1, 1].item() == 1.0


# --------------------------------------------------------------------------- hard NMS
@pytest.mark.parametrize(
    "backend, device, K, thr, vis, dtype",
    backend_params([(*c, dt) for c in HARD_CASES for dt in DTYPES],
                   interp_cases=[(17, 0.5, None, torch.float32), (14, 0.9, 0.25, torch.float64)]),
)
def test_oks_nms_matches_anchor(backend, device, K, thr, vis, dtype):
    require(backend, device)
    data, expected = hard_case(K, thr, vis, small=backend == "triton" and device == "cpu")
    x = on(backend, device, data, dtype)
    with mk.use_backend(backend):
        keep = mk.oks_nms(x["keypoints"], x["scores"], x["areas"], x["batch_idx"], sigmas_for(K), thr, vis)
    assert 0 < expected.numel() < data["scores"].numel(), "the case should keep some and drop some"
    assert_keep_equal(keep, expected, data["batch_idx"], f"{backend} K={K} thr={thr} vis={vis} {dtype}")


@pytest.mark.parametrize("backend, device", backend_params())
def test_oks_nms_ties_by_lower_index(backend, device):
    require(backend, device)
    data = clustered_candidates([40, 25, 3, 60], 17, seed=5, ties=True)
    expected = torch.from_numpy(na.hrnet_oks_nms_batched(
        data["keypoints"].numpy(), data["scores"].numpy(), data["areas"].numpy(), data["batch_idx"].numpy(),
        0.6, mk.COCO_SIGMAS))
    x = on(backend, device, data)
    with mk.use_backend(backend):
        keep = mk.oks_nms(x["keypoints"], x["scores"], x["areas"], x["batch_idx"], threshold=0.6)
    assert_keep_equal(keep, expected, data["batch_idx"], f"{backend} ties")


@pytest.mark.parametrize("backend, device", backend_params())
def test_one_candidate_per_image(backend, device):
    data = clustered_candidates([1] * 9, 17, seed=3)
    x = on(backend, device, data)
    with mk.use_backend(backend):
        keep = mk.oks_nms(x["keypoints"], x["scores"], x["areas"], x["batch_idx"], threshold=0.0)
        mask, counts = mk.oks_nms_mask(x["keypoints"], x["scores"], x["areas"], x["batch_idx"], 9, threshold=0.0)
    assert torch.equal(keep.cpu(), torch.argsort(data["batch_idx"]))
    assert bool(mask.all()) and counts.tolist() == [1] * 9


@pytest.mark.parametrize("backend, device", backend_params())
def test_all_candidates_identical(backend, device):
    one = clustered_candidates([1], 17, seed=4)
    n = 7
    data = {k: v.repeat(n, *([1] * (v.dim() - 1))) for k, v in one.items()}
    x = on(backend, device, data)
    args = (x["keypoints"], x["scores"], x["areas"], x["batch_idx"])
    with mk.use_backend(backend):
        assert mk.oks_nms(*args, threshold=0.9).tolist() == [0]  # equal scores: the lowest index
        assert mk.oks_nms(*args, threshold=1.0).tolist() == list(range(n))  # OKS 1 is not > 1
        keep, new = mk.soft_oks_nms(*args, threshold=0.5, max_dets=None)
    assert keep.tolist() == list(range(n))
    s0, factor = data["scores"][0].item(), math.exp(-1 / 0.5)  # each pick scales the rest by exp(-1/thr)
    np.testing.assert_allclose(new.cpu().numpy(), [s0 * factor**p for p in range(n)], rtol=1e-12)


@pytest.mark.parametrize("backend, device", backend_params())
def test_empty_inputs(backend, device):
    dev = skip_unless_runs(backend, device)
    kp, s, a = torch.zeros(0, 17, 3, device=dev), torch.zeros(0, device=dev), torch.zeros(0, device=dev)
    b = torch.zeros(0, dtype=torch.int64, device=dev)
    with mk.use_backend(backend):
        assert mk.oks_nms(kp, s, a, b).shape == (0,)
        keep, new = mk.soft_oks_nms(kp, s, a, b)
        assert keep.shape == (0,) and new.shape == (0,) and keep.dtype == torch.int64
        mask, counts = mk.oks_nms_mask(kp, s, a, b, 3)
        assert mask.shape == (0,) and mask.dtype == torch.bool and counts.tolist() == [0, 0, 0]
        rank, new, counts = mk.soft_oks_nms_mask(kp, s, a, b, 2)
        assert rank.shape == (0,) and new.shape == (0,) and counts.tolist() == [0, 0]
        assert mk.oks_iou(kp, a, torch.rand(4, 17, 3, device=dev), torch.ones(4, device=dev)).shape == (0, 4)


# --------------------------------------------------------------------------- soft NMS
SOFT_CASES = [("gaussian", 0.9, 20, 0.0), ("gaussian", 0.5, None, 0.0), ("linear", 0.5, 20, 0.0),
              ("linear", 0.3, 3, 0.2), ("gaussian", 0.3, None, 0.4)]


@functools.lru_cache(maxsize=None)
def soft_case(method, thr, max_dets, score_thr, small=False):
    sizes = INTERP_SIZES if small else image_sizes(seed=11, big=150)
    data = clustered_candidates(sizes, 17, seed=13)
    keep, new = na.hrnet_soft_oks_nms_batched(
        data["keypoints"].numpy(), data["scores"].numpy(), data["areas"].numpy(), data["batch_idx"].numpy(),
        thr, mk.COCO_SIGMAS, 0.25, method, max_dets, score_thr)
    return data, torch.from_numpy(keep), torch.from_numpy(new)


@pytest.mark.parametrize(
    "backend, device, method, thr, max_dets, score_thr, dtype",
    backend_params([(*c, dt) for c in SOFT_CASES for dt in DTYPES],
                   interp_cases=[("gaussian", 0.9, 5, 0.0, torch.float32), ("linear", 0.3, 3, 0.2, torch.float64)]),
)
def test_soft_oks_nms_matches_anchor(backend, device, method, thr, max_dets, score_thr, dtype):
    require(backend, device)
    data, expected, expected_scores = soft_case(method, thr, max_dets, score_thr,
                                                small=backend == "triton" and device == "cpu")
    x = on(backend, device, data, dtype)
    with mk.use_backend(backend):
        keep, new = mk.soft_oks_nms(x["keypoints"], x["scores"], x["areas"], x["batch_idx"], method=method,
                                    threshold=thr, vis_threshold=0.25, score_threshold=score_thr, max_dets=max_dets)
    assert new.dtype == dtype
    assert_keep_equal(keep, expected, data["batch_idx"], f"{backend} soft {method} thr={thr} {dtype}")
    # float32: the OKS is within ~1e-6 (absolute) of float64, so a rescored score s * (1 - oks)
    # is within ~1e-6 * s absolute, not relative (oks near 1); scores are <= 1.
    tol = dict(rtol=1e-12, atol=0) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new.cpu().double().numpy(), expected_scores.numpy(), **tol)
    counts = torch.bincount(data["batch_idx"][expected])
    if max_dets is not None:
        assert int(counts.max()) == max_dets, "the case should reach max_dets somewhere"


# --------------------------------------------------------------------------- mask forms
@pytest.mark.parametrize("backend, device", backend_params())
def test_mask_forms_equal_index_forms(backend, device):
    small = backend == "triton" and device == "cpu"
    data = clustered_candidates(INTERP_SIZES if small else image_sizes(seed=21, big=100), 17, seed=22)
    x = on(backend, device, data)
    args = (x["keypoints"], x["scores"], x["areas"], x["batch_idx"])
    num_images = int(data["batch_idx"].max()) + 3  # two trailing images without candidates
    with mk.use_backend(backend):
        keep = mk.oks_nms(*args, threshold=0.6)
        mask, counts = mk.oks_nms_mask(*args, num_images, threshold=0.6, validate=False)
        skeep, snew = mk.soft_oks_nms(*args, threshold=0.6, max_dets=5)
        rank, new, scounts = mk.soft_oks_nms_mask(*args, num_images, threshold=0.6, max_dets=5)
    b = data["batch_idx"]
    assert mask.device == keep.device and mask.shape == b.shape
    assert set(mask.cpu().nonzero().squeeze(1).tolist()) == set(keep.cpu().tolist())
    assert torch.equal(counts.cpu(), torch.bincount(b[keep.cpu()], minlength=num_images))
    picked = (rank.cpu() >= 0).nonzero().squeeze(1)
    order = picked[torch.argsort(b[picked] * b.numel() + rank.cpu()[picked])]
    assert torch.equal(order, skeep.cpu())
    assert torch.equal(new.cpu()[order], snew.cpu())
    assert torch.equal(scounts.cpu(), torch.bincount(b[skeep.cpu()], minlength=num_images))
    assert scounts[-2:].tolist() == [0, 0] and int(scounts.max()) == 5


def test_mask_form_without_validation_clamps_image_ids():
    data = clustered_candidates([5, 6], 17, seed=8)
    args = (data["keypoints"], data["scores"], data["areas"])
    b = data["batch_idx"]
    out_of_range = torch.where(b == 1, 7, b)  # image 1 given as 7 with num_images = 2
    mask, counts = mk.oks_nms_mask(*args, out_of_range, 2, threshold=0.5, validate=False)
    want_mask, want_counts = mk.oks_nms_mask(*args, b, 2, threshold=0.5)
    assert torch.equal(mask, want_mask) and torch.equal(counts, want_counts)
    with pytest.raises(ValueError, match="batch_idx must be < num_images"):
        mk.oks_nms_mask(*args, out_of_range, 2, validate=True)


# --------------------------------------------------------------------------- real data
REAL_COCO = Path("/work/shared/data/real/mmpose_subsets/coco")
_REL_COCO = Path(__file__).resolve().parents[1] / "../shared/data/real/mmpose_subsets/coco"
COCO_DIR = next((p for p in (_REL_COCO, REAL_COCO) if (p / "test_coco.json").is_file()), None)


def _box_iou(a, b):
    ax2, ay2, bx2, by2 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    iw = max(0.0, min(ax2, bx2) - max(a[0], b[0]))
    ih = max(0.0, min(ay2, by2) - max(a[1], b[1]))
    inter = iw * ih
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def real_candidates(seed: int = 0):
    """MIPNet-style N=2 candidates on the real detector boxes: per box, the ground-truth pose
    best matching it (box IoU) and, when another person overlaps the box, that one too
    (score x 0.9), joints jittered by 3 % of the box side (fixed seed), joint scores
    U(0.6, 1) on labelled joints and U(0, 0.3) elsewhere, area = box area, score = box score."""
    gt = json.loads((COCO_DIR / "test_coco.json").read_text())
    dets = json.loads((COCO_DIR / "test_coco_det_AP_H_56.json").read_text())
    images = sorted(im["id"] for im in gt["images"])
    people = {}
    for ann in gt["annotations"]:
        if ann.get("num_keypoints", 0) > 0 and not ann.get("iscrowd", 0):
            people.setdefault(ann["image_id"], []).append(ann)
    rng = np.random.default_rng(seed)
    kps, scores, areas, bidx, image_ids = [], [], [], [], []
    for det in dets:
        anns = people.get(det["image_id"], [])
        ious = sorted(((_box_iou(det["bbox"], a["bbox"]), i) for i, a in enumerate(anns)), reverse=True)
        for rank, (iou, i) in enumerate(ious[:2]):
            if iou <= (0.0 if rank == 0 else 0.1):
                continue
            k = np.asarray(anns[i]["keypoints"], dtype=np.float64).reshape(17, 3)
            side = math.sqrt(det["bbox"][2] * det["bbox"][3])
            xy = k[:, :2] + rng.normal(0, 0.03 * side, (17, 2))
            vis = np.where(k[:, 2] > 0, rng.uniform(0.6, 1, 17), rng.uniform(0, 0.3, 17))
            kps.append(np.concatenate([xy, vis[:, None]], axis=1))
            scores.append(det["score"] * (0.9 if rank else 1.0))
            areas.append(det["bbox"][2] * det["bbox"][3])
            bidx.append(images.index(det["image_id"]))
            image_ids.append(det["image_id"])
    data = {
        "keypoints": torch.tensor(np.stack(kps)), "scores": torch.tensor(scores),
        "areas": torch.tensor(areas), "batch_idx": torch.tensor(bidx),
    }
    return gt, data, image_ids


def coco_keypoint_ap(gt: dict, data: dict, image_ids, keep) -> float:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    results = [{
        "image_id": image_ids[i], "category_id": 1, "score": float(data["scores"][i]),
        "keypoints": data["keypoints"][i].reshape(-1).tolist(),
    } for i in keep.tolist()]
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(results), "keypoints")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0])


@pytest.mark.real_data
@pytest.mark.skipif(COCO_DIR is None, reason="../shared/data/real/mmpose_subsets/coco is absent")
@pytest.mark.parametrize("backend, device", backend_params())
def test_real_coco_candidates(backend, device):
    require(backend, device)
    pytest.importorskip("pycocotools")
    gt, data, image_ids = real_candidates()
    expected = torch.from_numpy(na.hrnet_oks_nms_batched(
        data["keypoints"].numpy(), data["scores"].numpy(), data["areas"].numpy(), data["batch_idx"].numpy(),
        0.9, mk.COCO_SIGMAS))
    x = on(backend, device, data)
    with mk.use_backend(backend):
        keep = mk.oks_nms(x["keypoints"], x["scores"], x["areas"], x["batch_idx"], threshold=0.9).cpu()
    assert 0 < expected.numel() < data["scores"].numel(), "NMS should drop duplicates on this data"
    assert_keep_equal(keep, expected, data["batch_idx"], f"{backend} real COCO")
    ap, ap_anchor = coco_keypoint_ap(gt, data, image_ids, keep), coco_keypoint_ap(gt, data, image_ids, expected)
    assert ap == ap_anchor and 0 < ap <= 1


# --------------------------------------------------------------------------- opcheck / compile
def _small_inputs(dtype=torch.float32):
    d = clustered_candidates([6, 1, 9], 17, seed=31)
    return (d["keypoints"].to(dtype), d["scores"].to(dtype), d["areas"].to(dtype), d["batch_idx"],
            torch.tensor(mk.COCO_SIGMAS, dtype=dtype))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_opcheck(backend):
    skip_unless_runs(backend, "cpu")
    kp, s, a, b, sig = _small_inputs()
    with mk.use_backend(backend):
        torch.library.opcheck(torch.ops.mipnet.oks_iou.default, (kp, a, kp[:4], a[:4], sig, 0.25))
        torch.library.opcheck(torch.ops.mipnet.oks_nms_mask.default, (kp, s, a, b, 3, sig, 0.5, None, True))
        torch.library.opcheck(torch.ops.mipnet.soft_oks_nms_mask.default,
                              (kp, s, a, b, 4, sig, "linear", 0.5, 0.25, 0.0, 5, False))
        torch.library.opcheck(torch.ops.mipnet.oks_nms.default, (kp, s, a, b, sig, 0.5, None),
                              test_utils=("test_schema", "test_faketensor"))
        torch.library.opcheck(torch.ops.mipnet.soft_oks_nms.default, (kp, s, a, b, sig, "gaussian", 0.9, None, 0.0, 20),
                              test_utils=("test_schema", "test_faketensor"))


def _pipeline(kp, s, a, b):
    mask, counts = mk.oks_nms_mask(kp, s, a, b, 3, threshold=0.5, validate=False)
    return mask, counts, mk.oks_iou(kp, a, kp, a)


def test_torch_compile_fullgraph():
    kp, s, a, b, _ = _small_inputs()
    compiled = torch.compile(_pipeline, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(kp, s, a, b), _pipeline(kp, s, a, b)):
        assert torch.equal(got, want)


# --------------------------------------------------------------------------- bad input
def _bad(**change):
    kp, s, a, b, _ = _small_inputs()
    args = {"keypoints": kp, "scores": s, "areas": a, "batch_idx": b}
    args.update(change)
    return args


@pytest.mark.parametrize("args, kwargs, exc, match", [
    (_bad(), {"sigmas": [0.1] * 16}, ValueError, "sigmas must have K = 17"),
    (_bad(), {"sigmas": torch.ones(3)}, ValueError, r"sigmas must have shape \[K\]"),
    (_bad(areas=-torch.ones(16)), {}, ValueError, "areas must be >= 0"),
    (_bad(areas=torch.full((16,), math.nan)), {}, ValueError, "areas must be >= 0"),
    (_bad(scores=torch.full((16,), math.nan)), {}, ValueError, "scores contain NaN"),
    (_bad(batch_idx=torch.zeros(16, dtype=torch.int32)), {}, ValueError, "batch_idx must be int64"),
    (_bad(batch_idx=-torch.ones(16, dtype=torch.int64)), {}, ValueError, "batch_idx must be >= 0"),
    (_bad(scores=torch.ones(15)), {}, ValueError, r"scores must have shape \[16\] \(keypoints.shape\[0\]\)"),
    (_bad(keypoints=torch.ones(16, 17)), {}, ValueError, r"keypoints must have shape \[M, K, 3\]"),
    (_bad(keypoints=torch.ones(16, 17, 2)), {}, ValueError, r"keypoints must have shape \[M, K, 3\]"),
    (_bad(keypoints=torch.full((16, 17, 3), math.inf)), {}, ValueError, "keypoints must be finite"),
    (_bad(areas=torch.ones(16, dtype=torch.int64)), {}, ValueError, "areas must be a floating-point"),
    (_bad(keypoints=[[0.0]]), {}, TypeError, "keypoints must be a torch.Tensor"),
    (_bad(), {"threshold": 1.5}, ValueError, r"threshold must be in \[0, 1\]"),
    (_bad(), {"threshold": math.nan}, ValueError, "threshold must be in"),
    (_bad(), {"vis_threshold": math.nan}, ValueError, "vis_threshold must be in"),
    (_bad(keypoints=torch.ones(16, 133, 3)), {}, ValueError, "sigmas is required for K = 133"),
])
def test_oks_nms_bad_input(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        mk.oks_nms(**args, **kwargs)


def test_bad_input_other_forms():
    kp, s, a, b, sig = _small_inputs()
    with pytest.raises(ValueError, match="kpts_b has K = 14 joints but kpts_a has K = 17"):
        mk.oks_iou(kp, a, torch.ones(2, 14, 3), torch.ones(2), sig)
    with pytest.raises(ValueError, match=r"areas_b must have shape \[16\] \(kpts_b.shape\[0\]\), got \[3\]"):
        mk.oks_iou(kp, a, kp, a[:3], sig)
    with pytest.raises(ValueError, match="method must be one of"):
        mk.soft_oks_nms(kp, s, a, b, method="hard")
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\]"):
        mk.soft_oks_nms(kp, s, a, b, method="gaussian", threshold=0.0)
    with pytest.raises(ValueError, match="max_dets must be an int >= 1 or None"):
        mk.soft_oks_nms(kp, s, a, b, max_dets=0)
    with pytest.raises(ValueError, match="num_images must be an int >= 0"):
        mk.oks_nms_mask(kp, s, a, b, -1)
    with pytest.raises(ValueError, match="num_images is 0"):
        mk.oks_nms_mask(kp, s, a, b, 0)
    with pytest.raises(ValueError, match="scores contain NaN"):  # validate=True checks values
        mk.oks_nms_mask(kp, torch.full_like(s, math.nan), a, b, 3, validate=True)
    with pytest.raises(ValueError, match="sigmas is on"):
        mk.oks_nms(kp, s, a, b, sigmas=torch.ones(17, device="meta"))
    with pytest.raises(ValueError, match="batch_idx is on meta but keypoints is on cpu"):
        mk.oks_nms(kp, s, a, b.to("meta"))


def test_missing_triton_kernels_give_a_reason(monkeypatch):
    """When the Triton module is missing the triton backend declines with a reason (the
    automatic choice skips it; forcing it raises that reason) instead of crashing."""
    import mipnet_kernels.triton as triton_pkg
    from mipnet_kernels.ops import nms

    monkeypatch.setitem(triton_pkg._LAZY, "oks_nms_sorted_triton", "no_such_module")
    monkeypatch.setattr(nms.OKS_NMS_SORTED_KERNELS, "_resolved", {})  # forget the resolved launcher
    if _backends.backend_unavailable_reason("triton") is not None:
        pytest.skip(f"triton unavailable here: {_backends.backend_unavailable_reason('triton')}")
    reasons = _backends.not_supported_reasons("oks_nms_sorted", "triton", torch.device("cpu"))
    assert reasons == ["mipnet_kernels.triton.no_such_module is missing from this installation "
                       "(no oks_nms_sorted_triton)"]
    assert mk.backends_for("oks_nms_sorted", torch.device("cpu"))["triton"] == reasons
    kp, s, a, b, _ = _small_inputs()
    with mk.use_backend("triton"), pytest.raises(RuntimeError, match="no_such_module is missing"):
        mk.oks_nms(kp, s, a, b)


# --------------------------------------------------------------------------- issue 13: -inf scores, oks_iou values
@pytest.mark.parametrize("backend, device", backend_params())
def test_soft_nms_minus_inf_scores_pick_each_row_once(backend, device):
    """Scores of -inf are valid: each row is picked at most once, on every backend (the
    reference masked dead rows with -inf, tied with them and picked row 0 twice)."""
    dev = require(backend, device)
    kp = torch.zeros(3, 17, 3, dtype=torch.float64)
    kp[:, :, 2] = 1
    for i in range(3):  # far apart: no suppression
        kp[i, :, :2] += 1000 * i
    areas = torch.full((3,), 100.0, dtype=torch.float64)
    batch = torch.zeros(3, dtype=torch.int64)
    args = (kp.to(dev), None, areas.to(dev), batch.to(dev))
    with mk.use_backend(backend):
        keep, _ = mk.soft_oks_nms(args[0], torch.tensor([1.0, -math.inf, 0.5], dtype=torch.float64, device=dev),
                                  *args[2:])
        assert keep.tolist() == [0, 2]  # the -inf row is below the default score threshold
        keep, _ = mk.soft_oks_nms(args[0], torch.full((3,), -math.inf, dtype=torch.float64, device=dev), *args[2:],
                                  score_threshold=-math.inf, max_dets=None)
        assert keep.tolist() == [0, 1, 2]


@pytest.mark.parametrize("which, bad, message", [
    ("areas_a", "negative", "areas_a must be >= 0"),
    ("areas_b", "nan", "areas_b must be >= 0"),
    ("sigmas", "zero", "sigmas must be positive and finite"),
    ("kpts_a", "inf", "kpts_a must be finite"),
])
def test_oks_iou_checks_values_like_nms(which, bad, message):
    """oks_iou refuses what the NMS ops refuse (a negative area gave OKS = inf, a zero sigma NaN)."""
    g = torch.Generator().manual_seed(0)
    args = {"kpts_a": torch.rand(3, 17, 3, generator=g) * 100, "areas_a": torch.rand(3, generator=g) * 100 + 1,
            "kpts_b": torch.rand(2, 17, 3, generator=g) * 100, "areas_b": torch.rand(2, generator=g) * 100 + 1,
            "sigmas": torch.full((17,), 0.05)}
    value = {"negative": -1.0, "nan": math.nan, "zero": 0.0, "inf": math.inf}[bad]
    args[which] = args[which].clone()
    args[which].view(-1)[0] = value
    with pytest.raises(ValueError, match=message):
        mk.oks_iou(args["kpts_a"], args["areas_a"], args["kpts_b"], args["areas_b"], args["sigmas"])
    args[which].view(-1)[0] = 1.0  # the same call with valid values works
    assert mk.oks_iou(args["kpts_a"], args["areas_a"], args["kpts_b"], args["areas_b"], args["sigmas"]).shape == (3, 2)


def test_max_dets_and_num_images_checked_before_the_argument_parser():
    """max_dets=10**20 means "no limit" (it failed in torch's parser with an unrelated
    message); num_images=True / max_dets=True are refused, not read as 1 (issue 13.9)."""
    g = torch.Generator().manual_seed(3)
    kp = torch.rand(4, 17, 3, generator=g) * 100
    scores, areas = torch.rand(4, generator=g), torch.rand(4, generator=g) * 100 + 1
    batch = torch.tensor([0, 0, 1, 1])
    keep_all, _ = mk.soft_oks_nms(kp, scores, areas, batch, max_dets=None)
    keep_big, _ = mk.soft_oks_nms(kp, scores, areas, batch, max_dets=10**20)
    assert torch.equal(keep_big, keep_all)
    with pytest.raises(ValueError, match="num_images must be an int"):
        mk.oks_nms_mask(kp, scores, areas, batch, True)
    with pytest.raises(ValueError, match="num_images must be an int"):
        mk.soft_oks_nms_mask(kp, scores, areas, batch, True)
    with pytest.raises(ValueError, match="max_dets must be an int"):
        mk.soft_oks_nms(kp, scores, areas, batch, max_dets=True)


@pytest.mark.parametrize("backend, device", backend_params())
@pytest.mark.parametrize("method", ["linear", "gaussian"])
def test_soft_nms_infinite_scores_times_zero_factor(backend, device, method):
    """Identical poses with +inf scores: the rescore factor is 0 (linear: 1 - OKS = 0;
    gaussian at a tiny threshold: exp(-1/1e-3) underflows), and inf * 0 is NaN.  Every backend
    takes +inf * 0 = 0 (cpu / reference kept 8 with NaN scores, triton 1: issue 13.8)."""
    dev = require(backend, device)
    n = 8
    kp = torch.zeros(n, 17, 3, dtype=torch.float64)
    kp[:, :, :2] = torch.arange(17, dtype=torch.float64)[:, None] * 3
    kp[:, :, 2] = 1
    scores = torch.full((n,), math.inf, dtype=torch.float64)
    scores[5] = -math.inf
    areas = torch.full((n,), 500.0, dtype=torch.float64)
    batch = torch.zeros(n, dtype=torch.int64)
    thr = 0.5 if method == "linear" else 1e-3
    with mk.use_backend(backend):
        keep, new = mk.soft_oks_nms(kp.to(dev), scores.to(dev), areas.to(dev), batch.to(dev), method=method,
                                    threshold=thr, score_threshold=-math.inf, max_dets=None)
    keep, new = keep.cpu(), new.cpu()
    assert not torch.isnan(new).any(), new
    assert keep.tolist() == [0, 1, 2, 3, 4, 6, 7, 5]  # inf first, then the zeros by row, -inf last
    assert new.tolist() == [math.inf] + [0.0] * 6 + [-math.inf]
