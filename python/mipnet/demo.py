"""The synthetic crowd benchmark (``mipnet demo``, ``make demo``): does N=2 recover occluded people?

One command: render a synthetic crowd (train + val, :mod:`mipnet.data.synthetic`), train a
baseline (N=1) and MIPNet (N=2) of the *same* backbone with the same budget (epochs, batch,
schedule, data order), evaluate both with pycocotools on ground-truth boxes, and report AP
overall and by occlusion -- each person's box IoU with the nearest other person, in the
buckets <0.3, 0.3-0.5, >0.5 (:func:`mipnet.data.synthetic.nearest_person_iou`).

What MIPNet is for (the paper's Fig. 5 / Table 1 AP_0.9): people whose box is missing, as
real detectors miss the person behind.  The same trained models are scored again, always
against *all* val people, with fewer boxes (:func:`box_evaluations`): ``keep_0.75`` /
``keep_0.5`` (each box kept with that probability, one seeded draw for both models) and
``occluded_dropped`` (the more occluded person's box of every pair with box IoU > 0.3); a
person without a box can only be found as the second instance of a neighbour's crop.
Every MIPNet − baseline difference comes with a paired 95% bootstrap interval over val
images.

How much of a box setting's loss N=2 can win back at all is measured without a model
(:func:`oracle_bound`, ``mipnet demo --oracle`` alone): a crop's instance 1 is trained to be
one particular neighbour (:func:`mipnet.data.targets.select_instances`: the nearest one by
box centre with at least ``min_keypoints`` labelled keypoints in the crop), so a person
without a box can be found only when it is that neighbour of a *kept* box -- a singleton
never is, and a pair whose two boxes are both dropped is lost.  ``results["oracle"]``:
``rule`` (N, selection, min_keypoints, input size of the val crops asked) and ``by_boxes``,
per box setting: ``people`` (the ones pycocotools scores), ``dropped`` (how many have no
box), ``recoverable`` (the fraction of those that are instance 1 of a kept crop; None when
none is dropped; ``recoverable_people`` the count), ``targeted`` (the fraction that are
instance 1 of any crop, kept or not), ``oracle_AP`` (pycocotools AP of ground-truth
keypoints, score 1: ``baseline`` for the people with a kept box, ``mipnet`` for those plus
the recoverable ones) and ``fall_ratio`` (the ``mipnet`` oracle's AP fall from ``all`` over
the ``baseline`` oracle's; about ``1 - recoverable``).  That ratio is what models reach that
find exactly whom they are trained to find; ``targets["keep_0.5_fall"]["oracle_ratio"]``
puts it next to the measured one.  ``second_instances_per_person``: how many crops have an
instance 1 other than their own person, per person.

Why ``keep_0.5`` cannot lose only half of the baseline's fall: with every box kept
independently with probability f, a person who is instance 1 of t crops is recoverable
with probability 1 - (1 - f)^t; each crop has one instance 1, so t averages at most 1 per
person, and as 1 - (1 - f)^t is concave in t (Jensen) the expected recoverable fraction is
at most f, the oracle fall ratio at least about 1 - f -- on any crowd, with equality only
when every person is the instance 1 of exactly one crop.  Measured (``mipnet demo
--oracle``, QUICK data): keep_0.5 recoverable 0.440 / 0.431 of the dropped people, oracle
ratio 0.558 / 0.577 on seeds 0 / 1 (0.481 / 0.472 on a pairs-only crowd with box IoU 0.3-0.9,
where every person is the instance 1 of its partner: there recoverable is f up to the draw).

Writes to the output folder ``demo_results.json``, ``demo_occlusion.png`` (heavily
occluded val crops: the baseline's single pose next to MIPNet's two), ``demo_boxes.png`` (AP
against the fraction of boxes kept, both models), ``example/`` (``mipnet predict`` of both
checkpoints on one val image with the ``occluded_dropped`` boxes) and each run's checkpoint
/ eval files; ``--oracle`` writes only ``demo_oracle.json``.

Settings (:class:`DemoSettings`):

* default (CPU, minutes): a small SimpleBaseline-style net (``resnet_tiny``: basic-block
  ResNet to stride 32, three deconvolutions; MIPNet's MIMBs where the official ResNet model
  has them, on the inputs of ``layer3`` and ``layer4``) at 128×96 (σ = 2 on 32×24 heatmaps)
  with bf16 autocast and channels-last weights (measured on an earlier, narrower version:
  2.9 vs 6.1 ms per image and step for fp32 contiguous, 1 thread), trained on ~13.5k
  unaugmented crops of 4000 images for 3 epochs of batch 16 (lr 2e-3, ÷10 for the last
  epoch).  Many distinct images for few
  epochs, not few images for many: on 500 images × 20 epochs the baseline's val loss was
  4.5× its train loss (memorised); 2500 × 4, the same compute, gave AP 0.28 instead of 0.23.
  Stage widths 32/64/128/256 and 48-channel deconvolutions, not 32/64/96/128 and 32: two
  instances share the net, and at the narrower widths MIPNet's primary instance lost
  localisation precision (AP75) to the baseline's, enough to leave it behind on IoU>0.5
  (5000 images × 3 epochs, seed 0: AP 0.184 vs 0.189); the wider net costs ~20% per step
  (1 thread: ~270 crops/s for the baseline, ~145 for MIPNet, against ~360 and ~195).
  The crops are rendered once (:class:`PrerenderedCrops`), so a step costs only the network.
  Decoding is DARK, the decoder matching the targets' unbiased sub-pixel Gaussians
  (:mod:`mipnet.data.targets`).  One intra-op thread unless ``--threads``: on the shared
  2-core box two threads ran at 11-140 crops/s whenever another job took a core, one
  thread at a steady rate, and one thread also makes the numbers independent of the load.
* ``--full`` (one GPU): HRNet-W32 at 256×192, as the paper; sized for under 25 minutes on
  an H100 (not run on the CPU development machine).

The budget is equal in optimiser steps and images seen; MIPNet's steps cost about N times
the compute (each image runs once per instance), which the reported seconds show.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .config import Config, DataConfig, EvalConfig, ModelConfig, SyntheticConfig, TrainConfig
from .data import KeypointDataset, keypoint_spec
from .data.synthetic import GENERATOR_VERSION, IOU_BUCKETS, iou_bucket, nearest_person_iou
from .data.transforms import IMAGENET_MEAN, IMAGENET_STD, invert_affine, transform_points
from .evaluate import (EvalSettings, ImageMatches, bootstrap_difference, eval_dataset, evaluate_model,
                       image_matches, keep_random_boxes, occluded_dropped, postprocess, prepare_ground_truth,
                       subset_predictions)
from .runtime import CHECKPOINT_NAME, make_model, resolve_data, train_dataset
from .train import train

RESULTS_NAME = "demo_results.json"
FIGURE_NAME = "demo_occlusion.png"
BOXES_FIGURE_NAME = "demo_boxes.png"
PREDICT_FIGURE_NAME = "demo_predict.png"
ORACLE_NAME = "demo_oracle.json"
#: The reduced-box evaluations of ``AP_by_boxes`` (issue 17) and the random-keep fractions.
BOX_SETTINGS = ("all", "keep_0.75", "keep_0.5", "occluded_dropped")
KEEP_FRACTIONS = {"keep_0.75": 0.75, "keep_0.5": 0.5}


# ------------------------------------------------------------------------------ training data
class PrerenderedCrops(Dataset):
    """The unaugmented training crops of a :class:`~mipnet.data.KeypointDataset`, rendered once.

    Without augmentation every epoch sees the very same crops, so reading, warping and
    target rendering (measured ~1.9 ms a crop, against ~3 ms for a baseline training step
    of ``resnet_tiny`` per image) need doing only once, not every epoch.  The crops are rendered with the largest N of
    the benchmark and :meth:`instances` gives the first ``n`` -- instance 0 is the primary
    whatever N is -- so the baseline and MIPNet train on identical tensors.  Images and
    heatmaps are held in float16 (the images come from 8-bit JPEGs).
    """

    def __init__(self, source, batch_size: int = 64, workers: int = 0):
        if source.train:
            raise ValueError("source must be an unaugmented dataset (train=False)")
        self.spec, self.kind = source.spec, source.kind
        images, targets, weights = [], [], []
        for batch in DataLoader(source, batch_size=batch_size, shuffle=False, num_workers=workers):
            images.append(batch["image"].half())
            targets.append(batch["target"].half())
            weights.append(batch["target_weight"])
        self.images, self.target, self.target_weight = torch.cat(images), torch.cat(targets), torch.cat(weights)
        self.num_instances = self.target.shape[1]

    def instances(self, n: int) -> "PrerenderedCrops":
        """A view with the targets of instances ``0 … n-1`` (no copy)."""
        if not 1 <= n <= self.num_instances:
            raise ValueError(f"n must be in [1, {self.num_instances}], got {n}")
        view = copy.copy(self)
        view.target, view.target_weight, view.num_instances = self.target[:, :n], self.target_weight[:, :n], n
        return view

    def set_epoch(self, epoch: int) -> None:
        """Nothing to do: the crops are not augmented (the sampler reshuffles per epoch)."""

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"image": self.images[index].float(), "target": self.target[index].float(),
                "target_weight": self.target_weight[index]}


# ------------------------------------------------------------------------------ settings
@dataclass
class DemoSettings:
    arch: str = "resnet_tiny"
    input_size: tuple[int, int] = (128, 96)
    sigma: float | None = 2.0  # heatmap σ (32×24 maps; None: the paper's rule, 1 there)
    image_size: tuple[int, int] = (192, 256)
    train_images: int = 4000
    val_images: int = 400  # ~1400 people, ~640 of them in the IoU>0.5 bucket
    epochs: int = 3
    batch_size: int = 16  # small batches: more steps in a short CPU budget
    lr: float = 2e-3
    lr_steps: tuple[int, ...] = (2,)
    augment: bool = False  # a few minutes of training converge faster on unaugmented crops
    decode: str = "dark"
    amp: str = "bf16"
    device: str = "cpu"
    workers: int = 1
    seed: int = 0
    channels_last: bool = True
    max_steps_per_epoch: int | None = None
    figure_examples: int = 4
    box_draw_seed: int = 0  # the random box draw of keep_* (the same for both models)
    box_fractions: tuple[float, ...] = (1.0, 0.9, 0.75, 0.6, 0.5, 0.4, 0.25)  # the AP-vs-boxes curve
    occlusion_pair_iou: float = 0.3  # occluded_dropped: pairs overlapping more than this
    bootstrap: int = 1000  # resamples of the val images for the 95% intervals


QUICK = DemoSettings()
#: HRNet-W32 at 256×192 on one GPU (target: under 25 minutes on an H100).
FULL = DemoSettings(arch="hrnet_w32", input_size=(256, 192), sigma=None, image_size=(256, 320), train_images=4000,
                    val_images=500, epochs=12, batch_size=64, lr=1e-3, lr_steps=(9, 11), augment=True, amp="bf16",
                    device="cuda", workers=8)


def run_config(s: DemoSettings, out: Path, num_instances: int, threads: int | None) -> Config:
    name = "baseline" if num_instances == 1 else "mipnet"
    return Config(
        model=ModelConfig(arch=s.arch, num_instances=num_instances),
        data=DataConfig(kind="synthetic", input_size=s.input_size, sigma=s.sigma, augment=s.augment,
                        workers=s.workers if s.augment else 0,  # pre-rendered crops otherwise
                        synthetic=SyntheticConfig(train_images=s.train_images, val_images=s.val_images,
                                                  image_size=s.image_size, seed=s.seed,
                                                  cache_dir=str(out / f"data-v{GENERATOR_VERSION}"))),
        train=TrainConfig(epochs=s.epochs, batch_size=s.batch_size, lr=s.lr, lr_steps=s.lr_steps, amp=s.amp,
                          seed=s.seed, output_dir=str(out / name), device=s.device, threads=threads,
                          log_every=10, max_steps_per_epoch=s.max_steps_per_epoch),
        eval=EvalConfig(batch_size=64, amp=s.amp, decode=s.decode),
    )


# ------------------------------------------------------------------------------ the benchmark
def _summary(report: dict, train_s: float, eval_s: float) -> dict:
    by_group = report["merged_by_group"]
    return {
        "AP": report["merged"]["AP"],
        "AP_by_iou": {name: by_group.get(name, {"AP": -1.0})["AP"] for name, _, _ in IOU_BUCKETS},
        "seconds": train_s + eval_s,
        "train_seconds": train_s,
        "eval_seconds": eval_s,
        "metrics": report["merged"],
        "per_instance": report["per_instance"],
    }


def run_demo(out_dir: str | os.PathLike, settings: DemoSettings = QUICK, threads: int | None = None,
             progress: bool = True) -> dict:
    """Run the benchmark into ``out_dir``; returns what ``demo_results.json`` holds."""

    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if settings.device == "cpu":
        threads = threads or 1  # see the module docstring
        torch.set_num_threads(threads)
    results: dict[str, Any] = {"boxes": "ground truth", "settings": dataclasses.asdict(settings),
                               "threads": threads, "torch": torch.__version__}
    data_start = time.perf_counter()
    base_cfg = run_config(settings, out, 1, threads)
    files = resolve_data(base_cfg)
    results["data_seconds"] = time.perf_counter() - data_start
    val_gt = json.loads(Path(files.val_annotations).read_text())
    groups = {ann_id: iou_bucket(iou) for ann_id, iou in nearest_person_iou(val_gt).items()}
    results["val_people_by_iou"] = {name: sum(g == name for g in groups.values()) for name, _, _ in IOU_BUCKETS}

    crops = None
    if not settings.augment:
        render_start = time.perf_counter()
        crops = PrerenderedCrops(train_dataset(run_config(settings, out, 2, threads), files),
                                 workers=settings.workers)
        results["render_seconds"] = time.perf_counter() - render_start
    results["train_crops"] = len(crops) if crops is not None else None

    runs = {}
    for name, n in (("baseline", 1), ("mipnet", 2)):
        cfg = run_config(settings, out, n, threads)
        cfg.train.progress = progress
        print(f"[demo] training {name} ({settings.arch}, N={n}) ...", file=sys.stderr)
        torch.manual_seed(cfg.train.seed)  # the trunk's initial weights are the same for both
        model = make_model(cfg, keypoint_spec(files.kind).num_joints)
        if settings.channels_last:
            model = model.to(memory_format=torch.channels_last)
        trained = train(cfg, model, crops.instances(n) if crops is not None else None)
        dataset = eval_dataset(cfg, files)
        ev = evaluate_model(trained.model, dataset,
                            EvalSettings(decode=settings.decode, batch_size=cfg.eval.batch_size, amp=settings.amp,
                                         workers=settings.workers),
                            out / name / "eval", annotation_groups=groups)
        runs[name] = (dataset, ev)
        results[name] = _summary(ev.report, trained.seconds, ev.report["seconds"])
        results[name]["final_loss"] = trained.history[-1]["loss"] if trained.history else None

    heavy = IOU_BUCKETS[-1][0]
    results["mipnet_ahead_on_heavy_occlusion"] = results["mipnet"]["AP_by_iou"][heavy] > \
        results["baseline"]["AP_by_iou"][heavy]
    boxes_start = time.perf_counter()
    per_model, shared = box_evaluations({name: ev for name, (_, ev) in runs.items()}, val_gt, groups, settings,
                                        runs["baseline"][0].spec.sigmas)
    for name, fields in per_model.items():
        results[name].update(fields)
    results.update(shared)
    results["box_evaluation_seconds"] = time.perf_counter() - boxes_start
    oracle_start = time.perf_counter()
    results["oracle"] = demo_oracle(val_gt, runs["mipnet"][0], settings)
    results["oracle_seconds"] = time.perf_counter() - oracle_start
    results["targets"] = _targets(results)
    results["figure"] = str(out / FIGURE_NAME) if _figure(runs, groups, val_gt, out / FIGURE_NAME,
                                                           settings.figure_examples) else None
    results["boxes_figure"] = str(out / BOXES_FIGURE_NAME) if _boxes_figure(results, out / BOXES_FIGURE_NAME) \
        else None
    results["predict_example"] = _predict_example(out, files, val_gt, settings)
    results["total_seconds"] = time.perf_counter() - start
    (out / RESULTS_NAME).write_text(json.dumps(results, indent=2))
    print(format_results(results))
    return results


def run_oracle(out_dir: str | os.PathLike, settings: DemoSettings = QUICK) -> dict:
    """Only the oracle bound (``mipnet demo --oracle``): the demo's data, built (or reused from
    ``out_dir``) as :func:`run_demo` builds it, then :func:`demo_oracle`; no model.  Writes
    ``{"settings", "oracle"}`` to ``out_dir/demo_oracle.json``, prints it and returns it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = run_config(settings, out, 2, None)
    files = resolve_data(cfg)
    val_gt = json.loads(Path(files.val_annotations).read_text())
    result = {"settings": dataclasses.asdict(settings),
              "oracle": demo_oracle(val_gt, eval_dataset(cfg, files), settings)}
    (out / ORACLE_NAME).write_text(json.dumps(result, indent=2))
    print("\n".join(format_oracle(result["oracle"])))
    return result


