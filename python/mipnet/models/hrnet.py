"""HRNet for top-down pose estimation (Sun et al., CVPR 2019) and its MIPNet version.

The architecture and every parameter name follow the official pose models --
``lib/models/pose_hrnet.py`` of HRNet's deep-high-resolution-net.pytorch (baseline) and
``lib/models/pose_hrnet_se_lambda.py`` of MIPNet (``MODEL.SE_MODULES [False, False, True,
True]``) -- so their checkpoints load without renaming:

* stem ``conv1, bn1, conv2, bn2`` (two stride-2 3x3 convs), ``layer1`` (4 bottlenecks, 256 ch);
* ``transition1..3`` and ``stage2..4`` (1, 4 and 3 multi-resolution modules with 2, 3 and 4
  branches of widths ``C, 2C, 4C, 8C``; each module: 4 basic blocks per branch, then the
  fuse layers that sum every branch into every output branch); the last module of stage 4
  outputs only the highest-resolution branch;
* ``final_layer``: 1x1 conv to K heatmaps at 1/4 of the input resolution.
* MIPNet (N >= 2): ``stage3_se`` -- one MIMB per branch on the inputs of stage 4 (4 blocks)
  and ``stage4_se`` -- one MIMB on stage 4's output (5 blocks in all).

``transition*`` and ``fuse_layers`` hold ``None`` where the official ones do (identity
branches), which keeps the official indices.
"""

from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor, nn

from .common import (
    BN_MOMENTUM,
    BasicBlock,
    Bottleneck,
    MIMBGroup,
    PoseNet,
    Selector,
    init_normal_,
    make_res_layer,
)

#: Blocks per branch and modules per stage of the official W32 / W48 pose configs.
STAGE_MODULES = {2: 1, 3: 4, 4: 3}
BLOCKS_PER_BRANCH = 4


class HighResolutionModule(nn.Module):
    """One HRNet module: ``branches[i]`` (basic blocks at branch i's resolution), then
    ``fuse_layers[i][j]`` bringing branch j to branch i (1x1 conv-BN + nearest upsampling
    from lower resolutions, chains of stride-2 3x3 conv-BN from higher ones; None for j == i),
    summed and passed through a ReLU.  With ``multi_scale_output=False`` only branch 0 is output.
    """

    def __init__(self, channels: Sequence[int], num_blocks: int, multi_scale_output: bool = True) -> None:
        super().__init__()
        self.num_branches = len(channels)
        self.branches = nn.ModuleList(
            make_res_layer(BasicBlock, c, c, num_blocks) for c in channels
        )
        outputs = self.num_branches if multi_scale_output else 1
        self.fuse_layers = (
            nn.ModuleList(
                nn.ModuleList(self._fuse_layer(channels, i, j) for j in range(self.num_branches))
                for i in range(outputs)
            )
            if self.num_branches > 1 else None
        )
        self.relu = nn.ReLU(inplace=True)

    @staticmethod
    def _fuse_layer(channels: Sequence[int], i: int, j: int) -> Optional[nn.Module]:
        if j == i:
            return None
        if j > i:  # lower resolution -> 1x1 conv to C_i, upsample by 2^(j-i)
            return nn.Sequential(
                nn.Conv2d(channels[j], channels[i], 1, 1, 0, bias=False),
                nn.BatchNorm2d(channels[i]),
                nn.Upsample(scale_factor=2 ** (j - i), mode="nearest"),
            )
        steps = []  # higher resolution -> (i - j) stride-2 3x3 convs, ReLU between them
        for k in range(i - j):
            last = k == i - j - 1
            out_c = channels[i] if last else channels[j]
            layers = [nn.Conv2d(channels[j], out_c, 3, 2, 1, bias=False), nn.BatchNorm2d(out_c)]
            if not last:
                layers.append(nn.ReLU(inplace=True))
            steps.append(nn.Sequential(*layers))
        return nn.Sequential(*steps)

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        xs = [branch(x) for branch, x in zip(self.branches, xs)]
        if self.fuse_layers is None:
            return xs
        out = []
        for i, fuse in enumerate(self.fuse_layers):
            y = xs[0] if i == 0 else fuse[0](xs[0])
            for j in range(1, self.num_branches):
                y = y + (xs[j] if j == i else fuse[j](xs[j]))
            out.append(self.relu(y))
        return out


