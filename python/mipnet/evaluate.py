"""Evaluation of top-down (multi-instance) pose models with pycocotools (``mipnet eval``).

Pipeline (HRNet's ``validate`` + ``COCODataset.evaluate``, with MIPNet's instance handling):

1. crops of every person box -- ground-truth boxes or a detector's -- by
   :class:`~mipnet.data.KeypointDataset` (the HRNet crop geometry of :mod:`mipnet.data.transforms`);
2. a *batch predictor* maps ``(images [B, 3, H, W], heatmap_to_image [B, 2, 3])`` to image
   coordinates ``[N, B, K, 2]`` and scores ``[N, B, K]`` for all N instances.  Here that is
   :class:`HeatmapPredictor` (``forward_instances``, optional flip test with
   ``mipnet_kernels.flip_merge``, ``decode_heatmaps(affine=...)``); the fast GPU
   ``TopDownPredictor`` can replace it (any callable with that signature);
3. rescoring (HRNet): ``box score × mean of the keypoint scores > in_vis_threshold`` (0 when
   none is), where instances ``n >= 1`` first get ``box score × secondary_score_decay``
   (MIPNet's ``TEST.DECAY_THRE = 0.5``, applied in its ``validate_lambda_quantitative`` to
   every non-primary λ);
4. OKS-NMS per image at ``oks_threshold`` (0.9) with ``mipnet_kernels.oks_nms``, the area of
   each candidate being its crop's ``(scale · 200)²`` product as in HRNet;
5. COCO results JSON and ``COCOeval(iouType="keypoints")``: AP, AP50, AP75, AP_M, AP_L, AR
   (the dataset's sigmas; CrowdPose's 14).  The merged result (all instances) and each
   instance alone are reported, as the paper does.

Splits computed on top of pycocotools:

* CrowdPose AP easy / medium / hard: the images with ``crowdIndex`` < 0.1, in [0.1, 0.8],
  > 0.8 (CrowdPose's definition), each evaluated as its own image subset (``params.imgIds``).
  GT records without ``area`` get ``bbox w·h·0.53``, the area rule of the CrowdPose API
  (xtcocotools ``use_area=False``); the CrowdPose API reports no AP_M / AP_L, ours are
  pycocotools' area ranges.
* AP by occlusion (the demo's buckets): the people of one bucket are scored, everyone else
  becomes an ignore region (``iscrowd=1``): a prediction matching them counts neither way.

Every report says whether the boxes were ground truth or detections.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import io
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from mipnet_kernels import decode_heatmaps, flip_merge

from .data import KeypointDataset
from .config import load_config
from .data.transforms import PIXEL_STD
from .runtime import CHECKPOINT_NAME, autocast, dataset_kwargs, load_trained, resolve_data, resolve_device, set_threads

#: COCOeval.stats indices of the keypoint metrics we report.
METRIC_NAMES = ("AP", "AP50", "AP75", "AP_M", "AP_L", "AR", "AR50", "AR75", "AR_M", "AR_L")
#: CrowdPose's crowd-index split (Li et al., CVPR 2019).
CROWD_SPLITS = (("easy", 0.0, 0.1), ("medium", 0.1, 0.8), ("hard", 0.8, float("inf")))
#: CrowdPose API's area for OKS when a GT record has none: bbox w·h times this.
CROWDPOSE_AREA_FACTOR = 0.53

BatchPredictor = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]

try:  # the batched kernel of mipnet_kernels (HRNet oks_nms semantics)
    from mipnet_kernels import oks_nms
except ImportError:  # pragma: no cover - an old mipnet_kernels without the NMS op
    oks_nms = None


# ------------------------------------------------------------------------------ inference
class HeatmapPredictor:
    """Minimal top-down inference: all N instances of a crop batch in image coordinates.

    Args:
        model: a :class:`~mipnet.models.PoseNet` (``forward_instances``), put in eval mode.
        flip_pairs: the dataset's left/right joint pairs (flip test).
        flip_test: average with the mirrored input's heatmaps (HRNet, shift on).
        decode: ``decode_heatmaps`` mode (``"quarter"``: HRNet's quarter offset).
        amp: ``"none"`` or ``"bf16"``/``"fp16"`` autocast for the network.
    """

    def __init__(self, model: nn.Module, flip_pairs, flip_test: bool = True, decode: str = "quarter",
                 amp: str = "none"):
        self.model = model.eval()
        self.flip_pairs = flip_pairs
        self.flip_test = flip_test
        self.decode = decode
        self.amp = amp
        self.device = next(model.parameters()).device

    def _heatmaps(self, images: Tensor) -> Tensor:
        with torch.no_grad(), autocast(self.device, self.amp):
            return self.model.forward_instances(images).float()  # [N, B, K, h, w]

    def __call__(self, images: Tensor, heatmap_to_image: Tensor) -> tuple[Tensor, Tensor]:
        images = images.to(self.device)
        hm = self._heatmaps(images)
        N, B = hm.shape[:2]
        hm = hm.flatten(0, 1)
        if self.flip_test:
            flipped = self._heatmaps(images.flip(3)).flatten(0, 1)
            hm = flip_merge(hm, flipped, self.flip_pairs, shift=True)
        affine = heatmap_to_image.to(self.device, torch.float32).repeat(N, 1, 1)
        coords, scores = decode_heatmaps(hm, mode=self.decode, affine=affine)
        return coords.unflatten(0, (N, B)), scores.unflatten(0, (N, B))


@dataclass
class Predictions:
    """Every instance of every crop: ``keypoints [S, N, K, 3]`` (image x, y, heatmap score)."""

    keypoints: np.ndarray
    image_ids: np.ndarray  # [S]
    box_scores: np.ndarray  # [S]
    areas: np.ndarray  # [S] (scale · pixel_std)² products of the crops
    annotation_ids: np.ndarray  # [S] (-1 for detection boxes)

    @property
    def num_instances(self) -> int:
        return self.keypoints.shape[1]


def predict(predictor: BatchPredictor, dataset: KeypointDataset, batch_size: int = 64, workers: int = 0,
            progress: bool = False) -> Predictions:
    """Run ``predictor`` over every crop of ``dataset`` (no augmentation)."""
    if dataset.train:
        raise ValueError("dataset must be an evaluation dataset (train=False)")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    if progress:
        from tqdm import tqdm

        loader = tqdm(loader, desc="inference", leave=False, dynamic_ncols=True)
    kps, image_ids, scores, areas, ann_ids = [], [], [], [], []
    for batch in loader:
        meta = batch["meta"]
        coords, conf = predictor(batch["image"], meta["heatmap_to_image"])
        kp = torch.cat([coords, conf[..., None]], dim=-1).transpose(0, 1)  # [B, N, K, 3]
        kps.append(kp.float().cpu().numpy())
        image_ids.append(np.asarray(meta["image_id"]))
        scores.append(np.asarray(meta["score"], dtype=np.float64))
        areas.append(np.prod(np.asarray(meta["scale"]) * PIXEL_STD, axis=-1))
        ann_ids.append(np.asarray(meta["annotation_id"]))
    K = dataset.spec.num_joints
    N = dataset.num_instances
    if not kps:
        empty = np.zeros(0)
        return Predictions(np.zeros((0, N, K, 3), np.float32), empty.astype(np.int64), empty, empty,
                           empty.astype(np.int64))
    return Predictions(np.concatenate(kps), np.concatenate(image_ids), np.concatenate(scores),
                       np.concatenate(areas), np.concatenate(ann_ids))


# ------------------------------------------------------------------------------ post-processing
def rescore(keypoints: np.ndarray, box_scores: np.ndarray, in_vis_threshold: float = 0.2) -> np.ndarray:
    """HRNet's rescoring: ``box score × mean of the keypoint scores > in_vis_threshold`` (0 if none)."""
    s = keypoints[..., 2]
    valid = s > in_vis_threshold
    count = valid.sum(-1)
    mean = np.where(count > 0, (s * valid).sum(-1) / np.maximum(count, 1), 0.0)
    return mean * box_scores


def postprocess(preds: Predictions, instances: Sequence[int] | None = None, *, sigmas,
                in_vis_threshold: float = 0.2, oks_threshold: float = 0.9,
                secondary_score_decay: float = 0.5, nms: bool = True, with_source: bool = False) -> list[dict]:
    """COCO keypoint results of ``instances`` (default all): rescoring, then per-image OKS-NMS.

    ``nms=False`` keeps every instance of every crop; ``with_source`` adds to each result
    the crop it came from (``"crop"``: row of ``preds``) and its ``"instance"``.
    """
    N = preds.num_instances
    instances = list(range(N)) if instances is None else list(instances)
    if any(not 0 <= n < N for n in instances):
        raise ValueError(f"instances must be in [0, {N}), got {instances}")
    S, K = preds.keypoints.shape[0], preds.keypoints.shape[2]
    if S == 0 or not instances:
        return []
    kp = preds.keypoints[:, instances].reshape(-1, K, 3)  # sample-major: [S * n]
    decay = np.where(np.asarray(instances) == 0, 1.0, secondary_score_decay)
    box = (preds.box_scores[:, None] * decay[None, :]).reshape(-1)
    scores = rescore(kp, box, in_vis_threshold)
    areas = np.repeat(preds.areas, len(instances))
    image_ids = np.repeat(preds.image_ids, len(instances))
    uniq, batch_idx = np.unique(image_ids, return_inverse=True)
    if not nms:
        keep = np.arange(len(kp))
    elif oks_nms is None:  # pragma: no cover
        raise RuntimeError("mipnet_kernels.oks_nms is not available; update mipnet_kernels")
    else:
        keep = oks_nms(torch.from_numpy(kp.astype(np.float64)), torch.from_numpy(scores.astype(np.float64)),
                       torch.from_numpy(areas.astype(np.float64)), torch.from_numpy(batch_idx.astype(np.int64)),
                       sigmas=list(sigmas), threshold=oks_threshold).numpy()
    out = [
        {"image_id": int(image_ids[i]), "category_id": 1, "keypoints": np.round(kp[i], 3).reshape(-1).tolist(),
         "score": float(scores[i])}
        for i in keep
    ]
    if with_source:
        for r, i in zip(out, keep):
            r["crop"], r["instance"] = int(i) // len(instances), int(instances[int(i) % len(instances)])
    return out


# ------------------------------------------------------------------------------ pycocotools
def prepare_ground_truth(annotations: Mapping[str, Any] | str | os.PathLike, kind: str = "coco") -> dict:
    """A COCO dict ready for ``COCOeval`` (a deep copy): ``num_keypoints`` and ``iscrowd`` filled
    where missing, ``area`` too (CrowdPose: bbox w·h·0.53; otherwise bbox w·h)."""
    if not isinstance(annotations, Mapping):
        path = Path(annotations)
        if not path.is_file():
            raise FileNotFoundError(f"annotation file {str(path)!r} does not exist")
        annotations = json.loads(path.read_text())
    gt = copy.deepcopy(dict(annotations))
    factor = CROWDPOSE_AREA_FACTOR if kind == "crowdpose" else 1.0
    for ann in gt.get("annotations", []):
        ann.setdefault("iscrowd", 0)
        kp = ann.get("keypoints") or []
        ann.setdefault("num_keypoints", int(sum(1 for v in kp[2::3] if v > 0)))
        if "area" not in ann:
            ann["area"] = float(ann["bbox"][2] * ann["bbox"][3] * factor)
    gt.setdefault("categories", [{"id": 1, "name": "person"}])
    return gt


def _with_ignored(gt: Mapping[str, Any], ignore_annotations: Sequence[int]) -> dict:
    """A copy of ``gt`` whose annotations in ``ignore_annotations`` are ignore regions (iscrowd)."""
    gt = copy.deepcopy(dict(gt))
    ignore = set(int(a) for a in ignore_annotations)
    for ann in gt["annotations"]:
        if ann["id"] in ignore:
            ann["iscrowd"] = 1
    return gt


def _evaluated(gt: dict, results: Sequence[dict], sigmas: np.ndarray, ids: Sequence[int]):
    """pycocotools' ``COCOeval`` (keypoints) of ``results`` on images ``ids`` after ``evaluate()``
    (the per-image matching), quietly; an empty ``results`` is an empty result set."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = COCO()
        if results:
            coco_dt = coco_gt.loadRes(copy.deepcopy(list(results)))
        else:  # loadRes refuses an empty list: an empty result set by hand
            coco_dt.dataset = {"images": gt["images"], "annotations": [], "categories": gt["categories"]}
            coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, "keypoints")
        ev.params.kpt_oks_sigmas = sigmas
        ev.params.imgIds = ids
        ev.evaluate()
    return ev


def coco_keypoint_metrics(gt: Mapping[str, Any], results: Sequence[dict], sigmas,
                          image_ids: Sequence[int] | None = None,
                          ignore_annotations: Sequence[int] = ()) -> dict[str, float]:
    """pycocotools keypoint metrics of ``results`` against ``gt`` (a :func:`prepare_ground_truth` dict).

    ``image_ids`` restricts the evaluation to those images; annotations in
    ``ignore_annotations`` become ignore regions.  Metrics are -1 where pycocotools has
    nothing to average (no GT person), 0 when there are GT people but no results.
    """
    sigmas = np.asarray(sigmas, dtype=np.float64)
    gt = _with_ignored(gt, ignore_annotations)
    ids = sorted({im["id"] for im in gt["images"]} if image_ids is None else {int(i) for i in image_ids})
    results = [r for r in results if r["image_id"] in set(ids)]
    for r in results:
        if len(r["keypoints"]) != 3 * len(sigmas):
            raise ValueError(f"result keypoints have {len(r['keypoints']) // 3} joints, sigmas {len(sigmas)}")
    scored = [a for a in gt["annotations"] if a["image_id"] in set(ids) and not a.get("iscrowd")
              and a.get("num_keypoints", 0) > 0]
    if not ids or not scored:
        return {k: -1.0 for k in METRIC_NAMES}
    if not results:
        return {k: 0.0 for k in METRIC_NAMES}
    ev = _evaluated(gt, results, sigmas, ids)
    with contextlib.redirect_stdout(io.StringIO()):
        ev.accumulate()
        ev.summarize()
    return {k: float(v) for k, v in zip(METRIC_NAMES, ev.stats)}


def crowd_index_splits(gt: Mapping[str, Any]) -> dict[str, list[int]]:
    """CrowdPose's easy / medium / hard image ids by ``crowdIndex`` (images without one are left out)."""
    out: dict[str, list[int]] = {name: [] for name, _, _ in CROWD_SPLITS}
    for im in gt["images"]:
        ci = im.get("crowdIndex")
        if ci is None:
            continue
        for name, lo, hi in CROWD_SPLITS:
            if (lo <= ci < hi) if name != "medium" else (lo <= ci <= hi):
                out[name].append(int(im["id"]))
                break
    return out


def metrics_by_annotation_group(gt: Mapping[str, Any], results: Sequence[dict], sigmas,
                                groups: Mapping[int, str]) -> dict[str, dict[str, float]]:
    """Metrics per group of annotations (annotation id -> group name): each group is scored
    with every other person as an ignore region."""
    names = list(dict.fromkeys(groups.values()))
    all_ids = [a["id"] for a in gt["annotations"]]
    return {
        name: coco_keypoint_metrics(gt, results, sigmas,
                                    ignore_annotations=[i for i in all_ids if groups.get(i) != name])
        for name in names
    }


def full_report(gt: Mapping[str, Any], results: Sequence[dict], sigmas, kind: str) -> dict:
    """AP/AR of ``results``; for CrowdPose also AP easy / medium / hard."""
    report = coco_keypoint_metrics(gt, results, sigmas)
    if kind == "crowdpose":
        for name, ids in crowd_index_splits(gt).items():
            report[f"AP_{name}"] = coco_keypoint_metrics(gt, results, sigmas, image_ids=ids)["AP"] if ids else -1.0
    return report


# ------------------------------------------------------------------------------ reduced boxes
def subset_predictions(preds: Predictions, keep_annotation_ids) -> Predictions:
    """The crops of ``preds`` whose ground-truth annotation id is in ``keep_annotation_ids``.

    A crop's predictions do not depend on the other boxes of its image, so evaluating with
    fewer ground-truth boxes needs no new inference: the kept crops' rows, then
    :func:`postprocess` and the metrics against *all* people of the ground truth.
    """
    keep = np.isin(preds.annotation_ids, np.fromiter((int(a) for a in keep_annotation_ids), dtype=np.int64))
    return Predictions(preds.keypoints[keep], preds.image_ids[keep], preds.box_scores[keep], preds.areas[keep],
                       preds.annotation_ids[keep])


def random_box_draw(annotation_ids, seed: int = 0) -> dict[int, float]:
    """One uniform number per annotation id (ids sorted, ``numpy.random.default_rng(seed)``).

    :func:`keep_random_boxes` keeps the ids whose number is below the fraction, so the
    kept sets of one draw are nested (everything kept at 0.5 is kept at 0.75) and every
    model evaluated with the same ``seed`` loses the very same boxes.
    """
    ids = sorted({int(a) for a in annotation_ids})
    return dict(zip(ids, np.random.default_rng(seed).random(len(ids)).tolist()))


def keep_random_boxes(annotation_ids, fraction: float, seed: int = 0) -> set[int]:
    """The annotation ids whose box is kept when each is kept with probability ``fraction``."""
    if not 0.0 <= float(fraction) <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    return {a for a, u in random_box_draw(annotation_ids, seed).items() if u < fraction}


def occlusion_degree(ann: Mapping[str, Any]) -> float:
    """How occluded a person is, in [0, 1]: ``1 - visible_area / area`` when the annotation has
    ``visible_area`` (the synthetic crowd's pixels not covered by people drawn later),
    otherwise the fraction of its labelled keypoints marked occluded (``v = 1``)."""
    if "visible_area" in ann and ann.get("area", 0) > 0:
        return float(min(1.0, max(0.0, 1.0 - ann["visible_area"] / ann["area"])))
    v = np.asarray(ann.get("keypoints") or [], dtype=np.float64)[2::3]
    labelled = int((v > 0).sum())
    return float((v == 1).sum() / labelled) if labelled else 0.0


def occluded_dropped(gt: Mapping[str, Any], iou_threshold: float = 0.3) -> set[int]:
    """Annotation ids a detector misses in the paper's story: in every pair of people of an
    image whose boxes overlap with IoU > ``iou_threshold``, the box of the more occluded one
    (:func:`occlusion_degree`; a tie drops the later annotation id).  Crowd regions are
    neither dropped nor counted."""
    from .data.synthetic import box_iou

    by_image: dict[Any, list[Mapping[str, Any]]] = {}
    for ann in gt["annotations"]:
        if not ann.get("iscrowd", 0):
            by_image.setdefault(ann["image_id"], []).append(ann)
    dropped: set[int] = set()
    for anns in by_image.values():
        if len(anns) < 2:
            continue
        iou = box_iou([a["bbox"] for a in anns], [a["bbox"] for a in anns])
        degree = [occlusion_degree(a) for a in anns]
        for i in range(len(anns)):
            for j in range(i + 1, len(anns)):
                if iou[i, j] > iou_threshold:
                    a, b = (i, j) if (degree[i], anns[i]["id"]) > (degree[j], anns[j]["id"]) else (j, i)
                    dropped.add(int(anns[a]["id"]))
    return dropped


# ------------------------------------------------------------------------------ bootstrap
@dataclass
class ImageMatches:
    """pycocotools' per-image matching of one evaluation (``COCOeval.evaluate``, area "all",
    the last ``maxDets``): what ``accumulate`` needs, flattened over images.

    ``scores [D]``, ``tp`` / ``fp [T, D]`` (matched / unmatched, neither when ignored) of the
    detections in image order, ``det_image [D]`` their image's position in ``image_ids``,
    and ``num_gt [I]`` each image's non-ignored ground truth.
    """

    image_ids: np.ndarray
    scores: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    det_image: np.ndarray
    num_gt: np.ndarray
    rec_thresholds: np.ndarray

    def __post_init__(self):
        # one stable sort by score of all detections (image order among equal scores, as the
        # concatenation pycocotools sorts); a resample only re-weights them
        self._order = np.argsort(-self.scores, kind="mergesort")
        self._sorted_image = self.det_image[self._order]
        self._sorted_tp = self.tp[:, self._order].astype(np.float64)
        self._sorted_fp = self.fp[:, self._order].astype(np.float64)

    def average_precision(self, sample: np.ndarray | None = None) -> float:
        """COCO AP (mean precision over the IoU-threshold × recall-threshold grid) of the image
        multiset ``sample`` (positions into ``image_ids``, repeats allowed; default all once).

        What ``COCOeval.accumulate`` + ``summarize`` give for those images, a repeated image
        counting as a distinct copy.  Each detection is weighted by how often its image was
        drawn: the copies of one detection are adjacent in pycocotools' score order, and
        collapsing a run of identical true (false) positives into one weighted step leaves the
        interpolated precision at every recall threshold unchanged, so the result is exact --
        except that detections of *different* images with exactly equal scores keep their
        image order instead of the draw order.  -1 when no person is scored.
        """
        I = len(self.image_ids)
        counts = np.ones((1, I)) if sample is None else \
            np.bincount(np.asarray(sample, dtype=np.int64), minlength=I)[None].astype(np.float64)
        return float(self._average_precisions(counts)[0])

    def average_precisions(self, samples: np.ndarray) -> np.ndarray:
        """:meth:`average_precision` of each row of ``samples [B, I']`` (image positions)."""
        samples = np.asarray(samples, dtype=np.int64).reshape(len(samples), -1)
        I = len(self.image_ids)
        # one resample at a time: batching them measured slower (memory-bound [B, T, D] arrays)
        return np.array([self._average_precisions(np.bincount(row, minlength=I)[None].astype(np.float64))[0]
                         for row in samples])

    def _average_precisions(self, counts: np.ndarray) -> np.ndarray:
        """AP for each row of image weights ``counts [B, I]``."""
        npig = counts @ self.num_gt  # [B]
        T, D, R = self.tp.shape[0], len(self._order), len(self.rec_thresholds)
        ap = np.where(npig > 0, 0.0, -1.0)
        if D == 0:
            return ap
        w = counts[:, self._sorted_image][:, None, :]  # [B, 1, D]
        tp = np.cumsum(self._sorted_tp[None] * w, axis=2)  # [B, T, D]
        fp = np.cumsum(self._sorted_fp[None] * w, axis=2)
        rc = tp / np.maximum(npig, 1)[:, None, None]
        pr = tp / (fp + tp + np.spacing(1))
        pr = np.flip(np.maximum.accumulate(np.flip(pr, 2), axis=2), 2)  # precision envelope
        for b in np.flatnonzero(npig > 0):
            q = np.zeros((T, R))
            for t in range(T):
                inds = np.searchsorted(rc[b, t], self.rec_thresholds, side="left")
                ok = inds < D
                q[t, ok] = pr[b, t, inds[ok]]
            ap[b] = q.mean()
        return ap


def image_matches(gt: Mapping[str, Any], results: Sequence[dict], sigmas,
                  ignore_annotations: Sequence[int] = ()) -> ImageMatches:
    """Run pycocotools' per-image matching once (:class:`ImageMatches`), e.g. to bootstrap AP
    over images without re-running ``COCOeval``.  Arguments as :func:`coco_keypoint_metrics`
    (every image of ``gt``)."""
    sigmas = np.asarray(sigmas, dtype=np.float64)
    gt = _with_ignored(gt, ignore_annotations)
    ids = sorted(im["id"] for im in gt["images"])
    ev = _evaluated(gt, results, sigmas, ids)
    p = ev.params
    T, A, I = len(p.iouThrs), len(p.areaRng), len(p.imgIds)
    max_det = p.maxDets[-1]
    all_area = [tuple(a) for a in p.areaRng].index(tuple(p.areaRng[0]))  # "all" comes first
    scores, tps, fps, det_image = [], [], [], []
    num_gt = np.zeros(I, dtype=np.int64)
    for k in range(len(p.catIds)):
        for i in range(I):
            e = ev.evalImgs[k * A * I + all_area * I + i]
            if e is None:
                continue
            s = np.asarray(e["dtScores"][:max_det], dtype=np.float64)
            m = np.asarray(e["dtMatches"][:, :max_det]) != 0
            ig = np.asarray(e["dtIgnore"][:, :max_det], dtype=bool)
            scores.append(s)
            tps.append(m & ~ig)
            fps.append(~m & ~ig)
            det_image.append(np.full(len(s), i, dtype=np.int64))
            num_gt[i] += int(np.count_nonzero(np.asarray(e["gtIgnore"]) == 0))
    cat = (lambda xs, shape: np.concatenate(xs, axis=-1) if xs else np.zeros(shape))
    return ImageMatches(np.asarray(ids), cat(scores, (0,)), cat(tps, (T, 0)).astype(bool),
                        cat(fps, (T, 0)).astype(bool), cat(det_image, (0,)).astype(np.int64), num_gt,
                        np.asarray(p.recThrs, dtype=np.float64))


def bootstrap_difference(a: ImageMatches, b: ImageMatches, resamples: int = 1000, seed: int = 0,
                         level: float = 0.95) -> dict[str, Any]:
    """AP(b) − AP(a) on the whole image set and its percentile bootstrap interval over images.

    Each resample draws the images with replacement (``numpy.random.default_rng(seed)``) and
    scores *both* evaluations on that same multiset (a paired bootstrap); resamples where
    no person is scored are skipped.  Returns ``{"diff", "ci95": [lo, hi], "resamples"}``
    (the key says 95 whatever ``level`` is only when ``level`` is 0.95; otherwise ``"ci"``).
    """
    if list(a.image_ids) != list(b.image_ids):
        raise ValueError("a and b must be evaluations of the same images")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    I = len(a.image_ids)
    samples = np.random.default_rng(seed).integers(0, I, size=(int(resamples), I))
    ap_a, ap_b = a.average_precisions(samples), b.average_precisions(samples)
    ok = (ap_a >= 0) & (ap_b >= 0)
    diffs = (ap_b - ap_a)[ok]
    ap_a, ap_b = a.average_precision(), b.average_precision()
    lo, hi = (np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2]).tolist() if len(diffs) else [float("nan")] * 2)
    key = "ci95" if abs(level - 0.95) < 1e-12 else "ci"
    return {"diff": ap_b - ap_a if ap_a >= 0 and ap_b >= 0 else float("nan"), key: [lo, hi],
            "resamples": len(diffs)}


