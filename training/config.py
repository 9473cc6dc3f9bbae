"""The typed training config: what `herd train CONFIG` reads from a YAML or Python file.

Sections (YAML keys; every field is documented in docs/training.md):

    model     a new model (`config`: HF config.json fields + `tokenizer`) or `checkpoint` to fine-tune
    data      `kind` text | chat, `paths` (files, or builtin:stdlib-docs / builtin:stdlib-chat),
              `seq_len`, `batch_size` (sequences per micro-batch per data-parallel rank), `seed`
    optim     AdamW: `lr`, `betas`, `eps`, `weight_decay`, `grad_clip`
    schedule  linear warmup then cosine decay: `warmup_steps`, `min_lr_ratio`
    train     `steps`, `grad_accum`, `dtype` (bfloat16 autocast | float32), `activation_checkpointing`,
              `aux_loss_coef` (MoE load balancing), `seed`, `device`
    parallel  `dp` (FSDP2 degree), `tp` (tensor-parallel degree); dp * tp processes under torchrun
    output    `dir`, `checkpoint_every`, `resume`, `export`, `log_every`, `progress`, `plot`,
              `tensorboard`, `peak_tflops`

Every section is a frozen dataclass validated when built; a bad or unknown field raises
ConfigError naming it (e.g. "optim.lr: must be > 0, got -1").
"""

from __future__ import annotations

import dataclasses
import runpy
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DTYPES = ("bfloat16", "float32")
DATA_KINDS = ("text", "chat")


class ConfigError(ValueError):
    """A training config field is missing, unknown or out of range; the message names it."""


def _need(cond: bool, name: str, why: str) -> None:
    if not cond:
        raise ConfigError(f"{name}: {why}")


@dataclass(frozen=True)
class ModelSection:
    # Exactly one of: `config`, the HF config.json fields of a new model (Llama4ForCausalLM or
    # LlamaForCausalLM; what is left out gets herd's defaults, written out in full on export),
    # or `checkpoint`, an HF directory, a .gguf file or "default" (the built-in model).
    config: dict | None = None
    checkpoint: str | None = None
    # New models only: "default" (the built-in model's tokenizer) or a directory with tokenizer.json.
    tokenizer: str | None = None
    init_std: float = 0.02

    def __post_init__(self) -> None:
        _need((self.config is None) != (self.checkpoint is None), "model",
              "give exactly one of model.config (a new model) or model.checkpoint (fine-tune)")
        if self.config is not None:
            _need(bool(self.config), "model.config", "is empty")
            _need(self.tokenizer is not None, "model.tokenizer",
                  "a new model needs a tokenizer: 'default' or a directory with tokenizer.json")
        else:
            _need(self.tokenizer is None, "model.tokenizer",
                  "a checkpoint brings its own tokenizer; leave model.tokenizer out")
        _need(self.init_std > 0, "model.init_std", f"must be > 0, got {self.init_std}")


@dataclass(frozen=True)
class DataSection:
    paths: list[str] = field(default_factory=list)
    kind: str = "text"
    seq_len: int = 512
    batch_size: int = 8
    seed: int = 0
    text_field: str = "text"  # JSONL pretraining: the field holding each document

    def __post_init__(self) -> None:
        _need(bool(self.paths), "data.paths", "needs at least one file, or builtin:stdlib-docs / "
              "builtin:stdlib-chat")
        _need(self.kind in DATA_KINDS, "data.kind", f"must be one of {', '.join(DATA_KINDS)}, got {self.kind!r}")
        _need(self.seq_len >= 2, "data.seq_len", f"must be >= 2, got {self.seq_len}")
        _need(self.batch_size >= 1, "data.batch_size", f"must be >= 1, got {self.batch_size}")
        _need(self.seed >= 0, "data.seed", f"must be >= 0, got {self.seed}")


