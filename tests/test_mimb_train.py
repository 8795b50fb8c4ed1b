"""The fused MIMB training step (``mipnet_kernels.ops.mimb.mimb_train``; ``MIMB`` in training mode).

``tests/test_nn.py::test_train_mode_matches_official`` checks the module's training step
(now this fused op wherever it may run) against the official layer on every backend with
flash-attention's error rule.  Here: that the fused path really runs (and where it must
not), the function's own contract (dtypes, BatchNorm variants, momentum, the running
statistics, gradcheck in float64), the backward staying on the forward's backend,
thread-count determinism of the C++ kernels and bad input.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mipnet_kernels as mk
from mipnet_kernels import _backends
from mipnet_kernels.nn import MIMB
from mipnet_kernels.ops.mimb import mimb_train
from utils import (
    backend_device_params,
    flash,
    make_pair,
    make_x,
    named_grads,
    require_backend,
    run_official64,
    skip_unless_runs,
)


def _cpu_kernel_or_skip():
    why = _backends.backend_unavailable_reason("cpu")
    if why is not None:
        pytest.skip(f"cpu backend unavailable: {why}")
    if not hasattr(torch.ops.mipnet_cpu, "mimb_train_fwd"):
        pytest.skip("torch.ops.mipnet_cpu.mimb_train_fwd is not built")


def _labels(fn) -> set[str]:
    """The ``mipnet::`` profiler ranges recorded while ``fn()`` runs."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events() if e.name.startswith("mipnet::")}


def _step(m, x, lam, dy):
    x = x.detach().clone().requires_grad_(True)
    m.zero_grad(set_to_none=True)
    y = m(x, lam)
    y.backward(dy)
    return y, x.grad


def _weights(C=16, N=2, K=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)

    def r(*s, scale=0.5):
        return (scale * torch.randn(*s, generator=g)).to(dtype)

    return dict(w1=r(K, C), w2=r(C, K), e1=r(K, N), b1=r(K), gamma=1 + r(K), beta=r(K),
                e2=r(C, K), b2=r(C))


# --------------------------------------------------------------------------- which path runs
def test_module_training_step_runs_the_fused_kernels():
    _cpu_kernel_or_skip()
    ours, _ = make_pair(32, seed=3)
    ours.train()
    x, lam, dy = make_x(4, 32, 5, 4), torch.tensor([0, 1, 1, 0]), torch.randn(4, 32, 5, 4)
    labels = _labels(lambda: _step(ours, x, lam, dy))
    assert {"mipnet::mimb_train_fwd[cpu]", "mipnet::mimb_train_bwd[cpu]"} <= labels, labels
    assert not any("mimb_scale" in n for n in labels), labels


class _CountingBN(nn.BatchNorm1d):
    """A BatchNorm1d subclass (as SyncBatchNorm is): must not be replaced by the fused math."""

    calls = 0

    def forward(self, x):
        type(self).calls += 1
        return super().forward(x)


def _hooked(m):
    seen = []
    m.fc_lambda[1].register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    return seen


FALLBACKS = {
    "bn-subclass": lambda m: setattr(m.fc_lambda, "1", _CountingBN(m.hidden)),
    "forward-hook": _hooked,
    "bn-eval-in-train": lambda m: m.fc_lambda[1].eval(),
    "bn-no-affine": lambda m: setattr(m.fc_lambda, "1", nn.BatchNorm1d(m.hidden, affine=False)),
    "bn-no-running-stats": lambda m: setattr(
        m.fc_lambda, "1", nn.BatchNorm1d(m.hidden, track_running_stats=False)),
    "activation-replaced": lambda m: setattr(m.fc_lambda, "2", nn.GELU()),
}


