"""The one flat search configuration: a frozen dataclass, loaded from YAML, validated at load.

The same keys are used by search files, ``--set key=value`` and (later) sweep specs. Fields left
at ``None`` take a default that depends on the dataset and the mode (``resolve``); the resolved
config is what runs and what is saved beside every result.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from .settings import (PATH_SETTINGS, ConfigError, YamlLoader, absolute_path, did_you_mean,  # noqa: F401
                       parse_overrides, read_yaml, unknown_setting, yaml_error)
from .ops import DARTS_PRIMITIVES, OPS
from .temperature import SCHEDULES

MODES = ("darts", "entrannas", "dst", "random")
DATASETS = ("digits", "noisy_digits", "synthetic", "cifar10", "cifar100", "imagenet")
PLACEMENT_PRESETS = ("first", "last", "all")
PRECISIONS = ("fp32", "bf16")


#: Training images of the in-memory datasets (CIFAR as torchvision ships it); classes: data.DATA_INFO.
TRAIN_IMAGES = {"digits": 1500, "noisy_digits": 1500, "synthetic": 2048, "cifar10": 50000, "cifar100": 50000}
CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}

#: Unless set, the last fifth of a search's epochs (rounded down) are settling epochs (docs/method.md).
SETTLE_EPOCHS_PER = 5


def check_device_support(config: "SearchConfig", device) -> None:
    """Refuse settings that a device is known to compute wrongly, before any data or model exists.

    Only the device a job runs on can tell (a sweep's trials may run on other machines than its
    driver), so jobs call this once they know their device."""
    if config.op_streams > 1 and device.type != "cuda":
        raise ConfigError("op_streams", config.op_streams,
                          f"more than 1 needs a CUDA device; this job runs on {device}")
    if config.cuda_graphs and device.type != "cuda":
        raise ConfigError("cuda_graphs", True, f"records CUDA graphs, so it needs a CUDA device; this job runs on {device}")
    if device.type == "cpu" and config.precision == "bf16" and config.channels_last:
        # Measured with torch 2.14.1: a bf16 channels_last depthwise 5x5 conv with dilation 2 on 4
        # channels (dil_conv_5x5 after the bottleneck) gets NaN weight gradients at 32x32 inputs.
        raise ConfigError("channels_last", True,
                          "with precision bf16 on the CPU, torch's kernel returns NaN weight gradients for "
                          "dil_conv_5x5 at some shapes; on the CPU use bf16 or channels_last, not both")


class FlatConfig:
    """Shared behaviour of the flat, frozen config dataclasses: YAML in, validated values out."""

    @classmethod
    def from_dict(cls, data: dict):
        """Build from plain values (YAML), rejecting unknown keys and coercing types."""
        if not isinstance(data, dict):
            raise ConfigError("config", data, "expected a mapping of setting names to values")
        known = [f.name for f in fields(cls)]
        for key in data:
            if key not in known:
                raise ConfigError(key, data[key], unknown_setting(key, known))
        return cls(**{key: _coerce(cls, key, value) for key, value in data.items()})

    @classmethod
    def field_defaults(cls) -> dict:
        """Each setting's default as ``to_dict`` writes it (settings whose default is None left out)."""
        return {f.name: list(f.default) if isinstance(f.default, tuple) else f.default
                for f in fields(cls) if f.default is not dataclasses.MISSING and f.default is not None}

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)

    def _fill(self, defaults: dict):
        return dataclasses.replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})

    def _check(self, positive_ints=(), nonneg_ints=(), nonneg=(), positive=(), unit=()) -> None:
        for name in positive_ints:
            if getattr(self, name) < 1:
                raise ConfigError(name, getattr(self, name), "must be an integer >= 1")
        for name in nonneg_ints:
            if getattr(self, name) < 0:
                raise ConfigError(name, getattr(self, name), "must be an integer >= 0")
        for name in nonneg:
            if getattr(self, name) < 0:
                raise ConfigError(name, getattr(self, name), "must be >= 0")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(name, getattr(self, name), "must be > 0")
        for name in unit:
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(name, getattr(self, name), "must be in [0, 1)")
        if self.dataset not in DATASETS:
            raise ConfigError("dataset", self.dataset, f"allowed: {', '.join(DATASETS)}")
        if not 0 < self.subset_fraction <= 1:
            raise ConfigError("subset_fraction", self.subset_fraction, "must be in (0, 1]")
        if self.dataset in ("cifar10", "cifar100", "imagenet"):
            if self.data_dir is None:
                raise ConfigError("data_dir", None, f"dataset {self.dataset} needs a data directory")
            if not Path(self.data_dir).is_dir() and not (self.download and self.dataset != "imagenet"):
                hint = " (or set download: true)" if self.dataset != "imagenet" else ""
                raise ConfigError("data_dir", self.data_dir, f"is not an existing directory{hint}")
            folder = CIFAR_FOLDERS.get(self.dataset)
            if folder and not self.download and not (Path(self.data_dir) / folder).is_dir():
                raise ConfigError("data_dir", self.data_dir, f"has no {folder}/ folder (torchvision's "
                                  f"{self.dataset} layout); put the data there or set download: true")
        if not (self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda", "mps")):
            raise ConfigError("device", self.device, "allowed: auto, cpu, cuda, cuda:N, mps")


@dataclass(frozen=True)
class SearchConfig(FlatConfig):
    """Every setting of one search. ``None`` means "the default for this dataset and mode"."""

    # what to search
    mode: str = "entrannas"             # darts | entrannas | dst | random (a genotype drawn by the seed)
    dataset: str = "digits"             # digits | noisy_digits | synthetic | cifar10 | cifar100 | imagenet
    data_dir: Optional[str] = None      # needed by cifar10/cifar100/imagenet
    download: bool = False              # cifar only: fetch into data_dir when missing
    epochs: Optional[int] = None
    batch_size: Optional[int] = None
    seed: int = 0
    # EnTranNAS
    lambda_: float = 0.1                # DST sparsity weight (Eq. 11); other modes ignore it
    placement: Union[str, tuple, None] = None  # first | last | all | list of cell indices
    feature_sharing: Optional[bool] = None
    bottleneck_ratio: Optional[int] = None
    tau_schedule: Optional[str] = None  # constant | linear | exponential | cosine
    tau_start: Optional[float] = None
    tau_end: Optional[float] = None
    beta_init: float = 0.0              # initial threshold logit: t = sigmoid(0) = 0.5 (our choice)
    beta_lr: Optional[float] = None     # plain SGD step on beta (DST), so that lambda sets its pace
    # search space
    primitives: tuple = DARTS_PRIMITIVES
    layers: Optional[int] = None
    init_channels: Optional[int] = None
    nodes: int = 4
    # optimisation
    unrolled: bool = False
    arch_warmup_epochs: Optional[int] = None
    settle_epochs: Optional[int] = None  # last epochs (default epochs // 5): alpha/beta frozen, tau at
    #                                      tau_end, the weights trained on the derived architecture
    lr: Optional[float] = None
    lr_min: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip: float = 5.0
    arch_lr: Optional[float] = None
    arch_weight_decay: float = 1e-3     # on alpha only (DARTS); beta has none (Eq. 11 is its only pull)
    arch_beta1: float = 0.5
    arch_beta2: float = 0.999
    # data split and loading
    train_portion: Optional[float] = None  # share of the (sub-sampled) training set for the weights
    subset_fraction: Optional[float] = None  # share of each class used at all (ImageNet: PC-DARTS)
    num_workers: int = 2                # image-folder datasets only
    device: str = "auto"                # auto | cpu | cuda | cuda:N | mps
    precision: str = "fp32"             # fp32 | bf16 (autocast for the forward passes)
    channels_last: bool = False         # NHWC memory format for the model and its inputs
    cuda_graphs: bool = False           # record each hot derived architecture's passes as CUDA graphs
    #                                     (CUDA only, first-order only; entrannas.cuda_graphs)
    op_streams: int = 1                 # CUDA streams a cell spreads the candidate ops of one source over
    #                                     (1: the current stream only; see supernet.OpStreams)

    # -- defaults and checks ----------------------------------------------------------------------
    def resolve(self) -> "SearchConfig":
        """Fill the ``None`` fields from the dataset and mode defaults, then validate everything."""
        self._check_choices()
        resolved = self._fill({**DATASET_DEFAULTS[self.dataset], **MODE_DEFAULTS[self.mode]})
        if resolved.settle_epochs is None:
            resolved = dataclasses.replace(resolved, settle_epochs=resolved.epochs // SETTLE_EPOCHS_PER)
        if self.mode == "random":
            # Nothing is trained: the genotype is drawn once, so the run is one epoch long.
            resolved = dataclasses.replace(resolved, epochs=1, arch_warmup_epochs=0, settle_epochs=0)
        if self.mode == "dst" and "none" in resolved.primitives:
            # In DST sparsity is learned by the thresholds, so 'none' is no candidate (Sec. 2.4).
            resolved = dataclasses.replace(
                resolved, primitives=tuple(p for p in resolved.primitives if p != "none"))
        resolved.validate()
        return resolved

    def _check_choices(self) -> None:
        if self.mode not in MODES:
            raise ConfigError("mode", self.mode, f"allowed: {', '.join(MODES)}")
        if self.dataset not in DATASETS:
            raise ConfigError("dataset", self.dataset, f"allowed: {', '.join(DATASETS)}")

    def validate(self) -> None:
        """Check a resolved config; raises ``ConfigError`` on the first bad field."""
        self._check_choices()
        self._check(positive_ints=("epochs", "batch_size", "layers", "init_channels", "nodes", "bottleneck_ratio",
                                   "op_streams"),
                    nonneg_ints=("seed", "arch_warmup_epochs", "settle_epochs", "num_workers"),
                    nonneg=("lambda_", "beta_lr", "lr_min", "weight_decay", "arch_weight_decay", "grad_clip"),
                    positive=("lr", "arch_lr", "tau_start", "tau_end"),
                    unit=("momentum", "arch_beta1", "arch_beta2"))
        if self.layers < 3:
            raise ConfigError("layers", self.layers,
                              "must be >= 3 so that the net has a normal and a reduction cell")
        if self.settle_epochs >= self.epochs:
            raise ConfigError("settle_epochs", self.settle_epochs,
                              f"must be less than epochs ({self.epochs}): the settling epochs end the search")
        if not 0 < self.train_portion < 1:
            raise ConfigError("train_portion", self.train_portion, "must be in (0, 1)")
        self._check_split_sizes()
        if self.tau_schedule not in SCHEDULES:
            raise ConfigError("tau_schedule", self.tau_schedule, f"allowed: {', '.join(SCHEDULES)}")
        if self.precision not in PRECISIONS:
            raise ConfigError("precision", self.precision, f"allowed: {', '.join(PRECISIONS)}")
        self._check_primitives()
        self._check_placement()
        self._check_bottleneck()
        if self.cuda_graphs and self.unrolled:
            raise ConfigError("cuda_graphs", True, "records the first-order step's passes; the unrolled step "
                              "(unrolled: true) runs the net on virtual weights that recorded graphs would not read")

    def _check_split_sizes(self) -> None:
        """The weights' and the architecture's share of an in-memory training set must each hold at
        least as many images as there are classes (an empty one would fail after an epoch)."""
        if self.dataset not in TRAIN_IMAGES:
            return
        from .data import DATA_INFO   # data imports this module for its folder names

        images, classes = TRAIN_IMAGES[self.dataset], DATA_INFO[self.dataset].num_classes
        for share, what in ((self.train_portion, "weights"), (1 - self.train_portion, "architecture")):
            n = int(images * share * self.subset_fraction)
            if n < classes:
                raise ConfigError("subset_fraction", self.subset_fraction,
                                  f"leaves {n} of {self.dataset}'s {images} training images for the {what} "
                                  f"(train_portion {self.train_portion}); at least {classes}, one per class, "
                                  f"needs subset_fraction >= {classes / (images * share):.4g}")

    def _check_primitives(self) -> None:
        if not self.primitives:
            raise ConfigError("primitives", list(self.primitives), "needs at least one operation")
        for name in self.primitives:
            if name not in OPS:
                raise ConfigError("primitives", name, f"unknown operation; allowed: {', '.join(OPS)}")
        if len(set(self.primitives)) != len(self.primitives):
            raise ConfigError("primitives", list(self.primitives), "lists an operation twice")
        if all(p == "none" for p in self.primitives):
            raise ConfigError("primitives", list(self.primitives), "needs an operation other than 'none'")

    def _check_placement(self) -> None:
        engines = self.engine_cells()
        reductions = set(self.reduction_cells())
        if not engines & reductions:
            raise ConfigError("placement", _show(self.placement),
                              f"has no reduction Engine-cell, so alpha_reduce would get no gradient; "
                              f"reduction cells are {sorted(reductions)}")
        if not engines - reductions:
            raise ConfigError("placement", _show(self.placement),
                              f"has no normal Engine-cell, so alpha_normal would get no gradient; "
                              f"normal cells are {sorted(set(range(self.layers)) - reductions)}")

    def _check_bottleneck(self) -> None:
        for index, channels in enumerate(self.cell_channels()):
            if channels % self.bottleneck_ratio:
                raise ConfigError("bottleneck_ratio", self.bottleneck_ratio,
                                  f"must divide every cell's channel count; cell {index} has {channels} "
                                  f"(init_channels={self.init_channels})")
            op_channels = channels // self.bottleneck_ratio
            if index in self.reduction_cells() and "skip_connect" in self.primitives and op_channels % 2:
                raise ConfigError("bottleneck_ratio", self.bottleneck_ratio,
                                  f"leaves {op_channels} channels in reduction cell {index}; its "
                                  "skip_connect (FactorizedReduce) needs an even count")

    # -- derived facts --------------------------------------------------------------------------
    def reduction_cells(self) -> list[int]:
        return [self.layers // 3, 2 * self.layers // 3]

    def cell_channels(self) -> list[int]:
        channels, out = self.init_channels, []
        for index in range(self.layers):
            if index in self.reduction_cells():
                channels *= 2
            out.append(channels)
        return out

    def engine_cells(self) -> set[int]:
        """Indices of the Engine-cells for this placement."""
        placement = self.placement
        if isinstance(placement, str):
            if placement == "all":
                return set(range(self.layers))
            reductions = self.reduction_cells()
            normals = [i for i in range(self.layers) if i not in reductions]
            if placement == "first":
                return {normals[0], reductions[0]}
            if placement == "last":
                return {normals[-1], reductions[-1]}
            raise ConfigError("placement", placement,
                              f"allowed: {', '.join(PLACEMENT_PRESETS)}, or a list of cell indices")
        cells = set()
        for index in placement:
            if not isinstance(index, int) or not 0 <= index < self.layers:
                raise ConfigError("placement", _show(placement),
                                  f"cell index {index!r} is not in 0..{self.layers - 1}")
            cells.add(index)
        return cells


def _show(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


# Defaults per dataset (CIFAR: PC-DARTS' large-batch settings; the small ones are our choice, sized so
# that a digits search runs an epoch in seconds on two CPU cores).
_CIFAR = dict(epochs=50, batch_size=256, layers=8, init_channels=16, lr=0.1, arch_lr=6e-4,
              arch_warmup_epochs=15, beta_lr=0.025, train_portion=0.5, subset_fraction=1.0)
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": dict(epochs=10, batch_size=64, layers=5, init_channels=16, lr=0.05, arch_lr=6e-3,
                   arch_warmup_epochs=2, beta_lr=1.0, train_portion=0.5, subset_fraction=1.0),
    "synthetic": dict(_CIFAR),
    "cifar10": dict(_CIFAR),
    "cifar100": dict(_CIFAR),
    # PC-DARTS ImageNet search: 12.5% of each class, split 10% weights / 2.5% architecture.
    "imagenet": dict(_CIFAR, train_portion=0.8, subset_fraction=0.125),
}
DATASET_DEFAULTS["noisy_digits"] = DATASET_DEFAULTS["digits"]

# Defaults per mode: 'darts' is the DARTS super-net (every cell an Engine-cell, no sharing, no
# bottleneck, plain softmax); the EnTranNAS modes use the paper's setting (first cells as Engines,
# sharing, ratio 4) and anneal tau linearly from 1.0 to 0.1 (our choice: the paper gives no values).
MODE_DEFAULTS: dict[str, dict[str, Any]] = {
    "darts": dict(placement="all", feature_sharing=False, bottleneck_ratio=1, tau_schedule="constant",
                  tau_start=1.0, tau_end=1.0),
    "entrannas": dict(placement="first", feature_sharing=True, bottleneck_ratio=4, tau_schedule="linear",
                      tau_start=1.0, tau_end=0.1),
    "dst": dict(placement="first", feature_sharing=True, bottleneck_ratio=4, tau_schedule="linear",
                tau_start=1.0, tau_end=0.1),
    "random": dict(placement="first", feature_sharing=True, bottleneck_ratio=4, tau_schedule="constant",
                   tau_start=1.0, tau_end=1.0),
}


LR_SCHEDULES = ("cosine", "step")


@dataclass(frozen=True)
class EvalConfig(FlatConfig):
    """Every setting of one evaluation: a genotype trained from scratch (DARTS' recipes).

    ``None`` means "the standard recipe for this dataset": DARTS' CIFAR and ImageNet (mobile)
    settings, or a small network for digits. Any value can be overridden for a proxy evaluation."""

    dataset: str = "digits"
    data_dir: Optional[str] = None
    download: bool = False
    epochs: Optional[int] = None
    batch_size: Optional[int] = None
    seed: int = 0
    layers: Optional[int] = None
    init_channels: Optional[int] = None
    lr: Optional[float] = None
    lr_min: float = 0.0
    lr_schedule: Optional[str] = None   # cosine (to lr_min over the epochs) | step (x lr_gamma a epoch)
    lr_gamma: float = 0.97
    momentum: float = 0.9
    weight_decay: Optional[float] = None
    auxiliary: Optional[bool] = None
    auxiliary_weight: float = 0.4
    drop_path_prob: Optional[float] = None   # ramped linearly from 0 with the epoch, as DARTS
    cutout: Optional[int] = None
    grad_clip: float = 5.0
    label_smoothing: Optional[float] = None
    subset_fraction: float = 1.0        # share of each class of the training set (proxy runs)
    num_workers: int = 4
    device: str = "auto"

    def resolve(self) -> "EvalConfig":
        if self.dataset not in DATASETS:
            raise ConfigError("dataset", self.dataset, f"allowed: {', '.join(DATASETS)}")
        resolved = self._fill(EVAL_DEFAULTS[self.dataset])
        resolved.validate()
        return resolved

    def validate(self) -> None:
        self._check(positive_ints=("epochs", "batch_size", "layers", "init_channels"),
                    nonneg_ints=("seed", "cutout", "num_workers"),
                    nonneg=("lr_min", "weight_decay", "auxiliary_weight", "grad_clip"),
                    positive=("lr", "lr_gamma"),
                    unit=("momentum", "drop_path_prob", "label_smoothing"))
        if self.layers < 3:
            raise ConfigError("layers", self.layers, "must be >= 3 so that the net has a normal and a reduction cell")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError("lr_schedule", self.lr_schedule, f"allowed: {', '.join(LR_SCHEDULES)}")
        if self.auxiliary and self.dataset in ("digits", "noisy_digits"):
            raise ConfigError("auxiliary", True, "needs features of at least 5x5 at 2/3 depth; digits (8x8) "
                              "has 2x2 there: set auxiliary: false")


# The DARTS recipes (CIFAR; ImageNet mobile setting), and a small one for digits (our choice).
_EVAL_CIFAR = dict(epochs=600, batch_size=96, layers=20, init_channels=36, lr=0.025, lr_schedule="cosine",
                   weight_decay=3e-4, auxiliary=True, drop_path_prob=0.2, cutout=16, label_smoothing=0.0)
EVAL_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": dict(epochs=20, batch_size=64, layers=6, init_channels=16, lr=0.05, lr_schedule="cosine",
                   weight_decay=3e-4, auxiliary=False, drop_path_prob=0.0, cutout=0, label_smoothing=0.0),
    "synthetic": dict(_EVAL_CIFAR),
    "cifar10": dict(_EVAL_CIFAR),
    "cifar100": dict(_EVAL_CIFAR),
    "imagenet": dict(epochs=250, batch_size=128, layers=14, init_channels=48, lr=0.1, lr_schedule="step",
                     weight_decay=3e-5, auxiliary=True, drop_path_prob=0.0, cutout=0, label_smoothing=0.1),
}
EVAL_DEFAULTS["noisy_digits"] = EVAL_DEFAULTS["digits"]


