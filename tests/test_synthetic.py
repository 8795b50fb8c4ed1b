"""mipnet.data.synthetic: valid COCO annotations, controlled occlusion, determinism, clear errors."""

from __future__ import annotations

import contextlib
import io
import json

import cv2
import numpy as np
import pytest

from mipnet.data import keypoint_spec, load_coco
from mipnet.data.synthetic import IOU_BUCKETS, box_iou, generate, iou_bucket, nearest_person_iou

SIZE = (256, 192)


@pytest.fixture(scope="module")
def crowd():
    return generate(None, 120, image_size=SIZE, seed=0)


def _keypoints(ann):
    return np.asarray(ann["keypoints"], dtype=np.float64).reshape(17, 3)


def test_annotations_are_valid_coco(crowd):
    coco = crowd.coco
    assert len(crowd.images) == len(coco["images"]) == 120
    spec = keypoint_spec("coco")
    (cat,) = coco["categories"]
    assert cat["id"] == 1 and cat["keypoints"] == list(spec.keypoint_names)
    assert [tuple(p) for p in cat["skeleton"]] == list(spec.skeleton)
    sizes = {im["id"]: (im["height"], im["width"]) for im in coco["images"]}
    for image, info in zip(crowd.images, coco["images"]):
        assert image.shape == (*SIZE, 3) and image.dtype == np.uint8
        assert (info["height"], info["width"]) == SIZE
    ids = [a["id"] for a in coco["annotations"]]
    assert len(set(ids)) == len(ids) and len(ids) > 120
    for ann in coco["annotations"]:
        H, W = sizes[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        assert ann["iscrowd"] == 0 and ann["category_id"] == 1
        assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= W and y + h <= H
        assert 0 < ann["area"] <= w * h
        kp = _keypoints(ann)
        labelled = kp[:, 2] > 0
        assert ann["num_keypoints"] == labelled.sum()
        assert set(np.unique(kp[:, 2])) <= {0, 1, 2}
        # labelled keypoints lie in the image (and in the box, up to the drawn limb's half width);
        # unlabelled ones are (0, 0, 0), as COCO writes them
        assert np.all((kp[labelled, 0] >= 0) & (kp[labelled, 0] < W) & (kp[labelled, 1] >= 0) & (kp[labelled, 1] < H))
        assert np.all((kp[labelled, 0] >= x - 1) & (kp[labelled, 0] <= x + w) & (kp[labelled, 1] >= y - 1)
                      & (kp[labelled, 1] <= y + h))
        assert not kp[~labelled].any()


def test_pycocotools_loads_and_scores_ground_truth_as_perfect(crowd, tmp_path):
    from pycocotools.cocoeval import COCOeval

    gt = load_coco(crowd.coco)
    results = [
        {"image_id": a["image_id"], "category_id": 1, "keypoints": a["keypoints"], "score": 1.0}
        for a in crowd.coco["annotations"]
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, iouType="keypoints")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)  # AP
    assert ev.stats[5] == pytest.approx(1.0)  # AR
    # and a perturbed copy scores lower: the evaluation is not vacuous
    rng = np.random.default_rng(0)
    for r in results:
        kp = np.asarray(r["keypoints"], dtype=np.float64).reshape(17, 3)
        kp[:, :2] += rng.normal(0, 6, size=(17, 2))
        r["keypoints"] = kp.reshape(-1).tolist()
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes(results), iouType="keypoints")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ev.stats[0] < 0.95


def test_iou_buckets_span_the_range(crowd):
    ious = np.array(list(nearest_person_iou(crowd.coco).values()))
    assert len(ious) == len(crowd.coco["annotations"])
    counts = {name: 0 for name, _, _ in IOU_BUCKETS}
    for v in ious:
        counts[iou_bucket(v)] += 1
    assert all(n >= 0.1 * len(ious) for n in counts.values()), counts
    hist, _ = np.histogram(ious, bins=[0.0, 0.1, 0.3, 0.5, 0.7, 0.8, 1.0])
    assert np.all(hist > 0), hist


def test_occluded_keypoints_are_flagged(crowd):
    """v = 1 marks keypoints under someone drawn later: they lie inside another person's box,
    they are rare when people are apart and common when they overlap."""
    iou = nearest_person_iou(crowd.coco)
    by_image = {}
    for ann in crowd.coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    occluded_fraction = {name: [] for name, _, _ in IOU_BUCKETS}
    body = slice(5, 17)  # face keypoints of figures facing away are v = 1 without an occluder
    for anns in by_image.values():
        for ann in anns:
            kp = _keypoints(ann)
            hidden = np.nonzero(kp[body, 2] == 1)[0] + 5
            others = [o["bbox"] for o in anns if o["id"] != ann["id"]]
            for k in hidden:
                x, y = kp[k, :2]
                assert any(bx - 1 <= x <= bx + bw + 1 and by - 1 <= y <= by + bh + 1 for bx, by, bw, bh in others)
            labelled = kp[body, 2] > 0
            if labelled.any():
                occluded_fraction[iou_bucket(iou[ann["id"]])].append((kp[body, 2] == 1).sum() / labelled.sum())
    means = {k: float(np.mean(v)) for k, v in occluded_fraction.items()}
    assert means["<0.3"] < means["0.3-0.5"] < means[">0.5"], means
    assert means[">0.5"] > 0.2, means


