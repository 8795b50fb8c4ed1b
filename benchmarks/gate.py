"""Benchmark regression gate: a fresh run against the committed baseline of the same device kind.

    python -m benchmarks.gate benchmarks/out/results.json            # what `make bench-check` runs
    python -m benchmarks.gate NEW.json --baseline benchmarks/results/nvidia-h100-80gb-hbm3/baseline.json

The baseline of a run is ``benchmarks/results/<device-slug>/`` for the run's own device kind
(``machine_info.mipnet.device_slug``): an H100 run is never compared with an H200 one.  That
folder holds one trimmed ``baseline.json`` (:mod:`benchmarks.baseline`: summary statistics of
each row, and the runs they come from); raw runs dropped there (``--mipnet-results-dir``,
``make gpu-check``) are git-ignored.  By default only files git tracks count, in the version
git has (the *committed* baseline: ``make bench-baseline`` rewrites ``baseline.json``, and
the change counts once it is committed or staged); ``--include-uncommitted`` uses every file
as it is on disk.  The runs of all files (a baseline holds several) are merged: each suite
(test module) comes from the newest run containing it (:func:`benchmarks._report.merge_newest`).

Checks, each (benchmark, metric), keyed on the pytest node id, never on a fixed list:

* ``time``: pytest-benchmark's median; the minimum of the rounds for micro-benchmarks
  (baseline median below ``micro_median_s``, a ``statistic = "min"`` rule, or
  ``extra_info["noisy"]``), where the median moves with launch and timer jitter.
* ``speedup_eager`` / ``speedup_compile`` / ``speedup_numpy``: derived from peer rows (same
  op, mode, shape, dtype and device, other backend), as the results table computes them.
  Ratios are stable across machines of one kind where absolute times are not.
* every numeric ``extra_info`` entry whose name gives its direction
  (:data:`METRIC_DIRECTIONS`): speed-ups and throughputs must not drop, overheads, latency
  ratios and peak memory must not rise (e.g. the model suite's N=2 / HRNet ratio).

A check fails when it moves the wrong way by more than its threshold (default 10 %,
per-benchmark overrides by glob in ``benchmarks/thresholds.toml``).  Benchmarks only in the
new run are listed as new; a tracked benchmark missing from the new run fails the gate
(a backend that silently stopped running is a regression of coverage) unless
``--allow-missing``.

Exit status: 0 pass, 1 regression (or missing benchmark), 2 no comparison possible
(no baseline for this device kind, kind mismatch, unreadable input).
"""

from __future__ import annotations

import argparse
import fnmatch
import math
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/gate.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "benchmarks"

from . import _report  # noqa: E402

EXIT_PASS, EXIT_REGRESSION, EXIT_NO_COMPARISON = 0, 1, 2
DEFAULT_RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_THRESHOLDS = Path(__file__).resolve().parent / "thresholds.toml"
DEFAULT_THRESHOLD = 0.10
DEFAULT_MICRO_MEDIAN_S = 20e-6

HIGHER, LOWER, IGNORE = "higher", "lower", "ignore"
#: Direction of an ``extra_info`` metric from its name (first matching glob wins); names
#: matching none are not gated (shapes, byte counts, accuracy diagnostics...).
METRIC_DIRECTIONS: tuple[tuple[str, str], ...] = (
    ("*speedup*", HIGHER), ("*speed_up*", HIGHER), ("*throughput*", HIGHER), ("*_per_s", HIGHER),
    ("*overhead*", LOWER), ("*ratio*", LOWER), ("*slowdown*", LOWER),
    ("*peak_mem*", LOWER), ("*peak_memory*", LOWER),
)
#: Metrics derived from peer rows (:func:`benchmarks._report.speedups`).
DERIVED_METRICS = ("speedup_eager", "speedup_compile", "speedup_numpy")


class GateError(Exception):
    """No comparison is possible (exit status 2)."""


# --------------------------------------------------------------------------- thresholds
@dataclass(frozen=True)
class Rule:
    match: str
    metric: str = "*"
    threshold: float | None = None
    statistic: str | None = None
    track: bool | None = None


