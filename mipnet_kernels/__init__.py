"""mipnet_kernels: fused kernels for Multi-Instance Pose Networks (MIPNet, ICCV 2021).

Every op is a ``torch.library`` op under ``torch.ops.mipnet`` with four backends
(``cuda``, ``triton``, ``cpu``, ``reference``), declared once in
:mod:`mipnet_kernels._backends`; :func:`backends_for` says which of them can run given
inputs and why the others cannot.  docs/ops.md maps where each op lives.
"""

from . import _extension
from ._extension import cpu_isas, get_cpu_isa, set_cpu_isa, use_cpu_isa
from ._backends import (
    BACKENDS,
    available_backends,
    backends_for,
    get_backend,
    select,
    set_backend,
    use_backend,
)
from .keypoints import COCO_FLIP_PAIRS, COCO_SIGMAS, CROWDPOSE_FLIP_PAIRS, CROWDPOSE_SIGMAS
from .ops import decode_heatmaps, flip_merge
from .ops.mimb import mimb, mimb_instances, mimb_instances_grouped, mimb_scale, mimb_scale_grouped
from .ops.nms import oks_iou, oks_nms, oks_nms_mask, soft_oks_nms, soft_oks_nms_mask
from .nn import MIMB

__version__ = "0.1.0"

# Load the compiled kernels (registers torch.ops.mipnet_cpu / mipnet_cuda) and say once
# what is missing.
_extension.warn_if_missing()

__all__ = [
    "BACKENDS",
    "COCO_FLIP_PAIRS",
    "COCO_SIGMAS",
    "CROWDPOSE_FLIP_PAIRS",
    "CROWDPOSE_SIGMAS",
    "MIMB",
    "available_backends",
    "backends_for",
    "cpu_isas",
    "decode_heatmaps",
    "flip_merge",
    "get_backend",
    "get_cpu_isa",
    "mimb",
    "mimb_instances",
    "mimb_instances_grouped",
    "mimb_scale",
    "mimb_scale_grouped",
    "oks_iou",
    "oks_nms",
    "oks_nms_mask",
    "select",
    "set_backend",
    "set_cpu_isa",
    "soft_oks_nms",
    "soft_oks_nms_mask",
    "use_backend",
    "use_cpu_isa",
]
