"""``mipnet.models``: HRNet / SimpleBaseline and their MIPNet versions, checkpoint loading.

* parameter counts against the paper's Table 2, MIMB placement;
* every parameter name and shape against an independent re-statement of the official
  modules (``pose_hrnet.py`` / ``pose_hrnet_se_lambda.py`` / ``pose_resnet_se_lambda.py``),
  so official checkpoints load without renaming;
* ``forward_instances`` against N separate ``forward(images, lam=n)`` calls (reference and
  cpu backends), selectors (indices, one-hot, soft), fp32 / bf16 autocast / channels_last,
  ``torch.compile``;
* ``forward_instances`` in training mode (the shared trunk) against the official step on
  the N-fold repeated batch: outputs, every parameter gradient, every BatchNorm statistic;
* ``load_checkpoint`` on official-style files (``module.`` prefixes, ``{"state_dict": ...}``,
  no ``num_batches_tracked``), baseline -> MIPNet, errors naming the keys;
* bad input.

Inputs are small (64x32, batch 1-2) to keep this CPU-cheap; the heavy archs (W48, ResNet-101/152)
are only built to count parameters.  Models under test get non-trivial weights: Kaiming convs,
default-initialised MIMB Linear layers, and BatchNorm statistics calibrated on one batch, so
activations are O(1) and the instances differ.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import mipnet_kernels as mk
from mipnet.models import (
    ARCHS,
    CheckpointMismatchError,
    build_model,
    extract_state_dict,
    load_checkpoint,
)
from mipnet_kernels import MIMB
from utils import skip_unless_runs

H, W = 64, 32  # multiples of 32 (the deepest stride), not square; heatmaps 16x8

# Relative tolerance (to max |expected|) where only fp32 summation order differs: different
# convolution algorithms (batch size, memory format) through ~100 layers of a random network.
FP32_RTOL = 2e-4

# Paper Table 2 (#Params, millions): baseline, MIPNet (N = 2).
PAPER_PARAMS_M = {
    "hrnet_w32": (28.5, 28.6),
    "hrnet_w48": (63.6, 63.7),
    "resnet50": (34.0, 35.0),
    "resnet101": (53.0, 54.0),
    "resnet152": (68.6, 69.6),
}


# --------------------------------------------------------------------------- helpers
def calibrated(arch: str, num_instances: int, num_keypoints: int = 17, seed: int = 0) -> nn.Module:
    """An eval-mode model with O(1) activations and distinct instances: Kaiming convs,
    default-initialised Linear layers, BatchNorm running statistics set to the statistics of
    one random batch (momentum None = cumulative average; one step = the batch's)."""
    torch.manual_seed(seed)
    model = build_model(arch, num_instances, num_keypoints)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, nn.Linear):
            m.reset_parameters()
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, H, W), torch.arange(4) % num_instances)
    return model.eval()


_models: dict = {}


def cached_model(arch: str, num_instances: int) -> nn.Module:
    key = (arch, num_instances)
    if key not in _models:
        _models[key] = calibrated(arch, num_instances)
    return _models[key]


def images(B: int = 2, seed: int = 1, h: int = H, w: int = W) -> torch.Tensor:
    return torch.randn(B, 3, h, w, generator=torch.Generator().manual_seed(seed))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------- official names, re-stated
def _conv(d, name, cout, cin, k, bias=False):
    d[f"{name}.weight"] = (cout, cin, k, k)
    if bias:
        d[f"{name}.bias"] = (cout,)


def _bn(d, name, c):
    for s in ("weight", "bias", "running_mean", "running_var"):
        d[f"{name}.{s}"] = (c,)
    d[f"{name}.num_batches_tracked"] = ()


def _bottleneck(d, p, inplanes, planes):
    _conv(d, f"{p}.conv1", planes, inplanes, 1); _bn(d, f"{p}.bn1", planes)
    _conv(d, f"{p}.conv2", planes, planes, 3); _bn(d, f"{p}.bn2", planes)
    _conv(d, f"{p}.conv3", 4 * planes, planes, 1); _bn(d, f"{p}.bn3", 4 * planes)
    if inplanes != 4 * planes or p.endswith(".0"):
        _conv(d, f"{p}.downsample.0", 4 * planes, inplanes, 1); _bn(d, f"{p}.downsample.1", 4 * planes)


