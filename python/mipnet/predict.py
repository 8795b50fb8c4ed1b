"""Poses of every instance on any image from given person boxes (``mipnet predict``).

``mipnet predict --checkpoint run/checkpoint.pth --image street.jpg --box 40,12,80,200 --box 90,20,70,190``
``mipnet predict --checkpoint run/checkpoint.pth --image 000123.jpg --boxes detections.json [--image-id 123]``

Each box is cropped as in evaluation (HRNet geometry, no augmentation), the trained model
predicts all its N instances (flip test, decoding and amp as the checkpoint's ``eval``
settings), and the post-processing of ``mipnet eval`` runs: rescoring (box score × mean
confident keypoint score; non-primary instances × ``secondary_score_decay``) and OKS-NMS
(``--no-nms`` keeps every instance of every box).  Writes

* a PNG: the image with the boxes (grey) and each kept pose, coloured by instance
  (λ=0 red, λ=1 cyan, then yellow, green, ...);
* a COCO keypoint results JSON (``image_id``, ``category_id``, ``keypoints``, ``score``)
  whose records also say which ``box`` (``[x, y, w, h]``, and ``box_index`` into the boxes
  given) and which ``instance`` they came from.

Boxes: ``--box x,y,w,h`` (repeatable, score 1), or a COCO detection results JSON
(``[{"image_id", "bbox", "score", "category_id"}]``, person category only) filtered by
``--image-id`` -- optional when the file has one image -- and ``--score-threshold``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch
from torch import nn

from .data import box_affines, box_to_center_scale, keypoint_spec, load_detections, normalize_image, \
    read_image_rgb, warp_to_crop
from .data.coco import KeypointSpec
from .data.transforms import PIXEL_STD, parse_size
from .evaluate import HeatmapPredictor, Predictions, postprocess
from .runtime import load_trained, resolve_device, set_threads

#: Pose colours by instance (RGB): λ=0 red, λ=1 cyan, then yellow, green, magenta.
INSTANCE_COLORS = ((230, 40, 40), (0, 200, 230), (240, 220, 0), (60, 200, 60), (220, 0, 220))


def parse_box(text: str) -> list[float]:
    """``"x,y,w,h"`` -> ``[x, y, w, h]`` (finite, ``w, h > 0``)."""
    try:
        box = [float(v) for v in str(text).split(",")]
    except ValueError:
        box = []
    if len(box) != 4 or not all(np.isfinite(box)) or box[2] <= 0 or box[3] <= 0:
        raise ValueError(f"--box must be x,y,w,h with finite numbers and w, h > 0, got {text!r}")
    return box


def boxes_from_detections(path: str, image_id=None, score_threshold: float = 0.0) -> tuple[list[dict], object]:
    """The person detections of one image from a COCO results JSON, and that image's id."""
    dets = load_detections(path, score_threshold)
    ids = list(dict.fromkeys(d["image_id"] for d in dets))
    if image_id is None:
        if len(ids) > 1:
            raise ValueError(f"--boxes file {path!r} has detections of {len(ids)} images; choose one with --image-id")
        image_id = ids[0] if ids else None
    chosen = [d for d in dets if str(d["image_id"]) == str(image_id)]
    if not chosen:
        raise ValueError(f"--boxes file {path!r} has no person box with score >= {score_threshold}"
                         + (f" for --image-id {image_id}" if image_id is not None else ""))
    return chosen, chosen[0]["image_id"]


