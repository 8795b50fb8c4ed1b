"""``build_model(arch, num_instances, num_keypoints)``: the paper's architectures, and the
small demo nets of :mod:`mipnet.models.small`, by name."""

from __future__ import annotations

from .common import PoseNet
from .hrnet import PoseHighResolutionNet
from .resnet import PoseResNet
from .small import SMALL_ARCHS

#: arch name -> (model class, its size argument: HRNet width or ResNet depth)
ARCHS = {
    "hrnet_w32": (PoseHighResolutionNet, 32),
    "hrnet_w48": (PoseHighResolutionNet, 48),
    "resnet50": (PoseResNet, 50),
    "resnet101": (PoseResNet, 101),
    "resnet152": (PoseResNet, 152),
}


def arch_names() -> tuple[str, ...]:
    """Every name :func:`build_model` takes: the paper's architectures, then the small nets."""
    return tuple(ARCHS) + tuple(SMALL_ARCHS)


def build_model(arch: str, num_instances: int = 1, num_keypoints: int = 17) -> PoseNet:
    """HRNet (``hrnet_w32``, ``hrnet_w48``) or SimpleBaseline (``resnet50/101/152``).

    ``num_instances=1`` is the plain baseline; ``>= 2`` is MIPNet with the MIMBs where the
    official code puts them (HRNet: on the 4 inputs of stage 4 and on its output; ResNet: on
    the inputs of ``layer3`` and ``layer4``).  Weights follow the official initialisation;
    load trained ones with :func:`mipnet.models.load_checkpoint`.  The small demo nets
    (:data:`SMALL_ARCHS`, e.g. ``resnet_tiny``) are built the same way.
    """
    if arch in SMALL_ARCHS:
        model = SMALL_ARCHS[arch](num_keypoints=num_keypoints, num_instances=num_instances)
    elif arch in ARCHS:
        cls, size = ARCHS[arch]
        model = cls(size, num_keypoints=num_keypoints, num_instances=num_instances)
    else:
        raise ValueError(f"arch must be one of {', '.join(arch_names())}; got {arch!r}")
    model.arch = arch
    return model


__all__ = ["ARCHS", "SMALL_ARCHS", "arch_names", "build_model"]
