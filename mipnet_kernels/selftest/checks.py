"""The self-test's checkers: one per op (decode, flip_merge, MIMB, NMS, oks_iou), each running
one case on one backend against the reference backend with the op's documented bound
(:mod:`mipnet_kernels._numerics`), and the input generators they share with the tests."""

from __future__ import annotations

import contextlib
import math
import zlib
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from .. import _backends, _numerics
from ..keypoints import COCO_FLIP_PAIRS, COCO_SIGMAS

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
_DT = {F32: "f32", F16: "f16", BF16: "bf16", F64: "f64"}

OPS = (
    "decode_heatmaps", "flip_merge", "mimb_scale", "mimb", "mimb_instances", "mimb_scale_grouped",
    "mimb_instances_grouped", "oks_nms", "soft_oks_nms", "oks_nms_mask", "soft_oks_nms_mask", "oks_iou",
)




# --------------------------------------------------------------------------- results
@dataclass
class Row:
    op: str
    backend: str
    device: str
    case: str
    status: str  # "ok" | "FAIL" | "skip"
    max_error: float | None = None
    bound: float | None = None
    detail: str = ""
    seconds: float = 0.0
    traceback: str | None = field(default=None, repr=False)

    @property
    def failed(self) -> bool:
        return self.status == "FAIL"


class Skip(Exception):
    """The backend declines these inputs (its reasons are the message)."""


