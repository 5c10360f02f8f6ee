"""The run config: one YAML file (``configs/tiny_train.yaml``, ``configs/demo_train.yaml``, ...) plus
``section.key=value`` overrides, with defaults filled in and every key checked.

Sections: ``model`` (``ModelConfig``'s keys: encoder, LLM, adapter, loss, ...), ``data``,
``interleave``, ``packing``, ``train``, ``deepspeed`` (a DeepSpeed JSON, or null for a plain
PyTorch run) and ``output_dir``. Unknown keys and wrong types are errors naming the key; every
numeric key is checked against its range (``RANGES``); relative paths that do not exist from the
current folder are taken relative to the config file.
"""

from __future__ import annotations

import copy
import inspect
import math
import os
import re
from pathlib import Path

import yaml

from mtbi_fast.audio import spec_augment
from mtbi_fast.interleave import RatioSchedule
from mtbi_fast.loss import TEMPERATURE_RANGE, ImitationLoss
from mtbi_fast.model import ModelConfig
from mtbi_fast.tracking import check_trackers

SCHEMA = {
    "model": dict,
    "data": {"reader": str, "train_manifest": (str, type(None)), "behaviors": (str, type(None)),
             "train_shards": (str, type(None)), "shuffle_cuts": int, "length_buckets": bool,
             "skip_bad_shards": bool, "eval_manifest": (str, type(None)),
             "eval_behaviors": (str, type(None)), "teacher_cache": bool, "tasks": (list, type(None)),
             "spec_augment": (dict, type(None)), "num_workers": int, "prefetch_factor": int,
             "skip_bad_audio": bool, "verify_shards": bool},
    "interleave": {"schedule": str, "start": (int, float), "end": (int, float), "steps": int,
                   "mean_span": (int, float)},
    "packing": {"max_tokens": int, "examples_per_step": int, "token_budget": (int, type(None)),
                "overlong": str},
    "train": {"steps": int, "lr": (int, float), "weight_decay": (int, float),
              "warmup_steps": int, "grad_accum": int, "clip_grad": (int, float, type(None)), "seed": int,
              "log_every": int, "eval_every": int, "eval_examples": int, "save_every": int,
              "keep_last": int, "peak_tflops": (int, float, type(None)), "report_to": list},
    "deepspeed": (str, type(None)),
    "output_dir": str,
}
# data.num_workers: 2 batch-building processes per rank (with prefetch_factor 2, up to 4
# micro-batches built ahead of the step) hide the CPU work behind the GPU step, and 8 ranks on a
# node add only 16 single-threaded processes. A fixed value rather than one picked by device, so
# that config.yaml says what ran (the batches are the same for any value). 0 builds the batches in
# the training process (debugging; tiny runs, where a worker costs more to start than it saves).
DEFAULTS = {
    "data": {"reader": "auto", "train_manifest": None, "behaviors": None, "train_shards": None,
             "shuffle_cuts": 128, "length_buckets": True, "skip_bad_shards": False,
             "eval_manifest": None, "eval_behaviors": None, "teacher_cache": False, "tasks": None,
             "spec_augment": None, "num_workers": 2, "prefetch_factor": 2, "skip_bad_audio": False,
             "verify_shards": False},
    "interleave": {"schedule": "cosine", "start": 0.8, "end": 0.0, "steps": 1000, "mean_span": 3.0},
    "packing": {"max_tokens": 1024, "examples_per_step": 8, "token_budget": None, "overlong": "truncate"},
    "train": {"steps": 1000, "lr": 1e-3, "weight_decay": 0.0, "warmup_steps": 50, "grad_accum": 1,
              "clip_grad": 1.0, "seed": 0, "log_every": 10, "eval_every": 0, "eval_examples": 16,
              "save_every": 0, "keep_last": 2, "peak_tflops": None, "report_to": ["tensorboard"]},
    "deepspeed": None,
}
REQUIRED = ("model", "data", "output_dir")
# Numeric keys and their ranges: (key, "int" or "number", lower bound, bound allowed, null allowed),
# and an upper bound (inclusive) for the keys in UPPER. Numbers must also be finite. A model key
# missing from the config takes ModelConfig's default.
RANGES = (
    ("data.num_workers", "int", 0, True, False),
    ("data.prefetch_factor", "int", 1, True, False),
    ("data.shuffle_cuts", "int", 1, True, False),
    ("interleave.mean_span", "number", 0, False, False),
    ("packing.max_tokens", "int", 2, True, False),
    ("packing.examples_per_step", "int", 1, True, False),
    ("packing.token_budget", "int", 1, True, True),     # null: examples_per_step examples a micro-batch
    ("train.steps", "int", 1, True, False),
    ("train.lr", "number", 0, False, False),
    ("train.weight_decay", "number", 0, True, False),
    ("train.warmup_steps", "int", 0, True, False),
    ("train.grad_accum", "int", 1, True, False),
    ("train.clip_grad", "number", 0, False, True),      # null: no clipping
    ("train.seed", "int", 0, True, False),
    ("train.log_every", "int", 1, True, False),
    ("train.eval_every", "int", 0, True, False),        # 0: no held-out evaluation
    ("train.eval_examples", "int", 1, True, False),
    ("train.save_every", "int", 0, True, False),        # 0: no checkpoints (final/ only)
    ("train.keep_last", "int", 1, True, False),
    ("train.peak_tflops", "number", 0, False, True),   # null: the card's dense bf16 peak (flops.py)
    ("model.adapter.stride", "int", 1, True, False),
    ("model.adapter.hidden", "int", 1, True, True),
    ("model.train_encoder_layers", "int", 0, True, False),
    ("model.max_audio_seconds", "number", 0, False, False),
    ("model.init_seed", "int", 0, True, False),
    ("model.loss.temperature", "number", 0, False, False),
    ("model.loss.kl_weight", "number", 0, True, False),
    ("model.loss.ce_weight", "number", 0, True, False),
    ("model.loss.chunk_size", "int", 1, True, True),
    ("model.loss.memory_budget", "int", 1, True, True),
)
# Upper bounds a real run can use; beyond them a value only poisons the run (a learning rate of
# 1e300 overflows AdamW, a temperature of 1e-300 divides the logits into inf, a seed past 2**63
# overflows torch's generator). The temperature's bounds are the loss's own (loss.TEMPERATURE_RANGE).
UPPER = {
    "train.lr": 10.0, "train.weight_decay": 10.0, "train.clip_grad": 1e6, "train.seed": 2**63 - 1,
    "train.peak_tflops": 1e6,
    "model.loss.temperature": TEMPERATURE_RANGE[1], "model.loss.kl_weight": 1e3, "model.loss.ce_weight": 1e3,
    "model.init_seed": 2**63 - 1,
}
LOWER_MIN = {"model.loss.temperature": TEMPERATURE_RANGE[0]}  # a lower bound above the open 0
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
PATH_KEYS = ("data.train_manifest", "data.behaviors", "data.train_shards", "data.eval_manifest", "data.eval_behaviors",
             "deepspeed")


