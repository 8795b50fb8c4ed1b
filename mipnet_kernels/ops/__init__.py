"""Public ops: one module per op (schema, reference, fake, autograd, backend routing)."""

from .decode import decode_heatmaps, decode_heatmaps_reference, flip_merge, flip_merge_reference
from .nms import oks_iou, oks_nms, oks_nms_mask, soft_oks_nms, soft_oks_nms_mask

__all__ = [
    "decode_heatmaps",
    "decode_heatmaps_reference",
    "flip_merge",
    "flip_merge_reference",
    "oks_iou",
    "oks_nms",
    "oks_nms_mask",
    "soft_oks_nms",
    "soft_oks_nms_mask",
]
