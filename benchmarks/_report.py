"""Machine information and the human-readable results table of the benchmark suite.

Used twice: by ``benchmarks/conftest.py`` at the end of a pytest run (from the benchmarks
in memory) and by ``python -m benchmarks.report RESULTS.json`` (from a saved or
committed pytest-benchmark JSON).  Both read the same fields, so the table printed after
a run and the one rebuilt from its JSON are identical.

Every benchmark of this suite stores in ``extra_info`` (see ``record_extra_info``):
``op, mode, backend, device, device_name, shape, dtype, bytes_read, bytes_written,
bytes_moved, timer`` and, after timing, ``time_median_s`` and ``gbps``; GPU rows also
``copy_bandwidth_GBps`` and ``roofline_time_s`` (``bytes_moved`` at that bandwidth).
The median shown is pytest-benchmark's ``stats.median`` (CUDA-event device time on GPU
rows, ``perf_counter`` on CPU rows; see ``benchmarks/_timing.py``).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

#: Targets of the decode issue (printed as PASS/FAIL per row).
GPU_ROOFLINE_FACTOR = 2.0  # fused time <= 2x the time to move its bytes at copy bandwidth
GPU_LAUNCH_FLOOR_S = 10e-6  # ... or under 10 us, where launch latency dominates
GPU_MIN_SPEEDUP_VS_EAGER = 10.0  # decode: >= 10x faster than the eager reference
CPU_QUARTER_MIN_SPEEDUP_VS_NUMPY = 20.0  # cpu backend, quarter mode, vs the NumPy anchor
# MIMB issue: rows whose "eager" peer is the official-style SELambdaLayer ("compile": torch.compile of it).
MIMB_OPS = ("mimb", "mimb_train_step", "mimb_instances")
MIMB_CPU_MIN_SPEEDUP_VS_EAGER = 2.0  # cpu backend at batch 4
MIMB_CPU_TARGET_BATCH = 4
MIMB_GPU_FWD_MIN_SPEEDUP_VS_EAGER = 3.0
MIMB_GPU_FWD_MIN_SPEEDUP_VS_COMPILE = 1.5
MIMB_GPU_FWD_ROOFLINE_FACTOR = 1.3  # for x >= 8 MB
MIMB_GPU_ROOFLINE_MIN_BYTES = 8 * 1024 * 1024
MIMB_GPU_BWD_MIN_SPEEDUP_VS_EAGER = 2.0
# OKS-NMS issue (benchmarks/test_nms_bench.py; rows carry "workload" and "peer_mode").
NMS_OPS = ("oks_nms", "soft_oks_nms")
NMS_CPU_MIN_SPEEDUP_VS_NUMPY = 50.0  # cpu backend on coco_val_n2
NMS_GPU_COCO_MAX_S = 5e-3  # cuda/triton on coco_val_n2 (200,000 candidates)
NMS_GPU_COCO_MIN_SPEEDUP_VS_NUMPY = 1000.0
NMS_GPU_SMALL_MAX_S = 100e-6  # cuda/triton on small_batch

FUSED_GPU_BACKENDS = ("cuda", "triton")
BACKEND_ORDER = {"cuda": 0, "triton": 1, "cpu": 2, "reference": 3, "numpy": 4, "compile": 5, "eager": 6}
OP_ORDER = {"decode_heatmaps": 0, "flip_merge": 1, "mimb": 2, "mimb_train_step": 3, "mimb_instances": 4,
            "oks_nms": 5, "soft_oks_nms": 6}
MODE_ORDER = {"argmax": 0, "quarter": 1, "dark": 2, "udp": 3}
DEVICE_ORDER = {"cuda": 0, "cpu": 1}

# Filled by the conftest when the GPU copy bandwidth has been measured in this process.
COPY_BANDWIDTH: dict = {}
# 1/5/15-minute load average when the session started (set by the conftest): other work
# on the machine makes CPU timings (OpenMP barriers above all) noisy.
LOADAVG_AT_START: list | None = None


# --------------------------------------------------------------------------- machine info
def slugify(text: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def _dist_version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def nvidia_smi_query(fields: Iterable[str], gpu: str | None = None) -> dict[str, str | None]:
    """``nvidia-smi --query-gpu=FIELDS`` for one GPU (``gpu``: index, UUID or PCI bus id;
    None: the first); a field nvidia-smi lacks or reports as ``[N/A]`` is None, and every
    field is None when nvidia-smi is missing or fails."""
    fields = list(fields)
    out = dict.fromkeys(fields)
    cmd = ["nvidia-smi", "--query-gpu=" + ",".join(fields), "--format=csv,noheader,nounits"]
    if gpu is not None:
        cmd += ["-i", gpu]
    try:
        lines = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=True).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return out
    values = [v.strip() for v in lines[0].split(",")] if lines else []
    if len(values) == len(fields):
        for f, v in zip(fields, values):
            out[f] = None if not v or v.startswith("[") or v in ("N/A", "Not Supported") else v
    return out


#: ``machine_info["mipnet"]["gpu_clocks"]`` key -> nvidia-smi query field.
GPU_CLOCK_FIELDS = {
    "sm_mhz": "clocks.sm",
    "mem_mhz": "clocks.mem",
    "max_sm_mhz": "clocks.max.sm",
    "max_mem_mhz": "clocks.max.mem",
    "applications_sm_mhz": "clocks.applications.graphics",
    "applications_mem_mhz": "clocks.applications.memory",
    "pstate": "pstate",
    "power_limit_w": "power.limit",
    "persistence_mode": "persistence_mode",
}


def _to_number(value: str | None):
    if value is None:
        return None
    try:
        f = float(value)
    except ValueError:
        return value
    return int(f) if f.is_integer() else f


def gpu_clocks(gpu: str | None = None) -> dict:
    """Current and maximum SM / memory clocks, application clocks, P-state and power limit
    of one GPU from nvidia-smi (every value None when nvidia-smi is absent).  Clocks below
    their maximum while benchmarking (power or thermal capping, a locked clock) explain
    slower runs of the same GPU kind."""
    raw = nvidia_smi_query(GPU_CLOCK_FIELDS.values(), gpu)
    return {key: _to_number(raw[field]) for key, field in GPU_CLOCK_FIELDS.items()}


def _nvidia_smi_gpu_id(props) -> str | None:
    """The PCI bus id nvidia-smi knows the torch device by (CUDA_VISIBLE_DEVICES renumbers)."""
    try:
        return f"{props.pci_domain_id:08X}:{props.pci_bus_id:02X}:{props.pci_device_id:02X}.0"
    except AttributeError:  # older torch: no PCI ids in the device properties
        return None


def nvidia_driver_version() -> str | None:
    """The NVIDIA driver version (``nvidia-smi``, else ``/proc/driver/nvidia/version``)."""
    version = nvidia_smi_query(["driver_version"])["driver_version"]
    if version:
        return version
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
        m = re.search(r"Kernel Module\s+(?:for\s+\S+\s+)?([0-9][0-9.]+)", text)
        if m:
            return m.group(1)
    except OSError:
        pass
    return None


def cuda_driver_api_version() -> int | None:
    """The CUDA driver API version (``cuDriverGetVersion`` of libcuda, e.g. 13000 for 13.0);
    None without a loadable driver."""
    import ctypes

    try:
        lib = ctypes.CDLL("libcuda.so.1")
        version = ctypes.c_int(0)
        return int(version.value) if lib.cuDriverGetVersion(ctypes.byref(version)) == 0 else None
    except (OSError, AttributeError):
        return None


def collect_machine_info() -> dict:
    """Versions and devices for the JSON's ``machine_info["mipnet"]``."""
    import torch

    info: dict = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": None,
        "triton": _dist_version("triton", "pytorch-triton"),
        "numpy": _dist_version("numpy"),
        "opencv": _dist_version("opencv-python-headless", "opencv-python", "opencv-contrib-python"),
        "pytest_benchmark": _dist_version("pytest-benchmark"),
        "mipnet_kernels": None,
        "cpu_name": cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg_at_start": LOADAVG_AT_START,
        "cuda_available": torch.cuda.is_available(),
    }
    try:
        import mipnet_kernels

        info["mipnet_kernels"] = mipnet_kernels.__version__
        info["backends"] = mipnet_kernels.available_backends()
    except Exception as exc:  # noqa: BLE001 - only reporting
        info["backends_error"] = repr(exc)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        name = torch.cuda.get_device_name()
        info.update(
            gpu_name=name,
            gpu_capability=f"{props.major}.{props.minor}",
            gpu_sms=props.multi_processor_count,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            gpu_l2_bytes=getattr(props, "L2_cache_size", None),
            driver=nvidia_driver_version(),
            gpu_clocks=gpu_clocks(_nvidia_smi_gpu_id(props)),
            device_name=name,
            device_slug=slugify(name),
        )
        try:
            info["cudnn"] = torch.backends.cudnn.version()
        except Exception:  # noqa: BLE001 - only reporting
            pass
        info["cuda_driver_api"] = cuda_driver_api_version()
        if COPY_BANDWIDTH:
            info["copy_bandwidth"] = dict(COPY_BANDWIDTH)
    else:
        info.update(device_name=info["cpu_name"], device_slug=cpu_slug(info["cpu_name"]))
    return info


