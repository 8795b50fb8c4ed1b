"""mipnet demo: the plumbing of the synthetic crowd benchmark on a micro setting (a few images,
one step per run), and its small network.  The real run (``make demo``) is measured, not tested."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from mipnet import cli
from mipnet.demo import BOXES_FIGURE_NAME, FIGURE_NAME, PREDICT_FIGURE_NAME, QUICK, RESULTS_NAME, run_demo
from mipnet.models import build_model


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