def _se_lambda_layer(d, p, c, n):
    """The official SELambdaLayer's parameters (Linear(2, .) generalised to Linear(N, .))."""
    d[f"{p}.fc.0.weight"] = (c // 4, c)
    d[f"{p}.fc.2.weight"] = (c, c // 4)
    d[f"{p}.fc_lambda.0.weight"] = (c // 4, n)
    d[f"{p}.fc_lambda.0.bias"] = (c // 4,)
    _bn(d, f"{p}.fc_lambda.1", c // 4)
    d[f"{p}.fc_lambda.3.weight"] = (c, c // 4)
    d[f"{p}.fc_lambda.3.bias"] = (c,)


def official_hrnet_keys(width: int, num_keypoints: int, num_instances: int) -> dict:
    """name -> shape of the official pose_hrnet(_se_lambda) model, SE_MODULES [F, F, T, T]."""
    d: dict = {}
    C = [width, 2 * width, 4 * width, 8 * width]
    _conv(d, "conv1", 64, 3, 3); _bn(d, "bn1", 64)
    _conv(d, "conv2", 64, 64, 3); _bn(d, "bn2", 64)
    for b in range(4):
        _bottleneck(d, f"layer1.{b}", 64 if b == 0 else 256, 64)
    # transition1: branch 0 256 -> C (3x3), branch 1 a new stride-2 branch from 256
    _conv(d, "transition1.0.0", C[0], 256, 3); _bn(d, "transition1.0.1", C[0])
    _conv(d, "transition1.1.0.0", C[1], 256, 3); _bn(d, "transition1.1.0.1", C[1])
    # transition2 / 3: existing branches unchanged (None), one new branch from the last
    _conv(d, "transition2.2.0.0", C[2], C[1], 3); _bn(d, "transition2.2.0.1", C[2])
    _conv(d, "transition3.3.0.0", C[3], C[2], 3); _bn(d, "transition3.3.0.1", C[3])
    for stage, modules in ((2, 1), (3, 4), (4, 3)):
        for m in range(modules):
            p = f"stage{stage}.{m}"
            for i in range(stage):
                for blk in range(4):
                    q = f"{p}.branches.{i}.{blk}"
                    _conv(d, f"{q}.conv1", C[i], C[i], 3); _bn(d, f"{q}.bn1", C[i])
                    _conv(d, f"{q}.conv2", C[i], C[i], 3); _bn(d, f"{q}.bn2", C[i])
            outputs = 1 if (stage == 4 and m == modules - 1) else stage
            for i in range(outputs):
                for j in range(stage):
                    q = f"{p}.fuse_layers.{i}.{j}"
                    if j > i:
                        _conv(d, f"{q}.0", C[i], C[j], 1); _bn(d, f"{q}.1", C[i])
                    for k in range(i - j):
                        cout = C[i] if k == i - j - 1 else C[j]
                        _conv(d, f"{q}.{k}.0", cout, C[j], 3); _bn(d, f"{q}.{k}.1", cout)
    _conv(d, "final_layer", num_keypoints, C[0], 1, bias=True)
    if num_instances > 1:
        for i in range(4):
            _se_lambda_layer(d, f"stage3_se.se_layers.{i}", C[i], num_instances)
        _se_lambda_layer(d, "stage4_se.se_layers.0", C[0], num_instances)
    return d


def official_resnet_keys(depth: int, num_keypoints: int, num_instances: int) -> dict:
    """name -> shape of the official pose_resnet(_se_lambda) model, SE_MODULES [F, F, T, T]."""
    d: dict = {}
    layers = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}[depth]
    _conv(d, "conv1", 64, 3, 7); _bn(d, "bn1", 64)
    inplanes = 64
    for li, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
        for b in range(n):
            _bottleneck(d, f"layer{li + 1}.{b}", inplanes if b == 0 else 4 * planes, planes)
        inplanes = 4 * planes
    for i, cin in zip((0, 3, 6), (2048, 256, 256)):
        d[f"deconv_layers.{i}.weight"] = (cin, 256, 4, 4)  # ConvTranspose2d: [in, out, k, k]
        _bn(d, f"deconv_layers.{i + 1}", 256)
    _conv(d, "final_layer", num_keypoints, 256, 1, bias=True)
    if num_instances > 1:
        _se_lambda_layer(d, "layer3_se.se_layers.0", 512, num_instances)
        _se_lambda_layer(d, "layer4_se.se_layers.0", 1024, num_instances)
    return d


def official_keys(arch: str, num_keypoints: int, num_instances: int) -> dict:
    if arch.startswith("hrnet_w"):
        return official_hrnet_keys(int(arch[len("hrnet_w"):]), num_keypoints, num_instances)
    return official_resnet_keys(int(arch[len("resnet"):]), num_keypoints, num_instances)


# --------------------------------------------------------------------------- structure
@pytest.mark.parametrize("arch", list(ARCHS))
def test_parameter_counts_match_paper(arch):
    base, mip = build_model(arch, 1), build_model(arch, 2)
    n_base, n_mip = count(base), count(mip)
    paper_base, paper_mip = PAPER_PARAMS_M[arch]
    assert abs(n_base / 1e6 - paper_base) <= 0.01 * paper_base, (arch, n_base)
    assert abs(n_mip / 1e6 - paper_mip) <= 0.01 * paper_mip, (arch, n_mip)
    assert n_base < n_mip < 1.03 * n_base, "MIPNet adds MIMBs, < 3 % of the parameters"


@pytest.mark.parametrize("arch, num_instances, num_keypoints", [
    ("hrnet_w32", 1, 17), ("hrnet_w32", 2, 17), ("hrnet_w32", 3, 14), ("hrnet_w48", 2, 17),
    ("resnet50", 1, 17), ("resnet50", 2, 14), ("resnet101", 2, 17),
])
def test_parameter_names_and_shapes_are_official(arch, num_instances, num_keypoints):
    model = build_model(arch, num_instances, num_keypoints)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    official = official_keys(arch, num_keypoints, num_instances)
    assert sorted(set(ours) - set(official)) == [], "names the official model does not have"
    assert sorted(set(official) - set(ours)) == [], "official names we do not have"
    assert {k: v for k, v in ours.items() if official[k] != v} == {}, "shape differences"


@pytest.mark.parametrize("arch, expected", [
    ("hrnet_w32", {"stage3_se.se_layers.0": 32, "stage3_se.se_layers.1": 64, "stage3_se.se_layers.2": 128,
                   "stage3_se.se_layers.3": 256, "stage4_se.se_layers.0": 32}),
    ("resnet50", {"layer3_se.se_layers.0": 512, "layer4_se.se_layers.0": 1024}),
])
def test_mimb_placement(arch, expected):
    mip = build_model(arch, 3)
    found = {n: (m.channels, m.num_instances) for n, m in mip.named_modules() if isinstance(m, MIMB)}
    assert found == {n: (c, 3) for n, c in expected.items()}
    assert not any(isinstance(m, MIMB) for m in build_model(arch, 1).modules())


def test_official_initialisation():
    model = build_model("hrnet_w32", 2)
    w = torch.cat([m.weight.flatten() for m in model.modules() if isinstance(m, nn.Conv2d)])
    assert 0.0008 < float(w.detach().std()) < 0.0012, "convs ~ N(0, 0.001) as the official init_weights"
    assert torch.all(model.final_layer.bias == 0)


# --------------------------------------------------------------------------- forward
@pytest.mark.parametrize("arch, num_instances, num_keypoints", [("hrnet_w32", 2, 14), ("resnet50", 1, 17)])
def test_output_shapes(arch, num_instances, num_keypoints):
    torch.manual_seed(0)
    model = build_model(arch, num_instances, num_keypoints).eval()
    x = images(1, h=96, w=32)
    lam = None if num_instances == 1 else torch.tensor([1])
    with torch.no_grad():
        out = model(x, lam)
        inst = model.forward_instances(x)
    assert out.shape == (1, num_keypoints, 24, 8) and out.dtype == torch.float32
    assert inst.shape == (num_instances, 1, num_keypoints, 24, 8)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("num_instances", [2, 3])
@pytest.mark.parametrize("arch", ["hrnet_w32", "resnet50"])
def test_forward_instances_equals_per_instance_calls(arch, num_instances, backend):
    skip_unless_runs(backend, "cpu")
    model = cached_model(arch, num_instances)
    x = images(2)
    with mk.use_backend(backend):
        with torch.no_grad():
            per = torch.stack([model(x, lam=n) for n in range(num_instances)])
        inst = model.forward_instances(x)
    assert inst.shape == per.shape == (num_instances, 2, 17, H // 4, W // 4)
    # Same arithmetic; only the convolutions' batch size differs (B vs N*B): fp32 reassociation.
    assert rel_err(inst, per) <= FP32_RTOL
    for n in range(1, num_instances):  # the check is not vacuous: the instances differ
        assert rel_err(per[n], per[0]) > 1e-2


@pytest.mark.parametrize("arch", ["hrnet_w32", "resnet50"])
def test_selectors(arch):
    """Per-sample indices, the one-hot float selector and forward_instances agree; a soft
    selector is something else."""
    model = cached_model(arch, 2)
    x = images(2)
    with torch.no_grad():
        idx = model(x, torch.tensor([1, 0]))
        onehot = model(x, torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
        soft = model(x, torch.full((2, 2), 0.5))
    inst = model.forward_instances(x)
    assert rel_err(onehot, idx) <= FP32_RTOL
    assert rel_err(idx[0], inst[1, 0]) <= FP32_RTOL and rel_err(idx[1], inst[0, 1]) <= FP32_RTOL
    assert rel_err(soft, idx) > 1e-3 and torch.isfinite(soft).all()


def test_baseline_ignores_lam():
    model = build_model("resnet50", 1).eval()
    x = images(1)
    with torch.no_grad():
        a, b = model(x), model(x, 0)
    assert torch.equal(a, b)
    assert torch.equal(model.forward_instances(x)[0], a)


def test_train_mode_forward_and_backward():
    """Training mode: BatchNorm on batch statistics, gradients reach the MIMBs and the trunk."""
    model = copy.deepcopy(cached_model("resnet50", 2)).train()
    out = model(images(2), torch.tensor([0, 1]))
    out.square().mean().backward()
    for name in ("conv1.weight", "layer3_se.se_layers.0.fc_lambda.0.weight", "layer4_se.se_layers.0.fc.0.weight"):
        g = model.get_parameter(name).grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name


def _train_copies(arch: str, momentum):
    """Two identical training-mode copies of a calibrated model; ``momentum`` for every
    BatchNorm ("keep": the calibrated None, the cumulative average)."""
    model = copy.deepcopy(cached_model(arch, 2)).train()
    if momentum != "keep":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = momentum
    return model, copy.deepcopy(model)


def _official_step(model: nn.Module, x: torch.Tensor, N: int) -> torch.Tensor:
    """The official multi-instance step: each crop N times, copy n with lam = n, [N, B, ...]."""
    B = x.shape[0]
    return model(x.repeat(N, 1, 1, 1), torch.arange(N).repeat_interleave(B)).unflatten(0, (N, B))


# Gradients: both sides sum the same per-sample terms in different float32 orders (the
# official side sums N copies' trunk gradients inside each convolution / BatchNorm backward,
# ours once in the first MIMBs' backward; the first MIMBs themselves run mimb_instances).
# Through ~100 layers of these small, batch-2 models the gradients are ill-conditioned: the
# official float32 step itself is off from float64 by up to 8e-2 (norm-wise) on HRNet's
# deepest BatchNorm biases, so the two orders may differ by ~1e-4 (measured 1.3e-4 on
# hrnet_w32's conv1).  The rule is flash-attention's: per parameter, norm-wise,
# |ours - truth| <= 2 |official fp32 - truth| + 1e-5 |truth| against the official step in
# float64 (truth); for the bias before each embedding BatchNorm, whose gradient is zero in
# exact arithmetic (BatchNorm removes the mean: both sides hold cancellation noise), the
# floor is 1e-6 of its layer's weight gradient instead.
def _check_grads_flash(ours: nn.Module, official: nn.Module, truth: nn.Module) -> None:
    off, tru = dict(official.named_parameters()), dict(truth.named_parameters())
    for name, p in ours.named_parameters():
        q, t = off[name].grad, tru[name].grad
        assert p.grad is not None and q is not None and t is not None, name
        assert q.norm() > 0, name
        floor = 1e-5 * t.norm()
        if name.endswith("fc_lambda.0.bias"):
            floor = 1e-6 * tru[name[:-len("bias")] + "weight"].grad.norm()
        err, ref = (p.grad.double() - t).norm(), (q.double() - t).norm()
        assert err <= 2 * ref + floor, (name, float(err), float(ref), float(floor))


@pytest.mark.parametrize("arch, momentum", [("hrnet_w32", "keep"), ("resnet_tiny", 0.1), ("resnet50", 0.1)])
def test_forward_instances_training_equals_repeated_batch(arch, momentum):
    """Training mode: the shared trunk is the official repeated batch -- outputs, every
    parameter gradient, every BatchNorm buffer (running statistics rescaled to the N*B batch)."""
    N = 2
    ours, official = _train_copies(arch, momentum)
    with torch.no_grad():  # a first step (ours finds its trunk's BatchNorms with hooks, then uses that plan)
        _official_step(official, images(2, seed=3), N)
        ours.forward_instances(images(2, seed=3))
    truth = copy.deepcopy(official).double()
    x = images(2)
    out = ours.forward_instances(x)
    ref = _official_step(official, x, N)
    ref64 = _official_step(truth, x.double(), N)
    assert out.shape == ref.shape == (N, 2, 17, H // 4, W // 4) and out.requires_grad
    assert rel_err(out, ref) <= FP32_RTOL
    assert rel_err(out[1], out[0]) > 1e-2  # the instances differ: not vacuous
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    (out * g).sum().backward()
    (ref * g).sum().backward()
    (ref64 * g.double()).sum().backward()
    _check_grads_flash(ours, official, truth)
    for (name, a), b in zip(ours.named_buffers(), official.buffers()):
        if a.is_floating_point():  # running_mean / running_var: equal up to float32 rounding
            # (of the batch means of activations that agree to ~1e-6: a channel whose mean is
            # near zero differs by ~1e-6 of the layer's largest, measured 2.4e-7)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7 + 1e-6 * float(b.abs().max()),
                                       msg=lambda m: f"{name}: {m}")
        else:  # num_batches_tracked: each BatchNorm ran once either way
            assert torch.equal(a, b), name


def test_trunk_running_var_without_the_correction():
    """``official_trunk_bn_stats = False``: the trunk's running variance is updated from the
    B crops (unbiased factor n/(n-1), n = B*h*w) instead of the N*B batch; the running means,
    the outputs and the tail's statistics still agree.  The difference is the documented
    factor, checked on each trunk BatchNorm: ``(new - (1-m) old)`` scales by
    ``(n/(n-1)) / (Nn/(Nn-1))``."""
    N = 2
    ours, official = _train_copies("resnet_tiny", 0.1)
    ours.official_trunk_bn_stats = False
    before = copy.deepcopy(ours)
    x = images(2)
    counts = {}  # values per channel each BatchNorm of the trunk saw

    def count_values(mod, args, name):
        counts[name] = args[0].numel() // args[0].shape[1]

    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: count_values(mod, args, name))
             for name, m in ours.named_modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        ours._trunk(x)  # a pass only to learn n of each trunk BatchNorm (the hooks see the trunk only)
    for h in hooks:
        h.remove()
    ours.load_state_dict(before.state_dict())
    with torch.no_grad():
        out = ours.forward_instances(x)
        ref = _official_step(official, x, N)
    assert rel_err(out, ref) <= FP32_RTOL
    mods, refs, olds = dict(ours.named_modules()), dict(official.named_modules()), dict(before.named_modules())
    trunk = set(counts)
    assert "bn1" in trunk and "layer2.0.bn2" in trunk and "layer3.0.bn1" not in trunk
    for name, m in mods.items():
        if not isinstance(m, nn.BatchNorm2d):
            continue
        torch.testing.assert_close(m.running_mean, refs[name].running_mean, rtol=1e-5, atol=1e-7)
        if name not in trunk:
            torch.testing.assert_close(m.running_var, refs[name].running_var, rtol=1e-5, atol=1e-7)
            continue
        n, keep = counts[name], 1 - m.momentum
        ours_update = m.running_var - keep * olds[name].running_var
        ref_update = refs[name].running_var - keep * olds[name].running_var
        factor = (n / (n - 1)) / (N * n / (N * n - 1))
        assert not torch.allclose(m.running_var, refs[name].running_var, rtol=1e-5, atol=0), name
        torch.testing.assert_close(ours_update, ref_update * factor, rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("bn_type, shape", [(nn.BatchNorm2d, (3, 4, 5, 2)), (nn.BatchNorm1d, (6, 4))])
@pytest.mark.parametrize("calls", [1, 2])
def test_repeated_batchnorm_stats(bn_type, shape, momentum, calls):
    """RepeatedBatchNormStats on a BatchNorm that ``fn`` calls once (hooks on the first run,
    the cached plan after) or twice (hooks on every run): its updates equal the plain ones on
    the batch repeated ``copies`` times; the module keeps its own buffer tensor and no hook."""
    from mipnet.models.common import RepeatedBatchNormStats

    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g) * 3 + 1
    ours = bn_type(shape[1], momentum=momentum)
    ours.running_var.uniform_(0.5, 2.0, generator=g)
    ref, plain = copy.deepcopy(ours), copy.deepcopy(ours)
    own = ours.running_var
    stats = RepeatedBatchNormStats(3)

    def fn(t):
        for _ in range(calls):
            t = ours(t)
        return t

    for step in range(3):  # momentum None averages over num_batches_tracked
        y = stats.run(ours, fn, x.requires_grad_())
        y.sum().backward()  # autograd accepts the update (BatchNorm saved a copy)
        big, small = torch.cat([x.detach()] * 3), x.detach()
        for _ in range(calls):
            big, small = ref(big), plain(small)
        torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-6, atol=0, msg=f"step {step}")
        torch.testing.assert_close(ours.running_mean, ref.running_mean, rtol=1e-6, atol=1e-7)
        assert ours.running_var is own and ours._buffers["running_var"] is own
        assert not ours._forward_hooks and not ours._forward_pre_hooks
    assert (stats._plan[1] is None) == (calls == 2)  # the plan is cached only for single calls
    assert not torch.allclose(plain.running_var, ref.running_var, rtol=1e-4, atol=0)


@pytest.mark.parametrize("arch, N", [("resnet_tiny", 1), ("resnet_tiny", 2)])
def test_forward_with_instances_flag(arch, N):
    """``model(images, instances=True)`` is ``forward_instances`` (what DDP wraps) in either
    mode; a baseline's is ``forward(images)[None]``."""
    model = copy.deepcopy(cached_model(arch, N)).train()
    twin = copy.deepcopy(model)
    x = images(2)
    out = model(x, instances=True)
    assert out.shape == (N, 2, 17, H // 4, W // 4) and out.requires_grad
    ref = twin(x)[None] if N == 1 else twin.forward_instances(x)
    assert rel_err(out, ref) <= FP32_RTOL
    model.eval()
    with torch.no_grad():
        per = torch.stack([model(x, n if N > 1 else None) for n in range(N)])
    assert rel_err(model(x, instances=True), per) <= FP32_RTOL
    with pytest.raises(ValueError, match="lam must be None with instances=True"):
        model(x, 0, instances=True)
    with pytest.raises(TypeError, match="instances must be a bool"):
        model(x, instances=1)


@pytest.mark.parametrize("arch", ["hrnet_w32", "resnet50"])
def test_channels_last(arch):
    model = cached_model(arch, 2)
    x = images(2)
    xc = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = model(x, torch.tensor([0, 1]))
        out = model(xc, torch.tensor([0, 1]))
    inst = model.forward_instances(xc)
    assert inst.shape == (2, 2, 17, H // 4, W // 4)
    assert rel_err(out, ref) <= FP32_RTOL
    assert rel_err(inst[0, 0], ref[0]) <= FP32_RTOL and rel_err(inst[1, 1], ref[1]) <= FP32_RTOL


@pytest.mark.parametrize("arch", ["hrnet_w32", "resnet50"])
def test_bf16_autocast(arch):
    """Under CPU bf16 autocast the model runs in bf16.  A random deep network amplifies
    rounding (bf16 vs fp32 differ by tens of percent here), so the rule is flash-attention's:
    forward_instances' error against the fp32 per-instance result is at most twice that of
    the per-instance bf16 calls (plus 1 %)."""
    model = cached_model(arch, 2)
    x = images(1)
    with torch.no_grad():
        ref = torch.stack([model(x, n) for n in range(2)])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            per = torch.stack([model(x, n) for n in range(2)])
            inst = model.forward_instances(x)
    assert per.dtype == inst.dtype == torch.bfloat16
    assert torch.isfinite(inst).all()
    assert rel_err(inst, ref) <= 2 * rel_err(per, ref) + 0.01


@pytest.mark.slow  # ~20 s of tracing on 2 cores
def test_compile_aot_eager_fullgraph():
    model = cached_model("resnet50", 2)
    x = images(1)
    lam = torch.tensor([1])
    with torch.no_grad():
        ref, ref_inst = model(x, lam), model.forward_instances(x)
        out = torch.compile(model, backend="aot_eager", fullgraph=True)(x, lam)
        inst = torch.compile(model.forward_instances, backend="aot_eager", fullgraph=True)(x)
    assert rel_err(out, ref) <= FP32_RTOL and rel_err(inst, ref_inst) <= FP32_RTOL


def test_compile_aot_eager_training_forward_instances():
    """Training mode (the shared trunk, the first MIMBs' per-sample mimb_instances) traces
    with fullgraph=True and equals eager, outputs and gradients (the compiled embedding runs
    the modules: float32 BatchNorm instead of the eager step's float64, hence rtol 1e-3 on
    the gradients of the embedding's first Linear, the ill-conditioned one)."""
    eager, compiled = _train_copies("resnet_tiny", 0.1)
    x = images(2)
    out = eager.forward_instances(x)
    got = torch.compile(compiled.forward_instances, backend="aot_eager", fullgraph=True)(x)
    assert rel_err(got, out) <= FP32_RTOL
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
    (out * g).sum().backward()
    (got * g).sum().backward()
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        if name.endswith("fc_lambda.0.bias"):  # zero in exact arithmetic: noise on both sides
            continue
        err = float((p.grad - q.grad).norm() / p.grad.norm())
        assert err <= (1e-3 if "fc_lambda.0" in name else 1e-4), (name, err)


@pytest.mark.slow  # inductor codegen: minutes on 2 shared cores
def test_compile_inductor_forward_instances():
    model = cached_model("resnet50", 2)
    x = images(1)
    ref = model.forward_instances(x)
    out = torch.compile(model.forward_instances)(x)
    assert rel_err(out, ref) <= FP32_RTOL


# --------------------------------------------------------------------------- checkpoints
def _prefixed(sd: dict, prefix: str = "module.") -> dict:
    return {prefix + k: v for k, v in sd.items()}


@pytest.mark.parametrize("arch, num_instances, fmt", [
    ("hrnet_w32", 2, "official_bare"),          # MIPNet pose_hrnet_se_lambda final_state.pth
    ("hrnet_w32", 2, "official_training"),      # checkpoint.pth: {"state_dict": module.*, ...}
    ("hrnet_w32", 1, "official_bare"),          # pose_hrnet_w32_256x192.pth
    ("resnet50", 1, "official_pre_0_4_1"),      # SimpleBaseline: no num_batches_tracked
    ("resnet50", 2, "ours"),
])
def test_checkpoint_with_official_names_reproduces_outputs(tmp_path, arch, num_instances, fmt):
    src = cached_model(arch, num_instances)
    # The checkpoint is written under the official names (checked against the independent
    # re-statement), then wrapped as the official code saves it.
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    official = official_keys(arch, 17, num_instances)
    assert set(sd) == set(official)
    if fmt == "official_bare":
        ckpt = _prefixed(sd)
    elif fmt == "official_training":
        ckpt = {"epoch": 140, "model": "pose_hrnet_se_lambda", "perf": 0.7,
                "state_dict": _prefixed(sd), "optimizer": {"state": {}, "param_groups": []}}
    elif fmt == "official_pre_0_4_1":
        ckpt = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    else:
        ckpt = {"model": sd, "arch": arch, "num_instances": num_instances, "epoch": 3}
    path = tmp_path / "ckpt.pth"
    torch.save(ckpt, path)

    torch.manual_seed(123)
    dst = build_model(arch, num_instances).eval()
    report = load_checkpoint(dst, path)
    assert report.ok and report.mimb_at_init == []
    x = images(1)
    lam = None if num_instances == 1 else torch.tensor([1])
    with torch.no_grad():
        assert torch.equal(dst(x, lam), src(x, lam))


def test_official_mipnet_lambda_convention():
    """Official lambda_vec [1, 0] (lambda = 1) is our instance 0; [0, 1] instance 1."""
    model = cached_model("hrnet_w32", 2)
    x = images(2)
    with torch.no_grad():
        official = model(x, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        ours = model(x, torch.tensor([0, 1]))
    assert rel_err(official, ours) <= FP32_RTOL


def test_baseline_checkpoint_into_mipnet():
    base = cached_model("hrnet_w32", 1)
    torch.manual_seed(5)
    mip = build_model("hrnet_w32", 2)
    before = {k: v.clone() for k, v in mip.state_dict().items()}
    sd = _prefixed(base.state_dict())

    with pytest.raises(CheckpointMismatchError, match=r"stage3_se\.se_layers\.0\.fc\.0\.weight") as exc:
        load_checkpoint(mip, sd)
    assert len(exc.value.report.missing) == 5 * 10  # 5 MIMBs x 10 tensors (not the BN counter)
    assert all(torch.equal(v, before[k]) for k, v in mip.state_dict().items()), "a strict failure loads nothing"

    with pytest.warns(UserWarning, match=r"5 MIMB block\(s\).*stage3_se\.se_layers\.0.*stage4_se\.se_layers\.0"):
        report = load_checkpoint(mip, sd, strict=False)
    assert report.mimb_at_init == [f"stage3_se.se_layers.{i}" for i in range(4)] + ["stage4_se.se_layers.0"]
    assert report.unexpected == [] and report.mismatched == []
    after = mip.state_dict()
    for k, v in base.state_dict().items():
        assert torch.equal(after[k], v), k
    for k, v in before.items():
        if "_se." in k:
            assert torch.equal(after[k], v), f"{k} changed"


def test_mipnet_checkpoint_into_baseline_reports_unexpected():
    sd = cached_model("resnet50", 2).state_dict()
    base = build_model("resnet50", 1)
    with pytest.raises(CheckpointMismatchError, match=r"unexpected key\(s\).*layer3_se\.se_layers\.0"):
        load_checkpoint(base, sd)
    report = load_checkpoint(base, sd, strict=False)
    assert sorted({k.split(".")[0] for k in report.unexpected}) == ["layer3_se", "layer4_se"]
    assert report.missing == [] and torch.equal(base.conv1.weight, sd["conv1.weight"])


def test_load_errors_name_keys():
    src = cached_model("resnet50", 2)
    sd = dict(src.state_dict())
    sd["head.extra.weight"] = torch.zeros(3)
    del sd["final_layer.bias"]
    # An N=3 MIPNet checkpoint into an N=2 model: the embedding's first Linear differs.
    sd["layer3_se.se_layers.0.fc_lambda.0.weight"] = torch.zeros(128, 3)
    dst = build_model("resnet50", 2)
    before = dst.final_layer.weight.clone()
    with pytest.raises(CheckpointMismatchError) as exc:
        load_checkpoint(dst, sd)
    msg = str(exc.value)
    for name in ("head.extra.weight", "final_layer.bias",
                 "layer3_se.se_layers.0.fc_lambda.0.weight [128, 3] vs [128, 2]"):
        assert name in msg
    assert torch.equal(dst.final_layer.weight, before), "a strict failure loads nothing"

    report = load_checkpoint(dst, sd, strict=False)
    assert report.missing == ["final_layer.bias"] and report.unexpected == ["head.extra.weight"]
    assert report.mismatched == [("layer3_se.se_layers.0.fc_lambda.0.weight", (128, 3), (128, 2))]
    assert torch.equal(dst.final_layer.weight, src.final_layer.weight)


def test_extract_state_dict_formats():
    t = torch.zeros(1)
    assert list(extract_state_dict({"module._orig_mod.a.b": t})) == ["a.b"]
    assert list(extract_state_dict({"best_state_dict": {"module.x": t}, "epoch": 1})) == ["x"]
    with pytest.raises(TypeError, match="state dict"):
        extract_state_dict({"epoch": 3, "optimizer": {}})
    with pytest.raises(TypeError, match="state dict"):
        extract_state_dict([t])
    with pytest.raises(ValueError, match="'a' twice"):
        extract_state_dict({"a": t, "module.a": t})


# --------------------------------------------------------------------------- bad input
def test_bad_input_errors():
    model = cached_model("hrnet_w32", 2)
    x = images(2)
    with pytest.raises(ValueError, match="3 \\(RGB\\) channels"):
        model(torch.zeros(2, 1, H, W), 0)
    with pytest.raises(ValueError, match="4-D"):
        model(torch.zeros(3, H, W), 0)
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(2, 3, H, W, dtype=torch.uint8), 0)
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.zeros(2, 3, 64, 48), 0)
    with pytest.raises(ValueError, match="multiples of 32"):
        model.forward_instances(torch.zeros(2, 3, 64, 48))
    with pytest.raises(TypeError, match="images must be a torch.Tensor"):
        model([x], 0)
    with pytest.raises(ValueError, match="lam is required"):
        model(x)
    with pytest.raises(ValueError, match="lam=2 is out of range"):
        model(x, 2)
    with pytest.raises(ValueError, match="index 2, out of range for num_instances=2"):
        model(x, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="index -1, out of range"):
        model(x, torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match=r"lam \(float selector\) must have shape \[B, N\] = \[2, 2\]"):
        model(x, torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"lam \(instance indices\) must have shape \[B\] = \[2\]"):
        model(x, torch.tensor([0, 1, 1]))
    with pytest.raises(TypeError, match="lam must hold integer"):
        model(x, torch.tensor([True, False]))
    with pytest.raises(TypeError, match="lam must be an int or a torch.Tensor"):
        model(x, [0, 1])


def test_bad_build_arguments():
    with pytest.raises(ValueError, match="arch must be one of hrnet_w32"):
        build_model("hrnet_w64")
    with pytest.raises(ValueError, match="num_instances must be a positive int"):
        build_model("resnet50", 0)
    with pytest.raises(ValueError, match="num_keypoints must be a positive int"):
        build_model("hrnet_w32", 2, num_keypoints=0)


# --------------------------------------------------------------------------- issue 13: bad checkpoints
def _linear_state():
    torch.manual_seed(0)
    m = nn.Linear(3, 2)
    return m, {k: v.clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("content, message", [
    (b"hello, not a checkpoint", "neither a zip archive nor a pickle"),
    (b"", "the file is empty"),
    (None, "RuntimeError"),  # a truncated torch.save archive
])
def test_unreadable_checkpoint_file_names_the_file(tmp_path, content, message):
    from mipnet.models import CheckpointFileError

    m, sd = _linear_state()
    path = tmp_path / "bad.pth"
    if content is None:
        torch.save(sd, path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointFileError, match=f"{path}.*{message}"):
        load_checkpoint(m, path)


def test_integer_and_non_finite_tensors_are_refused():
    """An int64 state dict is not truncated into float parameters, NaN weights are not loaded
    (predict failed later with an unrelated NMS message); both named in the report."""
    m, sd = _linear_state()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    ints = {k: v.to(torch.int64) for k, v in sd.items()}
    with pytest.raises(CheckpointMismatchError, match="dtype mismatch.*weight int64 vs float32"):
        load_checkpoint(m, ints)
    nan = {k: v.clone() for k, v in sd.items()}
    nan["weight"][0, 0] = float("nan")
    with pytest.raises(CheckpointMismatchError, match="NaN or inf values: weight"):
        load_checkpoint(m, nan)
    report = load_checkpoint(m, nan, strict=False)  # the rest loads; the bad tensor is skipped
    assert report.non_finite == ["weight"] and not report.ok
    assert torch.equal(m.weight, before["weight"]) and torch.equal(m.bias, sd["bias"])
    half = {k: v.half() for k, v in sd.items()}  # a float dtype converts, as load_state_dict does
    assert load_checkpoint(m, half).ok