# ------------------------------------------------------------------------------ driver
@dataclass
class EvalResult:
    report: dict  # what metrics.json holds
    predictions: Predictions  # every instance of every crop, before post-processing
    results: list[dict]  # merged COCO results (after NMS)


@dataclass
class EvalSettings:
    flip_test: bool = True
    decode: str = "quarter"
    in_vis_threshold: float = 0.2
    oks_threshold: float = 0.9
    secondary_score_decay: float = 0.5
    batch_size: int = 64
    workers: int = 0
    amp: str = "none"
    progress: bool = False


def evaluate_model(model: nn.Module, dataset: KeypointDataset, settings: EvalSettings = EvalSettings(),
                   output_dir: str | os.PathLike | None = None, predictor: BatchPredictor | None = None,
                   annotation_groups: Mapping[int, str] | None = None) -> EvalResult:
    """Evaluate ``model`` on ``dataset`` (GT or detection boxes, ``train=False``).

    The report has merged and per-instance metrics, the boxes used and timings (and metrics
    per annotation group when ``annotation_groups`` is given); with ``output_dir`` it writes
    ``results.json`` (merged COCO results), ``results_instance<n>.json`` and ``metrics.json``.
    """
    start = time.perf_counter()
    spec = dataset.spec
    predictor = predictor or HeatmapPredictor(model, spec.flip_pairs, settings.flip_test, settings.decode,
                                              settings.amp)
    preds = predict(predictor, dataset, settings.batch_size, settings.workers, settings.progress)
    inference_s = time.perf_counter() - start
    gt = prepare_ground_truth(dataset.annotation_file, dataset.kind)
    post = dict(sigmas=spec.sigmas, in_vis_threshold=settings.in_vis_threshold,
                oks_threshold=settings.oks_threshold, secondary_score_decay=settings.secondary_score_decay)
    merged = postprocess(preds, None, **post)
    per_instance = {str(n): postprocess(preds, [n], **post) for n in range(preds.num_instances)}
    boxes = "ground truth" if dataset.use_gt_boxes else "detections"
    report: dict[str, Any] = {
        "boxes": boxes,
        "kind": dataset.kind,
        "num_instances": preds.num_instances,
        "num_crops": int(preds.keypoints.shape[0]),
        "settings": {k: getattr(settings, k) for k in ("flip_test", "decode", "in_vis_threshold",
                                                      "oks_threshold", "secondary_score_decay")},
        "nms": "mipnet_kernels.oks_nms",
        "merged": full_report(gt, merged, spec.sigmas, dataset.kind),
        "per_instance": {n: full_report(gt, r, spec.sigmas, dataset.kind) for n, r in per_instance.items()},
    }
    if annotation_groups is not None:
        report["merged_by_group"] = metrics_by_annotation_group(gt, merged, spec.sigmas, annotation_groups)
    report["inference_seconds"] = inference_s
    report["seconds"] = time.perf_counter() - start
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(merged))
        for n, r in per_instance.items():
            (out / f"results_instance{n}.json").write_text(json.dumps(r))
        (out / "metrics.json").write_text(json.dumps(report, indent=2))
    return EvalResult(report, preds, merged)


