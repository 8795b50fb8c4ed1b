"""Loading checkpoints: ours and the official HRNet / SimpleBaseline / MIPNet ones.

Our models use the official parameter names (see :mod:`mipnet.models.hrnet` and
:mod:`mipnet.models.resnet`), so no parameter is renamed; what differs between sources is
the container:

* ours: ``{"model": state_dict, ...}`` or a bare state dict;
* official pose checkpoints (``pose_hrnet_w32_256x192.pth``, ``pose_resnet_50_256x192.pth``,
  MIPNet's ``pose_hrnet_se_lambda`` models): a bare state dict, sometimes saved from
  ``nn.DataParallel`` (``module.`` prefixes);
* official training checkpoints (``checkpoint.pth``): ``{"state_dict": ..., "epoch": ...,
  "optimizer": ...}`` (also ``best_state_dict``);
* ``torch.compile``-wrapped models: ``_orig_mod.`` prefixes.

The official MIPNet selector for N = 2 is ``lambda_vec = [lambda, 1 - lambda]``; its
``[1, 0]`` is one-hot instance 0 of ours, so ``fc_lambda.0.weight [C/4, 2]`` loads as is.
State dicts saved before PyTorch 0.4.1 (the original SimpleBaseline models) have no
BatchNorm ``num_batches_tracked``; those are not reported missing (the counter only matters
for ``momentum=None``).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Union

import torch
from torch import Tensor, nn

from mipnet_kernels import MIMB

#: Containers that hold the state dict in training checkpoints, in order of preference.
STATE_DICT_KEYS = ("model", "state_dict", "best_state_dict", "model_state_dict")
#: Wrapper prefixes removed from every key (DataParallel / DistributedDataParallel, torch.compile).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_MAX_NAMES_IN_MESSAGE = 20


@dataclass
class LoadReport:
    """What :func:`load_checkpoint` did not load.

    Attributes:
        missing: parameter/buffer names of the model absent from the checkpoint (left as they were).
        unexpected: checkpoint names the model does not have (ignored).
        mismatched: ``(name, checkpoint shape, model shape)`` of names whose shapes differ (ignored).
        wrong_dtype: ``(name, checkpoint dtype, model dtype)`` where one is floating point and
            the other is not (an int64 tensor would be truncated into a float parameter; ignored).
        non_finite: floating-point names holding NaN or inf in the checkpoint (ignored).
        mimb_at_init: MIMB modules none of whose parameters were in the checkpoint (e.g. a
            baseline HRNet checkpoint loaded into a MIPNet model): they keep their initialisation.
    """

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    wrong_dtype: list[tuple[str, torch.dtype, torch.dtype]] = field(default_factory=list)
    non_finite: list[str] = field(default_factory=list)
    mimb_at_init: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every name matched and every value can be loaded (nothing missing,
        unexpected, mismatched, of the wrong kind of dtype or non-finite)."""
        return not (self.missing or self.unexpected or self.mismatched or self.wrong_dtype
                    or self.non_finite)

    def describe(self) -> str:
        def names(items) -> str:
            items = list(items)
            shown = ", ".join(items[:_MAX_NAMES_IN_MESSAGE])
            more = len(items) - _MAX_NAMES_IN_MESSAGE
            return shown + (f", ... and {more} more" if more > 0 else "")

        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing key(s) (in the model, not in the checkpoint): "
                         + names(self.missing))
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected key(s) (in the checkpoint, not in the model): "
                         + names(self.unexpected))
        if self.mismatched:
            parts.append(f"{len(self.mismatched)} shape mismatch(es) (checkpoint vs model): " + names(
                f"{n} {list(a)} vs {list(b)}" for n, a, b in self.mismatched))
        if self.wrong_dtype:
            parts.append(f"{len(self.wrong_dtype)} dtype mismatch(es) (checkpoint vs model): " + names(
                f"{n} {str(a).replace('torch.', '')} vs {str(b).replace('torch.', '')}"
                for n, a, b in self.wrong_dtype))
        if self.non_finite:
            parts.append(f"{len(self.non_finite)} tensor(s) with NaN or inf values: " + names(self.non_finite))
        if self.mimb_at_init:
            parts.append(f"{len(self.mimb_at_init)} MIMB block(s) left at their initialisation: "
                         + names(self.mimb_at_init))
        return "; ".join(parts) if parts else "all keys matched"


class CheckpointFileError(ValueError):
    """A checkpoint file that cannot be read as a PyTorch checkpoint (text, empty, truncated,
    or refused by ``torch.load(weights_only=True)``); the message names the file."""


class CheckpointMismatchError(RuntimeError):
    """Raised by a strict :func:`load_checkpoint`; ``.report`` has the full lists of names."""

    def __init__(self, report: LoadReport) -> None:
        super().__init__(f"checkpoint does not match the model: {report.describe()}")
        self.report = report


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()
    )


