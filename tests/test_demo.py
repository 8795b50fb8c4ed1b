"""mipnet demo: the plumbing of the synthetic crowd benchmark on a micro setting (a few images,
one step per run), and its small network.  The real run (``make demo``) is measured, not tested."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from mipnet import cli
from mipnet.data import KeypointDataset, synthetic
from mipnet.demo import (BOXES_FIGURE_NAME, FIGURE_NAME, ORACLE_NAME, PREDICT_FIGURE_NAME, QUICK, RESULTS_NAME,
                         crop_instances, demo_oracle, oracle_bound, run_config, run_demo, run_oracle)
from mipnet.evaluate import keep_random_boxes, occluded_dropped, prepare_ground_truth
from mipnet.models import build_model
from mipnet.runtime import dataset_kwargs


def test_micro_demo_writes_results_with_the_promised_keys(tmp_path):
    settings = dataclasses.replace(QUICK, train_images=4, val_images=6, epochs=1, batch_size=4,
                                   max_steps_per_epoch=1, workers=0, bootstrap=50)
    returned = run_demo(tmp_path, settings, threads=1, progress=False)
    results = json.loads((tmp_path / RESULTS_NAME).read_text())
    assert results == json.loads(json.dumps(returned))
    assert results["boxes"] == "ground truth"
    for name in ("baseline", "mipnet"):
        r = results[name]
        assert set(r["AP_by_iou"]) == {"<0.3", "0.3-0.5", ">0.5"}
        assert isinstance(r["AP"], float) and r["seconds"] > 0
    assert set(results["mipnet"]["per_instance"]) == {"0", "1"}
    assert set(results["baseline"]["per_instance"]) == {"0"}
    assert sum(results["val_people_by_iou"].values()) > 0
    if results["val_people_by_iou"][">0.5"]:
        assert (tmp_path / FIGURE_NAME).stat().st_size > 0
    # the reduced-box evaluations (issue 17): AP over all val people, fewer boxes
    names = {"all", "keep_0.75", "keep_0.5", "occluded_dropped"}
    for name in ("baseline", "mipnet"):
        by_boxes = results[name]["AP_by_boxes"]
        assert set(by_boxes) == names
        assert by_boxes["all"] == pytest.approx(results[name]["AP"], abs=1e-12)  # the pycocotools AP
        assert results[name]["AP_by_fraction_kept"]["1"] == pytest.approx(by_boxes["all"], abs=1e-12)
    assert set(results["comparison"]) == names | {"<0.3", "0.3-0.5", ">0.5"}
    for key, c in results["comparison"].items():
        assert set(c) == {"diff", "ci95"} and len(c["ci95"]) == 2
        if key in names:
            assert c["diff"] == pytest.approx(results["mipnet"]["AP_by_boxes"][key]
                                              - results["baseline"]["AP_by_boxes"][key], abs=1e-12)
            assert c["ci95"][0] <= c["ci95"][1]
    assert results["boxes_kept"]["all"] == 1.0 and results["boxes_kept"]["occluded_dropped"] < 1.0
    assert isinstance(results["targets"]["occluded_dropped_ci_above_zero"], bool)
    assert (tmp_path / BOXES_FIGURE_NAME).stat().st_size > 0
    oracle = results["oracle"]["by_boxes"]  # ground truth only: perfect predictions find everyone with all boxes
    assert set(oracle) == names and results["oracle"]["rule"]["num_instances"] == 2
    assert oracle["all"]["oracle_AP"] == {"baseline": 1.0, "mipnet": 1.0} and oracle["all"]["recoverable"] is None
    assert results["targets"]["keep_0.5_fall"]["oracle_ratio"] == oracle["keep_0.5"]["fall_ratio"]
    example = results["predict_example"]  # None when no val image has an occluded pair
    if example is not None:
        assert example["mipnet"]["poses"] >= 1 and example["boxes_given"] >= 1
        assert (tmp_path / PREDICT_FIGURE_NAME).stat().st_size > 0


def test_small_model_is_a_posenet_with_mimbs_only_for_mipnet():
    base = build_model("resnet_tiny", num_instances=1)
    mip = build_model("resnet_tiny", num_instances=2).eval()
    assert base.layer3_se is None and mip.layer3_se is not None and mip.layer4_se is not None
    x = torch.randn(2, 3, 64, 64)
    assert base(x).shape == (2, 17, 16, 16)
    both = mip.forward_instances(x)
    torch.testing.assert_close(both[1], mip(x, lam=1), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="arch"):
        build_model("resnet_huge")


def test_demo_cli_rejects_bad_arguments(capsys):
    assert cli.main(["demo", "--threads", "0"]) == 2
    assert "--threads" in capsys.readouterr().err
    assert cli.main(["demo", "--bootstrap", "0"]) == 2
    assert "--bootstrap" in capsys.readouterr().err
    assert cli.main(["demo", "--seed", "-1"]) == 2
    assert "--seed" in capsys.readouterr().err


# ------------------------------------------------------------------------------ oracle bound
# 17 keypoints as fractions of a person box (a standing figure), all labelled v = 2
_FIGURE = np.array([(0.5, 0.08), (0.45, 0.06), (0.55, 0.06), (0.4, 0.08), (0.6, 0.08), (0.3, 0.25), (0.7, 0.25),
                    (0.25, 0.42), (0.75, 0.42), (0.22, 0.58), (0.78, 0.58), (0.38, 0.58), (0.62, 0.58),
                    (0.38, 0.77), (0.62, 0.77), (0.38, 0.95), (0.62, 0.95)])


def _person(ann_id: int, image_id: int, box) -> dict:
    x, y, w, h = box
    kp = np.concatenate([_FIGURE * (w, h) + (x, y), np.full((17, 1), 2.0)], axis=1)
    return {"id": ann_id, "image_id": image_id, "category_id": 1, "iscrowd": 0, "bbox": list(box),
            "area": float(w * h), "keypoints": kp.reshape(-1).round(2).tolist(), "num_keypoints": 17}


def _hand_crowd(folder: Path) -> dict:
    """Image 1: A (id 1) and B (id 2) side by side, box IoU 0.26, every keypoint of each inside the
    other's 128×96 crop (A's crop spans x 13.75…126.25 and B's keypoints x 87…123); image 2: C (id 3) alone."""
    (folder / "images").mkdir()
    for name in ("1.png", "2.png"):
        cv2.imwrite(str(folder / "images" / name), np.zeros((192, 256, 3), np.uint8))
    return {"images": [{"id": i, "file_name": f"{i}.png", "width": 256, "height": 192} for i in (1, 2)],
            "annotations": [_person(1, 1, (40, 40, 60, 120)), _person(2, 1, (75, 40, 60, 120)),
                            _person(3, 2, (100, 30, 60, 130))],
            "categories": [{"id": 1, "name": "person"}]}


