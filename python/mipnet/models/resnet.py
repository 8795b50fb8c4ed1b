"""SimpleBaseline (Xiao et al., ECCV 2018): ResNet + 3 deconvolutions, and its MIPNet version.

The architecture and parameter names follow the official ``lib/models/pose_resnet.py``
(human-pose-estimation.pytorch / deep-high-resolution-net.pytorch) and MIPNet's
``lib/models/pose_resnet_se_lambda.py`` (``MODEL.SE_MODULES [False, False, True, True]``):

* ``conv1`` (7x7 stride 2), ``bn1``, max-pool, ``layer1..4`` (bottlenecks; 3-4-6-3,
  3-4-23-3 and 3-8-36-3 for ResNet-50/101/152), stride 32 in all;
* ``deconv_layers``: 3 x (4x4 stride-2 transposed conv to 256 ch without bias, BN, ReLU),
  back to stride 4; ``final_layer``: 1x1 conv to K heatmaps.
* MIPNet (N >= 2): ``layer3_se`` -- a MIMB on the input of ``layer3`` (512 ch) -- and
  ``layer4_se`` -- a MIMB on the input of ``layer4`` (1024 ch).
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .common import BN_MOMENTUM, Bottleneck, MIMBGroup, PoseNet, Selector, init_normal_, make_res_layer

#: Bottlenecks per layer of each depth (He et al. 2016).
RESNET_LAYERS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
#: The deconvolution head of the paper's SimpleBaseline: 3 layers, 256 filters, 4x4 kernels.
DECONV_FILTERS, DECONV_KERNEL = (256, 256, 256), 4


class PoseResNet(PoseNet):
    """SimpleBaseline ResNet-``depth``; MIPNet when ``num_instances >= 2``.

    Args:
        depth: 50, 101 or 152.
        num_keypoints: K, the heatmaps predicted.
        num_instances: N; 1 builds the plain SimpleBaseline (no MIMB, ``lam`` ignored).
    """

    def __init__(self, depth: int = 50, num_keypoints: int = 17, num_instances: int = 1) -> None:
        super().__init__()
        if depth not in RESNET_LAYERS:
            raise ValueError(f"depth must be one of {sorted(RESNET_LAYERS)}, got {depth!r}")
        for name, val in (("num_keypoints", num_keypoints), ("num_instances", num_instances)):
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        self.depth, self.num_keypoints, self.num_instances = depth, num_keypoints, num_instances
        blocks = RESNET_LAYERS[depth]

        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64, momentum=BN_MOMENTUM)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks)):
            setattr(self, f"layer{i + 1}", make_res_layer(Bottleneck, inplanes, planes, n, stride=1 if i == 0 else 2))
            inplanes = planes * Bottleneck.expansion

        deconv = []
        for planes in DECONV_FILTERS:  # kernel 4, stride 2, padding 1: exactly x2
            deconv += [
                nn.ConvTranspose2d(inplanes, planes, DECONV_KERNEL, stride=2, padding=1, output_padding=0, bias=False),
                nn.BatchNorm2d(planes, momentum=BN_MOMENTUM),
                nn.ReLU(inplace=True),
            ]
            inplanes = planes
        self.deconv_layers = nn.Sequential(*deconv)
        self.final_layer = nn.Conv2d(inplanes, num_keypoints, kernel_size=1, stride=1, padding=0)

        self.layer3_se: Optional[MIMBGroup] = None
        self.layer4_se: Optional[MIMBGroup] = None
        if num_instances > 1:
            self.layer3_se = MIMBGroup([128 * Bottleneck.expansion], num_instances)
            self.layer4_se = MIMBGroup([256 * Bottleneck.expansion], num_instances)
        self.init_weights()

    def init_weights(self) -> None:
        """The official initialisation without a pretrained backbone: conv and transposed-conv
        weights N(0, 0.001), biases 0, BatchNorm2d 1 / 0 (the MIMBs keep their defaults)."""
        init_normal_(self, nn.Conv2d, nn.ConvTranspose2d)

    def _trunk(self, images: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        return self.layer2(self.layer1(x))

    def _tail(self, x: Tensor, lam: Optional[Selector]) -> Tensor:
        if self.layer3_se is not None:
            x = self.layer3_se([x], lam, first=True)[0]
        x = self.layer3(x)
        if self.layer4_se is not None:
            x = self.layer4_se([x], lam)[0]
        x = self.layer4(x)
        return self.final_layer(self.deconv_layers(x))


__all__ = ["PoseResNet", "RESNET_LAYERS"]
