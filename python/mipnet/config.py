"""Configuration of ``mipnet train`` / ``mipnet eval``: typed dataclasses, YAML files, CLI overrides.

One :class:`Config` holds four sections -- ``model``, ``data``, ``train``, ``eval`` -- so the
same file drives training and the evaluation of what it trained (as HRNet's yacs configs do).
A YAML file gives any subset of the fields; ``key.sub=value`` overrides (values parsed as
YAML: ``train.lr_steps=[170,200]``, ``model.init_checkpoint=null``) are applied after it::

    cfg = load_config("configs/synthetic_mipnet_w32.yaml", ["train.epochs=3", "model.num_instances=2"])

Unknown keys, values of the wrong type and impossible settings raise ``ValueError`` naming
the key; missing dataset files raise ``FileNotFoundError`` naming the key (:meth:`Config.validate`).
``dataclasses.asdict(cfg)`` is what checkpoints store; :func:`config_from_dict` reads it back.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from .models import arch_names


def _yaml():
    """PyYAML, imported on first use (configs are the only reason this package needs it)."""
    import yaml

    return yaml


DATA_KINDS = ("synthetic", "coco", "crowdpose", "ochuman")
AMP_MODES = ("none", "bf16", "fp16")
DECODE_MODES = ("argmax", "quarter", "dark", "udp")
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_CACHE = Path(os.environ.get("MIPNET_CACHE", Path.home() / ".cache" / "mipnet"))


@dataclass
class ModelConfig:
    """``arch``: a :data:`mipnet.models.ARCHS` name or a small demo net (:data:`mipnet.models.SMALL_ARCHS`);
    ``num_instances``: N (1 = the baseline); ``init_checkpoint``: HRNet/MIPNet weights to
    start from (:func:`mipnet.models.load_checkpoint`, non-strict: a baseline checkpoint
    into a MIPNet model leaves the MIMBs at their initialisation)."""

    arch: str = "hrnet_w32"
    num_instances: int = 2
    init_checkpoint: Optional[str] = None


@dataclass
class SyntheticConfig:
    """The embedded synthetic crowd (:func:`mipnet.data.synthetic.generate`), rendered once into
    ``cache_dir`` (train with ``seed``, val with ``seed + 1``) and reused."""

    train_images: int = 2000
    val_images: int = 300
    image_size: tuple[int, int] = (192, 256)
    seed: int = 0
    cache_dir: str = str(DEFAULT_CACHE / "synthetic")


@dataclass
class DataConfig:
    """Dataset files and crop geometry.  ``kind="synthetic"`` ignores the paths.

    ``val_boxes``: a detection results JSON for evaluation (None: ground-truth boxes).
    ``heatmap_size``/``sigma`` None: input/4 and the paper's σ (2 at 64×48).
    ``selection``/``min_keypoints``: the multi-instance rule (:mod:`mipnet.data.targets`).
    """

    kind: str = "synthetic"
    train_annotations: Optional[str] = None
    train_images: Optional[str] = None
    val_annotations: Optional[str] = None
    val_images: Optional[str] = None
    val_boxes: Optional[str] = None
    input_size: tuple[int, int] = (256, 192)
    heatmap_size: Optional[tuple[int, int]] = None
    sigma: Optional[float] = None
    selection: str = "paper"
    min_keypoints: int = 3
    augment: bool = True
    workers: int = 2
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class TrainConfig:
    """Optimisation (the paper's: Adam, lr 1e-3, ×0.1 at epochs 170 and 200 of 210), AMP, output.

    ``batch_size`` is per process (images; MIPNet runs each image N times per step).
    ``amp``: ``"bf16"`` autocast (CPU or GPU), ``"fp16"`` autocast + GradScaler (GPU only).
    ``resume``: continue from ``output_dir/checkpoint.pth``.  ``threads``: intra-op CPU
    threads (None: torch's default).  ``max_steps_per_epoch``: cut epochs short (smoke runs).
    ``shared_trunk``: run each step as ``model.forward_instances`` -- the λ-independent trunk
    once on the B crops, the N instances from the first MIMBs on -- instead of the official
    N-fold repeated batch (false); the same weights up to float rounding, at a fraction of
    the cost (:mod:`mipnet.train`).
    """

    epochs: int = 210
    batch_size: int = 32
    lr: float = 1e-3
    lr_steps: tuple[int, ...] = (170, 200)
    lr_factor: float = 0.1
    weight_decay: float = 0.0
    amp: str = "none"
    seed: int = 0
    output_dir: str = "runs/mipnet"
    resume: bool = False
    device: str = "auto"
    threads: Optional[int] = None
    log_every: int = 50
    max_steps_per_epoch: Optional[int] = None
    progress: bool = True
    shared_trunk: bool = True


@dataclass
class EvalConfig:
    """Evaluation: ``checkpoint`` (default ``train.output_dir/checkpoint.pth``), flip test,
    decoding, and the official post-processing -- rescoring with keypoint scores above
    ``in_vis_threshold``, secondary instances' box score × ``secondary_score_decay``
    (MIPNet's ``TEST.DECAY_THRE``), OKS-NMS at ``oks_threshold``."""

    checkpoint: Optional[str] = None
    batch_size: int = 64
    flip_test: bool = True
    decode: str = "quarter"
    in_vis_threshold: float = 0.2
    oks_threshold: float = 0.9
    secondary_score_decay: float = 0.5
    output_dir: Optional[str] = None
    amp: str = "none"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self, *, need_train_data: bool = False, need_val_data: bool = False) -> "Config":
        """Check values (``ValueError`` naming the key) and, when asked, that the dataset
        files exist (``FileNotFoundError`` naming the key).  Returns ``self``."""
        m, d, t, e = self.model, self.data, self.train, self.eval
        if m.arch not in arch_names():
            raise ValueError(f"model.arch must be one of {list(arch_names())}, got {m.arch!r}")
        _positive("model.num_instances", m.num_instances)
        if d.kind not in DATA_KINDS:
            raise ValueError(f"data.kind must be one of {DATA_KINDS}, got {d.kind!r}")
        for name in ("input_size",) + (("heatmap_size",) if d.heatmap_size is not None else ()):
            size = getattr(d, name)
            if len(size) != 2 or min(size) <= 0:
                raise ValueError(f"data.{name} must be (height, width) > 0, got {size!r}")
        if d.sigma is not None and not d.sigma > 0:
            raise ValueError(f"data.sigma must be positive, got {d.sigma}")
        if d.workers < 0:
            raise ValueError(f"data.workers must be >= 0, got {d.workers}")
        s = d.synthetic
        _positive("data.synthetic.train_images", s.train_images)
        _positive("data.synthetic.val_images", s.val_images)
        for name in ("epochs", "batch_size", "log_every"):
            _positive(f"train.{name}", getattr(t, name))
        if t.max_steps_per_epoch is not None:
            _positive("train.max_steps_per_epoch", t.max_steps_per_epoch)
        if t.threads is not None:
            _positive("train.threads", t.threads)
        for name in ("lr", "lr_factor"):
            if not getattr(t, name) > 0:
                raise ValueError(f"train.{name} must be positive, got {getattr(t, name)}")
        if t.weight_decay < 0:
            raise ValueError(f"train.weight_decay must be >= 0, got {t.weight_decay}")
        if list(t.lr_steps) != sorted(set(t.lr_steps)) or any(v <= 0 for v in t.lr_steps):
            raise ValueError(f"train.lr_steps must be increasing positive epochs, got {list(t.lr_steps)}")
        for key, value, choices in (
            ("train.amp", t.amp, AMP_MODES), ("eval.amp", e.amp, AMP_MODES),
            ("train.device", t.device, DEVICES), ("eval.decode", e.decode, DECODE_MODES),
        ):
            if value not in choices:
                raise ValueError(f"{key} must be one of {choices}, got {value!r}")
        _positive("eval.batch_size", e.batch_size)
        for name in ("in_vis_threshold", "oks_threshold", "secondary_score_decay"):
            if not 0 <= getattr(e, name) <= 1:
                raise ValueError(f"eval.{name} must be in [0, 1], got {getattr(e, name)}")
        if d.kind != "synthetic":
            wanted = []
            if need_train_data:
                wanted += [("train_annotations", "file"), ("train_images", "dir")]
            if need_val_data:
                wanted += [("val_annotations", "file"), ("val_images", "dir")]
                if d.val_boxes is not None:
                    wanted.append(("val_boxes", "file"))
            for name, what in wanted:
                _require_path(f"data.{name}", getattr(d, name), what, d.kind)
        if m.init_checkpoint is not None:
            _require_path("model.init_checkpoint", m.init_checkpoint, "file")
        return self


def _positive(key: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key} must be a positive int, got {value!r}")


def _require_path(key: str, value: Optional[str], what: str, kind: str | None = None) -> None:
    if value is None:
        raise ValueError(f"{key} is required" + (f" for data.kind={kind!r}" if kind else ""))
    p = Path(value).expanduser()
    if (what == "file" and not p.is_file()) or (what == "dir" and not p.is_dir()):
        raise FileNotFoundError(f"{key}: {what} {str(p)!r} does not exist")


# ------------------------------------------------------------------------------ loading
def _coerce(key: str, value: Any, hint: Any) -> Any:
    """``value`` checked/converted to the annotation ``hint`` (dataclasses recurse)."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(key, value, args[0])
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"{key} must be a mapping of its fields, got {value!r}")
        return _from_mapping(hint, value, key + ".")
    if value is None:
        raise ValueError(f"{key} must not be null")
    if origin is tuple:
        args = typing.get_args(hint)
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise ValueError(f"{key} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ValueError(f"{key} must have {len(args)} items, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key} must be an int, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, (str, os.PathLike)):
            raise ValueError(f"{key} must be a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported config type {hint!r} for {key}")  # pragma: no cover - schema bug


def _from_mapping(cls, values: Mapping[str, Any], prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
                         f"valid keys of {prefix or 'the top level'}: {', '.join(sorted(names))}")
    return cls(**{k: _coerce(prefix + k, v, hints[k]) for k, v in values.items()})


def config_from_dict(values: Mapping[str, Any] | None) -> Config:
    """A :class:`Config` from nested mappings (missing keys keep their defaults)."""
    return _from_mapping(Config, values or {})


def apply_overrides(values: dict, overrides: Sequence[str]) -> dict:
    """Apply ``section.key=value`` strings (value parsed as YAML) to nested dict ``values``."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} must look like section.key=value")
        try:
            value = _yaml().safe_load(raw)
        except _yaml().YAMLError as e:
            raise ValueError(f"override {item!r}: value is not valid YAML: {e}") from None
        node = values
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return values


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file at ``path`` (if any), then ``overrides``."""
    values: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {str(p)!r} does not exist")
        try:
            loaded = _yaml().safe_load(p.read_text())
        except _yaml().YAMLError as e:
            raise ValueError(f"config file {str(p)!r} is not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"config file {str(p)!r} must hold a mapping of sections, got {type(loaded).__name__}")
        values = loaded or {}
    return config_from_dict(apply_overrides(values, overrides))


def dump_config(cfg: Config) -> str:
    """YAML text of ``cfg`` (tuples as lists), loadable by :func:`load_config`."""
    def plain(v):
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        return v

    return _yaml().safe_dump(plain(dataclasses.asdict(cfg)), sort_keys=False)


__all__ = [
    "AMP_MODES", "Config", "DATA_KINDS", "DataConfig", "EvalConfig", "ModelConfig", "SyntheticConfig",
    "TrainConfig", "apply_overrides", "config_from_dict", "dump_config", "load_config",
]
