"""mipnet.evaluate: pycocotools metrics on real annotations, CrowdPose splits, the post-processing
(rescoring, secondary-instance decay, OKS-NMS), the minimal predictor, and the eval driver.

Real annotations come from ``../shared/data/real`` (skipped when absent): ground truth used as
the prediction must score AP 1.0, and a perturbed copy must score exactly what pycocotools
computes on its own.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mipnet import cli
from mipnet.config import load_config
from mipnet.data import KeypointDataset, keypoint_spec
from mipnet.models import build_model
from mipnet.evaluate import (
    EvalSettings,
    HeatmapPredictor,
    Predictions,
    bootstrap_difference,
    coco_keypoint_metrics,
    crowd_index_splits,
    evaluate_model,
    full_report,
    image_matches,
    keep_random_boxes,
    occluded_dropped,
    occlusion_degree,
    postprocess,
    prepare_ground_truth,
    rescore,
    subset_predictions,
)
from mipnet.data.targets import gaussian_heatmaps
from mipnet_kernels.keypoints import COCO_FLIP_PAIRS, COCO_SIGMAS, CROWDPOSE_SIGMAS

_CANDIDATES = (Path(__file__).resolve().parents[1] / "../shared/data/real", Path("/work/shared/data/real"))
REAL = next((p.resolve() for p in _CANDIDATES if p.is_dir()), None)


def needs_real(test):
    """Mark ``test`` as using the real data, skipped when the folder is absent."""
    skip = pytest.mark.skipif(REAL is None, reason="real data folder ../shared/data/real is absent")
    return pytest.mark.real_data(skip(test))

# name: (annotation file, image folder, kind, detections or None)
REAL_SETS = {
    "coco_val_mini": ("coco_val_mini/person_keypoints_val2017.json", "coco_val_mini/val2017", "coco", None),
    "mmpose_coco": ("mmpose_subsets/coco/test_coco.json", "mmpose_subsets/coco", "coco",
                    "mmpose_subsets/coco/test_coco_det_AP_H_56.json"),
    "crowdpose": ("mmpose_subsets/crowdpose/test_crowdpose.json", "mmpose_subsets/crowdpose", "crowdpose",
                  "mmpose_subsets/crowdpose/test_crowdpose_det_AP_40.json"),
    "ochuman": ("mmpose_subsets/ochuman/test_ochuman.json", "mmpose_subsets/ochuman", "ochuman", None),
}


def _real(name):
    ann, images, kind, dets = REAL_SETS[name]
    path = REAL / ann
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    return path, REAL / images, kind, (REAL / dets if dets else None)


def _gt_results(gt: dict, rng=None, noise: float = 0.0) -> list[dict]:
    """Every scored GT person as a result (score 1, or random with noise); keypoints jittered by
    ``noise`` times the person's box size (so small and large people are both affected)."""
    out = []
    for ann in gt["annotations"]:
        if ann.get("iscrowd") or not ann.get("num_keypoints"):
            continue
        kp = np.asarray(ann["keypoints"], dtype=np.float64).reshape(-1, 3)
        if noise:
            size = np.sqrt(ann["bbox"][2] * ann["bbox"][3])
            kp[:, :2] += rng.normal(0, noise * size, kp[:, :2].shape)
        kp[:, 2] = 1.0
        out.append({"image_id": ann["image_id"], "category_id": 1, "keypoints": kp.reshape(-1).tolist(),
                    "score": float(rng.uniform(0.2, 1.0)) if noise else 1.0})
    return out


