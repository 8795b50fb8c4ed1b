"""``python -m mipnet_kernels.selftest`` (see the package docstring)."""

import os
import sys

# As tests/conftest.py: without a CUDA GPU the Triton kernels run on CPU tensors under the
# interpreter, which must be switched on before anything imports triton (importing
# mipnet_kernels does not).  A value already in the environment wins.
def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False

if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from . import main  # noqa: E402  (after TRITON_INTERPRET is settled; importing mipnet_kernels does not import triton)

sys.exit(main())
