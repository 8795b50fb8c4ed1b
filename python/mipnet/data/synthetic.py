"""Synthetic crowds: articulated figures in controlled occlusion, with COCO keypoint annotations.

The embedded default dataset of every ``mipnet`` command: it needs no download, runs at any
image size and is deterministic by seed, and it contains exactly what MIPNet is about —
people whose boxes overlap, one drawn over the other.

Scene model (per image, all drawing with OpenCV):

* **background**: a smooth random colour field (a few random colours upsampled bicubically),
  random clutter (rectangles, discs, lines) and per-pixel noise over the finished image;
* **people**: COCO-17 figures built from joint angles — torso lean, yaw (shoulder/hip width
  foreshortened by ``cos(yaw)``; a quarter face away, which swaps left/right on screen),
  per-arm shoulder and elbow angles, per-leg hip and knee angles, head tilt, limb-length
  foreshortening and body proportions all sampled; drawn as thick limbs (sleeves/trousers or
  skin, per-limb colour jitter), a torso polygon, and a head ellipse with hair and eyes;
* **groups**: people come in groups of 1-4 (default 15 / 55 / 20 / 10 %); each newcomer is
  placed against a random earlier member of its group at a target box IoU drawn uniformly
  from ``iou_range`` (default 0-0.9; bisection along a random, mostly horizontal direction),
  so pairs span the whole range of the <0.3 / 0.3-0.5 / >0.5 occlusion buckets; the draw
  order within a group is random and later people are drawn over earlier ones;
* **annotations**: COCO format; ``bbox`` and ``area`` are those of the person's whole drawn
  figure (amodal, clipped to the image); a keypoint outside the image is ``(0, 0, 0)``, one
  under a person drawn later (or a face keypoint of a figure facing away) ``v = 1``, any
  other ``v = 2``; ``visible_area`` counts the figure's pixels not covered by people drawn
  later (``1 - visible_area / area`` is how occluded it is).  Annotations carry no ``segmentation``.

:func:`generate` renders ``num_images`` scenes, in memory or to ``out_dir`` (images plus
``annotations.json``); image ``i`` depends only on ``(seed, i)``.  :func:`nearest_person_iou`
gives each annotation's box IoU with its most-overlapping neighbour (any COCO dict), and
:func:`iou_bucket` maps it to the demo's occlusion buckets.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import cv2
import numpy as np

from .coco import COCO_KEYPOINT_NAMES, COCO_SKELETON, KeypointDataset
from .transforms import parse_size

IOU_BUCKETS: tuple[tuple[str, float, float], ...] = (
    ("<0.3", 0.0, 0.3),
    ("0.3-0.5", 0.3, 0.5),
    (">0.5", 0.5, math.inf),
)
DEFAULT_GROUP_SIZES: Mapping[int, float] = {1: 0.15, 2: 0.55, 3: 0.20, 4: 0.10}
#: Bumped whenever the output of :func:`generate` changes (2: ``visible_area``), so caches of
#: rendered crowds can be keyed by it.
GENERATOR_VERSION = 2
IMAGE_FORMATS = ("jpg", "png")

# Joint indices (COCO order).
NOSE, L_EYE, R_EYE, L_EAR, R_EAR = 0, 1, 2, 3, 4
L_SHO, R_SHO, L_ELB, R_ELB, L_WRI, R_WRI = 5, 6, 7, 8, 9, 10
L_HIP, R_HIP, L_KNE, R_KNE, L_ANK, R_ANK = 11, 12, 13, 14, 15, 16
FACE = (NOSE, L_EYE, R_EYE)

_SKIN_TONES = np.array(
    [(255, 219, 172), (241, 194, 125), (224, 172, 105), (198, 134, 66), (141, 85, 36), (92, 58, 33)],
    dtype=np.float64,
)
_SHIFT = 4  # OpenCV sub-pixel drawing: coordinates in 1/16 px
_ONE = 1 << _SHIFT


def iou_bucket(iou: float) -> str:
    """Name of the occlusion bucket (``"<0.3"``, ``"0.3-0.5"``, ``">0.5"``) of a nearest-person IoU."""
    for name, lo, hi in IOU_BUCKETS:
        if lo <= iou < hi:
            return name
    raise ValueError(f"iou must be >= 0, got {iou}")


def box_iou(a, b) -> np.ndarray:
    """Pairwise IoU ``[A, B]`` of ``[A, 4]`` and ``[B, 4]`` boxes ``[x, y, w, h]``."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    ix = np.minimum(a[:, None, 0] + a[:, None, 2], b[None, :, 0] + b[None, :, 2]) - np.maximum(
        a[:, None, 0], b[None, :, 0]
    )
    iy = np.minimum(a[:, None, 1] + a[:, None, 3], b[None, :, 1] + b[None, :, 3]) - np.maximum(
        a[:, None, 1], b[None, :, 1]
    )
    inter = np.clip(ix, 0, None) * np.clip(iy, 0, None)
    union = (a[:, 2] * a[:, 3])[:, None] + (b[:, 2] * b[:, 3])[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def nearest_person_iou(coco: Mapping[str, Any]) -> dict[int, float]:
    """For every annotation id: the highest box IoU with another person of its image (0 when alone).

    Works on any COCO dict (``{"annotations": [...]}``); crowd regions (``iscrowd=1``) are
    neither measured nor counted as neighbours.
    """
    by_image: dict[Any, list[dict]] = {}
    for ann in coco["annotations"]:
        if not ann.get("iscrowd", 0):
            by_image.setdefault(ann["image_id"], []).append(ann)
    out: dict[int, float] = {}
    for anns in by_image.values():
        iou = box_iou([a["bbox"] for a in anns], [a["bbox"] for a in anns])
        np.fill_diagonal(iou, 0.0)
        for a, row in zip(anns, iou):
            out[a["id"]] = float(row.max()) if len(anns) > 1 else 0.0
    return out


# ---------------------------------------------------------------------------- figures
@dataclass
class _Figure:
    """One person: joint positions (local units, pelvis at the origin) and how to draw it."""

    joints: np.ndarray  # [17, 2]
    head_center: np.ndarray
    head_axes: tuple[float, float]
    head_angle: float  # degrees
    facing_away: bool
    widths: dict[str, float]
    colors: dict[str, tuple[float, float, float]]
    hair_fraction: float

    def transformed(self, scale: float, offset: np.ndarray) -> "_Figure":
        return _Figure(
            joints=self.joints * scale + offset,
            head_center=self.head_center * scale + offset,
            head_axes=(self.head_axes[0] * scale, self.head_axes[1] * scale),
            head_angle=self.head_angle,
            facing_away=self.facing_away,
            widths={k: v * scale for k, v in self.widths.items()},
            colors=self.colors,
            hair_fraction=self.hair_fraction,
        )

    def extent(self) -> np.ndarray:
        """Analytic box ``[x0, y0, x1, y1]`` of the drawn figure (joints ± half limb width, head)."""
        pad = 0.5 * max(self.widths.values())
        lo = self.joints.min(axis=0) - pad
        hi = self.joints.max(axis=0) + pad
        r = max(self.head_axes)
        lo = np.minimum(lo, self.head_center - r)
        hi = np.maximum(hi, self.head_center + r)
        return np.concatenate([lo, hi])


def _unit(deg: float) -> np.ndarray:
    """Direction at ``deg`` degrees from straight down (+y), turning towards +x."""
    a = math.radians(deg)
    return np.array([math.sin(a), math.cos(a)])


def _jitter_color(rng: np.random.Generator, base, amount: float = 18.0) -> tuple[float, float, float]:
    return tuple(float(v) for v in np.clip(np.asarray(base) + rng.uniform(-amount, amount, 3), 0, 255))


def _random_color(rng: np.random.Generator) -> np.ndarray:
    hsv = np.array([[[rng.integers(0, 180), rng.integers(40, 256), rng.integers(40, 256)]]], dtype=np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float64)


def _sample_figure(rng: np.random.Generator) -> _Figure:
    """A person of height ~1 with sampled proportions, pose and appearance (pelvis at the origin)."""
    prop = rng.uniform(0.9, 1.1, size=8)
    torso, shoulder, hip = 0.30 * prop[0], 0.11 * prop[1], 0.075 * prop[2]
    upper_arm, forearm = 0.17 * prop[3], 0.15 * prop[3] * prop[4]
    thigh, shin = 0.24 * prop[5], 0.23 * prop[5] * prop[6]
    head_a, head_b, neck = 0.05 * prop[7], 0.065 * prop[7], 0.035

    lean = float(np.clip(rng.normal(0.0, 10.0), -30, 30))
    if rng.random() < 0.1:
        lean = float(rng.uniform(-60, 60))  # bending
    up, right = -_unit(lean), _unit(lean + 90.0)  # torso axis and its perpendicular (towards +x)
    yaw = float(rng.uniform(-70, 70))
    width_factor = math.cos(math.radians(yaw))
    facing_away = bool(rng.random() < 0.25)
    side = -1.0 if facing_away else 1.0  # +1: the person's left appears on the image's right

    J = np.zeros((17, 2))
    neck_base = torso * up
    J[L_SHO] = neck_base - 0.02 * up + side * width_factor * shoulder * right
    J[R_SHO] = neck_base - 0.02 * up - side * width_factor * shoulder * right
    J[L_HIP] = side * width_factor * hip * right
    J[R_HIP] = -side * width_factor * hip * right

    def limb(start, base_deg, outward, angle, length):
        return J[start] + length * _unit(base_deg + outward * angle)

    for sho, elb, wri, s in ((L_SHO, L_ELB, L_WRI, side), (R_SHO, R_ELB, R_WRI, -side)):
        # shoulder angle from hanging (positive: away from the body, on that arm's image side)
        a = rng.normal(20, 15) if rng.random() < 0.5 else rng.uniform(-35, 170)
        J[elb] = limb(sho, lean, s, a, upper_arm * rng.uniform(0.7, 1.0))
        elbow = rng.choice((-1.0, 1.0)) * rng.uniform(0, 140)  # flexion, either way in 2-D
        J[wri] = limb(elb, lean, s, a + elbow, forearm * rng.uniform(0.7, 1.0))
    for hp, kn, an, s in ((L_HIP, L_KNE, L_ANK, side), (R_HIP, R_KNE, R_ANK, -side)):
        g = rng.normal(5, 10) if rng.random() < 0.7 else rng.uniform(-40, 55)
        J[kn] = limb(hp, lean * 0.3, s, g, thigh * rng.uniform(0.75, 1.0))
        knee = abs(rng.normal(0, 20)) if rng.random() < 0.8 else rng.uniform(30, 110)
        J[an] = limb(kn, lean * 0.3, s, g + rng.choice((-1.0, 1.0)) * knee, shin * rng.uniform(0.75, 1.0))

    tilt = lean + float(rng.normal(0, 10))
    head_up = -_unit(tilt)
    head_right = _unit(tilt + 90.0)
    head_center = neck_base + (neck + head_b) * head_up
    turn = math.sin(math.radians(yaw))  # face features shift sideways with the yaw
    J[NOSE] = head_center + 0.6 * head_a * turn * head_right - 0.15 * head_b * head_up
    eye_c = head_center + 0.5 * head_a * turn * head_right + 0.2 * head_b * head_up
    J[L_EYE] = eye_c + side * 0.4 * head_a * width_factor * head_right
    J[R_EYE] = eye_c - side * 0.4 * head_a * width_factor * head_right
    J[L_EAR] = head_center + 0.1 * head_b * head_up + side * 0.95 * head_a * width_factor * head_right
    J[R_EAR] = head_center + 0.1 * head_b * head_up - side * 0.95 * head_a * width_factor * head_right

    skin = _SKIN_TONES[rng.integers(len(_SKIN_TONES))]
    shirt, trousers = _random_color(rng), _random_color(rng)
    hair = _random_color(rng) * 0.35
    long_sleeves, long_trousers = rng.random() < 0.5, rng.random() < 0.75
    colors = {
        "torso": _jitter_color(rng, shirt, 8),
        "head": _jitter_color(rng, skin, 8),
        "hair": _jitter_color(rng, hair, 8),
        "eyes": (20.0, 20.0, 20.0),
    }
    for name in ("l_upper_arm", "r_upper_arm"):
        colors[name] = _jitter_color(rng, shirt)
    for name in ("l_forearm", "r_forearm"):
        colors[name] = _jitter_color(rng, shirt if long_sleeves else skin)
    for name in ("l_thigh", "r_thigh"):
        colors[name] = _jitter_color(rng, trousers)
    for name in ("l_shin", "r_shin"):
        colors[name] = _jitter_color(rng, trousers if long_trousers else skin)
    colors["neck"] = colors["head"]
    thick = rng.uniform(0.85, 1.2)
    widths = {
        "upper_arm": 0.05 * thick, "forearm": 0.042 * thick, "thigh": 0.075 * thick,
        "shin": 0.058 * thick, "neck": 0.045 * thick,
    }
    return _Figure(
        joints=J, head_center=head_center, head_axes=(head_a, head_b), head_angle=-tilt,
        facing_away=facing_away, widths=widths, colors=colors,
        hair_fraction=float(rng.uniform(0.3, 0.6)),
    )


_LEGS = (  # (colour key, width key, joint a, joint b); legs, then the torso, then the arms
    ("l_thigh", "thigh", L_HIP, L_KNE), ("r_thigh", "thigh", R_HIP, R_KNE),
    ("l_shin", "shin", L_KNE, L_ANK), ("r_shin", "shin", R_KNE, R_ANK),
)
_ARMS = (
    ("l_upper_arm", "upper_arm", L_SHO, L_ELB), ("r_upper_arm", "upper_arm", R_SHO, R_ELB),
    ("l_forearm", "forearm", L_ELB, L_WRI), ("r_forearm", "forearm", R_ELB, R_WRI),
)


def _fixed(p) -> tuple[int, int]:
    return int(round(p[0] * _ONE)), int(round(p[1] * _ONE))


def _draw_figure(canvas: np.ndarray, fig: _Figure, color_of) -> None:
    """Draw ``fig`` on ``canvas``; ``color_of(key)`` gives the colour of each part (a mask passes 255)."""
    J = fig.joints
    aa = cv2.LINE_AA if canvas.ndim == 3 else cv2.LINE_8

    def segment(key, width_key, a, b):
        t = max(1, int(round(fig.widths[width_key])))
        cv2.line(canvas, _fixed(J[a]), _fixed(J[b]), color_of(key), t, aa, _SHIFT)

    for limb in _LEGS:
        segment(*limb)
    torso = np.array([_fixed(J[i]) for i in (L_SHO, R_SHO, R_HIP, L_HIP)], dtype=np.int32)
    cv2.fillConvexPoly(canvas, torso, color_of("torso"), aa, _SHIFT)
    pad = max(1, int(round(0.6 * fig.widths["upper_arm"])))
    cv2.polylines(canvas, [torso], True, color_of("torso"), pad, aa, _SHIFT)
    for limb in _ARMS:
        segment(*limb)
    neck_top = fig.head_center
    neck_bottom = 0.5 * (J[L_SHO] + J[R_SHO])
    t = max(1, int(round(fig.widths["neck"])))
    cv2.line(canvas, _fixed(neck_bottom), _fixed(neck_top), color_of("neck"), t, aa, _SHIFT)
    axes = (int(round(fig.head_axes[0] * _ONE)), int(round(fig.head_axes[1] * _ONE)))
    center = _fixed(fig.head_center)
    cv2.ellipse(canvas, center, axes, fig.head_angle, 0, 360, color_of("head"), -1, aa, _SHIFT)
    if canvas.ndim == 3:  # appearance only: hair and eyes do not change the silhouette
        if fig.facing_away:
            cv2.ellipse(canvas, center, axes, fig.head_angle, 0, 360, color_of("hair"), -1, aa, _SHIFT)
        else:
            sweep = int(round(180 * fig.hair_fraction))  # a cap: the top arc closed by its chord
            cap = cv2.ellipse2Poly(
                tuple(int(round(v)) for v in fig.head_center),
                tuple(int(round(v)) for v in fig.head_axes), int(round(fig.head_angle)),
                270 - sweep, 270 + sweep, 10,
            )
            cv2.fillConvexPoly(canvas, cap, color_of("hair"), aa)
            r = max(1, int(round(0.18 * fig.head_axes[0] * _ONE)))
            for eye in (L_EYE, R_EYE):
                cv2.circle(canvas, _fixed(J[eye]), r, color_of("eyes"), -1, aa, _SHIFT)


# ---------------------------------------------------------------------------- scenes
def _box_iou_xyxy(a: np.ndarray, b: np.ndarray) -> float:
    """Scalar IoU of two ``[x0, y0, x1, y1]`` boxes (the bisection's inner loop; :func:`box_iou` is batched)."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(iw, 0.0) * max(ih, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _place_against(anchor: np.ndarray, box: np.ndarray, target_iou: float, direction: np.ndarray) -> np.ndarray:
    """Offset moving ``box``'s centre from ``anchor``'s centre along ``direction`` to reach ``target_iou``.

    The IoU of two boxes falls monotonically as their centres part along a ray, so
    bisection finds the distance; a target above the concentric IoU gives the concentric place.
    """
    ca, cb = 0.5 * (anchor[:2] + anchor[2:]), 0.5 * (box[:2] + box[2:])
    base = box + np.concatenate([ca - cb, ca - cb])
    step = np.concatenate([direction, direction])

    def iou_at(d):
        return _box_iou_xyxy(anchor, base + d * step)

    lo, hi = 0.0, float((anchor[2] - anchor[0]) + (anchor[3] - anchor[1]) + (box[2] - box[0]) + (box[3] - box[1]))
    if iou_at(lo) <= target_iou:
        return ca - cb
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if iou_at(mid) > target_iou:
            lo = mid
        else:
            hi = mid
    return ca - cb + hi * direction


def _sample_group(rng: np.random.Generator, size: int, iou_range: tuple[float, float]) -> list[_Figure]:
    """``size`` figures in shared local units, each newcomer at a target IoU with an earlier member."""
    figures = [_sample_figure(rng)]
    for _ in range(size - 1):
        fig = _sample_figure(rng)
        anchor = figures[int(rng.integers(len(figures)))]
        a_box, f_box = anchor.extent(), fig.extent()
        target = float(rng.uniform(*iou_range))
        if target > 0.5:  # a high IoU needs similar box sizes: match the anchor's height
            ratio = (a_box[3] - a_box[1]) / (f_box[3] - f_box[1]) * rng.uniform(0.93, 1.07)
        else:
            ratio = rng.uniform(0.85, 1.15)
        fig = fig.transformed(ratio, np.zeros(2))
        angle = rng.uniform(-25, 25) + (90.0 if rng.random() < 0.5 else -90.0)  # mostly side by side
        offset = _place_against(a_box, fig.extent(), target, _unit(angle))
        figures.append(fig.transformed(1.0, offset))
    return [figures[i] for i in rng.permutation(size)]  # random z-order: later ones occlude


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    gh, gw = int(rng.integers(2, 6)), int(rng.integers(2, 6))
    field = rng.uniform(30, 225, size=(gh, gw, 3)).astype(np.float32)
    image = np.clip(cv2.resize(field, (width, height), interpolation=cv2.INTER_CUBIC), 0, 255).astype(np.uint8)
    scale = max(height, width)
    for _ in range(int(rng.integers(3, 10))):
        color = tuple(float(v) for v in rng.uniform(20, 235, 3))
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        size = int(rng.uniform(0.03, 0.25) * scale)
        kind = rng.integers(3)
        if kind == 0:
            cv2.rectangle(image, (x, y), (x + size, y + int(rng.uniform(0.3, 2.0) * size)), color, -1)
        elif kind == 1:
            cv2.circle(image, (x, y), max(1, size // 2), color, -1, cv2.LINE_AA)
        else:
            end = (x + int(rng.normal(0, scale / 4)), y + int(rng.normal(0, scale / 4)))
            cv2.line(image, (x, y), end, color, int(rng.integers(1, max(2, scale // 40))), cv2.LINE_AA)
    return image


def _render(
    rng: np.random.Generator, height: int, width: int, group_sizes: tuple[np.ndarray, np.ndarray],
    iou_range: tuple[float, float],
) -> tuple[np.ndarray, list[dict]]:
    """One scene: RGB image and its people (``bbox``, ``area``, ``keypoints``, ``num_keypoints``)."""
    image = _background(rng, height, width)
    sizes, probs = group_sizes
    num_groups = int(rng.integers(1, max(1, round(width / (0.8 * height))) + 1))
    edges = np.linspace(0, width, num_groups + 1)
    people: list[_Figure] = []
    for g in range(num_groups):
        group = _sample_group(rng, int(rng.choice(sizes, p=probs)), iou_range)
        ext = np.array([f.extent() for f in group])
        lo, hi = ext[:, :2].min(axis=0), ext[:, 2:].max(axis=0)
        slot_w = edges[g + 1] - edges[g]
        fit = min(slot_w / (hi[0] - lo[0]), height / (hi[1] - lo[1]))
        scale = fit * rng.uniform(0.55, 1.0)
        span = (hi - lo) * scale
        # a little truncation at the image border is allowed (keypoints there get v = 0)
        x0 = edges[g] + rng.uniform(-0.08 * span[0], max(slot_w - 0.92 * span[0], -0.08 * span[0]))
        y0 = rng.uniform(-0.05 * span[1], max(height - 0.95 * span[1], -0.05 * span[1]))
        offset = np.array([x0, y0]) - lo * scale
        people.extend(f.transformed(scale, offset) for f in group)

    label = np.full((height, width), -1, dtype=np.int16)  # index of the top-most person per pixel
    mask = np.empty((height, width), dtype=np.uint8)
    boxes, areas = [], []
    for p, fig in enumerate(people):
        _draw_figure(image, fig, lambda key, c=fig.colors: c[key])
        mask.fill(0)
        _draw_figure(mask, fig, lambda key: 255)
        label[mask > 0] = p
        area = cv2.countNonZero(mask)
        boxes.append([float(v) for v in cv2.boundingRect(mask)] if area else None)
        areas.append(area)

    if rng.random() < 0.5:
        image = cv2.GaussianBlur(image, (3, 3), 0)
    # sensor noise: zero-mean uniform bytes with standard deviation `sigma` (fast; saturating add)
    sigma = rng.uniform(2.0, 10.0)
    noise = np.frombuffer(rng.bytes(image.size), dtype=np.uint8).reshape(image.shape)
    gain = sigma * math.sqrt(12.0) / 255.0
    image = cv2.addWeighted(image, 1.0, noise, gain, -127.5 * gain)

    visible = np.bincount(label[label >= 0].ravel(), minlength=len(people))  # pixels on top, per person
    records = []
    for p, fig in enumerate(people):
        if boxes[p] is None:
            continue
        kps = np.zeros((17, 3))
        xy = np.round(fig.joints, 2)
        inside = (xy[:, 0] >= 0) & (xy[:, 0] < width) & (xy[:, 1] >= 0) & (xy[:, 1] < height)
        top = np.full(17, -1)
        top[inside] = label[xy[inside, 1].astype(int), xy[inside, 0].astype(int)]
        hidden = top > p
        if fig.facing_away:
            hidden[list(FACE)] = True
        kps[inside, :2] = xy[inside]
        kps[inside, 2] = np.where(hidden[inside], 1, 2)
        records.append({
            "bbox": boxes[p], "area": areas[p], "visible_area": int(visible[p]), "keypoints": kps.reshape(-1).tolist(),
            "num_keypoints": int((kps[:, 2] > 0).sum()),
        })
    return image, records


@dataclass
class SyntheticCrowd:
    """What :func:`generate` made: the COCO dict, and the images in memory or on disk."""

    coco: dict
    images: list[np.ndarray] | None  # RGB, in ``coco["images"]`` order; None when written to disk
    image_dir: Path | None = None
    annotation_file: Path | None = None

    def dataset(self, **kwargs) -> KeypointDataset:
        """A :class:`~mipnet.data.KeypointDataset` (kind ``"coco"``) over the written files."""
        if self.annotation_file is None or self.image_dir is None:
            raise RuntimeError("this SyntheticCrowd is in memory; generate it with out_dir to get a dataset")
        return KeypointDataset(self.annotation_file, self.image_dir, "coco", **kwargs)


def _group_size_table(group_sizes: Mapping[int, float]) -> tuple[np.ndarray, np.ndarray]:
    try:
        items = sorted((int(k), float(v)) for k, v in dict(group_sizes).items())
    except (TypeError, ValueError):
        raise ValueError(f"group_sizes must map group size -> probability, got {group_sizes!r}") from None
    sizes = np.array([k for k, _ in items])
    probs = np.array([v for _, v in items])
    if len(items) == 0 or np.any(sizes < 1) or np.any(probs < 0) or probs.sum() <= 0:
        raise ValueError(f"group_sizes must map sizes >= 1 to non-negative probabilities, got {group_sizes!r}")
    return sizes, probs / probs.sum()


def generate(
    out_dir: str | os.PathLike | None = None,
    num_images: int = 200,
    *,
    image_size: Sequence[int] = (256, 192),
    seed: int = 0,
    iou_range: Sequence[float] = (0.0, 0.9),
    group_sizes: Mapping[int, float] = DEFAULT_GROUP_SIZES,
    image_format: str = "jpg",
) -> SyntheticCrowd:
    """Render ``num_images`` synthetic crowd scenes with COCO keypoint annotations.

    Args:
        out_dir: folder to write ``images/NNNNNN.<fmt>`` and ``annotations.json`` into
            (created if needed); ``None`` keeps everything in memory.
        num_images: how many scenes.
        image_size: ``(height, width)`` of every image (at least 32×32).
        seed: image ``i`` is a function of ``(seed, i)`` alone.
        iou_range: ``(low, high)`` of the target box IoU of each newcomer to a group.
        group_sizes: group size -> probability.
        image_format: ``"jpg"`` (quality 95) or ``"png"``.
    """
    if isinstance(num_images, bool) or not isinstance(num_images, (int, np.integer)) or num_images < 0:
        raise ValueError(f"num_images must be a non-negative int, got {num_images!r}")
    height, width = parse_size(image_size, "image_size")
    if height < 32 or width < 32:
        raise ValueError(f"image_size must be at least 32×32, got {tuple(image_size)}")
    try:
        lo, hi = (float(v) for v in iou_range)
    except (TypeError, ValueError):
        raise ValueError(f"iou_range must be (low, high), got {iou_range!r}") from None
    if not 0.0 <= lo <= hi < 1.0:
        raise ValueError(f"iou_range must satisfy 0 <= low <= high < 1, got {iou_range!r}")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    table = _group_size_table(group_sizes)

    image_dir = None
    if out_dir is not None:
        image_dir = Path(out_dir) / "images"
        try:
            image_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"out_dir {str(out_dir)!r} cannot be created: {e}") from e

    images, coco_images, annotations = [], [], []
    for i in range(int(num_images)):
        rng = np.random.default_rng((int(seed), i))
        image, people = _render(rng, height, width, table, (lo, hi))
        image_id = i + 1
        file_name = f"{image_id:06d}.{image_format}"
        coco_images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for person in people:
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": 1, "iscrowd": 0, **person,
            })
        if image_dir is None:
            images.append(image)
        else:
            params = [cv2.IMWRITE_JPEG_QUALITY, 95] if image_format == "jpg" else []
            if not cv2.imwrite(str(image_dir / file_name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR), params):
                raise RuntimeError(f"cannot write image {str(image_dir / file_name)!r}")

    coco = {
        "info": {
            "description": "mipnet synthetic crowd", "seed": int(seed), "generator_version": GENERATOR_VERSION,
            "image_size": [height, width], "iou_range": [lo, hi],
        },
        "images": coco_images,
        "annotations": annotations,
        "categories": [{
            "id": 1, "name": "person", "supercategory": "person",
            "keypoints": list(COCO_KEYPOINT_NAMES), "skeleton": [list(p) for p in COCO_SKELETON],
        }],
    }
    if image_dir is None:
        return SyntheticCrowd(coco=coco, images=images)
    annotation_file = Path(out_dir) / "annotations.json"
    tmp = annotation_file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(coco))
    os.replace(tmp, annotation_file)
    return SyntheticCrowd(coco=coco, images=None, image_dir=image_dir, annotation_file=annotation_file)
