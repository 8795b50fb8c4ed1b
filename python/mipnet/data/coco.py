"""COCO-format top-down keypoint datasets: COCO (17 joints), CrowdPose (14), OCHuman (17).

:class:`KeypointDataset` reads an annotation file with pycocotools and an image folder and
yields one sample per person box — ground-truth boxes, or a detector's boxes from a COCO
results JSON (``[{"image_id", "bbox": [x, y, w, h], "score", "category_id"}, ...]``).

Each sample is a dict (collates with the default ``DataLoader`` collate)::

    image          float32 [3, H, W]   RGB, ImageNet mean/std
    target         float32 [N, K, h, w] Gaussian heatmaps of the N instances (Eq. 1)
    target_weight  float32 [N, K]      1 = labelled and inside the crop
    meta           dict of tensors / numbers:
        image_id, annotation_id (-1 for detection boxes), box [4] (the box cropped: GT
        boxes clipped to the image as HRNet does), score (1 for GT), area (annotation area;
        box w·h where the file has none, and for detections), center [2], scale [2] and
        rotation (the crop actually taken, image pixels / pixel_std units / degrees),
        flipped, crop_to_image [2, 3] and heatmap_to_image [2, 3] (float64; the latter is
        ``decode_heatmaps``' ``affine``), crowd_index (CrowdPose's per-image value, -1
        elsewhere), instance_ids [N] (annotation ids behind each instance; fallbacks
        repeat the primary's), joints [N, K, 3] (crop pixels, third column = target weight).

With detection boxes there are no targets to build (the heatmaps are zero, the weights 0
and instance_ids -1); such datasets are for inference and evaluation.

Determinism: augmentation of sample ``i`` draws from ``numpy.random.default_rng((seed,
epoch, i))``, so it is reproducible and independent of DataLoader workers; call
:meth:`KeypointDataset.set_epoch` each epoch for fresh draws.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from mipnet_kernels.keypoints import COCO_FLIP_PAIRS, COCO_SIGMAS, CROWDPOSE_FLIP_PAIRS, CROWDPOSE_SIGMAS
from mipnet_kernels.ops.decode import flip_index_from_pairs

from .targets import SELECTIONS, build_targets, default_sigma
from .transforms import (
    AugmentConfig,
    CropParams,
    box_to_center_scale,
    heatmap_to_image_affine,
    invert_affine,
    normalize_image,
    parse_size,
    read_image_rgb,
    sample_augmentation,
    transform_points,
    warp_to_crop,
)


@dataclass(frozen=True)
class KeypointSpec:
    """The joint layout of a dataset kind."""

    keypoint_names: tuple[str, ...]
    skeleton: tuple[tuple[int, int], ...]  # 1-based joint pairs, as in COCO category records
    flip_pairs: tuple[tuple[int, int], ...]
    sigmas: tuple[float, ...]
    upper_body_ids: tuple[int, ...]

    @property
    def num_joints(self) -> int:
        return len(self.keypoint_names)


COCO_KEYPOINT_NAMES = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear",
    "left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
    "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle",
)
COCO_SKELETON = (
    (16, 14), (14, 12), (17, 15), (15, 13), (12, 13), (6, 12), (7, 13), (6, 7), (6, 8),
    (7, 9), (8, 10), (9, 11), (2, 3), (1, 2), (1, 3), (2, 4), (3, 5), (4, 6), (5, 7),
)
CROWDPOSE_KEYPOINT_NAMES = (
    "left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
    "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle", "head", "neck",
)
# CrowdPose files carry COCO's skeleton; this one joins head-neck, neck-shoulders/hips and limbs.
CROWDPOSE_SKELETON = (
    (13, 14), (14, 1), (14, 2), (1, 3), (3, 5), (2, 4), (4, 6), (14, 7), (14, 8),
    (7, 9), (9, 11), (8, 10), (10, 12),
)

_COCO_SPEC = KeypointSpec(COCO_KEYPOINT_NAMES, COCO_SKELETON, COCO_FLIP_PAIRS, COCO_SIGMAS, tuple(range(11)))
DATASET_KINDS: dict[str, KeypointSpec] = {
    "coco": _COCO_SPEC,
    "ochuman": _COCO_SPEC,  # OCHuman ships COCO-17 keypoints
    "crowdpose": KeypointSpec(
        CROWDPOSE_KEYPOINT_NAMES, CROWDPOSE_SKELETON, CROWDPOSE_FLIP_PAIRS, CROWDPOSE_SIGMAS,
        (0, 1, 2, 3, 4, 5, 12, 13),
    ),
}


def keypoint_spec(kind: str) -> KeypointSpec:
    """The :class:`KeypointSpec` of ``"coco"``, ``"crowdpose"`` or ``"ochuman"``."""
    try:
        return DATASET_KINDS[kind]
    except (KeyError, TypeError):
        raise ValueError(f"kind must be one of {sorted(DATASET_KINDS)}, got {kind!r}") from None


# Fields every COCO keypoint file must have, checked before pycocotools (whose failures are
# bare KeyErrors / AssertionErrors naming neither the file nor the entry).
_REQUIRED = {
    "images": ("id", "width", "height", "file_name"),
    "annotations": ("id", "image_id", "bbox", "iscrowd"),
    "categories": ("id",),
}


def check_coco_dict(dataset: Any, source: str) -> None:
    """``ValueError`` naming ``source`` and the entry when ``dataset`` is not a COCO
    keypoint dict: a JSON object with lists ``images``, ``annotations`` and ``categories``
    whose entries have the fields pycocotools and the loaders read (``bbox`` 4 numbers)."""
    if not isinstance(dataset, Mapping):
        raise ValueError(f"{source}: a COCO file is a JSON object with images / annotations / "
                         f"categories, got a JSON {type(dataset).__name__}")
    for section, fields in _REQUIRED.items():
        entries = dataset.get(section)
        if not isinstance(entries, list):
            raise ValueError(f"{source}: missing the {section!r} list")
        for i, entry in enumerate(entries):
            if not isinstance(entry, Mapping):
                raise ValueError(f"{source}: {section}[{i}] is not an object")
            for key in fields:
                if key not in entry:
                    ident = f" (id {entry['id']})" if "id" in entry else ""
                    raise ValueError(f"{source}: {section}[{i}]{ident} has no {key!r}")
            if section == "annotations":
                box = entry["bbox"]
                if not (isinstance(box, (list, tuple)) and len(box) == 4
                        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)):
                    raise ValueError(f"{source}: annotations[{i}] (id {entry['id']}) has bbox {box!r}; "
                                     "expected [x, y, w, h]")


def load_coco(annotations: str | os.PathLike | Mapping[str, Any]):
    """A pycocotools ``COCO`` from a file path or an in-memory COCO dict (quietly), after
    :func:`check_coco_dict`."""
    from pycocotools.coco import COCO

    if isinstance(annotations, Mapping):
        source, dataset = "annotations", annotations
    else:
        path = Path(annotations)
        if not path.is_file():
            raise FileNotFoundError(f"annotation_file {str(path)!r} does not exist")
        source = f"annotation_file {str(path)!r}"
        try:
            dataset = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
            raise ValueError(f"{source} is not a JSON file: {e}") from e
    check_coco_dict(dataset, source)
    coco = COCO()
    coco.dataset = dict(dataset)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def load_detections(path: str | os.PathLike, score_threshold: float = 0.0) -> list[dict]:
    """Person boxes from a COCO results JSON, keeping ``score >= score_threshold`` (category 1 when given)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"boxes file {str(path)!r} does not exist")
    try:
        records = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"boxes file {str(path)!r} is not valid JSON: {e}") from e
    if not isinstance(records, list):
        raise ValueError(f"boxes file {str(path)!r} must hold a JSON list of detections")
    out = []
    for n, r in enumerate(records):
        try:
            image_id, bbox, score = r["image_id"], [float(v) for v in r["bbox"]], float(r["score"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(
                f"boxes file {str(path)!r}: record {n} needs image_id, bbox [x, y, w, h] and score"
            ) from None
        if len(bbox) != 4:
            raise ValueError(f"boxes file {str(path)!r}: record {n} bbox must have 4 numbers")
        if r.get("category_id", 1) != 1 or score < score_threshold or bbox[2] <= 0 or bbox[3] <= 0:
            continue
        out.append({"image_id": image_id, "bbox": bbox, "score": score})
    return out


@dataclass
class _Image:
    """One image and its usable person annotations (the candidates for instances 1…N-1)."""

    image_id: int
    file_name: str
    width: int
    height: int
    crowd_index: float
    ann_ids: np.ndarray  # [M]
    keypoints: np.ndarray  # [M, K, 3] image pixels
    centers: np.ndarray  # [M, 2] of the clipped boxes


@dataclass
class _Sample:
    image: int  # index into KeypointDataset.images
    person: int  # index into that image's people, -1 for a detection box
    box: np.ndarray
    score: float
    area: float


class KeypointDataset(Dataset):
    """Top-down person crops with MIPNet multi-instance targets.

    Args:
        annotation_file: COCO keypoint JSON path (or an in-memory COCO dict).
        image_dir: folder the images' ``file_name`` are relative to.
        kind: ``"coco"``, ``"crowdpose"`` or ``"ochuman"`` (joint layout; checked against
            the file's keypoint count).
        input_size: crop ``(height, width)``, default ``(256, 192)``.
        heatmap_size: ``(h, w)``, default ``input_size / 4``.
        sigma: target σ in heatmap pixels, default 2 at 64×48 / 3 at 96×72.
        num_instances: N >= 1 (1 = a plain top-down model).
        train: apply augmentation (``augment``, default :class:`AugmentConfig`).
        boxes: ``None`` for ground-truth boxes, or the path of a detection results JSON.
        score_threshold: minimum detection score kept.
        selection, min_keypoints: multi-instance rule (:mod:`mipnet.data.targets`).
        seed: augmentation seed (see the module docstring).
    """

    def __init__(
        self,
        annotation_file: str | os.PathLike | Mapping[str, Any],
        image_dir: str | os.PathLike,
        kind: str = "coco",
        *,
        input_size: Sequence[int] = (256, 192),
        heatmap_size: Sequence[int] | None = None,
        sigma: float | None = None,
        num_instances: int = 1,
        train: bool = False,
        augment: AugmentConfig | None = None,
        boxes: str | os.PathLike | None = None,
        score_threshold: float = 0.0,
        selection: str = "paper",
        min_keypoints: int = 3,
        seed: int = 0,
    ):
        self.spec = keypoint_spec(kind)
        self.kind = kind
        if isinstance(num_instances, bool) or not isinstance(num_instances, (int, np.integer)):
            raise TypeError(f"num_instances must be an int, got {type(num_instances).__name__}")
        if num_instances < 1:
            raise ValueError(f"num_instances must be >= 1, got {num_instances}")
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
        if min_keypoints < 0:
            raise ValueError(f"min_keypoints must be >= 0, got {min_keypoints}")
        self.input_size = parse_size(input_size, "input_size")
        H, W = self.input_size
        self.heatmap_size = (
            (H // 4, W // 4) if heatmap_size is None else parse_size(heatmap_size, "heatmap_size")
        )
        self.sigma = default_sigma(self.heatmap_size) if sigma is None else float(sigma)
        if not self.sigma > 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        self.aspect_ratio = W / H
        self.num_instances = int(num_instances)
        self.train = bool(train)
        self.augment = (augment or AugmentConfig()) if self.train else None
        self.selection = selection
        self.min_keypoints = int(min_keypoints)
        self.seed = int(seed)
        self.epoch = 0
        self.image_dir = Path(image_dir)
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"image_dir {str(self.image_dir)!r} is not a directory")
        self.annotation_file = annotation_file if isinstance(annotation_file, Mapping) else Path(annotation_file)
        self.use_gt_boxes = boxes is None
        self._flip_index = np.asarray(flip_index_from_pairs(self.spec.flip_pairs, self.spec.num_joints))

        coco = load_coco(annotation_file)
        self.images, gt_samples = self._index(coco)
        if self.use_gt_boxes:
            self.samples = gt_samples
        else:
            self.samples = self._detection_samples(load_detections(boxes, score_threshold))

    # ------------------------------------------------------------------ loading
    def _index(self, coco) -> tuple[list[_Image], list[_Sample]]:
        K = self.spec.num_joints
        for cat in coco.loadCats(coco.getCatIds()):
            n = len(cat.get("keypoints", []))
            if n and n != K:
                raise ValueError(
                    f"annotation_file has {n} keypoints per person but kind={self.kind!r} expects {K}"
                )
        images, samples = [], []
        for image_id in sorted(coco.getImgIds()):
            info = coco.imgs[image_id]
            width, height = int(info["width"]), int(info["height"])
            ann_ids, kps, centers = [], [], []
            for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=False)):
                if ann.get("category_id", 1) != 1:
                    continue
                kp = np.asarray(ann.get("keypoints", []), dtype=np.float64)
                if kp.size != 3 * K:
                    raise ValueError(
                        f"annotation {ann.get('id')} has {kp.size // 3} keypoints, kind={self.kind!r} expects {K}"
                    )
                kp = kp.reshape(K, 3)
                if not (kp[:, 2] > 0).any():
                    continue
                box = _clip_box(ann["bbox"], width, height)  # HRNet's box sanitising
                if box is None:
                    continue
                area = float(ann.get("area", box[2] * box[3]))
                if area <= 0:
                    continue
                person = len(ann_ids)
                ann_ids.append(int(ann["id"]))
                kps.append(kp)
                centers.append(box[:2] + 0.5 * box[2:])
                samples.append(_Sample(len(images), person, box, 1.0, area))
            images.append(
                _Image(
                    image_id=int(image_id),
                    file_name=str(info["file_name"]),
                    width=width,
                    height=height,
                    crowd_index=float(info.get("crowdIndex", -1.0)),
                    ann_ids=np.asarray(ann_ids, dtype=np.int64),
                    keypoints=np.asarray(kps, dtype=np.float64).reshape(-1, K, 3),
                    centers=np.asarray(centers, dtype=np.float64).reshape(-1, 2),
                )
            )
        return images, samples

    def _detection_samples(self, detections: list[dict]) -> list[_Sample]:
        position = {im.image_id: i for i, im in enumerate(self.images)}
        samples = []
        for det in detections:
            if det["image_id"] not in position:
                raise ValueError(
                    f"boxes file has a detection for image_id {det['image_id']!r}, "
                    "which is not in annotation_file"
                )
            box = np.asarray(det["bbox"], dtype=np.float64)
            samples.append(_Sample(position[det["image_id"]], -1, box, det["score"], float(box[2] * box[3])))
        return samples

    # ------------------------------------------------------------------ access
    @property
    def crowd_index(self) -> dict[int, float]:
        """Per image id: CrowdPose's ``crowdIndex`` (-1 where the file has none)."""
        return {im.image_id: im.crowd_index for im in self.images}

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draws of ``epoch`` (the sampler's epoch, as DistributedSampler)."""
        self.epoch = int(epoch)

    def image_path(self, index: int) -> Path:
        return self.image_dir / self.images[self.samples[index].image].file_name

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} is out of range for {len(self)} samples")
        index %= len(self)
        sample = self.samples[index]
        im = self.images[sample.image]
        rgb = read_image_rgb(self.image_dir / im.file_name)
        center, scale = box_to_center_scale(sample.box, self.aspect_ratio)
        crop = CropParams(center=center, scale=scale)
        if self.augment is not None and sample.person >= 0:
            rng = np.random.default_rng((self.seed, self.epoch, index))
            crop = sample_augmentation(
                rng, center, scale, im.keypoints[sample.person], self.augment,
                self.spec.upper_body_ids, self.aspect_ratio,
            )
        image_to_crop = crop.image_to_crop(self.input_size, rgb.shape[1])
        crop_to_image = invert_affine(image_to_crop)
        image = normalize_image(warp_to_crop(rgb, image_to_crop, self.input_size))

        N, K = self.num_instances, self.spec.num_joints
        h, w = self.heatmap_size
        if sample.person >= 0:
            people = im.keypoints.copy()
            people[..., :2] = transform_points(people, image_to_crop)
            if crop.flip:
                people = people[:, self._flip_index]
            target, weight, chosen = build_targets(
                people, im.centers, sample.person, N, self.input_size, self.heatmap_size,
                self.sigma, self.min_keypoints, self.selection,
            )
            joints = np.concatenate([people[chosen, :, :2], weight[..., None]], axis=-1)
            instance_ids = im.ann_ids[chosen]
        else:
            target = np.zeros((N, K, h, w), dtype=np.float32)
            weight = np.zeros((N, K), dtype=np.float32)
            joints = np.zeros((N, K, 3))
            instance_ids = np.full(N, -1, dtype=np.int64)

        meta = {
            "image_id": im.image_id,
            "annotation_id": int(im.ann_ids[sample.person]) if sample.person >= 0 else -1,
            "box": torch.from_numpy(np.asarray(sample.box, dtype=np.float64)),
            "score": float(sample.score),
            "area": float(sample.area),
            "center": torch.from_numpy(np.asarray(crop.center, dtype=np.float64)),
            "scale": torch.from_numpy(np.asarray(crop.scale, dtype=np.float64)),
            "rotation": float(crop.rotation),
            "flipped": bool(crop.flip),
            "crop_to_image": torch.from_numpy(crop_to_image),
            "heatmap_to_image": torch.from_numpy(
                heatmap_to_image_affine(crop_to_image, self.input_size, self.heatmap_size)
            ),
            "crowd_index": im.crowd_index,
            "instance_ids": torch.from_numpy(np.asarray(instance_ids, dtype=np.int64)),
            "joints": torch.from_numpy(joints.astype(np.float32)),
        }
        return {
            "image": image,
            "target": torch.from_numpy(target),
            "target_weight": torch.from_numpy(weight),
            "meta": meta,
        }

    def __repr__(self) -> str:
        boxes = "ground-truth boxes" if self.use_gt_boxes else "detection boxes"
        return (
            f"{type(self).__name__}(kind={self.kind!r}, {len(self)} samples from {len(self.images)} images, "
            f"{boxes}, input={self.input_size}, heatmap={self.heatmap_size}, N={self.num_instances}, "
            f"train={self.train})"
        )


def _clip_box(bbox: Sequence[float], width: int, height: int) -> np.ndarray | None:
    """HRNet's GT box cleaning: clip to the image (inclusive pixel ends); None when empty."""
    x, y, w, h = (float(v) for v in bbox)
    x1, y1 = max(0.0, x), max(0.0, y)
    x2 = min(width - 1.0, x1 + max(0.0, w - 1.0))
    y2 = min(height - 1.0, y1 + max(0.0, h - 1.0))
    if x2 < x1 or y2 < y1:
        return None
    return np.array([x1, y1, x2 - x1, y2 - y1])
