"""Typed run configuration: dataclasses, YAML loading, dotted `--set a.b=c` overrides, validation.

Every user mistake (unknown key, wrong type, value out of range, contradictory options) raises a
`ReslabError` naming the key and the fix; the CLI turns it into one line and exit code 2.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ReslabError


@dataclass
class ModelConfig:
    name: str = "resnet20"  # any name of `reslab models`
    options: dict[str, Any] = field(default_factory=dict)  # builder options: order, shortcut, width, ...
    # a run directory or checkpoint whose weights start this run (fine-tuning); a classifier for another number
    # of classes starts fresh (engine/warm_start.py). A resume ignores it: the run's own checkpoint goes on.
    init: str | None = None


@dataclass
class DataConfig:
    name: str = "fashion-mnist"  # fashion-mnist | idx (any IDX files in root) | folder (class_name/*.png)
    root: str | None = None  # directory of the files; None = search the standard places
    download: bool = True  # fetch the official files when none are found
    limit: int | None = None  # use only the first N training and N test images
    resize: int | None = None  # square side in pixels after resizing (the notebook's 96); None = native
    normalize: bool = True  # subtract the dataset mean, divide by its std (the notebook: False, [0, 1])
    crop_padding: int = 0  # random crop after padding by this many pixels; 0 = off
    flip: bool = False  # random horizontal flip
    alternate_flip: bool = False  # with flip: each image mirrored every other epoch (airbench)
    erasing: float = 0.0  # random erasing probability (Zhong et al. 2017); 0 = off
    classes: list[str] | None = None  # class names for idx/folder data
    split: float = 0.0  # folder data without train/ and test/: fraction held out for testing
    # hold out this many training images for validation (one fixed draw, the same for every seed): each tested epoch
    # also scores them, best.pt is the epoch best on them, and the test set only reports; 0 = off
    val: int = 0


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | adamw
    lr: float = 0.05  # peak learning rate, for the global batch
    momentum: float = 0.9  # SGD momentum
    nesterov: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW
    weight_decay: float = 0.0  # not applied to BN parameters and biases unless decay_norm
    # decay BN scales, shifts and biases too, as the code of the ResNet paper's time did
    decay_norm: bool = False
    schedule: str = "constant"  # constant | step | cosine | onecycle
    warmup_epochs: float = 0.0  # linear warm-up from 0 (fractions of an epoch allowed)
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # step: fractions of the run
    gamma: float = 0.1  # step: lr multiplier at each milestone
    label_smoothing: float = 0.0
    grad_clip: float = 0.0  # max global gradient norm; 0 = off


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 256  # global: split over ranks under torchrun
    # split each rank's batch into N micro-batches, a forward and backward each, gradients summed before the one
    # update: the same step in about 1/N of the activation memory (BatchNorm normalises over each micro-batch)
    accum_steps: int = 1
    eval_batch_size: int = 1000
    eval_every: int = 1  # evaluate on the test set every N epochs and after the last; training is unchanged
    channels_last: bool = True  # NHWC memory format: faster convolutions on CPU and CUDA
    compile: bool = False  # torch.compile the model for training (evaluation runs it uncompiled)
    compile_mode: str = "default"  # torch.compile's mode; reduce-overhead replays each step as a CUDA graph
    ema: float = 0.0  # decay of an exponential moving average of the weights, evaluated when > 0
    tta_flip: bool = False  # evaluate on each image and its mirror, averaging the logits
    # also evaluate each image shifted N pixels up-left and down-right, padded as random crops pad; weights 1/2 for
    # the unshifted view, 1/4 for each shifted one (airbench's test-time translation); 0 = off
    tta_shift: int = 0
    sync_bn: bool = False  # SyncBatchNorm under torchrun
    max_retries: int = 3  # divergence guard: restarts of an epoch (lr halved each time) before giving up
    on_checkpoint_error: str = "stop"  # stop | continue: what a failed checkpoint write does
    save_every: int = 1  # write last.pt every N epochs (and after the last, and on Ctrl-C or SIGTERM)
    checkpoint_every: int = 0  # also checkpoint every N steps inside an epoch; 0 = at epoch ends only
    # divergence guard: read loss and gradient norm every N steps; 0 = auto: 1 on the CPU (checked before each
    # update, which costs nothing there), 50 on a GPU (each read waits for it); a failed check rolls back
    guard_every: int = 0


@dataclass
class Config:
    name: str = "run"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (auto: bf16 where the hardware has it, else fp32)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# data.resize's largest side: 18x ImageNet's 224, and far below where torch's sizes overflow
MAX_RESIZE = 4096

CHOICES = {
    "device": ("auto", "cpu", "cuda"),
    "precision": ("auto", "fp32", "bf16", "fp16"),
    "data.name": ("fashion-mnist", "idx", "folder"),
    "optim.name": ("sgd", "adamw"),
    "optim.schedule": ("constant", "step", "cosine", "onecycle"),
    "train.on_checkpoint_error": ("stop", "continue"),
    "train.compile_mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
}


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check `value` against the type hint of field `key`; ints are accepted for floats."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)][0]
        return _coerce(key, value, inner)
    if origin is list:
        if not isinstance(value, list):
            raise ReslabError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ReslabError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-4" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if hint is Any or isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise ReslabError(f"{key}: expected {hint.__name__}, got {value!r}")


def _merge(obj: Any, values: dict[str, Any], prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in values.items():
        full = prefix + str(key)
        if key not in names:
            raise ReslabError(f"unknown config key {full!r}; valid keys here: {', '.join(names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ReslabError(
                    f"{full}: expected a mapping of {', '.join(f.name for f in dataclasses.fields(current))}"
                )
            _merge(current, value, full + ".")
        else:
            value = _coerce(full, value, hints[key])
            if isinstance(current, dict):  # `--set model.options.width=64` adds to the file's options
                value = {**current, **value}
            setattr(obj, key, value)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """['optim.lr=0.1', 'model.options.order=full-preact'] -> nested dict, values parsed as YAML scalars."""
    nested: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ReslabError(f"--set {pair!r}: expected key=value, e.g. optim.lr=0.1")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ReslabError(f"--set {pair!r}: {part!r} is set twice")
        node[parts[-1]] = value
    return nested


RECIPES = Path(__file__).parent / "configs"  # the recipes, installed with the package; configs/ links here


def find(path: str | Path) -> Path:
    """A config file: the path as given, else a recipe named as `fast`, `fast.yaml` or `configs/fast.yaml`, so
    that `reslab train --config best` works from any directory, in a checkout or an installed package."""
    path = Path(path)
    if path.is_file():
        return path
    recipe = RECIPES / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
    if str(path.parent) in (".", "configs") and recipe.is_file():
        return recipe
    raise ReslabError(f"config file {path} not found; the recipes of configs/ are: {recipe_names()}")


def recipe_names() -> str:
    return ", ".join(sorted(p.stem for p in RECIPES.glob("*.yaml"))) or "none found"


# libyaml's parser where PyYAML was built with it (the same documents, 7x faster): `reslab runs` reads every config
SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _UniqueKeys(SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error: PyYAML keeps the last, so a
    second `train:` section silently dropped every setting of the first."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: the keys after it override its
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (list, dict)):  # unhashable: the loader says so below
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (line {key_node.start_mark.line + 1})", None
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def load(
    path: str | Path | None = None, overrides: list[str] | str | None = None, model: bool = True
) -> Config:
    """The config from a YAML file (or the defaults), with dotted overrides applied, validated. A file may name
    another as its `base:` (a recipe's name, or a path from the file's own folder): the file's keys are laid over
    the base's, as `--set` lays its keys over a file's. model=False leaves the model's name and options unchecked,
    for reading configs without importing torch (`reslab runs`)."""
    if isinstance(overrides, str):  # one override, not its characters
        overrides = [overrides]
    cfg = Config()
    if path is not None:
        for values in _layers(find(path)):
            _lay(cfg, values)
    if overrides:
        _lay(cfg, parse_overrides(overrides))
    validate(cfg, model)
    return cfg


def _read(path: Path) -> dict[str, Any]:
    """A config file's own keys, checked to be a mapping."""
    try:
        values = yaml.load(path.read_text(), Loader=_UniqueKeys) or {}
    except yaml.YAMLError as e:
        raise ReslabError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    except UnicodeDecodeError:
        raise ReslabError(f"config file {path} is not a text file (a YAML config is UTF-8 text)") from None
    except OSError as e:
        raise ReslabError(f"cannot read config file {path}: {e.strerror or e}") from None
    if not isinstance(values, dict):
        raise ReslabError(f"config file {path} must be a mapping of keys, e.g. `model: {{name: resnet20}}`")
    values.setdefault("name", path.stem)
    return values


