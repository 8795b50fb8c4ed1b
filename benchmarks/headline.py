"""The headline: what MIPNet N=2 costs over HRNet, inference and training, the official way
and ours (``make bench`` ends with this; ``python -m benchmarks.headline -h``).

For HRNet-W32 at the paper's 256x192 input (``--arch``, ``--size``), per batch size
(CPU: 1 and 4; GPU: 24, 32 and 48):

* **inference** -- ``baseline``: HRNet (N=1) ``model(images)``; ``official``: MIPNet N=2 as the
  official code runs it, the whole network once per instance (``model(images, lam_n)``,
  one-hot selectors); ``ours``: ``model.forward_instances(images)`` (the trunk once).  Eval
  mode, ``torch.no_grad``.
* **training step** (forward, Eq. 1 loss, backward, Adam step) -- ``baseline``: HRNet N=1
  on the B crops; ``official``: MIPNet N=2 on the N-fold repeated batch
  (``mipnet.train.repeat_instances``, ``train.shared_trunk=false``); ``shared``: MIPNet N=2
  with the shared trunk (``model(images, instances=True)``, what ``mipnet train`` runs).

Timing: the variants of one (mode, batch) are interleaved -- round r times each variant
once, in turn -- after one warm-up call each (two on GPU).  A variant's time is the median
of its rounds and its ratio to HRNet the median over rounds of ``its time / HRNet's time in
the same round`` (paired: a burst of load from other processes hits a round's variants
alike, and a round it hits unevenly is outvoted); ``official/shared`` likewise.  ``--stat
best``: best-of times and their ratios instead.  GPU times are
wall-clock around ``torch.cuda.synchronize()``.  FLOPs: ``torch.utils.flop_counter.FlopCounterMode``
over one call of each variant (training: forward + backward; the MIMB custom ops and the
optimizer are not counted, < 0.1 % of the work); the FLOP ratio of ``ours`` / ``shared`` to
``baseline`` is the floor a perfect implementation would reach.

The last lines are the summary table and the issue's targets (CPU batch 4: training step
``shared <= 1.45x`` HRNet and ``>= 1.3x`` faster than ``official``; inference ``ours <= 1.45x``).
``--json PATH`` writes every round's time.  Weights: the official initialisation (timing
does not depend on the values); synthetic crops and targets.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from mipnet.models import build_model
from mipnet.train import instance_targets, joints_mse_loss, repeat_instances

NUM_INSTANCES = 2
INFERENCE = ("baseline", "official", "ours")
TRAINING = ("baseline", "official", "shared")
LABELS = {"baseline": "HRNet (N=1)", "official": "official N=2", "ours": "ours N=2", "shared": "shared trunk N=2"}
CPU_BATCHES, GPU_BATCHES = (1, 4), (24, 32, 48)
# The targets, checked at CPU batch 4 (and printed for the GPU at batch 32).
TARGET_TRAIN_RATIO = 1.45  # shared step <= 1.45x the HRNet step
TARGET_TRAIN_SPEEDUP = 1.3  # official step / shared step >= 1.3
TARGET_INFER_RATIO = 1.45  # ours <= 1.45x HRNet inference


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, amp: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16")


class Setup:
    """The models, crops and targets of one run (one baseline model, one MIPNet model, an
    Adam optimiser each); ``fn(mode, variant)`` gives the timed call."""

    def __init__(self, arch: str, size: Sequence[int], batch: int, device: torch.device, amp: str,
                 channels_last: bool) -> None:
        torch.manual_seed(0)
        self.device, self.amp, self.batch = device, amp, batch
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.models = {n: build_model(arch, n).to(device, memory_format=fmt) for n in (1, NUM_INSTANCES)}
        self.optims = {n: torch.optim.Adam(m.parameters(), lr=1e-6) for n, m in self.models.items()}
        g = torch.Generator().manual_seed(0)
        H, W = size
        K = self.models[1].num_keypoints
        self.images = torch.randn(batch, 3, H, W, generator=g).to(device).contiguous(memory_format=fmt)
        # targets [B, N, K, h, w] and weights [B, N, K], as the data loader gives them
        self.target = torch.rand(batch, NUM_INSTANCES, K, H // 4, W // 4, generator=g).to(device)
        self.weight = torch.ones(batch, NUM_INSTANCES, K, device=device)
        self.lams = [torch.nn.functional.one_hot(torch.full((batch,), n, device=device), NUM_INSTANCES).float()
                     for n in range(NUM_INSTANCES)]

    def fn(self, mode: str, variant: str) -> Callable[[], None]:
        if mode == "inference":
            return self._inference(variant)
        return self._train_step(variant)

    def _inference(self, variant: str) -> Callable[[], None]:
        x, amp, device = self.images, self.amp, self.device
        model = self.models[1 if variant == "baseline" else NUM_INSTANCES].eval()

        def run():
            with torch.no_grad(), _autocast(device, amp):
                if variant == "baseline":
                    return model(x)
                if variant == "official":
                    return [model(x, lam) for lam in self.lams]
                return model.forward_instances(x)
        return run

    def _train_step(self, variant: str) -> Callable[[], None]:
        n = 1 if variant == "baseline" else NUM_INSTANCES
        model, opt, amp, device = self.models[n].train(), self.optims[n], self.amp, self.device
        x, target, weight = self.images, self.target, self.weight

        def run():
            with _autocast(device, amp):
                if variant == "baseline":
                    pred, tgt, w = model(x), target[:, 0], weight[:, 0]
                elif variant == "official":
                    images, lam, tgt, w = repeat_instances(x, target, weight)
                    pred = model(images, lam)
                else:
                    pred = model(x, instances=True).flatten(0, 1)
                    tgt, w = instance_targets(target, weight)
            loss = joints_mse_loss(pred, tgt, w)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return run


def count_flops(fn: Callable[[], None]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def measure(setup: Setup, mode: str, variants: Sequence[str], rounds: int, warmup: int) -> dict:
    """``{variant: [seconds per round]}``, the variants interleaved round by round."""
    fns = {v: setup.fn(mode, v) for v in variants}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(setup.device)
    times: dict = {v: [] for v in variants}
    for _ in range(rounds):
        for v, fn in fns.items():
            _sync(setup.device)
            start = time.perf_counter()
            fn()
            _sync(setup.device)
            times[v].append(time.perf_counter() - start)
    return times


def run(arch: str, size: Sequence[int], batches: Sequence[int], device: torch.device, amp: str,
        rounds: int, train_rounds: int, stat: str, modes: Sequence[str], log=sys.stderr) -> dict:
    warmup = 2 if device.type == "cuda" else 1
    pick = min if stat == "best" else statistics.median

    def ratio(times: dict, num: str, den: str) -> float:
        if stat == "best":
            return min(times[num]) / min(times[den])
        return statistics.median(a / b for a, b in zip(times[num], times[den]))
    results = {"arch": arch, "input_size": list(size), "device": str(device), "amp": amp, "stat": stat,
               "num_instances": NUM_INSTANCES, "threads": torch.get_num_threads(), "rows": []}
    for batch in batches:
        setup = Setup(arch, size, batch, device, amp, channels_last=device.type == "cuda")
        for mode in modes:
            variants = INFERENCE if mode == "inference" else TRAINING
            start = time.perf_counter()
            flops = {v: count_flops(setup.fn(mode, v)) for v in variants}
            times = measure(setup, mode, variants, rounds if mode == "inference" else train_rounds, warmup)
            for v in variants:
                row = {"mode": mode, "batch": batch, "variant": v, "time_s": pick(times[v]), "times_s": times[v],
                       "ratio": ratio(times, v, "baseline"), "gflops": flops[v] / 1e9,
                       "flop_ratio": flops[v] / flops["baseline"]}
                if v in ("ours", "shared"):  # official / ours, and its FLOP ceiling
                    row["speedup_vs_official"] = ratio(times, "official", v)
                    row["flop_speedup_vs_official"] = flops["official"] / flops[v]
                results["rows"].append(row)
            print(f"[headline] {mode} batch {batch}: "
                  + ", ".join(f"{v} {pick(times[v]):.3f} s" for v in variants)
                  + f" ({time.perf_counter() - start:.0f} s)", file=log, flush=True)
        del setup
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def _row(results: dict, mode: str, batch: int, variant: str) -> dict | None:
    for r in results["rows"]:
        if (r["mode"], r["batch"], r["variant"]) == (mode, batch, variant):
            return r
    return None


def rounds_text(results: dict) -> str:
    counts = {r["mode"]: len(r["times_s"]) for r in results["rows"]}
    return "/".join(str(counts[m]) for m in ("inference", "training") if m in counts)


def summary(results: dict, device_name: str) -> str:
    """The summary table and the targets, as text."""
    batches = sorted({r["batch"] for r in results["rows"]})
    modes = [m for m in ("inference", "training") if any(r["mode"] == m for r in results["rows"])]
    h, w = results["input_size"]
    lines = [
        f"MIPNet N={NUM_INSTANCES} vs HRNet: {results['arch']} {h}x{w}, {device_name}, "
        f"threads={results['threads']}, {'bf16 autocast' if results['amp'] == 'bf16' else 'fp32'}; "
        + ("best of interleaved rounds" if results["stat"] == "best" else
           f"median of {rounds_text(results)} interleaved rounds, ratios paired by round"),
        "",
    ]
    head = f"{'':<12}{'variant':<18}" + "".join(f"{'batch ' + str(b):>30}" for b in batches)
    lines += [head, f"{'':<12}{'':<18}" + "".join(f"{'time':>10}{'x HRNet':>10}{'FLOPs x':>10}" for _ in batches)]
    for mode in modes:
        variants = INFERENCE if mode == "inference" else TRAINING
        for i, v in enumerate(variants):
            cells = ""
            for b in batches:
                r = _row(results, mode, b, v)
                cells += (f"{r['time_s']:>9.3f}s{r['ratio']:>9.2f}x{r['flop_ratio']:>9.2f}x" if r else f"{'-':>30}")
            name = ("inference" if mode == "inference" else "train step") if i == 0 else ""
            lines.append(f"{name:<12}{LABELS[v]:<18}{cells}")
        ours = variants[-1]
        cells = ""
        for b in batches:
            r = _row(results, mode, b, ours)
            cells += (f"{'':>10}{r['speedup_vs_official']:>9.2f}x{r['flop_speedup_vs_official']:>9.2f}x" if r
                      else f"{'-':>30}")
        lines.append(f"{'':<12}{'official/' + ours:<18}{cells}")
    lines += ["", "x HRNet: time / HRNet's time; FLOPs x: FLOPs / HRNet's, the floor of the time ratio;",
              "official/ours, official/shared: the speed-up over the official way, and its FLOP ceiling"]
    if results.get("loadavg_at_end"):
        lines.append(f"load average (1/5/15 min) at the end: {results['loadavg_at_end']} on {os.cpu_count()} CPUs")
    target_batch = 4 if results["device"] == "cpu" else 32
    checks = []
    s, o = _row(results, "training", target_batch, "shared"), _row(results, "training", target_batch, "official")
    if s and o:
        checks.append((f"training step, batch {target_batch}: shared <= {TARGET_TRAIN_RATIO}x HRNet",
                       s["ratio"] <= TARGET_TRAIN_RATIO, f"{s['ratio']:.2f}x"))
        speedup = s["speedup_vs_official"]
        checks.append((f"training step, batch {target_batch}: shared >= {TARGET_TRAIN_SPEEDUP}x faster than official",
                       speedup >= TARGET_TRAIN_SPEEDUP, f"{speedup:.2f}x"))
    ours = _row(results, "inference", target_batch, "ours")
    if ours:
        checks.append((f"inference, batch {target_batch}: ours <= {TARGET_INFER_RATIO}x HRNet "
                       f"(FLOP floor {ours['flop_ratio']:.2f}x)", ours["ratio"] <= TARGET_INFER_RATIO,
                       f"{ours['ratio']:.2f}x"))
    if checks:
        lines += ["", "targets (issue 16):"]
        lines += [f"  {'met    ' if ok else 'NOT met'}  {what}: {value}" for what, ok, value in checks]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.headline", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--arch", default="hrnet_w32")
    p.add_argument("--size", type=int, nargs=2, default=(256, 192), metavar=("H", "W"))
    p.add_argument("--batches", type=int, nargs="+", help="default: 1 4 on CPU, 24 32 48 on GPU")
    p.add_argument("--amp", choices=("none", "bf16"), help="default: none on CPU, bf16 on GPU")
    p.add_argument("--rounds", type=int, default=None, help="inference rounds (default 7 CPU, 20 GPU)")
    p.add_argument("--train-rounds", type=int, default=None, help="training rounds (default 5 CPU, 10 GPU)")
    p.add_argument("--stat", choices=("median", "best"), default="median",
                   help="median times and per-round paired ratios (default), or best-of")
    p.add_argument("--modes", nargs="+", choices=("inference", "training"), default=("inference", "training"))
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--json", help="write the results (every round's time) to this file")
    args = p.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch.cuda.is_available() is False")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = device.type == "cuda"
    batches = args.batches or (GPU_BATCHES if gpu else CPU_BATCHES)
    amp = args.amp or ("bf16" if gpu else "none")
    rounds = args.rounds or (20 if gpu else 7)
    train_rounds = args.train_rounds or (10 if gpu else 5)
    for name, val in (("--rounds", rounds), ("--train-rounds", train_rounds), *(("--batches", b) for b in batches)):
        if val < 1:
            p.error(f"{name} must be >= 1, got {val}")
    if gpu:
        torch.backends.cudnn.benchmark = True
    from benchmarks import _report

    device_name = torch.cuda.get_device_name(device) if gpu else _report.cpu_name()
    start = time.perf_counter()
    results = run(args.arch, args.size, batches, device, amp, rounds, train_rounds, args.stat, args.modes)
    results["device_name"] = device_name
    results["torch"] = torch.__version__
    results["seconds"] = time.perf_counter() - start
    if hasattr(os, "getloadavg"):
        results["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    print("=" * 30 + " mipnet headline " + "=" * 30)
    print(summary(results, device_name))
    print(f"({results['seconds']:.0f} s; `python -m benchmarks.headline -h` for options"
          + (f"; JSON: {args.json}" if args.json else "") + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
