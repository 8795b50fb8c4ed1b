"""``nn.Module`` wrappers of the fused ops.

:class:`MIMB` is a drop-in replacement of MIPNet's ``SELambdaLayer``
(``lib/models/pose_hrnet_se_lambda.py``) with the same parameter names, shapes and
initialisation, so official checkpoints load with ``load_state_dict`` unchanged.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module

from .ops.mimb import mimb, mimb_embedding_reference, mimb_instances, mimb_scale
from .ops.mimb.autograd import TrainEmbedding, TrainStep
from .ops.mimb.contract import _check_x, compute_dtype, dense

__all__ = ["MIMB"]

_PLAIN = (Tensor, nn.Parameter)


class MIMB(nn.Module):
    """Multi-Instance Modulation Block (MIPNet's ``SELambdaLayer``) on the fused ops.

    ``y = x * e * v`` per channel, with the squeeze-excite ``e = sigmoid(W2 relu(W1 mean_hw(x)))``
    and the instance embedding ``v = sigmoid(E2 relu(BN(E1 lam + b1)) + b2)``.

    Args:
        channels: C, the channels of ``x``.
        num_instances: N, the number of instances (the length of the selector ``lam``).
        reduction: r; the hidden width is ``channels // reduction``, which must be >= 1
            (use ``reduction=1`` for C < 4).
        embed_norm: the BatchNorm1d of the official embedding (``fc_lambda.1``).  Without it
            ``fc_lambda.1`` is an ``nn.Identity`` so the other indices still match.

    Parameters (as the official layer): ``fc.0.weight [C/r, C]``, ``fc.2.weight [C, C/r]``,
    ``fc_lambda.0.{weight [C/r, N], bias}``, ``fc_lambda.1.{weight, bias, running_mean,
    running_var, num_batches_tracked}`` (BatchNorm1d(C/r)), ``fc_lambda.3.{weight [C, C/r],
    bias}``; default ``nn.Linear`` / ``nn.BatchNorm1d`` initialisation, created in the official
    order (so the same seed gives the same weights).

    ``forward(x, lam)``: ``x [B, C, H, W]``; ``lam`` either an integer tensor ``[B]`` of
    instance indices in ``[0, N)`` (N=2: 0 is the primary instance, official ``[1, 0]``) or a
    float selector ``[B, N]`` (one-hot or soft).

    * Training mode: the whole block -- the embedding with its BatchNorm on batch
      statistics (updating the running statistics and ``num_batches_tracked`` as the
      official layer's ``nn.BatchNorm1d`` does) and the squeeze-excite scaling -- is one
      fused step, :func:`~mipnet_kernels.ops.mimb.mimb_train`: one call forward, one
      backward (on the cpu backend one C++ kernel each way).  Where that cannot reproduce
      the modules exactly or must not bypass them (``torch.compile`` / export and
      TorchScript tracing, tensor subclasses such as FakeTensor, hooks on the
      ``fc_lambda`` modules, a BatchNorm without affine parameters or running statistics,
      a batch of one) it runs ``v = fc_lambda(lam)`` with the plain modules and the fused
      :func:`~mipnet_kernels.mimb_scale` for the rest; the results agree to float rounding.
      Under autocast the fused step computes the embedding in float32 (the modules would
      run its Linear layers in the autocast dtype), ``y`` in ``x``'s dtype either way.
    * Eval mode: the BatchNorm is folded into the first embedding Linear
      (:meth:`folded_embedding`, exact up to float rounding) and the fused
      :func:`~mipnet_kernels.mimb` op runs the block.  For integer ``lam`` (and for any
      ``lam`` when no embedding parameter needs a gradient) the folded weights and the
      ``[N, C]`` table of ``v`` for each one-hot selector are cached; integer ``lam`` then
      costs a row gather plus :func:`~mipnet_kernels.mimb_scale`.  When grad mode is on and an
      embedding parameter requires grad, the fold is recomputed with autograd on every call
      (never a stale or detached table).

    Cache invalidation: the cache is keyed by the identity, storage, version counter, dtype
    and device of every ``fc_lambda`` parameter and buffer (so ``load_state_dict``, optimizer
    steps, in-place edits under ``torch.no_grad()``, ``.to()`` / ``.half()`` all invalidate it)
    and is also dropped on ``train()`` / ``eval()``, ``_apply`` and ``load_state_dict``.
    Writes through ``param.data`` bypass PyTorch's version counter: call
    :meth:`invalidate_cache` after those.  Under ``torch.compile`` nothing is cached.
    """

    def __init__(self, channels: int, num_instances: int = 2, reduction: int = 4,
                 embed_norm: bool = True) -> None:
        super().__init__()
        for name, val in (("channels", channels), ("num_instances", num_instances), ("reduction", reduction)):
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        hidden = channels // reduction
        if hidden < 1:
            raise ValueError(
                f"channels // reduction must be >= 1, got channels={channels}, reduction={reduction}; "
                f"use reduction <= {channels}"
            )
        self.channels = channels
        self.num_instances = num_instances
        self.reduction = reduction
        self.hidden = hidden
        self.embed_norm = bool(embed_norm)
        self.fc = nn.Sequential(
            nn.Linear(channels, hidden, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, channels, bias=False),
            nn.Sigmoid(),
        )
        self.fc_lambda = nn.Sequential(
            nn.Linear(num_instances, hidden),
            nn.BatchNorm1d(hidden) if embed_norm else nn.Identity(),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, channels),
            nn.Sigmoid(),
        )
        self._cache: Optional[tuple] = None  # (key, e1_folded, b1_folded, table)

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, num_instances={self.num_instances}, "
                f"reduction={self.reduction}, embed_norm={self.embed_norm}")

    # ------------------------------------------------------------------ parameters
    @property
    def w1(self) -> Tensor:
        return self.fc[0].weight

    @property
    def w2(self) -> Tensor:
        return self.fc[2].weight

    def _bn(self) -> Optional[nn.BatchNorm1d]:
        bn = self.fc_lambda[1]
        return bn if isinstance(bn, nn.modules.batchnorm._BatchNorm) else None

    def _embed_uses_batch_stats(self) -> bool:
        bn = self._bn()
        return bn is not None and (bn.training or bn.running_mean is None or bn.running_var is None)

    def folded_embedding(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(e1, b1, e2, b2)`` with the eval-mode BatchNorm folded into ``e1, b1``:
        ``BN(E1 lam + b1) = (s * E1) lam + (s * (b1 - mean) + beta)``, ``s = gamma / sqrt(var + eps)``.
        Computed in float32 (float64 for float64 parameters), differentiable w.r.t. the
        parameters (the running statistics are constants)."""
        lin1, lin2 = self.fc_lambda[0], self.fc_lambda[3]
        e1, b1 = lin1.weight, lin1.bias
        ct = torch.promote_types(e1.dtype, torch.float32)
        bn = self._bn()
        if bn is None:
            return e1.to(ct), b1.to(ct), lin2.weight, lin2.bias
        scale = torch.rsqrt(bn.running_var.to(ct) + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.to(ct)
        shift = (b1.to(ct) - bn.running_mean.to(ct)) * scale
        if bn.bias is not None:
            shift = shift + bn.bias.to(ct)
        return e1.to(ct) * scale[:, None], shift, lin2.weight, lin2.bias

    # ------------------------------------------------------------------ eval cache
    def invalidate_cache(self) -> None:
        """Drop the cached folded embedding and ``[N, C]`` table."""
        self._cache = None

    def _cache_key(self) -> Optional[tuple]:
        bn = self._bn()
        try:
            key = tuple(
                (id(t), t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape))
                for t in (*self.fc_lambda.parameters(), *self.fc_lambda.buffers())
            )
        except RuntimeError:  # inference tensors have no version counter: do not cache
            return None
        return key + ((bn.eps,) if bn is not None else ())

    def _eval_embedding(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``(e1f, b1f, e2, b2, table)``, detached, cached while the parameters are unchanged."""
        key = None if torch.compiler.is_compiling() else self._cache_key()
        if key is not None and self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        with torch.no_grad():
            e1f, b1f, e2, b2 = (t.detach() for t in self.folded_embedding())
            eye = torch.eye(self.num_instances, dtype=e1f.dtype, device=e1f.device)
            table = mimb_embedding_reference(eye, e1f, b1f, e2, b2, e1f.dtype)
        value = (e1f, b1f, e2, b2, table)
        if key is not None:
            self._cache = (key, value)
        return value

    def embedding_table(self) -> Tensor:
        """``[N, C]`` float32: the eval-mode embedding ``v`` of each one-hot selector (cached)."""
        if self._embed_uses_batch_stats():
            raise RuntimeError(
                "MIMB.embedding_table needs eval mode: in training mode the embedding's BatchNorm "
                "normalises over the batch, so there is no per-instance table; call .eval() first"
            )
        return self._eval_embedding()[4]

    def train(self, mode: bool = True):
        self._cache = None
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self._cache = None
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self._cache = None
        return super()._load_from_state_dict(*args, **kwargs)

    # ------------------------------------------------------------------ forward
    def _check_x(self, x) -> None:
        _check_x(x)
        if x.shape[1] != self.channels:
            raise ValueError(
                f"x has {x.shape[1]} channels but this MIMB was built for channels={self.channels}"
            )

    def _selector(self, lam, x: Tensor) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """``(indices [B] int64, None)`` or ``(None, selector [B, N] float)``, validated."""
        N, B = self.num_instances, x.shape[0]
        if not isinstance(lam, Tensor):
            raise TypeError(
                "lam must be a torch.Tensor: integer instance indices [B] or a float selector "
                f"[B, N], got {type(lam).__name__}"
            )
        if lam.device != x.device:
            raise ValueError(f"lam is on {lam.device} but x is on {x.device}")
        if lam.dtype == torch.bool or lam.is_complex():
            raise TypeError(f"lam must be integer indices or a real float selector, got {lam.dtype}")
        if lam.is_floating_point():
            if tuple(lam.shape) != (B, N):
                raise ValueError(
                    f"lam (float selector) must have shape [B, N] = [{B}, {N}], got {list(lam.shape)}"
                )
            return None, lam
        if tuple(lam.shape) != (B,):
            raise ValueError(f"lam (instance indices) must have shape [B] = [{B}], got {list(lam.shape)}")
        if B and not torch.compiler.is_compiling():  # one host sync: out-of-range indices must not pass silently
            lo, hi = (int(t) for t in torch.aminmax(lam))
            if lo < 0 or hi >= N:
                bad = lo if lo < 0 else hi
                raise ValueError(
                    f"lam holds instance index {bad}, out of range for num_instances={N} "
                    f"(valid: 0..{N - 1})"
                )
        return lam.long(), None

    def _one_hot(self, idx: Tensor, dtype: torch.dtype) -> Tensor:
        ar = torch.arange(self.num_instances, device=idx.device)
        return (idx[:, None] == ar).to(dtype)

    def forward(self, x: Tensor, lam: Tensor) -> Tensor:
        self._check_x(x)
        idx, sel = self._selector(lam, x)
        if self.training or self._embed_uses_batch_stats():
            if self._cache is not None:  # the BatchNorm's running statistics change
                self._cache = None
            layers = self._fused_train_layers(x)
            e1 = (self.fc_lambda[0] if layers is None else layers[0]).weight
            sel = self._one_hot(idx, e1.dtype) if sel is None else sel.to(e1.dtype)
            if layers is not None:
                y = self._fused_train(x, sel, *layers)
                if y is not None:
                    return y
            v = self.fc_lambda(sel)
            return mimb_scale(x, self.w1, self.w2, v)
        w1, w2 = self.w1, self.w2
        embed_grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.fc_lambda.parameters())
        if embed_grad:
            e1f, b1f, e2, b2 = self.folded_embedding()
        else:
            e1f, b1f, e2, b2, table = self._eval_embedding()
            if idx is not None:
                return mimb_scale(x, w1, w2, table.index_select(0, idx))
        if sel is None:
            sel = self._one_hot(idx, e1f.dtype)
        if not torch.is_grad_enabled():  # nothing is recorded: plain tensors take the fused kernel
            w1, w2 = w1.detach(), w2.detach()
        return mimb(x, sel, w1, w2, e1f, b1f, e2, b2)

    def _fused_train_layers(self, x: Tensor, rows: Optional[int] = None):
        """``(lin1, bn or None, lin2)`` when this training step may run as one fused step
        (:class:`~mipnet_kernels.ops.mimb.autograd.TrainStep`, what
        :func:`~mipnet_kernels.ops.mimb.mimb_train` runs), else None: modules + ``mimb_scale``.

        The fused step reproduces exactly the official embedding (``Linear, BatchNorm1d |
        Identity, ReLU, Linear, Sigmoid`` -- a SyncBatchNorm or any other replacement takes
        the module path) with a BatchNorm in training mode with affine parameters and
        running statistics over more than one sample.  It does not call those modules, so
        it is not taken when they have forward hooks (a hook must run): PyTorch has no
        public query for registered hooks, so this reads the dicts ``nn.Module.__call__``
        itself reads (``_forward_hooks`` / ``_forward_pre_hooks``, and the global ones).
        ``rows``: the number of selectors the embedding normalises over (default ``B``)."""
        if x.numel() == 0:
            return None
        if _module._global_forward_hooks or _module._global_forward_pre_hooks:
            return None
        layers = tuple(self.fc_lambda)
        if len(layers) != 5:
            return None
        lin1, norm, relu, lin2, sig = layers
        if not (type(lin1) is nn.Linear and type(relu) is nn.ReLU and type(lin2) is nn.Linear
                and type(sig) is nn.Sigmoid):
            return None
        if any(m._forward_hooks or m._forward_pre_hooks for m in layers):
            return None
        if type(norm) is nn.BatchNorm1d:
            if not (norm.training and norm.affine and norm.track_running_stats
                    and (x.shape[0] if rows is None else rows) > 1
                    and norm.running_mean is not None and norm.num_batches_tracked is not None):
                return None
        elif type(norm) is nn.Identity:
            norm = None
        else:
            return None
        return lin1, norm, lin2

    def _fused_train(self, x: Tensor, sel: Tensor, lin1: nn.Linear, bn, lin2: nn.Linear):
        """The training step as one fused step (``x`` and ``sel`` are validated, the weights
        are this module's), or None where the autograd function must not run: under
        ``torch.compile`` / export and TorchScript tracing (they trace the modules), and for
        tensor subclasses (FakeTensor, ...) -- there the modules and ``mimb_scale`` run."""
        fc = tuple(self.fc)  # one pass (indexing a Sequential twice costs more)
        w1, w2 = fc[0].weight, fc[2].weight
        args = self._embed_args(x, sel, lin1, bn, lin2, (w1, w2))
        return None if args is None else TrainStep.apply(dense(x), sel, w1, w2, *args)

    @staticmethod
    def _embed_args(x: Tensor, sel: Tensor, lin1: nn.Linear, bn, lin2: nn.Linear, more=()):
        """The embedding operands of the fused training step / :class:`TrainEmbedding`:
        ``(e1, b1, gamma, beta, e2, b2, running_mean, running_var, momentum, eps,
        batch_norm)``, with ``nn.BatchNorm1d``'s bookkeeping for this step done; or None
        where the autograd functions must not run: under ``torch.compile`` / export and
        TorchScript tracing (they trace the modules), and for tensor subclasses (FakeTensor,
        ...) -- there the modules run."""
        e1, b1, e2, b2 = lin1.weight, lin1.bias, lin2.weight, lin2.bias
        tensors = (x, sel, e1, b1, e2, b2, *more) + ((bn.weight, bn.bias) if bn is not None else ())
        if (torch.compiler.is_compiling() or torch.jit.is_tracing()
                or not all(type(t) in _PLAIN for t in tensors)):
            return None
        if bn is None:
            empty = x.new_empty(0, dtype=torch.float32)
            return e1, b1, empty, empty, e2, b2, empty, empty, 0.0, 0.0, False
        # The step updates the running statistics itself, so it also does nn.BatchNorm1d's
        # bookkeeping for this step (_BatchNorm.forward; no public function returns it):
        # count the batch, and the momentum is 1 / count (cumulative average) when None.
        bn.num_batches_tracked.add_(1)
        momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else float(bn.momentum)
        return (e1, b1, bn.weight, bn.bias, e2, b2, bn.running_mean, bn.running_var, momentum,
                float(bn.eps), True)

    def _train_embedding(self, x: Tensor, sel: Tensor) -> Tensor:
        """``v [R, C]`` of the selectors ``sel [R, N]`` in training mode (the BatchNorm on the
        ``R`` rows): :class:`TrainEmbedding` (the training step's float64 BatchNorm path)
        where the fused step could run, else the modules."""
        layers = self._fused_train_layers(x, rows=sel.shape[0])
        e1 = (self.fc_lambda[0] if layers is None else layers[0]).weight
        sel = sel.to(e1.dtype)
        args = None if layers is None else self._embed_args(x, sel, *layers)
        if args is None:
            return self.fc_lambda(sel)
        return TrainEmbedding.apply(sel, *args, compute_dtype(x))

    def instances(self, x: Tensor, selector: Optional[Tensor] = None) -> Tensor:
        """All N instances at once: ``[N*B, C, H, W]``, instance-major, from one read of ``x``
        via :func:`~mipnet_kernels.mimb_instances`.

        Eval mode: ``y[n*B + b]`` is ``forward(x, n)[b]`` (the cached ``[N, C]`` table; the
        parameters are used detached, the result is differentiable w.r.t. ``x`` only).

        Training mode: the output sample ``n*B + b`` is the block applied to ``x[b]`` with the
        selector ``selector[n*B + b]`` (default: the instance-major one-hot rows, instance
        ``n``), the embedding's BatchNorm on the batch statistics of all ``N*B`` selectors --
        i.e. ``forward(x.repeat(N, 1, 1, 1), selector)``, the official way of training N
        instances (every crop repeated with each λ), without the repeated copy of ``x``: the
        embedding runs as the training step's (a per-sample table ``[N, B, C]``; its BatchNorm
        path in float64, or this module's ``fc_lambda`` where the fused step would not run),
        the block through ``mimb_instances``, differentiable w.r.t. ``x`` and every parameter.
        """
        self._check_x(x)
        N, B = self.num_instances, x.shape[0]
        if not (self.training or self._embed_uses_batch_stats()):
            if selector is not None:
                raise ValueError("selector is for training mode; in eval mode instance n uses row n "
                                 "of the embedding table")
            table = self._eval_embedding()[4]
            return mimb_instances(x, self.w1.detach(), self.w2.detach(), table)
        if self._cache is not None:  # the BatchNorm's running statistics change
            self._cache = None
        e1 = self.fc_lambda[0].weight
        if selector is None:
            selector = torch.eye(N, dtype=e1.dtype, device=x.device).repeat_interleave(B, dim=0)
        elif (not isinstance(selector, Tensor) or not selector.is_floating_point()
              or tuple(selector.shape) != (N * B, N)):
            raise ValueError(f"selector must be a float tensor [N*B, N] = [{N * B}, {N}] (row n*B + b for "
                             f"output sample n*B + b), got {selector!r:.80}")
        elif selector.device != x.device:
            raise ValueError(f"selector is on {selector.device} but x is on {x.device}")
        v = self._train_embedding(x, selector)  # [N*B, C], BatchNorm over the N*B rows
        return mimb_instances(x, self.w1, self.w2, v.unflatten(0, (N, B)))
