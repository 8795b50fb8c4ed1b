"""What the op layer costs above the kernel it wraps, on the cache state a real call sees.

Each public op (``mipnet_kernels.decode_heatmaps``, ``flip_merge``, ``mimb``,
``mimb_instances``) is timed interleaved with its compiled kernel op
(``torch.ops.mipnet_cpu.*`` on the same, already converted, arguments): blocks of calls of
each in turn, the GC off (:func:`benchmarks._timing.interleaved_rounds`), at sizes whose
data evicts the interpreter's state from the caches between calls.  Printed per call: the
two medians, the median of the per-round differences (the op layer: argument checks,
backend selection, ``torch.library``) and of the per-round ratios.  CPU, fp32, the cpu
backend; docs/ops.md ("On a cold cache") quotes it.

``OMP_NUM_THREADS=1 python -m benchmarks.op_overhead``
"""

from __future__ import annotations

import statistics

import torch

import mipnet_kernels
from mipnet_kernels import COCO_FLIP_PAIRS, use_backend
from mipnet_kernels.nn import MIMB
from mipnet_kernels.ops.decode import _decode_kernel_args, _flip_index, _flip_kernel_args

from ._timing import interleaved_rounds

def overhead(name: str, public, kernel, rounds: int = 40, reps: int = 10) -> dict:
    """One row: ``public`` vs ``kernel`` interleaved (see the module docstring)."""
    t_pub, t_kern = interleaved_rounds((public, kernel), rounds, reps)
    row = {
        "call": name, "public_us": statistics.median(t_pub) * 1e6,
        "kernel_us": statistics.median(t_kern) * 1e6,
        "overhead_us": statistics.median([a - b for a, b in zip(t_pub, t_kern)]) * 1e6,
        "ratio": statistics.median([a / b for a, b in zip(t_pub, t_kern)]),
    }
    print(f"{name:40s} public {row['public_us']:8.1f} us  kernel {row['kernel_us']:8.1f} us  "
          f"op layer {row['overhead_us']:6.1f} us  ratio {row['ratio']:.3f}")
    return row


def main() -> list[dict]:
    ops = torch.ops.mipnet_cpu
    g = torch.Generator().manual_seed(0)
    rows = []
    with use_backend("cpu"), torch.no_grad():
        for shape in [(48, 17, 64, 48), (48, 17, 96, 72)]:
            hm, flipped = torch.rand(*shape, generator=g), torch.rand(*shape, generator=g)
            affine = torch.randn(shape[0], 2, 3, generator=g)
            dargs = _decode_kernel_args(hm, "quarter", affine, 11)
            fargs = _flip_kernel_args(hm, flipped, _flip_index(COCO_FLIP_PAIRS, shape[1]), True)
            sid = "x".join(map(str, shape))
            rows.append(overhead(f"decode_heatmaps quarter+affine {sid}",
                                 lambda: mipnet_kernels.decode_heatmaps(hm, "quarter", affine, 11),
                                 lambda: ops.decode_heatmaps(*dargs)))
            rows.append(overhead(f"flip_merge {sid}",
                                 lambda: mipnet_kernels.flip_merge(hm, flipped, COCO_FLIP_PAIRS, True),
                                 lambda: ops.flip_merge(*fargs), reps=3))
        for B, C, H, W in [(24, 128, 16, 12), (24, 256, 8, 6)]:
            m = MIMB(C, 2, 4).eval()
            x = torch.randn(B, C, H, W, generator=g)
            lam = torch.nn.functional.one_hot(torch.arange(B) % 2, 2).float()
            emb = tuple(t.detach() for t in m.folded_embedding())
            w1, w2, table = m.w1.detach(), m.w2.detach(), m.embedding_table().detach()
            sid = f"{B}x{C}x{H}x{W}"
            rows.append(overhead(f"mimb {sid}", lambda: mipnet_kernels.mimb(x, lam, w1, w2, *emb),
                                 lambda: ops.mimb_fwd(x, lam, w1, w2, *emb)))
            rows.append(overhead(f"mimb_instances {sid}", lambda: mipnet_kernels.mimb_instances(x, w1, w2, table),
                                 lambda: ops.mimb_instances(x, w1, w2, table)))
    return rows


if __name__ == "__main__":
    main()
