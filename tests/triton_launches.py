"""Every Triton launch the GPU tests make, recorded without running (no GPU, no interpreter).

:func:`recorded_launches` calls the Triton launchers over the GPU test shapes of
``test_decode.py``, ``test_flip_merge.py``, ``test_mimb.py`` and ``test_nms_kernels.py``
(imported from them, so the lists never drift) on CPU tensors inside
``mipnet_kernels.triton._launch.record_launches``: the launchers pick their constexprs,
tiles and warps exactly as on a GPU, and the launches are recorded instead of run.  The
compile gate (``test_triton_compile.py``) and ``benchmarks/gpu_resources.py`` compile what
this returns.  Import only in a process WITHOUT ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64


def _decode(record) -> None:
    from test_decode import DTYPES, MODES, SHAPES

    from mipnet_kernels.ops.decode import MODE_ID, _blur_weights
    from mipnet_kernels.triton.decode import decode_heatmaps_triton

    for B, K, H, W in SHAPES + [(1, 70000, 3, 2)]:
        for mode in MODES:
            g = _blur_weights(mode, 11, torch.device("cpu"))
            for dtype in DTYPES:
                hm = torch.zeros(B, K, H, W, dtype=dtype)
                decode_heatmaps_triton(hm, MODE_ID[mode], torch.zeros(B, 2, 3), g)
            # strided (not flat) maps, no affine
            hm = torch.zeros(B, K, W, H).transpose(2, 3)
            decode_heatmaps_triton(hm, MODE_ID[mode], None, g)
    for ksize in (3, 31):  # test_decode.py BLUR_CASES: small and largest blur kernels
        for mode in ("dark", "udp"):
            decode_heatmaps_triton(torch.zeros(2, 17, 64, 48), MODE_ID[mode], None,
                                   _blur_weights(mode, ksize, torch.device("cpu")))


def _flip(record) -> None:
    from test_flip_merge import SHAPES

    from mipnet_kernels.ops.decode import _flip_index_tensor
    from mipnet_kernels.triton.decode import flip_merge_triton

    for B, K, H, W in SHAPES:
        idx = _flip_index_tensor(list(range(K))[::-1], torch.device("cpu"))
        for dtype in (F32, F16, BF16):
            for shift in (True, False):
                hm = torch.zeros(B, K, H, W, dtype=dtype)
                flip_merge_triton(hm, hm, idx, shift)
        hm = torch.zeros(B, K, W, H, dtype=BF16).transpose(2, 3)  # strided
        flip_merge_triton(hm, hm, idx, True)


def _mimb(record) -> None:
    from test_mimb import DTYPES, SHAPES

    from mipnet_kernels.triton import mimb as tm

    def inputs(B, C, H, W, r, dtype, cl):
        x = torch.zeros(B, C, H, W, dtype=dtype)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        CR = max(C // r, 1)
        return x, torch.zeros(CR, C, dtype=dtype), torch.zeros(C, CR, dtype=dtype), torch.zeros(B, C, dtype=dtype)

    for B, C, H, W, r in SHAPES:
        for dtype in DTYPES + (F64,):  # float64: gradcheck
            for cl in (False, True):
                x, w1, w2, v = inputs(B, C, H, W, r, dtype, cl)
                y, s = tm.mimb_scale_fwd_triton(x, w1, w2, v)
                tm.mimb_scale_bwd_triton(torch.zeros_like(y), x, w1, w2, v, s)
                for table in (torch.zeros(3, C, dtype=dtype), torch.zeros(3, B, C, dtype=dtype)):
                    tm.mimb_instances_triton(x, w1, w2, table)
                    tm.mimb_instances_bwd_triton(torch.zeros((3 * B, C, H, W), dtype=dtype), x, w1, w2, table)
                tm.mimb_instances_bwd_triton(torch.zeros((9 * B, C, H, W), dtype=dtype), x, w1, w2,
                                             torch.zeros(9, C, dtype=dtype))  # two instance groups
    # grouped: HRNet-W32's four branches (and three), both layouts, one and two dtypes
    branches = [(2, 32, 64, 48), (2, 64, 32, 24), (2, 128, 16, 12), (2, 256, 8, 6)]
    for dtype in (F32, BF16, F64):
        for cl in (False, True):
            for nb in (3, 4):
                xs, w1s, w2s, vs = zip(*(inputs(*b, 4, dtype, cl) for b in branches[:nb]))
                ys, ss = tm.mimb_scale_grouped_fwd_triton(xs, w1s, w2s, vs)
                tm.mimb_scale_grouped_bwd_triton([torch.zeros_like(y) for y in ys], xs, w1s, w2s, vs, ss)
                tm.mimb_instances_grouped_triton(xs, w1s, w2s, [torch.zeros(2, x.shape[1], dtype=dtype) for x in xs])
                tm.mimb_instances_grouped_triton(  # per-sample tables [N, B, C]
                    xs, w1s, w2s, [torch.zeros(2, x.shape[0], x.shape[1], dtype=dtype) for x in xs])
                tables = [torch.zeros((2, x.shape[0], x.shape[1]) if k % 2 else (2 + 7 * (k == 0), x.shape[1]),
                                      dtype=dtype) for k, x in enumerate(xs)]  # mixed forms, N = 9 and 2
                tm.mimb_instances_grouped_bwd_triton(
                    [torch.zeros((t.shape[0] * x.shape[0], *x.shape[1:]), dtype=dtype) for t, x in zip(tables, xs)],
                    xs, w1s, w2s, tables)


def _nms(record) -> None:
    from test_nms_kernels import HARD_CASES, SOFT_CASES

    from mipnet_kernels.triton.nms import oks_nms_sorted_triton, soft_oks_nms_sorted_triton

    def inputs(sizes, K, dtype):
        M = sum(sizes)
        offsets = torch.tensor([0] + list(sizes)).cumsum(0)
        return torch.zeros(M, K, 3, dtype=dtype), torch.ones(M, dtype=dtype), offsets, torch.ones(K, dtype=dtype)

    for sizes, K, dtype, thr, vis, cross in HARD_CASES:
        oks_nms_sorted_triton(*inputs(sizes, K, dtype), thr, math.nan if vis is None else vis, crossover=cross)
    # test_oks_nms_gpu_sizes: 40 COCO-like images and large ones, default and forced bitmask paths
    sizes = [30] * 40 + [0, 1, 200, 700, 129, 64, 65]
    for K, dtype, vis in ((17, F32, None), (14, F64, 0.3), (133, F32, 0.2)):
        for cross in (None, 64, 1):
            oks_nms_sorted_triton(*inputs(sizes, K, dtype), 0.7, math.nan if vis is None else vis, crossover=cross)
    for sizes, K, dtype, method, thr, vis, score_thr, max_dets in SOFT_CASES:
        kp, areas, offsets, sigmas = inputs(sizes, K, dtype)
        soft_oks_nms_sorted_triton(kp, areas, torch.zeros(kp.shape[0], dtype=dtype), offsets, sigmas, method, thr,
                                   math.nan if vis is None else vis, score_thr, max_dets)


#: Launcher families, by name (``--only`` of the resources script filters on these).
FAMILIES = {"decode": _decode, "flip_merge": _flip, "mimb": _mimb, "nms": _nms}


def recorded_launches(families=None) -> list:
    """The launches of the GPU test shapes (``mipnet_kernels.triton._launch.Launch``)."""
    from mipnet_kernels.triton._launch import record_launches

    out = []
    for name, run in FAMILIES.items():
        if families is None or name in families:
            with record_launches() as rec:
                run(rec)
            out.extend(rec)
    return out
