"""mipnet.data: crop geometry, augmentation, multi-instance targets (Eq. 1) and the COCO-format datasets.

Geometry and targets are checked against independent constructions (HRNet's three-point
affine via ``cv2.getAffineTransform``, a mirrored image array, hand-placed people); the
datasets on the real annotations of ``../shared/data/real`` (skipped when absent) and on a
small synthetic crowd (always).
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from mipnet.data import (
    AugmentConfig,
    CropParams,
    KeypointDataset,
    box_affines,
    box_to_center_scale,
    build_targets,
    flip_keypoints,
    gaussian_heatmaps,
    get_affine,
    heatmap_to_image_affine,
    invert_affine,
    select_instances,
    transform_points,
    warp_to_crop,
)
from mipnet.data.synthetic import generate
from mipnet.data.transforms import sample_augmentation
from mipnet_kernels.keypoints import COCO_FLIP_PAIRS
from mipnet_kernels.ops.decode import flip_index_from_pairs

_CANDIDATES = (Path(__file__).resolve().parents[1] / "../shared/data/real", Path("/work/shared/data/real"))
REAL = next((p.resolve() for p in _CANDIDATES if p.is_dir()), None)
needs_real = pytest.mark.skipif(REAL is None, reason="real data folder ../shared/data/real is absent")

# name: (annotation file, image folder, kind, detection file or None)
REAL_SETS = {
    "coco_val_mini": ("coco_val_mini/person_keypoints_val2017.json", "coco_val_mini/val2017", "coco", None),
    "mmpose_coco": ("mmpose_subsets/coco/test_coco.json", "mmpose_subsets/coco", "coco",
                    "mmpose_subsets/coco/test_coco_det_AP_H_56.json"),
    "crowdpose": ("mmpose_subsets/crowdpose/test_crowdpose.json", "mmpose_subsets/crowdpose", "crowdpose",
                  "mmpose_subsets/crowdpose/test_crowdpose_det_AP_40.json"),
    "ochuman": ("mmpose_subsets/ochuman/test_ochuman.json", "mmpose_subsets/ochuman", "ochuman", None),
}
INPUT = (256, 192)
HEATMAP = (64, 48)


def _random_crops(rng, n):
    center = rng.uniform(0, 600, size=(n, 2))
    scale = rng.uniform(0.2, 3.0, size=(n, 1)) * np.array([0.75, 1.0])
    rotation = rng.uniform(-90, 90, size=n)
    return center, scale, rotation


def _hrnet_three_point_affine(center, scale, rot, output_size):
    """HRNet's construction: centre, a point above it (rotated) and the perpendicular third point."""
    h, w = output_size
    src_w = scale[0] * 200.0
    r = np.deg2rad(rot)
    src_dir = np.array([0.5 * src_w * np.sin(r), -0.5 * src_w * np.cos(r)])
    dst_dir = np.array([0.0, -0.5 * w])

    def third(a, b):
        d = a - b
        return b + np.array([-d[1], d[0]])

    src = np.array([center, center + src_dir, third(center, center + src_dir)], dtype=np.float32)
    dst0 = np.array([0.5 * w, 0.5 * h])
    dst = np.array([dst0, dst0 + dst_dir, third(dst0, dst0 + dst_dir)], dtype=np.float32)
    return cv2.getAffineTransform(src, dst)


# ----------------------------------------------------------------------------- geometry
def test_box_to_center_scale_fixes_aspect_and_pads():
    rng = np.random.default_rng(0)
    boxes = np.concatenate([rng.uniform(0, 500, (50, 2)), rng.uniform(1, 400, (50, 2))], axis=1)
    center, scale = box_to_center_scale(boxes, 0.75)
    np.testing.assert_allclose(center, boxes[:, :2] + boxes[:, 2:] / 2)
    np.testing.assert_allclose(scale[:, 0] / scale[:, 1], 0.75)
    # the padded crop covers the box by exactly x1.25 along the box's tighter side
    cover = scale * 200 / boxes[:, 2:]
    assert np.all(cover >= 1.25 - 1e-9)
    np.testing.assert_allclose(cover.min(axis=1), 1.25)


