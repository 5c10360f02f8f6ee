"""The run config: one YAML file (``configs/tiny_train.yaml``, ``configs/demo_train.yaml``, ...),
its ``defaults:`` base files, plus ``section.key=value`` overrides, with defaults filled in and
every key checked.

Each section is a dataclass (``DataConfig``, ``InterleaveConfig``, ``PackingConfig``,
``TrainConfig``; the model section is ``ModelConfig``) whose fields carry their default, types and
range (``settings.setting``); ``load_config`` returns the checked mapping (what a run folder's
``config.yaml`` holds) and ``RunConfig.from_dict`` the typed sections the trainer reads.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from mtbi_fast.audio import spec_augment
from mtbi_fast.interleave import RatioSchedule
from mtbi_fast.loss import ImitationLoss
from mtbi_fast.model import ModelConfig
from mtbi_fast.settings import (NONE, Bound, bounds_of, choice_problem, defaults, setting,
                                type_name, type_problem)
from mtbi_fast.tracking import check_trackers

@dataclass(frozen=True)
class DataConfig:
    """``data``: the training data (a manifest and a behaviors folder read into memory, or a shard
    folder streamed), the held-out pair, and how batches are read."""

    reader: str = setting("auto", str, choices=("auto", "memory", "streaming"))
    train_manifest: str | None = setting(None, (str, None), path=True)
    behaviors: str | None = setting(None, (str, None), path=True)
    train_shards: str | None = setting(None, (str, None), path=True)
    shuffle_cuts: int = setting(128, int, Bound("int", 1))
    length_buckets: bool = setting(True, bool)
    skip_bad_shards: bool = setting(False, bool)
    eval_manifest: str | None = setting(None, (str, None), path=True)
    eval_behaviors: str | None = setting(None, (str, None), path=True)
    teacher_cache: bool = setting(False, bool)
    tasks: list | None = setting(None, (list, None))
    spec_augment: dict | None = setting(None, (dict, None))
    num_workers: int = setting(2, int, Bound("int", 0))  # batch-building processes per rank (docs/training.md)
    prefetch_factor: int = setting(2, int, Bound("int", 1))
    skip_bad_audio: bool = setting(False, bool)
    verify_shards: bool = setting(False, bool)


@dataclass(frozen=True)
class InterleaveConfig:
    """``interleave``: the text-ratio schedule (``RatioSchedule``) and the mean text span."""

    schedule: str = setting("cosine", str)
    start: float = setting(0.8, (int, float))
    end: float = setting(0.0, (int, float))
    steps: int = setting(1000, int)
    mean_span: float = setting(3.0, (int, float), Bound("number", 0, False))

    def schedule_args(self) -> dict:
        """The arguments of ``RatioSchedule.from_config``."""
        return {"schedule": self.schedule, "start": self.start, "end": self.end, "steps": self.steps}


@dataclass(frozen=True)
class PackingConfig:
    """``packing``: tokens per packed row and examples (or tokens) per micro-batch."""

    max_tokens: int = setting(1024, int, Bound("int", 2))
    examples_per_step: int = setting(8, int, Bound("int", 1))
    token_budget: int | None = setting(None, (int, None), Bound("int", 1))  # null: examples_per_step
    overlong: str = setting("truncate", str, choices=("error", "truncate"))


# The upper bounds are the values a real run can use; beyond them a value only poisons the run
# (an AdamW overflow, a seed past torch's 64-bit generator).
@dataclass(frozen=True)
class TrainConfig:
    """``train``: optimizer, schedule, logging, held-out evaluation and checkpoints."""

    steps: int = setting(1000, int, Bound("int", 1))
    lr: float = setting(1e-3, (int, float), Bound("number", 0, False, high=10.0))
    weight_decay: float = setting(0.0, (int, float), Bound("number", 0, high=10.0))
    warmup_steps: int = setting(50, int, Bound("int", 0))
    grad_accum: int = setting(1, int, Bound("int", 1))
    clip_grad: float | None = setting(1.0, (int, float, None), Bound("number", 0, False, high=1e6))  # null: none
    seed: int = setting(0, int, Bound("int", 0, high=2**63 - 1))
    log_every: int = setting(10, int, Bound("int", 1))
    eval_every: int = setting(0, int, Bound("int", 0))       # 0: no held-out evaluation
    eval_examples: int = setting(16, int, Bound("int", 1))
    save_every: int = setting(0, int, Bound("int", 0))       # 0: no checkpoints (final/ only)
    keep_last: int = setting(2, int, Bound("int", 1))
    peak_tflops: float | None = setting(None, (int, float, None), Bound("number", 0, False, high=1e6))  # null: the card's
    report_to: list = setting(["tensorboard"], list)


SECTIONS = {"data": DataConfig, "interleave": InterleaveConfig, "packing": PackingConfig, "train": TrainConfig}
TOP_KEYS = {"model": (dict,), "deepspeed": (str, NONE), "output_dir": (str,)}  # deepspeed: a JSON, or null
REQUIRED = ("model", "data", "output_dir")
INCLUDE_KEY = "defaults"  # a run config's base files, merged under it
# every key's default, by section (the model's from ModelConfig, less encoder and llm, which a run must name)
DEFAULTS = {**{name: defaults(section) for name, section in SECTIONS.items()}, "deepspeed": None,
            "model": {k: v for k, v in ModelConfig().to_dict().items() if k not in ("encoder", "llm")}}


@dataclass(frozen=True)
class RunConfig:
    """A checked run config as typed sections (``RunConfig.from_dict(load_config(path))``)."""

    model: ModelConfig
    data: DataConfig
    interleave: InterleaveConfig
    packing: PackingConfig
    train: TrainConfig
    deepspeed: str | None
    output_dir: str

    @classmethod
    def from_dict(cls, cfg: dict) -> "RunConfig":
        return cls(model=ModelConfig.from_dict(cfg["model"]),
                   **{name: section(**cfg[name]) for name, section in SECTIONS.items()},
                   deepspeed=cfg["deepspeed"], output_dir=cfg["output_dir"])


def _bounds() -> dict[str, Bound]:
    out = {}
    for name, section in SECTIONS.items():
        out.update(bounds_of(section, name))
    out.update(bounds_of(ModelConfig, "model"))
    return out


BOUNDS = _bounds()  # every numeric key's range, by dotted key; a model key left out takes ModelConfig's default
PATH_KEYS = tuple(f"{name}.{f.name}" for name, section in SECTIONS.items()
                  for f in dataclasses.fields(section) if f.metadata["path"]) + ("deepspeed",)
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def load_config(path: str | os.PathLike, overrides: list[str] = ()) -> dict:
    """The run config: YAML file (with its ``defaults:`` base files) + ``section.key=value``
    overrides, defaults filled in, checked. Unknown keys and wrong types are errors naming the key."""
    path = Path(path)
    cfg = read_config_file(path)
    _apply_overrides(cfg, overrides)
    _fill_defaults(cfg, path)
    _numbers_from_strings(cfg)
    _check_schema(cfg, path)
    ModelConfig.from_dict(cfg["model"], where="model")
    _check_spec_augment(cfg["data"]["spec_augment"], path)
    RatioSchedule.from_config(InterleaveConfig(**cfg["interleave"]).schedule_args())
    _check_ranges(cfg, path)
    _check_reader(cfg["data"], path)
    if cfg["packing"]["token_budget"] is not None and cfg["data"]["reader"] != "streaming":
        raise ValueError(f"{path}: packing.token_budget sizes the streaming reader's micro-batches; the "
                         f"in-memory reader takes packing.examples_per_step examples (set it to null)")
    _check_loss(cfg["model"].get("loss") or {}, path)
    try:
        check_trackers(cfg["train"]["report_to"])
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    _paths_from(cfg, path.parent)  # relative paths that exist only from the config's folder
    return cfg


def read_config_file(path: Path, chain: tuple = ()) -> dict:
    """A config file as a mapping, its ``defaults:`` base files merged under it: each base (a path
    relative to the including file's folder, read the same way) in order, then the file's own
    keys. Sections merge key by key; a key's value replaces the base's whole (as an override does).
    A base's relative paths are taken from its own folder when they exist from there."""
    if not path.is_file():
        raise FileNotFoundError(f"config not found: {path}" if not chain else
                                f"{chain[-1]}: {INCLUDE_KEY}: {path} not found")
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not a valid config: {_yaml_problem(exc)}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: a config is a mapping of sections, got {type(cfg).__name__}")
    bases = cfg.pop(INCLUDE_KEY, None)
    if bases is None:
        return cfg
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ValueError(f"{path}: {INCLUDE_KEY} must be a list of config files (e.g. {INCLUDE_KEY}: "
                         f"[demo.yaml]), got {bases!r}")
    merged: dict = {}
    for name in bases:
        base = path.parent / name
        if base.resolve() in {p.resolve() for p in (*chain, path)}:
            raise ValueError(f"{path}: {INCLUDE_KEY}: {name} includes itself "
                             f"({' -> '.join(str(p) for p in (*chain, path, base))})")
        merged = _merge(merged, _paths_from(read_config_file(base, (*chain, path)), base.parent))
    return _merge(merged, cfg)


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = {**out[key], **value} if both else value
    return out


def _paths_from(cfg: dict, folder: Path) -> dict:
    """``cfg`` with its relative paths that exist only from ``folder`` made ``folder``'s."""
    for key in PATH_KEYS:
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        v = node.get(leaf) if isinstance(node, dict) else None
        if isinstance(v, str) and not os.path.isabs(v) and not Path(v).exists() and (folder / v).exists():
            node[leaf] = str(folder / v)
    return cfg


def model_section(path: str | os.PathLike) -> dict:
    """The ``model`` section of a run config (its ``defaults:`` files included), or a model-only
    config (a mapping with ``llm`` or ``encoder``); errors name the file."""
    cfg = read_config_file(Path(path))
    if isinstance(cfg.get("model"), dict):
        return cfg["model"]
    if "llm" in cfg or "encoder" in cfg:
        return cfg
    raise ValueError(f"{path}: no 'model' section (a run config) and no 'llm' or 'encoder' key "
                     "(a model config)")


def _apply_overrides(cfg: dict, overrides: list[str]) -> None:
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value")
        key, value = item.split("=", 1)
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {p} is not a section")
        try:
            node[leaf] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ValueError(f"override {item!r}: not a YAML value: {_yaml_problem(exc)}") from None


def _fill_defaults(cfg: dict, path: Path) -> None:
    for name, section in SECTIONS.items():
        given = cfg.get(name) or {}
        if not isinstance(given, dict):
            raise ValueError(f"{path}: {name} must be a mapping of keys (e.g. {name}.steps=5), "
                             f"got {given!r}")
        cfg[name] = {**defaults(section), **given}
    cfg.setdefault("deepspeed", None)
    if "model" in cfg and not isinstance(cfg["model"], dict):
        raise ValueError(f"{path}: model must be a mapping of keys, got {cfg['model']!r}")


def _numbers_from_strings(cfg: dict) -> None:
    """A numeric key written as YAML reads ``1e-4`` (a string to YAML 1.1, which wants ``1.0e-4``)
    is taken as the number it means."""
    for key, bound in BOUNDS.items():
        if bound.kind != "number":
            continue
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(leaf), str) and _NUMBER.fullmatch(node[leaf].strip()):
            node[leaf] = float(node[leaf])


