"""Results of saved benchmark runs: the terminal table, or a markdown report with PNG plots.

    .venv/bin/python -m benchmarks.report benchmarks/out/results.json          # the table
    .venv/bin/python -m benchmarks.report benchmarks/results/nvidia-h100-80gb-hbm3/baseline.json
    .venv/bin/python -m benchmarks.report --markdown benchmarks/report.md \\
        --plots benchmarks/report benchmarks/results/cpu-amd-epyc              # `make bench-report`

Inputs are pytest-benchmark JSON files written with ``--benchmark-json``, the trimmed
baselines committed as ``benchmarks/results/<device>/baseline.json`` (their summary
statistics are all the report reads), or such folders.  The table is the one the suite
prints at the end of a run.  With ``--markdown`` the inputs, all of one device kind, are
merged (each row from the newest run containing it; a baseline counts as the runs it
holds) into one report: a machine summary, per-op tables, and PNG plots (matplotlib, Agg
backend) that read without the JSON:

* per op and device: median time per configuration and backend, and achieved GB/s against
  the roofline (the measured device copy bandwidth when recorded, else the datasheet peak
  of the GPU kind, :data:`PEAK_BANDWIDTH_GBPS`);
* model suite (rows with ``extra_info["arch"]``): latency bars per arch, input size and batch
  for each variant (baseline HRNet, official-style N=2, ours), with the FLOP floor
  (``extra_info`` entry named ``*flop_floor*``: the floor of ours / baseline) marked;
* latency against batch size, for every series measured at two or more batch sizes;
* NMS (rows whose ``op`` contains ``nms``): time against the number of candidates, log-log,
  with the NumPy anchor.

A plot whose data is absent from the inputs is skipped, and the report says so.
"""

from __future__ import annotations

import argparse
import fnmatch
import math
import os
import re
import sys
from collections import defaultdict
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/report.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "benchmarks"

from . import _report  # noqa: E402

#: Datasheet peak memory bandwidth (GB/s) by device-kind slug glob: the roofline when a run
#: did not record its measured copy bandwidth.
PEAK_BANDWIDTH_GBPS = (
    ("nvidia-h200*", 4800.0),
    ("nvidia-h100*pcie*", 2000.0),
    ("nvidia-h100*", 3350.0),
    ("nvidia-a100*80gb*", 2039.0),
    ("nvidia-a100*", 1555.0),
    ("nvidia-l40s*", 864.0),
    ("nvidia-l4*", 300.0),
)
BACKEND_COLORS = {"cuda": "#1f77b4", "triton": "#ff7f0e", "cpu": "#2ca02c", "reference": "#7f7f7f",
                  "numpy": "#d62728", "eager": "#9467bd", "compile": "#8c564b"}
VARIANT_ORDER = ("baseline", "hrnet", "official", "ours", "engine")
CANDIDATE_KEYS = ("num_candidates", "candidates", "n_candidates", "total_candidates")
BATCH_KEYS = ("batch", "batch_size")


# --------------------------------------------------------------------------- inputs
def load_inputs(paths: list[Path]) -> tuple[list[dict], dict, list[Path]]:
    """Benchmarks (each from the newest run that has it), machine info of the newest run, and
    the files used, of the runs in ``paths`` (files or kind folders); ``ValueError`` when
    they span several device kinds."""
    runs = []
    for path in paths:
        files = sorted(path.glob("*.json")) if path.is_dir() else [path]
        for f in files:
            runs.extend(_report.load_runs(f))
    if not runs:
        raise ValueError(f"no benchmark JSON in {', '.join(map(str, paths))}")
    kinds = {_report.run_slug(d) for _, d in runs}
    if len(kinds) > 1:
        raise ValueError(f"runs of several device kinds ({', '.join(sorted(map(str, kinds)))}): "
                         "report one kind at a time")
    benchmarks, sources = _report.merge_newest(runs, per="benchmark")
    newest = max(runs, key=lambda r: _report.run_time(r[1]))[1]
    return benchmarks, newest.get("machine_info") or {}, sources


def roofline(rows: list[dict], machine_info: dict) -> tuple[float | None, str]:
    """(GB/s, where it comes from) of the bandwidth roofline of a device's rows."""
    bws = [r["copy_bandwidth_GBps"] for r in rows if r.get("copy_bandwidth_GBps")]
    copy = ((machine_info.get("mipnet") or {}).get("copy_bandwidth") or {}).get("copy_bandwidth_GBps")
    if bws or copy:
        return float(bws[0] if bws else copy), "measured device copy bandwidth"
    if rows and rows[0].get("device") == "cuda":
        slug = _report.slugify(rows[0].get("device_name") or "")
        for pattern, peak in PEAK_BANDWIDTH_GBPS:
            if fnmatch.fnmatchcase(slug, pattern):
                return peak, "datasheet peak bandwidth"
    return None, ""


