"""Top-down crop geometry and training augmentation (the HRNet conventions, made explicit).

Box -> crop (HRNet, Xiao et al. / Sun et al.):

* a box ``[x, y, w, h]`` becomes a *centre* ``(x + w/2, y + h/2)`` and a *scale*
  ``(w', h') / pixel_std`` where ``(w', h')`` is the box grown in one direction to the
  input's aspect ratio ``W/H`` and then multiplied by the padding ``1.25``; ``pixel_std``
  is 200 (a historical unit kept so checkpoints, configs and results stay comparable).
* the crop affine is the similarity that maps the centre to the crop point
  ``(W/2, H/2)``, rotates by ``rotation`` degrees and zooms by ``W / (scale_x * pixel_std)``
  (the scale's width spans the crop's width; the height follows from the fixed aspect
  ratio).  Note HRNet's half-pixel convention: the centre goes to ``W/2``, not
  ``(W-1)/2``.
* heatmaps are ``stride = W / w`` times smaller than the crop: heatmap pixel ``(x, y)`` is
  crop pixel ``(stride·x, stride·y)``.  :func:`heatmap_to_image_affine` composes this with
  the inverse crop affine into the ``[..., 2, 3]`` matrix that
  ``mipnet_kernels.decode_heatmaps(affine=...)`` expects.

Sizes are ``(height, width)`` throughout (``(256, 192)`` is the paper's 256×192), and points
are ``(x, y)`` = (column, row).  Every geometry function is vectorised over leading dims.

Augmentation (:class:`AugmentConfig`, :func:`sample_augmentation`) follows the paper
(rotation in [-45°, 45°], scale in [0.65, 1.35], flip, half-body crops) with HRNet's
sampling; a horizontal flip is folded into the crop affine (image flip, then crop), so the
affine always maps the *original* image and only the left/right joint channels swap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np
import torch

from mipnet_kernels.ops.decode import flip_index_from_pairs

PIXEL_STD = 200.0
BOX_PADDING = 1.25
HALF_BODY_PADDING = 1.5
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def parse_size(size: Sequence[int], name: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be (height, width), got {size!r}") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"{name} must be positive (height, width), got {size!r}")
    return h, w


def box_to_center_scale(
    box, aspect_ratio: float, padding: float = BOX_PADDING, pixel_std: float = PIXEL_STD
) -> tuple[np.ndarray, np.ndarray]:
    """``[..., 4]`` boxes ``[x, y, w, h]`` -> centres ``[..., 2]`` and scales ``[..., 2]`` (HRNet).

    ``aspect_ratio`` is the crop's ``width / height`` (0.75 for 256×192).
    """
    box = np.asarray(box, dtype=np.float64)
    if box.shape[-1:] != (4,):
        raise ValueError(f"box must have shape [..., 4] (x, y, w, h), got {box.shape}")
    if not aspect_ratio > 0:
        raise ValueError(f"aspect_ratio must be positive, got {aspect_ratio}")
    x, y, w, h = np.moveaxis(box, -1, 0)
    center = np.stack([x + 0.5 * w, y + 0.5 * h], axis=-1)
    w_fit = np.maximum(w, h * aspect_ratio)
    h_fit = np.maximum(h, w / aspect_ratio)
    scale = np.stack([w_fit, h_fit], axis=-1) * (padding / pixel_std)
    return center, scale


def get_affine(
    center, scale, rotation, output_size: Sequence[int], pixel_std: float = PIXEL_STD
) -> np.ndarray:
    """Image -> crop affine ``[..., 2, 3]`` (float64) of HRNet's ``get_affine_transform``.

    ``q = k · R(-θ) · (p - center) + (W/2, H/2)`` with ``k = W / (scale_x · pixel_std)``;
    ``rotation`` θ in degrees; positive θ turns the content counter-clockwise as displayed
    (a point right of the centre lands above it for θ = 90).
    """
    H, W = parse_size(output_size, "output_size")
    center = np.asarray(center, dtype=np.float64)
    scale = np.asarray(scale, dtype=np.float64)
    theta = np.deg2rad(np.asarray(rotation, dtype=np.float64))
    if center.shape[-1:] != (2,) or scale.shape[-1:] != (2,):
        raise ValueError(
            f"center and scale must have shape [..., 2], got {center.shape} and {scale.shape}"
        )
    if np.any(scale[..., 0] <= 0):
        raise ValueError("scale must be positive")
    k = W / (scale[..., 0] * pixel_std)
    c, s = k * np.cos(theta), k * np.sin(theta)
    c, s, k = np.broadcast_arrays(c, s, k)
    lead = np.broadcast_shapes(center.shape[:-1], c.shape)
    A = np.empty(lead + (2, 3), dtype=np.float64)
    A[..., 0, 0], A[..., 0, 1] = c, s
    A[..., 1, 0], A[..., 1, 1] = -s, c
    cx, cy = center[..., 0], center[..., 1]
    A[..., 0, 2] = W / 2 - (c * cx + s * cy)
    A[..., 1, 2] = H / 2 - (-s * cx + c * cy)
    return A


def invert_affine(affine) -> np.ndarray:
    """Inverse of ``[..., 2, 3]`` affine maps (float64, closed form)."""
    A = np.asarray(affine, dtype=np.float64)
    if A.shape[-2:] != (2, 3):
        raise ValueError(f"affine must have shape [..., 2, 3], got {A.shape}")
    a, b, tx = A[..., 0, 0], A[..., 0, 1], A[..., 0, 2]
    c, d, ty = A[..., 1, 0], A[..., 1, 1], A[..., 1, 2]
    det = a * d - b * c
    if np.any(det == 0):
        raise ValueError("affine is singular and cannot be inverted")
    inv = np.empty_like(A)
    inv[..., 0, 0], inv[..., 0, 1] = d / det, -b / det
    inv[..., 1, 0], inv[..., 1, 1] = -c / det, a / det
    inv[..., 0, 2] = -(inv[..., 0, 0] * tx + inv[..., 0, 1] * ty)
    inv[..., 1, 2] = -(inv[..., 1, 0] * tx + inv[..., 1, 1] * ty)
    return inv


def compose_affine(outer, inner) -> np.ndarray:
    """``outer ∘ inner`` for ``[..., 2, 3]`` maps (apply ``inner`` first)."""
    outer = np.asarray(outer, dtype=np.float64)
    inner = np.asarray(inner, dtype=np.float64)
    lin = outer[..., :2] @ inner[..., :2]
    t = (outer[..., :2] @ inner[..., 2:])[..., 0] + outer[..., 2]
    return np.concatenate([lin, t[..., None]], axis=-1)


def transform_points(points, affine) -> np.ndarray:
    """Apply ``[..., 2, 3]`` affine(s) to points ``[..., P, 2]`` (or ``[..., P, >=2]``: x, y first)."""
    pts = np.asarray(points, dtype=np.float64)[..., :2]
    A = np.asarray(affine, dtype=np.float64)
    return pts @ np.swapaxes(A[..., :2], -1, -2) + A[..., None, :, 2]


def flip_affine(image_width: int) -> np.ndarray:
    """Horizontal image flip ``x -> image_width - 1 - x`` as a ``[2, 3]`` affine (HRNet's convention)."""
    return np.array([[-1.0, 0.0, image_width - 1.0], [0.0, 1.0, 0.0]])


def flip_keypoints(keypoints, image_width: int, flip_pairs) -> np.ndarray:
    """Mirror ``[..., K, C]`` keypoints (x, y, then any extra columns) in an image of that width.

    x becomes ``image_width - 1 - x`` and the left/right joints of ``flip_pairs`` swap,
    so the result describes the flipped image with correct joint names.  Flipping twice
    is the identity.
    """
    kp = np.array(keypoints, dtype=np.float64)
    idx = flip_index_from_pairs(flip_pairs, kp.shape[-2])
    kp[..., 0] = image_width - 1.0 - kp[..., 0]
    return kp[..., idx, :]


def heatmap_to_image_affine(crop_to_image, input_size: Sequence[int], heatmap_size: Sequence[int]) -> np.ndarray:
    """``[..., 2, 3]`` map from heatmap pixels to image pixels: crop->image after ×stride."""
    H, W = parse_size(input_size, "input_size")
    h, w = parse_size(heatmap_size, "heatmap_size")
    stride = np.diag([W / w, H / h])
    A = np.asarray(crop_to_image, dtype=np.float64)
    return np.concatenate([A[..., :2] @ stride, A[..., 2:]], axis=-1)


def box_affines(
    boxes, input_size: Sequence[int], heatmap_size: Sequence[int], padding: float = BOX_PADDING
) -> tuple[np.ndarray, np.ndarray]:
    """For ``[..., 4]`` boxes (no augmentation): image->crop ``[..., 2, 3]`` and heatmap->image ``[..., 2, 3]``.

    What an inference engine needs per box: crop with the first (:func:`warp_to_crop`),
    decode with the second (``decode_heatmaps(..., affine=torch.from_numpy(m).float())``).
    """
    H, W = parse_size(input_size, "input_size")
    center, scale = box_to_center_scale(boxes, W / H, padding)
    image_to_crop = get_affine(center, scale, 0.0, (H, W))
    return image_to_crop, heatmap_to_image_affine(invert_affine(image_to_crop), (H, W), heatmap_size)


def warp_to_crop(image: np.ndarray, affine, input_size: Sequence[int]) -> np.ndarray:
    """Crop ``image`` (H×W×C) with the image->crop ``affine`` ``[2, 3]`` (bilinear, zero border)."""
    H, W = parse_size(input_size, "input_size")
    return cv2.warpAffine(
        image, np.asarray(affine, dtype=np.float64), (W, H), flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT, borderValue=0,
    )


def normalize_image(rgb: np.ndarray) -> torch.Tensor:
    """``uint8`` RGB ``H×W×3`` -> float32 ``[3, H, W]`` with ImageNet mean/std."""
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"image must be H×W×3 RGB, got shape {rgb.shape}")
    # NumPy, not torch: small per-sample ops in DataLoader workers should not touch the
    # intra-op thread pool (measured 20x slower on a busy 2-core machine).
    gain = np.float32(1.0 / 255.0) / np.asarray(IMAGENET_STD, dtype=np.float32)
    bias = np.asarray(IMAGENET_MEAN, dtype=np.float32) / np.asarray(IMAGENET_STD, dtype=np.float32)
    x = rgb.astype(np.float32) * gain - bias
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def read_image_rgb(path) -> np.ndarray:
    """Read an image file as ``uint8`` RGB ``H×W×3`` with OpenCV (EXIF orientation ignored, as HRNet)."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if image is None:
        raise FileNotFoundError(f"cannot read image {str(path)!r} (missing or not an image)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation of the paper (§4), sampled as HRNet/MIPNet's training code does.

    * scale: ``scale *= clip(1 + N(0, scale_factor), 1 - scale_factor, 1 + scale_factor)``
      (0.35 -> [0.65, 1.35]);
    * rotation (with probability ``rotation_prob``): ``clip(N(0, rotation_factor), ±rotation_limit)``
      degrees.  The paper states [-45°, 45°]; the official code clips at ``2 · rotation_factor``
      = ±90°: set ``rotation_limit=90`` to reproduce it;
    * flip with probability ``flip_prob`` (joint channels swap);
    * half-body (with probability ``half_body_prob`` when the primary has more than
      ``half_body_min_joints`` labelled joints): the crop is refitted to the upper or lower
      body joints (each side chosen with probability 1/2 when it has more than 2 joints —
      the official code draws ``randn() < 0.5`` here, a bias towards the upper body we do
      not copy), padded ×1.5.
    """

    scale_factor: float = 0.35
    rotation_factor: float = 45.0
    rotation_limit: float = 45.0
    rotation_prob: float = 0.6
    flip_prob: float = 0.5
    half_body_prob: float = 0.3
    half_body_min_joints: int = 8

    def __post_init__(self):
        for name in ("scale_factor", "rotation_factor", "rotation_limit"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"AugmentConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.scale_factor >= 1:
            raise ValueError(f"AugmentConfig.scale_factor must be < 1, got {self.scale_factor}")
        for name in ("rotation_prob", "flip_prob", "half_body_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"AugmentConfig.{name} must be in [0, 1], got {getattr(self, name)}")


@dataclass(frozen=True)
class CropParams:
    """One crop: centre/scale in original-image pixels, rotation (degrees), and whether flipped."""

    center: np.ndarray
    scale: np.ndarray
    rotation: float = 0.0
    flip: bool = False

    def image_to_crop(self, input_size: Sequence[int], image_width: int) -> np.ndarray:
        """``[2, 3]`` affine original image -> crop; a flip mirrors the image first (HRNet)."""
        if not self.flip:
            return get_affine(self.center, self.scale, self.rotation, input_size)
        mirrored_center = np.array([image_width - 1.0 - self.center[0], self.center[1]])
        crop = get_affine(mirrored_center, self.scale, self.rotation, input_size)
        return compose_affine(crop, flip_affine(image_width))


def half_body_center_scale(
    keypoints: np.ndarray, upper_body_ids: Sequence[int], aspect_ratio: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray] | None:
    """Centre/scale of a crop around the upper or lower body's labelled joints (HRNet), or None."""
    labelled = keypoints[:, 2] > 0
    upper_mask = np.zeros(len(keypoints), dtype=bool)
    upper_mask[list(upper_body_ids)] = True
    upper = keypoints[labelled & upper_mask, :2]
    lower = keypoints[labelled & ~upper_mask, :2]
    if rng.random() < 0.5 and len(upper) > 2:
        chosen = upper
    else:
        chosen = lower if len(lower) > 2 else upper
    if len(chosen) < 2:
        return None
    lo, hi = chosen.min(axis=0), chosen.max(axis=0)
    box = np.array([lo[0], lo[1], hi[0] - lo[0], hi[1] - lo[1]])
    _, scale = box_to_center_scale(box, aspect_ratio, padding=HALF_BODY_PADDING)
    if not np.all(scale > 0):
        return None
    return chosen.mean(axis=0), scale


def sample_augmentation(
    rng: np.random.Generator,
    center: np.ndarray,
    scale: np.ndarray,
    keypoints: np.ndarray,
    config: AugmentConfig,
    upper_body_ids: Sequence[int],
    aspect_ratio: float,
) -> CropParams:
    """Draw one training crop for a person (``keypoints [K, 3]`` of the primary, image pixels)."""
    center = np.asarray(center, dtype=np.float64)
    scale = np.asarray(scale, dtype=np.float64)
    if (
        config.half_body_prob > 0
        and int((keypoints[:, 2] > 0).sum()) > config.half_body_min_joints
        and rng.random() < config.half_body_prob
    ):
        half = half_body_center_scale(keypoints, upper_body_ids, aspect_ratio, rng)
        if half is not None:
            center, scale = half
    sf = config.scale_factor
    scale = scale * float(np.clip(1.0 + sf * rng.standard_normal(), 1.0 - sf, 1.0 + sf))
    rotation = 0.0
    if rng.random() < config.rotation_prob:
        lim = config.rotation_limit
        rotation = float(np.clip(config.rotation_factor * rng.standard_normal(), -lim, lim))
    flip = bool(rng.random() < config.flip_prob)
    return CropParams(center=center, scale=scale, rotation=rotation, flip=flip)

