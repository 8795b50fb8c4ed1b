"""mipnet predict: poses of every instance from given boxes, as PNG and COCO results JSON.

A one-step checkpoint of the small demo net (``mipnet train`` on a micro synthetic crowd)
is predicted on one synthetic val image: the crops and poses must be exactly those of the
evaluation pipeline (``KeypointDataset`` with detection boxes + ``evaluate.predict``)."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from mipnet import cli
from mipnet.data import KeypointDataset, keypoint_spec, read_image_rgb
from mipnet.evaluate import HeatmapPredictor, predict
from mipnet.predict import boxes_from_detections, draw_poses, parse_box, predict_boxes, run_predict
from mipnet.runtime import load_trained


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 1-step resnet_tiny N=2 checkpoint and its synthetic data folder."""
    tmp = tmp_path_factory.mktemp("predict")
    data = tmp / "data"
    common = ["model.arch=resnet_tiny", "model.num_instances=2", "data.input_size=[64,32]", "data.workers=0",
              "data.synthetic.train_images=3", "data.synthetic.val_images=3",
              "data.synthetic.image_size=[96,128]", f"data.synthetic.cache_dir={data}",
              "train.epochs=1", "train.max_steps_per_epoch=1", "train.progress=false", "train.threads=1",
              f"train.output_dir={tmp / 'run'}", "eval.flip_test=true", "eval.decode=dark"]
    assert cli.main(["train", *common]) == 0
    (val,) = data.glob("crowd-*/val")
    gt = json.loads((val / "annotations.json").read_text())
    return tmp, tmp / "run" / "checkpoint.pth", val, gt


def _image_boxes(gt, image_id):
    return [a["bbox"] for a in gt["annotations"] if a["image_id"] == image_id]