def _layers(path: Path) -> list[dict[str, Any]]:
    """The keys of a config file and of the bases it names, the first base first."""
    chain = [path]
    layers = [_read(path)]
    while (base := layers[0].pop("base", None)) is not None:
        if not isinstance(base, str) or not base:
            raise ReslabError(f"config file {chain[0]}: base must name a recipe or a file, got {base!r}")
        beside = chain[0].parent / base
        try:
            found = beside if beside.is_file() else find(base)
        except ReslabError:
            raise ReslabError(
                f"config file {chain[0]}: base {base} is neither a file beside it nor a recipe ({recipe_names()})"
            ) from None
        if found.resolve() in (p.resolve() for p in chain):
            raise ReslabError(f"config file {chain[0]}: base {base} leads back to {found}")
        chain.insert(0, found)
        layers.insert(0, _read(found))
    return layers


def _lay(cfg: Config, values: dict[str, Any]) -> None:
    """Lay keys over a config: what they name replaces, model options add to the config's. Another model drops
    the config's options, written for its model; `train.compile: false` drops its compile mode."""
    model = values.get("model")
    if isinstance(model, dict) and model.get("name", cfg.model.name) != cfg.model.name:
        cfg.model.options = {}
    train = values.get("train")
    if isinstance(train, dict) and train.get("compile") is False:
        cfg.train.compile_mode = "default"
    _merge(cfg, values)