def format_report(report: Mapping[str, Any]) -> str:
    """A short table: merged and per-instance AP/AR (and CrowdPose splits), with the boxes used."""
    keys = [k for k in ("AP", "AP50", "AP75", "AP_M", "AP_L", "AR", "AP_easy", "AP_medium", "AP_hard")
            if k in report["merged"]]
    rows = [("merged", report["merged"])] + [(f"λ={n}", m) for n, m in report["per_instance"].items()]
    lines = [f"{report['kind']} keypoints on {report['boxes']} boxes, N={report['num_instances']}, "
             f"{report['num_crops']} crops",
             f"{'':>8} " + " ".join(f"{k:>9}" for k in keys)]
    lines += [f"{name:>8} " + " ".join(f"{m[k]:9.4f}" for k in keys) for name, m in rows]
    return "\n".join(lines)


def eval_dataset(cfg, files=None) -> KeypointDataset:
    """The evaluation dataset of a :class:`~mipnet.config.Config` (GT boxes unless ``data.val_boxes``)."""
    files = files or resolve_data(cfg)
    return KeypointDataset(files.val_annotations, files.val_images, files.kind, train=False,
                           boxes=files.val_boxes, **dataset_kwargs(cfg))


def run(args: argparse.Namespace) -> int:
    user_cfg = load_config(args.config, args.overrides) if args.config or args.overrides else None
    ckpt = args.checkpoint or (user_cfg.eval.checkpoint if user_cfg else None)
    if ckpt is None:
        base = user_cfg or load_config()
        ckpt = str(Path(base.train.output_dir) / CHECKPOINT_NAME)
    device = resolve_device(user_cfg.train.device if user_cfg else "auto")
    model, trained_cfg, _ = load_trained(ckpt, device)
    # The data/eval sections of the command line win; the model -- and the crop geometry it
    # was trained for -- are what the checkpoint holds.
    cfg = trained_cfg
    if user_cfg is not None:
        geometry = {k: getattr(trained_cfg.data, k) for k in ("input_size", "heatmap_size", "sigma")}
        cfg = dataclasses.replace(user_cfg, model=trained_cfg.model,
                                  data=dataclasses.replace(user_cfg.data, **geometry))
    if args.boxes:
        cfg.data.val_boxes = args.boxes
    cfg.validate(need_val_data=True)
    set_threads(cfg.train.threads)
    e = cfg.eval
    dataset = eval_dataset(cfg)
    if dataset.spec.num_joints != model.num_keypoints:
        raise ValueError(f"the checkpoint predicts {model.num_keypoints} keypoints but data.kind="
                         f"{dataset.kind!r} has {dataset.spec.num_joints}")
    settings = EvalSettings(e.flip_test, e.decode, e.in_vis_threshold, e.oks_threshold, e.secondary_score_decay,
                            e.batch_size, cfg.data.workers, e.amp, progress=True)
    out = args.output_dir or e.output_dir or str(Path(cfg.train.output_dir) / "eval")
    report = evaluate_model(model, dataset, settings, out).report
    print(format_report(report))
    print(f"wrote {out}/results.json and {out}/metrics.json", file=sys.stderr)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="YAML config (its data and eval sections are used)")
    parser.add_argument("--checkpoint", help="checkpoint of mipnet train (default: train.output_dir/checkpoint.pth)")
    parser.add_argument("--boxes", help="detection results JSON (default: ground-truth boxes)")
    parser.add_argument("--output-dir", help="where results.json and metrics.json go")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. eval.flip_test=false")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mipnet.evaluate", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