def _pycocotools_ap(gt: dict, results: list[dict], sigmas, image_ids=None) -> float:
    """AP straight from pycocotools, the way its README does it."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(copy.deepcopy(results)), "keypoints")
        ev.params.kpt_oks_sigmas = np.asarray(sigmas)
        if image_ids is not None:
            ev.params.imgIds = image_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0])


# ------------------------------------------------------------------------------ real annotations
@needs_real
@pytest.mark.parametrize("name", ["coco_val_mini", "crowdpose", "ochuman"])
def test_ground_truth_as_prediction_scores_ap_1(name):
    path, _, kind, _ = _real(name)
    gt = prepare_ground_truth(path, kind)
    sigmas = keypoint_spec(kind).sigmas
    m = coco_keypoint_metrics(gt, _gt_results(gt), sigmas)
    assert m["AP"] == pytest.approx(1.0) and m["AP50"] == pytest.approx(1.0) and m["AR"] == pytest.approx(1.0)


@needs_real
@pytest.mark.parametrize("name", ["coco_val_mini", "crowdpose", "ochuman"])
def test_perturbed_copy_scores_what_pycocotools_computes(name):
    path, _, kind, _ = _real(name)
    gt = prepare_ground_truth(path, kind)
    sigmas = keypoint_spec(kind).sigmas
    results = _gt_results(gt, np.random.default_rng(0), noise=0.04)
    ours = coco_keypoint_metrics(gt, results, sigmas)
    direct = _pycocotools_ap(gt, results, sigmas)
    assert 0.0 < direct < 1.0  # the perturbation matters
    assert ours["AP"] == direct


@needs_real
def test_crowdpose_easy_medium_hard_split():
    path, _, kind, _ = _real("crowdpose")
    raw = json.loads(path.read_text())
    gt = prepare_ground_truth(raw, kind)
    assert all("area" not in a for a in raw["annotations"])  # filled by the CrowdPose API's rule
    a = raw["annotations"][0]
    filled = next(x for x in gt["annotations"] if x["id"] == a["id"])
    assert filled["area"] == pytest.approx(a["bbox"][2] * a["bbox"][3] * 0.53)
    splits = crowd_index_splits(gt)
    for im in gt["images"]:
        ci = im["crowdIndex"]
        expected = "easy" if ci < 0.1 else "medium" if ci <= 0.8 else "hard"
        assert im["id"] in splits[expected]
    results = _gt_results(gt, np.random.default_rng(1), noise=0.04)
    report = full_report(gt, results, CROWDPOSE_SIGMAS, "crowdpose")
    for name, ids in splits.items():
        if ids:
            assert report[f"AP_{name}"] == _pycocotools_ap(gt, results, CROWDPOSE_SIGMAS, ids)
        else:
            assert report[f"AP_{name}"] == -1.0


# ------------------------------------------------------------------------------ post-processing
def _preds(kp, box_scores, image_ids, areas=None):
    kp = np.asarray(kp, dtype=np.float64)
    S = kp.shape[0]
    return Predictions(kp, np.asarray(image_ids), np.asarray(box_scores, dtype=np.float64),
                       np.full(S, 1e4) if areas is None else np.asarray(areas), np.arange(S))


def test_rescore_is_box_score_times_mean_confident_keypoint_score():
    kp = np.zeros((2, 4, 3))
    kp[0, :, 2] = [0.9, 0.5, 0.1, 0.2]  # 0.1 and 0.2 are not > 0.2
    kp[1, :, 2] = 0.1
    np.testing.assert_allclose(rescore(kp, np.array([0.5, 1.0]), 0.2), [0.5 * 0.7, 0.0])


def test_postprocess_decays_secondary_instances_and_suppresses_duplicates():
    rng = np.random.default_rng(0)
    person_a = np.concatenate([rng.uniform(0, 100, (17, 2)), np.full((17, 1), 0.8)], axis=1)
    person_b = person_a + np.array([300.0, 0.0, 0.0])
    # two boxes in one image; box 0's instance 1 finds B, box 1's instance 0 is B too (duplicate)
    kp = np.stack([np.stack([person_a, person_b]), np.stack([person_b, person_a + [0.5, 0, 0]])])
    preds = _preds(kp, [1.0, 0.9], [7, 7])
    primary = postprocess(preds, [0], sigmas=COCO_SIGMAS)
    assert [r["score"] for r in primary] == pytest.approx([0.8, 0.72])
    merged = postprocess(preds, None, sigmas=COCO_SIGMAS)
    assert len(merged) == 2  # the two secondary predictions duplicate the primaries (OKS > 0.9)
    assert sorted(r["score"] for r in merged) == pytest.approx([0.72, 0.8])
    no_nms = postprocess(preds, None, sigmas=COCO_SIGMAS, oks_threshold=1.0)
    assert sorted(r["score"] for r in no_nms) == pytest.approx([0.36, 0.4, 0.72, 0.8])  # × 0.5 decay
    with pytest.raises(ValueError, match="instances"):
        postprocess(preds, [2], sigmas=COCO_SIGMAS)


def test_metrics_edge_cases_and_errors(tmp_path):
    gt = prepare_ground_truth({"images": [{"id": 1, "width": 10, "height": 10}], "annotations": [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "keypoints": [1, 1, 2] * 17}]})
    assert gt["annotations"][0]["num_keypoints"] == 17 and gt["annotations"][0]["area"] == 25
    assert coco_keypoint_metrics(gt, [], COCO_SIGMAS)["AP"] == 0.0
    assert coco_keypoint_metrics(gt, [], COCO_SIGMAS, ignore_annotations=[1])["AP"] == -1.0
    with pytest.raises(ValueError, match="joints"):
        coco_keypoint_metrics(gt, [{"image_id": 1, "category_id": 1, "keypoints": [1, 1, 1] * 14, "score": 1}],
                              COCO_SIGMAS)
    with pytest.raises(FileNotFoundError, match="annotation file"):
        prepare_ground_truth(tmp_path / "missing.json")


# ------------------------------------------------------------------------------ predictor
class _OracleNet(torch.nn.Module):
    """Stands in for a PoseNet: instance n's heatmaps peak at fixed heatmap points ``points[n]``."""

    def __init__(self, points: np.ndarray, heatmap_size):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.points, self.heatmap_size = points, heatmap_size

    def forward_instances(self, images):
        hm = gaussian_heatmaps(self.points, np.ones(self.points.shape[:2]), self.heatmap_size, 1.5)
        return torch.from_numpy(hm)[:, None].expand(-1, images.shape[0], -1, -1, -1).clone()


