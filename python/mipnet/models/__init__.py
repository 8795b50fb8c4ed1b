"""Reference pose models: HRNet and SimpleBaseline, and their MIPNet versions.

* :func:`build_model` -- ``hrnet_w32``, ``hrnet_w48``, ``resnet50``, ``resnet101``,
  ``resnet152``; ``num_instances=1`` is the baseline, ``>= 2`` MIPNet (MIMBs as in the
  official code).  ``model(images, lam)`` gives heatmaps ``[B, K, H/4, W/4]``;
  ``model.forward_instances(images)`` all N instances ``[N, B, K, H/4, W/4]`` with the
  lambda-independent trunk run once.
* :func:`load_checkpoint` -- our checkpoints and the official HRNet, SimpleBaseline and
  MIPNet ones (official parameter names throughout).
"""

from .builder import ARCHS, SMALL_ARCHS, arch_names, build_model
from .checkpoint import (CheckpointFileError, CheckpointMismatchError, LoadReport, extract_state_dict,
                         load_checkpoint, read_checkpoint_file)
from .common import MIMBGroup, PoseNet
from .hrnet import PoseHighResolutionNet
from .resnet import PoseResNet
from .small import TinyPoseResNet

__all__ = [
    "ARCHS",
    "SMALL_ARCHS",
    "arch_names",
    "CheckpointMismatchError",
    "LoadReport",
    "MIMBGroup",
    "PoseHighResolutionNet",
    "PoseNet",
    "PoseResNet",
    "TinyPoseResNet",
    "build_model",
    "extract_state_dict",
    "load_checkpoint",
    "read_checkpoint_file",
    "CheckpointFileError",
]