def box_evaluations(evals: dict, val_gt: dict, groups: dict, s: DemoSettings, sigmas) -> tuple[dict, dict]:
    """The reduced-box evaluations of both models and the bootstrap intervals of their differences.

    Box sets (always scored against *every* val person -- a person without a box can only be
    found as another crop's second instance): ``all``; ``keep_0.75`` / ``keep_0.5``, each box
    kept with that probability (one uniform draw per annotation, seed ``s.box_draw_seed``,
    the same for both models and nested across fractions); ``occluded_dropped``, the more
    occluded person's box of every pair overlapping with box IoU > ``s.occlusion_pair_iou``
    (:func:`mipnet.evaluate.occluded_dropped`).  The crops' predictions do not depend on the
    other boxes, so each set is the kept crops' rows of the one inference, re-post-processed
    (rescoring, OKS-NMS) and scored by pycocotools.

    Uncertainty: pycocotools' per-image matching is computed once per (model, evaluation)
    (:func:`mipnet.evaluate.image_matches`); each of ``s.bootstrap`` resamples draws the val
    images with replacement and recomputes ``COCOeval.accumulate``'s AP for both models on
    that multiset (:func:`mipnet.evaluate.bootstrap_difference`: pycocotools on the resampled
    image set, up to the order of exactly equal scores in different images), giving the
    percentile 95% interval of MIPNet − baseline.

    Returns ``({model: {"AP_by_boxes", "AP_by_fraction_kept"}}, {"comparison", ...})``.
    """
    gt = prepare_ground_truth(val_gt)
    ann_ids = [a["id"] for a in gt["annotations"] if not a.get("iscrowd", 0)]
    keep_sets = box_keep_sets(gt, s)
    fraction_sets = {f"{f:g}": keep_random_boxes(ann_ids, f, s.box_draw_seed) for f in s.box_fractions}

    def results_of(ev, keep):
        preds = subset_predictions(ev.predictions, keep)
        return postprocess(preds, None, sigmas=sigmas, in_vis_threshold=ev.report["settings"]["in_vis_threshold"],
                           oks_threshold=ev.report["settings"]["oks_threshold"],
                           secondary_score_decay=ev.report["settings"]["secondary_score_decay"])

    matches: dict[str, dict[str, ImageMatches]] = {}
    per_model: dict[str, dict[str, dict[str, float]]] = {}
    for name, ev in evals.items():
        m = {box: image_matches(gt, results_of(ev, keep_sets[box]), sigmas) for box in BOX_SETTINGS}
        for bucket, _, _ in IOU_BUCKETS:  # all boxes; everyone outside the bucket is an ignore region
            others = [a for a in ann_ids if groups.get(a) != bucket]
            m[bucket] = image_matches(gt, ev.results, sigmas, ignore_annotations=others)
        matches[name] = m
        per_model[name] = {
            "AP_by_boxes": {box: m[box].average_precision() for box in BOX_SETTINGS},
            "AP_by_fraction_kept": {key: image_matches(gt, results_of(ev, keep), sigmas).average_precision()
                                    for key, keep in fraction_sets.items()},
        }
    comparison = {}
    for key in (*BOX_SETTINGS, *(b for b, _, _ in IOU_BUCKETS)):
        c = bootstrap_difference(matches["baseline"][key], matches["mipnet"][key], s.bootstrap, seed=s.seed)
        comparison[key] = {"diff": c["diff"], "ci95": c["ci95"]}
    n = len(ann_ids)
    return per_model, {
        "comparison": comparison,
        "bootstrap": {"resamples": s.bootstrap, "unit": "val image", "paired": True, "interval": "percentile"},
        "boxes_kept": {name: len(keep) / n if n else 0.0 for name, keep in keep_sets.items()},
        "val_people": n,
    }