def extract_state_dict(checkpoint: Any) -> dict[str, Tensor]:
    """The state dict inside ``checkpoint`` (bare, or under one of :data:`STATE_DICT_KEYS`),
    with the :data:`WRAPPER_PREFIXES` removed from its keys."""
    sd = None
    if _is_state_dict(checkpoint):
        sd = checkpoint
    elif isinstance(checkpoint, Mapping):
        sd = next((checkpoint[k] for k in STATE_DICT_KEYS if _is_state_dict(checkpoint.get(k))), None)
    if sd is None:
        what = (f"a mapping with keys {sorted(map(str, checkpoint))[:10]}" if isinstance(checkpoint, Mapping)
                else type(checkpoint).__name__)
        raise TypeError(
            "checkpoint must be a state dict (str -> Tensor) or a mapping holding one under "
            f"{', '.join(repr(k) for k in STATE_DICT_KEYS)}; got {what}"
        )
    out = {}
    for key, value in sd.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        if key in out:
            raise ValueError(f"checkpoint has key {key!r} twice (with and without a wrapper prefix)")
        out[key] = value
    return out


def _mimb_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, MIMB)]


def _is_batch_counter(name: str) -> bool:
    return name.endswith(".num_batches_tracked") or name == "num_batches_tracked"


def read_checkpoint_file(path: Union[str, os.PathLike], map_location=None) -> Any:
    """``torch.load(path, weights_only=True)``; a file that is not a readable PyTorch checkpoint
    raises :class:`CheckpointFileError` naming it and why (``OSError`` for a missing file
    or no permission, as ``open`` raises)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except OSError:
        raise
    except Exception as exc:  # noqa: BLE001 - the unpickler raises anything on a bad file
        with open(path, "rb") as fh:
            head = fh.read(2)
        if not head:
            why = "the file is empty"
        elif head != b"PK" and head[:1] != b"\x80":  # torch.save's zip archive / a pickle
            why = "neither a zip archive nor a pickle, as torch.save writes"
        else:
            first = str(exc).splitlines()[0][:200] if str(exc) else ""
            why = f"{type(exc).__name__}: {first}"
        raise CheckpointFileError(f"{os.fspath(path)} is not a readable PyTorch checkpoint ({why})") from exc


def load_checkpoint(model: nn.Module, checkpoint: Union[str, os.PathLike, Mapping[str, Any]],
                    strict: bool = True, map_location: Union[str, torch.device, None] = "cpu") -> LoadReport:
    """Load ``checkpoint`` (a path or an already loaded object) into ``model``.

    Args:
        model: a model of :func:`mipnet.models.build_model` (any ``nn.Module`` works).
        checkpoint: a file (read with ``torch.load(weights_only=True)``) or a state dict /
            checkpoint mapping (see the module docstring for the accepted formats).
        strict: raise :class:`CheckpointMismatchError` (naming the keys) when any key is
            missing, unexpected or of another shape; nothing is loaded then.  With
            ``strict=False`` every matching key is loaded, the rest reported.
        map_location: passed to ``torch.load``.

    Returns:
        A :class:`LoadReport`.  When MIMB blocks got no parameter from the checkpoint
        (a baseline checkpoint into a MIPNet model), a warning names them.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = read_checkpoint_file(checkpoint, map_location)
    sd = extract_state_dict(checkpoint)
    own = model.state_dict()

    report = LoadReport()
    report.missing = [k for k in own if k not in sd and not _is_batch_counter(k)]
    report.unexpected = [k for k in sd if k not in own]
    report.mismatched = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in sd.items()
                         if k in own and v.shape != own[k].shape]
    report.wrong_dtype = [(k, v.dtype, own[k].dtype) for k, v in sd.items()
                          if k in own and v.is_floating_point() != own[k].is_floating_point()]
    report.non_finite = [k for k, v in sd.items()
                         if k in own and v.is_floating_point() and v.numel() and not bool(torch.isfinite(v).all())]
    missing = set(report.missing)
    for name in _mimb_names(model):
        keys = [k for k in own if k.startswith(name + ".") and not _is_batch_counter(k)]
        if keys and all(k in missing for k in keys):
            report.mimb_at_init.append(name)
    if strict and not report.ok:
        raise CheckpointMismatchError(report)

    bad = ({name for name, _, _ in report.mismatched} | {name for name, _, _ in report.wrong_dtype}
           | set(report.non_finite))
    model.load_state_dict({k: v for k, v in sd.items() if k in own and k not in bad}, strict=False)
    if report.mimb_at_init:
        warnings.warn(
            f"load_checkpoint: {len(report.mimb_at_init)} MIMB block(s) got no weights from the "
            f"checkpoint and keep their initialisation: {', '.join(report.mimb_at_init)}",
            stacklevel=2,
        )
    return report


__all__ = ["CheckpointFileError", "CheckpointMismatchError", "LoadReport", "extract_state_dict",
           "load_checkpoint", "read_checkpoint_file"]