def test_heatmap_predictor_maps_heatmap_peaks_to_image_coordinates():
    h, w = 16, 12
    points = np.stack([np.tile([[5.0, 7.0]], (17, 1)), np.tile([[8.0, 3.0]], (17, 1))])  # [N=2, K, 2]
    affine = torch.tensor([[[2.0, 0.0, 10.0], [0.0, 3.0, 20.0]]], dtype=torch.float64).repeat(3, 1, 1)
    predictor = HeatmapPredictor(_OracleNet(points, (h, w)), COCO_FLIP_PAIRS, flip_test=False, decode="argmax")
    coords, scores = predictor(torch.zeros(3, 3, 64, 48), affine)
    assert coords.shape == (2, 3, 17, 2) and scores.shape == (2, 3, 17)
    torch.testing.assert_close(coords[0, :, 0], torch.tensor([[20.0, 41.0]] * 3))
    torch.testing.assert_close(coords[1, :, 0], torch.tensor([[26.0, 29.0]] * 3))


@needs_real
@pytest.mark.parametrize("boxes", ["ground truth", "detections"])
def test_evaluate_model_reports_boxes_and_writes_files(tmp_path, boxes):
    path, images, kind, dets = _real("mmpose_coco")
    dataset = KeypointDataset(path, images, kind, input_size=(64, 64), num_instances=2,
                              boxes=dets if boxes == "detections" else None)
    model = build_model("resnet_tiny", num_instances=2)
    result = evaluate_model(model, dataset, EvalSettings(batch_size=64), tmp_path)
    report = result.report
    assert report["boxes"] == boxes and report["num_crops"] == len(dataset)
    assert set(report["per_instance"]) == {"0", "1"}
    assert set(report["merged"]) >= {"AP", "AP50", "AP75", "AP_M", "AP_L", "AR"}
    assert json.loads((tmp_path / "metrics.json").read_text())["boxes"] == boxes
    assert len(json.loads((tmp_path / "results.json").read_text())) == len(result.results)
    assert result.predictions.keypoints.shape == (len(dataset), 2, 17, 3)


def test_eval_cli_on_a_trained_checkpoint(tmp_path, capsys):
    data = tmp_path / "data"
    common = ["model.arch=resnet_tiny", "model.num_instances=2", "data.input_size=[64,64]", "data.workers=0",
              "data.synthetic.train_images=3", "data.synthetic.val_images=2",
              "data.synthetic.image_size=[96,128]", f"data.synthetic.cache_dir={data}",
              "train.epochs=1", "train.max_steps_per_epoch=1", "train.progress=false", "train.threads=1",
              f"train.output_dir={tmp_path / 'run'}"]
    assert cli.main(["train", *common]) == 0
    assert cli.main(["eval", *common, "eval.flip_test=false", "--output-dir", str(tmp_path / "ev")]) == 0
    out = capsys.readouterr().out
    assert "on ground truth boxes" in out and "λ=1" in out
    report = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert report["boxes"] == "ground truth" and report["num_instances"] == 2
    cfg = load_config(None, common)
    assert cfg.model.arch == "resnet_tiny"