def test_affine_matches_hrnet_three_point_construction():
    rng = np.random.default_rng(1)
    for c, s, r in zip(*_random_crops(rng, 20)):
        expected = _hrnet_three_point_affine(c, s, r, INPUT)
        np.testing.assert_allclose(get_affine(c, s, r, INPUT), expected, rtol=1e-4, atol=1e-3)


def test_affine_round_trip_and_centre():
    rng = np.random.default_rng(2)
    center, scale, rotation = _random_crops(rng, 64)
    A = get_affine(center, scale, rotation, INPUT)  # batched [64, 2, 3]
    inv = invert_affine(A)
    pts = rng.uniform(-100, 900, size=(64, 17, 2))
    back = transform_points(transform_points(pts, A), inv)
    assert np.abs(back - pts).max() < 1e-4
    np.testing.assert_allclose(transform_points(center[:, None], A)[:, 0], np.tile([96.0, 128.0], (64, 1)), atol=1e-9)
    # the scale's width spans the crop's width
    widths = np.linalg.norm(A[:, :, 0], axis=1) * scale[:, 0] * 200
    np.testing.assert_allclose(widths, 192.0)


def test_heatmap_affine_is_crop_affine_after_stride():
    rng = np.random.default_rng(3)
    center, scale, rotation = _random_crops(rng, 8)
    crop_to_image = invert_affine(get_affine(center, scale, rotation, INPUT))
    hm = rng.uniform(0, 48, size=(8, 5, 2))
    via_crop = transform_points(hm * 4.0, crop_to_image)
    np.testing.assert_allclose(transform_points(hm, heatmap_to_image_affine(crop_to_image, INPUT, HEATMAP)), via_crop)


def test_flip_keypoints_swaps_and_is_an_involution():
    rng = np.random.default_rng(4)
    kp = np.concatenate([rng.uniform(0, 640, (3, 17, 2)), rng.integers(0, 3, (3, 17, 1))], axis=-1)
    once = flip_keypoints(kp, 640, COCO_FLIP_PAIRS)
    np.testing.assert_allclose(flip_keypoints(once, 640, COCO_FLIP_PAIRS), kp)
    for left, right in COCO_FLIP_PAIRS:
        np.testing.assert_allclose(once[:, left, 0], 639 - kp[:, right, 0])
        np.testing.assert_array_equal(once[:, left, 1:], kp[:, right, 1:])
    np.testing.assert_allclose(once[:, 0, 0], 639 - kp[:, 0, 0])  # the nose stays the nose


def test_flipped_crop_equals_cropping_the_mirrored_image():
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, size=(120, 160, 3), dtype=np.uint8)
    center, scale = np.array([70.3, 61.2]), np.array([0.4, 0.5333])
    flipped = CropParams(center, scale, rotation=17.0, flip=True)
    direct = warp_to_crop(image, flipped.image_to_crop(INPUT, 160), INPUT)
    mirrored_center = np.array([159 - center[0], center[1]])
    hrnet = warp_to_crop(np.ascontiguousarray(image[:, ::-1]), get_affine(mirrored_center, scale, 17.0, INPUT), INPUT)
    assert np.abs(direct.astype(int) - hrnet.astype(int)).max() <= 1  # bilinear rounding only


def test_augmentation_draws_follow_the_config():
    rng = np.random.default_rng(9)
    kp = np.zeros((17, 3))
    cfg = AugmentConfig(half_body_prob=0.0)
    scale = np.array([1.0, 4 / 3])
    draws = [sample_augmentation(rng, np.zeros(2), scale, kp, cfg, range(11), 0.75) for _ in range(3000)]
    rot = np.array([d.rotation for d in draws])
    ratio = np.array([d.scale[0] for d in draws])
    assert np.abs(rot).max() <= 45.0 and np.abs(rot).max() > 40.0
    assert 0.35 < np.mean(rot == 0) < 0.45  # rotation applied with probability 0.6
    assert ratio.min() >= 0.65 and ratio.max() <= 1.35 and ratio.min() < 0.7 and ratio.max() > 1.3
    np.testing.assert_allclose([d.scale[1] / d.scale[0] for d in draws], 4 / 3)
    assert 0.45 < np.mean([d.flip for d in draws]) < 0.55
    wide = [sample_augmentation(rng, np.zeros(2), scale, kp, AugmentConfig(rotation_limit=90, rotation_prob=1.0),
                                range(11), 0.75).rotation for _ in range(2000)]
    assert 60 < np.abs(wide).max() <= 90


