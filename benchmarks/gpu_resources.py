"""Registers, spills and shared memory of every GPU kernel for sm_90, without a GPU.

    python -m benchmarks.gpu_resources            # write benchmarks/gpu_resources.{md,json}
    python -m benchmarks.gpu_resources --check    # exit 1 when a HOT kernel gained spills
    python -m benchmarks.gpu_resources --gate     # the Triton compile gate (sm_90 + sm_80)

Triton: every specialisation the launchers choose for the GPU test shapes
(``tests/triton_launches.py`` records them without running anything), compiled with
``triton.compile`` for ``GPUTarget("cuda", 90, 32)``; registers / spills / stack from
``ptxas -v`` of its PTX with Triton's flags, shared memory from Triton's metadata.
CUDA: ``nvcc -arch=sm_90 -Xptxas -v`` over ``csrc/cuda/*.cu`` with setup.py's flags
(``-O3 -lineinfo --expt-relaxed-constexpr -DUSE_CUDA -DTORCH_TARGET_VERSION=...``).

``--gate`` compiles one specialisation per code path (kernel, argument dtypes, mode/flag
constexprs; the largest tiles of each) for sm_90 and sm_80 and checks the PTX: the NMS
kernels take no float32 scalar (thresholds are float64-typed, rounded to the keypoints'
dtype in the kernel) and neither NMS nor MIMB nor decode uses Triton's approximate
``div.full.f32`` / ``ex2.approx.f32``.  Runs in a process without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import argparse
import glob
import json
import multiprocessing
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT_JSON = ROOT / "benchmarks" / "gpu_resources.json"
OUT_MD = ROOT / "benchmarks" / "gpu_resources.md"

#: Kernels on the hot path of a MIPNet forward / backward / post-processing: ``--check``
#: fails when one of them (any specialisation) spills more than the committed JSON says.
HOT = (
    # Triton
    "_mimb_reduce_mlp_kernel", "_mimb_scale_kernel", "_mimb_reduce_mlp_grouped_kernel",
    "_mimb_scale_grouped_kernel", "_decode_heatmaps_kernel", "_flip_merge_kernel", "_nms_small_kernel",
    # CUDA
    "mimb_single_pass_kernel", "mimb_reduce_kernel", "mimb_scale_kernel", "decode_kernel",
    "greedy_block_kernel",
)
#: Kernels whose PTX must not contain Triton's approximate float32 division / exp.
EXACT_MATH = ("_nms_", "_soft_nms_", "_mimb_reduce_mlp", "_decode_heatmaps_kernel")

_SPECS: list = []  # filled before the pool forks: workers get it by inheritance


def _triton_specs(gate: bool):
    sys.path.insert(0, str(ROOT / "tests"))
    from triton_launches import recorded_launches

    from mipnet_kernels.triton._compile import code_paths, distinct_specs

    specs = distinct_specs(recorded_launches())
    return code_paths(specs) if gate else specs


def _compile_one(job: tuple[int, int, bool]) -> dict:
    i, cc, want_resources = job
    from mipnet_kernels.triton._compile import approximate_math, compile_spec, param_types, ptxas_resources

    spec = _SPECS[i]
    row = {"kernel": spec.name, "spec": spec.label(), "arch": f"sm_{cc}"}
    try:
        k = compile_spec(spec, cc)
    except Exception as e:  # noqa: BLE001  (reported per spec)
        row["error"] = f"{type(e).__name__}: {str(e)[-2000:]}"
        return row
    ptx = k.asm["ptx"]
    row.update(shared=int(k.metadata.shared), num_warps=int(k.metadata.num_warps),
               param_types=param_types(ptx), approx=approximate_math(ptx))
    if want_resources:
        row.update(ptxas_resources(ptx, cc, dict(spec.options).get("enable_fp_fusion", True)))
    return row


def triton_rows(archs: list[int], gate: bool, resources_arch: int | None, only_hot: bool = False) -> list[dict]:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("run without TRITON_INTERPRET: the kernels must compile, not interpret")
    _SPECS[:] = _triton_specs(gate)
    if only_hot:
        _SPECS[:] = [s for s in _SPECS if s.name in HOT]
    jobs = [(i, cc, cc == resources_arch) for i in range(len(_SPECS)) for cc in archs]
    workers = max(1, min(len(os.sched_getaffinity(0)), 16))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_compile_one, jobs, chunksize=1))


def gate_failures(rows: list[dict]) -> list[str]:
    """What the compile gate rejects in compiled rows."""
    bad = []
    for r in rows:
        where = f"{r['spec']} {r['arch']}"
        if "error" in r:
            bad.append(f"{where}: does not compile: {r['error'][:400]}")
            continue
        if any(r["kernel"].startswith(p) for p in ("_nms_", "_soft_nms_")) and "f32" in r["param_types"]:
            bad.append(f"{where}: a float32 scalar parameter (thresholds must be float64-typed)")
        if any(p in r["kernel"] for p in EXACT_MATH):
            for op, n in r["approx"].items():
                if n:
                    bad.append(f"{where}: {n} x {op} (approximate float32 math)")
    return bad


# --------------------------------------------------------------------------- CUDA
def _nvcc_flags() -> list[str]:
    import torch.utils.cpp_extension as ce

    setup = (ROOT / "setup.py").read_text()
    version = re.search(r'^TORCH_TARGET_VERSION = "(\w+)"', setup, re.M).group(1)
    inc = [f"-I{p}" for p in [str(ROOT / "csrc"), *ce.include_paths()]]  # nvcc adds its own CUDA headers
    return ["-std=c++17", "-O3", "-DUSE_CUDA", f"-DTORCH_TARGET_VERSION={version}", "-lineinfo",
            "--expt-relaxed-constexpr", "-arch=sm_90", "-Xptxas", "-v", *inc]


_FN = re.compile(r"Compiling entry function '(\w+)' for 'sm_90'")
_NAME = re.compile(r"Function properties for (\w+)")


def _demangle(names: list[str]) -> dict[str, str]:
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.split("\n")
    return dict(zip(names, out))


def cuda_rows() -> list[dict]:
    """One row per CUDA kernel instantiation from ``nvcc -Xptxas -v`` (sm_90)."""
    nvcc = os.environ.get("NVCC") or "nvcc"
    rows = []
    for cu in sorted(glob.glob(str(ROOT / "csrc" / "cuda" / "*.cu"))):
        cmd = [nvcc, *_nvcc_flags(), "-c", cu, "-o", os.devnull]
        log = subprocess.run(cmd, capture_output=True, text=True)
        if log.returncode != 0:
            rows.append({"file": Path(cu).name, "error": log.stderr[-2000:]})
            continue
        cur = None
        for line in log.stderr.splitlines():
            m = _FN.search(line)
            if m:
                cur = {"file": Path(cu).name, "mangled": m.group(1), "arch": "sm_90"}
                rows.append(cur)
                continue
            if cur is None:
                continue
            if m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line):
                cur.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
            if m := re.search(r"Used (\d+) registers", line):
                cur["registers"] = int(m.group(1))
                sm = re.search(r"(\d+) bytes smem", line)
                cur["shared"] = int(sm.group(1)) if sm else 0
    names = _demangle([r["mangled"] for r in rows if "mangled" in r])
    for r in rows:
        if "mangled" in r:
            full = names.get(r["mangled"], r["mangled"])
            r["spec"] = full
            qualified = re.match(r"(?:void )?([\w:]+)", full.replace("(anonymous namespace)", "anon")).group(1)
            r["kernel"] = qualified.split("::")[-1]
    return rows


# --------------------------------------------------------------------------- output
def _md(data: dict) -> str:
    lines = ["# GPU kernel resources (sm_90)", "",
             "Generated by `python -m benchmarks.gpu_resources` (no GPU needed; `--check` gates the HOT",
             "kernels' spills against `gpu_resources.json`).  Triton: every specialisation the launchers",
             "choose for the GPU test shapes, `ptxas -v` of its PTX with Triton's flags; shared = Triton's",
             "dynamic shared memory.  CUDA: `nvcc -arch=sm_90 -Xptxas -v` with setup.py's flags.", "",
             f"Triton {data['triton_version']}, nvcc {data['nvcc_version']}.", "",
             "## Triton", "", "| kernel | specialisation | regs | spill st/ld B | stack B | shared B | warps |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in data["triton"]:
        if "error" in r:
            lines.append(f"| {r['kernel']} | `{r['spec']}` | error | | | | |")
            continue
        hot = " **hot**" if r["kernel"] in HOT else ""
        lines.append(f"| {r['kernel']}{hot} | `{r['spec']}` | {r['registers']} | {r['spill_stores']}/{r['spill_loads']}"
                     f" | {r['stack']} | {r['shared']} | {r['num_warps']} |")
    lines += ["", "## CUDA", "", "| kernel | instantiation | regs | spill st/ld B | stack B | static smem B |",
              "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in data["cuda"]:
        if "error" in r:
            lines.append(f"| {r['file']} | compile error | | | | |")
            continue
        hot = " **hot**" if r["kernel"] in HOT else ""
        lines.append(f"| {r['kernel']}{hot} | `{r['spec'][:160]}` | {r.get('registers')} | "
                     f"{r.get('spill_stores', 0)}/{r.get('spill_loads', 0)} | {r.get('stack', 0)} | {r.get('shared', 0)} |")
    return "\n".join(lines) + "\n"


def _max_spills(rows: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rows:
        if r.get("kernel") in HOT and "error" not in r:
            out[r["kernel"]] = max(out.get(r["kernel"], 0), r.get("spill_stores", 0) + r.get("spill_loads", 0))
    return out


def check(rows: list[dict], committed: dict) -> list[str]:
    """HOT kernels whose worst spill (stores + loads, any specialisation) grew."""
    before = _max_spills(committed["triton"] + committed["cuda"])
    now = _max_spills(rows)
    return [f"{k}: spills {before.get(k, 0)} -> {v} bytes" for k, v in sorted(now.items()) if v > before.get(k, 0)]


def _nvcc_version() -> str:
    try:
        out = subprocess.run([os.environ.get("NVCC") or "nvcc", "--version"], capture_output=True, text=True).stdout
        return re.search(r"release ([\d.]+)", out).group(1)
    except Exception:  # noqa: BLE001
        return "unavailable"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compare HOT kernels' spills with the committed JSON")
    ap.add_argument("--gate", action="store_true", help="Triton compile gate: sm_90 + sm_80, PTX checks")
    ap.add_argument("--no-cuda", action="store_true", help="skip the nvcc part")
    ap.add_argument("--json", type=Path, help="also write the rows here (gate / check)")
    args = ap.parse_args(argv)
    import triton

    t0 = time.time()
    if args.gate:
        rows = triton_rows([90, 80], gate=True, resources_arch=None)
        bad = gate_failures(rows)
        print(f"compile gate: {len(rows)} compilations ({len(rows) // 2} specialisations x sm_90, sm_80) "
              f"in {time.time() - t0:.0f} s; {len(bad)} failures")
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
        for b in bad:
            print("  " + b)
        return 1 if bad else 0
    if args.check:
        rows = triton_rows([90], gate=False, resources_arch=90, only_hot=True)
        rows += [] if args.no_cuda else [r for r in cuda_rows() if r.get("kernel") in HOT]
        committed = json.loads(OUT_JSON.read_text())
        grown = check(rows, committed)
        errors = [r for r in rows if "error" in r]
        print(f"gpu-resources check: {len(rows)} hot kernels in {time.time() - t0:.0f} s")
        for g in grown:
            print("  spills grew: " + g)
        for e in errors:
            print(f"  error: {e.get('spec', e.get('file'))}: {e['error'][:400]}")
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
        return 1 if grown or errors else 0
    cuda = [] if args.no_cuda else cuda_rows()  # first: fails fast
    data = {"triton_version": triton.__version__, "nvcc_version": _nvcc_version(),
            "triton": triton_rows([90], gate=False, resources_arch=90), "cuda": cuda}
    OUT_JSON.write_text(json.dumps(data, indent=1) + "\n")
    OUT_MD.write_text(_md(data))
    print(f"wrote {OUT_MD.relative_to(ROOT)} and {OUT_JSON.name}: {len(data['triton'])} Triton specialisations, "
          f"{len(data['cuda'])} CUDA kernels, {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