@pytest.mark.parametrize("content", [b"not a checkpoint", b""], ids=["text", "empty"])
def test_eval_cli_bad_checkpoint_one_line_exit_2(tmp_path, capsys, content):
    """A bad checkpoint file: one line naming it, exit 2, no traceback (issue 13)."""
    bad = tmp_path / "bad.pth"
    bad.write_bytes(content)
    assert cli.main(["eval", "--checkpoint", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and "Traceback" not in err[0], err
    with pytest.raises(ValueError):  # --debug shows the exception itself
        cli.main(["--debug", "eval", "--checkpoint", str(bad)])


# ------------------------------------------------------------------------------ reduced boxes, bootstrap
@pytest.fixture(scope="module")
def small_crowd():
    from mipnet.data.synthetic import generate

    return prepare_ground_truth(generate(None, 30, image_size=(96, 128), seed=5).coco)


def _renamed_copies(gt: dict, results: list[dict], image_ids) -> tuple[dict, list[dict]]:
    """``gt`` and ``results`` on the image multiset ``image_ids``, each draw a new image id."""
    images = {im["id"]: im for im in gt["images"]}
    out_gt = {"images": [], "annotations": [], "categories": gt["categories"]}
    out_res = []
    for new, old in enumerate(image_ids, start=1):
        out_gt["images"].append({**images[old], "id": new})
        for ann in gt["annotations"]:
            if ann["image_id"] == old:
                out_gt["annotations"].append({**ann, "id": len(out_gt["annotations"]) + 1, "image_id": new})
        out_res += [{**r, "image_id": new} for r in results if r["image_id"] == old]
    return out_gt, out_res


def test_image_matches_reproduce_pycocotools_on_any_image_multiset(small_crowd):
    rng = np.random.default_rng(1)
    results = _gt_results(small_crowd, rng, noise=0.04)
    results += _gt_results(small_crowd, rng, noise=0.15)[::3]  # some duplicates / poor poses
    m = image_matches(small_crowd, results, COCO_SIGMAS)
    assert m.average_precision() == pytest.approx(_pycocotools_ap(small_crowd, results, COCO_SIGMAS), abs=1e-12)
    for _ in range(3):
        sample = rng.integers(0, len(m.image_ids), len(m.image_ids))
        gt2, res2 = _renamed_copies(small_crowd, results, m.image_ids[sample].tolist())
        assert m.average_precision(sample) == pytest.approx(_pycocotools_ap(gt2, res2, COCO_SIGMAS), abs=1e-12)
    samples = rng.integers(0, len(m.image_ids), (4, len(m.image_ids)))
    np.testing.assert_array_equal(m.average_precisions(samples), [m.average_precision(s) for s in samples])
    ignore = [a["id"] for a in small_crowd["annotations"] if a["id"] % 3 == 0]
    assert image_matches(small_crowd, results, COCO_SIGMAS, ignore).average_precision() == pytest.approx(
        coco_keypoint_metrics(small_crowd, results, COCO_SIGMAS, ignore_annotations=ignore)["AP"], abs=1e-12)
    assert image_matches(small_crowd, [], COCO_SIGMAS).average_precision() == 0.0
    everyone = [a["id"] for a in small_crowd["annotations"]]
    assert image_matches(small_crowd, results, COCO_SIGMAS, everyone).average_precision() == -1.0


def test_bootstrap_difference_is_paired_and_brackets_the_difference(small_crowd):
    rng = np.random.default_rng(2)
    good = image_matches(small_crowd, _gt_results(small_crowd, rng, noise=0.03), COCO_SIGMAS)
    poor = image_matches(small_crowd, _gt_results(small_crowd, rng, noise=0.12), COCO_SIGMAS)
    same = bootstrap_difference(good, good, resamples=50)
    assert same["diff"] == 0.0 and same["ci95"] == [0.0, 0.0]  # paired: identical models never differ
    d = bootstrap_difference(poor, good, resamples=200, seed=3)
    assert d["diff"] == pytest.approx(good.average_precision() - poor.average_precision())
    assert d["ci95"][0] <= d["diff"] <= d["ci95"][1] and d["ci95"][0] > 0  # clearly better poses
    assert d == bootstrap_difference(poor, good, resamples=200, seed=3)  # deterministic by seed
    with pytest.raises(ValueError, match="resamples"):
        bootstrap_difference(poor, good, resamples=0)
    with pytest.raises(ValueError, match="level"):
        bootstrap_difference(poor, good, level=1.5)
    with pytest.raises(ValueError, match="same images"):
        bootstrap_difference(poor, image_matches({**small_crowd, "images": small_crowd["images"][:5]},
                                                 [], COCO_SIGMAS))


def test_random_box_draw_is_nested_and_the_same_for_every_model():
    ids = list(range(1, 2001))
    half, three_quarters = keep_random_boxes(ids, 0.5, seed=4), keep_random_boxes(ids[::-1], 0.75, seed=4)
    assert half < three_quarters and half == keep_random_boxes(reversed(ids), 0.5, seed=4)
    assert abs(len(half) / 2000 - 0.5) < 0.05 and abs(len(three_quarters) / 2000 - 0.75) < 0.05
    assert keep_random_boxes(ids, 1.0) == set(ids) and keep_random_boxes(ids, 0.0) == set()
    assert keep_random_boxes(ids, 0.5, seed=5) != half
    with pytest.raises(ValueError, match="fraction"):
        keep_random_boxes(ids, 1.5)


def _person(ann_id, image_id, bbox, hidden_joints=0, **extra):
    kp = np.tile([[5.0, 5.0, 2.0]], (17, 1))
    kp[:hidden_joints, 2] = 1
    return {"id": ann_id, "image_id": image_id, "category_id": 1, "iscrowd": 0, "bbox": bbox,
            "area": bbox[2] * bbox[3], "keypoints": kp.reshape(-1).tolist(), **extra}


def test_occluded_dropped_removes_the_more_occluded_box_of_each_overlapping_pair():
    gt = {"images": [{"id": i, "width": 200, "height": 200} for i in (1, 2, 3)], "annotations": [
        # image 1: a front person (1) and one behind it (2, IoU 0.6), one apart (3, IoU 0)
        _person(1, 1, [0, 0, 50, 100], hidden_joints=0), _person(2, 1, [12.5, 0, 50, 100], hidden_joints=6),
        _person(3, 1, [120, 0, 50, 100], hidden_joints=9),
        # image 2: IoU 0.25 only (< 0.3): nobody dropped
        _person(4, 2, [0, 0, 50, 100], hidden_joints=0), _person(5, 2, [30, 0, 50, 100], hidden_joints=5),
        # image 3: visible_area wins over keypoint flags; a crowd region is ignored
        _person(6, 3, [0, 0, 50, 100], hidden_joints=8, visible_area=4000),
        _person(7, 3, [10, 0, 50, 100], hidden_joints=0, visible_area=1000),
        {**_person(8, 3, [5, 0, 50, 100]), "iscrowd": 1},
    ]}
    assert occluded_dropped(gt) == {2, 7}
    assert occluded_dropped(gt, iou_threshold=0.2) == {2, 5, 7}
    assert occlusion_degree(gt["annotations"][1]) == pytest.approx(6 / 17)
    assert occlusion_degree(gt["annotations"][6]) == pytest.approx(0.8)


def test_subset_predictions_keeps_the_crops_of_the_kept_boxes():
    kp = np.random.default_rng(0).uniform(0, 50, (4, 2, 17, 3))
    preds = Predictions(kp, np.array([1, 1, 2, 2]), np.ones(4), np.full(4, 100.0), np.array([10, 11, 12, 13]))
    sub = subset_predictions(preds, {11, 13, 99})
    np.testing.assert_array_equal(sub.annotation_ids, [11, 13])
    np.testing.assert_array_equal(sub.keypoints, kp[[1, 3]])
    np.testing.assert_array_equal(sub.image_ids, [1, 2])


def test_postprocess_without_nms_and_with_sources():
    rng = np.random.default_rng(0)
    person = np.concatenate([rng.uniform(0, 100, (17, 2)), np.full((17, 1), 0.8)], axis=1)
    kp = np.stack([np.stack([person, person + [0.5, 0, 0]]), np.stack([person + [300, 0, 0], person])])
    preds = _preds(kp, [1.0, 0.9], [7, 7])
    kept = postprocess(preds, None, sigmas=COCO_SIGMAS, with_source=True)
    everything = postprocess(preds, None, sigmas=COCO_SIGMAS, nms=False, with_source=True)
    assert sorted((r["crop"], r["instance"]) for r in everything) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert len(kept) < len(everything)
    assert all("crop" not in r for r in postprocess(preds, None, sigmas=COCO_SIGMAS))
    for r in everything:  # the source is the row it was computed from
        np.testing.assert_allclose(np.reshape(r["keypoints"], (17, 3))[:, :2], kp[r["crop"], r["instance"], :, :2],
                                   atol=1e-3)