def test_half_body_crop():
    rng = np.random.default_rng(10)
    kp = np.zeros((17, 3))
    kp[:, 0] = np.linspace(100, 140, 17)
    kp[:, 1] = np.linspace(50, 300, 17)  # upper body (0-10) high, lower body low
    kp[:, 2] = 2
    cfg = AugmentConfig(scale_factor=0.0, rotation_prob=0.0, flip_prob=0.0, half_body_prob=1.0)
    upper, lower = kp[:11, :2], kp[11:, :2]
    seen = set()
    for _ in range(40):
        crop = sample_augmentation(rng, np.zeros(2), np.ones(2), kp, cfg, range(11), 0.75)
        part = upper if np.allclose(crop.center, upper.mean(axis=0)) else lower
        np.testing.assert_allclose(crop.center, part.mean(axis=0))
        extent = part.max(axis=0) - part.min(axis=0)
        np.testing.assert_allclose(crop.scale[1] * 200, 1.5 * max(extent[1], extent[0] / 0.75))
        seen.add(part is upper)
    assert seen == {True, False}
    few = kp.copy()
    few[8:, 2] = 0  # 8 labelled joints: not more than half_body_min_joints, so no half-body crop
    crop = sample_augmentation(rng, np.zeros(2), np.ones(2), few, cfg, range(11), 0.75)
    np.testing.assert_array_equal(crop.center, [0.0, 0.0])


def test_augment_config_validates():
    with pytest.raises(ValueError, match="flip_prob"):
        AugmentConfig(flip_prob=1.5)
    with pytest.raises(ValueError, match="scale_factor"):
        AugmentConfig(scale_factor=1.0)