def _yaml_problem(exc: Exception) -> str:
    """A YAML error in one line: what, and where (line and column, 1-based)."""
    mark = getattr(exc, "problem_mark", None)
    what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{what}{where}" + (f" ({context})" if context else "")


def _check_schema(cfg: dict, path: Path) -> None:
    """Known sections and keys only, the required ones present, each of its type."""
    known = {**SECTIONS, **TOP_KEYS}
    for key in cfg:
        if key not in known:
            raise ValueError(f"{path}: unknown key {key!r} (allowed: {sorted(known)})")
    for key in REQUIRED:
        if key not in cfg:
            raise ValueError(f"{path}: missing required section {key!r}")
    for name, section in SECTIONS.items():
        fields = {f.name: f.metadata["types"] for f in dataclasses.fields(section)}
        for k, v in cfg[name].items():
            if k not in fields:
                raise ValueError(f"{path}: unknown key {name}.{k} (allowed: {sorted(fields)})")
            problem = type_problem(f"{name}.{k}", v, fields[k])
            if problem:
                raise ValueError(f"{path}: {problem}")
    for key, types in TOP_KEYS.items():
        if not isinstance(cfg[key], types):
            raise ValueError(f"{path}: {key} must be {type_name(types)}, got {cfg[key]!r}")