@dataclass
class Thresholds:
    """Default threshold, micro-benchmark cut-off, metric directions and override rules."""

    threshold: float = DEFAULT_THRESHOLD
    micro_median_s: float = DEFAULT_MICRO_MEDIAN_S
    metric_directions: tuple[tuple[str, str], ...] = ()
    rules: list[Rule] = field(default_factory=list)

    @classmethod
    def load(cls, path: str | os.PathLike | None) -> "Thresholds":
        """Read ``thresholds.toml`` (None: the built-in defaults)."""
        if path is None:
            return cls()
        import tomllib

        path = Path(path)
        try:
            doc = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"thresholds file {path}: {exc}") from exc
        defaults = doc.get("defaults", {})
        directions = tuple((str(k), str(v)) for k, v in doc.get("metrics", {}).items())
        for pattern, direction in directions:
            if direction not in (HIGHER, LOWER, IGNORE):
                raise ValueError(f"thresholds file {path}: [metrics] {pattern!r} must be higher|lower|ignore")
        rules = []
        for n, raw in enumerate(doc.get("rule", [])):
            if "match" not in raw:
                raise ValueError(f"thresholds file {path}: rule #{n + 1} has no 'match'")
            if raw.get("statistic") not in (None, "median", "min"):
                raise ValueError(f"thresholds file {path}: rule #{n + 1} statistic must be median|min")
            rules.append(Rule(str(raw["match"]), str(raw.get("metric", "*")), raw.get("threshold"),
                              raw.get("statistic"), raw.get("track")))
        return cls(float(defaults.get("threshold", DEFAULT_THRESHOLD)),
                   float(defaults.get("micro_median_s", DEFAULT_MICRO_MEDIAN_S)), directions, rules)

    def settings(self, key: str, name: str, metric: str) -> dict:
        """``threshold``, ``statistic`` (None: automatic) and ``track`` of one check."""
        out = {"threshold": self.threshold, "statistic": None, "track": True}
        for rule in self.rules:
            if not fnmatch.fnmatchcase(metric, rule.metric):
                continue
            if not (fnmatch.fnmatchcase(key, rule.match) or fnmatch.fnmatchcase(name, rule.match)):
                continue
            for attr in ("threshold", "statistic", "track"):
                if getattr(rule, attr) is not None:
                    out[attr] = getattr(rule, attr)
        return out

    def direction(self, metric: str) -> str | None:
        """``higher`` / ``lower`` is better, ``ignore``, or None (not a gated metric)."""
        for pattern, direction in self.metric_directions + METRIC_DIRECTIONS:
            if fnmatch.fnmatchcase(metric, pattern):
                return direction
        return None


# --------------------------------------------------------------------------- metrics
@dataclass(frozen=True)
class Value:
    value: float
    direction: str  # HIGHER or LOWER is better
    statistic: str  # what the value is: "median", "min", "extra_info", "median ratio", ...


def _number(x) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) and x > 0 else None


def _time_statistic(bench: dict, baseline: dict | None, th: Thresholds, forced: str | None) -> str:
    if forced is not None:
        return forced
    if (bench.get("extra_info") or {}).get("noisy"):
        return "min"
    ref = _number(((baseline or bench).get("stats") or {}).get("median"))
    return "min" if ref is not None and ref < th.micro_median_s else "median"


def metrics(benchmarks: list[dict], th: Thresholds, baseline: dict[str, dict] | None = None) -> dict[str, dict[str, Value]]:
    """Per benchmark key, its gated metrics.  ``baseline`` (key -> benchmark) decides the
    time statistic of each benchmark, so that both sides of a comparison use the same one."""
    baseline = baseline or {}
    out: dict[str, dict[str, Value]] = {}
    times: dict[str, float] = {}
    for b in benchmarks:
        key, name = _report.benchmark_key(b), str(b.get("name"))
        stats = b.get("stats") or {}
        vals: dict[str, Value] = {}
        stat = _time_statistic(b, baseline.get(key), th, th.settings(key, name, "time")["statistic"])
        t = _number(stats.get(stat))
        if t is not None:
            vals["time"] = Value(t, LOWER, stat)
            times[key] = t
        for metric, raw in sorted((b.get("extra_info") or {}).items()):
            direction = th.direction(metric)
            value = _number(raw)
            if direction in (HIGHER, LOWER) and value is not None:
                vals[metric] = Value(value, direction, "extra_info")
        out[key] = vals
    # Speed-ups over peer rows, from the statistic each row is judged on.
    peers: dict[tuple, dict[str, float]] = {}
    rows = {}
    for b in benchmarks:
        key, ei = _report.benchmark_key(b), b.get("extra_info") or {}
        if key in times and ei.get("op") is not None and ei.get("backend") is not None:
            rows[key] = ei
            peers.setdefault(_report.peer_key(ei), {})[ei["backend"]] = times[key]
    for key, ei in rows.items():
        for metric, value in _report.speedups(ei["backend"], times[key], peers[_report.peer_key(ei)]).items():
            if value is not None and metric not in out[key]:
                out[key][metric] = Value(value, HIGHER, f"{out[key]['time'].statistic} ratio")
    return out