@pytest.mark.parametrize("case", list(FALLBACKS))
def test_module_falls_back_to_its_modules_where_fusing_would_change_them(case):
    _cpu_kernel_or_skip()
    ours, _ = make_pair(16, seed=5)
    ours.train()
    seen = FALLBACKS[case](ours)  # the forward hook's list of calls, else None
    ref = copy.deepcopy(ours)  # run through the plain modules by hand below
    if case == "forward-hook":
        ref.fc_lambda[1]._forward_hooks.clear()
    x, lam, dy = make_x(4, 16, 3, 3), torch.tensor([0, 1, 0, 1]), torch.randn(4, 16, 3, 3)
    before = _CountingBN.calls
    out = []
    labels = _labels(lambda: out.append(_step(ours, x, lam, dy)[0]))
    assert not any("mimb_train" in n for n in labels), labels
    assert "mipnet::mimb_scale_fwd[cpu]" in labels, labels
    if case == "bn-subclass":
        assert _CountingBN.calls == before + 1
    if case == "forward-hook":  # the module ran, so its hook fired
        assert len(seen) == 1
    # The module path is exactly the modules + mimb_scale.
    v = ref.fc_lambda(F.one_hot(lam, 2).float())
    want = mk.mimb_scale(x, ref.w1, ref.w2, v)
    torch.testing.assert_close(out[0], want)


def test_module_batch_of_one_raises_like_batchnorm():
    ours, off = make_pair(16, seed=7)
    ours.train()
    off.train()
    x = make_x(1, 16, 3, 3)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        off(x, F.one_hot(torch.tensor([0]), 2).float())
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        ours(x, torch.tensor([0]))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_module_autocast_runs_the_fused_step_in_float32(backend):
    """Under CPU bf16 autocast (x in bf16, as a convolution under autocast returns it) the
    fused step runs with autocast off: the embedding in float32, y / dx in bf16, float32
    weight gradients -- at least as accurate as the official modules under autocast."""
    if backend == "cpu":
        _cpu_kernel_or_skip()
    ours, off = make_pair(32, seed=9)
    ours.train()
    off.train()
    x = make_x(4, 32, 6, 5).bfloat16()
    lam = torch.tensor([0, 1, 1, 0])
    onehot = F.one_hot(lam, 2).float()
    dy = torch.randn(x.shape).bfloat16()
    y64, dx64, _, g64 = run_official64(off, x.float(), onehot, dy.float())
    off_amp = copy.deepcopy(off)
    xo, xf = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16), mk.use_backend(backend):
        labels = _labels(lambda: ours(xo, lam).backward(dy))
        y = ours(x, lam)
        want = off_amp(xf, onehot)
    want.backward(dy)
    assert f"mipnet::mimb_train_fwd[{backend}]" in labels, labels
    assert y.dtype == torch.bfloat16 and xo.grad.dtype == torch.bfloat16
    flash(y, want, y64, "y under autocast")
    flash(xo.grad, xf.grad, dx64, "dx under autocast")
    go, gf = named_grads(ours), named_grads(off_amp)
    for name in gf:
        assert go[name].dtype == torch.float32
        flash(go[name], gf[name], g64[name], f"d {name} under autocast")


# --------------------------------------------------------------------------- the function
@pytest.mark.parametrize("backend, device", backend_device_params())
@pytest.mark.parametrize("momentum", [0.1, None, 0.0])
@pytest.mark.parametrize("embed_norm", [True, False])
def test_module_three_steps_statistics_and_gradients(backend, device, momentum, embed_norm):
    dev = require_backend(backend, device)
    ours, off = make_pair(24, 3, 4, embed_norm, seed=11)
    if embed_norm:
        ours.fc_lambda[1].momentum = off.fc_lambda[1].momentum = momentum
    ours.to(dev).train()
    off.train()
    for step in range(3):
        x = make_x(5, 24, 4, 3, seed=step)
        lam = torch.softmax(torch.randn(5, 3, generator=torch.Generator().manual_seed(step)), 1)
        dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(20 + step))
        xo = x.clone().to(dev).requires_grad_(True)
        lo = lam.clone().to(dev).requires_grad_(True)
        xf, lf = x.clone().requires_grad_(True), lam.clone().requires_grad_(True)
        ours.zero_grad()
        off.zero_grad()
        with mk.use_backend(backend):
            y = ours(xo, lo)
            y.backward(dy.to(dev))
        y64, dx64, dlam64, g64 = run_official64(off, xf, lf, dy)
        want = off(xf, lf)
        want.backward(dy)
        flash(y, want, y64, "y")
        flash(xo.grad, xf.grad, dx64, "dx")
        flash(lo.grad, lf.grad, dlam64, "dlam")
        go = named_grads(ours)
        for name, gf in named_grads(off).items():
            flash(go[name], gf, g64[name], f"d {name}")
        for (name, bo), (_, bf) in zip(ours.named_buffers(), off.named_buffers()):
            torch.testing.assert_close(bo.cpu(), bf, msg=lambda m, n=name: f"step {step} {n}: {m}")


