"""Official-style top-down inference: the pipeline :class:`mipnet.TopDownPredictor` is measured against.

:class:`OfficialPipeline` restates what the HRNet test code (Sun et al., CVPR 2019:
``tools/test.py``, ``lib/dataset/coco.py``, ``lib/core/function.py``, ``lib/core/inference.py``,
``lib/nms/nms.py``) and MIPNet's (Khirodkar et al., ICCV 2021: ``lib/core/validate.py``
``validate_lambda_quantitative``) do, step by step and with the same host/device split:

* per box, on the host (the dataset's ``__getitem__``): centre/scale, ``cv2.warpAffine`` to a
  ``uint8`` crop, ToTensor + ImageNet normalisation; batches are stacked and copied to the device;
* per batch and per instance ``n``: the **whole network** with the one-hot selector of ``n``
  (official ``lambda_vec``; a baseline model runs once); with the flip test a **second full
  pass** on the mirrored batch, whose heatmaps go to the host for ``flip_back`` (NumPy), come
  back, are shifted one pixel (``SHIFT_HEATMAP``) and averaged on the device;
* ``get_final_preds`` on the CPU: argmax, the quarter-pixel offset in a per-joint Python
  loop, and ``transform_preds`` per point with the inverse crop affine of each box;
* ``evaluate``: per image, the rescoring loop (box score × mean of the joint scores above
  ``keypoint_score_threshold``; secondary instances' box score × ``secondary_score_factor``,
  MIPNet's ``DECAY_THRE``), area ``prod(scale · 200)``, and greedy ``oks_nms`` in NumPy.

Differences to the original code, on purpose (the same choices as ``mipnet_kernels``, so the
two pipelines' outputs can be compared exactly): the coordinates of a heatmap whose maximum
is <= 0 are not zeroed (HRNet's ``get_max_preds`` mask), and OKS-NMS visits equal scores by
lower index first (HRNet's ``argsort()[::-1]`` takes the higher index first).  The crop
geometry is :mod:`mipnet.data.transforms` (HRNet's ``get_affine_transform`` in closed form).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np
import torch

from mipnet_kernels import COCO_SIGMAS, CROWDPOSE_SIGMAS

from .data.transforms import box_to_center_scale, get_affine, invert_affine, normalize_image, parse_size, warp_to_crop
from .predictor import DEFAULT_FLIP_PAIRS, PERSON_CATEGORY_ID, ImageLike, BoxesLike, check_boxes, image_to_chw

DEFAULT_SIGMAS = {17: COCO_SIGMAS, 14: CROWDPOSE_SIGMAS}


# --------------------------------------------------------------------------- HRNet inference.py
def get_max_preds(heatmaps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integer argmax (first maximum) ``[B, K, 2]`` float32 ``(x, y)`` and maxima ``[B, K, 1]``."""
    B, K, _, W = heatmaps.shape
    flat = heatmaps.reshape(B, K, -1)
    idx = np.argmax(flat, 2)[..., None]
    maxvals = np.amax(flat, 2)[..., None]
    preds = np.tile(idx, (1, 1, 2)).astype(np.float32)
    preds[:, :, 0] = preds[:, :, 0] % W
    preds[:, :, 1] = np.floor(preds[:, :, 1] / W)
    return preds, maxvals


