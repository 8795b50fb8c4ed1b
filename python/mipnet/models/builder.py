"""``build_model(arch, num_instances, num_keypoints)``: the paper's architectures by name."""

from __future__ import annotations

from .common import PoseNet
from .hrnet import PoseHighResolutionNet
from .resnet import PoseResNet

#: arch name -> (model class, its size argument: HRNet width or ResNet depth)
ARCHS = {
    "hrnet_w32": (PoseHighResolutionNet, 32),
    "hrnet_w48": (PoseHighResolutionNet, 48),
    "resnet50": (PoseResNet, 50),
    "resnet101": (PoseResNet, 101),
    "resnet152": (PoseResNet, 152),
}


def build_model(arch: str, num_instances: int = 1, num_keypoints: int = 17) -> PoseNet:
    """HRNet (``hrnet_w32``, ``hrnet_w48``) or SimpleBaseline (``resnet50/101/152``).

    ``num_instances=1`` is the plain baseline; ``>= 2`` is MIPNet with the MIMBs where the
    official code puts them (HRNet: on the 4 inputs of stage 4 and on its output; ResNet: on
    the inputs of ``layer3`` and ``layer4``).  Weights follow the official initialisation;
    load trained ones with :func:`mipnet.models.load_checkpoint`.
    """
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}; got {arch!r}")
    cls, size = ARCHS[arch]
    model = cls(size, num_keypoints=num_keypoints, num_instances=num_instances)
    model.arch = arch
    return model


__all__ = ["ARCHS", "build_model"]