@pytest.mark.parametrize("xdtype", [torch.float16, torch.bfloat16])
def test_low_precision_x_float32_weights(xdtype):
    """x in float16 / bfloat16 with float32 weights (a mixed model): the output and dx come
    back in x's dtype; compared with the float64 official layer on the rounded input."""
    _cpu_kernel_or_skip()
    ours, off = make_pair(32, seed=13)
    ours.train()
    off.train()
    x = make_x(4, 32, 6, 5).to(xdtype)
    lam = F.one_hot(torch.tensor([0, 1, 1, 0]), 2).float()
    dy = torch.randn(x.shape).to(xdtype)
    xo = x.clone().requires_grad_(True)
    y = ours(xo, lam)
    y.backward(dy)
    assert y.dtype == xdtype and xo.grad.dtype == xdtype
    y64, dx64, _, g64 = run_official64(off, x.float(), lam, dy.float())
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[xdtype]
    y64, dx64 = y64.detach(), dx64.detach()
    scale = float(y64.abs().max())
    assert float((y.double() - y64).abs().max()) <= tol * scale
    assert float((xo.grad.double() - dx64).abs().max()) <= tol * float(dx64.abs().max()) + 1e-3
    for name, g in named_grads(ours).items():
        assert g.dtype == torch.float32
        ref = g64[name]
        assert float((g.double() - ref).abs().max()) <= 4 * tol * max(float(ref.abs().max()), 1.0), name


def test_bfloat16_module_runs_and_uses_the_reference_for_bf16_statistics():
    """A module in bfloat16 (running statistics too): the cpu kernel declines the bfloat16
    running statistics (it updates float32 ones), the automatic choice runs the composite."""
    _cpu_kernel_or_skip()
    ours, off = make_pair(16, seed=15)
    ours.to(torch.bfloat16).train()
    off.train()
    x = make_x(4, 16, 3, 3)
    lam = torch.tensor([0, 1, 0, 1])
    labels = _labels(lambda: _step(ours, x.bfloat16(), lam, torch.ones(4, 16, 3, 3, dtype=torch.bfloat16)))
    assert "mipnet::mimb_train_fwd[reference]" in labels, labels
    with mk.use_backend("cpu"), pytest.raises(RuntimeError, match="running_mean is torch.bfloat16"):
        ours(x.bfloat16(), lam)
    want = off(x, F.one_hot(lam, 2).float())
    got = ours(x.bfloat16(), lam)
    assert float((got.float() - want).abs().max()) <= 0.05 * float(want.abs().max())


@pytest.mark.parametrize("backend, device", backend_device_params())
@pytest.mark.parametrize("batch_norm", [True, False])
def test_gradcheck_float64(backend, device, batch_norm):
    dev = skip_unless_runs(backend, device)
    if backend == "cpu":
        pytest.skip("the C++ kernels take float32 / float16 / bfloat16 (float64: reference, triton)")
    w = {k: v.double().to(dev) for k, v in _weights(C=4, N=2, K=2, seed=1).items()}
    x = make_x(3, 4, 2, 3).double().to(dev)
    lam = torch.softmax(torch.randn(3, 2), 1).double().to(dev)
    gamma, beta = (w["gamma"], w["beta"]) if batch_norm else (None, None)
    inputs = [t.clone().requires_grad_(True) for t in (x, lam, w["w1"], w["w2"], w["e1"], w["b1"], w["e2"], w["b2"])]
    if batch_norm:
        inputs += [gamma.clone().requires_grad_(True), beta.clone().requires_grad_(True)]

    def fn(x, lam, w1, w2, e1, b1, e2, b2, *gb):
        g, b = gb if gb else (None, None)
        with mk.use_backend(backend):
            return mimb_train(x, lam, w1, w2, e1, b1, g, b, e2, b2)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_backward_runs_on_the_forward_backend():
    _cpu_kernel_or_skip()
    w = _weights(seed=2)
    x = make_x(4, 16, 3, 3).requires_grad_(True)
    lam = F.one_hot(torch.tensor([0, 1, 1, 0]), 2).float()
    with mk.use_backend("reference"):
        y = mimb_train(x, lam, w["w1"], w["w2"], w["e1"], w["b1"], w["gamma"], w["beta"], w["e2"], w["b2"])
    with mk.use_backend("cpu"):  # the thread's choice now differs: the forward's backend wins
        labels = _labels(lambda: y.sum().backward())
    assert "mipnet::mimb_train_bwd[reference]" in labels, labels