def box_keep_sets(gt: dict, s: DemoSettings) -> dict[str, set[int]]:
    """The kept annotation ids of each of :data:`BOX_SETTINGS` on ``gt`` (a
    :func:`~mipnet.evaluate.prepare_ground_truth` dict): every non-crowd person for ``all``,
    :func:`~mipnet.evaluate.keep_random_boxes` with ``s.box_draw_seed`` for ``keep_*``,
    everyone but :func:`~mipnet.evaluate.occluded_dropped` for ``occluded_dropped``.  The one
    definition the model evaluations and the oracle share."""
    ann_ids = [a["id"] for a in gt["annotations"] if not a.get("iscrowd", 0)]
    keep = {"all": set(ann_ids), "occluded_dropped": set(ann_ids) - occluded_dropped(gt, s.occlusion_pair_iou)}
    keep.update({name: keep_random_boxes(ann_ids, f, s.box_draw_seed) for name, f in KEEP_FRACTIONS.items()})
    return {name: keep[name] for name in BOX_SETTINGS}


# ------------------------------------------------------------------------------ oracle bound
def crop_instances(dataset: KeypointDataset) -> dict[int, list[int]]:
    """Who each ground-truth-box crop's instances are trained to be: the crop's annotation id ->
    the annotation ids of its N instances (instance 0 the crop's person; a fallback repeats it).

    Read from the dataset's own samples (``meta["instance_ids"]``), so it is exactly the
    training targets' rule -- :func:`mipnet.data.targets.select_instances` with the dataset's
    ``selection``, ``min_keypoints``, input size and HRNet crop of the box -- on the
    unaugmented crop (an augmented training crop's instance 1 can differ).
    """
    if not dataset.use_gt_boxes:
        raise ValueError("dataset must use ground-truth boxes (crops of detections have no instances)")
    if dataset.train:
        raise ValueError("dataset must be unaugmented (train=False): the oracle asks about the box's own crop")
    out: dict[int, list[int]] = {}
    for i in range(len(dataset)):
        meta = dataset[i]["meta"]
        out[int(meta["annotation_id"])] = [int(a) for a in meta["instance_ids"]]
    return out