# --------------------------------------------------------------------------- comparison
FAIL, OK, IMPROVED, MISSING, NEW = "FAIL", "ok", "faster", "MISSING", "new"


@dataclass(frozen=True)
class Check:
    status: str
    key: str
    name: str
    metric: str
    statistic: str = ""
    baseline: float | None = None
    new: float | None = None
    change: float | None = None  # new / baseline - 1
    threshold: float | None = None
    direction: str = LOWER


@dataclass
class GateResult:
    slug: str
    baseline_files: list[Path]
    checks: list[Check]

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.status == FAIL]

    @property
    def missing(self) -> list[Check]:
        return [c for c in self.checks if c.status == MISSING]

    def exit_code(self, allow_missing: bool = False) -> int:
        bad = self.failures or (self.missing and not allow_missing)
        return EXIT_REGRESSION if bad else EXIT_PASS


def compare(baseline: list[dict], new: list[dict], th: Thresholds, slug: str = "",
            baseline_files: list[Path] | None = None) -> GateResult:
    """Every tracked check of ``baseline`` against ``new`` (both lists of benchmark dicts)."""
    base_by_key = {_report.benchmark_key(b): b for b in baseline}
    new_by_key = {_report.benchmark_key(b): b for b in new}
    base_m = metrics(baseline, th)
    new_m = metrics(new, th, base_by_key)
    checks: list[Check] = []
    for key, bench in base_by_key.items():
        name = str(bench.get("name"))
        if key not in new_by_key:
            if th.settings(key, name, "time")["track"]:
                checks.append(Check(MISSING, key, name, "time"))
            continue
        for metric, old in base_m[key].items():
            cfg = th.settings(key, name, metric)
            if not cfg["track"]:
                continue
            now = new_m[key].get(metric)
            if now is None:
                checks.append(Check(MISSING, key, name, metric, old.statistic, old.value))
                continue
            change = now.value / old.value - 1.0
            worse = change > cfg["threshold"] if old.direction == LOWER else change < -cfg["threshold"]
            better = change < -cfg["threshold"] if old.direction == LOWER else change > cfg["threshold"]
            status = FAIL if worse else IMPROVED if better else OK
            checks.append(Check(status, key, name, metric, now.statistic, old.value, now.value, change,
                                cfg["threshold"], old.direction))
    for key, bench in new_by_key.items():
        if key not in base_by_key:
            checks.append(Check(NEW, key, str(bench.get("name")), "time"))
    return GateResult(slug, list(baseline_files or []), checks)


