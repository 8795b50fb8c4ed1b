"""The synthetic crowd benchmark (``mipnet demo``, ``make demo``): does N=2 recover occluded people?

One command: render a synthetic crowd (train + val, :mod:`mipnet.data.synthetic`), train a
baseline (N=1) and MIPNet (N=2) of the *same* backbone with the same budget (epochs, batch,
schedule, data order), evaluate both with pycocotools on ground-truth boxes, and report AP
overall and by occlusion -- each person's box IoU with the nearest other person, in the
buckets <0.3, 0.3-0.5, >0.5 (:func:`mipnet.data.synthetic.nearest_person_iou`).  Writes to
the output folder ``demo_results.json``, ``demo_occlusion.png`` (heavily occluded val crops:
the baseline's single pose next to MIPNet's two) and each run's checkpoint / eval files.

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
from .data import keypoint_spec
from .data.synthetic import IOU_BUCKETS, iou_bucket, nearest_person_iou
from .data.transforms import IMAGENET_MEAN, IMAGENET_STD, invert_affine, transform_points
from .evaluate import EvalSettings, eval_dataset, evaluate_model
from .runtime import make_model, resolve_data, train_dataset
from .train import train

RESULTS_NAME = "demo_results.json"
FIGURE_NAME = "demo_occlusion.png"


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
                                                  cache_dir=str(out / "data"))),
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
    results["figure"] = str(out / FIGURE_NAME) if _figure(runs, groups, val_gt, out / FIGURE_NAME,
                                                           settings.figure_examples) else None
    results["total_seconds"] = time.perf_counter() - start
    (out / RESULTS_NAME).write_text(json.dumps(results, indent=2))
    print(format_results(results))
    return results


def format_results(results: dict) -> str:
    buckets = [name for name, _, _ in IOU_BUCKETS]
    lines = [f"synthetic crowd, ground-truth boxes; AP by box IoU with the nearest other person "
             f"(val people per bucket: {results['val_people_by_iou']})",
             f"{'':>9} {'AP':>7} " + " ".join(f"{'IoU' + b:>10}" for b in buckets) + f" {'seconds':>9}"]
    for name in ("baseline", "mipnet"):
        r = results[name]
        lines.append(f"{name:>9} {r['AP']:7.4f} " + " ".join(f"{r['AP_by_iou'][b]:10.4f}" for b in buckets)
                     + f" {r['seconds']:9.1f}")
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


# ------------------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    parser.add_argument("--full", action="store_true", help="HRNet-W32 256x192 on a GPU (paper setting)")
    parser.add_argument("--threads", type=int, help="CPU intra-op threads (default: 1)")
    parser.add_argument("--epochs", type=int, help="override the setting's epochs")
    parser.add_argument("--train-images", type=int, help="override the number of synthetic train images")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    settings = FULL if args.full else QUICK
    if args.full and not torch.cuda.is_available():
        raise RuntimeError("--full needs a CUDA GPU (HRNet-W32 at 256x192); run without it on CPU")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    changes = {k: v for k, v in (("epochs", args.epochs), ("train_images", args.train_images)) if v is not None}
    if any(v < 1 for v in changes.values()):
        raise ValueError(f"--epochs and --train-images must be >= 1, got {changes}")
    settings = dataclasses.replace(settings, **changes)
    run_demo(args.out, settings, args.threads, progress=not args.no_progress)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mipnet.demo", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