def cpu_slug(name: str) -> str:
    """Results folder of CPU-only runs: ``"AMD EPYC"`` -> ``"cpu-amd-epyc"``."""
    return "cpu-" + slugify(name)


def current_device_slug() -> str:
    """The results folder of this machine (as :func:`collect_machine_info`, without its cost)."""
    import torch

    return slugify(torch.cuda.get_device_name()) if torch.cuda.is_available() else cpu_slug(cpu_name())


# --------------------------------------------------------------------------- saved runs
#: Rows renamed after runs were recorded, so that every older file compares like with like:
#: ``(suite, mode, old op, new op)``; :func:`load_run` renames such rows (``op`` in
#: ``extra_info`` and ``params``, the op's id in ``name`` / ``fullname`` / ``param``, the
#: first word of ``group``).
RENAMED_OPS = (
    # issue 15: the MIMB training step (forward + backward of the module in train mode) kept
    # the name of the op it timed before the step was fused.
    ("benchmarks/test_mimb_bench.py", "fwd+bwd", "mimb_scale", "mimb_train_step"),
)


def _rename_id(text: str, old: str, new: str) -> str:
    """``"test[cpu-cpu-fp32-4x32x64x48-old]"`` -> ``"...-new]"`` (whole ``-``-separated ids only)."""
    head, sep, ids = text.partition("[") if "[" in text else ("", "", text)
    closing = "]" if ids.endswith("]") else ""
    parts = (ids[:-1] if closing else ids).split("-")
    return head + sep + "-".join(new if p == old else p for p in parts) + closing


