"""Top-down pose inference: images + person boxes -> COCO keypoint results, on the device.

:class:`TopDownPredictor` runs the whole HRNet / MIPNet test pipeline with no device-to-host
copy until the final results (and, given pinned or device inputs, no host synchronisation):

1. **crop**: each box ``[x, y, w, h]`` becomes HRNet's aspect-ratio-fixed, ×1.25 padded crop
   (centre/scale, ``pixel_std`` 200; :mod:`mipnet.data.transforms` states the conventions);
   the crops are cut on the device by ``affine_grid`` + ``grid_sample`` (bilinear, zero
   border) with the grid built so that crop pixel ``(u, v)`` samples image point
   ``A⁻¹ (u, v)`` -- the pixel-centre convention of ``cv2.warpAffine`` that HRNet uses --
   then normalised with the ImageNet mean/std;
2. **network**: ``model.forward_instances`` on the crops and their horizontal mirrors as
   one batch of ``2B`` (the flip test), so a MIPNet model runs its λ-independent trunk once
   for all ``N`` instances and both flips;
3. **flip merge**: ``mipnet_kernels.flip_merge`` (HRNet's ``flip_back`` + ``SHIFT_HEATMAP``
   + average);
4. **decode**: ``mipnet_kernels.decode_heatmaps`` straight to image pixels with each box's
   heatmap -> image affine;
5. **rescoring** (HRNet ``COCODataset.evaluate``): ``score = box score × mean of the joint
   scores above keypoint_score_threshold`` (0 when none is); MIPNet's secondary instances
   (``n >= 1``; official ``lambda_vec = [0, 1]``) have their box score multiplied by
   ``secondary_score_factor`` (the official ``TEST.DECAY_THRE``, 0.5);
6. **OKS-NMS** over all candidates (all boxes × all instances) of each image at once:
   ``mipnet_kernels.oks_nms_mask`` with the areas HRNet uses, ``prod(scale · 200)`` (the
   padded crop box), and no visibility threshold (HRNet's call).

The tensor-level API (:meth:`TopDownPredictor.predict_tensors`) returns every candidate
with a keep mask (:class:`PoseCandidates`, device tensors of known shape); :meth:`predict`
converts to COCO result dicts with one device-to-host copy; :meth:`predict_detections`
reads a COCO detection results file and an image folder; :func:`save_results` writes JSON.
:meth:`TopDownPredictor.predict_lambda_sweep` and :func:`draw_lambda_sweep` give the paper's
continuous-λ visualisation.

Inputs: images as ``uint8`` RGB arrays or tensors (``H×W×3`` or ``3×H×W``, any device) or
paths (read with OpenCV, converted to RGB); boxes per image as ``[n, 4]`` (score 1) or
``[n, 5]`` ``(x, y, w, h, score)`` arrays or tensors.  Host boxes are checked (finite,
positive size); device boxes only with ``validate=True`` (the check synchronises).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mipnet_kernels import COCO_FLIP_PAIRS, CROWDPOSE_FLIP_PAIRS, decode_heatmaps, flip_merge, oks_nms_mask
from mipnet_kernels.ops.decode import MODES, flip_index_from_pairs

from .data.coco import COCO_SKELETON, CROWDPOSE_SKELETON, load_detections
from .data.transforms import BOX_PADDING, IMAGENET_MEAN, IMAGENET_STD, parse_size, read_image_rgb

#: flip pairs by number of joints (COCO, CrowdPose)
DEFAULT_FLIP_PAIRS = {17: COCO_FLIP_PAIRS, 14: CROWDPOSE_FLIP_PAIRS}
#: the COCO person category of the results
PERSON_CATEGORY_ID = 1

ImageLike = Union[Tensor, np.ndarray, str, os.PathLike]
BoxesLike = Union[Tensor, np.ndarray, Sequence[Sequence[float]]]


# --------------------------------------------------------------------------- inputs
def image_to_chw(image: ImageLike, name: str = "image") -> Tensor:
    """A ``uint8`` RGB image as a ``[3, H, W]`` tensor (a view where possible; same device).

    Tensors are channels-first unless dim 0 is not 3 and the last dim is (``H×W×3``);
    NumPy arrays are channels-last (OpenCV's layout) unless the last dim is not 3 and dim 0
    is.  Paths are read with OpenCV and converted to RGB.
    """
    if isinstance(image, (str, os.PathLike)):
        image = read_image_rgb(image)
    if isinstance(image, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(image))
        channels_last = image.ndim == 3 and (image.shape[2] == 3 or image.shape[0] != 3)
    elif isinstance(image, Tensor):
        t = image
        channels_last = image.dim() == 3 and image.shape[0] != 3 and image.shape[2] == 3
    else:
        raise TypeError(f"{name} must be a tensor, a NumPy array or a path, got {type(image).__name__}")
    if t.dim() != 3 or (t.shape[2] if channels_last else t.shape[0]) != 3:
        raise ValueError(
            f"{name} must be an RGB image with 3 channels (H×W×3 or 3×H×W), got shape {tuple(t.shape)}"
        )
    if t.dtype != torch.uint8:
        raise TypeError(f"{name} must be uint8 (0..255 RGB), got {t.dtype}")
    t = t.permute(2, 0, 1) if channels_last else t
    if t.shape[1] == 0 or t.shape[2] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")
    return t


#: Largest |x|, |y|, w, h of a box in pixels (float32 crop geometry stays exact and finite).
MAX_BOX_COORD = 1e7


def check_boxes(boxes: BoxesLike, name: str = "boxes") -> np.ndarray:
    """Host boxes ``[n, 4]`` / ``[n, 5]`` -> float64 ``[n, 5]`` ``(x, y, w, h, score)`` (score 1 if absent).

    Raises ``ValueError`` naming the row for NaN/inf values, a width/height <= 0, or a
    coordinate beyond :data:`MAX_BOX_COORD`.
    """
    if isinstance(boxes, Tensor):
        boxes = boxes.detach().cpu().numpy()
    b = np.asarray(boxes, dtype=np.float64)
    if b.size == 0:
        b = b.reshape(0, 5)
    if b.ndim != 2 or b.shape[1] not in (4, 5):
        raise ValueError(f"{name} must have shape [n, 4] (x, y, w, h) or [n, 5] (x, y, w, h, score), got {b.shape}")
    if b.shape[1] == 4:
        b = np.concatenate([b, np.ones((b.shape[0], 1))], axis=1)
    bad = ~np.isfinite(b).all(axis=1)
    if bad.any():
        raise ValueError(f"{name}[{int(np.argmax(bad))}] = {b[np.argmax(bad)].tolist()} holds NaN or inf")
    bad = (b[:, 2] <= 0) | (b[:, 3] <= 0)
    if bad.any():
        j = int(np.argmax(bad))
        raise ValueError(f"{name}[{j}] has width {b[j, 2]:g} and height {b[j, 3]:g}; both must be > 0")
    # The crop geometry runs in float32 (box_geometry scales w, h by ~1.25 and the affine
    # multiplies them again): a finite float64 box such as 3e38 would overflow there and
    # surface later as an unrelated error.
    bad = (np.abs(b[:, :2]).max(axis=1) > MAX_BOX_COORD) | (b[:, 2:4].max(axis=1) > MAX_BOX_COORD)
    if bad.any():
        j = int(np.argmax(bad))
        raise ValueError(f"{name}[{j}] = {b[j, :4].tolist()} is out of range: x, y, w, h must be within "
                         f"+-{MAX_BOX_COORD:g} pixels")
    return b


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """Host -> device without a host synchronisation (through pinned memory) when on CUDA."""
    if t.device == device:
        return t
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


# --------------------------------------------------------------------------- geometry
def box_geometry(boxes: Tensor, input_size: Sequence[int],
                 heatmap_size: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
    """HRNet's crop geometry of ``[M, 4+]`` boxes ``(x, y, w, h, ...)``, on their device.

    Returns ``crop_to_image [M, 2, 3]``, ``heatmap_to_image [M, 2, 3]`` (``decode_heatmaps``'
    ``affine``) and ``areas [M]`` = ``prod(scale · pixel_std)``, the padded box HRNet's
    OKS-NMS uses.  The maps equal :func:`mipnet.data.transforms.box_affines` (NumPy, float64);
    here they are computed with scalar arithmetic only (no host-to-device copy).
    """
    H, W = parse_size(input_size, "input_size")
    h, w = parse_size(heatmap_size, "heatmap_size")
    x, y, bw, bh = boxes[:, :4].unbind(-1)
    aspect = W / H
    # the box grown to the crop's aspect ratio and padded (scale * pixel_std, image pixels)
    sw = torch.maximum(bw, bh * aspect) * BOX_PADDING
    sh = torch.maximum(bh, bw / aspect) * BOX_PADDING
    inv_zoom = sw / W  # image pixels per crop pixel (HRNet zooms by the width alone)
    zero = torch.zeros_like(inv_zoom)
    # crop -> image: p = inv_zoom * (q - (W/2, H/2)) + centre
    tx = x + 0.5 * bw - inv_zoom * (W / 2)
    ty = y + 0.5 * bh - inv_zoom * (H / 2)
    crop_to_image = torch.stack([torch.stack([inv_zoom, zero, tx], -1), torch.stack([zero, inv_zoom, ty], -1)], -2)
    # heatmap pixel (x, y) is crop pixel (x * W/w, y * H/h)
    heatmap_to_image = torch.stack([
        torch.stack([inv_zoom * (W / w), zero, tx], -1), torch.stack([zero, inv_zoom * (H / h), ty], -1),
    ], -2)
    return crop_to_image, heatmap_to_image, sw * sh


def sampling_grid(crop_to_image: Tensor, image_size: Sequence[int], crop_size: Sequence[int]) -> Tensor:
    """``grid_sample`` grid ``[M, Hc, Wc, 2]`` (``align_corners=False``) that cuts the crops.

    ``cv2.warpAffine(image, A, (Wc, Hc))`` sets crop pixel ``(u, v)`` (integer indices, pixel
    centres) to the image sampled at ``A⁻¹ (u, v)``, where image pixel ``i`` is centred at
    coordinate ``i``.  With ``align_corners=False``, ``grid_sample`` puts pixel ``i`` of a size-S
    axis at normalised ``(2i + 1)/S - 1``, and ``affine_grid`` generates crop pixel ``u`` at
    normalised ``(2u + 1)/Wc - 1``.  So ``theta = N_image ∘ A⁻¹ ∘ N_crop⁻¹`` with
    ``N_crop⁻¹(s) = (Wc s + Wc - 1)/2`` and ``N_image(p) = (2p + 1)/Wi - 1`` per axis.
    """
    Hi, Wi = parse_size(image_size, "image_size")
    Hc, Wc = parse_size(crop_size, "crop_size")
    A = crop_to_image
    # A ∘ N_crop⁻¹: normalised crop coordinates -> image pixels
    lin_x, lin_y = A[..., 0] * (Wc / 2), A[..., 1] * (Hc / 2)
    t = A[..., 0] * ((Wc - 1) / 2) + A[..., 1] * ((Hc - 1) / 2) + A[..., 2]
    theta = torch.stack([lin_x, lin_y, t], -1)  # [M, 2, 3]
    # N_image: row 0 (x) by the image width, row 1 (y) by its height
    theta = theta * torch.stack([torch.full_like(t[:, 0], 2 / Wi), torch.full_like(t[:, 0], 2 / Hi)], -1)[..., None]
    theta[:, 0, 2] += 1 / Wi - 1
    theta[:, 1, 2] += 1 / Hi - 1
    return F.affine_grid(theta, [A.shape[0], 1, Hc, Wc], align_corners=False)


def warp_crops(image: Tensor, crop_to_image: Tensor, crop_size: Sequence[int]) -> Tensor:
    """Crops ``[M, 3, Hc, Wc]`` float32 (integers 0..255) of one ``[3, H, W]`` image, bilinear, zero border.

    The device counterpart of :func:`mipnet.data.transforms.warp_to_crop` (``cv2.warpAffine``
    of a ``uint8`` image, as HRNet crops): the samples are rounded to integers as its ``uint8``
    output is, so the network sees the crops the official pipeline feeds it (cv2 interpolates
    in fixed point, 1/32 pixel; the rounded values agree except at a few pixels by 1).  All M
    crops come from one ``grid_sample`` call: their grids are stacked along the output height,
    so the image is neither copied nor expanded.
    """
    Hc, Wc = parse_size(crop_size, "crop_size")
    M = crop_to_image.shape[0]
    grid = sampling_grid(crop_to_image, image.shape[-2:], (Hc, Wc)).float().reshape(1, M * Hc, Wc, 2)
    out = F.grid_sample(image[None].float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.round_().view(3, M, Hc, Wc).transpose(0, 1)


# --------------------------------------------------------------------------- outputs
@dataclass
class PoseCandidates:
    """Every candidate pose (each box × each instance) of a :meth:`TopDownPredictor.predict_tensors` call.

    All tensors are on the predictor's device and have ``M = N · boxes`` rows, ordered by
    batch, then instance, then box.  ``keep`` is OKS-NMS' verdict; compacting
    (``keypoints[keep]``) is left to the caller because it synchronises.
    """

    keypoints: Tensor  # [M, K, 3] float32 (x, y, heatmap maximum), image pixels
    scores: Tensor  # [M] float32, rescored (box score x mean joint score)
    areas: Tensor  # [M] float32, the padded crop box area (OKS-NMS)
    image_index: Tensor  # [M] int64, position of the image in the input
    box_index: Tensor  # [M] int64, position of the box among all boxes (image by image)
    instance: Tensor  # [M] int64, MIPNet instance (0: the primary, the person of the box)
    keep: Tensor  # [M] bool, kept by OKS-NMS
    counts: Tensor  # [num_images] int64, kept per image

    def to_results(self, image_ids: Sequence[Any], category_id: int = PERSON_CATEGORY_ID) -> list[dict]:
        """COCO keypoint results of the kept candidates (one device-to-host copy), by image,
        then by descending score (HRNet's order after OKS-NMS)."""
        M, K = self.keypoints.shape[:2]
        packed = torch.cat([
            self.keypoints.reshape(M, 3 * K).double(), self.scores[:, None].double(),
            self.image_index[:, None].double(), self.keep[:, None].double(),
        ], 1).cpu().numpy()
        kept = packed[packed[:, -1] > 0]
        order = np.lexsort((-kept[:, 3 * K], kept[:, 3 * K + 1]))  # stable: ties keep input order
        return [
            {
                "image_id": _json_scalar(image_ids[int(row[3 * K + 1])]),
                "category_id": category_id,
                "keypoints": row[: 3 * K].tolist(),
                "score": float(row[3 * K]),
            }
            for row in kept[order]
        ]


@dataclass
class LambdaSweep:
    """Keypoints of one box for ``λ = [1 - t, t]``, ``t`` from 0 (instance 0) to 1 (instance 1)."""

    t: np.ndarray  # [S]
    keypoints: np.ndarray  # [S, K, 3] (x, y, score), image pixels
    box: np.ndarray  # [5] (x, y, w, h, score)


def _json_scalar(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def save_results(results: list[dict], path: Union[str, os.PathLike]) -> Path:
    """Write COCO keypoint results as JSON (the format ``COCO.loadRes`` reads)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results))
    return path


# --------------------------------------------------------------------------- predictor
class TopDownPredictor:
    """Image + person boxes -> poses with a (MIPNet) top-down model; see the module docstring.

    Args:
        model: a :class:`mipnet.models.PoseNet` (``num_instances``, ``num_keypoints``,
            ``forward_instances``); it is put in eval mode (and moved to ``device``).
        input_size: crop ``(height, width)``; multiples of the model's stride (32).
        flip_test: also run the mirrored crops (in the same batch) and merge the heatmaps.
        decode: ``decode_heatmaps`` mode: ``argmax``, ``quarter`` (HRNet), ``dark``, ``udp``.
        nms_threshold: OKS above which a lower-scored candidate of the same image is dropped.
        secondary_score_factor: box-score factor of instances ``n >= 1`` (official ``DECAY_THRE``).
        keypoint_score_threshold: joints above it enter the rescoring mean (HRNet ``IN_VIS_THRE``).
        batch_size: boxes per network call (the network sees ``2 · batch_size`` crops with
            ``flip_test``).
        device: where everything runs; default the model's device.
        dtype: ``torch.float16`` / ``torch.bfloat16`` run the network under autocast; None: as is.
        flip_pairs, sigmas: left/right joint pairs and OKS sigmas; COCO's (K=17) or
            CrowdPose's (K=14) by default, required for other K.
    """

    def __init__(self, model: torch.nn.Module, input_size: Sequence[int] = (256, 192), flip_test: bool = True,
                 decode: str = "quarter", nms_threshold: float = 0.9, secondary_score_factor: float = 0.5,
                 keypoint_score_threshold: float = 0.2, batch_size: int = 64,
                 device: Union[str, torch.device, None] = None, dtype: Optional[torch.dtype] = None,
                 flip_pairs: Optional[Sequence[Sequence[int]]] = None,
                 sigmas: Optional[Sequence[float]] = None) -> None:
        for attr in ("num_instances", "num_keypoints", "forward_instances"):
            if not isinstance(model, torch.nn.Module) or not hasattr(model, attr):
                raise TypeError(
                    f"model must be a mipnet pose model (mipnet.models.build_model), got {type(model).__name__} "
                    f"without {attr!r}"
                )
        self.input_size = parse_size(input_size, "input_size")
        m = int(getattr(model, "stride_multiple", 1))
        if self.input_size[0] % m or self.input_size[1] % m:
            raise ValueError(f"input_size must be multiples of {m} (the model's deepest stride), got {input_size}")
        if decode not in MODES:
            raise ValueError(f"decode must be one of {MODES}, got {decode!r}")
        inf = float("inf")
        for name, value, hi in (("nms_threshold", nms_threshold, 1.0),
                                ("keypoint_score_threshold", keypoint_score_threshold, inf),
                                ("secondary_score_factor", secondary_score_factor, inf)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= hi:
                raise ValueError(f"{name} must be a number in [0, {hi:g}], got {value!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if dtype not in (None, torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be None, torch.float32, torch.float16 or torch.bfloat16, got {dtype}")

        K = int(model.num_keypoints)
        if flip_pairs is None:
            flip_pairs = DEFAULT_FLIP_PAIRS.get(K)
            if flip_pairs is None and flip_test:
                raise ValueError(f"flip_pairs is required for a model with num_keypoints={K} (defaults: 17, 14)")
        if flip_pairs is not None:
            try:
                flip_index_from_pairs(flip_pairs, K)
            except ValueError as e:
                raise ValueError(f"flip_pairs do not fit the model's num_keypoints={K}: {e}") from None
        if sigmas is None and K not in DEFAULT_FLIP_PAIRS:
            raise ValueError(f"sigmas is required for a model with num_keypoints={K} (defaults: 17, 14)")
        if sigmas is not None and len(sigmas) != K:
            raise ValueError(f"sigmas has {len(sigmas)} values but the model has num_keypoints={K}")

        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device).eval()
        self.num_instances, self.num_keypoints = int(model.num_instances), K
        self.heatmap_size = (self.input_size[0] // 4, self.input_size[1] // 4)
        self.flip_test, self.flip_pairs, self.decode = bool(flip_test), flip_pairs, decode
        self.nms_threshold, self.secondary_score_factor = float(nms_threshold), float(secondary_score_factor)
        self.keypoint_score_threshold, self.batch_size = float(keypoint_score_threshold), batch_size
        self.dtype = None if dtype == torch.float32 else dtype  # autocast dtype, or None
        # device constants, uploaded once: ImageNet normalisation of 0..255 values, sigmas
        std = torch.tensor(IMAGENET_STD, dtype=torch.float32)
        self._gain = (1.0 / (255.0 * std)).view(1, 3, 1, 1).to(self.device)
        self._bias = (-torch.tensor(IMAGENET_MEAN, dtype=torch.float32) / std).view(1, 3, 1, 1).to(self.device)
        self._sigmas = None if sigmas is None else torch.tensor(sigmas, dtype=torch.float32, device=self.device)

    # ------------------------------------------------------------------ building blocks
    def _boxes(self, boxes: BoxesLike, name: str, validate: Optional[bool]) -> Tensor:
        """``[n, 5]`` float32 boxes on the device (host boxes always checked)."""
        if isinstance(boxes, Tensor) and boxes.device.type != "cpu" and not validate:
            if boxes.dim() != 2 or boxes.shape[1] not in (4, 5) or not boxes.is_floating_point():
                raise ValueError(
                    f"{name} must be a float [n, 4] or [n, 5] tensor, got {boxes.dtype} {list(boxes.shape)}"
                )
            b = boxes.to(self.device, torch.float32)
            return b if b.shape[1] == 5 else torch.cat([b, torch.ones_like(b[:, :1])], 1)
        return _to_device(torch.from_numpy(check_boxes(boxes, name)).float(), self.device)

    def _image(self, image: ImageLike, name: str) -> Tensor:
        return _to_device(image_to_chw(image, name), self.device)

    def _normalise(self, crops: Tensor) -> Tensor:
        return torch.addcmul(self._bias, crops, self._gain)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype or torch.bfloat16, enabled=self.dtype is not None)

    def _check_heatmaps(self, hm: Tensor) -> None:
        expected = (self.num_keypoints, *self.heatmap_size)
        if tuple(hm.shape[-3:]) != expected:
            raise RuntimeError(
                f"the model returned heatmaps [..., K, h, w] = {list(hm.shape[-3:])}, expected {list(expected)} "
                f"(num_keypoints, input_size / 4)"
            )

    def _merge_flip(self, hm: Tensor, batch: int) -> Tensor:
        """``[..., 2B, K, h, w]`` (crops, then mirrored crops) -> merged ``[..., B, K, h, w]``."""
        lead = hm.shape[:-4]
        normal, mirrored = hm[..., :batch, :, :, :], hm[..., batch:, :, :, :]
        merged = flip_merge(normal.reshape(-1, *hm.shape[-3:]), mirrored.reshape(-1, *hm.shape[-3:]), self.flip_pairs)
        return merged.view(*lead, batch, *hm.shape[-3:])

    def _batches(self, images: Sequence[ImageLike], boxes: Sequence[Tensor]) -> Iterable[tuple[Tensor, ...]]:
        """Normalised crops and their per-box data, ``batch_size`` boxes at a time (images in order)."""
        pending: list[list[Tensor]] = []
        start = 0
        for i, (image, b) in enumerate(zip(images, boxes)):
            n = b.shape[0]
            if n == 0:
                continue
            crop_to_image, hm_to_image, areas = box_geometry(b, self.input_size, self.heatmap_size)
            crops = warp_crops(self._image(image, f"images[{i}]"), crop_to_image, self.input_size)
            index = torch.full((n,), i, dtype=torch.int64, device=self.device)
            box_index = torch.arange(start, start + n, dtype=torch.int64, device=self.device)
            pending.append([crops, hm_to_image, areas, b[:, 4], index, box_index])
            start += n
            while sum(p[0].shape[0] for p in pending) >= self.batch_size:
                fields = [torch.cat(f) for f in zip(*pending)]
                yield tuple(f[: self.batch_size] for f in fields)
                rest = [f[self.batch_size:] for f in fields]
                pending = [rest] if rest[0].shape[0] else []
        if pending:
            yield tuple(torch.cat(f) for f in zip(*pending))

    def _infer(self, crops, hm_to_image, areas, box_scores, image_index, box_index) -> tuple[Tensor, ...]:
        """One batch: network, flip merge, decode, rescoring; ``N·B`` candidates, instance-major."""
        B, N = crops.shape[0], self.num_instances
        x = self._normalise(crops)
        if self.flip_test:
            x = torch.cat([x, x.flip(3)])
        with torch.no_grad(), self._autocast():
            hm = self.model.forward_instances(x)  # [N, B or 2B, K, h, w]
        self._check_heatmaps(hm)
        if self.flip_test:
            hm = self._merge_flip(hm, B)
        coords, maxvals = decode_heatmaps(hm.reshape(N * B, *hm.shape[-3:]), self.decode,
                                          affine=hm_to_image.repeat(N, 1, 1))
        keypoints = torch.cat([coords, maxvals[..., None]], -1)
        # HRNet rescoring: box score x mean of the joint scores above the threshold (0 if none)
        valid = maxvals > self.keypoint_score_threshold
        joint_mean = (maxvals * valid).sum(1) / valid.sum(1).clamp(min=1)
        factors = [1.0] + [self.secondary_score_factor] * (N - 1)
        box_scores = torch.cat([box_scores * f for f in factors])
        instance = torch.arange(N, device=self.device).repeat_interleave(B)
        return (keypoints, box_scores * joint_mean, areas.repeat(N), image_index.repeat(N), box_index.repeat(N),
                instance)

    # ------------------------------------------------------------------ public API
    def predict_tensors(self, images: Sequence[ImageLike], boxes: Sequence[BoxesLike],
                        validate: Optional[bool] = None) -> PoseCandidates:
        """All candidates of ``images`` with their person ``boxes`` (one entry per image), on the device.

        No device-to-host copy; with device (or pinned host) inputs no host synchronisation.
        ``validate=True`` also checks device boxes (finite, positive size), which synchronises;
        host boxes are always checked.
        """
        images = list(images)
        boxes = list(boxes)
        if len(images) != len(boxes):
            raise ValueError(f"images and boxes must have one entry per image, got {len(images)} and {len(boxes)}")
        box_tensors = [self._boxes(b, f"boxes[{i}]", validate) for i, b in enumerate(boxes)]
        parts = [self._infer(*batch) for batch in self._batches(images, box_tensors)]
        if parts:
            keypoints, scores, areas, image_index, box_index, instance = (torch.cat(f) for f in zip(*parts))
        else:
            K = self.num_keypoints
            keypoints = torch.zeros(0, K, 3, device=self.device)
            scores, areas = torch.zeros(0, device=self.device), torch.zeros(0, device=self.device)
            image_index = box_index = instance = torch.zeros(0, dtype=torch.int64, device=self.device)
        keep, counts = oks_nms_mask(keypoints, scores, areas, image_index, max(len(images), 1), sigmas=self._sigmas,
                                    threshold=self.nms_threshold)
        return PoseCandidates(keypoints, scores, areas, image_index, box_index, instance, keep, counts[: len(images)])

    def predict(self, images: Sequence[ImageLike], boxes: Sequence[BoxesLike],
                image_ids: Optional[Sequence[Any]] = None,
                output: Union[str, os.PathLike, None] = None) -> list[dict]:
        """COCO keypoint results (``image_id``, ``category_id`` 1, ``keypoints`` [3K], ``score``).

        ``image_ids``: one per image (default ``0 .. len(images) - 1``); ``output``: also
        write the results to this JSON file.
        """
        images = list(images)
        if image_ids is None:
            image_ids = list(range(len(images)))
        elif len(image_ids) != len(images):
            raise ValueError(f"image_ids must have one id per image, got {len(image_ids)} for {len(images)} images")
        results = self.predict_tensors(images, boxes).to_results(image_ids)
        if output is not None:
            save_results(results, output)
        return results

    def predict_detections(self, detections: Union[str, os.PathLike], image_dir: Union[str, os.PathLike],
                           image_ids: Optional[Sequence[int]] = None,
                           file_names: Union[Mapping[int, str], Callable[[int], str], None] = None,
                           score_threshold: float = 0.0,
                           output: Union[str, os.PathLike, None] = None) -> list[dict]:
        """Poses for a COCO detection results file (person boxes, ``category_id`` 1).

        ``image_ids``: the images to run (default: every image with a detection, ascending);
        ``file_names``: image id -> file name in ``image_dir`` (a mapping or a function;
        default COCO's ``f"{image_id:012d}.jpg"``); boxes with ``score < score_threshold`` are
        dropped (HRNet's ``IMAGE_THRE``).
        """
        dets = load_detections(detections, score_threshold)
        by_image: dict[Any, list[list[float]]] = {}
        for d in dets:
            by_image.setdefault(d["image_id"], []).append(d["bbox"] + [d["score"]])
        ids = sorted(by_image) if image_ids is None else list(image_ids)
        if file_names is None:
            def name_of(i):
                return f"{int(i):012d}.jpg"
        elif callable(file_names):
            name_of = file_names
        else:
            name_of = file_names.__getitem__
        image_dir = Path(image_dir)
        images = [image_dir / name_of(i) for i in ids]
        boxes = [np.asarray(by_image.get(i, []), dtype=np.float64).reshape(-1, 5) for i in ids]
        return self.predict(images, boxes, ids, output)

    def predict_lambda_sweep(self, image: ImageLike, box: BoxesLike, steps: int = 11) -> LambdaSweep:
        """The paper's continuous-λ visualisation: keypoints of one box for ``λ = [1 - t, t]``
        (zeros for instances >= 2), ``t = linspace(0, 1, steps)``, through the soft selector
        ``model(images, lam=[steps, N] float)``.  ``t = 0`` is instance 0, ``t = 1`` instance 1."""
        if self.num_instances < 2:
            raise ValueError(f"predict_lambda_sweep needs a MIPNet model (num_instances >= 2), got "
                             f"num_instances={self.num_instances}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
            raise ValueError(f"steps must be an int >= 2, got {steps!r}")
        b = check_boxes(np.asarray(box, dtype=np.float64).reshape(1, -1), "box")
        bt = _to_device(torch.from_numpy(b).float(), self.device)
        crop_to_image, hm_to_image, _ = box_geometry(bt, self.input_size, self.heatmap_size)
        crop = self._normalise(warp_crops(self._image(image, "image"), crop_to_image, self.input_size))
        t = torch.linspace(0.0, 1.0, steps, device=self.device)
        lam = torch.zeros(steps, self.num_instances, device=self.device)
        lam[:, 0], lam[:, 1] = 1.0 - t, t
        x = crop.expand(steps, -1, -1, -1)
        if self.flip_test:
            x, lam = torch.cat([x, x.flip(3)]), torch.cat([lam, lam])
        with torch.no_grad(), self._autocast():
            hm = self.model(x, lam)
        self._check_heatmaps(hm)
        if self.flip_test:
            hm = self._merge_flip(hm, steps)
        coords, maxvals = decode_heatmaps(hm, self.decode, affine=hm_to_image.expand(steps, 2, 3))
        keypoints = torch.cat([coords, maxvals[..., None]], -1)
        return LambdaSweep(t.cpu().numpy(), keypoints.cpu().numpy(), b[0])


def draw_lambda_sweep(image: ImageLike, sweep: LambdaSweep, skeleton: Optional[Sequence[Sequence[int]]] = None,
                      path: Union[str, os.PathLike, None] = None, ax=None):
    """Draw a :class:`LambdaSweep` on the image around its box: one skeleton per ``t``,
    coloured from instance 0 (``t = 0``, blue) to instance 1 (``t = 1``, red).

    Draws into ``ax`` when given, else into a new :class:`matplotlib.figure.Figure` (no
    pyplot state is touched); ``path`` also saves the figure (PNG).  Returns the figure.
    ``skeleton``: 1-based joint pairs (default COCO's or CrowdPose's by the number of joints).
    """
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    K = sweep.keypoints.shape[1]
    if skeleton is None:
        skeleton = {17: COCO_SKELETON, 14: CROWDPOSE_SKELETON}.get(K, ())
    rgb = image_to_chw(image, "image").permute(1, 2, 0).cpu().numpy()
    if ax is None:
        ax = Figure(figsize=(5, 6)).add_subplot(1, 1, 1)
    ax.imshow(rgb)
    cmap = matplotlib.colormaps["coolwarm"]
    for t, kp in zip(sweep.t, sweep.keypoints):
        color = cmap(float(t))
        for a, b in skeleton:
            ax.plot(kp[[a - 1, b - 1], 0], kp[[a - 1, b - 1], 1], color=color, linewidth=1.5, alpha=0.8)
        ax.scatter(kp[:, 0], kp[:, 1], s=8, color=color)
    x, y, w, h = sweep.box[:4]
    ax.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor="white", linewidth=1, linestyle="--"))
    ax.set_xlim(max(x - 0.25 * w, 0), min(x + 1.25 * w, rgb.shape[1]))
    ax.set_ylim(min(y + 1.25 * h, rgb.shape[0]), max(y - 0.25 * h, 0))
    ax.set_title("λ = [1 - t, t]: t = 0 (blue, instance 0) → t = 1 (red, instance 1)")
    ax.axis("off")
    if path is not None:
        ax.figure.savefig(path, dpi=100, bbox_inches="tight")
    return ax.figure


__all__ = [
    "LambdaSweep", "PoseCandidates", "TopDownPredictor", "box_geometry", "check_boxes", "draw_lambda_sweep",
    "image_to_chw", "sampling_grid", "save_results", "warp_crops",
]
