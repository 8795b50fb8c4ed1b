"""The benchmark gate, the trimmed baselines, the report and the profiling hook, on recorded JSON.

The gate runs on the committed CPU baseline (``benchmarks/results/cpu-amd-epyc/baseline.json``)
and on variants derived from it here (one benchmark slowed, a ratio changed, another device
kind, a row under its old name...), written to ``tmp_path``: no timing, no GPU.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import _report, baseline, gate, report  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CPU_RESULTS = RESULTS / "cpu-amd-epyc"
CPU_BASELINE = CPU_RESULTS / "baseline.json"
RECORDED = sorted(CPU_RESULTS.glob("*.json"))
pytestmark = pytest.mark.skipif(not CPU_BASELINE.exists(), reason=f"no recorded baseline {CPU_BASELINE}")
SLUG = "cpu-amd-epyc"


def _strip(bench: dict) -> dict:
    return {k: v for k, v in bench.items() if k not in ("_source", "run")}


@pytest.fixture(scope="module")
def recorded() -> dict:
    """The committed CPU baseline as the gate sees it (each suite from the newest run that
    has it: decode, MIMB and NMS rows), as one run."""
    runs = _report.load_runs(CPU_BASELINE)
    rows, _ = _report.merge_newest(runs, per="suite")
    data = dict(max(runs, key=lambda r: _report.run_time(r[1]))[1], benchmarks=[_strip(b) for b in rows])
    if not any(SLOW in b["fullname"] for b in rows) or not any("test_decode_heatmaps" in b["fullname"] for b in rows):
        pytest.skip(f"the baseline {CPU_BASELINE} lacks {SLOW!r} or the decode suite")
    return data


def _write(folder: Path, data: dict, name: str = "run.json") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps(data))
    return path


def _find(data: dict, pattern: str) -> dict:
    hits = [b for b in data["benchmarks"] if pattern in b["fullname"]]
    assert len(hits) == 1, f"{pattern!r} matches {len(hits)} benchmarks"
    return hits[0]


def _scale(bench: dict, factor: float, stats=("min", "max", "mean", "median", "q1", "q3")) -> None:
    for s in stats:
        bench["stats"][s] *= factor


def _run_gate(tmp_path: Path, baseline: dict, new: dict, thresholds: gate.Thresholds | None = None):
    results = tmp_path / "results"
    _write(results / SLUG, baseline, "20260101T000000Z_base.json")
    new_path = _write(tmp_path / "out", new)
    return gate.gate(new_path, results_dir=results, thresholds=thresholds or gate.Thresholds(),
                     include_uncommitted=True)


def _failed(result: gate.GateResult) -> set[tuple[str, str]]:
    return {(c.name, c.metric) for c in result.failures}


# A benchmark far above the micro cut-off (median 0.3 ms) and its eager peer: the MIMB
# training step (recorded under its old name mimb_scale, renamed on load).
SLOW = "cpu-cpu-fp32-4x32x64x48-mimb_train_step]"
SLOW_EAGER = "cpu-eager-fp32-4x32x64x48-mimb_train_step]"


# --------------------------------------------------------------------------- gate
def test_unchanged_run_passes(tmp_path, recorded):
    result = _run_gate(tmp_path, recorded, recorded)
    assert result.exit_code() == gate.EXIT_PASS
    assert not result.failures and not result.missing
    checked = [c for c in result.checks if c.status == gate.OK]
    assert len({c.key for c in checked}) == len(recorded["benchmarks"])
    assert {c.metric for c in checked} >= {"time", "speedup_eager", "speedup_numpy"}


def test_slowed_20_percent_fails_naming_it(tmp_path, recorded):
    new = copy.deepcopy(recorded)
    bench = _find(new, SLOW)
    _scale(bench, 1.2)
    result = _run_gate(tmp_path, recorded, new)
    assert result.exit_code() == gate.EXIT_REGRESSION
    assert (bench["name"], "time") in _failed(result)
    text = gate.format_text(result)
    assert bench["name"] in text and "FAIL" in text and "+20.0%" in text
    assert all(name == bench["name"] for name, _ in _failed(result))


def test_slowed_5_percent_passes(tmp_path, recorded):
    new = copy.deepcopy(recorded)
    _scale(_find(new, SLOW), 1.05)
    assert _run_gate(tmp_path, recorded, new).exit_code() == gate.EXIT_PASS


def test_per_benchmark_threshold_override(tmp_path, recorded):
    new = copy.deepcopy(recorded)
    bench = _find(new, SLOW)
    _scale(bench, 1.2)
    toml = tmp_path / "thresholds.toml"
    toml.write_text(f'[defaults]\nthreshold = 0.10\n\n[[rule]]\nmatch = "*{SLOW[:-1]}*"\nthreshold = 0.30\n')
    loose = gate.Thresholds.load(toml)
    assert _run_gate(tmp_path, recorded, new, loose).exit_code() == gate.EXIT_PASS
    toml.write_text(f'[[rule]]\nmatch = "*{SLOW[:-1]}*"\nthreshold = 0.15\n')
    result = _run_gate(tmp_path, recorded, new, gate.Thresholds.load(toml))
    assert (bench["name"], "time") in _failed(result)
    # the override touches that benchmark only: another one slowed 20 % still fails at 10 %
    other = _find(new, SLOW_EAGER)
    _scale(other, 1.2)
    result = _run_gate(tmp_path, recorded, new, loose)
    assert _failed(result) == {(other["name"], "time")}


def test_micro_benchmark_judged_on_min(tmp_path, recorded):
    new = copy.deepcopy(recorded)
    bench = _find(new, SLOW)
    median = bench["stats"]["median"]
    # a median 50 % worse with an unchanged fastest round: a regression for a normal
    # benchmark, noise for a micro-benchmark
    bench["stats"]["median"] = median * 1.5
    assert (bench["name"], "time") in _failed(_run_gate(tmp_path, recorded, new))
    micro = gate.Thresholds(micro_median_s=2 * median)
    result = _run_gate(tmp_path, recorded, new, micro)
    time_check = next(c for c in result.checks if c.name == bench["name"] and c.metric == "time")
    assert time_check.statistic == "min" and time_check.status == gate.OK
    # ... and a micro-benchmark whose fastest round got slower does fail
    _scale(bench, 1.5, stats=("min",))
    assert (bench["name"], "time") in _failed(_run_gate(tmp_path, recorded, new, micro))


def test_flagged_noisy_benchmark_judged_on_min(tmp_path, recorded):
    base = copy.deepcopy(recorded)
    _find(base, SLOW)["extra_info"]["noisy"] = True
    new = copy.deepcopy(base)
    _find(new, SLOW)["stats"]["median"] *= 1.5
    result = _run_gate(tmp_path, base, new)
    assert (_find(new, SLOW)["name"], "time") not in _failed(result)


def test_derived_speedup_must_not_drop(tmp_path, recorded):
    # the eager peer got 30 % faster: the other backends' times are unchanged, their speed-up
    # over eager dropped; that fails on the ratio (the eager row itself is "faster")
    new = copy.deepcopy(recorded)
    _scale(_find(new, SLOW_EAGER), 0.7)
    result = _run_gate(tmp_path, recorded, new)
    fused = _find(new, SLOW)["name"]
    reference = _find(new, SLOW.replace("cpu-cpu-", "cpu-reference-"))["name"]
    assert _failed(result) == {(fused, "speedup_eager"), (reference, "speedup_eager")}
    # the other direction (the speed-up rises) is an improvement, not a failure
    new = copy.deepcopy(recorded)
    _scale(_find(new, SLOW_EAGER), 1.3)
    result = _run_gate(tmp_path, recorded, new)
    assert (fused, "speedup_eager") not in _failed(result)
    assert any(c.name == fused and c.metric == "speedup_eager" and c.status == gate.IMPROVED for c in result.checks)


@pytest.mark.parametrize(
    "metric, base_value, new_value, fails",
    [
        ("overhead_vs_hrnet", 1.30, 1.50, True),    # an overhead ratio must not rise
        ("overhead_vs_hrnet", 1.30, 1.10, False),
        ("speedup_vs_official", 2.0, 1.6, True),    # a speed-up must not drop
        ("speedup_vs_official", 2.0, 2.5, False),
        ("boxes_per_s", 1000.0, 850.0, True),       # a throughput must not drop
        ("peak_memory_bytes", 1e9, 1.2e9, True),    # peak memory must not rise
        ("max_abs_diff_vs_eager", 1e-6, 1e-3, False),  # not a gated metric
    ],
)
def test_extra_info_ratio_direction(tmp_path, recorded, metric, base_value, new_value, fails):
    base = copy.deepcopy(recorded)
    _find(base, SLOW)["extra_info"][metric] = base_value
    new = copy.deepcopy(base)
    _find(new, SLOW)["extra_info"][metric] = new_value
    result = _run_gate(tmp_path, base, new)
    assert ((_find(new, SLOW)["name"], metric) in _failed(result)) is fails
    assert result.exit_code() == (gate.EXIT_REGRESSION if fails else gate.EXIT_PASS)


def test_metric_direction_override(recorded, tmp_path):
    toml = tmp_path / "t.toml"
    toml.write_text('[metrics]\n"n2_latency_ratio" = "ignore"\n"frames" = "higher"\n')
    th = gate.Thresholds.load(toml)
    assert th.direction("n2_latency_ratio") == gate.IGNORE
    assert th.direction("other_ratio") == gate.LOWER
    assert th.direction("frames") == gate.HIGHER
    assert th.direction("bytes_moved") is None


def test_new_and_missing_benchmarks(tmp_path, recorded):
    new = copy.deepcopy(recorded)
    gone = _find(new, SLOW)
    new["benchmarks"].remove(gone)
    added = copy.deepcopy(_find(new, SLOW_EAGER))
    added["fullname"] += "-new"
    added["name"] += "-new"
    new["benchmarks"].append(added)
    result = _run_gate(tmp_path, recorded, new)
    assert [c.name for c in result.missing] == [gone["name"]]
    assert [c.name for c in result.checks if c.status == gate.NEW] == [added["name"]]
    assert result.exit_code() == gate.EXIT_REGRESSION  # coverage dropped
    assert result.exit_code(allow_missing=True) == gate.EXIT_PASS  # a new benchmark is no failure
    text = gate.format_text(result)
    assert "MISSING" in text and added["name"] in text


def test_untracked_benchmark_not_reported_missing(tmp_path, recorded):
    new = copy.deepcopy(recorded)
    gone = _find(new, SLOW)
    new["benchmarks"].remove(gone)
    th = gate.Thresholds(rules=[gate.Rule(match=f"*{SLOW[:-1]}*", track=False)])
    assert _run_gate(tmp_path, recorded, new, th).exit_code() == gate.EXIT_PASS


def test_other_gpu_kind_is_never_compared(tmp_path, recorded):
    h100 = copy.deepcopy(recorded)
    h100["machine_info"]["mipnet"].update(device_slug="nvidia-h100-80gb-hbm3", device_name="NVIDIA H100 80GB HBM3")
    h200 = copy.deepcopy(recorded)
    h200["machine_info"]["mipnet"].update(device_slug="nvidia-h200", device_name="NVIDIA H200")
    results = tmp_path / "results"
    _write(results / "nvidia-h100-80gb-hbm3", h100)
    new_path = _write(tmp_path / "out", h200)
    # the H200 run looks for its own folder only ...
    with pytest.raises(gate.GateError, match="no baseline for device kind 'nvidia-h200'"):
        gate.gate(new_path, results_dir=results, include_uncommitted=True)
    # ... an explicit H100 baseline is refused, file or folder ...
    with pytest.raises(gate.GateError, match="mismatch"):
        gate.gate(new_path, baseline=results / "nvidia-h100-80gb-hbm3" / "run.json")
    with pytest.raises(gate.GateError, match="mismatch"):
        gate.gate(new_path, baseline=results / "nvidia-h100-80gb-hbm3")
    # ... and an H100 file misplaced in the H200 folder is ignored, not compared
    _write(results / "nvidia-h200", h100, "misplaced.json")
    with pytest.raises(gate.GateError, match="no baseline"):
        gate.gate(new_path, results_dir=results, include_uncommitted=True)
    assert gate.main([str(new_path), "--results-dir", str(results), "--include-uncommitted"]) == gate.EXIT_NO_COMPARISON


def test_missing_baseline_dir_is_a_distinct_outcome(tmp_path, recorded, capsys):
    new_path = _write(tmp_path / "out", recorded)
    md = tmp_path / "gate.md"
    rc = gate.main([str(new_path), "--results-dir", str(tmp_path / "empty"), "--markdown", str(md)])
    assert rc == gate.EXIT_NO_COMPARISON != gate.EXIT_REGRESSION
    err = capsys.readouterr().err
    assert "no baseline for device kind 'cpu-amd-epyc'" in err and "make bench-baseline" in err
    assert "no comparison" in md.read_text()


def test_newest_run_per_suite_is_the_baseline(tmp_path, recorded):
    old = copy.deepcopy(recorded)
    old["datetime"] = "2020-01-01T00:00:00+00:00"
    _scale(_find(old, SLOW), 2.0)  # the old run was slower: must not be the reference
    mimb_only = copy.deepcopy(recorded)
    mimb_only["benchmarks"] = [b for b in mimb_only["benchmarks"] if "test_mimb_bench" in b["fullname"]]
    decode_old = [b for b in old["benchmarks"] if "test_decode_bench" in b["fullname"]]
    results = tmp_path / "results"
    _write(results / SLUG, old, "a.json")
    _write(results / SLUG, mimb_only, "b.json")
    new = copy.deepcopy(recorded)
    _scale(_find(new, SLOW), 1.5)
    result = gate.gate(_write(tmp_path / "out", new), results_dir=results, include_uncommitted=True)
    assert (_find(new, SLOW)["name"], "time") in _failed(result)  # vs b.json, not vs the slower a.json
    assert {p.name for p in result.baseline_files} == ({"a.json", "b.json"} if decode_old else {"b.json"})


def test_committed_files_only_by_default(tmp_path, recorded):
    """In the repository, only files git tracks are the baseline; elsewhere, every file."""
    tracked = gate.committed_files(CPU_RESULTS)
    if tracked is None:
        pytest.skip("not a git work tree")
    assert {p.resolve() for p in RECORDED} >= tracked and tracked
    assert gate.committed_files(tmp_path) is None or gate.committed_files(tmp_path) == set()


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", *args],
                   cwd=cwd, check=True, capture_output=True, timeout=60)


def test_gate_reads_the_committed_version_of_a_baseline(tmp_path, recorded):
    """``make bench-baseline`` rewrites a tracked baseline.json: until that is committed (or
    staged), the gate keeps judging against the version git has."""
    try:
        _git(tmp_path, "init", "-q")
    except (OSError, subprocess.SubprocessError):
        pytest.skip("git is not usable here")
    results = tmp_path / "results"
    path = baseline.write(baseline.build([(Path("20260101T000000Z_base.json"), recorded)]),
                          results / SLUG / "baseline.json")
    _write(results / SLUG, recorded, "20990101T000000Z_raw.json")  # an untracked raw run: ignored
    _git(tmp_path, "add", str(path))
    _git(tmp_path, "commit", "-q", "-m", "baseline")
    slower = copy.deepcopy(recorded)
    _scale(_find(slower, SLOW), 1.5)
    new_path = _write(tmp_path / "out", slower)
    baseline.update([new_path], results)  # the new baseline, not committed yet
    assert {p.name for p in gate.gate(new_path, results_dir=results).baseline_files} == {
        "baseline.json#20260101T000000Z_base"}
    assert (_find(slower, SLOW)["name"], "time") in _failed(gate.gate(new_path, results_dir=results))
    # on disk (--include-uncommitted) the new run is the newest: no regression against itself
    assert not gate.gate(new_path, results_dir=results, include_uncommitted=True).failures
    _git(tmp_path, "add", str(path))  # staged: now it counts
    assert not gate.gate(new_path, results_dir=results).failures


# --------------------------------------------------------------------------- trimmed baselines
def _runs_for_trim(recorded: dict) -> list[tuple[Path, dict]]:
    """Three raw runs of one kind: an old full run, a newer run of part of the decode suite
    and a newest MIMB-only run, each with per-round data."""
    old = copy.deepcopy(recorded)
    old["datetime"] = "2026-01-01T00:00:00+00:00"
    for b in old["benchmarks"]:
        b["stats"]["data"] = [b["stats"]["median"]] * 5
    decode = copy.deepcopy(old)
    decode["datetime"] = "2026-01-02T00:00:00+00:00"
    decode["benchmarks"] = [b for b in decode["benchmarks"] if "test_decode_bench" in b["fullname"]][:2]
    mimb = copy.deepcopy(old)
    mimb["datetime"] = "2026-01-03T00:00:00+00:00"
    mimb["benchmarks"] = [b for b in mimb["benchmarks"] if "test_mimb_bench" in b["fullname"]]
    _scale(_find(mimb, SLOW), 0.5)
    return [(Path("20260101T000000Z_old.json"), old), (Path("20260102T000000Z_dec.json"), decode),
            (Path("20260103T000000Z_mimb.json"), mimb)]


def _view(runs, per):
    rows, _ = _report.merge_newest(runs, per=per)
    return sorted((json.dumps({k: v for k, v in _strip(b).items() if k != "stats"}, sort_keys=True),
                   b["stats"]["median"]) for b in rows)


def test_trimmed_baseline_keeps_what_gate_and_report_read(tmp_path, recorded):
    raw = _runs_for_trim(recorded)
    path = baseline.write(baseline.build(raw), tmp_path / SLUG / "baseline.json")
    doc = json.loads(path.read_text())
    assert doc["format"] == _report.BASELINE_FORMAT and doc["device_slug"] == SLUG
    assert all("data" not in b["stats"] and {"min", "median", "mean", "stddev", "rounds"} <= set(b["stats"])
               for b in doc["benchmarks"])
    assert [r["id"] for r in doc["runs"]] == ["20260101T000000Z_old", "20260102T000000Z_dec", "20260103T000000Z_mimb"]
    split = _report.load_runs(path)
    assert _view(split, "suite") == _view(raw, "suite")  # the gate: each suite from its newest run
    assert _view(split, "benchmark") == _view(raw, "benchmark")  # the report: each row from its newest run
    assert len(doc["benchmarks"]) == len(recorded["benchmarks"])  # superseded rows dropped
    # the gate judges a run against it exactly as against the raw files
    new_path = _write(tmp_path / "out", recorded)
    for folder, files in (("trimmed", [(path.name, doc)]), ("raw", [(p.name, d) for p, d in raw])):
        for name, data in files:
            (tmp_path / folder / SLUG).mkdir(parents=True, exist_ok=True)
            (tmp_path / folder / SLUG / name).write_text(json.dumps(data))
    a = gate.gate(new_path, results_dir=tmp_path / "trimmed", include_uncommitted=True)
    b = gate.gate(new_path, results_dir=tmp_path / "raw", include_uncommitted=True)
    key = lambda r: sorted((c.status, c.key, c.metric, c.baseline) for c in r.checks)  # noqa: E731
    assert key(a) == key(b) and (_find(recorded, SLOW)["name"], "time") in _failed(a)  # 2x the halved MIMB run


def test_baseline_update_folds_a_run_in(tmp_path, recorded):
    results = tmp_path / "results"
    first = _write(tmp_path / "in", copy.deepcopy(recorded), "first.json")
    path = baseline.update([first], results)
    assert path == results / SLUG / "baseline.json"
    newer = copy.deepcopy(recorded)
    newer["datetime"] = "2099-01-01T00:00:00+00:00"
    newer["commit_info"] = dict(newer.get("commit_info") or {}, id="f" * 40, dirty=True)
    newer["benchmarks"] = [b for b in newer["benchmarks"] if "test_mimb_bench" in b["fullname"]]
    _scale(_find(newer, SLOW), 2.0)
    baseline.update([_write(tmp_path / "in", newer, "second.json")], results)
    runs = _report.load_runs(path)
    assert [p.name.split("#")[1] for p, _ in runs][-1] == "20990101T000000Z_ffffffffff-dirty"
    rows, _ = _report.merge_newest(runs, per="suite")
    assert _find({"benchmarks": rows}, SLOW)["stats"]["median"] == 2.0 * _find(recorded, SLOW)["stats"]["median"]
    assert len(rows) == len(recorded["benchmarks"])  # the other suites still from the first run
    with pytest.raises(ValueError, match="no timed benchmarks"):
        baseline.update([_write(tmp_path / "in", dict(recorded, benchmarks=[]), "empty.json")], results)
    assert baseline.main(["show", str(path)]) == 0


def test_committed_results_hold_no_raw_rounds():
    """One trimmed baseline per device kind; no committed result file keeps per-round data."""
    tracked = gate.committed_files(RESULTS)
    if tracked is None:
        pytest.skip("not a git work tree")
    for path in (p for p in tracked if p.suffix == ".json"):
        data = _report.load_run(path)
        assert all("data" not in b.get("stats", {}) for b in data["benchmarks"]), path
        assert path.stat().st_size < 1_000_000, path
        if _report.is_baseline(data):
            assert path.name == "baseline.json" and path.parent.name == _report.run_slug(data), path


def test_renamed_row_compares_with_its_old_name(tmp_path, recorded):
    """A baseline recorded before a row was renamed (RENAMED_OPS) is compared like with like:
    no row missing or new, and a regression of the renamed row still fails."""
    old = copy.deepcopy(recorded)
    renamed = [b for b in old["benchmarks"] if b["extra_info"].get("op") == "mimb_train_step"]
    assert renamed
    for b in renamed:  # as the rows were recorded before issue 15
        b["extra_info"]["op"] = b["params"]["op"] = "mimb_scale"
        for key in ("name", "fullname", "param"):
            b[key] = b[key].replace("mimb_train_step", "mimb_scale")
        b["group"] = b["group"].replace("mimb_train_step", "mimb_scale")
    assert _run_gate(tmp_path, old, recorded).exit_code() == gate.EXIT_PASS
    result = _run_gate(tmp_path, old, recorded)
    assert not result.missing and not [c for c in result.checks if c.status == gate.NEW]
    new = copy.deepcopy(recorded)
    _scale(_find(new, SLOW), 1.2)
    failed = _failed(_run_gate(tmp_path, old, new))
    assert (_find(new, SLOW)["name"], "time") in failed and {name for name, _ in failed} == {_find(new, SLOW)["name"]}
    migrated = _report.migrate_benchmark(copy.deepcopy(renamed[0]))
    assert migrated["group"].startswith("mimb_train_step fwd+bwd") and migrated["params"]["op"] == "mimb_train_step"


def test_cli_on_recorded_json_and_markdown(tmp_path, recorded, capsys):
    new = copy.deepcopy(recorded)
    _scale(_find(new, SLOW), 1.2)
    results = tmp_path / "results"
    _write(results / SLUG, recorded)
    new_path = _write(tmp_path / "out", new)
    md = tmp_path / "gate.md"
    rc = gate.main([str(new_path), "--results-dir", str(results), "--include-uncommitted",
                    "--thresholds", str(ROOT / "benchmarks" / "thresholds.toml"), "--markdown", str(md)])
    out = capsys.readouterr().out
    # the committed thresholds give cpu rows 20 %: 1.2x is within it
    assert rc == gate.EXIT_PASS, out
    rc = gate.main([str(new_path), "--results-dir", str(results), "--include-uncommitted", "--threshold", "0.1",
                    "--thresholds", str(tmp_path / "none.toml"), "--markdown", str(md)])
    out = capsys.readouterr().out
    assert rc == gate.EXIT_REGRESSION and _find(new, SLOW)["name"] in out
    assert "| FAIL |" in md.read_text()


def test_thresholds_file_errors_name_the_problem(tmp_path):
    bad = tmp_path / "t.toml"
    bad.write_text('[[rule]]\nthreshold = 0.2\n')
    with pytest.raises(ValueError, match="rule #1 has no 'match'"):
        gate.Thresholds.load(bad)
    bad.write_text('[[rule]]\nmatch = "*"\nstatistic = "mean"\n')
    with pytest.raises(ValueError, match="statistic"):
        gate.Thresholds.load(bad)
    gate.Thresholds.load(ROOT / "benchmarks" / "thresholds.toml")  # the committed file parses


# --------------------------------------------------------------------------- report
def test_report_from_committed_json(tmp_path):
    md, plots = tmp_path / "report.md", tmp_path / "report"
    pngs = report.write_report([CPU_RESULTS], md, plots)
    text = md.read_text()
    ops = {b["extra_info"]["op"] for run in RECORDED for b in _report.load_run(run)["benchmarks"]}
    assert "mimb_train_step" in ops and "mimb_scale" not in ops
    expected = {f"op_cpu_{op}.png" for op in ops}
    if any("nms" in op for op in ops):  # the NMS suite's runs also give the scaling plot
        expected.add("nms_vs_candidates.png")
    assert {p.name for p in pngs} == expected
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        assert f"](report/{png.name})" in text
    assert "AMD EPYC" in text and "plot skipped" in text  # no model-suite rows in the CPU runs


def _synthetic(recorded: dict) -> dict:
    """The CPU run plus model-suite and NMS rows of the shape those suites record."""
    data = copy.deepcopy(recorded)
    template = data["benchmarks"][0]

    def row(name, t, **extra):
        b = copy.deepcopy(template)
        b.update(name=name, fullname=f"benchmarks/test_x_bench.py::{name}")
        b["stats"] = {"median": t, "min": t, "rounds": 10}
        b["extra_info"] = extra
        return b

    for batch in (24, 48):
        base = 0.010 * batch / 24
        data["benchmarks"] += [
            row(f"m[{batch}-a]", base, arch="hrnet_w32", variant="baseline", batch=batch, input_size=[256, 192]),
            row(f"m[{batch}-b]", base * 2.0, arch="hrnet_w32", variant="official", batch=batch,
                input_size=[256, 192], ratio_vs_baseline=2.0),
            row(f"m[{batch}-c]", base * 1.3, arch="hrnet_w32", variant="ours", batch=batch, input_size=[256, 192],
                ratio_vs_baseline=1.3, flop_floor_ratio=1.38),
        ]
    for n in (100, 1000, 10000):
        for backend, t in (("cpu", 1e-7 * n), ("numpy", 1e-5 * n)):
            data["benchmarks"].append(row(f"nms[{backend}-{n}]", t, op="oks_nms", backend=backend, device="cpu",
                                          num_candidates=n))
    return data


def test_report_model_nms_and_batch_plots(tmp_path, recorded):
    path = _write(tmp_path / "in", _synthetic(recorded))
    md, plots = tmp_path / "r.md", tmp_path / "plots"
    names = {p.name for p in report.write_report([path], md, plots)}
    assert {"model_latency.png", "latency_vs_batch.png", "nms_vs_candidates.png"} <= names
    text = md.read_text()
    assert "ratio_vs_baseline" in text and "hrnet_w32" in text and "plot skipped" not in text
    for name in names:
        assert (plots / name).stat().st_size > 10_000


def test_report_refuses_mixed_device_kinds(tmp_path, recorded):
    other = copy.deepcopy(recorded)
    other["machine_info"]["mipnet"]["device_slug"] = "nvidia-h200"
    a, b = _write(tmp_path, recorded, "a.json"), _write(tmp_path, other, "b.json")
    with pytest.raises(ValueError, match="several device kinds"):
        report.load_inputs([a, b])


def test_gpu_clocks_absent_fields_are_none(monkeypatch):
    def no_smi(*args, **kwargs):
        raise FileNotFoundError("nvidia-smi")

    monkeypatch.setattr(_report.subprocess, "run", no_smi)
    clocks = _report.gpu_clocks()
    assert set(clocks) == set(_report.GPU_CLOCK_FIELDS) and all(v is None for v in clocks.values())


def test_gpu_clocks_parsing(monkeypatch):
    class Done:
        stdout = "1980, 2619, 1980, 2619, [N/A], 2619, P0, 700.00, Enabled\n"

    monkeypatch.setattr(_report.subprocess, "run", lambda *a, **k: Done())
    clocks = _report.gpu_clocks("00000000:19:00.0")
    assert clocks["sm_mhz"] == 1980 and clocks["max_mem_mhz"] == 2619 and clocks["applications_sm_mhz"] is None
    assert clocks["pstate"] == "P0" and clocks["power_limit_w"] == 700


# --------------------------------------------------------------------------- profiling hook
def test_ops_named_with_backend_in_profiler_trace():
    import mipnet_kernels

    hm = torch.rand(2, 3, 16, 12)
    with mipnet_kernels.use_backend("reference"):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            mipnet_kernels.decode_heatmaps(hm)
    names = {e.name for e in prof.events()}
    assert "mipnet::decode_heatmaps[reference]" in names
    # without a profiler the op takes the plain path and still gives the same result
    with mipnet_kernels.use_backend("reference"):
        plain = mipnet_kernels.decode_heatmaps(hm)
    with mipnet_kernels.use_backend("reference"), torch.profiler.profile() as prof:
        profiled = mipnet_kernels.decode_heatmaps(hm)
    for a, b in zip(plain, profiled):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