@dataclass(frozen=True)
class OptimSection:
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1  # on matrices only (see training/optim.py)
    grad_clip: float = 1.0  # max global grad norm; 0 turns clipping off

    def __post_init__(self) -> None:
        _need(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        _need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas",
              f"must be two numbers in [0, 1), got {list(self.betas)}")
        _need(self.eps > 0, "optim.eps", f"must be > 0, got {self.eps}")
        _need(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _need(self.grad_clip >= 0, "optim.grad_clip", f"must be >= 0, got {self.grad_clip}")


@dataclass(frozen=True)
class ScheduleSection:
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio on the last step

    def __post_init__(self) -> None:
        _need(self.warmup_steps >= 0, "schedule.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _need(0 <= self.min_lr_ratio <= 1, "schedule.min_lr_ratio",
              f"must be in [0, 1], got {self.min_lr_ratio}")


@dataclass(frozen=True)
class TrainSection:
    steps: int = 1000  # optimiser steps
    grad_accum: int = 1  # micro-batches per optimiser step
    dtype: str = "bfloat16"  # compute dtype; weights and optimiser state stay float32
    activation_checkpointing: bool = False
    aux_loss_coef: float = 0.01  # MoE load-balancing loss weight (training/aux_loss.py)
    seed: int = 0
    device: str = "auto"  # auto: cuda when present (this rank's GPU), else cpu

    def __post_init__(self) -> None:
        _need(self.steps >= 1, "train.steps", f"must be >= 1, got {self.steps}")
        _need(self.grad_accum >= 1, "train.grad_accum", f"must be >= 1, got {self.grad_accum}")
        _need(self.dtype in DTYPES, "train.dtype", f"must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        _need(self.aux_loss_coef >= 0, "train.aux_loss_coef", f"must be >= 0, got {self.aux_loss_coef}")
        _need(self.seed >= 0, "train.seed", f"must be >= 0, got {self.seed}")
        _need(self.device in ("auto", "cpu", "cuda"), "train.device",
              f"must be auto, cpu or cuda, got {self.device!r}")


@dataclass(frozen=True)
class ParallelSection:
    dp: int = 1  # data parallel (FSDP2) degree
    tp: int = 1  # tensor parallel degree

    def __post_init__(self) -> None:
        _need(self.dp >= 1, "parallel.dp", f"must be >= 1, got {self.dp}")
        _need(self.tp >= 1, "parallel.tp", f"must be >= 1, got {self.tp}")

    @property
    def world_size(self) -> int:
        return self.dp * self.tp


@dataclass(frozen=True)
class OutputSection:
    dir: str = "runs/train"
    checkpoint_every: int = 0  # steps between sharded checkpoints; 0: only the last step's
    resume: str = "auto"  # auto (latest checkpoint in dir, if any) | never | a checkpoint directory
    export: bool = True  # write the HF safetensors directory (dir/export) at the end
    log_every: int = 1  # steps between metrics records
    progress: bool = True  # tqdm progress bar on rank 0
    plot: bool = True  # dir/loss.png at the end (needs matplotlib)
    tensorboard: bool = True  # dir/tensorboard when the tensorboard package is installed
    peak_tflops: float | None = None  # the hardware peak MFU divides by; None: known GPU or measured

    def __post_init__(self) -> None:
        _need(bool(self.dir), "output.dir", "must be a directory path")
        _need(self.checkpoint_every >= 0, "output.checkpoint_every",
              f"must be >= 0, got {self.checkpoint_every}")
        _need(self.log_every >= 1, "output.log_every", f"must be >= 1, got {self.log_every}")
        _need(self.peak_tflops is None or self.peak_tflops > 0, "output.peak_tflops",
              f"must be > 0, got {self.peak_tflops}")


@dataclass(frozen=True)
class TrainConfig:
    model: ModelSection
    data: DataSection
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    train: TrainSection = field(default_factory=TrainSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    output: OutputSection = field(default_factory=OutputSection)

    def __post_init__(self) -> None:
        _need(self.schedule.warmup_steps <= self.train.steps, "schedule.warmup_steps",
              f"{self.schedule.warmup_steps} is more than train.steps {self.train.steps}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Any) -> TrainConfig:
        return _build(cls, raw, "")


# ---- building from plain data ---------------------------------------------------------------------


def _coerce(hint: Any, value: Any, name: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, name)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, name)
    if hint is bool:
        _need(isinstance(value, bool), name, f"must be true or false, got {value!r}")
        return value
    if hint is int:
        _need(isinstance(value, int) and not isinstance(value, bool), name, f"must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        _need(isinstance(value, (int, float)) and not isinstance(value, bool), name,
              f"must be a number, got {value!r}")
        return float(value)
    if hint is str:
        _need(isinstance(value, str), name, f"must be a string, got {value!r}")
        return value
    if origin is list or hint is list:
        _need(isinstance(value, (list, tuple)), name, f"must be a list, got {value!r}")
        item = args[0] if args else Any
        return [v if item is Any else _coerce(item, v, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        _need(isinstance(value, (list, tuple)) and len(value) == len(args), name,
              f"must be a list of {len(args)}, got {value!r}")
        return tuple(_coerce(a, v, f"{name}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict or hint is dict:
        _need(isinstance(value, dict), name, f"must be a mapping, got {value!r}")
        return dict(value)
    return value


def _build(cls: type, raw: Any, where: str) -> Any:
    label = where or "config"
    if isinstance(raw, cls):
        return raw
    _need(isinstance(raw, dict), label, f"must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    prefix = f"{where}." if where else ""
    for key in raw:
        _need(key in known, f"{prefix}{key}", f"unknown field (known: {', '.join(known)})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in raw:
            kwargs[f.name] = _coerce(hints[f.name], raw[f.name], f"{prefix}{f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{prefix}{f.name}: required")
    return cls(**kwargs)


# ---- files and overrides --------------------------------------------------------------------------


def resolve_config_path(name: str | Path) -> Path:
    """A file path, or the name of a shipped config (tiny, scout, maverick, finetune-default)."""
    path = Path(name)
    if path.exists():
        return path
    for suffix in (".yaml", ".yml", ".py"):
        shipped = CONFIG_DIR / f"{name}{suffix}"
        if shipped.is_file():
            return shipped
    shipped = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"{name}: no such config file (shipped configs: {', '.join(shipped)})")


def read_config_file(path: Path) -> dict[str, Any]:
    """The raw mapping of a YAML file, or of a Python file's `config` (a TrainConfig or a dict)."""
    if path.suffix == ".py":
        namespace = runpy.run_path(str(path))
        if "config" not in namespace:
            raise ConfigError(f"{path}: a Python config must define `config` (a TrainConfig or a dict)")
        value = namespace["config"]
        return value.to_dict() if isinstance(value, TrainConfig) else value
    import yaml

    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    return raw


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`section.field=value` strings (value in YAML syntax) set into a copy of `raw`."""
    import copy

    import yaml

    out = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected section.field=value")
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
        node[leaf] = yaml.safe_load(text)
    return out


def load_train_config(name: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    path = resolve_config_path(name)
    return TrainConfig.from_dict(apply_overrides(read_config_file(path), overrides or []))