def test_visible_area_counts_the_pixels_nobody_covers(crowd):
    """``visible_area``: the last-drawn person of an image is fully visible, everyone else at
    most so; people with body keypoints under someone are partly covered; per-pixel labels
    mean the visible areas of an image never add up to more than its pixels."""
    by_image = {}
    for ann in crowd.coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    assert crowd.coco["info"]["generator_version"] >= 2
    partly = []
    for anns in by_image.values():
        for ann in anns:
            assert 0 <= ann["visible_area"] <= ann["area"]
        assert anns[-1]["visible_area"] == anns[-1]["area"]  # annotation order is the draw order
        assert sum(a["visible_area"] for a in anns) <= SIZE[0] * SIZE[1]
        for ann in anns:
            if (_keypoints(ann)[5:, 2] == 1).any():
                partly.append(ann["visible_area"] / ann["area"])
    assert partly and max(partly) < 1.0 and np.mean(partly) < 0.9


def test_deterministic_by_seed():
    a = generate(None, 6, seed=3)
    b = generate(None, 6, seed=3)
    c = generate(None, 6, seed=4)
    assert a.coco == b.coco
    assert all(np.array_equal(x, y) for x, y in zip(a.images, b.images))
    assert a.coco["annotations"] != c.coco["annotations"]
    # image i depends on (seed, i) only
    short = generate(None, 3, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(short.images, a.images[:3]))


def test_written_dataset_round_trips(tmp_path):
    made = generate(tmp_path / "out", 5, image_size=(96, 128), seed=1, image_format="png")
    assert made.images is None and made.annotation_file == tmp_path / "out" / "annotations.json"
    on_disk = json.loads(made.annotation_file.read_text())
    assert on_disk == made.coco
    reference = generate(None, 5, image_size=(96, 128), seed=1)
    for info, image in zip(on_disk["images"], reference.images):
        read = cv2.cvtColor(cv2.imread(str(made.image_dir / info["file_name"])), cv2.COLOR_BGR2RGB)
        assert np.array_equal(read, image)  # PNG is lossless
    with contextlib.redirect_stdout(io.StringIO()):
        from pycocotools.coco import COCO

        assert len(COCO(str(made.annotation_file)).getAnnIds()) == len(made.coco["annotations"])
    ds = made.dataset(num_instances=2, input_size=(128, 96))
    assert len(ds) > 0 and ds[0]["target"].shape == (2, 17, 32, 24)


@pytest.mark.parametrize("size", [(32, 32), (480, 640), (200, 300)])
def test_any_image_size(size):
    made = generate(None, 3, image_size=size, seed=2)
    assert all(image.shape == (*size, 3) for image in made.images)
    assert len(made.coco["annotations"]) >= 3


def test_box_iou_and_buckets():
    a = [[0, 0, 10, 10]]
    b = [[5, 0, 10, 10], [20, 20, 5, 5], [0, 0, 10, 10]]
    inter = 5 * 10
    np.testing.assert_allclose(box_iou(a, b), [[inter / (200 - inter), 0.0, 1.0]])
    coco = {"annotations": [
        {"id": 1, "image_id": 1, "bbox": [0, 0, 10, 10]},
        {"id": 2, "image_id": 1, "bbox": [5, 0, 10, 10]},
        {"id": 3, "image_id": 1, "bbox": [100, 0, 10, 10]},
        {"id": 4, "image_id": 2, "bbox": [0, 0, 10, 10]},
        {"id": 5, "image_id": 2, "bbox": [0, 0, 10, 10], "iscrowd": 1},
    ]}
    assert nearest_person_iou(coco) == {1: pytest.approx(1 / 3), 2: pytest.approx(1 / 3), 3: 0.0, 4: 0.0}
    assert [iou_bucket(v) for v in (0.0, 0.299, 0.3, 0.5, 0.9)] == ["<0.3", "<0.3", "0.3-0.5", ">0.5", ">0.5"]
    with pytest.raises(ValueError, match="iou"):
        iou_bucket(-0.1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_images": -1}, "num_images"),
        ({"num_images": 2.5}, "num_images"),
        ({"image_size": (16, 64)}, "image_size"),
        ({"image_size": (64,)}, "image_size"),
        ({"iou_range": (0.5, 0.2)}, "iou_range"),
        ({"iou_range": (0.0, 1.0)}, "iou_range"),
        ({"image_format": "bmp"}, "image_format"),
        ({"group_sizes": {0: 1.0}}, "group_sizes"),
        ({"group_sizes": {2: -1.0}}, "group_sizes"),
    ],
)
def test_bad_input(kwargs, match):
    args = {"num_images": 1}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        generate(None, **args)


def test_bad_out_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="out_dir"):
        generate(blocker, 1)
    with pytest.raises(RuntimeError, match="in memory"):
        generate(None, 1).dataset()