def oracle_bound(gt: dict, crops: dict[int, Sequence[int]], keep_sets: dict[str, set[int]], sigmas) -> dict:
    """What perfect models could score with each box set, from ground truth alone (no model).

    ``gt``: a :func:`~mipnet.evaluate.prepare_ground_truth` dict; ``crops``: each crop's
    instances (:func:`crop_instances`); ``keep_sets``: setting -> kept annotation ids (must
    hold ``"all"``, the reference of the falls).  The people are the ones pycocotools scores
    (non-crowd, at least one labelled keypoint).  Per setting:

    * ``dropped``: how many people have no box; ``recoverable``: the fraction of them that
      are instance ``>= 1`` of some *kept* crop (None when none is dropped), and
      ``recoverable_people`` how many; ``targeted``: the fraction that are instance ``>= 1``
      of any crop, kept or not (what the rule could reach if the neighbours' boxes were all there);
    * ``oracle_AP``: pycocotools AP (:func:`~mipnet.evaluate.image_matches`, as the models'
      ``AP_by_boxes``) of ground-truth keypoints with score 1 for ``baseline``: the people
      with a kept crop, and for ``mipnet``: those plus the recoverable ones;
    * ``fall_ratio``: ``mipnet``'s oracle fall from ``all`` over ``baseline``'s (None for
      ``all`` or without a fall).

    Perfect predictions score AP = the recall reached (precision 1, to pycocotools' 101
    recall steps), so the ratio is about ``1 - recoverable``: the fall ratio of models whose
    instance 1 finds exactly whom it is trained to find, as well as instance 0 finds its
    crop's person.  A model goes below it only by finding people its crops are not trained
    to find, or with secondary instances better than its primaries.
    """
    if "all" not in keep_sets:
        raise ValueError(f"keep_sets must hold 'all' (the reference of the falls), got {sorted(keep_sets)}")
    people = {a["id"]: a for a in gt["annotations"] if not a.get("iscrowd", 0) and a.get("num_keypoints", 0) > 0}
    unknown = sorted(set(crops) - {a["id"] for a in gt["annotations"]})
    if unknown:
        raise ValueError(f"crops has annotation ids not in gt: {unknown[:5]}")
    targeted_by = {a: {i for i in inst[1:] if i != a} for a, inst in crops.items()}

    def ap(ids) -> float:
        results = [{"image_id": people[a]["image_id"], "category_id": 1, "keypoints": list(people[a]["keypoints"]),
                    "score": 1.0} for a in sorted(ids)]
        return image_matches(gt, results, sigmas).average_precision()

    any_target = set().union(*targeted_by.values()) & people.keys()
    by_boxes = {}
    for name, keep in keep_sets.items():
        kept = {int(a) for a in keep} & crops.keys()
        found = kept & people.keys()
        second = set().union(*(targeted_by[a] for a in kept)) & people.keys()
        dropped = people.keys() - {int(a) for a in keep}
        recoverable = dropped & second
        by_boxes[name] = {
            "people": len(people), "dropped": len(dropped), "recoverable_people": len(recoverable),
            "recoverable": len(recoverable) / len(dropped) if dropped else None,
            "targeted": len(dropped & any_target) / len(dropped) if dropped else None,
            "oracle_AP": {"baseline": ap(found), "mipnet": ap(found | second)},
        }
    ref = by_boxes["all"]["oracle_AP"]
    for name, r in by_boxes.items():
        fall_base, fall_mip = (ref[m] - r["oracle_AP"][m] for m in ("baseline", "mipnet"))
        r["fall_ratio"] = fall_mip / fall_base if name != "all" and fall_base > 0 else None
    return by_boxes