def migrate_benchmark(bench: dict) -> dict:
    """``bench`` with the row names of :data:`RENAMED_OPS` brought up to date (in place)."""
    ei = bench.get("extra_info") or {}
    for suite, mode, old, new in RENAMED_OPS:
        if suite_of(bench) != suite or ei.get("op") != old or ei.get("mode") != mode:
            continue
        ei["op"] = new
        if isinstance(bench.get("params"), dict) and bench["params"].get("op") == old:
            bench["params"]["op"] = new
        for key in ("name", "fullname", "param"):
            if isinstance(bench.get(key), str):
                bench[key] = _rename_id(bench[key], old, new)
        group = str(bench.get("group") or "")
        if group.split(" ", 1)[0] == old:
            bench["group"] = new + group[len(old):]
    return bench


def load_run(path: str | os.PathLike, text: str | None = None) -> dict:
    """A pytest-benchmark JSON file (or a trimmed baseline, :mod:`benchmarks.baseline`), rows
    renamed as :data:`RENAMED_OPS` says; ``ValueError`` naming the file when it is neither.
    ``text``: the file's content when it does not come from the file itself (a git version)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text() if text is None else text)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read benchmark JSON {path}: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise ValueError(f"{path} is not pytest-benchmark JSON (no 'benchmarks' list)")
    for bench in data["benchmarks"]:
        migrate_benchmark(bench)
    return data


#: ``format`` of a trimmed baseline file (:mod:`benchmarks.baseline`).
BASELINE_FORMAT = "mipnet-bench-baseline/1"


def is_baseline(data: dict) -> bool:
    return data.get("format") == BASELINE_FORMAT


def split_runs(path: str | os.PathLike, data: dict) -> list[tuple[Path, dict]]:
    """The runs in one loaded file: a pytest-benchmark JSON is one run; a trimmed baseline
    holds the rows of several, each row naming its run (``"run"``: the index in ``runs``),
    given back as one run per source, labelled ``<file>#<run id>``, with that run's
    ``machine_info``, ``commit_info`` and ``datetime``."""
    path = Path(path)
    if not is_baseline(data):
        return [(path, data)]
    runs = data.get("runs")
    if not isinstance(runs, list) or not runs:
        raise ValueError(f"{path} is a trimmed baseline without its 'runs'")
    rows: dict[int, list] = {}
    for bench in data["benchmarks"]:
        n = bench.get("run")
        if not isinstance(n, int) or not 0 <= n < len(runs):
            raise ValueError(f"{path}: benchmark {bench.get('fullname')!r} names no run of the file (run={n!r})")
        rows.setdefault(n, []).append({k: v for k, v in bench.items() if k != "run"})
    out = []
    for n, run in enumerate(runs):
        if n in rows:
            meta = {k: v for k, v in run.items() if k != "id"}
            out.append((path.with_name(f"{path.name}#{run.get('id', n)}"), dict(meta, benchmarks=rows[n])))
    return out


def load_runs(path: str | os.PathLike, text: str | None = None) -> list[tuple[Path, dict]]:
    """:func:`load_run` + :func:`split_runs`: the ``(label, run)`` pairs of one file."""
    return split_runs(path, load_run(path, text))


def run_slug(data: dict) -> str | None:
    """The device kind of a saved run (its results folder name), None when not recorded."""
    mip = (data.get("machine_info") or {}).get("mipnet") or {}
    if mip.get("device_slug"):
        return mip["device_slug"]
    if mip.get("gpu_name"):
        return slugify(mip["gpu_name"])
    return None


def suite_of(benchmark: dict) -> str:
    """The module a benchmark comes from: ``"benchmarks/test_decode_bench.py"``."""
    return str(benchmark.get("fullname") or benchmark.get("name", "")).split("::", 1)[0]


def benchmark_key(benchmark: dict) -> str:
    """The identity of a benchmark across runs: its pytest node id (``fullname``)."""
    return str(benchmark.get("fullname") or benchmark.get("name"))


def run_time(data: dict) -> str:
    """When a run was recorded (ISO time; sorts chronologically)."""
    return str(data.get("datetime") or "")


def merge_newest(runs: Iterable[tuple[Path, dict]], per: str = "suite") -> tuple[list[dict], list[Path]]:
    """Benchmarks of several runs of one device kind, each from the newest run containing it.

    ``per="suite"`` (the gate's baseline): a suite (test module) comes whole from the newest
    run that contains it, so a run of one suite (``-k`` or a single file) replaces that suite
    only and a benchmark dropped from a suite does not live on from an older run.
    ``per="benchmark"`` (the report): every benchmark from the newest run that has it.
    Returns the benchmarks (each with ``"_source"``: its file) and the files used."""
    if per not in ("suite", "benchmark"):
        raise ValueError(f"per must be 'suite' or 'benchmark', got {per!r}")
    unit = suite_of if per == "suite" else benchmark_key
    newest: dict[str, tuple[tuple[str, str], Path, dict]] = {}
    for path, data in runs:
        order = (run_time(data), Path(path).name)
        for u in {unit(b) for b in data["benchmarks"]}:
            if u not in newest or order > newest[u][0]:
                newest[u] = (order, Path(path), data)
    merged = []
    for u, (_, path, data) in sorted(newest.items()):
        merged.extend(dict(b, _source=str(path)) for b in data["benchmarks"] if unit(b) == u)
    return merged, sorted({path for _, path, _ in newest.values()})


def save_results_copy(results_dir: str | os.PathLike, output_json: dict | None, json_path: str | None) -> Path:
    """Write the run's JSON to ``results_dir/<device-slug>/<UTC time>_<commit>.json``."""
    if output_json is None:
        output_json = json.loads(Path(json_path).read_text())
    mip = output_json.get("machine_info", {}).get("mipnet", {})
    slug = mip.get("device_slug") or "unknown-device"
    commit = (output_json.get("commit_info") or {}).get("id") or "nocommit"
    dirty = "-dirty" if (output_json.get("commit_info") or {}).get("dirty") else ""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    dest = Path(results_dir) / slug / f"{stamp}_{str(commit)[:10]}{dirty}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    if json_path is not None and Path(json_path).exists():
        shutil.copyfile(json_path, dest)
    else:
        dest.write_text(json.dumps(output_json, indent=2, default=str))
    return dest


# --------------------------------------------------------------------------- table
def _fmt_time(t: float | None) -> str:
    if t is None:
        return "-"
    if t < 1e-3:
        return f"{t * 1e6:.1f} us"
    if t < 1.0:
        return f"{t * 1e3:.2f} ms"
    return f"{t:.2f} s"


def _fmt_x(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.0f}x" if x >= 100 else f"{x:.1f}x" if x >= 10 else f"{x:.2f}x"


def _rows(benchmarks: Iterable[dict]) -> list[dict]:
    rows = []
    for b in benchmarks:
        ei = b.get("extra_info") or {}
        if "op" not in ei:
            continue  # not one of ours
        stats = b.get("stats") or {}
        t = stats.get("median", ei.get("time_median_s"))
        if t is None:
            continue
        row = dict(ei)
        for key in ("backend", "device", "shape", "dtype"):  # suites that record fewer fields
            if not isinstance(row.get(key), str):
                row[key] = "-"
        row["time"] = float(t)
        row["rounds"] = stats.get("rounds")
        rows.append(row)
    return rows


def peer_key(row: dict) -> tuple:
    """Rows that time the same work on different backends share this key."""
    return (row.get("op"), row.get("mode"), row.get("shape"), row.get("dtype"), row.get("device"))


def speedups(backend: str, time: float, peers: dict[str, float]) -> dict[str, float | None]:
    """Speed-ups of a row (``time`` on ``backend``) over its peers' times (backend -> time):
    ``speedup_eager`` over the eager baseline (MIMB: the official-style layer ``eager``, else
    the ``reference`` backend), ``speedup_compile`` over ``torch.compile`` of it,
    ``speedup_numpy`` over the NumPy anchor.  None where the peer is absent or is the row."""
    eager = "eager" if "eager" in peers else "reference"
    return {
        "speedup_eager": peers[eager] / time if eager in peers and backend != eager else None,
        "speedup_compile": (
            peers["compile"] / time if "compile" in peers and backend not in ("compile", "eager") else None
        ),
        "speedup_numpy": peers["numpy"] / time if "numpy" in peers and backend != "numpy" else None,
    }


def _shape_sort_key(shape: str):
    """Numeric order of ``"4x32x64x48"`` (so batch 4 < 24 < 48 and C 32 < 256)."""
    try:
        return (0, tuple(int(p) for p in shape.split("x")), "")
    except ValueError:
        return (1, (), shape)


def _mimb_target(row: dict) -> str:
    """The MIMB issue's targets; '' for rows without one."""
    if row["backend"] in ("eager", "compile", "reference"):
        return ""
    if row["device"] == "cpu":
        if row["backend"] != "cpu" or not row["shape"].startswith(f"{MIMB_CPU_TARGET_BATCH}x"):
            return ""
        sx = row.get("speedup_eager")
        if sx is None:
            return "n/a: no eager row"
        need = MIMB_CPU_MIN_SPEEDUP_VS_EAGER
        return "PASS" if sx >= need else f"FAIL: eager {sx:.2f}x<{need:g}x"
    if row["device"] != "cuda" or row["backend"] not in FUSED_GPU_BACKENDS:
        return ""
    fails = []
    sx, sc = row.get("speedup_eager"), row.get("speedup_compile")
    if row["op"] == "mimb_train_step":  # forward + backward
        if sx is None:
            fails.append("no eager row")
        elif sx < MIMB_GPU_BWD_MIN_SPEEDUP_VS_EAGER:
            fails.append(f"eager {sx:.1f}x<{MIMB_GPU_BWD_MIN_SPEEDUP_VS_EAGER:g}x")
    else:
        if sx is None:
            fails.append("no eager row")
        elif sx < MIMB_GPU_FWD_MIN_SPEEDUP_VS_EAGER:
            fails.append(f"eager {sx:.1f}x<{MIMB_GPU_FWD_MIN_SPEEDUP_VS_EAGER:g}x")
        if sc is None:
            fails.append("no compile row")
        elif sc < MIMB_GPU_FWD_MIN_SPEEDUP_VS_COMPILE:
            fails.append(f"compile {sc:.1f}x<{MIMB_GPU_FWD_MIN_SPEEDUP_VS_COMPILE:g}x")
        x_bytes = row.get("bytes_read", 0)  # forward rows read x exactly once
        roof = row.get("t_over_copy")
        if x_bytes >= MIMB_GPU_ROOFLINE_MIN_BYTES:
            if roof is None:
                fails.append("no copy bw")
            elif roof > MIMB_GPU_FWD_ROOFLINE_FACTOR:
                fails.append(f"{roof:.2f}x copy")
    return "PASS" if not fails else "FAIL: " + ", ".join(fails)


def _nms_target(row: dict) -> str:
    """The OKS-NMS issue's targets (hard NMS rows); '' for rows without one."""
    if row["op"] != "oks_nms":
        return ""
    workload, t, sx = row.get("workload"), row["time"], row.get("speedup_numpy")
    if row["device"] == "cpu" and row["backend"] == "cpu" and workload == "coco_val_n2":
        if sx is None:
            return "n/a: no numpy row"
        return "PASS" if sx >= NMS_CPU_MIN_SPEEDUP_VS_NUMPY else f"FAIL: numpy {sx:.1f}x<{NMS_CPU_MIN_SPEEDUP_VS_NUMPY:g}x"
    if row["device"] != "cuda" or row["backend"] not in FUSED_GPU_BACKENDS:
        return ""
    fails = []
    if workload == "coco_val_n2":
        if t >= NMS_GPU_COCO_MAX_S:
            fails.append(f"{t * 1e3:.2f} ms>=5 ms")
        if sx is None:
            fails.append("no numpy row")
        elif sx < NMS_GPU_COCO_MIN_SPEEDUP_VS_NUMPY:
            fails.append(f"numpy {sx:.0f}x<1000x")
    elif workload == "small_batch":
        if t >= NMS_GPU_SMALL_MAX_S:
            fails.append(f"{t * 1e6:.0f} us>=100 us")
    else:
        return ""
    return "PASS" if not fails else "FAIL: " + ", ".join(fails)


def _target(row: dict) -> str:
    t = row["time"]
    if row["op"] in MIMB_OPS:
        return _mimb_target(row)
    if row["op"] in NMS_OPS:
        return _nms_target(row)
    if row["device"] == "cuda" and row["backend"] in FUSED_GPU_BACKENDS and row.get("bytes_moved"):
        fails = []
        roof = row.get("t_over_copy")
        if roof is None:
            fails.append("no copy bw")
        elif not (roof <= GPU_ROOFLINE_FACTOR or t < GPU_LAUNCH_FLOOR_S):
            fails.append(f"{roof:.1f}x copy")
        if row["op"] == "decode_heatmaps":
            sx = row.get("speedup_eager")
            if sx is None:
                fails.append("no eager row")
            elif sx < GPU_MIN_SPEEDUP_VS_EAGER:
                fails.append(f"eager {sx:.1f}x<10x")
        return "PASS" if not fails else "FAIL: " + ", ".join(fails)
    if row["device"] == "cpu" and row["backend"] == "cpu" and row.get("mode") == "quarter":
        sx = row.get("speedup_numpy")
        if sx is None:
            return "n/a: no numpy row"
        return "PASS" if sx >= CPU_QUARTER_MIN_SPEEDUP_VS_NUMPY else f"FAIL: numpy {sx:.1f}x<20x"
    return ""


def annotated_rows(benchmarks: Iterable[dict]) -> list[dict]:
    """Our benchmarks' ``extra_info`` plus ``time`` (the median), the speed-ups over their
    peers, ``gbps_now``, ``t_over_copy`` and the issue ``target`` verdict, in table order."""
    rows = _rows(benchmarks)
    by_key: dict[tuple, dict[str, float]] = {}
    for r in rows:
        by_key.setdefault(peer_key(r), {})[r["backend"]] = r["time"]
    for r in rows:
        r.update(speedups(r["backend"], r["time"], by_key[peer_key(r)]))
        moved = r.get("bytes_moved")
        r["gbps_now"] = moved / r["time"] / 1e9 if moved and r["time"] > 0 else None
        bw = r.get("copy_bandwidth_GBps")
        fused = r["backend"] != "numpy"  # the anchor's time is host time, not a roofline question
        r["t_over_copy"] = r["time"] / (moved / (bw * 1e9)) if bw and moved and fused else None
        r["target"] = _target(r)
    rows.sort(key=lambda r: (
        DEVICE_ORDER.get(r["device"], 9), OP_ORDER.get(r["op"], 9), _shape_sort_key(r["shape"]),
        MODE_ORDER.get(r.get("mode"), 9), r["dtype"], BACKEND_ORDER.get(r["backend"], 9),
    ))
    return rows


def build_table(benchmarks: Iterable[dict], machine_info: dict | None = None) -> str:
    """The readable table (one line per benchmark) plus a legend; '' when nothing to show."""
    rows = annotated_rows(benchmarks)
    if not rows:
        return ""
    header = ["op", "mode", "dev", "backend", "shape", "dtype", "median", "GB/s",
              "x eager", "x numpy", "t/copy", "target"]
    table = [header]
    for r in rows:
        table.append([
            r["op"], r.get("mode") or "-", r["device"], r["backend"], r["shape"],
            r["dtype"].replace("float", "fp"), _fmt_time(r["time"]),
            f"{r['gbps_now']:.1f}" if r["gbps_now"] is not None else "-",
            _fmt_x(r["speedup_eager"]), _fmt_x(r["speedup_numpy"]),
            _fmt_x(r["t_over_copy"]) if r["t_over_copy"] is not None else "-",
            r["target"],
        ])
    widths = [max(len(str(line[i])) for line in table) for i in range(len(header))]
    right = {6, 7, 8, 9, 10}
    out = []
    for n, line in enumerate(table):
        cells = [str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(line, widths))]
        out.append(" | ".join(cells).rstrip())
        if n == 0:
            out.append("-+-".join("-" * w for w in widths))

    mip = (machine_info or {}).get("mipnet", machine_info or {})
    lines = []
    devs = sorted({r["device_name"] for r in rows if r.get("device_name")})
    lines.append("mipnet_kernels benchmarks on " + (" / ".join(devs) or "?"))
    if mip:
        lines.append(
            f"torch {mip.get('torch')} (CUDA {mip.get('torch_cuda')}), triton {mip.get('triton')}, "
            f"driver {mip.get('driver') or '-'}, {mip.get('cpu_threads')} CPU threads"
        )
        load = mip.get("loadavg_at_start")
        if load is not None and mip.get("cpu_count"):
            busy = load[0] > 0.5 * mip["cpu_count"]
            lines.append(
                f"load average at start {load[0]:.2f} on {mip['cpu_count']} CPUs"
                + ("  <-- the machine was busy: CPU timings are noisy" if busy else "")
            )
    bws = sorted({r["copy_bandwidth_GBps"] for r in rows if r.get("copy_bandwidth_GBps")})
    if bws:
        lines.append(f"device copy bandwidth (read+write, 512 MiB D2D copy): {bws[0]:.0f} GB/s")
    lines.append("")
    lines.extend(out)
    lines.append("")
    timers = sorted({r.get("timer", "?") for r in rows})
    lines.append(
        "median: pytest-benchmark stats.median; timer per row: "
        + ", ".join(timers)
        + " (cuda_event_timer = device time between CUDA events, L2 flushed before each round"
        " unless --mipnet-no-l2-flush; numpy rows on cuda include the .cpu() copy)."
    )
    lines.append(
        "GB/s: bytes that must move / median (decode: read B*K*H*W once + write coords/scores;"
        " flip_merge: read 2 maps + write 1).  x eager / x numpy: speed-up over the reference"
        " backend / the NumPy anchor on the same device, shape and dtype."
    )
    if any(r["op"] in MIMB_OPS for r in rows):
        lines.append(
            "MIMB rows (op mimb fwd / mimb_train_step fwd+bwd / mimb_instances N=2): x eager is over the"
            " official-style SELambdaLayer (backend eager; compile = torch.compile of it); GB/s counts"
            " read x + write y (N writes for mimb_instances; fwd+bwd adds read x, dy + write dx)."
            f"  Targets: cpu >= {MIMB_CPU_MIN_SPEEDUP_VS_EAGER:g}x eager at batch {MIMB_CPU_TARGET_BATCH};"
            f" cuda/triton fwd >= {MIMB_GPU_FWD_MIN_SPEEDUP_VS_EAGER:g}x eager, >= {MIMB_GPU_FWD_MIN_SPEEDUP_VS_COMPILE:g}x"
            f" compile, t/copy <= {MIMB_GPU_FWD_ROOFLINE_FACTOR:g}x for x >= 8 MB; fwd+bwd >= {MIMB_GPU_BWD_MIN_SPEEDUP_VS_EAGER:g}x eager."
        )
    if any(r["op"] in NMS_OPS for r in rows):
        lines.append(
            "OKS-NMS rows: shape = images-candidates of the workload (K=17, float32); x numpy is over"
            " HRNet's per-image NumPy loop (tests/anchors.py), run once; '/mask' rows time the"
            " sync-free mask form.  Targets: cpu >= 50x numpy on coco_val_n2; cuda/triton < 5 ms and"
            " >= 1000x numpy on coco_val_n2, < 100 us on small_batch.  GB/s is not meaningful for NMS."
        )
    lines.append(
        "t/copy: median / (bytes at the measured copy bandwidth).  Targets: cuda/triton rows "
        "t/copy <= 2x or < 10 us (decode also >= 10x eager); cpu quarter >= 20x numpy."
    )
    verdicts = [r["target"] for r in rows if r["target"]]
    if verdicts:
        n_pass = sum(v == "PASS" for v in verdicts)
        lines.append(f"targets: {n_pass} PASS, {len(verdicts) - n_pass} not met, of {len(verdicts)} rows with a target")
    return "\n".join(lines)
