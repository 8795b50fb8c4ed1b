"""Test configuration.

Without a CUDA GPU the Triton kernels can still run, on CPU tensors, under Triton's
interpreter -- but only if ``TRITON_INTERPRET=1`` is in the environment before ``triton``
is imported (``@triton.jit`` reads it when a kernel module is imported).  So this file sets
it first thing, before anything imports ``mipnet_kernels`` or ``triton``.  A value already
in the environment wins (``TRITON_INTERPRET=0`` turns the interpreter off).
"""

import importlib.util
import os
import sys


def _has_cuda() -> bool:
    try:  # importing torch does not import triton
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - broken torch install
        return False


if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# Make `import utils` / `import anchors` work however pytest is invoked.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mipnet_kernels  # noqa: E402  (after TRITON_INTERPRET; warns once if the extension is missing)


#: Third-party packages some tests need that a machine may lack (the GPU box has no
#: pycocotools and no internet).  A test failing with ModuleNotFoundError for one of them is
#: reported as skipped -- only when the package really is not installed here.
OPTIONAL_PACKAGES = ("pycocotools", "yaml", "tqdm", "matplotlib")
_MISSING = {name for name in OPTIONAL_PACKAGES if importlib.util.find_spec(name) is None}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if _MISSING and call.excinfo is not None and call.excinfo.errisinstance(ModuleNotFoundError):
        name = (call.excinfo.value.name or "").split(".")[0]
        if name in _MISSING:
            report.outcome = "skipped"
            report.longrepr = (str(item.path), item.location[1] or 0,
                               f"Skipped: optional package {name!r} is not installed")


@pytest.fixture(autouse=True)
def _reset_backend_choice():
    """No test leaks a process-wide backend choice into the next one."""
    yield
    mipnet_kernels.set_backend(None)


def pytest_report_header(config):
    info = mipnet_kernels.available_backends()
    lines = [
        "mipnet_kernels backends: "
        + ", ".join(f"{k}={'yes' if v['available'] else 'no'}" for k, v in info.items()),
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r}",
    ]
    for k, v in info.items():
        if not v["available"]:
            lines.append(f"  {k}: {v['reason']}")
    return lines