def _check_ranges(cfg: dict, path: Path) -> None:
    """Every numeric key within its range (``BOUNDS``), every key with choices one of them: errors
    name the key."""
    for key, bound in BOUNDS.items():
        node, *parents, leaf = [cfg, *key.split(".")]
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node:
            problem = bound.problem(key, node[leaf])
            if problem:
                raise ValueError(f"{path}: {problem}")
    for name, section in SECTIONS.items():
        for f in dataclasses.fields(section):
            problem = f.metadata["choices"] and choice_problem(f"{name}.{f.name}", cfg[name][f.name],
                                                               f.metadata["choices"])
            if problem:
                raise ValueError(f"{path}: {problem}")


def _check_reader(d: dict, path: Path) -> None:
    """data.reader: "memory" (train_manifest + behaviors, read whole), "streaming" (train_shards,
    a folder from `mtbi-fast shard`) or "auto" (the one whose data is given); afterwards it names
    the reader the run uses."""
    memory = d["train_manifest"] is not None and d["behaviors"] is not None
    streaming = d["train_shards"] is not None
    if d["reader"] == "auto":
        if memory and streaming:
            raise ValueError(f"{path}: data.train_shards and data.train_manifest/data.behaviors are both "
                             f"set; set data.reader to 'streaming' or 'memory' to pick one")
        if not memory and not streaming:
            raise ValueError(f"{path}: no training data: set data.train_manifest and data.behaviors "
                             f"(read into memory) or data.train_shards (streamed; `mtbi-fast shard`)")
        d["reader"] = "streaming" if streaming else "memory"
    elif d["reader"] == "memory" and not memory:
        raise ValueError(f"{path}: data.reader is 'memory' but data.train_manifest and data.behaviors "
                         f"are not both set")
    elif d["reader"] == "streaming" and not streaming:
        raise ValueError(f"{path}: data.reader is 'streaming' but data.train_shards is not set "
                         f"(a folder written by `mtbi-fast shard`)")


