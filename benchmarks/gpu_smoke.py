"""``make gpu-smoke``: the whole GPU check in one command, <= 7 minutes wall on an H100 box.

    python3 benchmarks/gpu_smoke.py                 # everything (what `make gpu-smoke` runs)
    python3 benchmarks/gpu_smoke.py --dry-run       # print the plan (commands, timeouts), run nothing
    python3 benchmarks/gpu_smoke.py --only selftest,tests    # some steps
    python3 benchmarks/gpu_smoke.py --skip-build    # the CUDA extension is already built (or carried)

Steps (each timed, each under its own timeout; every step runs even when an earlier one
failed; exit status 1 when any failed, 0 when all passed; a step that cannot run on this
machine -- compute-sanitizer saying "Device not supported" -- is "not run", not a failure):

1. ``build``      -- the CUDA extension for sm_90 only, all cores: ``TORCH_CUDA_ARCH_LIST=9.0
   MAX_JOBS=16 MIPNET_KERNELS_FORCE_CUDA=1 python3 -m pip install --no-build-isolation --no-deps
   --no-index -e .`` (as ``make gpu-build``), then a check that the cuda, triton and cpu
   backends are all available.
2. ``selftest``   -- ``python3 -m mipnet_kernels.selftest --quick --json``: every op on cuda and
   triton (CUDA tensors) and cpu against the reference (the small battery: see the budget).
3. ``tests``      -- a focused subset of the CUDA tests (``-m cuda``, pytest-xdist ``-n 8`` when
   installed): every kernel family once per dtype and layout, cuda and triton backends
   (``TEST_SELECTION`` below: the -k expression per file).
4. ``memcheck`` / ``racecheck`` -- compute-sanitizer over a few small cuda-backend kernel tests
   (``SANITIZE_SELECTION``).
5. ``bench``      -- the headline benchmarks in one pytest-benchmark run (``BENCH_SELECTION``):
   HRNet-W32 256x192 batch 24 bf16 baseline / official / ours, eager and CUDA graph; MIMB
   forward (``mimb``) and the training step forward + backward (``mimb_train_step``) at the W32
   branch shapes, batch 24 bf16, cuda / triton / eager; OKS-NMS workload (a) ``coco_val_n2``
   (200,000 candidates), cuda / triton, index and mask forms; decode quarter and DARK at
   48x17x64x48, cuda / triton / reference.

Results: ``gpu_smoke.json`` (per step: command, seconds, timeout, status, return code, the
tail of its output; the environment), ``selftest.json``, ``bench.json`` (pytest-benchmark),
``tests.xml`` (JUnit) and ``gpu_smoke.log`` (every step's full output) in
``benchmarks/results/<gpu-slug>/smoke-<UTC time>/`` (git-ignored; slug as ``benchmarks/_report.py``:
``nvidia-h100-80gb-hbm3``) and, when ``$OUT`` is set, the same files in ``$OUT`` (the GPU
machine returns only what is there: at most 8 files).

Time budget (seconds, H100 box: 16 cores, torch 2.11 + CUDA 13, fresh tree, cold Triton cache)
-----------------------------------------------------------------------------------------------
=========== ======== ======= =====================================================================
step        estimate timeout  how estimated (on the 2-core CPU machine, no GPU, load ~4 from others)
=========== ======== ======= =====================================================================
build           75     120   nvcc 13, sm_90 only, the compile-only CMake project: all of it 145 s
                              wall at -j2; mimb_kernel.cu alone 112 s (the longest translation
                              unit; ~half a core free while measured, so ~55 s on a free core).
                              At MAX_JOBS=16 every file compiles at once: wall = the longest
                              file + link, ~60-75 s (pip -e also rebuilds the 5 C++ files of the
                              CPU extension, in parallel, each < 30 s)
selftest        90     120   ``--quick`` battery.  Triton specialisations it launches, counted
                              under the interpreter (``--count-triton``: distinct kernel x
                              argument dtypes x 16-byte alignment x int ==1 / %16 x constexprs,
                              an upper bound): 283 (mimb reduce 108, mimb scale 85, decode 27,
                              flip 14, grouped 20, NMS 29) in 661 launches.  At ~0.3 s per
                              sm_90 compile (small kernels, cold cache, one process) ~85 s; CUDA
                              work and the cpu backend (17 s here on 2 cores, 461 cases of the
                              full battery; ~3 s at 16 cores) add little.  The full battery
                              (drop ``--quick``) has more shapes: several hundred more
                              specialisations, i.e. minutes: run it by hand
tests           90     110   591 tests selected (``--collect`` on a CPU machine; on a GPU also
                              test_mimb_instances_triton.py's ~44); most Triton specialisations are
                              already in the on-disk cache from the selftest; 8 xdist workers
                              share that cache; per test ~0.1-0.3 s of CPU-side checking (NumPy
                              anchors, float64 yardsticks) / 8 workers ~15 s; start-up ~10 s
memcheck        35      45   11 small tests, cuda backend only (no Triton JIT under the
                              sanitizer); CUDA context + torch import ~15 s under the tool,
                              kernels ~10-100x slower but microseconds each
racecheck       35      45   as memcheck
bench           85     100   54 rows (``--collect``): 6 model rows (cuDNN autotune + CUDA-graph
                              capture, ~5 s each), 28 MIMB rows (~1 s each; 4 of them the cuda
                              instances forward + fused backward), 8 NMS rows on
                              200,000 candidates (~2 s each incl. the workload), 12 decode rows;
                              Triton compiles for the ~20 triton rows
total          410     540   (the timeouts sum to 540 s, and ``--max-seconds 540`` caps the whole
                              run inside one 10-minute device call; the estimate is under 420 s)
=========== ======== ======= =====================================================================

If the build does not fit, build the extension ahead on the CPU machine (nvcc 13 is there; the
stable ABI targets torch 2.11), carry ``mipnet_kernels/_C_cuda*.so`` and run with ``--skip-build``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

# ------------------------------------------------------------------------------- selections
#: -k expressions over the CUDA tests (with -m cuda).  Test ids are "<backend>-<device>-<case>";
#: "cuda-cuda" = the cuda backend on CUDA tensors, "triton-cuda" = Triton on CUDA tensors.
#: Every kernel family once per dtype and layout: shapes chosen to hit the paths that differ
#: (C > 256 channels-last, 1x1 maps, the two-phase and single-pass MIMB paths, big decode maps).
_GPU = "(cuda-cuda or triton-cuda)"
_NOSLOW = "not compile and not opcheck"
TEST_SELECTION = {
    "tests/test_mimb.py":
        f"{_GPU} and {_NOSLOW} and (2x48x64x48x4 or 1x384x7x5x4 or 2x384x1x1x4 or grouped or mixed_dtypes"
        " or empty or other_strides or mimb_equals)",
    "tests/test_mimb_cuda.py":
        f"{_NOSLOW} and (not paths_against_official or 384x12x9 or 1x1x33x17)"
        " and not (instances_bwd_against_official and float16)",
    "tests/test_decode.py":
        f"{_GPU} and {_NOSLOW} and not blur_kernel_sizes and (not (matches_reference or test_strides)"
        " or (matches_reference and (2x17x64x48 or 2x3x96x72-dark or 1x1x1x1-udp))"
        " or (test_strides and (channels_last or sliced)))",
    "tests/test_flip_merge.py":
        f"{_GPU} and {_NOSLOW} and (not (matches_reference or test_strides) or 2x17x64x48 or 1x1x1x1"
        " or (test_strides and (channels_last or sliced)))",
    "tests/test_nms.py":
        f"{_GPU} and {_NOSLOW} and not 133-",
    "tests/test_nms_kernels.py":
        f"{_GPU}",
    "tests/test_mimb_instances_triton.py": _NOSLOW,  # the per-sample table, the fused backward
}

#: compute-sanitizer: small cuda-backend kernel tests (no Triton: its JIT under the sanitizer
#: takes minutes), one per kernel family, including the C > 256 channels-last MIMB case.
SANITIZE_SELECTION = {
    "tests/test_mimb.py": "cuda-cuda and test_mimb_scale and (1x384x7x5x4-float32 or 2x3x7x5x1-bfloat16)",
    "tests/test_mimb_cuda.py": "test_instances_bwd_against_official and (2x264x3x5x4-float32-channels_last-3"
                               " or 2x3x7x5x1-bfloat16-contiguous-2)",
    "tests/test_decode.py": "cuda-cuda and test_matches_reference and 2x14x7x5 and float32 and (dark or quarter)",
    "tests/test_flip_merge.py": "cuda-cuda and test_pairs_forms_and_nan",
    "tests/test_nms.py": "cuda-cuda and (test_mask_forms_equal_index_forms or test_oks_nms_ties_by_lower_index)",
}

#: The headline benchmarks (one pytest-benchmark run over these files).
_W32 = ("24x32x64x48", "24x64x32x24", "24x128x16x12", "24x256x8x6")
BENCH_SELECTION = {
    "benchmarks/test_model_bench.py":
        "cuda-hrnet_w32-256x192-b24-bf16 and (baseline or official or ours) and not ours_eager_mimb",
    "benchmarks/test_mimb_bench.py":
        "((" + " or ".join(f"cuda-{b}-bf16-{s}" for b in ("cuda", "triton", "eager") for s in _W32)
        + ") and not mimb_instances) or ((" + " or ".join(f"cuda-cuda-bf16-{s}" for s in _W32)
        + ") and mimb_instances_train)",
    "benchmarks/test_nms_bench.py": "(cuda-cuda or cuda-triton) and coco_val_n2",
    "benchmarks/test_decode_bench.py":
        "(cuda-cuda or cuda-triton or cuda-reference) and (quarter or dark) and 48x17x64x48 and test_decode_heatmaps",
}


def _k_union(selection: dict[str, str]) -> str:
    """One -k expression for several files: each file's expression applies to its own tests
    (the module, e.g. "test_mimb.py", is a keyword of its tests; "test_mimb.py" is no substring of
    "test_mimb_cuda.py")."""
    return " or ".join(f"({Path(f).name} and ({k}))" for f, k in selection.items())


# ------------------------------------------------------------------------------- steps
def _has_xdist() -> bool:
    import importlib.util

    return importlib.util.find_spec("xdist") is not None


def steps(out_dir: Path, jobs: int) -> list[dict]:
    """The plan: name, command (argv), env additions, timeout (s)."""
    build_env = {"TORCH_CUDA_ARCH_LIST": "9.0", "MAX_JOBS": str(jobs), "MIPNET_KERNELS_FORCE_CUDA": "1"}
    check = ("import mipnet_kernels as mk; b = mk.available_backends(); "
             "bad = {n: b[n]['reason'] for n in ('cuda', 'triton', 'cpu') if not b[n]['available']}; "
             "print(b); assert not bad, bad")
    xdist = ["-n", "8"] if _has_xdist() else []
    pytest = [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    sanitize_tests = list(SANITIZE_SELECTION)
    sanitize = lambda tool: ["compute-sanitizer", "--tool", tool, "--error-exitcode", "1", *pytest, "-x", "-m", "cuda",
                             *sanitize_tests, "-k", _k_union(SANITIZE_SELECTION)]
    return [
        {"name": "build", "timeout": 120, "env": build_env,
         "cmds": [[PY, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-e", "."],
                  [PY, "-c", check]]},
        {"name": "selftest", "timeout": 120, "env": {},
         "cmds": [[PY, "-m", "mipnet_kernels.selftest", "--quick", "--show", "problems", "--json", str(out_dir / "selftest.json")]]},
        {"name": "tests", "timeout": 110, "env": {},
         "cmds": [[*pytest, "-rfE", "-m", "cuda", *xdist, "--junitxml", str(out_dir / "tests.xml"),
                   *TEST_SELECTION, "-k", _k_union(TEST_SELECTION)]]},
        {"name": "memcheck", "timeout": 45, "env": {}, "cmds": [sanitize("memcheck")], "sanitizer": True},
        {"name": "racecheck", "timeout": 45, "env": {}, "cmds": [sanitize("racecheck")], "sanitizer": True},
        {"name": "bench", "timeout": 100, "env": {},
         "cmds": [[*pytest, *BENCH_SELECTION, "-k", _k_union(BENCH_SELECTION),
                   f"--benchmark-json={out_dir / 'bench.json'}"]]},
    ]


def _tail(text: str, n: int = 4000) -> str:
    return text if len(text) <= n else "..." + text[-n:]


def run_step(step: dict, log, budget_left: float | None = None) -> dict:
    """Run the step's commands in order (stop at the first failure), under one timeout (the
    step's own, or what is left of the whole run's budget if that is less)."""
    t0 = time.monotonic()
    timeout = step["timeout"] if budget_left is None else max(1.0, min(step["timeout"], budget_left))
    deadline = t0 + timeout
    env = {**os.environ, **step["env"], "PYTHONUNBUFFERED": "1"}
    out_all, status, rc = "", "passed", 0
    for cmd in step["cmds"]:
        log.write(f"\n===== {step['name']}: {' '.join(shlex.quote(c) for c in cmd)}\n")
        log.flush()
        if step.get("sanitizer") and shutil.which(cmd[0]) is None:
            status, rc, out_all = "not run", None, f"{cmd[0]} not found on PATH"
            break
        left = deadline - time.monotonic()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=max(left, 1))
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            rc = None
            status = "timeout"
        log.write(out)
        log.flush()
        out_all += out
        if status == "timeout":
            break
        if rc != 0:
            if step.get("sanitizer") and "Device not supported" in out:
                status = "not run"  # the sanitizer cannot attach to this GPU: not a kernel failure
            else:
                status = "failed"
            break
    seconds = time.monotonic() - t0
    return {"name": step["name"], "status": status, "returncode": rc, "seconds": round(seconds, 2),
            "timeout": step["timeout"], "commands": [" ".join(shlex.quote(c) for c in c_) for c_ in step["cmds"]],
            "env": step["env"], "output_tail": _tail(out_all)}


def _environment() -> dict:
    env = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()}
    try:
        import torch

        env.update(torch=torch.__version__, cuda=torch.version.cuda, gpu=torch.cuda.get_device_name(0)
                   if torch.cuda.is_available() else None)
    except Exception as exc:  # pragma: no cover
        env["torch"] = f"unavailable: {exc}"
    try:
        env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True, timeout=20).stdout.strip() or None
    except Exception:
        env["driver"] = None
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=ROOT, capture_output=True,
                                       text=True, timeout=20).stdout.strip() or None
    except Exception:
        env["commit"] = None
    return env


def _slug() -> str:
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks import _report

        return _report.current_device_slug()
    except Exception:
        return "unknown"


def collect_counts(names: list[str] | None = None) -> dict[str, int]:
    """How many tests each pytest selection selects (``--collect-only``), per step."""
    sel = {"tests": TEST_SELECTION, "memcheck": SANITIZE_SELECTION, "bench": BENCH_SELECTION}
    counts = {}
    for name, selection in sel.items():
        if names and name not in names:
            continue
        cmd = [PY, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *selection,
               "-k", _k_union(selection)] + (["-m", "cuda"] if name != "bench" else [])
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
        ids = [line for line in res.stdout.splitlines() if "::" in line]
        counts[name] = len(ids)
        per_file: dict[str, int] = {}
        for line in ids:
            per_file[line.split("::")[0]] = per_file.get(line.split("::")[0], 0) + 1
        for f, n in sorted(per_file.items()):
            counts[f"{name}:{f}"] = n
    return counts


#: Runs the selftest under TRITON_INTERPRET=1 with a hook on every Triton launch, and prints how many
#: distinct specialisations (what a GPU would compile) it launched.
_COUNT_TRITON = r"""
import collections, sys, torch
from triton.runtime import interpreter as I
keys = collections.Counter()
orig = I.InterpretedFunction.run
def cls(v):
    if isinstance(v, torch.Tensor): return (str(v.dtype), v.data_ptr() % 16 == 0)
    if isinstance(v, bool): return ("b", v)
    if isinstance(v, int): return ("i", "1" if v == 1 else ("16" if v % 16 == 0 else "n"))
    if isinstance(v, float): return ("f",)
    return ("c", repr(v))
