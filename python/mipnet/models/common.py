"""Pieces shared by the HRNet and SimpleBaseline models.

* :class:`BasicBlock` / :class:`Bottleneck`: the residual blocks of HRNet and ResNet, with the
  attribute names of the official code (``conv1, bn1, ..., downsample``) so official state
  dicts load unchanged.
* :class:`MIMBGroup`: MIPNet's ``SELambdaModule`` -- one :class:`~mipnet_kernels.MIMB` per
  branch in ``se_layers`` (the official parameter names), applied to a list of branch tensors
  either with a per-sample selector ``lam`` or, for N-instance inference, to all instances.
* :class:`PoseNet`: the base class of the models: input validation, ``forward(images, lam)``
  and ``forward_instances(images)`` on top of two hooks a subclass defines, ``_trunk`` (the
  lambda-independent part, run once) and ``_tail`` (the rest, where the MIMBs are).

N-instance inference (``forward_instances``): the trunk runs on the ``B`` images once.  The
first MIMB group turns its ``B``-sample input into the ``N*B``-sample instance-major batch
(sample ``n*B + b`` is instance ``n`` of image ``b``) with
:func:`~mipnet_kernels.mimb_instances` (one read of the input, N writes); the rest of the
network runs once on that batch, and each later MIMB scales sample ``n*B + b`` by row ``n``
of its cached ``[N, C]`` eval-mode embedding table (:func:`~mipnet_kernels.mimb_scale`).
That is the same arithmetic as N calls ``forward(images, lam=n)`` in eval mode, where each
MIMB gathers row ``n`` of the same table.

N-instance training (``forward_instances`` in training mode, what ``mipnet train`` runs): the
trunk runs on the ``B`` crops once, forward and backward; the first MIMB group turns each
branch into the ``N*B``-sample instance-major batch with the training-mode
:meth:`~mipnet_kernels.MIMB.instances` (the embedding of the per-sample one-hot selectors,
BatchNorm over all ``N*B`` of them, then :func:`~mipnet_kernels.mimb_instances` with that
per-sample table: one read of the branch, N writes, a fused backward), and every later MIMB
runs its training step with the per-sample selector; the rest runs once on ``N*B`` samples.  The official code (and ``mipnet train`` with
``train.shared_trunk=false``) repeats each crop N times through the whole network instead.
The two are the same function of the parameters: the trunk's convolutions act per sample,
and its BatchNorms, on N identical copies of a batch, see the same mean and the same biased
variance, so outputs agree up to float32 summation order; the gradients too, since the
first MIMBs' backward sums the N instances' gradients w.r.t. their input, which is where the
official backward's per-copy trunk gradients would have been summed (linearity).  The one
difference is the trunk BatchNorms' *running* variance: PyTorch updates it with the unbiased
variance, ``var * n / (n - 1)``, and ``n`` (values per channel) is ``B*h*w`` here against
``N*B*h*w`` there.  :class:`RepeatedBatchNormStats` rescales each update to the official one
(``PoseNet.official_trunk_bn_stats``, on by default), so the running statistics match too.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from mipnet_kernels import (
    MIMB,
    mimb_instances,
    mimb_instances_grouped,
    mimb_scale,
    mimb_scale_grouped,
)

#: BatchNorm momentum of the official blocks (``BN_MOMENTUM``).
BN_MOMENTUM = 0.1
#: MIMB reduction of the official ``SELambdaLayer``.
MIMB_REDUCTION = 4


def _is_compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - old torch
        return False


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or ``downsample``) shortcut (He et al. 2016)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes, momentum=BN_MOMENTUM)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes, momentum=BN_MOMENTUM)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class Bottleneck(nn.Module):
    """1x1 - 3x3 (strided) - 1x1 conv-BN bottleneck with a 4x channel expansion (He et al. 2016)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes, momentum=BN_MOMENTUM)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes, momentum=BN_MOMENTUM)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion, momentum=BN_MOMENTUM)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


