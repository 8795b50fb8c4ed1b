"""Data for MIPNet: COCO-format keypoint datasets, multi-instance targets, augmentation, synthetic crowds.

- :mod:`mipnet.data.coco`: :class:`KeypointDataset` (COCO / CrowdPose / OCHuman, GT or detection boxes);
- :mod:`mipnet.data.targets`: instance selection and Gaussian targets of the paper's Eq. 1;
- :mod:`mipnet.data.transforms`: HRNet crop geometry (box -> centre/scale -> affine and back) and augmentation;
- :mod:`mipnet.data.synthetic`: a generator of crowded synthetic scenes with COCO annotations.
"""

from .coco import DATASET_KINDS, KeypointDataset, KeypointSpec, keypoint_spec, load_coco, load_detections
from .targets import SELECTIONS, build_targets, default_sigma, gaussian_heatmaps, select_instances, visible_in_crop
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PIXEL_STD,
    AugmentConfig,
    CropParams,
    box_affines,
    box_to_center_scale,
    compose_affine,
    flip_keypoints,
    get_affine,
    heatmap_to_image_affine,
    invert_affine,
    normalize_image,
    read_image_rgb,
    sample_augmentation,
    transform_points,
    warp_to_crop,
)

__all__ = [
    "DATASET_KINDS", "KeypointDataset", "KeypointSpec", "keypoint_spec", "load_coco", "load_detections",
    "SELECTIONS", "build_targets", "default_sigma", "gaussian_heatmaps", "select_instances", "visible_in_crop",
    "IMAGENET_MEAN", "IMAGENET_STD", "PIXEL_STD", "AugmentConfig", "CropParams", "box_affines", "box_to_center_scale",
    "compose_affine", "flip_keypoints", "get_affine", "heatmap_to_image_affine", "invert_affine",
    "normalize_image", "read_image_rgb", "sample_augmentation", "transform_points", "warp_to_crop",
]
