"""Multi-instance training of MIPNet (``mipnet train`` / ``python -m mipnet.train``).

The loss of the paper's Eq. 1: each image of a batch is trained on all N instances in the
same step -- the batch is repeated N times, copy ``n`` with ``λ = n`` and instance ``n``'s
targets (fallbacks to the primary are already in the targets, :mod:`mipnet.data.targets`),
as the official code does (``train_lambda`` in rawalkhirodkar/MIPNet concatenates the
batch with itself under complementary λ).  The per-instance loss is HRNet's
``JointsMSELoss`` with target weights, so the mean over the ``N·B`` copies is
``1/N Σ_i L_i``.

Two ways to run that step, the same function of the weights (``train.shared_trunk``):

* ``true`` (default): ``model(images, instances=True)`` = ``model.forward_instances`` in
  training mode -- the λ-independent trunk runs once on the ``B`` crops, forward and
  backward, and the batch becomes the ``N·B`` instance-major one at the first MIMBs (see
  :mod:`mipnet.models.common`).  For MIPNet-W32 N=2 that is ~1.38× the FLOPs of an HRNet
  step instead of 2× (``make bench`` measures it).
* ``false``: the official way, :func:`repeat_instances` -- the whole network on the
  repeated batch.

Both give the loss over the same ``N·B`` instance-heatmaps in the same order (sample
``n·B + b`` is image ``b``, instance ``n``), the same gradients up to float32 summation order,
and the same BatchNorm running statistics (the trunk's running-variance update is rescaled
to the repeated batch's, :class:`~mipnet.models.common.RepeatedBatchNormStats`).

Runs the same on CPU, one GPU, or many under ``torchrun`` (``DistributedDataParallel`` and
a ``DistributedSampler``; the process group is initialised from the environment, gloo on CPU,
nccl on GPU).  Every epoch ends with an atomic checkpoint (``output_dir/checkpoint.pth``:
model, optimizer, scheduler, grad scaler, epoch, RNG states, config); ``train.resume=true``
continues from it exactly -- augmentation draws depend only on ``(seed, epoch, index)`` and
the sampler's order only on ``(seed, epoch)``, so a resumed run sees the same batches.
Progress: a tqdm bar (loss, samples/s) and ``output_dir/metrics.jsonl`` (one JSON object per
``log_every`` steps and per epoch).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .config import Config, dump_config, load_config
from .models import PoseNet
from .runtime import (CHECKPOINT_NAME, autocast, init_distributed, make_model, resolve_data, resolve_device,
                      set_threads, train_dataset)

METRICS_NAME = "metrics.jsonl"


# ------------------------------------------------------------------------------ loss
def joints_mse_loss(pred: Tensor, target: Tensor, target_weight: Tensor) -> Tensor:
    """HRNet's ``JointsMSELoss(use_target_weight=True)``: ``0.5 · mean over joints of
    MSE(pred·w, target·w)``, the MSE averaged over the batch and the heatmap pixels.

    ``pred``/``target`` ``[B, K, h, w]``, ``target_weight`` ``[B, K]``; computed in float32.
    """
    if pred.shape != target.shape or pred.dim() != 4:
        raise ValueError(f"pred and target must be [B, K, h, w] of one shape, got {list(pred.shape)} "
                         f"and {list(target.shape)}")
    if target_weight.shape != pred.shape[:2]:
        raise ValueError(f"target_weight must be [B, K] = {list(pred.shape[:2])}, got {list(target_weight.shape)}")
    w = target_weight.float()[..., None, None]
    return 0.5 * ((pred.float() - target.float()) * w).pow(2).mean()


def instance_targets(target: Tensor, target_weight: Tensor) -> tuple[Tensor, Tensor]:
    """``target [B, N, K, h, w]``, ``target_weight [B, N, K]`` -> the instance-major
    ``target [N·B, K, h, w]``, ``weight [N·B, K]`` (sample ``n·B + b``: image ``b``, instance ``n``),
    the order of both :func:`repeat_instances` and ``forward_instances(...).flatten(0, 1)``."""
    return target.transpose(0, 1).flatten(0, 1), target_weight.transpose(0, 1).flatten(0, 1)


def repeat_instances(images: Tensor, target: Tensor, target_weight: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The batch of one multi-instance step the official way: ``images [B, 3, H, W]``,
    ``target [B, N, K, h, w]``, ``target_weight [B, N, K]`` -> ``images [N·B, ...]``, ``lam [N·B]``
    (instance-major: sample ``n·B + b`` is image ``b`` with ``λ = n``), ``target [N·B, K, h, w]``,
    ``weight [N·B, K]``."""
    B, N = target.shape[:2]
    lam = torch.arange(N, device=images.device).repeat_interleave(B)
    return (images.repeat(N, 1, 1, 1), lam, *instance_targets(target, target_weight))