def make_res_layer(block: type, inplanes: int, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
    """``blocks`` residual blocks; the first changes the width/stride, with a 1x1 conv-BN
    ``downsample`` shortcut when needed (the official ``_make_layer``)."""
    downsample = None
    if stride != 1 or inplanes != planes * block.expansion:
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
            nn.BatchNorm2d(planes * block.expansion, momentum=BN_MOMENTUM),
        )
    layers = [block(inplanes, planes, stride, downsample)]
    layers += [block(planes * block.expansion, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


class AllInstances:
    """The selector of ``forward_instances``: the batch is (or becomes, at the first MIMB
    group) instance-major over all N instances of ``batch`` images.

    ``selector`` is None in eval mode (the MIMBs use their per-instance tables) and, in
    training mode, the per-sample one-hot selector ``[N*B, N]`` (row ``n*B + b`` selects
    instance ``n``) that the MIMBs' training step takes."""

    __slots__ = ("batch", "selector")

    def __init__(self, batch: int, selector: Optional[Tensor] = None) -> None:
        self.batch = batch
        self.selector = selector


Selector = Union[Tensor, AllInstances]


def instance_selector(num_instances: int, batch: int, device=None) -> Tensor:
    """The one-hot float32 selector ``[N*B, N]`` of the instance-major batch: row ``n*B + b``
    selects instance ``n`` (the rows ``repeat_instances`` of :mod:`mipnet.train` gives as
    indices)."""
    eye = torch.eye(num_instances, dtype=torch.float32, device=device)
    return eye.repeat_interleave(batch, dim=0)


_PLAIN_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class RepeatedBatchNormStats:
    """Runs a function of a batch so that every plain BatchNorm of ``model`` it calls updates
    its running variance as it would on ``copies`` identical copies of its input batch:
    ``stats.run(model, fn, x)`` returns ``fn(x)``.

    On ``c`` copies of a batch a BatchNorm in training mode normalises with the same mean and
    biased variance ``var``, and updates ``running_mean`` identically, but it updates
    ``running_var`` with the unbiased ``var * c*n / (c*n - 1)`` where a single copy uses
    ``var * n / (n - 1)`` (``n`` values per channel).  Each BatchNorm is handed a copy of its
    ``running_var`` to update (autograd saves the tensor BatchNorm was given and refuses an
    in-place change of it); afterwards the update ``d = new - (1 - m) * old`` (``m`` the
    momentum, ``1 / num_batches_tracked`` when it is None) is recovered and
    ``new + d * (r - 1)``, ``r = c*(n - 1) / (c*n - 1)``, written into the module's own
    ``running_var``: ``(1 - m) * old + m * var * c*n / (c*n - 1)``, the update of the
    repeated batch up to float32 rounding (the correction is ``~1/n`` of the update, so its
    rounding is far below an ulp of ``running_var``).

    Cost: three small ops per BatchNorm.  The first call for an input size (and module set)
    finds the BatchNorms ``fn`` calls and their values per sample with forward hooks and
    keeps that plan; later calls use the plan, without hooks.  A BatchNorm called more than
    once by ``fn`` makes every call take the hook path.

    Only ``nn.BatchNorm1d/2d/3d`` are corrected (not ``SyncBatchNorm``, whose ``n`` spans the
    processes, nor subclasses, whose update may differ).  No hook outlives a call, so no
    module outside ``fn`` (the MIMBs' embedding BatchNorms included) sees one.
    """

    def __init__(self, copies: int) -> None:
        self.copies = copies
        self._plan: tuple = (None, None)  # (key, [(bn, values per sample)] or None: hooks every call)

    @staticmethod
    def _tracks(bn) -> bool:
        return bn.training and bn.track_running_stats and bn._buffers.get("running_var") is not None

    def _correct(self, bn, own: Tensor, new: Tensor, n: int) -> None:
        c = self.copies
        keep = 1.0 - (bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked))
        r = c * (n - 1) / (c * n - 1) if n > 1 else 1.0
        with torch.no_grad():  # new + (r - 1) * (new - keep * own)
            own.mul_((1.0 - r) * keep).add_(new, alpha=r)

    def run(self, model: nn.Module, fn, x: Tensor):
        norms = [m for m in model.modules() if type(m) in _PLAIN_BATCHNORMS]
        key = (tuple(x.shape[1:]), tuple(map(id, norms)))
        if self._plan[0] != key or self._plan[1] is None:
            return self._run_with_hooks(norms, fn, x, key)
        batch = x.shape[0]
        saved = []
        for bn, per_sample in self._plan[1]:
            if self._tracks(bn):
                own = bn._buffers["running_var"]
                bn._buffers["running_var"] = own.detach().clone()
                saved.append((bn, own, per_sample))
        done = False
        try:
            out = fn(x)
            done = True
        finally:
            for bn, own, per_sample in saved:
                new = bn._buffers["running_var"]
                bn._buffers["running_var"] = own
                if done:
                    self._correct(bn, own, new, batch * per_sample)
        return out

    def _run_with_hooks(self, norms, fn, x: Tensor, key):
        calls: list = []  # (bn, values per sample) in call order
        stacks: dict = {}

        def pre(bn, args):
            y = args[0]
            per_sample = y.numel() // (y.shape[0] * y.shape[1]) if y.dim() >= 2 and y.shape[0] * y.shape[1] else 0
            calls.append((bn, per_sample))
            if self._tracks(bn):
                own = bn._buffers["running_var"]
                stacks.setdefault(id(bn), []).append((own, y.numel() // y.shape[1]))
                bn._buffers["running_var"] = own.detach().clone()

        def post(bn, args, out):
            stack = stacks.get(id(bn))
            if stack:
                own, n = stack.pop()
                new = bn._buffers["running_var"]
                bn._buffers["running_var"] = own
                self._correct(bn, own, new, n)

        handles = [h for bn in norms for h in (bn.register_forward_pre_hook(pre), bn.register_forward_hook(post))]
        try:
            out = fn(x)
        finally:
            for h in handles:
                h.remove()
            for bn in norms:  # an exception between the hooks: give back the module's own tensor
                stack = stacks.get(id(bn))
                if stack:
                    bn._buffers["running_var"] = stack[0][0]
        once = len({id(bn) for bn, _ in calls}) == len(calls)
        self._plan = (key, calls if once else None)
        return out


class MIMBGroup(nn.Module):
    """MIPNet's ``SELambdaModule``: one MIMB per branch, ``se_layers[i]`` for branch ``i``.

    ``forward(xs, lam, first=False)`` with a list of branch tensors ``xs``:

    * ``lam`` a tensor (integer indices ``[B]`` or float selector ``[B, N]``): each branch
      through its :class:`~mipnet_kernels.MIMB` (training or eval).
    * ``lam`` an :class:`AllInstances` without a selector (eval mode): with ``first=True``
      the ``B``-sample branches become ``N*B``-sample instance-major branches
      (:func:`mimb_instances`, grouped over the branches); otherwise the branches already
      hold ``N*B`` samples and sample ``n*B + b`` is scaled by row ``n`` of each block's
      embedding table.
    * ``lam`` an :class:`AllInstances` with a selector (training): with ``first=True`` each
      ``B``-sample branch becomes ``N*B`` samples through its MIMB's training-mode
      :meth:`~mipnet_kernels.MIMB.instances` (the embedding on the per-sample selectors, then
      :func:`mimb_instances` with a per-sample table: one read of the branch, N writes);
      otherwise each branch through its MIMB's training step with the per-sample selector.
    """

    def __init__(self, channels: Sequence[int], num_instances: int) -> None:
        super().__init__()
        self.se_layers = nn.ModuleList(
            MIMB(c, num_instances, reduction=MIMB_REDUCTION) for c in channels
        )

    def forward(self, xs: list[Tensor], lam: Selector, first: bool = False) -> list[Tensor]:
        if len(xs) != len(self.se_layers):
            raise ValueError(f"expected {len(self.se_layers)} branch tensors, got {len(xs)}")
        if not isinstance(lam, AllInstances):
            return [layer(x, lam) for layer, x in zip(self.se_layers, xs)]
        if lam.selector is not None:  # training: per-sample MIMBs on the N*B batch
            if first:  # B -> N*B samples: one read of each branch, N writes
                return [layer.instances(x, lam.selector) for layer, x in zip(self.se_layers, xs)]
            return [layer(x, lam.selector) for layer, x in zip(self.se_layers, xs)]
        w1s = [layer.w1.detach() for layer in self.se_layers]
        w2s = [layer.w2.detach() for layer in self.se_layers]
        tables = [layer.embedding_table() for layer in self.se_layers]
        if first:
            if len(xs) == 1:
                return [mimb_instances(xs[0], w1s[0], w2s[0], tables[0])]
            return mimb_instances_grouped(xs, w1s, w2s, tables)
        rows = [t.repeat_interleave(lam.batch, dim=0) for t in tables]  # [N*B, C], instance-major
        if len(xs) == 1:
            return [mimb_scale(xs[0], w1s[0], w2s[0], rows[0])]
        return mimb_scale_grouped(xs, w1s, w2s, rows)


def _describe(t) -> str:
    if isinstance(t, Tensor):
        return f"a {t.dtype} tensor of shape {list(t.shape)}"
    return type(t).__name__


class PoseNet(nn.Module):
    """Base of the top-down pose models: ``images [B, 3, H, W]`` -> heatmaps ``[B, K, H/4, W/4]``.

    Subclasses set ``num_instances``, ``num_keypoints``, ``stride_multiple`` (H and W must be
    multiples of it) and define ``_trunk(images) -> features`` (everything before the first
    MIMB) and ``_tail(features, lam) -> heatmaps``.
    """

    num_instances: int
    num_keypoints: int
    stride_multiple: int = 32
    #: ``forward_instances`` in training mode: rescale the trunk BatchNorms' running-variance
    #: updates to those of the official N-fold repeated batch (:class:`RepeatedBatchNormStats`).
    #: False keeps PyTorch's update on the ``B`` crops (unbiased factor ``n/(n-1)`` of ``B``
    #: samples instead of ``N*B``: a relative difference below ``1/n`` of each update).
    official_trunk_bn_stats: bool = True

    # ------------------------------------------------------------------ validation
    def _check_images(self, images) -> None:
        if not isinstance(images, Tensor):
            raise TypeError(f"images must be a torch.Tensor [B, 3, H, W], got {_describe(images)}")
        if images.dim() != 4:
            raise ValueError(f"images must be 4-D [B, 3, H, W], got shape {list(images.shape)}")
        if images.shape[1] != 3:
            raise ValueError(
                f"images must have 3 (RGB) channels in dim 1, got {images.shape[1]} "
                f"(shape {list(images.shape)}; channels_last images are still [B, 3, H, W] tensors)"
            )
        if not images.is_floating_point():
            raise TypeError(f"images must be a floating-point tensor (normalised RGB), got {images.dtype}")
        H, W = images.shape[-2:]
        m = self.stride_multiple
        if H % m or W % m or H == 0 or W == 0:
            raise ValueError(
                f"images height and width must be positive multiples of {m} (the network's deepest "
                f"stride), got {H}x{W}; e.g. 256x192 or 384x288"
            )

    def _check_lam(self, lam, images: Tensor) -> Optional[Tensor]:
        """``lam`` as a validated tensor (``int`` -> ``[B]`` indices); None only when N == 1."""
        N, B = self.num_instances, images.shape[0]
        if lam is None:
            if N > 1:
                raise ValueError(
                    f"lam is required for a MIPNet model (num_instances={N}): integer instance "
                    f"indices [B], a float selector [B, {N}], or an int for the whole batch"
                )
            return None
        if isinstance(lam, bool) or not isinstance(lam, (int, Tensor)):
            raise TypeError(f"lam must be an int or a torch.Tensor, got {_describe(lam)}")
        if isinstance(lam, int):
            if not 0 <= lam < N:
                raise ValueError(f"lam={lam} is out of range for num_instances={N} (valid: 0..{N - 1})")
            return torch.full((B,), lam, dtype=torch.long, device=images.device)
        if lam.device != images.device:
            raise ValueError(f"lam is on {lam.device} but images are on {images.device}")
        if lam.is_floating_point():
            if tuple(lam.shape) != (B, N):
                raise ValueError(f"lam (float selector) must have shape [B, N] = [{B}, {N}], got {list(lam.shape)}")
            return lam
        if lam.dtype == torch.bool or lam.is_complex():
            raise TypeError(f"lam must hold integer instance indices or float selectors, got {lam.dtype}")
        if tuple(lam.shape) != (B,):
            raise ValueError(f"lam (instance indices) must have shape [B] = [{B}], got {list(lam.shape)}")
        if B and not _is_compiling():  # one host sync, before the trunk runs
            lo, hi = (int(v) for v in torch.aminmax(lam))
            if lo < 0 or hi >= N:
                raise ValueError(
                    f"lam holds instance index {lo if lo < 0 else hi}, out of range for "
                    f"num_instances={N} (valid: 0..{N - 1})"
                )
        return lam

    # ------------------------------------------------------------------ forward
    def forward(self, images: Tensor, lam: Union[Tensor, int, None] = None, *,
                instances: bool = False) -> Tensor:
        """Heatmaps ``[B, K, H/4, W/4]`` of the instance(s) selected by ``lam``.

        Args:
            images: ``[B, 3, H, W]`` float, H and W multiples of 32 (any memory format).
            lam: integer instance indices ``[B]`` (0 is the primary instance, official
                ``lambda_vec = [1, 0]``), a float selector ``[B, N]`` (one-hot or soft), an
                ``int`` for the whole batch, or None (baseline models only: ignored there).
            instances: True returns :meth:`forward_instances` ``(images)`` instead,
                ``[N, B, K, H/4, W/4]`` (``lam`` must then be None).  Through ``forward`` so
                that wrappers which must see the forward call (``DistributedDataParallel``)
                run it.
        """
        if instances is not False:
            if not isinstance(instances, bool):
                raise TypeError(f"instances must be a bool, got {_describe(instances)}")
            if lam is not None:
                raise ValueError("lam must be None with instances=True: every instance is computed")
            return self.forward_instances(images)
        self._check_images(images)
        sel = self._check_lam(lam, images)
        return self._tail(self._trunk(images), sel)

    def forward_instances(self, images: Tensor) -> Tensor:
        """All N instances: ``[N, B, K, H/4, W/4]``, the trunk run once on the ``B`` crops.

        * Eval mode (inference; runs under ``torch.no_grad``): ``out[n]`` equals
          ``forward(images, lam=n)``; the N instances run as one ``N*B`` batch after the
          first MIMB (see the module docstring).
        * Training mode (differentiable): ``out`` equals, up to float32 summation order,
          ``forward(images.repeat(N, 1, 1, 1), lam)`` with ``lam[n*B + b] = n`` (the official
          multi-instance step) reshaped to ``[N, B, ...]``, and so do the parameter
          gradients and, with :attr:`official_trunk_bn_stats` (eager only; not under
          ``torch.compile``), the BatchNorm running statistics; at a fraction of the cost
          (the trunk runs on ``B`` samples, not ``N*B``).

        A baseline model (N = 1) returns ``forward(images)[None]``.
        """
        self._check_images(images)
        N, B = self.num_instances, images.shape[0]
        if self.training:
            if N == 1:
                return self._tail(self._trunk(images), None).unsqueeze(0)
            # Under torch.compile the correction (module hooks, buffer swaps) is not traced:
            # the compiled step updates the trunk's running variance from the B crops, as
            # official_trunk_bn_stats = False does (a relative difference below 1/n of each update).
            if self.official_trunk_bn_stats and not _is_compiling():
                stats = self.__dict__.get("_repeated_bn_stats")
                if stats is None or stats.copies != N:
                    stats = self.__dict__["_repeated_bn_stats"] = RepeatedBatchNormStats(N)
                feats = stats.run(self, self._trunk, images)
            else:
                feats = self._trunk(images)
            sel = AllInstances(B, instance_selector(N, B, images.device))
            return self._tail(feats, sel).unflatten(0, (N, B))
        with torch.no_grad():
            feats = self._trunk(images)
            if self.num_instances == 1:
                return self._tail(feats, None).unsqueeze(0)
            out = self._tail(feats, AllInstances(images.shape[0]))
        return out.unflatten(0, (self.num_instances, images.shape[0]))

    def _trunk(self, images: Tensor):  # pragma: no cover - abstract
        raise NotImplementedError

    def _tail(self, feats, lam: Optional[Selector]) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


def init_normal_(model: nn.Module, *types: type) -> None:
    """The official initialisation: weights of ``types`` ~ N(0, 0.001), their biases 0;
    BatchNorm2d weight 1, bias 0."""
    for m in model.modules():
        if isinstance(m, types):
            nn.init.normal_(m.weight, std=0.001)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