# --------------------------------------------------------------------------- baselines
def committed_files(folder: Path) -> set[Path] | None:
    """The files git tracks in ``folder`` (None: not in a git work tree, or no git)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--", "."], cwd=folder, capture_output=True,
                             text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {(folder / p).resolve() for p in out.split("\0") if p}


def tracked_text(path: Path) -> str | None:
    """The content git has for a tracked file (its staged, else committed, version; local
    edits not included); None when git cannot say."""
    try:
        return subprocess.run(["git", "show", f":./{path.name}"], cwd=path.parent, capture_output=True,
                              text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def baseline_runs(results_dir: Path, slug: str, include_uncommitted: bool = False) -> list[tuple[Path, dict]]:
    """The baseline runs of device kind ``slug``: the JSON files of ``results_dir/slug``
    (committed ones only unless ``include_uncommitted``) whose own kind is ``slug``."""
    folder = Path(results_dir) / slug
    if not folder.is_dir():
        raise GateError(
            f"no baseline for device kind '{slug}': {folder} does not exist.  Record one on this "
            f"machine with `make bench-baseline` and commit it (kinds with a baseline: "
            f"{', '.join(sorted(p.name for p in Path(results_dir).glob('*') if p.is_dir())) or 'none'})."
        )
    files = sorted(folder.glob("*.json"))
    tracked = None if include_uncommitted else committed_files(folder)
    if tracked is not None:
        files = [f for f in files if f.resolve() in tracked]
    runs = []
    for path in files:
        for label, data in _report.load_runs(path, None if tracked is None else tracked_text(path)):
            if _report.run_slug(data) == slug:
                runs.append((label, data))
            else:
                print(f"gate: ignoring {label}: recorded on '{_report.run_slug(data)}', not '{slug}'", file=sys.stderr)
    if not runs:
        what = "committed JSON" if tracked is not None else "JSON"
        raise GateError(
            f"no baseline for device kind '{slug}': no {what} of that kind in {folder}"
            + (" (uncommitted files exist: commit them or pass --include-uncommitted)"
               if tracked is not None and any(folder.glob("*.json")) else "")
        )
    return runs


def gate(new_json: str | os.PathLike, *, results_dir: str | os.PathLike = DEFAULT_RESULTS_DIR,
         baseline: str | os.PathLike | None = None, thresholds: Thresholds | None = None,
         include_uncommitted: bool = False) -> GateResult:
    """Compare the run in ``new_json`` with its baseline; :class:`GateError` when impossible.

    ``baseline``: a JSON file or folder to use instead of ``results_dir/<kind>`` (it must
    still be of the same device kind)."""
    new = _report.load_run(new_json)
    slug = _report.run_slug(new)
    if slug is None:
        raise GateError(f"{new_json} does not say which device it ran on (no machine_info.mipnet.device_slug)")
    if not new["benchmarks"]:
        raise GateError(f"{new_json} has no benchmarks (a --benchmark-disable run records none)")
    if baseline is not None and Path(baseline).is_file():
        runs = _report.load_runs(baseline)
        kinds = {_report.run_slug(data) for _, data in runs}
        kind = kinds.pop() if len(kinds) == 1 else ", ".join(sorted(map(str, kinds)))
        if kind != slug:
            raise GateError(f"device kind mismatch: {new_json} ran on '{slug}', the baseline {baseline} "
                            f"on '{kind}'; runs of different kinds are never compared")
    elif baseline is not None:
        runs = baseline_runs(Path(baseline).parent, Path(baseline).name, include_uncommitted=True)
        if Path(baseline).name != slug:
            raise GateError(f"device kind mismatch: {new_json} ran on '{slug}', the baseline folder is "
                            f"'{Path(baseline).name}'; runs of different kinds are never compared")
    else:
        runs = baseline_runs(Path(results_dir), slug, include_uncommitted)
    merged, sources = _report.merge_newest(runs, per="suite")
    return compare(merged, new["benchmarks"], thresholds or Thresholds(), slug, sources)


# --------------------------------------------------------------------------- output
def _fmt(value: float | None, metric: str) -> str:
    if value is None:
        return "-"
    if metric == "time":
        return _report._fmt_time(value)
    return f"{value:.3f}" if value < 100 else f"{value:.4g}"


def _rows(result: GateResult, verbose: bool) -> list[list[str]]:
    order = {FAIL: 0, MISSING: 1, IMPROVED: 2, OK: 3}
    shown = [c for c in result.checks if c.status in (FAIL, MISSING, IMPROVED) or (verbose and c.status == OK)]
    shown.sort(key=lambda c: (order[c.status], -abs(c.change or 0.0), c.key, c.metric))
    rows = []
    for c in shown:
        limit = "-" if c.threshold is None else (
            f"{'+' if c.direction == LOWER else '-'}{c.threshold:.0%}")
        rows.append([c.status, c.name, c.metric, c.statistic or "-", _fmt(c.baseline, c.metric),
                     _fmt(c.new, c.metric), "-" if c.change is None else f"{c.change:+.1%}", limit])
    return rows


HEADER = ["status", "benchmark", "metric", "statistic", "baseline", "new", "change", "limit"]


def summary(result: GateResult, allow_missing: bool = False) -> str:
    counts = {s: sum(c.status == s for c in result.checks) for s in (FAIL, MISSING, IMPROVED, OK, NEW)}
    verdict = "FAIL" if result.exit_code(allow_missing) else "PASS"
    return (f"gate {verdict} on '{result.slug}': {counts[FAIL]} regressed, {counts[MISSING]} missing"
            f"{' (allowed)' if allow_missing and counts[MISSING] else ''}, {counts[IMPROVED]} faster, "
            f"{counts[OK]} within threshold, {counts[NEW]} new benchmarks not in the baseline")


def _display(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _new_names(result: GateResult) -> list[str]:
    return sorted(c.name for c in result.checks if c.status == NEW)


def format_text(result: GateResult, allow_missing: bool = False, verbose: bool = False) -> str:
    """The readable table (failures first, then missing, faster, ok with ``verbose``), then
    the benchmarks new in this run."""
    lines = [f"baseline ({result.slug}): " + ", ".join(_display(p) for p in result.baseline_files)]
    rows = _rows(result, verbose)
    if rows:
        table = [HEADER] + rows
        widths = [max(len(r[i]) for r in table) for i in range(len(HEADER))]
        right = {4, 5, 6, 7}
        for n, r in enumerate(table):
            lines.append(" | ".join(c.rjust(w) if i in right else c.ljust(w)
                                    for i, (c, w) in enumerate(zip(r, widths))).rstrip())
            if n == 0:
                lines.append("-+-".join("-" * w for w in widths))
    lines.append("limit: the largest allowed rise (+, times and overheads) or drop (-, speed-ups and "
                 "throughputs); statistic min = micro-benchmark judged on its fastest round.")
    new = _new_names(result)
    if new:
        lines.append(f"new in this run, not gated until they are in a baseline ({len(new)}):")
        lines.extend(f"  {name}" for name in new)
    lines.append(summary(result, allow_missing))
    return "\n".join(lines)


def format_markdown(result: GateResult, allow_missing: bool = False, verbose: bool = False) -> str:
    """The same table in GitHub markdown (for ``$GITHUB_STEP_SUMMARY``)."""
    lines = [f"### Benchmark gate: {summary(result, allow_missing)}", "",
             "Baseline: " + ", ".join(f"`{_display(p)}`" for p in result.baseline_files), ""]
    rows = _rows(result, verbose)
    if rows:
        lines.append("| " + " | ".join(HEADER) + " |")
        lines.append("|" + "|".join("---:" if i >= 4 else "---" for i in range(len(HEADER))) + "|")
        lines.extend("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows)
    new = _new_names(result)
    if new:
        lines += ["", f"New in this run, not gated until they are in a baseline: {len(new)}", ""]
        lines.extend(f"- `{name}`" for name in new)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gate", description=__doc__.split("\n\n")[0])
    parser.add_argument("json", type=Path, help="the fresh pytest-benchmark JSON (--benchmark-json)")
    parser.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS_DIR,
                        help="folder of per-device-kind baselines (default: benchmarks/results)")
    parser.add_argument("--baseline", type=Path, help="a baseline JSON file or kind folder instead")
    parser.add_argument("--thresholds", type=Path, default=DEFAULT_THRESHOLDS,
                        help="threshold overrides (default: benchmarks/thresholds.toml)")
    parser.add_argument("--threshold", type=float, help="default threshold (fraction), overriding the file's")
    parser.add_argument("--include-uncommitted", action="store_true",
                        help="also use baseline files git does not track yet")
    parser.add_argument("--allow-missing", action="store_true",
                        help="benchmarks of the baseline missing from the run do not fail the gate")
    parser.add_argument("--markdown", type=Path, help="also write the table as markdown to this file")
    parser.add_argument("-v", "--verbose", action="store_true", help="list the checks within threshold too")
    args = parser.parse_args(argv)
    try:
        th = Thresholds.load(args.thresholds if args.thresholds.exists() else None)
        if args.threshold is not None:
            th.threshold = args.threshold
        result = gate(args.json, results_dir=args.results_dir, baseline=args.baseline, thresholds=th,
                      include_uncommitted=args.include_uncommitted)
    except (GateError, ValueError) as exc:
        print(f"gate: NO COMPARISON: {exc}", file=sys.stderr)
        if args.markdown:
            args.markdown.parent.mkdir(parents=True, exist_ok=True)
            args.markdown.write_text(f"### Benchmark gate: no comparison\n\n{exc}\n")
        return EXIT_NO_COMPARISON
    print(format_text(result, args.allow_missing, args.verbose))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(format_markdown(result, args.allow_missing, args.verbose))
    return result.exit_code(args.allow_missing)


if __name__ == "__main__":
    sys.exit(main())