def _num(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def _batch(ei: dict) -> int | None:
    for key in BATCH_KEYS:
        if _num(ei.get(key)):
            return int(ei[key])
    shape = str(ei.get("shape") or "")
    return int(shape.split("x")[0]) if re.fullmatch(r"\d+(x\d+)+", shape) else None


def model_rows(benchmarks: list[dict]) -> list[dict]:
    """Model-suite rows: ``extra_info`` with ``arch``, plus ``time`` (median), ``variant``,
    ``batch`` and ``flop_floor`` (None when not recorded)."""
    rows = []
    for b in benchmarks:
        ei = b.get("extra_info") or {}
        t = _num((b.get("stats") or {}).get("median"))
        if not ei.get("arch") or t is None:
            continue
        floor = next((_num(v) for k, v in ei.items() if "flop_floor" in k and _num(v)), None)
        variant = next((str(ei[k]) for k in ("variant", "pipeline", "impl", "backend") if ei.get(k)), "?")
        size = ei.get("input_size") or ei.get("size") or ei.get("resolution")
        if isinstance(size, (list, tuple)):
            size = "x".join(map(str, size))
        rows.append(dict(ei, time=t, variant=variant, batch=_batch(ei), flop_floor=floor,
                         size=size or "", name=b.get("name")))
    return rows


def nms_rows(benchmarks: list[dict]) -> list[dict]:
    rows = []
    for b in benchmarks:
        ei = b.get("extra_info") or {}
        t = _num((b.get("stats") or {}).get("median"))
        n = next((_num(ei.get(k)) for k in CANDIDATE_KEYS if _num(ei.get(k))), None)
        if "nms" in str(ei.get("op", "")) and t is not None and n:
            rows.append(dict(ei, time=t, candidates=n))
    return rows


# --------------------------------------------------------------------------- plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _variant_key(v: str):
    low = v.lower()
    return (next((i for i, name in enumerate(VARIANT_ORDER) if name in low), len(VARIANT_ORDER)), low)


def _config_label(r: dict) -> str:
    parts = [r.get("mode"), r.get("shape"), str(r.get("dtype", "")).replace("float", "fp")]
    return "\n".join(str(p) for p in parts if p)


def plot_op(plt, rows: list[dict], roof: tuple[float | None, str], path: Path) -> None:
    """Median time (log) and achieved GB/s per configuration, one bar per backend (the GB/s
    panel only for ops that record the bytes they must move)."""
    configs = list(dict.fromkeys(_config_label(r) for r in rows))
    backends = sorted({r["backend"] for r in rows}, key=lambda b: _report.BACKEND_ORDER.get(b, 9))
    width = 0.8 / len(backends)
    with_bw = any(r["gbps_now"] for r in rows)
    fig, axes = plt.subplots(1, 2 if with_bw else 1, figsize=(max(10, 1.2 * len(configs) + 6), 5.5), squeeze=False)
    ax_t, ax_bw = axes[0][0], axes[0][1] if with_bw else None
    for i, backend in enumerate(backends):
        by_cfg = {_config_label(r): r for r in rows if r["backend"] == backend}
        xs = [n + (i - (len(backends) - 1) / 2) * width for n, c in enumerate(configs) if c in by_cfg]
        cfgs = [c for c in configs if c in by_cfg]
        color = BACKEND_COLORS.get(backend)
        ax_t.bar(xs, [by_cfg[c]["time"] * 1e6 for c in cfgs], width, label=backend, color=color)
        if with_bw:
            ax_bw.bar(xs, [by_cfg[c]["gbps_now"] or 0.0 for c in cfgs], width, label=backend, color=color)
    ax_t.set_yscale("log")
    ax_t.set_ylabel("median time per call (µs, log scale)")
    ax_t.set_title("time (lower is better)")
    if with_bw:
        bw, where = roof
        if bw:
            ax_bw.axhline(bw, color="black", linestyle="--", linewidth=1.2, label=f"roofline {bw:.0f} GB/s ({where})")
        else:
            ax_bw.text(0.5, 0.97, "no roofline: no copy bandwidth recorded for this device",
                       transform=ax_bw.transAxes, ha="center", va="top", fontsize=8, color="dimgray")
        ax_bw.set_ylabel("achieved GB/s (bytes that must move / median)")
        ax_bw.set_title("bandwidth (higher is better)")
    for ax in (ax_t, ax_bw) if with_bw else (ax_t,):
        ax.set_xticks(range(len(configs)))
        ax.set_xticklabels(configs, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    r0 = rows[0]
    fig.suptitle(f"{r0['op']} on {r0.get('device_name') or r0['device']} ({r0['device']} tensors)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_model_latency(plt, rows: list[dict], device: str, path: Path) -> None:
    """Latency bars per (arch, size, dtype, batch), one per variant, FLOP floor marked."""
    group = lambda r: (r["arch"], r["size"], str(r.get("dtype", "")), r["batch"], str(r.get("mode") or ""))  # noqa: E731
    groups = sorted({group(r) for r in rows}, key=lambda g: tuple(str(x) for x in g))
    variants = sorted({r["variant"] for r in rows}, key=_variant_key)
    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(groups) + 3), 5.5))
    floor_labelled = False
    for i, variant in enumerate(variants):
        by_group = {group(r): r for r in rows if r["variant"] == variant}
        xs = [n + (i - (len(variants) - 1) / 2) * width for n, g in enumerate(groups) if g in by_group]
        ax.bar(xs, [by_group[g]["time"] * 1e3 for g in groups if g in by_group], width, label=variant)
    for n, g in enumerate(groups):
        members = [r for r in rows if group(r) == g]
        base = min(members, key=lambda r: _variant_key(r["variant"]))
        floor = next((r["flop_floor"] for r in members if r["flop_floor"]), None)
        if floor and _variant_key(base["variant"])[0] <= 1:  # a baseline HRNet row to scale
            y = base["time"] * floor * 1e3
            ax.hlines(y, n - 0.45, n + 0.45, colors="black", linestyles="--",
                      label=None if floor_labelled else "FLOP floor of N=2 (baseline x FLOP ratio)")
            floor_labelled = True
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(["\n".join(str(x) for x in (a, s, d, f"batch {b}", m) if x) for a, s, d, b, m in groups],
                       fontsize=8)
    ax.set_ylabel("median latency per batch (ms)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"N=2 MIPNet vs baseline HRNet latency on {device}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def batch_series(op_rows: list[dict], models: list[dict]) -> dict[str, dict[int, float]]:
    """Series label -> {batch: median time} for series measured at >= 2 batch sizes."""
    series: dict[str, dict[int, float]] = defaultdict(dict)
    for r in models:
        if r["batch"]:
            label = " ".join(str(x) for x in (r["arch"], r["size"], r.get("dtype", ""), r["variant"]) if x)
            series[label][r["batch"]] = r["time"]
    for r in op_rows:
        b = _batch(r)
        if b is not None:
            rest = "x".join(str(r["shape"]).split("x")[1:])
            label = " ".join(str(x) for x in (r["op"], r.get("mode") or "", r["backend"], rest,
                                              str(r["dtype"]).replace("float", "fp"), r["device"]) if x)
            series[label][b] = r["time"]
    return {k: v for k, v in series.items() if len(v) >= 2}


def plot_latency_vs_batch(plt, series: dict[str, dict[int, float]], device: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for label, points in sorted(series.items()):
        bs = sorted(points)
        ax.plot(bs, [points[b] * 1e3 for b in bs], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size (boxes x instances for the ops)")
    ax.set_ylabel("median latency (ms, log scale)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    ax.set_title(f"latency vs batch size on {device}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_nms(plt, rows: list[dict], device: str, path: Path) -> None:
    """NMS time against the number of candidates (log-log), one line per op/mode/backend."""
    series: dict[tuple, dict[float, float]] = defaultdict(dict)
    for r in rows:
        key = (r["op"], r.get("mode") or "", r.get("backend", ""), r.get("device", "?"))
        series[key][r["candidates"]] = r["time"]
    fig, ax = plt.subplots(figsize=(9, 5.5))
    # colour = backend, line style = op (hard solid / soft dotted), NumPy anchors dashed
    for (op, mode, backend, device_kind), points in sorted(series.items()):
        ns = sorted(points)
        soft = op.startswith("soft")
        label = " ".join(x for x in (op, mode, backend) if x) + f" ({device_kind} tensors)"
        ax.plot(ns, [points[n] * 1e3 for n in ns], marker="s" if soft else "o",
                linestyle="--" if backend == "numpy" else (":" if soft else "-"),
                color=BACKEND_COLORS.get(backend),
                label=label + (" (NumPy anchor)" if backend == "numpy" else ""))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("pose candidates per call (all images)")
    ax.set_ylabel("median time per call (ms)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(f"OKS-NMS time vs number of candidates on {device}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- markdown
def _md_table(header: list[str], rows: list[list[str]], right_from: int) -> list[str]:
    out = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---:" if i >= right_from else "---" for i in range(len(header))) + "|"]
    out.extend("| " + " | ".join(str(c) for c in r) + " |" for r in rows)
    return out


def _machine_lines(machine_info: dict, sources: list[Path], rel) -> list[str]:
    mip = machine_info.get("mipnet") or {}
    clocks = mip.get("gpu_clocks") or {}
    lines = [f"- device: **{mip.get('device_name', '?')}** (`{mip.get('device_slug', '?')}`)",
             f"- torch {mip.get('torch')} (CUDA {mip.get('torch_cuda')}), Triton {mip.get('triton')}, "
             f"driver {mip.get('driver') or '-'}, Python {mip.get('python')}, {mip.get('cpu_threads')} CPU threads"]
    if any(v is not None for v in clocks.values()):
        lines.append(f"- GPU clocks: SM {clocks.get('sm_mhz')}/{clocks.get('max_sm_mhz')} MHz, memory "
                     f"{clocks.get('mem_mhz')}/{clocks.get('max_mem_mhz')} MHz (current/max), "
                     f"{clocks.get('pstate')}, power limit {clocks.get('power_limit_w')} W")
    load = mip.get("loadavg_at_start")
    if load and mip.get("cpu_count"):
        lines.append(f"- load average at start {load[0]:.2f} on {mip['cpu_count']} CPUs"
                     + (" (busy machine: CPU timings are noisy)" if load[0] > 0.5 * mip["cpu_count"] else ""))
    lines.append("- runs (each row from the newest run that has it): " + ", ".join(f"`{rel(p)}`" for p in sources))
    return lines


def write_report(paths: list[Path], markdown: Path, plots_dir: Path) -> list[Path]:
    """Write the markdown report and its PNGs; returns the PNG paths written."""
    benchmarks, machine_info, sources = load_inputs(paths)
    markdown.parent.mkdir(parents=True, exist_ok=True)
    plots_dir.mkdir(parents=True, exist_ok=True)

    def rel(p: Path) -> str:
        return os.path.relpath(Path(p).resolve(), Path.cwd()) if Path(p).is_absolute() else str(p)

    def link(p: Path) -> str:
        return Path(os.path.relpath(p.resolve(), markdown.parent.resolve())).as_posix()

    try:
        plt = _pyplot()
    except ImportError as exc:
        plt = None
        no_plots = f"matplotlib is not installed ({exc}): no plots."
    rows = _report.annotated_rows(benchmarks)
    models = model_rows(benchmarks)
    nms = nms_rows(benchmarks)
    mip = machine_info.get("mipnet") or {}
    device = mip.get("device_name") or "?"
    written: list[Path] = []
    notes: list[str] = []
    md = [f"# mipnet_kernels benchmark report: {device}", ""]
    md += _machine_lines(machine_info, sources, rel)
    md += ["", "Times are pytest-benchmark medians (CUDA-event device time on CUDA rows, host "
           "`perf_counter` on CPU rows; see `benchmarks/results/README.md`).  GB/s = bytes that must "
           "move / median; `% roof` = GB/s / roofline; `x eager` / `x numpy`: speed-up over the eager "
           "reference / the NumPy anchor on the same device, shape and dtype.", ""]

    by_op: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        by_op[(r["device"], r["op"])].append(r)
    for (dev, op), op_rows in sorted(by_op.items(), key=lambda kv: (_report.DEVICE_ORDER.get(kv[0][0], 9),
                                                                    _report.OP_ORDER.get(kv[0][1], 9), kv[0][1])):
        roof = roofline([r for r in rows if r["device"] == dev], machine_info)
        md += [f"## `{op}` on {op_rows[0].get('device_name') or dev} ({dev} tensors)", ""]
        if plt is not None:
            png = plots_dir / f"op_{dev}_{op}.png"
            plot_op(plt, op_rows, roof, png)
            written.append(png)
            md += [f"![{op} on {dev}: time and GB/s]({link(png)})", ""]
        table = []
        for r in op_rows:
            pct = f"{100 * r['gbps_now'] / roof[0]:.0f}%" if roof[0] and r["gbps_now"] else "-"
            table.append([r.get("mode") or "-", r["backend"], r["shape"], str(r["dtype"]).replace("float", "fp"),
                          _report._fmt_time(r["time"]), f"{r['gbps_now']:.1f}" if r["gbps_now"] else "-", pct,
                          _report._fmt_x(r["speedup_eager"]), _report._fmt_x(r["speedup_numpy"]), r["target"] or ""])
        md += _md_table(["mode", "backend", "shape", "dtype", "median", "GB/s", "% roof", "x eager", "x numpy",
                         "target"], table, 4)
        md += ["", f"Roofline: {f'{roof[0]:.0f} GB/s ({roof[1]})' if roof[0] else 'none recorded for this device'}.", ""]

    md += ["## N=2 MIPNet vs baseline HRNet (model suite)", ""]
    if models:
        if plt is not None:
            png = plots_dir / "model_latency.png"
            plot_model_latency(plt, models, device, png)
            written.append(png)
            md += [f"![N=2 vs HRNet latency]({link(png)})", ""]
        ratio_keys = sorted({k for r in models for k in r if re.search(r"ratio|overhead|speedup|flop_floor", k)
                             and _num(r[k]) is not None})
        table = [[r["arch"], r["size"], str(r.get("dtype", "")), str(r["batch"]), r["variant"],
                  _report._fmt_time(r["time"])] + [f"{r[k]:.3f}" if _num(r.get(k)) else "-" for k in ratio_keys]
                 for r in sorted(models, key=lambda r: (r["arch"], str(r["size"]), str(r.get("dtype")), r["batch"] or 0,
                                                        _variant_key(r["variant"])))]
        md += _md_table(["arch", "size", "dtype", "batch", "variant", "median"] + ratio_keys, table, 5) + [""]
    else:
        notes.append("model latency (N=2 vs HRNet): no model-suite rows (`extra_info['arch']`) in these runs")
        md += ["_No model-suite rows in these runs: plot skipped._", ""]

    md += ["## Latency vs batch size", ""]
    series = batch_series(rows, models)
    if series and plt is not None:
        png = plots_dir / "latency_vs_batch.png"
        plot_latency_vs_batch(plt, series, device, png)
        written.append(png)
        md += [f"![latency vs batch size]({link(png)})", ""]
    elif not series:
        notes.append("latency vs batch: no series measured at two or more batch sizes")
        md += ["_No series measured at two or more batch sizes in these runs: plot skipped._", ""]

    md += ["## OKS-NMS vs number of candidates", ""]
    if nms and plt is not None:
        png = plots_dir / "nms_vs_candidates.png"
        plot_nms(plt, nms, device, png)
        written.append(png)
        md += [f"![NMS time vs candidates]({link(png)})", ""]
    elif not nms:
        notes.append("NMS vs candidates: no NMS rows with a candidate count in these runs")
        md += ["_No NMS rows (op `*nms*` with `extra_info['num_candidates']`) in these runs: plot skipped._", ""]
    if plt is None:
        md += [f"_{no_plots}_", ""]
    markdown.write_text("\n".join(md))
    for note in notes:
        print(f"report: skipped {note}", file=sys.stderr)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="+", type=Path, help="pytest-benchmark JSON file(s) or results folder(s)")
    parser.add_argument("--markdown", type=Path, help="write a markdown report (with --plots) instead of the table")
    parser.add_argument("--plots", type=Path, default=Path("benchmarks/report"),
                        help="folder of the report's PNG plots (default: benchmarks/report)")
    args = parser.parse_args(argv)
    if args.markdown is not None:
        try:
            pngs = write_report(args.json, args.markdown, args.plots)
        except ValueError as exc:
            print(f"report: {exc}", file=sys.stderr)
            return 1
        print(f"wrote {args.markdown} and {len(pngs)} plots in {args.plots}/")
        return 0
    status = 0
    for n, path in enumerate(args.json):
        data = _report.load_run(path)
        runs = _report.split_runs(path, data)  # a trimmed baseline: the machine of its newest run
        machine = max(runs, key=lambda r: _report.run_time(r[1]))[1].get("machine_info")
        table = _report.build_table(data.get("benchmarks", []), machine)
        if n:
            print()
        what = f"baseline of {len(runs)} runs, newest " if _report.is_baseline(data) else ""
        print(f"== {path}  ({what}{data.get('datetime', '?')}, commit {(data.get('commit_info') or {}).get('id', '?')})")
        if table:
            print(table)
        else:
            print("no mipnet benchmark records with timings in this file")
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