def test_poses_are_those_of_the_evaluation_pipeline(trained):
    tmp, ckpt, val, gt = trained
    model, cfg, _ = load_trained(ckpt)
    image_id = max(gt["images"], key=lambda im: len(_image_boxes(gt, im["id"])))["id"]
    boxes = _image_boxes(gt, image_id)
    file_name = next(im["file_name"] for im in gt["images"] if im["id"] == image_id)
    dets = [{"image_id": image_id, "category_id": 1, "bbox": b, "score": 0.9 - 0.1 * i} for i, b in enumerate(boxes)]
    (tmp / "dets.json").write_text(json.dumps(dets))
    spec = keypoint_spec("coco")
    dataset = KeypointDataset(val / "annotations.json", val / "images", "coco", input_size=cfg.data.input_size,
                              num_instances=2, boxes=tmp / "dets.json")
    expected = predict(HeatmapPredictor(model, spec.flip_pairs, True, "dark"), dataset)
    got = predict_boxes(model, read_image_rgb(val / "images" / file_name), boxes, spec, cfg.data.input_size,
                        scores=[d["score"] for d in dets], image_id=image_id, flip_test=True, decode="dark")
    np.testing.assert_allclose(got.keypoints, expected.keypoints, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(got.areas, expected.areas)
    np.testing.assert_array_equal(got.box_scores, expected.box_scores)
    assert got.keypoints.shape == (len(boxes), 2, 17, 3)


def test_cli_box_writes_png_and_coco_json(trained, capsys):
    tmp, ckpt, val, gt = trained
    image = sorted((val / "images").iterdir())[0]
    boxes = _image_boxes(gt, int(image.stem))[:2]
    args = ["predict", "--checkpoint", str(ckpt), "--image", str(image), "--no-nms", "--threads", "1",
            "--output-png", str(tmp / "out" / "p.png"), "--output-json", str(tmp / "out" / "p.json")]
    for b in boxes:
        args += ["--box", ",".join(f"{v:g}" for v in b)]
    assert cli.main(args) == 0
    assert "wrote" in capsys.readouterr().out
    drawn = cv2.imread(str(tmp / "out" / "p.png"))
    assert drawn.shape == read_image_rgb(image).shape
    results = json.loads((tmp / "out" / "p.json").read_text())
    # no NMS: every instance of every box, primary and secondary
    assert sorted((r["box_index"], r["instance"]) for r in results) == [(i, n) for i in range(len(boxes))
                                                                        for n in range(2)]
    for r in results:
        assert r["image_id"] == int(image.stem) and r["category_id"] == 1 and len(r["keypoints"]) == 51
        assert r["box"] == pytest.approx(boxes[r["box_index"]], abs=0.01) and r["score"] >= 0
    with_nms = run_predict(str(ckpt), str(image), boxes, output_png=str(tmp / "n.png"),
                           output_json=str(tmp / "n.json"), device="cpu")
    assert 1 <= len(with_nms) <= len(results)
    assert {(r["box_index"], r["instance"]) for r in with_nms} <= {(r["box_index"], r["instance"]) for r in results}


def test_cli_boxes_from_a_detection_file(trained, capsys):
    tmp, ckpt, val, gt = trained
    ids = [im["id"] for im in gt["images"]][:2]
    dets = [{"image_id": i, "category_id": 1, "bbox": b, "score": 0.8} for i in ids for b in _image_boxes(gt, i)]
    dets.append({"image_id": ids[0], "category_id": 1, "bbox": [1, 1, 20, 30], "score": 0.05})
    path = tmp / "two_images.json"
    path.write_text(json.dumps(dets))
    image = val / "images" / f"{ids[0]:06d}.jpg"
    out = tmp / "d.json"
    assert cli.main(["predict", "--checkpoint", str(ckpt), "--image", str(image), "--boxes", str(path),
                     "--image-id", str(ids[0]), "--score-threshold", "0.5", "--no-nms",
                     "--output-png", str(tmp / "d.png"), "--output-json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert len(results) == 2 * len(_image_boxes(gt, ids[0]))  # the low-score box is left out
    chosen, image_id = boxes_from_detections(str(path), ids[0], 0.5)
    assert image_id == ids[0] and [d["bbox"] for d in chosen] == [[float(v) for v in b]
                                                                  for b in _image_boxes(gt, ids[0])]
    capsys.readouterr()
    # two images in the file and no --image-id: one clear line, exit 2
    assert cli.main(["predict", "--checkpoint", str(ckpt), "--image", str(image), "--boxes", str(path)]) == 2
    assert "--image-id" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["1,2,3", "1,2,0,4", "a,b,c,d", "1,2,nan,4", ""])
def test_bad_box_is_refused_naming_the_argument(text):
    with pytest.raises(ValueError, match="--box"):
        parse_box(text)


def test_cli_errors_are_one_line(trained, tmp_path, capsys):
    _, ckpt, val, _ = trained
    image = sorted((val / "images").iterdir())[0]
    assert cli.main(["predict", "--checkpoint", str(ckpt), "--image", str(image), "--box", "1,2,-3,4"]) == 2
    assert "--box" in capsys.readouterr().err
    missing = tmp_path / "missing.png"
    assert cli.main(["predict", "--checkpoint", str(ckpt), "--image", str(missing), "--box", "1,2,3,4"]) == 2
    assert str(missing) in capsys.readouterr().err
    assert cli.main(["predict", "--checkpoint", str(tmp_path / "no.pth"), "--image", str(image),
                     "--box", "1,2,3,4"]) == 2
    assert "no.pth" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --box and --boxes are exclusive, one is required (argparse)
        cli.main(["predict", "--checkpoint", str(ckpt), "--image", str(image)])


def test_draw_poses_colours_each_instance():
    image = np.zeros((60, 80, 3), np.uint8)
    kp = np.zeros((17, 3))
    kp[:, 0], kp[:, 1], kp[:, 2] = np.linspace(10, 70, 17), 30, 1.0
    results = [{"keypoints": kp.reshape(-1).tolist(), "instance": 0},
               {"keypoints": (kp + [0, 20, 0]).reshape(-1).tolist(), "instance": 1}]
    drawn = draw_poses(image, results, [[5, 5, 70, 50]], keypoint_spec("coco").skeleton)
    assert image.sum() == 0  # the input is not drawn on
    assert tuple(drawn[30, 40]) == (230, 40, 40) and tuple(drawn[50, 40]) == (0, 200, 230)
    assert drawn[5, 40].any()  # the box
