"""Public ops, one module or package per op family: ``decode`` (decode_heatmaps, flip_merge),
``nms`` (OKS, greedy and soft OKS-NMS), ``mimb`` (the Multi-Instance Modulation Block).

Each family holds its references, its kernel tables (:func:`mipnet_kernels._backends.define_kernels`)
and its ``torch.library`` ops (:func:`mipnet_kernels.ops._registry.define_op`); docs/ops.md
maps where every piece lives.
"""

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