def run(self, *args, grid, warmup, **kw):
    keys[(getattr(self.fn, "__name__", "?"), tuple(map(cls, args)), tuple(sorted((k, cls(v)) for k, v in kw.items())))] += 1
    return orig(self, *args, grid=grid, warmup=warmup, **kw)
I.InterpretedFunction.run = run
from mipnet_kernels import selftest
rc = selftest.main(sys.argv[1:])
print(f"Triton specialisations: {len(keys)} distinct in {sum(keys.values())} launches")
for name, n in collections.Counter(k[0] for k in keys).most_common():
    print(f"  {n:5d} {name}")
sys.exit(rc)
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument("--count-triton", action="store_true",
                   help="count the Triton specialisations the selftest step launches (under the interpreter) and exit")
    p.add_argument("--collect", action="store_true", help="count the tests each pytest selection selects and exit")
    p.add_argument("--only", help="comma-separated steps to run (build, selftest, tests, memcheck, racecheck, bench)")
    p.add_argument("--skip-build", action="store_true", help="do not build (the extension is already built)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 16, help="MAX_JOBS for the build (default: all cores)")
    p.add_argument("--max-seconds", type=float, default=540.0,
                   help="cap on the whole run (default 540: inside a 10-minute device call); a step gets "
                        "at most what is left")
    p.add_argument("--results-dir", default=str(ROOT / "benchmarks" / "results"), help="parent of <gpu-slug>/smoke-<time>/")
    args = p.parse_args(argv)

    if args.count_triton:
        env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
        return subprocess.run([PY, "-c", _COUNT_TRITON, "--quick", "--backend", "triton", "--show", "problems"],
                              cwd=ROOT, env=env).returncode
    if args.collect:
        for k, v in collect_counts().items():
            print(f"{k:48s} {v}")
        return 0
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out_dir = Path(args.results_dir) / _slug() / f"smoke-{stamp}"
    plan = steps(out_dir, args.jobs)
    names = [s["name"] for s in plan]
    only = set(args.only.split(",")) if args.only else set(names)
    if args.skip_build:
        only.discard("build")
    unknown = only - set(names)
    if unknown:
        print(f"unknown steps {sorted(unknown)}; expected {names}", file=sys.stderr)
        return 2
    plan = [s for s in plan if s["name"] in only]
    if args.dry_run:
        total = 0
        for s in plan:
            total += s["timeout"]
            env = " ".join(f"{k}={v}" for k, v in s["env"].items())
            print(f"[{s['name']}] timeout {s['timeout']} s")
            for c in s["cmds"]:
                print(f"    {env + ' ' if env else ''}{' '.join(shlex.quote(x) for x in c)}")
        print(f"results -> {out_dir}" + (f" and {os.environ['OUT']}" if os.environ.get("OUT") else ""))
        print(f"sum of timeouts: {total} s (see the budget table in the docstring: ~395 s expected)")
        return 0

    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    results = []
    with open(out_dir / "gpu_smoke.log", "w") as log:
        for s in plan:
            print(f"=== {s['name']} (timeout {s['timeout']} s)", flush=True)
            r = run_step(s, log, args.max_seconds - (time.monotonic() - t0))
            results.append(r)
            print(f"=== {s['name']}: {r['status']} in {r['seconds']:.1f} s", flush=True)
            if r["status"] != "passed":
                print(_tail(r["output_tail"], 1500), flush=True)
    total = time.monotonic() - t0
    failed = [r["name"] for r in results if r["status"] in ("failed", "timeout")]
    summary = {"started": stamp, "seconds": round(total, 2), "passed": not failed, "failed": failed,
               "not_run": [r["name"] for r in results if r["status"] == "not run"],
               "environment": _environment(), "steps": results}
    (out_dir / "gpu_smoke.json").write_text(json.dumps(summary, indent=1))
    print("\nstep        status     seconds  timeout")
    for r in results:
        print(f"{r['name']:11s} {r['status']:10s} {r['seconds']:7.1f}  {r['timeout']:7d}")
    print(f"total {total:.1f} s; results in {out_dir}")
    dest = os.environ.get("OUT")
    if dest:
        Path(dest).mkdir(parents=True, exist_ok=True)
        for f in ("gpu_smoke.json", "selftest.json", "bench.json", "tests.xml", "gpu_smoke.log"):
            if (out_dir / f).exists():
                shutil.copy2(out_dir / f, Path(dest) / f)
        build_log = ROOT / "benchmarks" / "out" / "build.log"
        if build_log.exists():
            shutil.copy2(build_log, Path(dest) / "build.log")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