def load_config(path: str | os.PathLike, overrides: list[str] = ()) -> dict:
    """The run config: YAML file + ``section.key=value`` overrides, defaults filled in, checked.
    Unknown keys and wrong types are errors naming the key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config not found: {path}")
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not a valid config: {_yaml_problem(exc)}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: a config is a mapping of sections, got {type(cfg).__name__}")
    _apply_overrides(cfg, overrides)
    _fill_defaults(cfg, path)
    _numbers_from_strings(cfg)
    _check_schema(cfg, path)
    ModelConfig.from_dict(cfg["model"], where="model")
    _check_spec_augment(cfg["data"]["spec_augment"], path)
    RatioSchedule.from_config(interleave_schedule(cfg))
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
    _resolve_paths(cfg, path.parent)
    return cfg


def interleave_schedule(cfg: dict) -> dict:
    """The ``interleave`` section without the trainer's own key (``mean_span``): the arguments of
    ``RatioSchedule.from_config``."""
    return {k: v for k, v in cfg["interleave"].items() if k != "mean_span"}


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
    for section, default in DEFAULTS.items():
        if isinstance(default, dict):
            given = cfg.get(section) or {}
            if not isinstance(given, dict):
                raise ValueError(f"{path}: {section} must be a mapping of keys (e.g. {section}.steps=5), "
                                 f"got {given!r}")
            cfg[section] = {**copy.deepcopy(default), **given}
        else:
            cfg.setdefault(section, default)
    if "model" in cfg and not isinstance(cfg["model"], dict):
        raise ValueError(f"{path}: model must be a mapping of keys, got {cfg['model']!r}")


def _numbers_from_strings(cfg: dict) -> None:
    """A numeric key written as YAML reads ``1e-4`` (a string to YAML 1.1, which wants ``1.0e-4``)
    is taken as the number it means."""
    for key, kind, *_ in RANGES:
        if kind != "number":
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
    for key in cfg:
        if key not in SCHEMA:
            raise ValueError(f"{path}: unknown key {key!r} (allowed: {sorted(SCHEMA)})")
    for key in REQUIRED:
        if key not in cfg:
            raise ValueError(f"{path}: missing required section {key!r}")
    for section, spec in SCHEMA.items():
        if isinstance(spec, dict):
            for k, v in cfg[section].items():
                if k not in spec:
                    raise ValueError(f"{path}: unknown key {section}.{k} (allowed: {sorted(spec)})")
                if not isinstance(v, spec[k]) or (isinstance(v, bool) and spec[k] is not bool):
                    raise ValueError(f"{path}: {section}.{k} must be {_type_name(spec[k])}, got "
                                     f"{type(v).__name__} {v!r}")
            for k in spec:
                if k not in cfg[section]:
                    raise ValueError(f"{path}: missing required key {section}.{k}")
        elif not isinstance(cfg[section], spec):
            raise ValueError(f"{path}: {section} must be {_type_name(spec)}, got {cfg[section]!r}")


def _check_ranges(cfg: dict, path: Path) -> None:
    """Every numeric key within its range (``RANGES``), packing.overlong one of its values:
    errors name the key."""
    for key, kind, low, inclusive, nullable in RANGES:
        node, *parents, leaf = [cfg, *key.split(".")]
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node or (nullable and node[leaf] is None):
            continue
        v = node[leaf]
        ok_type = (isinstance(v, int) if kind == "int" else isinstance(v, (int, float))) \
            and not isinstance(v, bool)
        high = UPPER.get(key)
        low_in = LOWER_MIN.get(key)
        if (not ok_type or not math.isfinite(v) or v < low or (v == low and not inclusive)
                or (high is not None and v > high) or (low_in is not None and v < low_in)):
            if low_in is not None:
                what = f"a number in [{low_in:g}, {high:g}]"
            elif kind == "int":
                what = f"an int >= {low}" + (f" and <= {high}" if high is not None else "")
            else:
                what = f"a finite number {'>=' if inclusive else '>'} {low}" + \
                    (f" and <= {high:g}" if high is not None else "")
            raise ValueError(f"{path}: {key} must be {what}{' (or null)' if nullable else ''}, "
                             f"got {v!r}")
    if cfg["packing"]["overlong"] not in ("error", "truncate"):
        raise ValueError(f"{path}: packing.overlong must be 'error' or 'truncate', got "
                         f"{cfg['packing']['overlong']!r}")


def _check_reader(d: dict, path: Path) -> None:
    """data.reader: "memory" (train_manifest + behaviors, read whole), "streaming" (train_shards,
    a folder from `mtbi-fast shard`) or "auto" (the one whose data is given); afterwards it names
    the reader the run uses."""
    memory = d["train_manifest"] is not None and d["behaviors"] is not None
    streaming = d["train_shards"] is not None
    if d["reader"] not in ("auto", "memory", "streaming"):
        raise ValueError(f"{path}: data.reader must be 'auto', 'memory' or 'streaming', got {d['reader']!r}")
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


def _resolve_paths(cfg: dict, base: Path) -> None:
    """A relative path that does not exist from the current folder but does from the config's
    folder is made that one."""
    for key in PATH_KEYS:
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        v = node.get(leaf)
        if v is not None and not os.path.isabs(v) and not Path(v).exists() and (base / v).exists():
            node[leaf] = str(base / v)


def _type_name(t) -> str:
    ts = t if isinstance(t, tuple) else (t,)
    return " or ".join("null" if x is type(None) else x.__name__ for x in ts)
