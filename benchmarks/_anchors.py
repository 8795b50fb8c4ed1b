"""The NumPy anchors the benchmarks compare against: ``tests/anchors.py``.

The anchors live with the tests, so benchmarks and tests never drift apart.  Imported as
``tests.anchors``, or by path when another ``tests`` package shadows the
repository's.  ``numpy_anchors`` is None (and ``ANCHOR_IMPORT_ERROR`` says why) when the
file cannot be imported, e.g. in an install without the tests.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

ANCHORS_PATH = Path(__file__).resolve().parents[1] / "tests" / "anchors.py"


def _load_numpy_anchors():
    try:
        from tests import anchors as mod

        if Path(mod.__file__).resolve() == ANCHORS_PATH:
            return mod
    except ImportError:
        pass
    spec = importlib.util.spec_from_file_location("mipnet_tests_numpy_anchors", ANCHORS_PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ANCHOR_IMPORT_ERROR = ""
try:
    numpy_anchors = _load_numpy_anchors()
except (ImportError, OSError) as exc:  # pragma: no cover - only when tests/ is not shipped
    numpy_anchors = None
    ANCHOR_IMPORT_ERROR = f"tests/anchors.py could not be imported: {exc!r}"
