"""What training, evaluation and the demo share at run time: devices and threads, autocast,
torchrun's process group, the resolved dataset files, building a configured model and
loading a trained one.

Imports flow one way through the app: ``models`` and ``data`` (no app imports) →
``config`` → ``runtime`` → ``train`` and ``evaluate`` → ``demo`` → ``cli``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from .config import Config, config_from_dict
from .data import KeypointDataset, synthetic
from .models import build_model, load_checkpoint, read_checkpoint_file

#: The file ``mipnet train`` writes in ``train.output_dir`` (and ``mipnet eval`` reads).
CHECKPOINT_NAME = "checkpoint.pth"


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def init_distributed(device_kind: str) -> Distributed:
    """From torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); one process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    info = Distributed(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        if device_kind == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo", init_method="env://")
    return info


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("train.device='cuda' but torch sees no CUDA device")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def autocast(device: torch.device, amp: str):
    """The autocast context of ``amp`` (``"none"``, ``"bf16"``, ``"fp16"``) on ``device``."""
    if amp == "none":
        return nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("amp='fp16' needs a CUDA device (use 'bf16' on CPU)")
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def make_model(cfg: Config, num_keypoints: int) -> nn.Module:
    """The network of ``cfg.model`` (a paper architecture or a small demo net), with
    ``init_checkpoint`` loaded non-strictly when given."""
    m = cfg.model
    model = build_model(m.arch, num_instances=m.num_instances, num_keypoints=num_keypoints)
    if m.init_checkpoint:
        load_checkpoint(model, m.init_checkpoint, strict=False)
    return model


@dataclass
class DataFiles:
    """Resolved dataset files (for synthetic data: the rendered cache)."""

    kind: str  # a KeypointDataset kind
    train_annotations: Optional[Path]
    train_images: Optional[Path]
    val_annotations: Optional[Path]
    val_images: Optional[Path]
    val_boxes: Optional[Path]


def synthetic_dir(cfg: Config) -> Path:
    """Cache folder of the synthetic dataset of ``cfg.data.synthetic`` (keyed by its parameters)."""
    s = cfg.data.synthetic
    key = json.dumps([s.train_images, s.val_images, list(s.image_size), s.seed], separators=(",", ":"))
    return Path(s.cache_dir).expanduser() / f"crowd-{hashlib.sha1(key.encode()).hexdigest()[:12]}"


def ensure_synthetic(cfg: Config) -> Path:
    """Render the synthetic train (``seed``) and val (``seed + 1``) sets once; reuse them after."""
    s = cfg.data.synthetic
    root = synthetic_dir(cfg)
    for split, n, seed in (("train", s.train_images, s.seed), ("val", s.val_images, s.seed + 1)):
        if not (root / split / "annotations.json").is_file():  # written last, atomically
            synthetic.generate(root / split, n, image_size=s.image_size, seed=seed)
    return root


def resolve_data(cfg: Config, dist_info: Distributed | None = None) -> DataFiles:
    d = cfg.data
    if d.kind == "synthetic":
        dist_info = dist_info or Distributed()
        if dist_info.is_main:
            root = ensure_synthetic(cfg)
        dist_info.barrier()
        root = synthetic_dir(cfg)
        return DataFiles("coco", root / "train" / "annotations.json", root / "train" / "images",
                         root / "val" / "annotations.json", root / "val" / "images", None)

    def opt(p):
        return None if p is None else Path(p).expanduser()

    return DataFiles(d.kind, opt(d.train_annotations), opt(d.train_images), opt(d.val_annotations),
                     opt(d.val_images), opt(d.val_boxes))


def dataset_kwargs(cfg: Config) -> dict:
    d = cfg.data
    return dict(input_size=d.input_size, heatmap_size=d.heatmap_size, sigma=d.sigma,
                num_instances=cfg.model.num_instances, selection=d.selection, min_keypoints=d.min_keypoints)


def train_dataset(cfg: Config, files: DataFiles) -> KeypointDataset:
    return KeypointDataset(files.train_annotations, files.train_images, files.kind, train=cfg.data.augment,
                           seed=cfg.train.seed, **dataset_kwargs(cfg))


def set_threads(threads: Optional[int]) -> None:
    if threads is not None:
        torch.set_num_threads(threads)


def load_trained(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, Config, dict]:
    """Model, config and raw checkpoint of a :func:`train` checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    ckpt = read_checkpoint_file(path, map_location="cpu")
    if not isinstance(ckpt, dict) or "config" not in ckpt or "num_keypoints" not in ckpt:
        raise ValueError(f"checkpoint {str(path)!r} was not written by mipnet train "
                         "(for official weights use model.init_checkpoint)")
    cfg = config_from_dict(ckpt["config"])
    model = make_model(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_checkpoint=None)),
                       int(ckpt["num_keypoints"]))
    load_checkpoint(model, ckpt, strict=True)
    return model.to(device), cfg, ckpt