def _demo_kwargs(**changes) -> dict:
    return {**dataset_kwargs(run_config(QUICK, Path("unused"), 2, None)), **changes}


def test_oracle_recovers_a_dropped_neighbour_never_a_singleton(tmp_path):
    coco = _hand_crowd(tmp_path)
    dataset = KeypointDataset(coco, tmp_path / "images", "coco", **_demo_kwargs())
    crops = crop_instances(dataset)
    assert crops == {1: [1, 2], 2: [2, 1], 3: [3, 3]}  # each other's instance 1; C falls back to itself
    gt = prepare_ground_truth(coco)
    keep = {"all": {1, 2, 3}, "drop_b": {1, 3}, "drop_c": {1, 2}, "drop_ab": {3}}
    r = oracle_bound(gt, crops, keep, dataset.spec.sigmas)
    assert r["all"]["oracle_AP"] == {"baseline": 1.0, "mipnet": 1.0}
    assert r["all"]["dropped"] == 0 and r["all"]["recoverable"] is None and r["all"]["fall_ratio"] is None
    # perfect predictions of 2 of 3 people: precision 1 up to recall 2/3, i.e. 67 of pycocotools' 101 recall steps
    two_of_three, one_of_three = 67 / 101, 34 / 101
    b = r["drop_b"]  # B's box dropped: A's crop is trained to find B
    assert (b["dropped"], b["recoverable_people"], b["recoverable"], b["targeted"]) == (1, 1, 1.0, 1.0)
    assert b["oracle_AP"]["baseline"] == pytest.approx(two_of_three) and b["oracle_AP"]["mipnet"] == 1.0
    assert b["fall_ratio"] == 0.0
    c = r["drop_c"]  # the singleton is nobody's instance 1
    assert (c["dropped"], c["recoverable"], c["targeted"]) == (1, 0.0, 0.0)
    assert c["oracle_AP"]["baseline"] == c["oracle_AP"]["mipnet"] == pytest.approx(two_of_three)
    assert c["fall_ratio"] == pytest.approx(1.0)
    ab = r["drop_ab"]  # both of the pair dropped: each is a target, but of a crop that is gone
    assert (ab["dropped"], ab["recoverable"], ab["targeted"]) == (2, 0.0, 1.0)
    assert ab["oracle_AP"]["mipnet"] == pytest.approx(one_of_three)
    # the rule is the dataset's: nobody has 18 keypoints in a crop
    strict = crop_instances(KeypointDataset(coco, tmp_path / "images", "coco", **_demo_kwargs(min_keypoints=18)))
    assert strict == {1: [1, 1], 2: [2, 2], 3: [3, 3]}
    assert oracle_bound(gt, strict, keep, dataset.spec.sigmas)["drop_b"]["recoverable"] == 0.0
    with pytest.raises(ValueError, match="keep_sets"):
        oracle_bound(gt, crops, {"drop_b": {1, 3}}, dataset.spec.sigmas)
    with pytest.raises(ValueError, match="unaugmented"):
        crop_instances(KeypointDataset(coco, tmp_path / "images", "coco", train=True, **_demo_kwargs()))