def demo_oracle(val_gt: dict, dataset: KeypointDataset, s: DemoSettings) -> dict:
    """:func:`oracle_bound` of the demo's box settings (:func:`box_keep_sets`) on the val set,
    with the instances of ``dataset`` (the MIPNet run's evaluation dataset: N=2 and the
    demo's rule); what ``results["oracle"]`` holds."""
    gt = prepare_ground_truth(val_gt)
    crops = crop_instances(dataset)
    by_boxes = oracle_bound(gt, crops, box_keep_sets(gt, s), dataset.spec.sigmas)
    people = by_boxes["all"]["people"]
    seconds = sum(len({i for i in inst[1:] if i != a}) for a, inst in crops.items())
    return {
        "rule": {"num_instances": dataset.num_instances, "selection": dataset.selection,
                 "min_keypoints": dataset.min_keypoints, "input_size": list(dataset.input_size)},
        "second_instances_per_person": seconds / people if people else None,
        "by_boxes": by_boxes,
    }


def format_oracle(oracle: dict) -> list[str]:
    rule = oracle["rule"]
    fmt = (lambda v: "n/a" if v is None else f"{v:.3f}")
    lines = [f"oracle bound (ground truth, no model; instance 1 = the {rule['selection']!r} rule's target of each "
             f"kept crop, N={rule['num_instances']}, k={rule['min_keypoints']}; crops with an instance 1 per person "
             f"{fmt(oracle['second_instances_per_person'])}):"]
    for name, r in oracle["by_boxes"].items():
        if name == "all":
            continue
        lines.append(f"  {name:>16}: {r['dropped']} of {r['people']} people without a box, recoverable "
                     f"{fmt(r['recoverable'])} (targeted by any crop {fmt(r['targeted'])}); oracle AP baseline "
                     f"{r['oracle_AP']['baseline']:.4f}, N=2 {r['oracle_AP']['mipnet']:.4f}; "
                     f"fall ratio {fmt(r['fall_ratio'])}")
    return lines