# -- coercion of YAML / --set values -----------------------------------------------------------
def _coerce(cls: type, name: str, value: Any) -> Any:
    hint = typing.get_type_hints(cls)[name]
    if value is None:
        if type(None) in typing.get_args(hint):
            return None
        raise ConfigError(name, value, "must be set (it has no 'default' value)")
    if name in PATH_SETTINGS:
        if not isinstance(value, str):
            raise ConfigError(name, value, "must be a path")
        return absolute_path(value)
    if name == "placement":
        if isinstance(value, str) and "," in value:
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple)):
            try:
                return tuple(int(v) for v in value)
            except (TypeError, ValueError):
                raise ConfigError(name, value, "a list of cell indices must hold integers") from None
        if isinstance(value, str):
            return value
        raise ConfigError(name, value, f"allowed: {', '.join(PLACEMENT_PRESETS)}, or a list of cell indices")
    if name == "primitives":
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(name, value, "must be a list of operation names")
        return tuple(value)
    base = [t for t in typing.get_args(hint) if t is not type(None)] or [hint]
    target = base[0] if len(base) == 1 else None
    if target is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(name, value, "must be true or false")
    if target is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(name, value, "must be an integer")
    if target is float:
        if isinstance(value, bool):
            raise ConfigError(name, value, "must be a number")
        try:
            return float(value)  # YAML reads '1e-3' as a string
        except (TypeError, ValueError):
            raise ConfigError(name, value, "must be a number") from None
    if target is str:
        if isinstance(value, str):
            return value
        raise ConfigError(name, value, "must be a string")
    return value


def load_config(path: Optional[os.PathLike] = None, overrides: Optional[list[str]] = None,
                base: Optional[dict] = None, cls: type = None):
    """Read a YAML file (optional), apply ``--set`` overrides, resolve and validate.

    ``cls`` is the config class (``SearchConfig`` unless given)."""
    cls = cls or SearchConfig
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError("--config", str(path), "is not a readable file")
        try:
            loaded = read_yaml(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError("--config", str(path), yaml_error(path, e)) from None
        if not isinstance(loaded, dict):
            raise ConfigError("--config", str(path), "must hold a mapping of setting names to values")
        data.update(loaded)
    data.update(parse_overrides(overrides or []))
    return cls.from_dict(data).resolve()
