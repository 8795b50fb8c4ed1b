"""Where the time of MIPNet N=2 inference goes: Chrome traces and the top kernels (``make profile``).

    python -m benchmarks.profile_model                       # HRNet-W32, N=2, 256x192, batch 24 on CUDA
    python -m benchmarks.profile_model --dtype bfloat16 --batch 48 --out benchmarks/out/profile
    python -m benchmarks.profile_model --device cpu --batch 1 --iters 1   # a quick look on a CPU box

Two ways to get the N instances' heatmaps of one batch of person crops are profiled with
``torch.profiler``, each into its own Chrome trace (open in ``chrome://tracing`` or
https://ui.perfetto.dev):

* ``official``: the official MIPNet code's way, the whole network once per instance
  (``model(images, lam=i)`` for i in 0..N-1);
* ``ours``: ``model.forward_instances(images)``: the λ-independent trunk once, the N
  instances as one batch after it, the first MIMB writing all instances from one read.

Each op of ``mipnet_kernels`` appears as ``mipnet::<op>[<backend>]`` (see
``mipnet_kernels._backends``), so the fused MIMB kernels are easy to find among the
convolutions.  The table printed per variant is ``key_averages()`` sorted by self device
time (self CPU time on CPU).

When ``mipnet.models`` cannot be imported, a stand-in is profiled instead and the output
says so: the MIMB blocks of HRNet-W32 (one per branch, C = 32/64/128/256 at 1/4 .. 1/32 of
the input) run per instance (official) or with ``MIMB.instances`` (ours).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

if __package__ in (None, ""):  # `python benchmarks/profile_model.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mipnet_kernels  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HRNET_W32_MIMB_CHANNELS = (32, 64, 128, 256)  # stage-4 branches, strides 4, 8, 16, 32


class MimbStack(nn.Module):
    """Stand-in for the model: HRNet-W32's per-branch MIMB blocks on feature maps of the
    right shapes (the images are pooled to each branch's resolution)."""

    def __init__(self, num_instances: int) -> None:
        super().__init__()
        self.num_instances = num_instances
        self.blocks = nn.ModuleList(mipnet_kernels.MIMB(c, num_instances) for c in HRNET_W32_MIMB_CHANNELS)

    def _features(self, images: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for n, block in enumerate(self.blocks):
            x = nn.functional.avg_pool2d(images, 4 * 2**n)
            feats.append(x.repeat(1, block.channels // 3 + 1, 1, 1)[:, : block.channels].contiguous())
        return feats

    def forward(self, images: torch.Tensor, lam: int) -> list[torch.Tensor]:
        sel = torch.full((images.shape[0],), lam, dtype=torch.long, device=images.device)
        return [block(x, sel) for block, x in zip(self.blocks, self._features(images))]

    def forward_instances(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [block.instances(x) for block, x in zip(self.blocks, self._features(images))]


def build(arch: str, num_instances: int) -> tuple[nn.Module, str]:
    """The model (eval mode) and a description; the MIMB stand-in when ``mipnet.models`` is absent."""
    try:
        from mipnet.models import build_model
    except ImportError as exc:
        return MimbStack(num_instances).eval(), (
            f"STAND-IN: mipnet.models is not importable ({exc}); profiling HRNet-W32's "
            f"{len(HRNET_W32_MIMB_CHANNELS)} branch MIMB blocks only"
        )
    return build_model(arch, num_instances=num_instances).eval(), f"mipnet.models.build_model({arch!r}, num_instances={num_instances})"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_variant(step, device: torch.device, iters: int, warmup: int, trace: Path, top: int) -> float:
    """Profile ``iters`` calls of ``step`` after ``warmup``; write ``trace``, print the top
    ``top`` ops; returns the mean wall time per call (profiler overhead included)."""
    for _ in range(warmup):
        step()
    _sync(device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        t0 = time.perf_counter()
        for _ in range(iters):
            step()
        _sync(device)
        wall = (time.perf_counter() - t0) / iters
    trace.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(trace))
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=top, max_name_column_width=60))
    return wall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="hrnet_w32")
    parser.add_argument("--instances", type=int, default=2, help="N (default 2)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, help="person crops per batch (default: 24 on CUDA, 2 on CPU)")
    parser.add_argument("--size", default="256x192", help="input HxW (default 256x192)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="autocast dtype on CUDA")
    parser.add_argument("--iters", type=int, default=5, help="profiled calls per variant")
    parser.add_argument("--warmup", type=int, default=3, help="unprofiled calls first (JIT, autotuning, cuDNN)")
    parser.add_argument("--top", type=int, default=20, help="rows of the per-variant table")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/profile"), help="folder of the traces")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    try:
        h, w = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        parser.error(f"--size must be HxW, e.g. 256x192, got {args.size!r}")
    if args.instances < 2:
        parser.error(f"--instances must be >= 2 (MIPNet), got {args.instances}")
    batch = args.batch or (24 if device.type == "cuda" else 2)
    dtype = DTYPES[args.dtype]

    model, what = build(args.arch, args.instances)
    model = model.to(device)
    images = torch.randn(batch, 3, h, w, device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    backends = ", ".join(k for k, v in mipnet_kernels.available_backends().items() if v["available"])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"profiling {what}\n  on {name}, batch {batch}, {h}x{w}, {args.dtype}, N={args.instances}; "
          f"mipnet_kernels backends available: {backends}")

    def official():
        with torch.no_grad(), autocast, torch.profiler.record_function("official: full network per instance"):
            return [model(images, lam=i) for i in range(args.instances)]

    def ours():
        with torch.no_grad(), autocast, torch.profiler.record_function("ours: forward_instances"):
            return model.forward_instances(images)

    walls = {}
    stem = f"{args.arch}_n{args.instances}_b{batch}_{h}x{w}_{args.dtype}_{device.type}"
    for label, step in (("official", official), ("ours", ours)):
        trace = args.out / f"{stem}_{label}.json"
        print(f"\n=== {label}: top {args.top} ops by self {'device' if device.type == 'cuda' else 'CPU'} time")
        walls[label] = profile_variant(step, device, args.iters, args.warmup, trace, args.top)
        print(f"Chrome trace: {trace}")
    print(f"\nwall time per call under the profiler: official {walls['official'] * 1e3:.2f} ms, "
          f"ours {walls['ours'] * 1e3:.2f} ms ({walls['official'] / walls['ours']:.2f}x); "
          "the latency benchmarks time this without the profiler")
    return 0


if __name__ == "__main__":
    sys.exit(main())