def _targets(results: dict) -> dict:
    """The demo's targets (issue 17): MIPNet ahead on ``occluded_dropped`` with the interval above
    zero, and MIPNet's fall from ``all`` to ``keep_0.5`` at most half the baseline's -- next to
    the oracle's ratio (:func:`oracle_bound`), which no model trained to this target rule can
    be expected to beat: above 0.5, the second target is out of reach on this data."""
    base, mip = results["baseline"]["AP_by_boxes"], results["mipnet"]["AP_by_boxes"]
    fall_base, fall_mip = base["all"] - base["keep_0.5"], mip["all"] - mip["keep_0.5"]
    lo = results["comparison"]["occluded_dropped"]["ci95"][0]
    return {
        "occluded_dropped_ci_above_zero": bool(lo > 0),
        "keep_0.5_fall": {"baseline": fall_base, "mipnet": fall_mip,
                          "ratio": fall_mip / fall_base if fall_base > 0 else None,
                          "oracle_ratio": results["oracle"]["by_boxes"]["keep_0.5"]["fall_ratio"]},
        "keep_0.5_fall_at_most_half": bool(fall_base > 0 and fall_mip <= 0.5 * fall_base),
    }


def format_results(results: dict) -> str:
    buckets = [name for name, _, _ in IOU_BUCKETS]
    lines = [f"synthetic crowd, ground-truth boxes; AP by box IoU with the nearest other person "
             f"(val people per bucket: {results['val_people_by_iou']})",
             f"{'':>9} {'AP':>7} " + " ".join(f"{'IoU' + b:>10}" for b in buckets) + f" {'seconds':>9}"]
    for name in ("baseline", "mipnet"):
        r = results[name]
        lines.append(f"{name:>9} {r['AP']:7.4f} " + " ".join(f"{r['AP_by_iou'][b]:10.4f}" for b in buckets)
                     + f" {r['seconds']:9.1f}")
    if "comparison" in results:
        kept = results["boxes_kept"]
        lines.append(f"AP over all {results['val_people']} val people with fewer boxes "
                     f"(fraction of boxes kept: " + ", ".join(f"{k} {v:.2f}" for k, v in kept.items()) + ")")
        lines.append(f"{'':>9} " + " ".join(f"{b:>16}" for b in BOX_SETTINGS))
        for name in ("baseline", "mipnet"):
            r = results[name]["AP_by_boxes"]
            lines.append(f"{name:>9} " + " ".join(f"{r[b]:16.4f}" for b in BOX_SETTINGS))
        lines.append(f"MIPNet - baseline, 95% bootstrap interval over val images "
                     f"({results['bootstrap']['resamples']} resamples):")
        for key, c in results["comparison"].items():
            label = key if key in BOX_SETTINGS else f"IoU{key} (all boxes)"
            lines.append(f"  {label:>24}: {c['diff']:+.4f} (95% CI [{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}])")
        t = results["targets"]
        lines += format_oracle(results["oracle"])
        ratio, oracle_ratio = t["keep_0.5_fall"]["ratio"], t["keep_0.5_fall"]["oracle_ratio"]
        lines.append(f"targets: occluded_dropped interval above zero: {t['occluded_dropped_ci_above_zero']}; "
                     f"all -> keep_0.5 fall {t['keep_0.5_fall']['mipnet']:.4f} (MIPNet) vs "
                     f"{t['keep_0.5_fall']['baseline']:.4f} (baseline), ratio "
                     f"{'n/a' if ratio is None else f'{ratio:.2f}'} (oracle "
                     f"{'n/a' if oracle_ratio is None else f'{oracle_ratio:.2f}'}), "
                     f"at most half: {t['keep_0.5_fall_at_most_half']}")
    lines.append(f"total {results['total_seconds']:.1f} s; MIPNet ahead on IoU{buckets[-1]}: "
                 f"{results['mipnet_ahead_on_heavy_occlusion']}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ figure
def _crop_rgb(image: Tensor) -> np.ndarray:
    x = image.permute(1, 2, 0).numpy() * np.asarray(IMAGENET_STD) + np.asarray(IMAGENET_MEAN)
    return np.clip(x, 0, 1)


def _draw_pose(ax, kp: np.ndarray, skeleton, color: str, threshold: float = 0.1) -> None:
    for a, b in skeleton:
        if kp[a - 1, 2] > threshold and kp[b - 1, 2] > threshold:
            ax.plot(kp[[a - 1, b - 1], 0], kp[[a - 1, b - 1], 1], "-", color=color, lw=1.5)
    ok = kp[:, 2] > threshold
    ax.plot(kp[ok, 0], kp[ok, 1], "o", color=color, ms=2.5)


def _figure(runs: dict, groups: dict, val_gt: dict, path: Path, examples: int) -> bool:
    """Heavily occluded val crops: baseline (instance 0) | MIPNet (instances 0 and 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base_ds, base_ev = runs["baseline"]
    _, mip_ev = runs["mipnet"]
    iou = nearest_person_iou(val_gt)
    ann_ids = base_ev.predictions.annotation_ids
    heavy = [i for i in np.argsort([-iou.get(int(a), 0.0) for a in ann_ids], kind="stable")
             if groups.get(int(ann_ids[i])) == IOU_BUCKETS[-1][0]][:examples]
    if not heavy:
        return False
    skeleton = base_ds.spec.skeleton
    fig, axes = plt.subplots(len(heavy), 2, figsize=(4.2, 2.6 * len(heavy)), squeeze=False)
    for row, i in enumerate(heavy):
        sample = base_ds[int(i)]
        to_crop = invert_affine(sample["meta"]["crop_to_image"].numpy())
        crop = _crop_rgb(sample["image"])
        for col, (ev, colors, title) in enumerate((
                (base_ev, ("tab:red",), "baseline (N=1)"),
                (mip_ev, ("tab:red", "tab:cyan"), "MIPNet (N=2): λ=0 red, λ=1 cyan"))):
            ax = axes[row, col]
            ax.imshow(crop)
            for n, color in enumerate(colors):
                kp = ev.predictions.keypoints[i, n].copy()
                kp[:, :2] = transform_points(kp[:, :2], to_crop)
                _draw_pose(ax, kp, skeleton, color)
            ax.set_axis_off()
            if row == 0:
                ax.set_title(title, fontsize=7)
        axes[row, 0].text(2, 8, f"IoU {iou.get(int(ann_ids[i]), 0):.2f}", color="white", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _boxes_figure(results: dict, path: Path) -> bool:
    """AP over all val people against the fraction of boxes kept, both models (paper Fig. 5)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.4, 3.2))
    for name, color, label in (("baseline", "tab:red", "baseline (N=1)"), ("mipnet", "tab:blue", "MIPNet (N=2)")):
        curve = sorted((float(k), v) for k, v in results[name]["AP_by_fraction_kept"].items() if v >= 0)
        if curve:
            ax.plot(*zip(*curve), "o-", color=color, ms=3.5, label=label)
        ax.plot([results["boxes_kept"]["occluded_dropped"]], [results[name]["AP_by_boxes"]["occluded_dropped"]],
                "*", color=color, ms=9, label=f"{label}, occluded dropped")
    ax.set_xlabel("fraction of ground-truth boxes kept (random; ★ occluded person's box dropped)", fontsize=6.5)
    ax.set_ylabel("AP over all val people", fontsize=8)
    ax.set_title("synthetic crowd: AP as person boxes go missing", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _predict_example(out: Path, files, val_gt: dict, s: DemoSettings) -> dict | None:
    """``mipnet predict`` on one val image with the ``occluded_dropped`` boxes, both checkpoints.

    The image is the first val image (by id) where a dropped person overlaps a kept one with
    box IoU > 0.5 -- chosen by the data alone, not by any model's output.  Writes
    ``example/image.<ext>``, ``example/boxes.json`` (its kept boxes as COCO detections) and
    ``example/<model>.png`` / ``.json`` (what ``mipnet predict`` gives) and ``demo_predict.png``
    (the two side by side).
    """
    from .predict import run_predict

    gt = prepare_ground_truth(val_gt)
    dropped = occluded_dropped(gt, s.occlusion_pair_iou)
    nearest = nearest_person_iou(gt)
    for im in sorted(gt["images"], key=lambda im: im["id"]):
        anns = [a for a in gt["annotations"] if a["image_id"] == im["id"] and not a.get("iscrowd", 0)]
        if any(a["id"] in dropped and nearest.get(a["id"], 0.0) > 0.5 for a in anns):
            break
    else:
        return None
    folder = out / "example"
    folder.mkdir(parents=True, exist_ok=True)
    image = folder / f"image{Path(im['file_name']).suffix}"
    image.write_bytes((Path(files.val_images) / im["file_name"]).read_bytes())
    kept = [{"image_id": im["id"], "category_id": 1, "bbox": a["bbox"], "score": 1.0}
            for a in anns if a["id"] not in dropped]
    (folder / "boxes.json").write_text(json.dumps(kept))
    example = {"image": str(image), "boxes": str(folder / "boxes.json"), "people": len(anns),
               "boxes_given": len(kept)}
    for name in ("baseline", "mipnet"):
        res = run_predict(str(out / name / CHECKPOINT_NAME), str(image), [k["bbox"] for k in kept],
                          image_id=im["id"], output_png=str(folder / f"{name}.png"),
                          output_json=str(folder / f"{name}.json"), device=s.device)
        example[name] = {"png": str(folder / f"{name}.png"), "poses": len(res)}
    example["figure"] = str(out / PREDICT_FIGURE_NAME) if side_by_side(
        [folder / "baseline.png", folder / "mipnet.png"],
        [f"baseline (N=1): {example['baseline']['poses']} poses", f"MIPNet (N=2): {example['mipnet']['poses']} poses"],
        out / PREDICT_FIGURE_NAME) else None
    return example


def side_by_side(images: Sequence[Path], titles: Sequence[str], path: Path, scale: float = 1.5) -> bool:
    """The PNGs ``images`` next to each other (scaled by ``scale``), each titled, white gaps."""
    import cv2

    tiles = [cv2.imread(str(p)) for p in images]
    if not tiles or any(t is None for t in tiles):
        return False
    tiles = [cv2.resize(t, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST) for t in tiles]
    height = max(t.shape[0] for t in tiles)
    row = []
    for tile, title in zip(tiles, titles):
        canvas = np.full((height + 22, tile.shape[1], 3), 255, np.uint8)
        canvas[22:22 + tile.shape[0]] = tile
        cv2.putText(canvas, title, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        row += [canvas, np.full((height + 22, 8, 3), 255, np.uint8)]
    return bool(cv2.imwrite(str(path), np.concatenate(row[:-1], axis=1)))


# ------------------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    parser.add_argument("--full", action="store_true", help="HRNet-W32 256x192 on a GPU (paper setting)")
    parser.add_argument("--threads", type=int, help="CPU intra-op threads (default: 1)")
    parser.add_argument("--epochs", type=int, help="override the setting's epochs")
    parser.add_argument("--train-images", type=int, help="override the number of synthetic train images")
    parser.add_argument("--seed", type=int, help="data, initialisation and order seed (default 0)")
    parser.add_argument("--bootstrap", type=int, help="bootstrap resamples for the 95%% intervals (default 1000)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--oracle", action="store_true",
                        help=f"only the ground-truth oracle bound of the box settings (no training; "
                             f"writes {ORACLE_NAME})")


def run(args: argparse.Namespace) -> int:
    settings = FULL if args.full else QUICK
    if args.full and not torch.cuda.is_available():
        raise RuntimeError("--full needs a CUDA GPU (HRNet-W32 at 256x192); run without it on CPU")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    changes = {k: v for k, v in (("epochs", args.epochs), ("train_images", args.train_images),
                                 ("bootstrap", args.bootstrap)) if v is not None}
    if any(v < 1 for v in changes.values()):
        raise ValueError(f"--epochs, --train-images and --bootstrap must be >= 1, got {changes}")
    if args.seed is not None:
        if args.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {args.seed}")
        changes["seed"] = args.seed
    settings = dataclasses.replace(settings, **changes)
    if args.oracle:
        run_oracle(args.out, settings)
    else:
        run_demo(args.out, settings, args.threads, progress=not args.no_progress)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mipnet.demo", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