def get_final_preds(heatmaps: np.ndarray, centers: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HRNet's ``get_final_preds`` with ``POST_PROCESS``: ``(preds [B, K, 2] image pixels, maxvals [B, K, 1])``."""
    coords, maxvals = get_max_preds(heatmaps)
    B, K, h, w = heatmaps.shape
    for n in range(B):
        for p in range(K):
            hm = heatmaps[n][p]
            px = int(math.floor(coords[n][p][0] + 0.5))
            py = int(math.floor(coords[n][p][1] + 0.5))
            if 1 < px < w - 1 and 1 < py < h - 1:
                diff = np.array([hm[py][px + 1] - hm[py][px - 1], hm[py + 1][px] - hm[py - 1][px]])
                coords[n][p] += np.sign(diff) * 0.25
    preds = np.zeros((B, K, 2), dtype=np.float64)
    for n in range(B):  # transform_preds: heatmap -> image with each box's inverse affine
        trans = invert_affine(get_affine(centers[n], scales[n], 0.0, (h, w)))
        for p in range(K):
            preds[n, p] = trans @ np.array([coords[n, p, 0], coords[n, p, 1], 1.0])
    return preds, maxvals


def flip_back(output_flipped: np.ndarray, flip_pairs) -> np.ndarray:
    """HRNet's ``flip_back``: mirror the width axis and swap the left/right joints."""
    output_flipped = output_flipped[:, :, :, ::-1]
    for a, b in flip_pairs:
        tmp = output_flipped[:, a, :, :].copy()
        output_flipped[:, a, :, :] = output_flipped[:, b, :, :]
        output_flipped[:, b, :, :] = tmp
    return output_flipped


# --------------------------------------------------------------------------- HRNet nms.py
def oks_iou(g: np.ndarray, d: np.ndarray, a_g: float, a_d: np.ndarray, sigmas) -> np.ndarray:
    """OKS of one pose ``g`` (flat ``[3K]``) with each row of ``d`` (``[n, 3K]``), all joints."""
    vars_ = (np.asarray(sigmas, dtype=np.float64) * 2) ** 2
    xg, yg = g[0::3], g[1::3]
    ious = np.zeros(d.shape[0])
    for n_d in range(d.shape[0]):
        dx, dy = d[n_d, 0::3] - xg, d[n_d, 1::3] - yg
        e = (dx ** 2 + dy ** 2) / vars_ / ((a_g + a_d[n_d]) / 2 + np.spacing(1)) / 2
        ious[n_d] = np.sum(np.exp(-e)) / e.shape[0]
    return ious


def oks_nms(kpts: np.ndarray, scores: np.ndarray, areas: np.ndarray, thr: float, sigmas) -> list[int]:
    """Greedy OKS-NMS of one image (``[n, K, 3]`` poses): kept indices in visiting order."""
    kpts = np.asarray(kpts, dtype=np.float64).reshape(len(scores), -1)
    order = np.argsort(-np.asarray(scores), kind="stable")
    keep = []
    while order.size > 0:
        i = order[0]
        keep.append(int(i))
        ovr = oks_iou(kpts[i], kpts[order[1:]], areas[i], areas[order[1:]], sigmas)
        order = order[np.where(ovr <= thr)[0] + 1]
    return keep


# --------------------------------------------------------------------------- pipeline
class OfficialPipeline:
    """The official-style inference of a :mod:`mipnet.models` model (see the module docstring).

    Same arguments and outputs as :class:`mipnet.TopDownPredictor` (``decode`` is HRNet's
    quarter offset; the network runs in the model's own precision).
    """

    def __init__(self, model: torch.nn.Module, input_size: Sequence[int] = (256, 192), flip_test: bool = True,
                 nms_threshold: float = 0.9, secondary_score_factor: float = 0.5,
                 keypoint_score_threshold: float = 0.2, batch_size: int = 32,
                 flip_pairs: Optional[Sequence[Sequence[int]]] = None,
                 sigmas: Optional[Sequence[float]] = None) -> None:
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.input_size = parse_size(input_size, "input_size")
        K = int(model.num_keypoints)
        self.flip_pairs = DEFAULT_FLIP_PAIRS.get(K) if flip_pairs is None else flip_pairs
        self.sigmas = DEFAULT_SIGMAS.get(K) if sigmas is None else sigmas
        if self.sigmas is None or (flip_test and self.flip_pairs is None):
            raise ValueError(f"flip_pairs and sigmas are required for num_keypoints={K} (defaults: 17, 14)")
        self.flip_test, self.batch_size = bool(flip_test), int(batch_size)
        self.nms_threshold, self.secondary_score_factor = float(nms_threshold), float(secondary_score_factor)
        self.keypoint_score_threshold = float(keypoint_score_threshold)

    def _network(self, inputs: torch.Tensor, n: int) -> torch.Tensor:
        """Heatmaps of instance ``n``: a full pass (and a second, mirrored one for the flip test)."""
        N = int(self.model.num_instances)
        lam = None
        if N > 1:
            lam = torch.zeros(inputs.shape[0], N, device=self.device)
            lam[:, n] = 1.0
        output = self.model(inputs, lam)
        if self.flip_test:
            flipped = self.model(inputs.flip(3), lam)
            flipped = torch.from_numpy(flip_back(flipped.cpu().numpy(), self.flip_pairs).copy()).to(self.device)
            flipped[:, :, :, 1:] = flipped.clone()[:, :, :, 0:-1]  # SHIFT_HEATMAP
            output = (output + flipped) * 0.5
        return output

    def predict(self, images: Sequence[ImageLike], boxes: Sequence[BoxesLike],
                image_ids: Optional[Sequence[Any]] = None) -> list[dict]:
        """COCO keypoint results, by image then descending score (as :meth:`TopDownPredictor.predict`)."""
        images = list(images)
        boxes = list(boxes)
        if len(images) != len(boxes):
            raise ValueError(f"images and boxes must have one entry per image, got {len(images)} and {len(boxes)}")
        image_ids = list(range(len(images))) if image_ids is None else list(image_ids)
        H, W = self.input_size
        # the dataset: one sample per box
        samples = []  # (image index, crop tensor, centre, scale, box score)
        for i, (image, b) in enumerate(zip(images, boxes)):
            b = check_boxes(b, f"boxes[{i}]")
            if len(b) == 0:
                continue
            rgb = np.ascontiguousarray(image_to_chw(image, f"images[{i}]").permute(1, 2, 0).cpu().numpy())
            for box in b:
                center, scale = box_to_center_scale(box[:4], W / H)
                crop = warp_to_crop(rgb, get_affine(center, scale, 0.0, (H, W)), (H, W))
                samples.append((i, normalize_image(crop), center, scale, box[4]))

        all_preds, all_boxes = [], []  # [K, 3] poses; (image index, area, score)
        with torch.no_grad():
            for start in range(0, len(samples), self.batch_size):
                batch = samples[start:start + self.batch_size]
                inputs = torch.stack([s[1] for s in batch]).to(self.device)
                centers = np.stack([s[2] for s in batch])
                scales = np.stack([s[3] for s in batch])
                for n in range(int(self.model.num_instances)):
                    output = self._network(inputs, n)
                    preds, maxvals = get_final_preds(output.cpu().numpy(), centers, scales)
                    factor = 1.0 if n == 0 else self.secondary_score_factor
                    for j, s in enumerate(batch):
                        all_preds.append(np.concatenate([preds[j], maxvals[j]], axis=1))
                        all_boxes.append((s[0], float(np.prod(s[3] * 200)), float(s[4]) * factor))
        return self._evaluate(all_preds, all_boxes, image_ids)

    def _evaluate(self, all_preds, all_boxes, image_ids) -> list[dict]:
        """HRNet's ``COCODataset.evaluate`` up to the results file: rescoring and OKS-NMS per image."""
        per_image: dict[int, list[dict]] = {}
        for kpt, (i, area, score) in zip(all_preds, all_boxes):
            per_image.setdefault(i, []).append({"keypoints": kpt, "area": area, "score": score})
        results = []
        for i in sorted(per_image):
            img_kpts = per_image[i]
            for n_p in img_kpts:
                kpt_score, valid_num = 0.0, 0
                for n_jt in range(len(n_p["keypoints"])):
                    t_s = n_p["keypoints"][n_jt][2]
                    if t_s > self.keypoint_score_threshold:
                        kpt_score += t_s
                        valid_num += 1
                if valid_num != 0:
                    kpt_score /= valid_num
                n_p["score"] = kpt_score * n_p["score"]
            keep = oks_nms(np.stack([p["keypoints"] for p in img_kpts]), np.array([p["score"] for p in img_kpts]),
                           np.array([p["area"] for p in img_kpts]), self.nms_threshold, self.sigmas)
            results.extend(
                {
                    "image_id": image_ids[i],
                    "category_id": PERSON_CATEGORY_ID,
                    "keypoints": img_kpts[k]["keypoints"].reshape(-1).astype(float).tolist(),
                    "score": float(img_kpts[k]["score"]),
                }
                for k in keep
            )
        return results


__all__ = ["OfficialPipeline", "flip_back", "get_final_preds", "get_max_preds", "oks_iou", "oks_nms"]
