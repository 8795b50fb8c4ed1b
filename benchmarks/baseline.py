"""The committed baseline of a device kind: one trimmed JSON per kind, the gate's reference.

    python -m benchmarks.baseline update benchmarks/out/results.json     # what `make bench-baseline` runs
    python -m benchmarks.baseline trim RUN.json [RUN.json ...] --out benchmarks/results/<kind>/baseline.json
    python -m benchmarks.baseline show benchmarks/results/cpu-amd-epyc/baseline.json

``benchmarks/results/<device-slug>/baseline.json`` holds, for every benchmark row ever
recorded on that kind, the row of the newest run that has it -- its summary statistics
(pytest-benchmark's ``stats`` without the per-round ``data``: min, max, mean, stddev, median,
quartiles, rounds, ...), ``extra_info``, ``params`` and ``options`` -- and, once per source
run, that run's ``machine_info``, ``commit_info`` (commit, dirty tree or not) and time; each
row names its run (``"run"``: an index into ``runs``).  Readers
(:func:`benchmarks._report.load_runs`) split the file back into its source runs, so the gate
(each suite from the newest run that has it) and the report (each row from the newest run
that has it) judge exactly as they did when every raw run was a file of its own; a row that
a newer run superseded is dropped, since neither would ever read it.

Raw runs (``--benchmark-json``, with every round) stay out of the tree: ``benchmarks/out/``
and ``benchmarks/results/<kind>/*.json`` other than ``baseline.json`` are git-ignored.
``update`` folds a raw run into its kind's ``baseline.json``; committing that file makes it
the gate's baseline (until then the gate reads the version git has, see
``benchmarks/gate.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from datetime import datetime, timezone
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/baseline.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "benchmarks"

from . import _report  # noqa: E402

DEFAULT_RESULTS_DIR = Path(__file__).resolve().parent / "results"
BASELINE_NAME = "baseline.json"
#: Row fields kept (``stats`` without its per-round ``data``).
ROW_FIELDS = ("group", "name", "fullname", "params", "param", "extra_info", "options", "stats")
#: Run fields kept.
RUN_FIELDS = ("datetime", "commit_info", "machine_info", "version")


def trim_row(bench: dict) -> dict:
    """One row without its raw rounds."""
    row = {k: bench[k] for k in ROW_FIELDS if k in bench}
    row["stats"] = {k: v for k, v in (bench.get("stats") or {}).items() if k != "data"}
    return row


_STAMPED = re.compile(r"\d{8}T\d{4,6}Z_")


def run_id(label: Path, data: dict | None = None) -> str:
    """A run's name: its file's (``20261121T184632Z_bdf0354d91``, as ``--mipnet-results-dir``
    names copies); a run inside a baseline (``baseline.json#<id>``) keeps its id; any other
    file (``benchmarks/out/results.json``) is named the same way from its time and commit."""
    name = Path(label).name
    if "#" in name:
        return name.split("#", 1)[1]
    if _STAMPED.match(name) or data is None:
        return Path(name).stem
    when = str(data.get("datetime") or "")
    try:
        stamp = datetime.fromisoformat(when).astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    except ValueError:
        stamp = "notime"
    ci = data.get("commit_info") or {}
    return f"{stamp}_{str(ci.get('id') or 'nocommit')[:10]}{'-dirty' if ci.get('dirty') else ''}"


def build(runs: list[tuple[Path, dict]], note: str = "") -> dict:
    """The trimmed baseline of ``runs`` (``(label, run)`` pairs of one device kind): every
    row from the newest run that has it, and the runs that still give a row."""
    if not runs:
        raise ValueError("no runs to build a baseline from")
    slugs = {_report.run_slug(data) for _, data in runs}
    if len(slugs) != 1 or None in slugs:
        raise ValueError(f"runs of several or unknown device kinds ({', '.join(sorted(map(str, slugs)))}): "
                         "one baseline per kind")
    (slug,) = slugs
    newest: dict[str, tuple[tuple[str, str], int, dict]] = {}
    for n, (label, data) in enumerate(runs):
        order = (_report.run_time(data), Path(label).name)
        for bench in data["benchmarks"]:
            key = _report.benchmark_key(bench)
            if key not in newest or order > newest[key][0]:
                newest[key] = (order, n, bench)
    used = sorted({n for _, n, _ in newest.values()}, key=lambda n: (_report.run_time(runs[n][1]), run_id(*runs[n])))
    index = {n: i for i, n in enumerate(used)}
    run_entries = []
    for n in used:
        label, data = runs[n]
        entry = {"id": run_id(label, data)}
        entry.update({k: data[k] for k in RUN_FIELDS if k in data})
        run_entries.append(entry)
    rows = [dict(trim_row(bench), run=index[n])
            for _, n, bench in sorted(newest.values(), key=lambda v: (_report.suite_of(v[2]), _report.benchmark_key(v[2])))]
    last = run_entries[-1]
    mip = (last.get("machine_info") or {}).get("mipnet") or {}
    return {
        "format": _report.BASELINE_FORMAT,
        "note": note or ("Trimmed baseline (python -m benchmarks.baseline): each row from the newest run that has it, "
                         "summary statistics only; 'run' indexes 'runs'."),
        "device_slug": slug,
        "datetime": last.get("datetime"),
        "commit_info": last.get("commit_info"),
        "machine_info": {"mipnet": {"device_slug": slug, "device_name": mip.get("device_name")}},
        "runs": run_entries,
        "benchmarks": rows,
    }


def dumps(doc: dict) -> str:
    """JSON with one run and one row per line (small diffs when a run is folded in)."""
    lines = ["{"]
    items = list(doc.items())
    for i, (key, value) in enumerate(items):
        comma = "," if i < len(items) - 1 else ""
        if key in ("runs", "benchmarks") and isinstance(value, list):
            lines.append(f" {json.dumps(key)}: [")
            lines.extend(f"  {json.dumps(v, sort_keys=False, default=str)}{',' if j < len(value) - 1 else ''}"
                         for j, v in enumerate(value))
            lines.append(f" ]{comma}")
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value, default=str)}{comma}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def write(doc: dict, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dumps(doc))
    return path


def _inputs(paths: list[Path]) -> list[tuple[Path, dict]]:
    runs = []
    for path in paths:
        files = sorted(path.glob("*.json")) if path.is_dir() else [path]
        for f in files:
            runs.extend(_report.load_runs(f))
    return runs


def update(new_runs: list[Path], results_dir: Path = DEFAULT_RESULTS_DIR) -> Path:
    """Fold raw run(s) into ``results_dir/<kind>/baseline.json`` (created when absent)."""
    runs = _inputs(new_runs)
    if not runs or not any(data["benchmarks"] for _, data in runs):
        raise ValueError(f"no timed benchmarks in {', '.join(map(str, new_runs))} (a --benchmark-disable run records none)")
    slugs = {_report.run_slug(data) for _, data in runs}
    if len(slugs) != 1 or None in slugs:
        raise ValueError(f"runs of several or unknown device kinds: {', '.join(sorted(map(str, slugs)))}")
    (slug,) = slugs
    target = Path(results_dir) / slug / BASELINE_NAME
    if target.exists():
        runs = _report.load_runs(target) + runs
    return write(build(runs), target)


def summary(path: Path) -> str:
    data = _report.load_run(path)
    lines = [f"{path}: {len(data['benchmarks'])} rows of '{_report.run_slug(data)}'"]
    for label, run in _report.split_runs(path, data):
        ci = run.get("commit_info") or {}
        suites = sorted({_report.suite_of(b) for b in run["benchmarks"]})
        lines.append(f"  {run_id(label)}  {run.get('datetime')}  commit {str(ci.get('id'))[:10]}"
                     f"{' (dirty tree)' if ci.get('dirty') else ''}  {len(run['benchmarks'])} rows: {', '.join(suites)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.baseline", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("update", help="fold raw run(s) into benchmarks/results/<kind>/baseline.json")
    p.add_argument("json", nargs="+", type=Path)
    p.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS_DIR)
    p = sub.add_parser("trim", help="build a baseline from run files / folders / baselines")
    p.add_argument("json", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--note", default="")
    p = sub.add_parser("show", help="the runs and rows of a baseline")
    p.add_argument("json", nargs="+", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.cmd == "update":
            path = update(args.json, args.results_dir)
            print(summary(path))
            print(f"commit {path} to make it the gate's baseline")
        elif args.cmd == "trim":
            path = write(build(_inputs(args.json), args.note), args.out)
            print(summary(path))
        else:
            print("\n".join(summary(p) for p in args.json))
    except ValueError as exc:
        print(f"baseline: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