def _check_loss(loss: dict, path: Path) -> None:
    """model.loss: the loss's own arguments only, accepted by it, not all weights 0."""
    allowed = [k for k in inspect.signature(ImitationLoss.__init__).parameters if k != "self"]
    for k in loss:
        if k not in allowed:
            raise ValueError(f"{path}: unknown key model.loss.{k} (allowed: {allowed})")
    try:
        ImitationLoss(**loss)
    except ValueError as exc:
        raise ValueError(f"{path}: model.loss: {exc}") from None
    if loss.get("kl_weight", 1.0) == 0 and loss.get("ce_weight", 0.0) == 0:
        raise ValueError(f"{path}: model.loss.kl_weight and model.loss.ce_weight are both 0: "
                         "the loss would be 0")


def _check_spec_augment(sa: dict | None, path: Path) -> None:
    """data.spec_augment: null (off) or a mapping of spec_augment's keyword arguments ({} for its
    defaults)."""
    if sa is None:
        return
    params = inspect.signature(spec_augment).parameters
    allowed = [k for k in params if k not in ("mel", "generator")]
    for k, v in sa.items():
        if k not in allowed:
            raise ValueError(f"{path}: unknown key data.spec_augment.{k} (allowed: {allowed})")
        kind = type(params[k].default)  # int counts and widths; time_width may be a fraction
        if isinstance(v, bool) or not isinstance(v, (int, kind)) or v < 0:
            raise ValueError(f"{path}: data.spec_augment.{k} must be {'an integer' if kind is int else 'a number'}"
                             f" >= 0, got {v!r}")
