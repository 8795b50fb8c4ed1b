"""Small pose networks for CPU demos and tests (``model.arch = "resnet_tiny"``).

Registered in :data:`mipnet.models.ARCHS` beside the paper's architectures, so every
config, checkpoint and command takes them by name.
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from .common import BasicBlock, BN_MOMENTUM, MIMBGroup, PoseNet, Selector, init_normal_, make_res_layer


class TinyPoseResNet(PoseNet):
    """A small SimpleBaseline (Xiao et al. 2018) for CPU demos: a 3×3 stride-2 stem, one basic
    block per stage at strides 4/8/16/32 (``widths``), three 4×4 stride-2 deconvolutions to
    stride 4, a 1×1 head.  MIPNet (N >= 2) puts a MIMB on the inputs of ``layer3`` and
    ``layer4``, where :class:`~mipnet.models.PoseResNet` (the official model) has them."""

    def __init__(self, num_keypoints: int = 17, num_instances: int = 1,
                 widths: Sequence[int] = (32, 64, 128, 256), deconv: int = 48) -> None:
        super().__init__()
        self.num_keypoints, self.num_instances = num_keypoints, num_instances
        self.conv1 = nn.Conv2d(3, 32, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(32, momentum=BN_MOMENTUM)
        self.relu = nn.ReLU(inplace=True)
        inplanes = 32
        for i, planes in enumerate(widths):
            setattr(self, f"layer{i + 1}", make_res_layer(BasicBlock, inplanes, planes, 1, stride=2))
            inplanes = planes
        layers = []
        for _ in range(3):
            layers += [nn.ConvTranspose2d(inplanes, deconv, 4, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(deconv, momentum=BN_MOMENTUM), nn.ReLU(inplace=True)]
            inplanes = deconv
        self.deconv_layers = nn.Sequential(*layers)
        self.final_layer = nn.Conv2d(deconv, num_keypoints, 1)
        self.layer3_se = MIMBGroup([widths[1]], num_instances) if num_instances > 1 else None
        self.layer4_se = MIMBGroup([widths[2]], num_instances) if num_instances > 1 else None
        # PyTorch's default (Kaiming-uniform) init everywhere but the head: trained from scratch
        # for minutes, it leaves the loss plateau far sooner than the official N(0, 0.001).
        init_normal_(self.final_layer, nn.Conv2d)

    def _trunk(self, images: Tensor) -> Tensor:
        return self.layer2(self.layer1(self.relu(self.bn1(self.conv1(images)))))

    def _tail(self, x: Tensor, lam: Selector | None) -> Tensor:
        if self.layer3_se is not None:
            x = self.layer3_se([x], lam, first=True)[0]
        x = self.layer3(x)
        if self.layer4_se is not None:
            x = self.layer4_se([x], lam)[0]
        return self.final_layer(self.deconv_layers(self.layer4(x)))


#: Small architectures for demos and tests, usable as ``model.arch`` anywhere
#: (:func:`mipnet.models.build_model` builds them).
SMALL_ARCHS = {"resnet_tiny": TinyPoseResNet}