# ------------------------------------------------------------------------------ checkpoints
def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """Write ``state`` with ``torch.save`` atomically: a temporary file in the same folder,
    flushed to disk, then ``os.replace`` -- a crash mid-write leaves the previous checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def rng_state() -> dict:
    """Every RNG a training step may touch, as tensors and plain Python values (so the
    checkpoint loads with ``torch.load(weights_only=True)``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------ training
@dataclass
class TrainResult:
    model: nn.Module  # the trained network (unwrapped, on its device)
    history: list[dict]  # one record per epoch run in this call
    checkpoint: Path
    seconds: float


class Trainer:
    """One training run of :class:`~mipnet.config.Config` (see the module docstring)."""

    def __init__(self, cfg: Config, model: nn.Module | None = None, dataset: Dataset | None = None):
        cfg.validate(need_train_data=True)
        self.cfg = cfg
        t = cfg.train
        set_threads(t.threads)
        device_kind = resolve_device(t.device).type
        self.dist = init_distributed(device_kind)
        self.device = resolve_device(t.device, self.dist.local_rank)
        autocast(self.device, t.amp)  # fails early for fp16 on CPU
        self.out = Path(t.output_dir)
        self.ckpt_path = self.out / CHECKPOINT_NAME
        if t.resume and not self.ckpt_path.is_file():
            raise FileNotFoundError(f"train.resume is set but {str(self.ckpt_path)!r} does not exist")

        torch.manual_seed(t.seed)
        np.random.seed(t.seed)
        random.seed(t.seed)
        if dataset is None:
            files = resolve_data(cfg, self.dist)
            dataset = train_dataset(cfg, files)
            if len(dataset) == 0:
                raise ValueError(f"the training set {str(files.train_annotations)!r} has no usable person")
        self.dataset = dataset
        self.num_keypoints = self.dataset.spec.num_joints
        self.model = (model if model is not None else make_model(cfg, self.num_keypoints)).to(self.device)
        if getattr(self.model, "num_instances", cfg.model.num_instances) != cfg.model.num_instances:
            raise ValueError("the model's num_instances differs from model.num_instances")
        if t.shared_trunk and not isinstance(self.model, PoseNet):
            raise ValueError(f"train.shared_trunk needs a mipnet.models.PoseNet (forward(images, instances=True)), "
                             f"got {type(self.model).__name__}; set train.shared_trunk=false for other models")
        self.net = (nn.parallel.DistributedDataParallel(
            self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            if self.dist.enabled else self.model)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, list(t.lr_steps), t.lr_factor)
        self.scaler = torch.amp.GradScaler("cuda", enabled=t.amp == "fp16")
        self.sampler = DistributedSampler(self.dataset, num_replicas=self.dist.world_size, rank=self.dist.rank,
                                          shuffle=True, seed=t.seed)
        self.loader = DataLoader(
            self.dataset, batch_size=t.batch_size, sampler=self.sampler, num_workers=cfg.data.workers,
            pin_memory=self.device.type == "cuda", drop_last=len(self.sampler) > t.batch_size,
            persistent_workers=cfg.data.workers > 0,
        )
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(dump_config(cfg))
        self.start_epoch, self.step = 0, 0
        if t.resume:
            from .models import read_checkpoint_file

            self._load(read_checkpoint_file(self.ckpt_path, map_location="cpu"))

    # -------------------------------------------------------------- state
    def state(self, epoch: int) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": epoch,  # epochs completed
            "step": self.step,
            "rng": rng_state(),
            "config": dataclasses.asdict(self.cfg),
            "arch": self.cfg.model.arch,
            "num_instances": self.cfg.model.num_instances,
            "num_keypoints": self.num_keypoints,
            "kind": self.dataset.kind,
        }

    def _load(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.start_epoch, self.step = int(ckpt["epoch"]), int(ckpt["step"])
        set_rng_state(ckpt["rng"])

    # -------------------------------------------------------------- loop
    def _log(self, record: dict) -> None:
        if self.dist.is_main:
            with open(self.out / METRICS_NAME, "a") as f:
                f.write(json.dumps(record) + "\n")

    def _reduce(self, value: Tensor) -> float:
        value = value.detach()
        if self.dist.enabled:
            value = value.clone()
            dist.all_reduce(value)
            value /= self.dist.world_size
        return value.item()

    def train_epoch(self, epoch: int) -> dict:
        t, N = self.cfg.train, self.cfg.model.num_instances
        self.net.train()
        self.sampler.set_epoch(epoch)
        self.dataset.set_epoch(epoch)
        total = len(self.loader) if t.max_steps_per_epoch is None else min(len(self.loader), t.max_steps_per_epoch)
        bar = None
        if self.dist.is_main and t.progress:
            from tqdm import tqdm

            bar = tqdm(total=total, desc=f"epoch {epoch + 1}/{t.epochs}", dynamic_ncols=True, leave=False)
        losses, seen, start = [], 0, time.perf_counter()
        for i, batch in enumerate(self.loader):
            if i >= total:
                break
            images = batch["image"].to(self.device, non_blocking=True)
            target = batch["target"].to(self.device, non_blocking=True)
            weight = batch["target_weight"].to(self.device, non_blocking=True)
            with autocast(self.device, t.amp):
                if t.shared_trunk:  # [N, B, ...] -> instance-major [N·B, ...]
                    pred = self.net(images, instances=True).flatten(0, 1)
                    target, weight = instance_targets(target, weight)
                else:
                    images, lam, target, weight = repeat_instances(images, target, weight)
                    pred = self.net(images, lam if N > 1 else None)
            loss = joints_mse_loss(pred, target, weight)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.step += 1
            value = self._reduce(loss)
            if not np.isfinite(value):
                raise RuntimeError(f"loss is {value} at epoch {epoch + 1}, step {i + 1}; "
                                   "lower train.lr or use train.amp='none'")
            losses.append(value)
            seen += batch["image"].shape[0] * self.dist.world_size
            rate = seen / max(time.perf_counter() - start, 1e-9)
            if bar is not None:
                bar.set_postfix(loss=f"{value:.3e}", samples_s=f"{rate:.1f}")
                bar.update()
            if self.step % t.log_every == 0:
                self._log({"type": "step", "epoch": epoch + 1, "step": self.step, "loss": value,
                           "lr": self.optimizer.param_groups[0]["lr"], "samples_per_s": rate})
        if bar is not None:
            bar.close()
        seconds = time.perf_counter() - start
        record = {"type": "epoch", "epoch": epoch + 1, "step": self.step,
                  "loss": float(np.mean(losses)) if losses else float("nan"),
                  "lr": self.optimizer.param_groups[0]["lr"], "samples": seen,
                  "samples_per_s": seen / max(seconds, 1e-9), "seconds": seconds, "step_losses": losses}
        self.scheduler.step()
        return record

    def fit(self) -> TrainResult:
        t = self.cfg.train
        start = time.perf_counter()
        history = []
        for epoch in range(self.start_epoch, t.epochs):
            record = self.train_epoch(epoch)
            self._log({k: v for k, v in record.items() if k != "step_losses"})
            if self.dist.is_main:
                save_checkpoint(self.state(epoch + 1), self.ckpt_path)
                print(f"epoch {epoch + 1}/{t.epochs}: loss {record['loss']:.4e}, "
                      f"{record['samples_per_s']:.1f} samples/s, {record['seconds']:.1f} s", file=sys.stderr)
            self.dist.barrier()
            history.append(record)
        return TrainResult(self.model, history, self.ckpt_path, time.perf_counter() - start)


def train(cfg: Config, model: nn.Module | None = None, dataset: Dataset | None = None) -> TrainResult:
    """Train ``cfg`` (optionally a given, unwrapped ``model`` instead of ``make_model(cfg)``, and a
    given training ``dataset`` -- items and ``spec``/``kind``/``set_epoch`` as
    :class:`~mipnet.data.KeypointDataset`, e.g. pre-rendered crops -- instead of ``cfg.data``'s)."""
    return Trainer(cfg, model, dataset).fit()


# ------------------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="YAML config file (see configs/)")
    parser.add_argument("--resume", action="store_true", help="continue from output_dir/checkpoint.pth")
    parser.add_argument("--output-dir", help="shortcut for train.output_dir=...")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. train.epochs=10 model.num_instances=2")


def config_from_args(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"train.output_dir={args.output_dir}")
    if getattr(args, "resume", False):
        overrides.append("train.resume=true")
    return load_config(args.config, overrides)


def run(args: argparse.Namespace) -> int:
    trainer = Trainer(config_from_args(args))
    result = trainer.fit()
    if trainer.dist.is_main:
        print(f"trained {len(result.history)} epoch(s) in {result.seconds:.1f} s; checkpoint {result.checkpoint}")
    if trainer.dist.enabled:
        dist.destroy_process_group()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mipnet.train", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