def predict_boxes(model: nn.Module, image: np.ndarray, boxes: Sequence[Sequence[float]], spec: KeypointSpec,
                  input_size, heatmap_size=None, scores: Sequence[float] | None = None, image_id: int = 0,
                  flip_test: bool = True, decode: str = "quarter", amp: str = "none") -> Predictions:
    """All N instances of each box of ``image`` (``uint8`` RGB) in image coordinates (no post-processing)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if len(boxes) == 0:
        raise ValueError("boxes must hold at least one [x, y, w, h] box")
    scores = np.ones(len(boxes)) if scores is None else np.asarray(scores, dtype=np.float64)
    if scores.shape != (len(boxes),):
        raise ValueError(f"scores must have one value per box ({len(boxes)}), got shape {scores.shape}")
    H, W = parse_size(input_size, "input_size")
    heatmap_size = (H // 4, W // 4) if heatmap_size is None else parse_size(heatmap_size, "heatmap_size")
    image_to_crop, heatmap_to_image = box_affines(boxes, (H, W), heatmap_size)
    crops = torch.stack([normalize_image(warp_to_crop(image, a, (H, W))) for a in image_to_crop])
    predictor = HeatmapPredictor(model, spec.flip_pairs, flip_test, decode, amp)
    with torch.no_grad():
        coords, conf = predictor(crops, torch.from_numpy(heatmap_to_image))
    keypoints = torch.cat([coords, conf[..., None]], dim=-1).transpose(0, 1).float().cpu().numpy()
    _, scale = box_to_center_scale(boxes, W / H)
    return Predictions(keypoints, np.full(len(boxes), int(image_id), dtype=np.int64), scores,
                       np.prod(np.asarray(scale) * PIXEL_STD, axis=-1), np.full(len(boxes), -1, dtype=np.int64))


def draw_poses(image: np.ndarray, results: Sequence[dict], boxes: Sequence[Sequence[float]], skeleton,
               threshold: float = 0.2) -> np.ndarray:
    """A copy of ``image`` (RGB) with the boxes and each result's pose (colour by ``instance``)."""
    canvas = np.ascontiguousarray(image.copy())
    size = max(canvas.shape[:2])
    thick = max(1, int(round(size / 250)))
    for x, y, w, h in boxes:
        cv2.rectangle(canvas, (int(round(x)), int(round(y))), (int(round(x + w)), int(round(y + h))),
                      (170, 170, 170), max(1, thick // 2))
    for r in sorted(results, key=lambda r: -r.get("instance", 0)):  # primaries drawn last, on top
        kp = np.asarray(r["keypoints"], dtype=np.float64).reshape(-1, 3)
        color = INSTANCE_COLORS[r.get("instance", 0) % len(INSTANCE_COLORS)]
        ok = kp[:, 2] > threshold
        for a, b in skeleton:
            if ok[a - 1] and ok[b - 1]:
                cv2.line(canvas, tuple(int(round(v)) for v in kp[a - 1, :2]),
                         tuple(int(round(v)) for v in kp[b - 1, :2]), color, thick, cv2.LINE_AA)
        for x, y in kp[ok, :2]:
            cv2.circle(canvas, (int(round(x)), int(round(y))), thick + 1, color, -1, cv2.LINE_AA)
    return canvas


def run_predict(checkpoint: str, image_path: str, boxes: Sequence[Sequence[float]], *,
                scores: Sequence[float] | None = None, image_id=None, output_png: str | None = None,
                output_json: str | None = None, nms: bool = True, device: str = "auto",
                threshold: float | None = None) -> list[dict]:
    """Load ``checkpoint``, predict every instance of ``boxes`` on the image, write PNG and JSON."""
    model, cfg, _ = load_trained(checkpoint, resolve_device(device))
    kind = "coco" if cfg.data.kind == "synthetic" else cfg.data.kind
    spec = keypoint_spec(kind)
    if spec.num_joints != model.num_keypoints:
        raise ValueError(f"the checkpoint predicts {model.num_keypoints} keypoints, data.kind={kind!r} has "
                         f"{spec.num_joints}")
    image = read_image_rgb(image_path)
    stem = Path(image_path).stem
    if image_id is None:
        image_id = int(stem) if stem.isdigit() else 0
    e = cfg.eval
    preds = predict_boxes(model, image, boxes, spec, cfg.data.input_size, cfg.data.heatmap_size, scores,
                          int(image_id), e.flip_test, e.decode, e.amp)
    results = postprocess(preds, None, sigmas=spec.sigmas, in_vis_threshold=e.in_vis_threshold,
                          oks_threshold=e.oks_threshold, secondary_score_decay=e.secondary_score_decay, nms=nms,
                          with_source=True)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    for r in results:
        r["box_index"] = r.pop("crop")
        r["box"] = [round(float(v), 2) for v in boxes[r["box_index"]]]
    output_png = output_png or f"{stem}_poses.png"
    output_json = output_json or f"{stem}_poses.json"
    for path in (output_png, output_json):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    drawn = draw_poses(image, results, boxes, spec.skeleton, e.in_vis_threshold if threshold is None else threshold)
    if not cv2.imwrite(str(output_png), cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR)):
        raise ValueError(f"--output-png {output_png!r} cannot be written (use a .png path)")
    Path(output_json).write_text(json.dumps(results))
    return results


# ------------------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint of mipnet train (or mipnet demo)")
    parser.add_argument("--image", required=True, help="the image (any format OpenCV reads)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--box", action="append", metavar="X,Y,W,H", help="a person box (repeatable)")
    source.add_argument("--boxes", help="COCO detection results JSON with the person boxes")
    parser.add_argument("--image-id", help="which image of --boxes (default: its only one); the results' image_id")
    parser.add_argument("--score-threshold", type=float, default=0.0, help="keep --boxes with score >= this")
    parser.add_argument("--output-png", help="drawn poses (default: <image stem>_poses.png)")
    parser.add_argument("--output-json", help="COCO keypoint results (default: <image stem>_poses.json)")
    parser.add_argument("--no-nms", action="store_true", help="keep every instance of every box (no OKS-NMS)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    parser.add_argument("--threads", type=int, help="CPU intra-op threads")


def run(args: argparse.Namespace) -> int:
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    set_threads(args.threads)
    image_id = args.image_id
    if args.box:
        boxes, scores = [parse_box(b) for b in args.box], None
    else:
        dets, image_id = boxes_from_detections(args.boxes, image_id, args.score_threshold)
        boxes, scores = [d["bbox"] for d in dets], [d["score"] for d in dets]
    if image_id is not None:
        try:
            image_id = int(image_id)
        except (TypeError, ValueError):
            raise ValueError(f"--image-id must be an integer image id, got {image_id!r}") from None
    results = run_predict(args.checkpoint, args.image, boxes, scores=scores, image_id=image_id,
                          output_png=args.output_png, output_json=args.output_json, nms=not args.no_nms,
                          device=args.device)
    stem = Path(args.image).stem
    png, js = args.output_png or f"{stem}_poses.png", args.output_json or f"{stem}_poses.json"
    by_instance = np.bincount([r["instance"] for r in results]).tolist() if results else []
    print(f"{len(boxes)} boxes -> {len(results)} poses (per instance: {by_instance}); wrote {png} and {js}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mipnet.predict", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
