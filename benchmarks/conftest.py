"""pytest configuration of the benchmark suite.

* options: ``--mipnet-results-dir DIR`` (env ``MIPNET_BENCH_RESULTS_DIR``) copies the run's
  raw JSON to ``DIR/<device-slug>/<UTC time>_<commit>.json`` (e.g. ``benchmarks/results``,
  giving ``benchmarks/results/nvidia-h100-80gb-hbm3/...``, git-ignored there: the committed
  baseline is the trimmed ``baseline.json``, ``python -m benchmarks.baseline``); ``--mipnet-no-l2-flush``
  (env ``MIPNET_BENCH_NO_L2_FLUSH=1``) times GPU rounds with a warm L2;
* ``machine_info["mipnet"]`` in the JSON: torch/triton/CUDA/driver versions, GPU name,
  backends and the measured device copy bandwidth;
* at the end of the run, the readable table of ``benchmarks/_report.py``.

With ``--benchmark-disable`` (CI smoke) every benchmark body runs once, untimed, and no
table is printed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `tests.anchors` and `benchmarks.*` import from the repo root
    sys.path.insert(0, str(ROOT))

from benchmarks import _report, _timing  # noqa: E402


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def pytest_addoption(parser):
    group = parser.getgroup("mipnet-benchmarks", "mipnet_kernels benchmarks")
    group.addoption(
        "--mipnet-results-dir",
        default=os.environ.get("MIPNET_BENCH_RESULTS_DIR") or None,
        metavar="DIR",
        help="also write the run's JSON to DIR/<device-slug>/<time>_<commit>.json "
        "(e.g. benchmarks/results; env MIPNET_BENCH_RESULTS_DIR)",
    )
    group.addoption(
        "--mipnet-no-l2-flush",
        action="store_true",
        default=_env_flag("MIPNET_BENCH_NO_L2_FLUSH"),
        help="do not evict L2 between GPU rounds (warm-cache timings; env MIPNET_BENCH_NO_L2_FLUSH=1)",
    )


def pytest_configure(config):
    if hasattr(os, "getloadavg"):
        _report.LOADAVG_AT_START = [round(x, 2) for x in os.getloadavg()]
    # pytest-benchmark opens --benchmark-json PATH without creating its folder (benchmarks/out/).
    path = config.getoption("benchmark_json", None)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)


def _benchmarks_disabled(config) -> bool:
    bs = getattr(config, "_benchmarksession", None)
    return bs is None or bool(bs.disabled)


def pytest_report_header(config):
    try:
        import mipnet_kernels

        avail = mipnet_kernels.available_backends()
        parts = [f"{k}={'yes' if v['available'] else 'no'}" for k, v in avail.items()]
    except Exception as exc:  # noqa: BLE001 - header only
        parts = [f"mipnet_kernels failed to import: {exc!r}"]
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else _report.cpu_name()
    mode = "smoke (--benchmark-disable)" if _benchmarks_disabled(config) else "timed"
    return [f"mipnet benchmarks: {mode} on {dev}; backends: {' '.join(parts)}"]


class GpuBenchEnv:
    """Per-session GPU timing state: the round setup (L2 flush) and the copy bandwidth."""

    def __init__(self, disabled: bool, flush_l2: bool) -> None:
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.disabled = disabled
        self.flush_l2 = flush_l2
        self.setup = None if disabled else _timing.GpuRoundSetup(self.device, flush_l2=flush_l2)
        self.copy = None
        if not disabled:
            self.copy = _timing.measure_copy_bandwidth(self.device)
            _report.COPY_BANDWIDTH.update(self.copy)

    @property
    def copy_bandwidth_GBps(self) -> float | None:
        return None if self.copy is None else self.copy["copy_bandwidth_GBps"]


@pytest.fixture(scope="session")
def gpu_bench_env(request) -> GpuBenchEnv:
    """Created on the first CUDA benchmark only (the tests request it lazily)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device (torch.cuda.is_available() is False)")
    return GpuBenchEnv(
        disabled=_benchmarks_disabled(request.config),
        flush_l2=not request.config.getoption("mipnet_no_l2_flush"),
    )


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["mipnet"] = _report.collect_machine_info()


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    bs = getattr(config, "_benchmarksession", None)
    if bs is None:
        return
    if bs.disabled:
        ran = len(terminalreporter.stats.get("passed", []))
        terminalreporter.write_sep("-", "mipnet benchmarks")
        terminalreporter.write_line(
            f"smoke mode (--benchmark-disable): {ran} benchmark bodies ran once, untimed; no table."
        )
        return
    records = [b.as_dict(include_data=False) for b in bs.benchmarks if not b.has_error]
    machine = {"mipnet": _report.collect_machine_info()}
    table = _report.build_table(records, machine)
    if not table:
        return
    terminalreporter.write_sep("=", "mipnet benchmarks: summary")
    for line in table.splitlines():
        terminalreporter.write_line(line)

    results_dir = config.getoption("mipnet_results_dir")
    if results_dir:
        json_path = bs.json if isinstance(bs.json, (str, os.PathLike)) else None
        output_json = None
        if json_path is None or not Path(json_path).exists():
            json_path = None
            output_json = config.hook.pytest_benchmark_generate_json(
                config=config,
                benchmarks=bs.benchmarks,
                include_data=True,
                machine_info=bs.get_machine_info(),
                commit_info=config.hook.pytest_benchmark_generate_commit_info(config=config),
            )
        dest = _report.save_results_copy(results_dir, output_json, json_path)
        terminalreporter.write_line(f"results JSON copied to {dest}")