def test_oracle_uses_the_demo_box_draw_and_the_val_crops_instances(tmp_path):
    crowd = synthetic.generate(tmp_path, 12, image_size=QUICK.image_size, seed=3)
    dataset = crowd.dataset(**_demo_kwargs())
    settings = dataclasses.replace(QUICK, box_draw_seed=5)
    oracle = demo_oracle(crowd.coco, dataset, settings)
    crops = crop_instances(dataset)
    assert oracle["second_instances_per_person"] == sum(i[1] != a for a, i in crops.items()) / len(crops)
    assert oracle["rule"] == {"num_instances": 2, "selection": "paper", "min_keypoints": 3, "input_size": [128, 96]}
    by_boxes = oracle["by_boxes"]
    gt = prepare_ground_truth(crowd.coco)
    ann_ids = [a["id"] for a in gt["annotations"]]  # the draw is over every person of the file
    people = {a["id"] for a in gt["annotations"] if a["num_keypoints"] > 0}
    second = {a: inst[1] for a, inst in crops.items() if inst[1] != a}
    keep_sets = {"keep_0.75": keep_random_boxes(ann_ids, 0.75, 5), "keep_0.5": keep_random_boxes(ann_ids, 0.5, 5),
                 "occluded_dropped": set(ann_ids) - occluded_dropped(gt, settings.occlusion_pair_iou)}
    for name, keep in keep_sets.items():
        dropped = people - keep
        recoverable = {second[a] for a in keep if a in second} & dropped
        assert dropped and by_boxes[name]["dropped"] == len(dropped), name
        assert by_boxes[name]["recoverable_people"] == len(recoverable), name
        assert by_boxes[name]["fall_ratio"] is not None and 0.0 <= by_boxes[name]["fall_ratio"] <= 1.0
    assert by_boxes["all"]["oracle_AP"] == {"baseline": 1.0, "mipnet": 1.0}


def test_run_oracle_builds_the_demo_data_and_writes_the_bound(tmp_path):
    settings = dataclasses.replace(QUICK, train_images=1, val_images=6)
    returned = run_oracle(tmp_path, settings)
    written = json.loads((tmp_path / ORACLE_NAME).read_text())
    assert written == json.loads(json.dumps(returned)) and written["settings"]["val_images"] == 6
    assert set(written["oracle"]["by_boxes"]) == {"all", "keep_0.75", "keep_0.5", "occluded_dropped"}