@pytest.mark.parametrize("batch_norm", [True, False])
def test_one_state_layout_on_every_backend(batch_norm):
    """The saved state has one layout: the cpu kernel's backward reads the reference's state
    and the reference's backward the cpu kernel's, with the gradients of the same backend."""
    _cpu_kernel_or_skip()
    w = _weights(seed=2)
    x = make_x(4, 16, 3, 3)
    lam = torch.softmax(torch.randn(4, 2, generator=torch.Generator().manual_seed(3)), 1)
    gamma, beta = (w["gamma"], w["beta"]) if batch_norm else (torch.empty(0), torch.empty(0))
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    states, grads = {}, {}
    for b in ("cpu", "reference"):
        y, states[b] = _backends.dispatch_on(
            b, "mimb_train_fwd", x.device, x, lam, w["w1"], w["w2"], w["e1"], w["b1"], gamma, beta,
            w["e2"], w["b2"], torch.zeros(4), torch.ones(4), 0.1, 1e-5, batch_norm)
        assert states[b].shape == states["cpu"].shape and states[b].dtype == torch.float32
    for b in ("cpu", "reference"):
        for sb in ("cpu", "reference"):
            grads[b, sb] = _backends.dispatch_on(
                b, "mimb_train_bwd", x.device, dy, x, lam, w["w1"], w["w2"], w["e1"], gamma, beta,
                w["e2"], states[sb], batch_norm)
    for b in ("cpu", "reference"):
        for g_own, g_other in zip(grads[b, b], grads[b, "cpu" if b == "reference" else "reference"]):
            torch.testing.assert_close(g_other, g_own, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cpu_kernels_bit_identical_for_any_thread_count(layout):
    _cpu_kernel_or_skip()
    w = _weights(C=64, K=16, seed=4)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = make_x(6, 64, 17, 13).contiguous(memory_format=fmt)
    lam = torch.softmax(torch.randn(6, 2), 1)
    dy = torch.randn(x.shape).contiguous(memory_format=fmt)
    outs = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            rm, rv = torch.zeros(16), torch.ones(16)
            y, state = torch.ops.mipnet_cpu.mimb_train_fwd(
                x, lam, w["w1"], w["w2"], w["e1"], w["b1"], w["gamma"], w["beta"], w["e2"], w["b2"],
                rm, rv, 0.1, 1e-5, True)
            grads = torch.ops.mipnet_cpu.mimb_train_bwd(
                dy, x, lam, w["w1"], w["w2"], w["e1"], w["gamma"], w["beta"], w["e2"], state, True)
            outs.append((y, state, rm, rv, *grads))
    finally:
        torch.set_num_threads(threads)
    assert outs[0][0].is_contiguous(memory_format=fmt) and outs[0][4].is_contiguous(memory_format=fmt)
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)