def from_dict(values: dict[str, Any], overrides: list[str] | None = None) -> Config:
    """The config from nested values (a file's, a checkpoint's), with dotted overrides applied, validated."""
    cfg = Config()
    _merge(cfg, values)
    if overrides:
        _lay(cfg, parse_overrides(overrides))
    validate(cfg)
    return cfg


def validate(cfg: Config, model: bool = True) -> None:
    flat = {
        "device": cfg.device,
        "precision": cfg.precision,
        "data.name": cfg.data.name,
        "optim.name": cfg.optim.name,
        "optim.schedule": cfg.optim.schedule,
        "train.on_checkpoint_error": cfg.train.on_checkpoint_error,
        "train.compile_mode": cfg.train.compile_mode,
    }
    for key, value in flat.items():
        if value not in CHOICES[key]:
            raise ReslabError(f"{key}: {value!r} is not one of {', '.join(CHOICES[key])}")

    def positive(key: str, value: float | None, allow_zero: bool = False) -> None:
        bound = ">= 0" if allow_zero else "> 0"
        if value is not None and not math.isfinite(value):
            raise ReslabError(f"{key}: must be a finite number {bound}, got {value}")
        if value is not None and (value < 0 or (value == 0 and not allow_zero)):
            raise ReslabError(f"{key}: must be {bound}, got {value}")

    # `reslab train` writes to runs/NAME unless --out says otherwise: a folder's name, not a path out of runs/
    if cfg.name in ("", ".", "..") or any(c in cfg.name for c in "/\\\0"):
        raise ReslabError(
            f"name: one folder's name, as the run directory is runs/NAME by default; got {cfg.name!r}"
        )
    positive("train.epochs", cfg.train.epochs)
    positive("train.batch_size", cfg.train.batch_size)
    positive("train.accum_steps", cfg.train.accum_steps)
    positive("train.eval_batch_size", cfg.train.eval_batch_size)
    positive("optim.lr", cfg.optim.lr)
    positive("data.limit", cfg.data.limit)
    positive("data.resize", cfg.data.resize)
    # torch's sizes overflow long before 2**63
    if cfg.data.resize is not None and cfg.data.resize > MAX_RESIZE:
        raise ReslabError(f"data.resize: at most {MAX_RESIZE} pixels, got {cfg.data.resize}")
    if not -(2**63) <= cfg.seed < 2**63:  # what torch's generators take, with room for seed + rank
        raise ReslabError(f"seed: must be an integer from -2**63 to 2**63 - 1, got {cfg.seed}")
    positive("optim.gamma", cfg.optim.gamma)
    for key in ("optim.weight_decay", "optim.warmup_epochs", "optim.grad_clip"):
        section, name = key.split(".")
        positive(key, getattr(getattr(cfg, section), name), allow_zero=True)
    positive("data.crop_padding", cfg.data.crop_padding, allow_zero=True)
    positive("data.val", cfg.data.val, allow_zero=True)
    positive("train.max_retries", cfg.train.max_retries, allow_zero=True)
    positive("train.save_every", cfg.train.save_every)
    positive("train.checkpoint_every", cfg.train.checkpoint_every, allow_zero=True)
    positive("train.guard_every", cfg.train.guard_every, allow_zero=True)
    positive("train.tta_shift", cfg.train.tta_shift, allow_zero=True)
    positive("train.eval_every", cfg.train.eval_every)
    for key, value in (
        ("data.erasing", cfg.data.erasing),
        ("optim.label_smoothing", cfg.optim.label_smoothing),
        ("train.ema", cfg.train.ema),
        ("data.split", cfg.data.split),
        ("optim.momentum", cfg.optim.momentum),
        *((f"optim.betas[{i}]", beta) for i, beta in enumerate(cfg.optim.betas)),
    ):
        if not 0 <= value < 1:
            raise ReslabError(f"{key}: must be in [0, 1), got {value}")
    if cfg.optim.warmup_epochs > cfg.train.epochs:
        raise ReslabError(
            f"optim.warmup_epochs ({cfg.optim.warmup_epochs}) exceeds train.epochs ({cfg.train.epochs})"
        )
    if cfg.optim.name == "sgd" and cfg.optim.nesterov and cfg.optim.momentum == 0:
        raise ReslabError("optim.nesterov needs optim.momentum > 0 (as torch.optim.SGD requires)")
    if len(cfg.optim.betas) != 2:
        raise ReslabError(f"optim.betas: two numbers, e.g. [0.9, 0.999], got {cfg.optim.betas}")
    if any(not 0 < m < 1 for m in cfg.optim.milestones):
        raise ReslabError(f"optim.milestones: fractions of the run in (0, 1), got {cfg.optim.milestones}")
    if cfg.train.compile_mode != "default" and not cfg.train.compile:
        raise ReslabError(f"train.compile_mode {cfg.train.compile_mode} needs train.compile=true")
    if cfg.precision == "fp16" and cfg.device == "cpu":
        raise ReslabError(
            "precision fp16 needs a CUDA device (fp16 on the CPU is slow and unscaled); use bf16 or fp32"
        )
    if cfg.data.alternate_flip and not cfg.data.flip:
        raise ReslabError("data.alternate_flip changes how data.flip mirrors images; set data.flip=true too")
    if cfg.data.split and cfg.data.name != "folder":
        raise ReslabError(
            f"data.split holds out test images from folder data; {cfg.data.name} has its own test set"
        )
    if cfg.data.classes and cfg.data.name == "fashion-mnist":
        raise ReslabError("data.classes names the classes of idx or folder data; fashion-mnist has its own")
    if cfg.data.name == "folder" and not cfg.data.root:
        raise ReslabError("data.name folder needs data.root: a directory of class_name/*.png folders")
    if not model:
        return
    # the model name and options are checked here too, before anything is written
    from .models import check_config_options

    check_config_options(cfg.model.name, cfg.model.options)


def flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested keys as dotted ones, as --set names them: {"optim": {"lr": 0.1}} -> {"optim.lr": 0.1}; an empty
    mapping (a model's options) has none."""
    found = {}
    for k, v in values.items():
        found.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return found


def changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """The dotted keys whose values differ between two configs as dicts: {"optim.lr": (0.1, 0.05)}. A key that
    only one side has (a checkpoint from a reslab with other settings) is no change; model.options compares whole."""
    found = {}
    for key in sorted(old.keys() & new.keys()):
        a, b = old[key], new[key]
        if isinstance(a, dict) and isinstance(b, dict) and prefix + key != "model.options":
            found.update(changes(a, b, f"{prefix}{key}."))
        elif a != b:
            found[prefix + key] = (a, b)
    return found


def dump(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
