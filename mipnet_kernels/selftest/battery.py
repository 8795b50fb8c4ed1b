"""The self-test's cases: the ``small`` (``--quick``) and ``full`` batteries over every op."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .checks import (BF16, F16, F32, F64, GROUPED_BRANCHES, _DT, Mismatch, _shape, check_decode, check_flip,
                     check_grouped, check_mimb, check_nms, check_oks_iou)


# --------------------------------------------------------------------------- the battery
@dataclass
class Case:
    op: str
    name: str
    run: Callable[[str, torch.device], Mismatch]


DECODE_SHAPES = {
    "small": [(1, 1, 1, 1), (2, 1, 2, 3), (1, 3, 7, 5), (1, 2, 33, 27)],
    "full": [(1, 1, 1, 1), (2, 3, 7, 5), (1, 17, 33, 27), (2, 17, 64, 48), (2, 3, 96, 72)],
}
MIMB_SHAPES = {  # (B, C, H, W, r)
    "small": [(1, 1, 1, 1, 1), (2, 3, 7, 5, 1), (2, 16, 5, 3, 4), (2, 384, 2, 3, 4), (2, 384, 1, 1, 4)],
    "full": [(1, 1, 1, 1, 1), (2, 3, 7, 5, 1), (3, 48, 7, 5, 4), (1, 384, 7, 5, 4), (2, 384, 12, 9, 4),
             (2, 384, 1, 1, 4), (2, 48, 64, 48, 4), (48, 32, 8, 6, 4)],
}


def battery(size: str) -> list[Case]:
    """Every case of the ``size`` battery ("small" or "full")."""
    small = size == "small"
    cases: list[Case] = []
    modes = ("argmax", "quarter", "dark", "udp")
    dtypes3 = (F32, F16, BF16)

    # decode_heatmaps
    for shape in DECODE_SHAPES[size]:
        for mode in modes:
            for dt in dtypes3 if not small or shape == (1, 3, 7, 5) else (F32,):
                for lay in ("contiguous", "channels_last") + (() if small else ("sliced",)):
                    if small and lay != "contiguous" and dt != F32:
                        continue
                    for aff in (False, True):
                        if aff and (lay != "contiguous" or dt != F32):
                            continue
                        name = f"{_shape(shape)} {mode} {_DT[dt]} {lay}{' affine' if aff else ''}"
                        cases.append(Case("decode_heatmaps", name, lambda b, d, s=shape, mo=mode, t=dt, l=lay, a=aff:
                                          check_decode(b, d, s, mo, t, l, a)))
    for mode in modes:
        for kind, shape in (("ties", (2, 3, 9, 8)), ("nonfinite", (2, 3, 9, 8))):
            cases.append(Case("decode_heatmaps", f"{_shape(shape)} {mode} {kind}",
                              lambda b, d, s=shape, mo=mode, k=kind: check_decode(b, d, s, mo, F32, "contiguous", False, k)))
        for shape in ((0, 17, 64, 48), (2, 0, 5, 5)):
            cases.append(Case("decode_heatmaps", f"{_shape(shape)} {mode} empty",
                              lambda b, d, s=shape, mo=mode: check_decode(b, d, s, mo, F32, "contiguous", False)))

    # flip_merge
    for shape in [(1, 1, 1, 1), (2, 17, 7, 5)] + ([] if small else [(2, 17, 64, 48)]):
        for dt in dtypes3:
            for lay in ("contiguous", "channels_last"):
                if small and lay != "contiguous" and dt != F32:
                    continue
                for shift in (True, False):
                    cases.append(Case("flip_merge", f"{_shape(shape)} {_DT[dt]} {lay} shift={shift}",
                                      lambda b, d, s=shape, t=dt, l=lay, sh=shift: check_flip(b, d, s, t, l, sh)))
    cases.append(Case("flip_merge", "2x17x7x5 f32 nonfinite",
                      lambda b, d: check_flip(b, d, (2, 17, 7, 5), F32, "contiguous", True, "nonfinite")))
    cases.append(Case("flip_merge", "0x17x64x48 empty",
                      lambda b, d: check_flip(b, d, (0, 17, 64, 48), F32, "contiguous", True)))

    # MIMB
    for op in ("mimb_scale", "mimb", "mimb_instances"):
        for shape in MIMB_SHAPES[size]:
            for dt in (F32, F16, BF16, F64):
                if small and dt in (F16,) and shape[1] != 384:
                    continue
                for lay in ("contiguous", "channels_last"):
                    name = f"{_shape(shape[:4])} {_DT[dt]} {lay} fwd+bwd"
                    cases.append(Case(op, name, lambda b, d, o=op, s=shape, t=dt, l=lay, g=True:
                                      check_mimb(o, b, d, s, t, l, g)))
        for dt in (F32, BF16):
            cases.append(Case(op, f"2x8x5x3 {_DT[dt]} nonfinite fwd",
                              lambda b, d, o=op, t=dt: check_mimb(o, b, d, (2, 8, 5, 3, 4), t, "contiguous", False, "nonfinite")))
        cases.append(Case(op, "0x8x5x3 f32 empty", lambda b, d, o=op, g=True:
                          check_mimb(o, b, d, (0, 8, 5, 3, 4), F32, "contiguous", g)))
    for shape in MIMB_SHAPES[size][2:4]:  # the training form: one table row per output sample
        for dt in (F32, BF16):
            for lay in ("contiguous", "channels_last"):
                cases.append(Case("mimb_instances", f"{_shape(shape[:4])} {_DT[dt]} {lay} per-sample table fwd+bwd",
                                  lambda b, d, s=shape, t=dt, l=lay: check_mimb("mimb_instances", b, d, s, t, l, True, "rows")))
    branches = GROUPED_BRANCHES[size]
    for op in ("mimb_scale_grouped", "mimb_instances_grouped"):
        for dt in (F32, BF16) if small else (F32, F16, BF16):
            for lay in ("contiguous", "channels_last"):
                name = f"{len(branches)} branches C={'/'.join(str(s[1]) for s in branches)} {_DT[dt]} {lay} fwd+bwd"
                cases.append(Case(op, name, lambda b, d, o=op, t=dt, l=lay, g=True: check_grouped(o, b, d, branches, t, l, g)))

    # NMS
    hard = [(17, 0.9, None), (17, 0.5, 0.25), (14, 0.3, None)] + ([] if small else [(133, 0.7, None)])
    for op in ("oks_nms", "oks_nms_mask"):
        for K, thr, vis in hard:
            for dt in (F32, F64):
                cases.append(Case(op, f"K={K} thr={thr} vis={vis} {_DT[dt]}",
                                  lambda b, d, o=op, k=K, t=thr, v=vis, x=dt: check_nms(o, b, d, "random", k, t, v, x, small)))
        cases.append(Case(op, "K=17 thr=0.6 ties f32",
                          lambda b, d, o=op: check_nms(o, b, d, "ties", 17, 0.6, None, F32, small)))
        cases.append(Case(op, "K=17 empty", lambda b, d, o=op: check_nms(o, b, d, "empty", 17, 0.9, None, F32, small)))
        cases.append(Case(op, "K=17 OKS in (f32(0.9), 0.9) f64",
                          lambda b, d, o=op: check_nms(o, b, d, "thr-rounding", 17, 0.9, None, F64, small)))
    soft = [("gaussian", 0.9, 20), ("linear", 0.3, 3)] + ([] if small else [("gaussian", 0.5, None)])
    for op in ("soft_oks_nms", "soft_oks_nms_mask"):
        for method, thr, md in soft:
            for dt in (F32, F64):
                cases.append(Case(op, f"{method} thr={thr} max_dets={md} {_DT[dt]}",
                                  lambda b, d, o=op, me=method, t=thr, n=md, x=dt:
                                  check_nms(o, b, d, "random", 17, t, 0.25, x, small, me, n)))
        cases.append(Case(op, "gaussian ties f32",
                          lambda b, d, o=op: check_nms(o, b, d, "ties", 17, 0.6, None, F32, small, "gaussian", 5)))
        cases.append(Case(op, "empty", lambda b, d, o=op: check_nms(o, b, d, "empty", 17, 0.9, None, F32, small)))
    return cases


def iou_cases() -> list[Case]:
    return [Case("oks_iou", f"K={K} vis={vis} {_DT[dt]}", lambda b, d, k=K, v=vis, t=dt: check_oks_iou(d, k, v, t))
            for K, vis in ((17, None), (14, 0.5)) for dt in (F32, F64)]