def test_running_statistics_update_matches_batchnorm():
    _cpu_kernel_or_skip()
    w = _weights(C=8, K=6, seed=6)
    bn = nn.BatchNorm1d(6, momentum=0.3)
    with torch.no_grad():
        bn.weight.copy_(w["gamma"])
        bn.bias.copy_(w["beta"])
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    lam = torch.softmax(torch.randn(7, 2), 1)
    mimb_train(make_x(7, 8, 2, 2), lam, w["w1"], w["w2"], w["e1"], w["b1"], w["gamma"], w["beta"],
               w["e2"], w["b2"], rm, rv, momentum=0.3, eps=bn.eps)
    bn(lam @ w["e1"].T + w["b1"])
    torch.testing.assert_close(rm, bn.running_mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(rv, bn.running_var, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- bad input
def _args(**over):
    w = _weights(seed=8)
    a = dict(x=make_x(4, 16, 3, 3), lam=torch.rand(4, 2), w1=w["w1"], w2=w["w2"], e1=w["e1"], b1=w["b1"],
             gamma=w["gamma"], beta=w["beta"], e2=w["e2"], b2=w["b2"])
    a.update(over)
    return a


BAD = [
    ("gamma-only", dict(beta=None), ValueError, "gamma and beta must both be tensors"),
    ("running-mean-only", dict(running_mean=torch.zeros(4)), ValueError,
     "running_mean and running_var must both be tensors"),
    ("gamma-shape", dict(gamma=torch.ones(5)), ValueError, r"gamma must be a float tensor \[K\] = \[4\]"),
    ("running-shape", dict(running_mean=torch.zeros(3), running_var=torch.ones(3)), ValueError,
     r"running_mean must be a float tensor \[K\] = \[4\]"),
    ("batch-of-one", dict(x=make_x(1, 16, 3, 3), lam=torch.rand(1, 2)), ValueError,
     r"more than 1 sample per batch .* x.shape\[0\] = 1"),
    ("lam-shape", dict(lam=torch.rand(4, 3)), ValueError, r"e1 must have shape \[K, N\]"),
    ("x-3d", dict(x=torch.rand(4, 16, 3)), ValueError, r"x must be 4-D"),
    ("w1-channels", dict(w1=torch.rand(4, 15)), ValueError, r"w1 must have shape \[C/r, C\]"),
    ("int-x", dict(x=torch.ones(4, 16, 3, 3, dtype=torch.int32)), ValueError, r"x must be float32"),
]


@pytest.mark.parametrize("name, over, exc, match", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_named(name, over, exc, match):
    with pytest.raises(exc, match=match):
        mimb_train(**_args(**over))


def test_cpu_op_refuses_a_foreign_state():
    _cpu_kernel_or_skip()
    a = _args()
    with pytest.raises(RuntimeError, match="state must be the forward's float32 state"):
        torch.ops.mipnet_cpu.mimb_train_bwd(torch.ones(4, 16, 3, 3), a["x"], a["lam"], a["w1"], a["w2"], a["e1"],
                                            a["gamma"], a["beta"], a["e2"], torch.zeros(7), True)


def test_double_backward_is_refused_not_silently_wrong():
    _cpu_kernel_or_skip()
    ours, _ = make_pair(16, seed=17)
    ours.train()
    x = make_x(4, 16, 3, 3).requires_grad_(True)
    y = ours(x, torch.tensor([0, 1, 0, 1]))
    (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gx.sum().backward()


@pytest.mark.parametrize("backend, device", backend_device_params())
@pytest.mark.parametrize("shape", [(0, 8, 3, 3), (3, 0, 3, 3)])
def test_empty_without_batchnorm(backend, device, shape):
    """Empty batches / channels (no BatchNorm: it needs B > 1): empty outputs, zero weight
    gradients, on every backend."""
    dev = skip_unless_runs(backend, device)
    B, C = shape[:2]
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(*s, generator=g).to(dev).requires_grad_(True)
          for s in ((2, C), (C, 2), (2, 2), (2,), (C, 2), (C,))]
    x = torch.randn(shape, generator=g).to(dev).requires_grad_(True)
    lam = torch.rand(B, 2, generator=g).to(dev)
    w1, w2, e1, b1, e2, b2 = ws
    with mk.use_backend(backend):
        y = mimb_train(x, lam, w1, w2, e1, b1, None, None, e2, b2)
        y.sum().backward()
    assert y.shape == shape and x.grad.shape == shape
    for w in ws:
        assert w.grad is not None and w.grad.shape == w.shape and not w.grad.any()
