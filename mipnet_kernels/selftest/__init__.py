"""Self-test: every public op on every usable backend against the reference backend.

    python -m mipnet_kernels.selftest                 # all usable backends, the full battery
    python -m mipnet_kernels.selftest --quick         # the small battery (seconds on a GPU)
    python -m mipnet_kernels.selftest --backend cuda --json selftest.json
    python -m mipnet_kernels.selftest --device cpu --op mimb,decode_heatmaps

What a user runs first on a new machine (and the first step of ``make gpu-smoke``).  For each
backend that :func:`mipnet_kernels.available_backends` reports usable (the ``reference``
backend only when asked for with ``--backend reference``: it is the yardstick) and each device
it serves (``cuda``: CUDA tensors; ``triton``: CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1`` when there is no GPU; ``cpu``: CPU tensors), it runs a battery of
cases and prints one row per case: op, backend, case, max error, bound, ok.

The battery: ``decode_heatmaps`` (argmax / quarter / dark / udp, with and without an affine),
``flip_merge``, ``mimb_scale`` / ``mimb`` (forward and every gradient), ``mimb_instances``,
``mimb_scale_grouped`` (forward and backward), ``mimb_instances_grouped``, ``oks_nms``,
``soft_oks_nms``, ``oks_nms_mask``, ``soft_oks_nms_mask`` and ``oks_iou``, over shapes from
1x1 to HRNet-like (odd sizes), float32 / float16 / bfloat16 (float64 where the op takes it),
contiguous and channels_last (MIMB with 384 channels channels_last: C > 256), empty inputs,
NaN / inf inputs, tied maxima and tied scores.  ``--quick`` (and Triton under the
interpreter, which is slow) use a reduced list of small shapes.

The rules are the test suite's (:mod:`mipnet_kernels._numerics`): decode scores, argmax /
quarter coordinates, ``flip_merge`` and hard-NMS ``keep`` bit-exact against the reference
(argmax / quarter with an affine: within float32 rounding of the affine); dark / udp within
``2 |ref32 - spec64| + 1e-4 px + 2 noise`` of the spec evaluated in float64; MIMB outputs and
gradients by flash-attention's rule (at most twice the float32/low-precision reference's
error against the float64 reference, plus ``1e-5 max|truth|`` and half a unit in the last
place for float16 / bfloat16); soft-NMS scores within ``rtol 1e-5, atol 1e-6`` (float32) /
``rtol 1e-12`` (float64) of the reference's and the same picks.  NaN must appear where the
reference has NaN.  A case the backend declines (its ``not_supported_reasons``, e.g. float64
on the C++ kernels) is reported as ``skip`` with the reason.  Every case runs on its own: an
exception is caught, reported as a failure and the run goes on.

Exit status: 0 when nothing failed (skips allowed), 1 when any case failed or a backend asked
for with ``--backend`` cannot run here, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import time
import traceback
from dataclasses import asdict

import torch

from .. import _backends
from .battery import Case, DECODE_SHAPES, MIMB_SHAPES, battery, iou_cases
from .checks import (OPS, Mismatch, Row, Skip, blob_heatmaps, check_decode, check_flip, check_grouped, check_mimb,
                     check_nms, check_oks_iou, clustered_candidates, drop_near_threshold, random_affine,
                     threshold_rounding_case)

__all__ = [  # the checkers and generators tests/test_battery.py and tests/test_selftest.py use, and the CLI
    "OPS", "Case", "DECODE_SHAPES", "MIMB_SHAPES", "Mismatch", "Row", "Skip", "battery", "blob_heatmaps",
    "check_decode", "check_flip", "check_grouped", "check_mimb", "check_nms", "check_oks_iou",
    "clustered_candidates", "drop_near_threshold", "iou_cases", "main", "plan", "random_affine", "run_case",
    "threshold_rounding_case",
]


# --------------------------------------------------------------------------- running
def plan(backends: list[str] | None, device: str | None) -> tuple[list[tuple[str, torch.device]], list[Row]]:
    """The (backend, device) pairs to check, and failure rows for backends asked for by name
    that cannot run here (on ``device``)."""
    from .. import available_backends

    info = available_backends()
    present = ["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]
    # Each backend on the devices where it is picked automatically, else on any it runs
    # (Triton on CPU tensors under the interpreter): from the declarations.
    natural = {b.name: ([d for d in b.auto if d in present]
                        or [d for d in present if b.devices is None or d in b.devices])
               for b in _backends.DECLARATIONS}
    pairs, missing = [], []
    for name in backends or [n for n in _backends.BACKENDS if n != "reference" and info[n]["available"]]:
        if not info[name]["available"]:
            missing.append(Row("-", name, device or "-", "backend available", "FAIL", detail=str(info[name]["reason"])))
            continue
        devs = natural[name]
        if device is not None:
            why = _backends.device_unsupported_reason(name, torch.device(device))
            devs = [device] if why is None else []
            if why is not None and backends:
                missing.append(Row("-", name, device, "backend runs this device", "FAIL", detail=why))
        pairs += [(name, torch.device(d)) for d in devs]
    return pairs, missing


def run_case(case: Case, backend: str, dev: torch.device) -> Row:
    t0 = time.perf_counter()
    row = Row(case.op, backend, dev.type, case.name, "ok")
    try:
        m = case.run(backend, dev)
        row.max_error, row.bound = m.err, m.bound
        if m.problems:
            row.status = "FAIL"
            row.detail = "; ".join(m.problems)[:500]
        elif m.what:
            row.detail = m.what
    except Skip as exc:
        row.status, row.detail = "skip", str(exc)[:300]
    except Exception as exc:  # every case on its own: report, go on
        row.status = "FAIL"
        row.detail = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:500]
        row.traceback = traceback.format_exc()
    finally:
        if dev.type == "cuda":
            with contextlib.suppress(Exception):
                torch.cuda.synchronize()
    row.seconds = time.perf_counter() - t0
    return row


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}"


_COLS = (("op", 22), ("backend", 9), ("device", 6), ("case", 46), ("max error", 10), ("bound", 10), ("ok", 4))


def _line(values) -> str:
    return "  ".join(str(v)[:w].ljust(w) for v, (_, w) in zip(values, _COLS)).rstrip()


def _row_line(r: Row) -> str:
    ok = {"ok": "ok", "FAIL": "FAIL", "skip": "skip"}[r.status]
    s = _line((r.op, r.backend, r.device, r.case, _fmt(r.max_error), _fmt(r.bound), ok))
    if r.status == "FAIL" and r.detail:
        s += f"  {r.detail}"
    elif r.status == "skip" and r.detail:
        s += f"  {r.detail[:110]}{'...' if len(r.detail) > 110 else ''}"
    return s


def _environment() -> dict:
    from .. import available_backends

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "platform": platform.platform(),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", ""),
        "backends": available_backends(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    return env


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mipnet_kernels.selftest",
                                description="Check every op on every usable backend against the reference backend.")
    p.add_argument("--backend", action="append", choices=_backends.BACKENDS,
                   help="check only this backend (repeatable; default: every usable one but 'reference')")
    p.add_argument("--device", choices=("cpu", "cuda"), help="check only on tensors of this device")
    p.add_argument("--op", action="append", help=f"check only these ops (repeatable or comma-separated): {', '.join(OPS)}")
    p.add_argument("--case", help="check only the cases whose name contains this text")
    p.add_argument("--quick", action="store_true", help="the small battery (also used for Triton under the interpreter)")
    p.add_argument("--json", metavar="FILE", help="write the results (rows, environment, summary) as JSON")
    p.add_argument("--show", choices=("all", "problems"), default="all", help="rows to print (default: all)")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the self-test; returns the exit status (0: no failure)."""
    args = _parser().parse_args(argv)
    ops = None
    if args.op:
        ops = {o for a in args.op for o in a.split(",") if o}
        unknown = ops - set(OPS)
        if unknown:
            print(f"unknown op(s) {sorted(unknown)}; expected {', '.join(OPS)}", file=sys.stderr)
            return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device (torch.cuda.is_available() is False)", file=sys.stderr)
        return 1
    t_start = time.perf_counter()
    pairs, rows = plan(args.backend, args.device)
    selected = lambda c: (ops is None or c.op in ops) and (args.case is None or args.case in c.name)
    if args.list:
        for backend, dev in pairs:
            interp = backend == "triton" and dev.type == "cpu"
            for c in filter(selected, battery("small" if args.quick or interp else "full")):
                print(_line((c.op, backend, dev.type, c.name, "", "", "")))
        return 0
    print(_line([n for n, _ in _COLS]))
    print(_line(["-" * w for _, w in _COLS]))
    for r in rows:
        print(_row_line(r), flush=True)
    for backend, dev in pairs:
        interp = backend == "triton" and dev.type == "cpu"
        cases = [c for c in battery("small" if args.quick or interp else "full") if selected(c)]
        for case in cases:
            r = run_case(case, backend, dev)
            rows.append(r)
            if args.show == "all" or r.status != "ok":
                print(_row_line(r), flush=True)
    devices = sorted({d.type for _, d in pairs} | ({args.device} if args.device else set()))
    for dev in devices:
        for case in iou_cases():
            if selected(case):
                r = run_case(case, "any", torch.device(dev))
                rows.append(r)
                if args.show == "all" or r.status != "ok":
                    print(_row_line(r), flush=True)
    seconds = time.perf_counter() - t_start
    summary = {s: sum(r.status == s for r in rows) for s in ("ok", "FAIL", "skip")}
    checked = ", ".join(f"{b}/{d.type}" for b, d in pairs) or "nothing"
    print(f"\nmipnet_kernels selftest: {summary['ok']} ok, {summary['FAIL']} failed, {summary['skip']} skipped "
          f"({checked}; {seconds:.1f} s)")
    if summary["FAIL"]:
        print("FAILED:")
        for r in rows:
            if r.failed:
                print(f"  {r.op} [{r.backend}/{r.device}] {r.case}: {r.detail}")
    if args.json:
        out = {
            "argv": list(sys.argv[1:] if argv is None else argv),
            "environment": _environment(),
            "checked": [f"{b}/{d.type}" for b, d in pairs],
            "summary": {"ok": summary["ok"], "failed": summary["FAIL"], "skipped": summary["skip"], "seconds": seconds},
            "passed": summary["FAIL"] == 0,
            "results": [{**asdict(r), "max_error": _json_float(r.max_error), "bound": _json_float(r.bound)} for r in rows],
        }
        d = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(d, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 1 if summary["FAIL"] else 0


def _json_float(v: float | None):
    if v is None or math.isfinite(v):
        return v
    return str(v)  # "inf" / "nan": JSON has no infinities
