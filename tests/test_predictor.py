"""Tests of :class:`mipnet.TopDownPredictor` (``python/mipnet/predictor.py``) against the
official-style pipeline (``python/mipnet/official.py``) and OpenCV.

* the device crop (``affine_grid`` + ``grid_sample``) equals ``cv2.warpAffine`` of HRNet's
  crop affine; the device box geometry equals :func:`mipnet.data.transforms.box_affines`;
* the key check: the predictor's COCO results equal the official-style pipeline's (per-
  instance full passes, separate flip pass, NumPy decode, NumPy OKS-NMS) on the same model,
  weights and boxes -- the same kept set and the same keypoints up to float rounding --
  for N = 1 and N = 2, flip test on and off;
* end to end on the real images and detector boxes of ``../shared/data/real`` (skipped when
  absent): shapes, geometry, JSON that pycocotools' ``loadRes`` reads;
* the continuous-λ sweep (its endpoints are instances 0 and 1), bad input, and on CUDA the
  absence of any host synchronisation (``torch.cuda.set_sync_debug_mode("error")``).

Models: SimpleBaseline-50 with random weights at a 64×32 crop (the smallest the stride-32
network takes).  The official initialisation (N(0, 0.001) everywhere) gives heatmaps of
~1e-11, where every rescored score is 0 and NMS order is all ties, so the tests re-initialise
the convolutions (Kaiming) and scale the last layer to heatmap maxima of order 1: a real
network with random weights whose scores exercise the 0.2 rescoring threshold.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import mipnet
from mipnet.data.transforms import box_affines, box_to_center_scale, invert_affine, read_image_rgb, warp_to_crop
from mipnet.models import build_model
from mipnet.official import OfficialPipeline
from mipnet.predictor import TopDownPredictor, box_geometry, draw_lambda_sweep, warp_crops
from mipnet_kernels import COCO_FLIP_PAIRS

_CANDIDATES = (Path(__file__).resolve().parents[1] / "../shared/data/real", Path("/work/shared/data/real"))
REAL = next((p.resolve() for p in _CANDIDATES if p.is_dir()), None)
COCO_DIR = None if REAL is None else REAL / "mmpose_subsets/coco"
needs_real = pytest.mark.skipif(COCO_DIR is None or not COCO_DIR.is_dir(),
                                reason="real data folder ../shared/data/real/mmpose_subsets/coco is absent")

INPUT = (64, 32)
ARCH = "resnet50"
_models: dict = {}


def unit_scale_model(num_instances: int, num_keypoints: int = 17) -> nn.Module:
    """SimpleBaseline-50, random Kaiming weights, last layer scaled to heatmap maxima ~1 (cached)."""
    key = (num_instances, num_keypoints)
    if key not in _models:
        torch.manual_seed(10 + num_instances)
        model = build_model(ARCH, num_instances=num_instances, num_keypoints=num_keypoints).eval()
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            x = torch.randn(2, 3, *INPUT, generator=g)
            peak = model.forward_instances(x).amax(dim=(-1, -2)).mean()
            model.final_layer.weight /= peak
            model.final_layer.bias.zero_()
        _models[key] = model
    return _models[key]


def synthetic_scene(seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Two textured images (one crossing an image border) with person-like boxes and a near-duplicate box."""
    rng = np.random.default_rng(seed)
    images, boxes = [], []
    for h, w in ((120, 160), (96, 130)):
        base = rng.integers(0, 256, size=(h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        img = np.kron(base, np.ones((8, 8, 1), dtype=np.uint8))[:h, :w]
        img = np.clip(img.astype(np.int16) + rng.integers(-20, 21, size=img.shape), 0, 255).astype(np.uint8)
        images.append(np.ascontiguousarray(img))
        b = np.array([[20, 10, 40, 80, 0.9], [70, 5, 50, 90, 0.7], [-10, 30, 40, 70, 0.5]])
        boxes.append(np.concatenate([b, b[:1] + [1.5, 1.0, 0.0, 0.0, -0.1]]))  # near-duplicate of box 0
    return images, boxes


def real_scene(boxes_per_image: int = 2):
    """Two real COCO images with their best detector boxes plus a near-duplicate of the best box."""
    dets = json.loads((COCO_DIR / "test_coco_det_AP_H_56.json").read_text())
    ids = [785, 40083]
    images, boxes = [], []
    for i in ids:
        b = sorted(([*d["bbox"], d["score"]] for d in dets if d["image_id"] == i), key=lambda r: -r[4])
        b = np.array(b[:boxes_per_image])
        boxes.append(np.concatenate([b, b[:1] + [2.0, -1.5, 0.0, 0.0, -0.05]]))
        images.append(read_image_rgb(COCO_DIR / f"{i:012d}.jpg"))
    return images, boxes, ids


# --------------------------------------------------------------------------- crop geometry
def _test_image() -> np.ndarray:
    if COCO_DIR is not None and COCO_DIR.is_dir():
        return read_image_rgb(COCO_DIR / "000000000785.jpg")
    return synthetic_scene(0)[0][0]


@pytest.mark.parametrize("input_size", [(256, 192), (64, 32), (128, 96)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_warp_crops_match_cv2_warp_affine(input_size):
    image = _test_image()
    H, W = image.shape[:2]
    # inside, partly outside, tiny (upsampled), wider than tall, and far outside the image
    boxes = np.array([[0.3 * W, 0.1 * H, 0.35 * W, 0.7 * H], [-0.1 * W, 0.5 * H, 0.3 * W, 0.8 * H],
                      [0.5 * W, 0.5 * H, 7.3, 5.1], [0.1 * W, 0.2 * H, 0.8 * W, 0.2 * H], [1.5 * W, 0, 40, 50]])
    image_to_crop, _ = box_affines(boxes, input_size, (1, 1))
    crop_to_image, _, _ = box_geometry(torch.tensor(boxes, dtype=torch.float64), input_size, (1, 1))
    ours = warp_crops(torch.from_numpy(image).permute(2, 0, 1), crop_to_image, input_size)
    assert ours.shape == (len(boxes), 3, *input_size)
    for j in range(len(boxes)):
        ref = warp_to_crop(image, image_to_crop[j], input_size).astype(np.float64)
        diff = np.abs(ours[j].permute(1, 2, 0).double().numpy() - ref)
        # cv2 interpolates in fixed point (1/32 px, 15-bit weights): rounding differences only
        assert diff.mean() < 0.05, f"box {j}: mean |crop - cv2| = {diff.mean():.3f} gray levels"
        assert np.quantile(diff, 0.999) <= 1.0, f"box {j}: 99.9% quantile {np.quantile(diff, 0.999)}"


def test_box_geometry_matches_hrnet_transforms():
    rng = np.random.default_rng(3)
    boxes = np.concatenate([rng.uniform(-50, 600, (64, 2)), rng.uniform(1, 400, (64, 2))], axis=1)
    for input_size in ((256, 192), (384, 288), (64, 32)):
        heatmap = (input_size[0] // 4, input_size[1] // 4)
        image_to_crop, hm_to_image = box_affines(boxes, input_size, heatmap)
        c2i, h2i, areas = box_geometry(torch.from_numpy(boxes), input_size, heatmap)
        np.testing.assert_allclose(c2i.numpy(), invert_affine(image_to_crop), rtol=1e-12, atol=1e-9)
        np.testing.assert_allclose(h2i.numpy(), hm_to_image, rtol=1e-12, atol=1e-9)
        _, scale = box_to_center_scale(boxes, input_size[1] / input_size[0])
        np.testing.assert_allclose(areas.numpy(), np.prod(scale * 200, axis=1), rtol=1e-12)  # HRNet's OKS area


# --------------------------------------------------------------------------- equivalence
#: Relative tolerance of heatmap maxima and scores.  cv2.warpAffine interpolates in fixed
#: point, so ~1% of the crop pixels differ by one gray level from the exact bilinear crop
#: (test_warp_crops_match_cv2_warp_affine); this random network turns that into up to ~1e-3
#: of its heatmap maxima (measured 8e-4; batch composition and forward_instances vs per-
#: instance passes contribute < 2e-6).  The argmax positions, hence the keypoints, the kept
#: set and the order, must still be identical.
SCORE_RTOL = 5e-3


def _assert_same_results(ours: list[dict], official: list[dict], *, px_tol: float) -> None:
    assert len(ours) == len(official), f"kept {len(ours)} poses, the official pipeline {len(official)}"
    for a, b in zip(ours, official):
        assert a["image_id"] == b["image_id"] and a["category_id"] == b["category_id"] == 1
        np.testing.assert_allclose(a["score"], b["score"], rtol=SCORE_RTOL, atol=1e-6)
        ka, kb = np.reshape(a["keypoints"], (-1, 3)), np.reshape(b["keypoints"], (-1, 3))
        np.testing.assert_allclose(ka[:, :2], kb[:, :2], rtol=0, atol=px_tol)
        np.testing.assert_allclose(ka[:, 2], kb[:, 2], rtol=SCORE_RTOL, atol=1e-6)


def _run_both(num_instances, flip, images, boxes, ids):
    model = unit_scale_model(num_instances)
    ours = TopDownPredictor(model, input_size=INPUT, flip_test=flip, batch_size=3).predict(images, boxes, ids)
    official = OfficialPipeline(model, input_size=INPUT, flip_test=flip, batch_size=5).predict(images, boxes, ids)
    candidates = num_instances * sum(len(b) for b in boxes)
    return ours, official, candidates


@pytest.mark.real_data
@needs_real
@pytest.mark.parametrize("flip", [True, False], ids=["flip", "noflip"])
@pytest.mark.parametrize("num_instances", [1, 2], ids=["N1", "N2"])
def test_predictor_equals_official_pipeline_real(num_instances, flip):
    images, boxes, ids = real_scene()
    ours, official, candidates = _run_both(num_instances, flip, images, boxes, ids)
    assert 0 < len(ours) < candidates, "the near-duplicate boxes must be suppressed by OKS-NMS"
    # float rounding of the affine (float32 here, float64 there) at ~600 px, nothing else
    _assert_same_results(ours, official, px_tol=2e-3)


def test_predictor_equals_official_pipeline_synthetic():
    images, boxes = synthetic_scene(1)
    ours, official, candidates = _run_both(2, True, images, boxes, [11, 12])
    assert 0 < len(ours) < candidates
    _assert_same_results(ours, official, px_tol=1e-3)


# --------------------------------------------------------------------------- tensor API, end to end
def test_predict_tensors_fields_and_geometry():
    images, boxes = synthetic_scene(2)
    model = unit_scale_model(2)
    pred = TopDownPredictor(model, input_size=INPUT, flip_test=False, batch_size=5)
    c = pred.predict_tensors(images, boxes)
    n_boxes = sum(len(b) for b in boxes)
    M = 2 * n_boxes
    assert c.keypoints.shape == (M, 17, 3) and c.scores.shape == (M,) and c.keep.dtype == torch.bool
    assert sorted(zip(c.box_index.tolist(), c.instance.tolist())) == [(j, n) for j in range(n_boxes) for n in range(2)]
    image_of_box = np.repeat(np.arange(len(images)), [len(b) for b in boxes])
    assert (c.image_index.numpy() == image_of_box[c.box_index.numpy()]).all()
    assert c.counts.tolist() == [int(c.keep[c.image_index == i].sum()) for i in range(len(images))]
    # every keypoint lies inside its padded crop window (the heatmap's extent in the image)
    all_boxes = np.concatenate(boxes)[c.box_index.numpy()]
    center, scale = box_to_center_scale(all_boxes[:, :4], INPUT[1] / INPUT[0])
    half = scale * 200 / 2
    kp = c.keypoints[..., :2].numpy()
    assert (np.abs(kp - center[:, None]) <= half[:, None] + 1e-3).all()
    # rescoring: box score (x 0.5 for instance 1) x mean of the joint scores above 0.2
    s = c.keypoints[..., 2].numpy()
    mean = np.array([r[r > 0.2].mean() if (r > 0.2).any() else 0.0 for r in s])
    factor = np.where(c.instance.numpy() == 0, 1.0, 0.5)
    np.testing.assert_allclose(c.scores.numpy(), all_boxes[:, 4] * factor * mean, rtol=1e-5, atol=1e-7)


def test_images_as_tensors_paths_and_layouts_agree(tmp_path):
    import cv2

    images, boxes = synthetic_scene(3)
    images, boxes = images[:1], [boxes[0][:2]]
    path = tmp_path / "img.png"
    cv2.imwrite(str(path), cv2.cvtColor(images[0], cv2.COLOR_RGB2BGR))
    pred = TopDownPredictor(unit_scale_model(1), input_size=INPUT, flip_test=False)
    ref = pred.predict(images, boxes)
    for variant in (torch.from_numpy(images[0]).permute(2, 0, 1), torch.from_numpy(images[0]), str(path)):
        assert pred.predict([variant], boxes) == ref
    assert pred.predict([images[0]], [np.zeros((0, 5))]) == []
    assert pred.predict([], []) == []


@pytest.mark.real_data
@needs_real
def test_predict_detections_real_coco_loads_in_pycocotools(tmp_path):
    from pycocotools.coco import COCO

    pred = TopDownPredictor(unit_scale_model(2), input_size=INPUT, flip_test=True, batch_size=16)
    out = tmp_path / "results" / "keypoints.json"
    results = pred.predict_detections(COCO_DIR / "test_coco_det_AP_H_56.json", COCO_DIR, image_ids=[785, 40083],
                                      score_threshold=0.5, output=out)
    dets = json.loads((COCO_DIR / "test_coco_det_AP_H_56.json").read_text())
    n_boxes = sum(1 for d in dets if d["image_id"] in (785, 40083) and d["score"] >= 0.5)
    assert 0 < len(results) <= 2 * n_boxes
    assert json.loads(out.read_text()) == results
    gt = COCO(str(COCO_DIR / "test_coco.json"))
    dt = gt.loadRes(str(out))
    assert len(dt.getAnnIds()) == len(results)
    sizes = {img["id"]: (img["width"], img["height"]) for img in gt.dataset["images"]}
    for r in results:
        assert r["image_id"] in (785, 40083) and r["category_id"] == 1 and len(r["keypoints"]) == 51
        assert np.isfinite(r["keypoints"]).all() and np.isfinite(r["score"])
    # boxes whose padded crop lies inside the image give keypoints inside the image
    by_id = {}
    for d in dets:
        if d["image_id"] in (785, 40083) and d["score"] >= 0.5:
            by_id.setdefault(d["image_id"], []).append(d["bbox"])
    for image_id, bxs in by_id.items():
        w, h = sizes[image_id]
        center, scale = box_to_center_scale(np.array(bxs), INPUT[1] / INPUT[0])
        lo, hi = center - scale * 100, center + scale * 100
        inside = (lo >= 0).all(1) & (hi[:, 0] <= w) & (hi[:, 1] <= h)
        c = pred.predict_tensors([COCO_DIR / f"{image_id:012d}.jpg"], [np.array(bxs)[inside]])
        kp = c.keypoints[..., :2].numpy()
        assert ((kp >= -1e-3) & (kp <= np.array([w, h]) + 1e-3)).all()


# --------------------------------------------------------------------------- lambda sweep
def test_lambda_sweep_endpoints_are_the_two_instances(tmp_path):
    images, boxes = synthetic_scene(4)
    pred = TopDownPredictor(unit_scale_model(2), input_size=INPUT, flip_test=True)
    box = boxes[0][0]
    sweep = pred.predict_lambda_sweep(images[0], box, steps=3)
    assert sweep.t.tolist() == [0.0, 0.5, 1.0] and sweep.keypoints.shape == (3, 17, 3)
    c = pred.predict_tensors(images[:1], [box[None]])
    for n, step in ((0, 0), (1, -1)):
        np.testing.assert_allclose(sweep.keypoints[step], c.keypoints[c.instance == n][0].numpy(), atol=1e-3)
    fig = draw_lambda_sweep(images[0], sweep, path=tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(fig.axes[0].lines) == 3 * 19  # one COCO skeleton per step


# --------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def predictor():
    return TopDownPredictor(unit_scale_model(1), input_size=INPUT, flip_test=False)


@pytest.mark.parametrize("box, match", [
    ([10, 10, 0, 20], r"boxes\[0\]\[0\] has width 0 and height 20"),
    ([10, 10, 20, -5], r"boxes\[0\]\[0\] has width 20 and height -5"),
    ([10, np.nan, 20, 20], r"boxes\[0\]\[0\] .* NaN or inf"),
    ([10, 10, 20, 20, np.inf], r"boxes\[0\]\[0\] .* NaN or inf"),
], ids=["zero-width", "negative-height", "nan", "inf-score"])
def test_bad_boxes(predictor, box, match):
    image = np.zeros((40, 40, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=match):
        predictor.predict([image], [np.array([box])])


def test_bad_box_shapes_and_counts(predictor):
    image = np.zeros((40, 40, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"boxes\[0\] must have shape \[n, 4\]"):
        predictor.predict([image], [np.zeros((2, 3))])
    with pytest.raises(ValueError, match="one entry per image"):
        predictor.predict([image, image], [np.zeros((0, 5))])
    with pytest.raises(ValueError, match="image_ids must have one id per image"):
        predictor.predict([image], [np.zeros((0, 5))], image_ids=[1, 2])


@pytest.mark.parametrize("image, err, match", [
    (np.zeros((40, 40, 4), dtype=np.uint8), ValueError, r"images\[0\] must be an RGB image with 3 channels"),
    (np.zeros((40, 40), dtype=np.uint8), ValueError, r"images\[0\] must be an RGB image with 3 channels"),
    (torch.zeros(1, 40, 40, dtype=torch.uint8), ValueError, r"images\[0\] must be an RGB image"),
    (np.zeros((40, 40, 3), dtype=np.float32), TypeError, r"images\[0\] must be uint8"),
    (42, TypeError, r"images\[0\] must be a tensor, a NumPy array or a path"),
    ("/nonexistent/image.jpg", FileNotFoundError, "cannot read image"),
], ids=["4-channels", "grayscale", "1-channel-tensor", "float", "int", "missing-file"])
def test_bad_images(predictor, image, err, match):
    with pytest.raises(err, match=match):
        predictor.predict([image], [np.array([[5.0, 5.0, 10.0, 20.0]])])


def test_bad_model_and_settings():
    model = unit_scale_model(1)
    with pytest.raises(TypeError, match="model must be a mipnet pose model"):
        TopDownPredictor(nn.Conv2d(3, 17, 1))
    with pytest.raises(ValueError, match="input_size must be multiples of 32"):
        TopDownPredictor(model, input_size=(64, 48))
    with pytest.raises(ValueError, match="decode must be one of"):
        TopDownPredictor(model, input_size=INPUT, decode="soft-argmax")
    with pytest.raises(ValueError, match="nms_threshold must be a number in"):
        TopDownPredictor(model, input_size=INPUT, nms_threshold=1.5)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        TopDownPredictor(model, input_size=INPUT, batch_size=0)
    with pytest.raises(ValueError, match="predict_lambda_sweep needs a MIPNet model"):
        TopDownPredictor(model, input_size=INPUT).predict_lambda_sweep(np.zeros((40, 40, 3), np.uint8), [1, 1, 9, 9])


def test_keypoint_count_mismatch():
    crowdpose = build_model(ARCH, num_instances=1, num_keypoints=14)
    with pytest.raises(ValueError, match=r"flip_pairs do not fit the model's num_keypoints=14"):
        TopDownPredictor(crowdpose, input_size=INPUT, flip_pairs=COCO_FLIP_PAIRS)
    with pytest.raises(ValueError, match=r"sigmas has 17 values but the model has num_keypoints=14"):
        TopDownPredictor(crowdpose, input_size=INPUT, sigmas=[0.05] * 17)
    odd = build_model(ARCH, num_instances=1, num_keypoints=5)
    with pytest.raises(ValueError, match="flip_pairs is required for a model with num_keypoints=5"):
        TopDownPredictor(odd, input_size=INPUT)


def test_exported_from_package():
    assert mipnet.TopDownPredictor is TopDownPredictor


# --------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (torch.cuda.is_available() is False)")
@pytest.mark.parametrize("num_instances", [1, 2], ids=["N1", "N2"])
def test_cuda_predict_tensors_never_synchronises(num_instances):
    images, boxes = synthetic_scene(5)
    model = copy.deepcopy(unit_scale_model(num_instances))
    pred = TopDownPredictor(model, input_size=INPUT, flip_test=True, batch_size=3, device="cuda")
    gpu_images = [torch.from_numpy(im).cuda().permute(2, 0, 1) for im in images]
    gpu_boxes = [torch.from_numpy(b).float().cuda() for b in boxes]
    warm = pred.predict_tensors(gpu_images, gpu_boxes)  # warm-up: kernel caches, cached constants
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        c = pred.predict_tensors(gpu_images, gpu_boxes)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(c.keep, warm.keep)
    # and the CUDA results equal the official-style pipeline on the same GPU model
    ours = c.to_results([0, 1])
    official = OfficialPipeline(model, input_size=INPUT, flip_test=True).predict(images, boxes)
    _assert_same_results(ours, official, px_tol=2e-3)


def test_huge_finite_box_is_refused_up_front():
    """A finite float64 box beyond float32's geometry (issue 13: [0, 0, 3e38, 3e38] failed
    later with NMS's "keypoints must be finite") is refused naming the box."""
    from mipnet.predictor import MAX_BOX_COORD, check_boxes

    with pytest.raises(ValueError, match=r"boxes\[1\].*out of range"):
        check_boxes([[0, 0, 10, 10], [0, 0, 3e38, 3e38]])
    with pytest.raises(ValueError, match=r"boxes\[0\].*out of range"):
        check_boxes([[-2 * MAX_BOX_COORD, 0, 10, 10]])
    assert check_boxes([[0, 0, MAX_BOX_COORD, MAX_BOX_COORD]]).shape == (1, 5)