class Mismatch:
    """Collects the comparisons of one case: the worst one (by error / bound) is reported."""

    def __init__(self) -> None:
        self.err: float = 0.0
        self.bound: float = 0.0
        self.ratio: float = -1.0
        self.problems: list[str] = []
        self.what = ""

    def add(self, what: str, err: float, bound: float, ok: bool | None = None, why: str | None = None) -> None:
        ok = (err <= bound) if ok is None else ok
        if not ok:
            self.problems.append(f"{what}: {why}" if why else f"{what}: error {err:.3g} > bound {bound:.3g}")
        ratio = math.inf if not ok else (err / bound if bound > 0 else (0.0 if err == 0 else math.inf))
        if ratio > self.ratio or (not ok and not self.problems[:-1]):
            self.err, self.bound, self.ratio, self.what = err, bound, ratio, what

    def exact(self, what: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
        why, err = _numerics.exact_mismatch(actual, expected)
        self.add(what, err, 0.0, ok=why is None, why=why)

    def fail(self, what: str, why: str) -> None:
        self.add(what, math.inf, 0.0, ok=False, why=why)


# --------------------------------------------------------------------------- helpers
def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def _gen(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(_seed(*parts))


def _shape(s) -> str:
    return "x".join(str(v) for v in s)


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "sliced":  # every other element of a bigger tensor (garbage in between)
        B, K, H, W = x.shape
        big = torch.full((B, 2 * K + 1, H + 3, 2 * W + 1), 1000.0, dtype=x.dtype, device=x.device)
        view = big[:, 1::2, 2 : H + 2, 1::2]
        view.copy_(x)
        return view
    return x.contiguous()


def _cpu(t):
    if isinstance(t, (list, tuple)):
        return [_cpu(v) for v in t]
    return t.detach().cpu()


@contextlib.contextmanager
def _on(backend: str) -> Iterator[None]:
    """``use_backend(backend)``; a dispatcher refusal ("requested but cannot run") becomes Skip."""
    from .. import use_backend

    try:
        with use_backend(backend):
            yield
    except RuntimeError as exc:
        msg = str(exc)
        if msg.startswith("mipnet_kernels: backend '") and "cannot run" in msg:
            raise Skip(msg.split(": ", 1)[1]) from None
        raise


# --------------------------------------------------------------------------- decode
def blob_heatmaps(B: int, K: int, H: int, W: int, *, seed: int = 0, sigma: float = 2.0, noise: float = 0.01) -> torch.Tensor:
    """Network-like float32 heatmaps: one Gaussian per map at a sub-pixel centre plus noise."""
    g = torch.Generator().manual_seed(seed)
    cx = (W - 1) * torch.rand(B, K, generator=g, dtype=F64)
    cy = (H - 1) * torch.rand(B, K, generator=g, dtype=F64)
    amp = 0.6 + 0.4 * torch.rand(B, K, generator=g, dtype=F64)
    ys = torch.arange(H, dtype=F64)[:, None]
    xs = torch.arange(W, dtype=F64)[None, :]
    d2 = (xs - cx[..., None, None]) ** 2 + (ys - cy[..., None, None]) ** 2
    hm = amp[..., None, None] * torch.exp(-d2 / (2 * sigma * sigma))
    hm = hm + noise * torch.randn(B, K, H, W, generator=g, dtype=F64)
    return hm.float()


def random_affine(B: int, *, seed: int = 0) -> torch.Tensor:
    """Heatmap -> image-like affines: scale 2..6, small rotation / shear, offsets 0..500."""
    g = torch.Generator().manual_seed(seed)
    s = 2 + 4 * torch.rand(B, generator=g, dtype=F64)
    th = 0.3 * (torch.rand(B, generator=g, dtype=F64) - 0.5)
    A = torch.zeros(B, 2, 3, dtype=F64)
    A[:, 0, 0] = s * torch.cos(th)
    A[:, 0, 1] = -s * torch.sin(th) + 0.1 * torch.rand(B, generator=g, dtype=F64)
    A[:, 1, 0] = s * torch.sin(th)
    A[:, 1, 1] = s * torch.cos(th)
    A[:, :, 2] = 500 * torch.rand(B, 2, generator=g, dtype=F64)
    return A.float()


def _decode_inputs(kind: str, shape, dtype) -> torch.Tensor:
    B, K, H, W = shape
    hm = blob_heatmaps(B, K, H, W, seed=_seed("decode", shape)) if B * K * H * W else torch.zeros(shape)
    if kind == "ties" and H * W > 1:  # several equal maxima per map (and constant maps)
        hm = torch.full(shape, 0.25)
        hm[..., H // 2, W // 2] = 1.0
        hm[..., H - 1, W - 1] = 1.0
        hm[..., 0, W - 1] = 1.0
        if K > 1:
            hm[:, -1] = 0.5  # a constant map
    elif kind == "nonfinite":  # NaN in some maps, +-inf in others
        hm[0, 0, H // 2, W // 3] = math.nan
        if K > 1:
            hm[0, 1, H // 3, W // 2] = math.inf
        if K > 2:
            hm[0, 2].fill_(-math.inf)
            hm[0, 2, H // 2, W // 2] = 1.0
        if B > 1:
            hm[1, 0] = math.nan
    return hm.to(dtype)


def check_decode(backend, dev, shape, mode, dtype, layout, affine: bool, kind: str = "blobs", *,
                 heatmaps: Optional[torch.Tensor] = None) -> Mismatch:
    """``decode_heatmaps`` on ``backend`` against the reference; the maps are the battery's
    ``kind`` of ``shape`` / ``dtype``, or ``heatmaps`` (CPU, any values) when given."""
    from .. import decode_heatmaps
    from ..ops.decode import decode_heatmaps_reference

    if heatmaps is not None:
        shape, dtype = tuple(heatmaps.shape), heatmaps.dtype
    B, K, H, W = shape
    hm = _decode_inputs(kind, shape, dtype) if heatmaps is None else heatmaps
    A = random_affine(B, seed=_seed("affine", shape)) if affine else None
    x = _layout(hm.to(dev), layout)
    if B * K:
        reasons = _backends.not_supported_reasons("decode_heatmaps", backend, dev, x, mode,
                                                  None if A is None else A.to(dev), 11)
        if reasons:
            raise Skip("; ".join(reasons))
    with _on(backend):
        coords, scores = decode_heatmaps(x, mode, None if A is None else A.to(dev), 11)
    m = Mismatch()
    if tuple(coords.shape) != (B, K, 2) or coords.dtype != F32 or tuple(scores.shape) != (B, K):
        m.fail("outputs", f"coords {tuple(coords.shape)} {coords.dtype}, scores {tuple(scores.shape)} {scores.dtype}")
        return m
    if B * K == 0:
        return m
    # The yardstick: the reference on CPU (cuDNN's TF32 must not blur it).
    ref_c, ref_s = decode_heatmaps_reference(hm, mode, A, 11)
    coords, scores = _cpu(coords), _cpu(scores)
    m.exact("scores", scores, ref_s)
    flat = hm.reshape(B, K, H * W)
    finite = torch.isfinite(flat).all(-1)
    has_nan = torch.isnan(flat).any(-1)
    nan_ref, nan_out = torch.isnan(ref_c), torch.isnan(coords)
    # The NaN pattern must be the reference's: NaN coordinates exactly for maps holding NaN
    # (+-inf never gives NaN; dark / udp keep the integer argmax where the step is not finite).
    if not torch.equal(nan_out, nan_ref):
        m.fail("coords", f"NaN pattern differs from the reference at {(nan_out != nan_ref).nonzero()[:3].tolist()}")
    if bool(has_nan.any()) and not bool(torch.isnan(coords[has_nan]).all()):
        m.fail("coords", "a map containing NaN must give NaN coordinates")
    if mode in ("argmax", "quarter"):
        if A is None:
            m.exact("coords", coords, ref_c)
        else:
            hm_c, _ = decode_heatmaps_reference(hm, mode, None, 11)
            tol = _numerics.affine_rounding_tol(hm_c, A)
            _worst(m, "coords", (coords.double() - ref_c.double()).abs(), tol, ~nan_ref)
    elif bool(finite.any()):  # dark / udp: the refined rule on the finite maps, one map per row
        b, k = finite.nonzero().unbind(1)
        err, tol, _ = _numerics.refined_error(coords[b, k][:, None], hm[b, k][:, None], mode,
                                              None if A is None else A[b], 11, ref_c[b, k][:, None])
        _worst(m, "coords", err, tol, ~torch.isnan(ref_c[b, k][:, None]))
    return m


def _worst(m: Mismatch, what: str, err: torch.Tensor, tol: torch.Tensor, mask: torch.Tensor) -> None:
    """Add the element with the largest err / tol of a per-element check."""
    err, tol = err.double(), tol.double().expand_as(err)
    mask = mask.expand_as(err)
    if not bool(mask.any()):
        return
    e, t = err[mask], tol[mask]
    bad = ~(e <= t)
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        n = int(bad.sum())
        m.add(what, float(e[i]), float(t[i]), ok=False,
              why=f"{n} of {e.numel()} coordinates outside the bound (first: error {float(e[i]):.3g} > {float(t[i]):.3g})")
        return
    ratio = torch.where(t > 0, e / t.clamp_min(1e-300), torch.where(e > 0, math.inf, 0.0))
    i = int(ratio.argmax())
    m.add(what, float(e[i]), float(t[i]), ok=True)


# --------------------------------------------------------------------------- flip_merge
def check_flip(backend, dev, shape, dtype, layout, shift: bool, kind: str = "random", *,
               maps: Optional[tuple] = None) -> Mismatch:
    """``flip_merge`` on ``backend`` against the reference; ``maps``: an explicit (CPU)
    ``(heatmaps, flipped)`` pair instead of the battery's ``kind``."""
    from .. import flip_merge
    from ..ops.decode import flip_index_from_pairs, flip_merge_reference

    if maps is not None:
        hm, fl = maps
        shape, dtype = tuple(hm.shape), hm.dtype
    else:
        g = _gen("flip", shape)
        hm, fl = torch.rand(shape, generator=g), torch.rand(shape, generator=g)
        if kind == "nonfinite" and hm.numel():
            hm[0, 0, 0, 0] = math.nan
            fl.view(-1)[-1] = math.inf
            hm.view(-1)[hm.numel() // 2] = -math.inf
        hm, fl = hm.to(dtype), fl.to(dtype)
    B, K, H, W = shape
    pairs = COCO_FLIP_PAIRS if K == 17 else ([(0, K - 1)] if K > 1 else [])
    index = flip_index_from_pairs(pairs, K)
    x, xf = _layout(hm.to(dev), layout), _layout(fl.to(dev), layout)
    if hm.numel():
        reasons = _backends.not_supported_reasons("flip_merge", backend, dev, x, xf, index, shift)
        if reasons:
            raise Skip("; ".join(reasons))
    with _on(backend):
        out = flip_merge(x, xf, pairs, shift)
    m = Mismatch()
    m.exact("merged", _cpu(out), flip_merge_reference(hm, fl, index, shift))
    return m


# --------------------------------------------------------------------------- MIMB
def _mimb_case(B, C, H, W, r, N=2, *, seed=0):
    """Float32 inputs with realistic magnitudes (tests/test_mimb.py's make_case)."""
    g = torch.Generator().manual_seed(seed)
    Cr = max(C // r, 1)
    x = torch.randn(B, C, H, W, generator=g) + 2 * torch.randn(1, C, 1, 1, generator=g)
    return dict(
        x=x,
        w1=torch.randn(Cr, C, generator=g) / math.sqrt(C),
        w2=2 * torch.randn(C, Cr, generator=g) / math.sqrt(Cr),
        v=0.1 + 0.8 * torch.rand(B, C, generator=g),
        lam=F.one_hot(torch.randint(0, N, (B,), generator=g), N).float(),
        e1=torch.randn(Cr, N, generator=g),
        b1=0.5 * torch.randn(Cr, generator=g),
        e2=2 * torch.randn(C, Cr, generator=g) / math.sqrt(Cr),
        b2=0.5 * torch.randn(C, generator=g),
        table=0.1 + 0.8 * torch.rand(N, C, generator=g),
    )


_MIMB_ARGS = {
    "mimb_scale": ("x", "w1", "w2", "v"),
    "mimb": ("x", "lam", "w1", "w2", "e1", "b1", "e2", "b2"),
    "mimb_instances": ("x", "w1", "w2", "table"),
}


def _mimb_run(op: str, backend: str, args: list, dy, layout: str, grad: bool):
    """The public op on ``backend`` (``args`` already on the device) -> (y, grads of every arg, x as passed)."""
    import mipnet_kernels as mk

    fn = getattr(mk, op)
    leaves = [a.detach().clone().requires_grad_(grad) for a in args]
    leaves[0] = _layout(leaves[0].detach(), layout).requires_grad_(grad)
    with _on(backend):
        if grad:
            y = fn(*leaves)
            y.backward(_layout(dy.to(y.device), layout))
            return y.detach(), [t.grad for t in leaves], leaves[0]
        with torch.no_grad():
            return fn(*leaves), [], leaves[0]


def check_mimb(op: str, backend, dev, shape, dtype, layout, grad: bool, kind: str = "random", *,
               x: Optional[torch.Tensor] = None) -> Mismatch:
    """A MIMB op on ``backend`` against the reference (flash-attention's rule); ``x``: an
    explicit (CPU) input in place of the case's, which then must match ``shape`` and holds
    any values (the NaN pattern must then be the reference's).  ``kind``: "random",
    "nonfinite" (a NaN and an inf in ``x``) or "rows" (``mimb_instances`` with one table row
    per output sample, ``[N, B, C]``)."""
    c = _mimb_case(*shape, seed=_seed(op, shape))
    names = _MIMB_ARGS[op]
    vals = [c[k].to(dtype) for k in names]  # a .half() model: everything in x's dtype
    if x is not None:
        vals[0] = x.to(dtype)
        kind = "nonfinite" if not bool(torch.isfinite(x).all()) else kind
    if kind == "rows":  # mimb_instances with a per-sample table [N, B, C] (training)
        B, C = vals[0].shape[:2]
        vals[-1] = (0.1 + 0.8 * torch.rand(vals[-1].shape[0], B, C, generator=_gen("rows", op, shape))).to(dtype)
    if kind == "nonfinite" and x is None:
        vals[0] = vals[0].clone()
        vals[0][0, 0, 0, 0] = math.nan
        if vals[0].shape[0] > 1:
            vals[0][1, -1, -1, -1] = math.inf
    y_shape = vals[0].shape if op != "mimb_instances" else (vals[-1].shape[0] * vals[0].shape[0], *vals[0].shape[1:])
    dy = torch.randn(y_shape, generator=_gen("dy", op, shape)).to(dtype) if grad else None
    y, grads, x_in = _mimb_run(op, backend, [v.to(dev) for v in vals], dy, layout, grad)
    m = Mismatch()
    if tuple(y.shape) != tuple(y_shape) or y.dtype != dtype or y.device.type != dev.type:
        m.fail("y", f"shape {tuple(y.shape)} dtype {y.dtype} on {y.device}")
        return m
    from ..ops.mimb import out_memory_format

    fmt = out_memory_format(x_in)
    if not y.is_contiguous(memory_format=fmt) or (grad and not grads[0].is_contiguous(memory_format=fmt)):
        m.fail("y", f"y / dx must have x's memory format ({fmt})")
    # Yardsticks, on CPU: the reference backend in float64 (truth) and in the test dtype (eager).
    truth, truth_g, _ = _mimb_run(op, "reference", [v.double() for v in vals], None if dy is None else dy.double(), "contiguous", grad)
    eager, eager_g, _ = _mimb_run(op, "reference", vals, dy, "contiguous", grad)
    _flash(m, "y", _cpu(y), eager, truth, dtype)
    if kind == "nonfinite":  # gradients through inf / NaN depend on the order of the products
        return m
    for name, got, e, t in zip(names, grads, eager_g, truth_g):
        if got is None:
            m.fail(f"d{name}", "no gradient")
            continue
        if got.dtype != vals[names.index(name)].dtype:
            m.fail(f"d{name}", f"dtype {got.dtype}")
        _flash(m, f"d{name}", _cpu(got), e, t, dtype)
    return m


def _flash(m: Mismatch, what: str, out, eager, truth, dtype) -> None:
    """Flash-attention's rule against the float64 truth where the reference in the test
    dtype (float32 arithmetic, ``eager``) is finite; its NaN and +-inf elements must be
    matched exactly -- the ops' non-finite semantics are float32 IEEE arithmetic as the
    reference computes it (a squeeze of 3e38 + 3e38 overflows there, not in float64)."""
    nan_e, nan_o = torch.isnan(eager), torch.isnan(out)
    if not torch.equal(nan_e, nan_o):
        m.fail(what, f"NaN pattern differs from the reference ({int(nan_o.sum())} NaN, expected {int(nan_e.sum())})")
        return
    inf_e = torch.isinf(eager)
    if not torch.equal(out[inf_e].double(), eager[inf_e].double()):
        m.fail(what, "infinite values differ from the reference")
        return
    keep = torch.isfinite(eager) & torch.isfinite(truth)
    if not bool(keep.any()):
        return
    err, bound = _numerics.flash_bound(out[keep], eager[keep], truth[keep], dtype)
    m.add(what, err, bound)


GROUPED_BRANCHES = {  # HRNet-like branches (C, H, W), tiny and with C > 256
    "small": [(2, 8, 6, 5), (2, 16, 3, 3), (2, 32, 2, 1)],
    "full": [(2, 32, 16, 12), (2, 64, 8, 6), (2, 128, 4, 3), (2, 384, 2, 2)],
}


def check_grouped(op: str, backend, dev, branches, dtype, layout, grad: bool) -> Mismatch:
    import mipnet_kernels as mk

    cases = [_mimb_case(*s, 4 if s[1] >= 4 else 1, seed=_seed(op, s, i)) for i, s in enumerate(branches)]
    last = "v" if op == "mimb_scale_grouped" else "table"
    lists = {k: [c[k].to(dtype) for c in cases] for k in ("x", "w1", "w2", last)}
    fn = getattr(mk, op)
    dys = [torch.randn(x.shape if op == "mimb_scale_grouped" else (2 * x.shape[0], *x.shape[1:]),
                       generator=_gen("dyg", i)).to(dtype) for i, x in enumerate(lists["x"])]

    def run(backend_, dev_, d, lay):
        ls = {k: [t.detach().to(d).clone().requires_grad_(grad) for t in v] for k, v in lists.items()}
        ls["x"] = [_layout(t.detach(), lay).requires_grad_(grad) for t in ls["x"]]
        with _on(backend_):
            if grad:
                ys = fn(ls["x"], ls["w1"], ls["w2"], ls[last])
                torch.autograd.backward(ys, [dy.to(device=dev_, dtype=d) for dy in dys])
                grads = {k: [t.grad for t in v] for k, v in ls.items()}
                return [y.detach() for y in ys], grads
            with torch.no_grad():
                return fn(ls["x"], ls["w1"], ls["w2"], ls[last]), {}

    ys, grads = run(backend, dev, dtype, layout)
    truth, truth_g = run("reference", torch.device("cpu"), F64, "contiguous")
    eager, eager_g = run("reference", torch.device("cpu"), dtype, "contiguous")
    m = Mismatch()
    for i in range(len(branches)):
        _flash(m, f"y[{i}]", _cpu(ys[i]), eager[i], truth[i], dtype)
        for k in grads:
            _flash(m, f"d{k}[{i}]", _cpu(grads[k][i]), eager_g[k][i], truth_g[k][i], dtype)
    return m


# --------------------------------------------------------------------------- NMS
def clustered_candidates(sizes, K: int, seed: int, *, ties: bool = False) -> dict:
    """Crowds of jittered poses per image (OKS spans 0..1), rows shuffled across images; float32
    values held in float64 tensors (tests/test_nms.py's generator, in torch)."""
    g = torch.Generator().manual_seed(seed)
    u = lambda *s, lo=0.0, hi=1.0: lo + (hi - lo) * torch.rand(*s, generator=g, dtype=F64)
    kps, areas, images = [], [], []
    for img, n in enumerate(sizes):
        people = max(1, math.ceil(n / int(torch.randint(2, 9, (1,), generator=g))))
        centre = torch.stack([u(people, hi=640), u(people, hi=480)], -1)
        side = u(people, lo=30, hi=200)
        base = centre[:, None, :] + side[:, None, None] * 0.3 * torch.randn(people, K, 2, generator=g, dtype=F64)
        who = torch.randint(0, people, (n,), generator=g)
        jitter = side[who] * u(n, hi=0.15)
        xy = base[who] + jitter[:, None, None] * torch.randn(n, K, 2, generator=g, dtype=F64)
        kps.append(torch.cat([xy, u(n, K, 1)], 2))
        areas.append(side[who] ** 2 * u(n, lo=0.8, hi=1.2))
        images.append(torch.full((n,), img, dtype=torch.int64))
    M = sum(sizes)
    if ties:
        scores = torch.randint(0, 5, (M,), generator=g).double() / 4
    else:
        scores = (torch.randperm(M, generator=g).double() + 0.5) / max(M, 1)
    perm = torch.randperm(M, generator=g)
    f32 = lambda t: t[perm].float().double()
    return {
        "keypoints": f32(torch.cat(kps)) if M else torch.zeros(0, K, 3, dtype=F64),
        "scores": f32(scores),
        "areas": f32(torch.cat(areas)) if M else torch.zeros(0, dtype=F64),
        "batch_idx": torch.cat(images)[perm] if M else torch.zeros(0, dtype=torch.int64),
    }


def _sigmas(K: int):
    if K in (14, 17):
        return None
    return torch.linspace(0.025, 0.107, K, dtype=F64).tolist()


def drop_near_threshold(data: dict, K: int, thr: float, vis, near: float = 1e-5) -> dict:
    """Remove one candidate of every same-image pair whose float64 OKS is within ``near`` of the
    threshold: then float32 arithmetic must give exactly the float64 decisions."""
    from .. import oks_iou

    kp, ar, b = data["keypoints"], data["areas"], data["batch_idx"]
    drop = torch.zeros_like(b, dtype=torch.bool)
    for img in torch.unique(b).tolist():
        rows = (b == img).nonzero().squeeze(1)
        with _on("reference"):
            oks = oks_iou(kp[rows], ar[rows], kp[rows], ar[rows], _sigmas(K), vis)
        close = torch.triu((oks - thr).abs() < near, diagonal=1)
        drop[rows[close.any(dim=0)]] = True
    return {k: v[~drop] for k, v in data.items()}


def threshold_rounding_case() -> dict:
    """Two poses in one image whose float64 OKS lies between float32(0.9) = 0.89999998 and 0.9:
    kept both at threshold 0.9 in float64; a kernel that rounds the threshold to float32
    suppresses one (issue 14, defect 2)."""
    from ..ops.nms import OKS_EPS

    K = 17
    sig = torch.tensor(COCO_SIGMAS, dtype=F64)
    var = (2 * sig) ** 2
    area = 10000.0
    base = torch.stack([torch.linspace(100, 200, K, dtype=F64), torch.linspace(150, 300, K, dtype=F64)], -1)

    def oks(d):
        return float(torch.exp(-(d * d) / var / (area + OKS_EPS) / 2).mean())

    target = 0.9 - 1e-9  # float32(0.9) = 0.8999999761581421
    lo, hi = 0.0, 100.0  # oks(lo) = 1 > target > oks(hi)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if oks(mid) > target else (lo, mid)
    d = hi
    kp = torch.zeros(2, K, 3, dtype=F64)
    kp[0, :, :2] = base
    kp[1, :, :2] = base
    kp[1, :, 0] += d
    kp[:, :, 2] = 1.0
    return {"keypoints": kp, "scores": torch.tensor([0.9, 0.8], dtype=F64),
            "areas": torch.full((2,), area, dtype=F64), "batch_idx": torch.zeros(2, dtype=torch.int64)}


def _nms_data(kind: str, K: int, thr: float, vis, small: bool) -> dict:
    sizes = [1, 3, 7, 12] if small else [1, 1, 4, 9, 17, 25, 40, 3, 60, 120, 2]
    if kind == "empty":
        return clustered_candidates([], K, seed=1)
    if kind == "thr-rounding":
        return threshold_rounding_case()
    data = clustered_candidates(sizes, K, seed=_seed("nms", K, thr, small, kind), ties=kind == "ties")
    return drop_near_threshold(data, K, thr, vis)


def _require_nms(backend, dev, soft: bool) -> None:
    op = "soft_oks_nms_sorted" if soft else "oks_nms_sorted"
    reasons = _backends.not_supported_reasons(op, backend, dev)
    if reasons:
        raise Skip("; ".join(reasons))


def check_nms(op: str, backend, dev, kind: str, K: int, thr: float, vis, dtype, small: bool,
              method: str = "gaussian", max_dets=20, *, data: Optional[dict] = None) -> Mismatch:
    """An NMS op on ``backend`` against the reference (same picks, scores within rounding);
    ``data``: explicit candidates (``keypoints``, ``scores``, ``areas``, ``batch_idx``)
    instead of the battery's ``kind`` -- keep them clear of the threshold
    (:func:`drop_near_threshold`): a pair at the threshold may flip with OKS rounding."""
    import mipnet_kernels as mk

    soft = op.startswith("soft")
    _require_nms(backend, dev, soft)
    data = _nms_data(kind, K, thr, vis, small) if data is None else data
    num_images = int(data["batch_idx"].max()) + 2 if data["batch_idx"].numel() else 2
    sig = _sigmas(K)

    def run(backend_, d):
        x = {k: (v.to(d, dtype) if v.is_floating_point() else v.to(d)) for k, v in data.items()}
        args = (x["keypoints"], x["scores"], x["areas"], x["batch_idx"])
        with _on(backend_):
            if op == "oks_nms":
                return (mk.oks_nms(*args, sig, thr, vis),)
            if op == "oks_nms_mask":
                return mk.oks_nms_mask(*args, num_images, sig, thr, vis, validate=False)
            if op == "soft_oks_nms":
                return mk.soft_oks_nms(*args, sig, method, thr, vis, 0.0, max_dets)
            return mk.soft_oks_nms_mask(*args, num_images, sig, method, thr, vis, 0.0, max_dets, validate=False)

    got = [_cpu(t) for t in run(backend, dev)]
    want = list(run("reference", torch.device("cpu")))
    m = Mismatch()
    if op in ("oks_nms", "soft_oks_nms"):
        m.exact("keep", got[0], want[0])
    else:
        m.exact("mask" if op == "oks_nms_mask" else "rank", got[0], want[0])
        m.exact("counts", got[-1], want[-1])
    if soft:
        new, ref = got[1], want[1]
        if new.dtype != ref.dtype or new.shape != ref.shape:
            m.fail("new_scores", f"{new.dtype} {tuple(new.shape)} != {ref.dtype} {tuple(ref.shape)}")
        else:
            rtol, atol = (1e-12, 0.0) if dtype == F64 else (1e-5, 1e-6)
            fin = torch.isfinite(ref)
            if not torch.equal(new[~fin].double(), ref[~fin].double()):  # +-inf (NaN never)
                m.fail("new_scores", "non-finite scores differ from the reference")
            err = (new.double() - ref.double()).abs()
            _worst(m, "new_scores", err, atol + rtol * ref.double().abs(), fin)
    return m


def check_oks_iou(dev, K: int, vis, dtype) -> Mismatch:
    import mipnet_kernels as mk

    data = clustered_candidates([12, 9], K, seed=K)
    kp, ar = data["keypoints"], data["areas"]
    truth = mk.oks_iou(kp[:12], ar[:12], kp, ar, _sigmas(K), vis)
    got = _cpu(mk.oks_iou(kp[:12].to(dev, dtype), ar[:12].to(dev, dtype), kp.to(dev, dtype), ar.to(dev, dtype), _sigmas(K), vis))
    m = Mismatch()
    want_dtype = F64 if dtype == F64 else F32
    if got.dtype != want_dtype or got.shape != truth.shape:
        m.fail("oks", f"{got.dtype} {tuple(got.shape)}")
        return m
    err = (got.double() - truth).abs()
    bound = torch.full_like(err, 2e-6 if dtype != F64 else 0.0) + (1e-12 * truth.abs() if dtype == F64 else 0)
    _worst(m, "oks", err, bound, torch.ones_like(err, dtype=torch.bool))
    return m