def _transition(pre: Sequence[int], cur: Sequence[int]) -> nn.ModuleList:
    """The official ``_make_transition_layer``: existing branches keep their tensor (None) or
    get a 3x3 conv-BN-ReLU when the width changes; each new branch is made from the lowest
    resolution branch by a chain of stride-2 3x3 conv-BN-ReLU."""
    layers: list[Optional[nn.Module]] = []
    for i, c in enumerate(cur):
        if i < len(pre):
            layers.append(None if c == pre[i] else nn.Sequential(
                nn.Conv2d(pre[i], c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)))
            continue
        steps = []
        for k in range(i + 1 - len(pre)):
            out_c = c if k == i - len(pre) else pre[-1]
            steps.append(nn.Sequential(
                nn.Conv2d(pre[-1], out_c, 3, 2, 1, bias=False), nn.BatchNorm2d(out_c), nn.ReLU(inplace=True)))
        layers.append(nn.Sequential(*steps))
    return nn.ModuleList(layers)


def _apply_transition(transition: nn.ModuleList, ys: list[Tensor]) -> list[Tensor]:
    """Branch i: ``transition[i]`` of ``ys[i]`` (an existing branch) or of ``ys[-1]`` (a new
    one), or ``ys[i]`` itself where the transition is None."""
    out = []
    for i, t in enumerate(transition):
        if t is None:
            out.append(ys[i])
        else:
            out.append(t(ys[i] if i < len(ys) else ys[-1]))
    return out


class PoseHighResolutionNet(PoseNet):
    """HRNet-W``width`` pose network; MIPNet when ``num_instances >= 2``.

    Args:
        width: C, the width of the highest-resolution branch (32 or 48 in the paper).
        num_keypoints: K, the heatmaps predicted (17 for COCO, 14 for CrowdPose).
        num_instances: N; 1 builds the plain HRNet (no MIMB, ``lam`` ignored).
    """

    def __init__(self, width: int = 32, num_keypoints: int = 17, num_instances: int = 1) -> None:
        super().__init__()
        for name, val in (("width", width), ("num_keypoints", num_keypoints), ("num_instances", num_instances)):
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        self.width, self.num_keypoints, self.num_instances = width, num_keypoints, num_instances
        widths = [width * 2**i for i in range(4)]

        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, momentum=BN_MOMENTUM)
        self.conv2 = nn.Conv2d(64, 64, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(64, momentum=BN_MOMENTUM)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = make_res_layer(Bottleneck, 64, 64, 4)

        pre = [64 * Bottleneck.expansion]
        for stage in (2, 3, 4):
            cur = widths[:stage]
            setattr(self, f"transition{stage - 1}", _transition(pre, cur))
            n = STAGE_MODULES[stage]
            setattr(self, f"stage{stage}", nn.Sequential(*(
                HighResolutionModule(cur, BLOCKS_PER_BRANCH, multi_scale_output=stage < 4 or m < n - 1)
                for m in range(n)
            )))
            pre = cur
        self.final_layer = nn.Conv2d(widths[0], num_keypoints, kernel_size=1, stride=1, padding=0)

        self.stage3_se: Optional[MIMBGroup] = None
        self.stage4_se: Optional[MIMBGroup] = None
        if num_instances > 1:
            self.stage3_se = MIMBGroup(widths, num_instances)  # on the 4 inputs of stage 4
            self.stage4_se = MIMBGroup(widths[:1], num_instances)  # on stage 4's output
        self.init_weights()

    def init_weights(self) -> None:
        """The official initialisation (``init_weights``): conv and Linear weights
        N(0, 0.001), biases 0, BatchNorm2d 1 / 0."""
        init_normal_(self, nn.Conv2d, nn.Linear)

    def _trunk(self, images: Tensor) -> list[Tensor]:
        x = self.relu(self.bn1(self.conv1(images)))
        x = self.relu(self.bn2(self.conv2(x)))
        ys = [self.layer1(x)]
        for stage in (2, 3):
            xs = _apply_transition(getattr(self, f"transition{stage - 1}"), ys)
            ys = getattr(self, f"stage{stage}")(xs)
        return _apply_transition(self.transition3, ys)  # the 4 inputs of stage 4

    def _tail(self, xs: list[Tensor], lam: Optional[Selector]) -> Tensor:
        if self.stage3_se is not None:
            xs = self.stage3_se(xs, lam, first=True)
        ys = self.stage4(xs)
        if self.stage4_se is not None:
            ys = self.stage4_se(ys, lam)
        return self.final_layer(ys[0])


__all__ = ["HighResolutionModule", "PoseHighResolutionNet"]