# ----------------------------------------------------------------------------- targets
def test_gaussian_peak_is_the_keypoint():
    rng = np.random.default_rng(6)
    kp = np.concatenate([rng.uniform(10, 38, (20, 1)), rng.uniform(10, 54, (20, 1))], axis=1)
    maps = gaussian_heatmaps(kp, np.ones(20), HEATMAP, sigma=2.0)
    assert maps.shape == (20, 64, 48) and maps.dtype == np.float32
    ys, xs = np.mgrid[0:64, 0:48]
    total = maps.sum(axis=(1, 2))
    centroid = np.stack([(maps * xs).sum(axis=(1, 2)) / total, (maps * ys).sum(axis=(1, 2)) / total], axis=1)
    np.testing.assert_allclose(centroid, kp, atol=1e-4)
    flat = maps.reshape(20, -1).argmax(axis=1)
    np.testing.assert_array_equal(np.stack([flat % 48, flat // 48], axis=1), np.round(kp))
    on_grid = gaussian_heatmaps(np.round(kp), np.ones(20), HEATMAP, sigma=2.0)
    assert np.allclose(on_grid.reshape(20, -1).max(axis=1), 1.0)


def _person(center, n_in, n_out=0, n_unlabelled=0, v=2):
    """17 keypoints: ``n_in`` labelled inside a 256x192 crop, ``n_out`` labelled outside, some unlabelled."""
    kp = np.zeros((17, 3))
    kp[:, :2] = center
    kp[:n_in, 2] = v
    kp[n_in : n_in + n_out] = (-5.0, 40.0, 2)
    kp[n_in + n_out : n_in + n_out + n_unlabelled, :2] = (50.0, 50.0)
    return kp


def test_select_instances_orders_by_distance_and_applies_k():
    # primary 0; others at distances 10 (2 kps in crop: too few), 20 (3 kps: enough),
    # 30 (5 in crop but the rest outside), 40 (17), 50 (3 labelled but unlabelled ones inside)
    centers = np.array([[100, 100], [110, 100], [100, 120], [70, 100], [100, 140], [150, 100]], float)
    kps = np.stack([
        _person((96, 128), 17),
        _person((96, 128), 2, n_out=15),
        _person((96, 128), 3, n_out=14),
        _person((96, 128), 5, n_out=12),
        _person((96, 128), 17),
        _person((96, 128), 3, n_unlabelled=14),
    ])
    pick = lambda n, **kw: select_instances(0, centers, kps, n, INPUT, **kw).tolist()  # noqa: E731
    assert pick(1) == [0]
    assert pick(3) == [0, 2, 3]
    assert pick(5) == [0, 2, 3, 4, 5]
    assert pick(7) == [0, 2, 3, 4, 5, 0, 0]  # fallback to the primary
    assert pick(3, min_keypoints=4) == [0, 3, 4]
    assert pick(3, min_keypoints=2) == [0, 1, 2]
    # v = 1 (occluded but labelled) counts like v = 2
    kps_occluded = kps.copy()
    kps_occluded[2, :3, 2] = 1
    assert select_instances(0, centers, kps_occluded, 2, INPUT).tolist() == [0, 2]


def test_select_instances_official_rule():
    centers = np.array([[100, 100], [110, 100], [130, 100], [160, 100]], float)
    kps = np.stack([_person((96, 128), 17), _person((96, 128), 4, n_out=13),
                    _person((96, 128), 17), _person((96, 128), 17)])
    assert select_instances(0, centers, kps, 2, INPUT, selection="official").tolist() == [0, 1]
    assert select_instances(0, centers, kps, 3, INPUT, selection="official").tolist() == [0, 1, 0]
    kps[1] = _person((96, 128), 3, n_out=14)  # exactly k = 3: the paper accepts it, the code does not
    assert select_instances(0, centers, kps, 2, INPUT, selection="paper").tolist() == [0, 1]
    assert select_instances(0, centers, kps, 2, INPUT, selection="official").tolist() == [0, 0]
    kps[1] = _person((96, 128), 1, n_out=16)  # the nearest fails: the paper looks further, the code stops
    assert select_instances(0, centers, kps, 2, INPUT, selection="paper").tolist() == [0, 2]
    assert select_instances(0, centers, kps, 2, INPUT, selection="official").tolist() == [0, 0]


def test_build_targets_instances_weights_and_fallback():
    rng = np.random.default_rng(7)
    kps = np.zeros((3, 17, 3))
    kps[..., 0] = rng.uniform(0, 191, (3, 17))
    kps[..., 1] = rng.uniform(0, 255, (3, 17))
    kps[..., 2] = 2
    kps[0, 0, 2] = 0  # unlabelled
    kps[0, 1, :2] = (-3.0, 20.0)  # outside the crop
    kps[0, 2, :2] = (50.0, 256.0)  # on the far edge: outside (half-open)
    kps[2, 3:, :2] = (300.0, 20.0)  # person 2 has only 3 keypoints inside
    centers = np.array([[0.0, 0.0], [50.0, 0.0], [10.0, 0.0]])
    target, weight, chosen = build_targets(kps, centers, 0, 3, INPUT, HEATMAP)
    assert chosen.tolist() == [0, 2, 1]
    assert target.shape == (3, 17, 64, 48) and weight.shape == (3, 17)
    assert weight[0, :3].tolist() == [0, 0, 0] and weight[0, 3:].all()
    assert not target[0, :3].any()
    assert weight[1, :3].all() and not weight[1, 3:].any()
    for n, person in enumerate(chosen):
        expected = gaussian_heatmaps(kps[person, :, :2] / 4.0, weight[n], HEATMAP, 2.0)
        np.testing.assert_array_equal(target[n], expected)
    target, weight, chosen = build_targets(kps, centers, 0, 4, INPUT, HEATMAP, min_keypoints=4)
    assert chosen.tolist() == [0, 1, 0, 0]
    np.testing.assert_array_equal(target[2], target[0])
    np.testing.assert_array_equal(weight[3], weight[0])


@pytest.mark.parametrize(
    "kwargs, match",
    [({"num_instances": 0}, "num_instances"), ({"selection": "nearest"}, "selection"),
     ({"primary": 5}, "primary")],
)
def test_select_instances_bad_input(kwargs, match):
    args = dict(primary=0, centers=np.zeros((2, 2)), keypoints=np.zeros((2, 17, 3)), num_instances=2,
                input_size=INPUT)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        select_instances(**args)


# ----------------------------------------------------------------------------- datasets
def _annotation_index(annotation_file):
    data = json.loads(Path(annotation_file).read_text())
    return {a["id"]: np.asarray(a["keypoints"], float).reshape(-1, 3) for a in data["annotations"]}, data


def _check_sample_consistency(ds, sample, originals):
    """Every instance's crop joints map back through crop_to_image onto its annotation (flip undone)."""
    meta = sample["meta"]
    K = ds.spec.num_joints
    assert sample["image"].shape == (3, *ds.input_size) and sample["image"].dtype == torch.float32
    assert sample["target"].shape == (ds.num_instances, K, *ds.heatmap_size)
    assert sample["target_weight"].shape == (ds.num_instances, K)
    flip_idx = np.asarray(flip_index_from_pairs(ds.spec.flip_pairs, K)) if meta["flipped"] else np.arange(K)
    joints = meta["joints"].double().numpy()
    for n, ann_id in enumerate(meta["instance_ids"].tolist()):
        w = joints[n, :, 2] > 0
        np.testing.assert_array_equal(w, sample["target_weight"][n].numpy() > 0)
        original = originals[ann_id][flip_idx]
        back = transform_points(joints[n, :, :2], meta["crop_to_image"].numpy())
        assert np.abs(back[w] - original[w, :2]).max(initial=0) < 1e-3  # float32 joints in meta
        assert np.all(original[w, 2] > 0)
    assert meta["instance_ids"][0] == meta["annotation_id"]


def _real(name):
    ann, images, kind, det = REAL_SETS[name]
    if not (REAL / ann).is_file():
        pytest.skip(f"{REAL / ann} is absent")
    return REAL / ann, REAL / images, kind, (REAL / det if det else None)


@pytest.mark.real_data
@needs_real
@pytest.mark.parametrize("name", sorted(REAL_SETS))
@pytest.mark.parametrize("train", [False, True])
def test_real_dataset_samples_are_consistent(name, train):
    ann, images, kind, _ = _real(name)
    ds = KeypointDataset(ann, images, kind, num_instances=2, train=train, seed=3)
    originals, data = _annotation_index(ann)
    assert all(len(v) == ds.spec.num_joints for v in originals.values())
    gt = {
        a["id"]: a for a in data["annotations"]
        if not a.get("iscrowd", 0) and (np.asarray(a["keypoints"]).reshape(-1, 3)[:, 2] > 0).any()
    }
    assert len(ds) == len(gt)
    for i in range(len(ds)):
        sample = ds[i]
        meta = sample["meta"]
        _check_sample_consistency(ds, sample, originals)
        x, y, w, h = gt[meta["annotation_id"]]["bbox"]
        bx, by, bw, bh = meta["box"].tolist()  # the GT box clipped to the image
        assert x - 1e-6 <= bx and y - 1e-6 <= by and bx + bw <= x + w + 1e-6 and by + bh <= y + h + 1e-6
        if not train:
            assert meta["rotation"] == 0 and not meta["flipped"]
            np.testing.assert_allclose(meta["center"].numpy(), [bx + bw / 2, by + bh / 2])
    if kind == "crowdpose":
        assert ds.crowd_index == {im["id"]: im["crowdIndex"] for im in data["images"]}
        assert all(ds[i]["meta"]["crowd_index"] == ds.crowd_index[ds[i]["meta"]["image_id"]] for i in range(len(ds)))


@pytest.mark.real_data
@needs_real
@pytest.mark.parametrize("name", ["mmpose_coco", "crowdpose"])
@pytest.mark.parametrize("threshold", [0.0, 0.5])
def test_detection_boxes(name, threshold):
    ann, images, kind, det = _real(name)
    records = json.loads(det.read_text())
    kept = [r for r in records if r["score"] >= threshold and r.get("category_id", 1) == 1]
    ds = KeypointDataset(ann, images, kind, boxes=det, score_threshold=threshold, num_instances=2)
    assert not ds.use_gt_boxes and len(ds) == len(kept) > 0
    for i in (0, len(ds) - 1):
        sample = ds[i]
        meta = sample["meta"]
        assert meta["annotation_id"] == -1 and meta["instance_ids"].tolist() == [-1, -1]
        assert meta["score"] == kept[i]["score"] and meta["image_id"] == kept[i]["image_id"]
        np.testing.assert_allclose(meta["box"].numpy(), kept[i]["bbox"])
        assert not sample["target_weight"].any() and not sample["target"].any()
        center, scale = box_to_center_scale(kept[i]["bbox"], 0.75)
        np.testing.assert_allclose(meta["crop_to_image"].numpy(), invert_affine(get_affine(center, scale, 0.0, INPUT)))
        image_to_crop, heatmap_to_image = box_affines(kept[i]["bbox"], INPUT, HEATMAP)
        np.testing.assert_allclose(heatmap_to_image, meta["heatmap_to_image"].numpy())
        np.testing.assert_allclose(invert_affine(image_to_crop), meta["crop_to_image"].numpy(), atol=1e-9)


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    generate(out, 12, seed=11)
    return out


@pytest.mark.parametrize("selection", ["paper", "official"])
def test_synthetic_dataset_multi_instance_consistency(synthetic_dir, selection):
    ann = synthetic_dir / "annotations.json"
    ds = KeypointDataset(ann, synthetic_dir / "images", "coco", num_instances=3, train=True, seed=5,
                         selection=selection)
    originals, _ = _annotation_index(ann)
    second_instances = 0
    for i in range(len(ds)):
        sample = ds[i]
        _check_sample_consistency(ds, sample, originals)
        ids = sample["meta"]["instance_ids"]
        second_instances += int(ids[1] != ids[0])
        if selection == "official":
            assert ids[2] == ids[0]  # a single candidate
        # a fallback instance repeats the primary's target exactly
        for n in range(1, 3):
            if ids[n] == ids[0]:
                assert torch.equal(sample["target"][n], sample["target"][0])
    assert second_instances > 0


def test_heatmap_affine_maps_target_peaks_to_image_keypoints(synthetic_dir):
    ann = synthetic_dir / "annotations.json"
    ds = KeypointDataset(ann, synthetic_dir / "images", "coco", train=True, seed=2)
    originals, _ = _annotation_index(ann)
    ys, xs = np.mgrid[0:64, 0:48]
    checked = 0
    for i in range(len(ds)):
        sample = ds[i]
        meta = sample["meta"]
        K = ds.spec.num_joints
        flip_idx = np.asarray(flip_index_from_pairs(ds.spec.flip_pairs, K)) if meta["flipped"] else np.arange(K)
        original = originals[meta["annotation_id"]][flip_idx]
        maps = sample["target"][0].double().numpy()
        for k in np.nonzero(sample["target_weight"][0].numpy())[0]:
            x, y = meta["joints"][0, k, :2].double().numpy() / 4.0
            if not (6 <= x <= 41 and 6 <= y <= 57):  # whole blob inside: centroid = peak
                continue
            m = maps[k]
            peak = np.array([(m * xs).sum(), (m * ys).sum()]) / m.sum()
            image_xy = transform_points(peak[None], meta["heatmap_to_image"].numpy())[0]
            np.testing.assert_allclose(image_xy, original[k, :2], atol=1e-2)
            checked += 1
    assert checked > 20


def test_augmentation_is_deterministic_and_worker_independent(synthetic_dir):
    args = (synthetic_dir / "annotations.json", synthetic_dir / "images", "coco")
    a = KeypointDataset(*args, num_instances=2, train=True, seed=9)
    b = KeypointDataset(*args, num_instances=2, train=True, seed=9)
    for i in (0, 3, len(a) - 1):
        sa, sb = a[i], b[i]
        assert torch.equal(sa["image"], sb["image"]) and torch.equal(sa["target"], sb["target"])
        assert torch.equal(sa["meta"]["crop_to_image"], sb["meta"]["crop_to_image"])
    b.set_epoch(1)
    assert any(not torch.equal(a[i]["meta"]["crop_to_image"], b[i]["meta"]["crop_to_image"]) for i in range(4))
    loader = torch.utils.data.DataLoader(a, batch_size=4, num_workers=2, shuffle=False)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 3, 256, 192) and batch["target"].shape == (4, 2, 17, 64, 48)
    assert batch["meta"]["heatmap_to_image"].shape == (4, 2, 3)
    for i in range(4):
        assert torch.equal(batch["target"][i], a[i]["target"])
        assert torch.equal(batch["meta"]["crop_to_image"][i], a[i]["meta"]["crop_to_image"])


def test_other_input_sizes(synthetic_dir):
    ds = KeypointDataset(synthetic_dir / "annotations.json", synthetic_dir / "images", "coco",
                         input_size=(384, 288), num_instances=2)
    assert ds.heatmap_size == (96, 72) and ds.sigma == 3.0
    sample = ds[0]
    assert sample["image"].shape == (3, 384, 288) and sample["target"].shape == (2, 17, 96, 72)


# ----------------------------------------------------------------------------- errors
def test_dataset_bad_input(synthetic_dir, tmp_path):
    ann, images = synthetic_dir / "annotations.json", synthetic_dir / "images"
    with pytest.raises(FileNotFoundError, match="annotation_file"):
        KeypointDataset(tmp_path / "missing.json", images)
    with pytest.raises(FileNotFoundError, match="image_dir"):
        KeypointDataset(ann, tmp_path / "no_such_dir")
    with pytest.raises(ValueError, match="kind"):
        KeypointDataset(ann, images, "mpii")
    with pytest.raises(ValueError, match="expects 14"):
        KeypointDataset(ann, images, "crowdpose")
    with pytest.raises(ValueError, match="num_instances"):
        KeypointDataset(ann, images, num_instances=0)
    with pytest.raises(TypeError, match="num_instances"):
        KeypointDataset(ann, images, num_instances=2.0)
    with pytest.raises(ValueError, match="selection"):
        KeypointDataset(ann, images, selection="closest")
    with pytest.raises(ValueError, match="input_size"):
        KeypointDataset(ann, images, input_size=(256,))
    with pytest.raises(FileNotFoundError, match="boxes"):
        KeypointDataset(ann, images, boxes=tmp_path / "dets.json")
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    with pytest.raises(ValueError, match="annotation_file"):
        KeypointDataset(bad_json, images)
    with pytest.raises(ValueError, match="boxes"):
        KeypointDataset(ann, images, boxes=bad_json)
    dets = tmp_path / "dets.json"
    dets.write_text(json.dumps([{"image_id": 999999, "bbox": [0, 0, 10, 10], "score": 1.0}]))
    with pytest.raises(ValueError, match="image_id 999999"):
        KeypointDataset(ann, images, boxes=dets)
    dets.write_text(json.dumps([{"image_id": 1, "score": 1.0}]))
    with pytest.raises(ValueError, match="bbox"):
        KeypointDataset(ann, images, boxes=dets)


def test_missing_image_file_is_reported(synthetic_dir, tmp_path):
    data = json.loads((synthetic_dir / "annotations.json").read_text())
    data["images"][0]["file_name"] = "gone.jpg"
    ds = KeypointDataset(data, synthetic_dir / "images")  # an in-memory COCO dict works too
    index = next(i for i in range(len(ds)) if ds.image_path(i).name == "gone.jpg")
    with pytest.raises(FileNotFoundError, match="gone.jpg"):
        ds[index]
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_normalize_image_matches_imagenet_statistics():
    from mipnet.data import IMAGENET_MEAN, IMAGENET_STD, normalize_image

    rgb = np.random.default_rng(8).integers(0, 256, size=(7, 5, 3), dtype=np.uint8)
    x = normalize_image(rgb)
    assert x.shape == (3, 7, 5) and x.dtype == torch.float32 and x.is_contiguous()
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(3, 1, 1)
    expected = (torch.from_numpy(rgb).permute(2, 0, 1).double() / 255 - mean) / std
    torch.testing.assert_close(x.double(), expected, atol=1e-5, rtol=0)


def test_targets_decode_back_to_image_keypoints(synthetic_dir):
    """The training targets, decoded by mipnet_kernels with meta["heatmap_to_image"], give the annotation."""
    import mipnet_kernels as mk

    ann = synthetic_dir / "annotations.json"
    ds = KeypointDataset(ann, synthetic_dir / "images", "coco", num_instances=2, train=True, seed=4)
    originals, _ = _annotation_index(ann)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=8)))
    B, N, K = batch["target"].shape[:3]
    affine = batch["meta"]["heatmap_to_image"].repeat_interleave(N, dim=0)
    with mk.use_backend("reference"):
        coords, _ = mk.decode_heatmaps(batch["target"].flatten(0, 1), mode="dark", affine=affine)
    coords = coords.view(B, N, K, 2).double().numpy()
    checked = 0
    for b in range(B):
        meta = {k: v[b] for k, v in batch["meta"].items()}
        flip_idx = np.asarray(flip_index_from_pairs(ds.spec.flip_pairs, K)) if meta["flipped"] else np.arange(K)
        px = 200 * meta["scale"][0].item() / 48  # image pixels per heatmap pixel
        for n, ann_id in enumerate(meta["instance_ids"].tolist()):
            hm = meta["joints"][n, :, :2].double().numpy() / 4
            interior = (hm[:, 0] >= 6) & (hm[:, 0] <= 41) & (hm[:, 1] >= 6) & (hm[:, 1] <= 57)
            ok = (batch["target_weight"][b, n].numpy() > 0) & interior
            err = np.abs(coords[b, n, ok] - originals[ann_id][flip_idx][ok, :2]).max(initial=0)
            assert err <= 1e-2 * px + 1e-3
            checked += ok.sum()
    assert checked > 50


