"""``python -m mipnet_kernels.selftest``: it passes on this machine's backends, it fails (exit
status 1) when a kernel is off by a little or raises, and ``--json`` writes valid JSON.

Kept short (the small battery, one backend or a few ops at a time): about 30 s on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mipnet_kernels as mk
from mipnet_kernels import _backends, selftest

ROOT = Path(__file__).resolve().parents[1]


def _require(backend: str) -> None:
    info = mk.available_backends()[backend]
    if not info["available"]:
        pytest.skip(f"backend {backend!r} unavailable: {info['reason']}")


def _rows(path) -> list[dict]:
    with open(path) as f:
        data = json.load(f)
    assert set(data) >= {"environment", "summary", "results", "passed", "checked"}
    return data["results"]


def test_passes_on_the_cpu_backend_and_writes_json(tmp_path, capsys):
    _require("cpu")
    out = tmp_path / "selftest.json"
    assert selftest.main(["--quick", "--backend", "cpu", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "op" in text.splitlines()[0] and "max error" in text and "bound" in text
    with open(out) as f:
        data = json.load(f)
    rows = data["results"]
    assert data["passed"] is True and data["summary"]["failed"] == 0
    assert data["checked"] == ["cpu/cpu"]
    ops = {r["op"] for r in rows if r["status"] == "ok"}
    assert ops >= {"decode_heatmaps", "flip_merge", "mimb_scale", "mimb", "mimb_instances", "mimb_scale_grouped",
                   "mimb_instances_grouped", "oks_nms", "soft_oks_nms", "oks_nms_mask", "soft_oks_nms_mask", "oks_iou"}
    cases = " | ".join(r["case"] for r in rows)
    for what in ("384x2x3", "channels_last", "bf16", "f16", "empty", "nonfinite", "ties", "1x1x1x1"):
        assert what in cases, what
    # float64 MIMB is not for the C++ kernels: a skip with the backend's reason, not a failure
    skips = [r for r in rows if r["status"] == "skip"]
    assert skips and all("float64" in r["detail"] for r in skips)


def test_passes_on_triton(tmp_path):
    """The Triton kernels (under the interpreter on this CPU machine): a few ops, small battery."""
    _require("triton")
    out = tmp_path / "t.json"
    argv = ["--quick", "--backend", "triton", "--op", "decode_heatmaps,flip_merge,mimb_instances,oks_nms_mask",
            "--json", str(out)]
    assert selftest.main(argv) == 0
    rows = _rows(out)
    assert rows and all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"][:3]


def _wrap(monkeypatch, op: str, backend: str, fn):
    impl = _backends.ops()[op].impls[backend]
    monkeypatch.setattr(impl, "fn", fn(impl.fn))


@pytest.mark.parametrize("op, kernel", [("decode_heatmaps", "decode_heatmaps"), ("mimb_scale", "mimb_scale_fwd"),
                                        ("flip_merge", "flip_merge"), ("soft_oks_nms", "soft_oks_nms_sorted")])
def test_reports_a_kernel_that_is_off_by_a_little(tmp_path, monkeypatch, op, kernel):
    """A kernel whose output is off by 1e-2 fails the self-test (exit status 1)."""
    _require("cpu")

    def off_by_a_little(fn):
        def wrapped(*args):
            out = fn(*args)
            if isinstance(out, torch.Tensor):
                return out + 1e-2
            out = list(out)
            i = 1 if op == "soft_oks_nms" else 0  # soft NMS: the new scores; else the first output
            out[i] = out[i] + 1e-2
            return tuple(out)

        return wrapped

    _wrap(monkeypatch, kernel, "cpu", off_by_a_little)
    out = tmp_path / "broken.json"
    assert selftest.main(["--quick", "--backend", "cpu", "--op", op, "--json", str(out)]) == 1
    rows = _rows(out)
    failed = [r for r in rows if r["status"] == "FAIL"]
    assert failed and all(r["op"] == op for r in failed)
    assert any(isinstance(r["max_error"], float) and 0.005 < r["max_error"] < 0.05 for r in failed)


def test_an_exception_is_a_failure_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    _require("cpu")
    calls = []

    def raises_once(fn):
        def wrapped(*args):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("kernel exploded")
            return fn(*args)

        return wrapped

    _wrap(monkeypatch, "flip_merge", "cpu", raises_once)
    out = tmp_path / "exc.json"
    assert selftest.main(["--quick", "--backend", "cpu", "--op", "flip_merge", "--json", str(out)]) == 1
    rows = _rows(out)
    failed = [r for r in rows if r["status"] == "FAIL"]
    assert len(failed) == 1 and "kernel exploded" in failed[0]["detail"] and failed[0]["traceback"]
    assert sum(r["status"] == "ok" for r in rows) == len(rows) - 1 > 5
    assert "kernel exploded" in capsys.readouterr().out


def test_a_backend_that_cannot_run_here_is_a_failure(capsys):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    assert selftest.main(["--backend", "cuda", "--op", "flip_merge"]) == 1
    assert "no CUDA device" in capsys.readouterr().out
    assert selftest.main(["--device", "cuda"]) == 1
    assert selftest.main(["--op", "no_such_op"]) == 2


def test_module_entry_point_and_list():
    """``python -m mipnet_kernels.selftest`` in a fresh process (sets TRITON_INTERPRET itself
    when there is no GPU, before triton is imported)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "mipnet_kernels.selftest"]
    listed = subprocess.run(cmd + ["--list", "--quick", "--op", "mimb_instances"], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines and all(line.startswith("mimb_instances") for line in lines)
    if mk.available_backends()["triton"]["available"] or not torch.cuda.is_available():
        assert any(" triton " in line for line in lines), "triton should be listed (interpreter or GPU)"
    run = subprocess.run(cmd + ["--quick", "--backend", "cpu", "--op", "flip_merge"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    if not mk.available_backends()["cpu"]["available"]:
        assert run.returncode == 1
        return
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "0 failed" in run.stdout