# --------------------------------------------------------------------------- issue 13: bad annotation files
@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.pop("categories"), "missing the 'categories' list"),
    (lambda d: d["annotations"][0].pop("bbox"), r"annotations\[0\] \(id \d+\) has no 'bbox'"),
    (lambda d: d["annotations"][0].pop("iscrowd"), "has no 'iscrowd'"),
    (lambda d: d["images"][0].pop("width"), r"images\[0\] \(id \d+\) has no 'width'"),
    (lambda d: d["images"][0].pop("file_name"), "has no 'file_name'"),
    (lambda d: d["annotations"][0].__setitem__("bbox", [1, 2, 3]), "expected \\[x, y, w, h\\]"),
])
def test_bad_annotation_file_names_file_and_entry(tmp_path, mutate, message):
    """One ValueError naming the file and the entry, not a bare KeyError from pycocotools."""
    from mipnet.data.coco import load_coco

    good = {"images": [{"id": 1, "width": 64, "height": 48, "file_name": "a.jpg"}],
            "annotations": [{"id": 7, "image_id": 1, "bbox": [1, 2, 10, 20], "iscrowd": 0, "category_id": 1,
                             "keypoints": [0] * 51, "num_keypoints": 0, "area": 200}],
            "categories": [{"id": 1, "name": "person"}]}
    load_coco(good)  # the valid dict loads
    mutate(good)
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(good))
    with pytest.raises(ValueError, match=message) as info:
        load_coco(path)
    assert str(path) in str(info.value)


def test_annotation_file_that_is_a_json_list(tmp_path):
    from mipnet.data.coco import load_coco

    path = tmp_path / "list.json"
    path.write_text("[1, 2, 3]")
    with pytest.raises(ValueError, match="JSON object .* got a JSON list"):
        load_coco(path)
