"""The MTBI trainer.

    deepspeed mtbi_fast/train.py --config configs/demo.yaml [section.key=value ...]   # any GPU count
    deepspeed --hostfile hosts mtbi_fast/train.py --config ...                          # several nodes
    python mtbi_fast/train.py --config configs/tiny_train.yaml                           # one process
    mtbi-fast train configs/demo.yaml                                                   # the same

Each step takes the next ``packing.examples_per_step`` behavior records of a seeded, endless
shuffle (micro-batch ``(step * grad_accum + k) * world + rank``: a pure function of the step, so a
resumed run sees exactly the batches an uninterrupted run sees), interleaves each utterance at the
scheduled text ratio, packs student and teacher versions, and minimizes the imitation loss. The
batches (audio decode, log-mel, SpecAugment, interleaving, packing) are built ahead of the step by
``data.num_workers`` DataLoader worker processes; the time the loop still waits for them is logged
(``data_wait_s``, ``data_wait_share``). Under
DeepSpeed ZeRO-3 the frozen LLM is partitioned from the start (built under ``zero.Init``) and only
the adapter (and LoRA / top encoder layers when enabled) is optimized.

Everything a run writes goes under ``output_dir``: ``config.yaml`` (resolved), ``metrics.jsonl``
(one row per logged step: step, loss, kl, ce, tokens_per_s, lr, ratio, data_wait_s,
data_wait_share, skipped_audio; evaluation rows, from step 0 on: step, eval_kl),
TensorBoard events when tensorboard is installed, ``run.json`` (the resolved config and the data
fingerprint the run started with), ``checkpoints/step-NNNNNN/`` (DeepSpeed's own files or
``trainer.safetensors`` + ``trainer.json``, plus ``model/``, an exported ``save_pretrained``
folder, and ``run.json``; written under a temporary name and renamed when complete, then
``checkpoints/latest`` names it; the last ``keep_last`` are kept) and ``final/`` (the exported
model after the last step). ``.lock`` holds the folder for one training at a time.

Resume (docs/resume.md): a run restarted into the same ``output_dir`` continues from its newest
complete checkpoint when the config and the data are the same (only the keys in
``RESUME_MAY_CHANGE`` may differ); nothing in the folder is unpickled (every ``*.pt`` must load
with ``torch.load(weights_only=True)``). ``--no-resume`` starts clean and refuses a folder that
already holds a run unless ``--overwrite``, which moves that run aside to
``<output_dir>.replaced-<time>``.

Before step 0: every numeric key is in its range, ``output_dir`` is writable and the DeepSpeed JSON
parses (before the model is built), and no utterance is longer than the speech encoder takes.
Audio that fails to decode mid-run is a one-line error naming the utterance and file, or, with
``data.skip_bad_audio: true``, an example left out of its batch and counted (``skipped_audio``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import shutil
import socket
import sys
import time
import weakref
import zipfile
from collections import OrderedDict
from pathlib import Path

if __package__ in (None, ""):  # run as a script (deepspeed mtbi_fast/train.py): import the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import yaml
from tqdm import tqdm

from mtbi_fast.audio import (HOP_LENGTH, SAMPLE_RATE, encoder_frames, load_audio, log_mel, mel_frames,
                             spec_augment)
from mtbi_fast.behaviors import check_teacher, read_behaviors
from mtbi_fast.data import DURATION_TOLERANCE, read_manifest
from mtbi_fast.errors import USER_ERRORS, guard
from mtbi_fast.interleave import RatioSchedule, example_pair, transcript
from mtbi_fast.io import atomic_write_text
from mtbi_fast.lock import LOCK_NAME, FolderLock, FolderLockedError
from mtbi_fast.loss import ImitationLoss
from mtbi_fast.model import ModelConfig, SpeechLLM
from mtbi_fast.packing import pack, truncate_together

# ---------------------------------------------------------------------------------------------
# configuration

SCHEMA = {
    "model": dict,
    "data": {"train_manifest": str, "behaviors": str, "eval_manifest": (str, type(None)),
             "eval_behaviors": (str, type(None)), "teacher_cache": bool, "tasks": (list, type(None)),
             "spec_augment": (dict, type(None)), "num_workers": int, "prefetch_factor": int,
             "skip_bad_audio": bool},
    "interleave": {"schedule": str, "start": (int, float), "end": (int, float), "steps": int,
                   "mean_span": (int, float)},
    "packing": {"max_tokens": int, "examples_per_step": int, "overlong": str},
    "train": {"steps": int, "lr": (int, float), "weight_decay": (int, float),
              "warmup_steps": int, "grad_accum": int, "clip_grad": (int, float, type(None)), "seed": int,
              "log_every": int, "eval_every": int, "eval_examples": int, "save_every": int,
              "keep_last": int},
    "deepspeed": (str, type(None)),
    "output_dir": str,
}
# data.num_workers: 2 batch-building processes per rank (with prefetch_factor 2, up to 4
# micro-batches built ahead of the step) hide the CPU work behind the GPU step, and 8 ranks on a
# node add only 16 single-threaded processes. A fixed value rather than one picked by device, so
# that config.yaml says what ran (the batches are the same for any value). 0 builds the batches in
# the training process (debugging; tiny runs, where a worker costs more to start than it saves).
DEFAULTS = {
    "data": {"eval_manifest": None, "eval_behaviors": None, "teacher_cache": False, "tasks": None,
             "spec_augment": None, "num_workers": 2, "prefetch_factor": 2, "skip_bad_audio": False},
    "interleave": {"schedule": "cosine", "start": 0.8, "end": 0.0, "steps": 1000, "mean_span": 3.0},
    "packing": {"max_tokens": 1024, "examples_per_step": 8, "overlong": "truncate"},
    "train": {"steps": 1000, "lr": 1e-3, "weight_decay": 0.0, "warmup_steps": 50, "grad_accum": 1,
              "clip_grad": 1.0, "seed": 0, "log_every": 10, "eval_every": 0, "eval_examples": 16,
              "save_every": 0, "keep_last": 2},
    "deepspeed": None,
}
# Numeric keys and their ranges: (key, "int" or "number", lower bound, bound allowed, null allowed).
# Numbers must also be finite. A model key missing from the config takes ModelConfig's default.
RANGES = (
    ("data.num_workers", "int", 0, True, False),
    ("data.prefetch_factor", "int", 1, True, False),
    ("interleave.mean_span", "number", 0, False, False),
    ("packing.max_tokens", "int", 2, True, False),
    ("packing.examples_per_step", "int", 1, True, False),
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
# Keys that may differ between a checkpoint and the run that resumes it (docs/resume.md): how
# long to train, how often to log, evaluate and save, how the batches are built (they are the
# same batches), how the loss is computed (the same loss) and where the run lives. The data keys
# are paths: they may move, and their contents are compared by fingerprint instead.
RESUME_MAY_CHANGE = frozenset({
    "train.steps", "train.log_every", "train.eval_every", "train.save_every", "train.keep_last",
    "data.num_workers", "data.prefetch_factor", "data.skip_bad_audio", "model.loss.backend",
    "model.loss.chunk_size", "model.loss.memory_budget", "output_dir"})
DATA_KEYS = ("data.train_manifest", "data.behaviors", "data.eval_manifest", "data.eval_behaviors")


def load_config(path: str | os.PathLike, overrides: list[str] = ()) -> dict:
    """The run config: YAML file + ``section.key=value`` overrides, defaults filled in, checked.
    Unknown keys and wrong types are errors naming the key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config not found: {path}")
    cfg = yaml.safe_load(path.read_text()) or {}
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
        node[leaf] = yaml.safe_load(value)
    for section, default in DEFAULTS.items():
        if isinstance(default, dict):
            cfg[section] = {**default, **(cfg.get(section) or {})}
        else:
            cfg.setdefault(section, default)
    for key in cfg:
        if key not in SCHEMA:
            raise ValueError(f"{path}: unknown key {key!r} (allowed: {sorted(SCHEMA)})")
    for key in ("model", "data", "output_dir"):
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
    ModelConfig.from_dict(cfg["model"], where="model")
    _check_spec_augment(cfg["data"]["spec_augment"], path)
    sched = {k: v for k, v in cfg["interleave"].items() if k != "mean_span"}
    RatioSchedule.from_config(sched)
    _check_ranges(cfg, path)
    base = path.parent
    for node, key in [(cfg["data"], k) for k in ("train_manifest", "behaviors", "eval_manifest",
                                                  "eval_behaviors")] + [(cfg, "deepspeed")]:
        v = node.get(key)
        if v is not None and not os.path.isabs(v) and not Path(v).exists() and (base / v).exists():
            node[key] = str(base / v)
    return cfg


def _check_ranges(cfg: dict, path) -> None:
    """Every numeric key within its range (``RANGES``), the loss arguments known and accepted by
    the loss, packing.overlong one of its values: errors name the key."""
    for key, kind, low, inclusive, nullable in RANGES:
        node, *parents, leaf = [cfg, *key.split(".")]
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node or (nullable and node[leaf] is None):
            continue
        v = node[leaf]
        ok_type = (isinstance(v, int) if kind == "int" else isinstance(v, (int, float))) \
            and not isinstance(v, bool)
        if not ok_type or not math.isfinite(v) or v < low or (v == low and not inclusive):
            what = f"an int >= {low}" if kind == "int" else \
                f"a finite number {'>=' if inclusive else '>'} {low}"
            raise ValueError(f"{path}: {key} must be {what}{' (or null)' if nullable else ''}, "
                             f"got {v!r}")
    if cfg["packing"]["overlong"] not in ("error", "truncate"):
        raise ValueError(f"{path}: packing.overlong must be 'error' or 'truncate', got "
                         f"{cfg['packing']['overlong']!r}")
    loss = cfg["model"].get("loss") or {}
    import inspect

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


def _check_spec_augment(sa: dict | None, path) -> None:
    """data.spec_augment: null (off) or a mapping of spec_augment's keyword arguments ({} for its
    defaults)."""
    import inspect

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


def _type_name(t) -> str:
    ts = t if isinstance(t, tuple) else (t,)
    return " or ".join("null" if x is type(None) else x.__name__ for x in ts)


# ---------------------------------------------------------------------------------------------
# data


class BadAudioError(ValueError):
    """An utterance whose audio cannot be decoded into a log-mel (the message names it and its file)."""


# log-mels kept per process: 256 clips of 15 s are about 120 MB (80 bins, fp32); the demo's 200
# training clips all fit
MEL_CACHE_CLIPS = 256


class MTBIData:
    """Behavior records joined with their utterances; deterministic micro-batches. Holds what the
    batches need from the model as plain values (tokenizer, mel bins, adapter stride, frame rate),
    never the model: it goes to DataLoader worker processes.

    Every utterance of the manifest must fit the speech encoder (checked here, from the audio
    headers). Audio that still fails to decode when its batch is built is an error naming the
    utterance and file, or with ``skip_bad_audio`` an example left out of its batch (the others
    are unchanged) and listed in the batch's ``skipped_audio``."""

    def __init__(self, manifest: str, behaviors: str, model: SpeechLLM, seed: int, mean_span: float,
                 max_tokens: int, overlong: str, teacher_cache: bool = False,
                 tasks: list[str] | None = None, spec_augment: dict | None = None,
                 skip_bad_audio: bool = False):
        utts = read_manifest(manifest, require_words=True)
        check_durations(utts, model.encoder.max_frames, manifest)
        self.utts = {u.id: u for u in utts}
        self.records = read_behaviors(behaviors)
        if tasks is not None:  # a baseline on fewer tasks (e.g. [continue]: BLSP-style alignment)
            self.records = [r for r in self.records if r["task"] in tasks]
            if not self.records:
                raise ValueError(f"data.tasks={tasks}: {behaviors} has no behaviors of these tasks")
        missing = sorted({r["utt_id"] for r in self.records} - set(self.utts))
        if missing:
            raise ValueError(f"{behaviors}: behaviors refer to utterances not in {manifest}: {missing[:5]}")
        self.seed, self.mean_span = seed, mean_span
        self.max_tokens, self.overlong = max_tokens, overlong
        self.tokenizer, self.n_mels = model.tokenizer, model.encoder.num_mel_bins
        self.stride, self.frame_rate = model.adapter.stride, model.frame_rate
        self._mels: OrderedDict[str, torch.Tensor] = OrderedDict()  # LRU, MEL_CACHE_CLIPS
        self.spec_augment = spec_augment  # SpecAugment's settings for training inputs, or None
        self.skip_bad_audio = skip_bad_audio
        self.cache = _load_hidden_cache(behaviors) if teacher_cache else None

    def __len__(self) -> int:
        return len(self.records)

    def record_indices(self, micro: int, n: int) -> list[int]:
        """Records of micro-batch ``micro``: positions [micro * n, micro * n + n) of an endless
        stream of seeded permutations, one per epoch."""
        out = []
        for pos in range(micro * n, micro * n + n):
            epoch, offset = divmod(pos, len(self.records))
            out.append(self._permutation(epoch)[offset])
        return out

    def _permutation(self, epoch: int) -> list[int]:
        """The epoch's record order (one randperm per epoch, kept for the current epoch)."""
        if getattr(self, "_perm_epoch", None) != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(len(self.records), generator=g).tolist()
            self._perm_epoch = epoch
        return self._perm

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def mel(self, utt_id: str) -> torch.Tensor:
        """The utterance's log-mel; the last MEL_CACHE_CLIPS are kept (per process: each DataLoader
        worker has its own cache, so memory stays bounded whatever the corpus size)."""
        if utt_id in self._mels:
            self._mels.move_to_end(utt_id)
        else:
            audio = self.utts[utt_id].audio
            while len(self._mels) >= MEL_CACHE_CLIPS:
                self._mels.popitem(last=False)
            try:
                self._mels[utt_id] = log_mel(load_audio(audio), self.n_mels)
            except (ValueError, OSError, RuntimeError) as exc:  # unreadable, empty, NaN, too short
                msg = str(exc) if audio in str(exc) else f"{audio}: {exc}"
                hint = "" if self.skip_bad_audio else \
                    " (set data.skip_bad_audio: true to leave such examples out, counted in metrics.jsonl)"
                raise BadAudioError(f"utterance {utt_id!r}: bad audio: {msg}{hint}") from None
        return self._mels[utt_id]

    def batch(self, indices: list[int], ratio: float, salt: int) -> dict:
        students, teachers, mels, ids, skipped = [], [], [], [], []
        for i in indices:
            r = self.records[i]
            u = self.utts[r["utt_id"]]
            try:
                mel = self.mel(u.id)
            except BadAudioError as exc:
                if not self.skip_bad_audio:
                    raise
                skipped.append(str(exc))  # left out; the other examples are what they would be
                continue
            if self.spec_augment is not None:  # masks seeded by example and step (resumable)
                ga = torch.Generator().manual_seed(self.seed * 6007 + salt * 15_485_863 + i)
                mel = spec_augment(mel, generator=ga, **self.spec_augment)
            n_frames = math.ceil(encoder_frames(mel.shape[1]) / self.stride)  # Adapter.n_frames
            g = torch.Generator().manual_seed(self.seed * 7919 + salt * 104_729 + i)
            s, t = example_pair(r["id"], u.words, n_frames, self.frame_rate, ratio,
                                r["prefix_ids"], r["suffix_ids"], r["response_ids"], self.tokenize,
                                mean_span=self.mean_span, generator=g, duration=u.duration)
            if list(t.prompt[1].ids) != r["transcript_ids"]:
                raise ValueError(f"{r['id']}: the words of utterance {u.id!r} ({transcript(u.words)!r})"
                                 " do not tokenize to the behavior's transcript; regenerate the behaviors")
            s, t = truncate_together([s, t], self.max_tokens, self.overlong)  # same response tokens
            students.append(s)
            teachers.append(t)
            mels.append(mel)
            ids.append(r["id"])
        if not students:
            raise BadAudioError(f"every example of this batch has bad audio: {'; '.join(skipped)}")
        out = {"student": pack(students, self.max_tokens, overlong=self.overlong),
               "teacher": pack(teachers, self.max_tokens, overlong=self.overlong), "mels": mels,
               "skipped_audio": skipped}
        if self.cache is not None:  # cached states, cut like the (possibly truncated) responses
            counts = torch.bincount(out["student"].loss_example, minlength=len(ids)).tolist()
            out["teacher_hidden"] = torch.cat([self.cache[k][:c] for k, c in zip(ids, counts)])
        return out


class MicroBatches(torch.utils.data.Dataset):
    """Item j: this rank's j-th training micro-batch (step ``j // grad_accum``), the global
    micro-batch ``j * world + rank``. A pure function of the seed and j, so DataLoader workers
    (any number) give the batches the training process would build, and a run resumed at step s
    starts at item ``s * grad_accum``."""

    def __init__(self, data: MTBIData, schedule: RatioSchedule, examples_per_step: int,
                 grad_accum: int, world: int = 1, rank: int = 0):
        self.data, self.schedule, self.examples = data, schedule, examples_per_step
        self.grad_accum, self.world, self.rank = grad_accum, world, rank

    def __getitem__(self, j: int) -> dict:
        """The micro-batch, or ``{"error": message}`` for a user error (bad audio, a behavior that
        does not match its utterance): returned, not raised, so that the training loop raises it
        as the same one-line error whether a worker process or this one built the batch (the
        DataLoader turns a worker's exception into a traceback text)."""
        micro = j * self.world + self.rank  # = (step * grad_accum + k) * world + rank
        indices = self.data.record_indices(micro, self.examples)
        try:
            return self.data.batch(indices, self.schedule(j // self.grad_accum), salt=micro)
        except USER_ERRORS as exc:
            return {"error": str(exc)}


def check_durations(utts, max_frames: int, manifest) -> None:
    """Every utterance fits the speech encoder (``max_frames`` output frames: Whisper's 1500 are
    30 s), judged from the manifest's durations and, near the limit, the audio header's exact
    length. The error lists the utterances that do not."""
    limit = max_frames * 2 * HOP_LENGTH / SAMPLE_RATE
    bad = []
    for u in utts:
        if u.duration <= limit - DURATION_TOLERANCE:
            continue
        if u.duration <= limit + DURATION_TOLERANCE:  # the duration field may be off by the tolerance
            import soundfile as sf

            info = sf.info(u.audio)
            samples = math.ceil(info.frames * SAMPLE_RATE / info.samplerate)
            if encoder_frames(mel_frames(samples)) <= max_frames:
                continue
        bad.append(f"{u.id} ({u.duration:.1f} s)")
    if bad:
        raise ValueError(f"{manifest}: {len(bad)} utterance{'s are' if len(bad) > 1 else ' is'} longer "
                         f"than the speech encoder's limit of {limit:g} s ({max_frames} frames): "
                         f"{', '.join(bad[:20])}{', ...' if len(bad) > 20 else ''}; remove "
                         f"{'them' if len(bad) > 1 else 'it'} from the manifest or cut the audio")


def _single_process_env():
    """torch.distributed's env:// variables for a one-process world on a free local port."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                       ("LOCAL_WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", str(port))):
        os.environ.setdefault(key, value)


def _load_hidden_cache(behaviors: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(Path(behaviors).glob("shard-*.safetensors"))
    if not files:
        raise FileNotFoundError(f"data.teacher_cache is on but {behaviors} has no hidden-state "
                                "shards; run `mtbi-fast behaviors ... --cache-hidden`")
    cache = {}
    for f in files:
        cache.update(load_file(str(f)))
    return cache


# ---------------------------------------------------------------------------------------------
# training


def lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(warmup, 1)
        progress = (step - warmup) / max(total - warmup, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return f


class Trainer:
    """One training run into ``cfg["output_dir"]``. Construction checks the output folder and the
    DeepSpeed config, takes the folder's lock (rank 0) and builds the model and the data;
    ``train()`` runs (or resumes) the loop and releases the lock."""

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.out = Path(cfg["output_dir"])
        t = cfg["train"]
        self.ds_config = None
        self.world, self.rank = 1, 0
        self._lock = None
        self.fingerprint = None
        # before anything is built: a folder we cannot write, or a broken DeepSpeed JSON, would
        # otherwise show only after the model has loaded
        check_output_dir(self.out)
        if cfg["data"]["teacher_cache"]:  # the cached states must be this run's LLM's
            check_teacher(cfg["data"]["behaviors"], cfg["model"])
        ds_json = read_deepspeed_config(cfg["deepspeed"]) if cfg["deepspeed"] else None
        if ds_json is not None:
            self._init_distributed(ds_json)
        self._on_rank0(self._take_lock)
        try:
            self._build(t)
        except BaseException:
            self.close()
            raise

    def _build(self, t: dict):
        cfg = self.cfg
        torch.manual_seed(t["seed"])
        model_cfg = ModelConfig.from_dict(cfg["model"])
        if self.ds_config and self.ds_config.get("zero_optimization", {}).get("stage") == 3:
            import deepspeed

            # a pretrained LLM is partitioned as it loads (transformers' from_pretrained reads the
            # ZeRO-3 config from HfDeepSpeedConfig), never whole on one rank; a random tiny LLM is
            # built whole (so that its initialization matches a single-process run) like the
            # encoder and adapter, and everything still whole is partitioned right after
            pretrained = "tiny" not in model_cfg.llm
            context = _hf_zero3(self.ds_config) if pretrained else None
            self.model = SpeechLLM.from_config(model_cfg, llm_context=context)
            deepspeed.zero.Init(module=self.model, config_dict_or_path=self.ds_config)
        else:
            self.model = SpeechLLM.from_config(model_cfg)
        d = cfg["data"]
        common = dict(seed=t["seed"], mean_span=cfg["interleave"]["mean_span"],
                      max_tokens=cfg["packing"]["max_tokens"], overlong=cfg["packing"]["overlong"],
                      skip_bad_audio=d["skip_bad_audio"])
        self.data = MTBIData(d["train_manifest"], d["behaviors"], self.model,
                             teacher_cache=d["teacher_cache"], tasks=d["tasks"],
                             spec_augment=d["spec_augment"], **common)
        self.eval_data = None
        if d["eval_manifest"] and d["eval_behaviors"]:
            self.eval_data = MTBIData(d["eval_manifest"], d["eval_behaviors"], self.model, **common)
        self.schedule = RatioSchedule.from_config(
            {k: v for k, v in cfg["interleave"].items() if k != "mean_span"})
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.n_trainable = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in params)
        sched_fn = lr_lambda(t["warmup_steps"], t["steps"])
        if self.ds_config:
            import deepspeed

            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=self.model, model_parameters=params, config=self.ds_config,
                lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, sched_fn))
        else:
            self.engine = self.model
            self.optimizer = torch.optim.AdamW(params, lr=t["lr"], weight_decay=t["weight_decay"])
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, sched_fn)
        self.step = 0
        self.data_wait_s = 0.0  # seconds the loop waited for its batches (this process, this run)
        self.skipped_audio = 0  # examples left out for bad audio (this process, this run)
        self.tb = None

    # -- setup -------------------------------------------------------------------------------

    def _init_distributed(self, cfg: dict):
        import deepspeed

        t = self.cfg["train"]
        on_gpu = torch.cuda.is_available()
        if not on_gpu:
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # else a ~65 s JIT build
        if not any(k in os.environ for k in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")):
            _single_process_env()  # run without a launcher: a world of one (no MPI discovery)
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
        self.world = torch.distributed.get_world_size()
        self.rank = torch.distributed.get_rank()
        if on_gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        for key in ("bf16", "fp16"):
            if cfg.get(key, {}).get("enabled") == "auto":
                cfg[key]["enabled"] = on_gpu and key == "bf16"
        cfg["train_micro_batch_size_per_gpu"] = 1
        cfg["gradient_accumulation_steps"] = t["grad_accum"]
        cfg["train_batch_size"] = t["grad_accum"] * self.world
        cfg["gradient_clipping"] = t["clip_grad"] or 0.0  # DeepSpeed: 0 = no clipping
        opt = cfg.setdefault("optimizer", {"type": "AdamW", "params": {}})
        opt.setdefault("params", {}).update(lr=t["lr"], weight_decay=t["weight_decay"])
        if not on_gpu:
            opt["params"]["torch_adam"] = True  # no fused-Adam JIT build on CPU
        self.ds_config = cfg

    def _take_lock(self):
        """One training per output folder: rank 0 holds its lock until the run ends (the kernel
        drops it if the process dies); a second training fails here, naming the holder."""
        self._lock = FolderLock(self.out, "training").acquire()
        weakref.finalize(self, self._lock.release)  # a Trainer dropped without train()

    def close(self):
        """Release the output folder (``train()`` does this when it ends)."""
        if self._lock is not None:
            self._lock.release()

    def _on_rank0(self, fn):
        """``fn()`` run on rank 0; its result, or the user error it raised, on every rank (a
        refusal stops all ranks at once instead of leaving the others waiting in a collective)."""
        result, error = None, None
        if self.rank == 0:
            try:
                result = fn()
            except USER_ERRORS as exc:
                error = exc
        if self.world > 1:
            box = [(result, None if error is None else
                    (isinstance(error, FolderLockedError), str(error)))]
            torch.distributed.broadcast_object_list(box, src=0)
            result, remote = box[0]
            if self.rank != 0 and remote is not None:
                raise (FolderLockedError if remote[0] else ValueError)(remote[1])
        if error is not None:
            raise error
        return result

    # -- loop --------------------------------------------------------------------------------

    def train(self, resume: bool = True, overwrite: bool = False) -> dict:
        """Run to ``train.steps``. ``resume``: continue from the newest complete checkpoint of
        the same run (refused when the config or the data differ, docs/resume.md). ``resume``
        False starts clean and refuses a folder that already holds a run unless ``overwrite``;
        ``overwrite`` (also without resume False) moves such a run aside, never deletes it."""
        try:
            return self._train(resume and not overwrite, overwrite)
        finally:
            self.close()

    def _train(self, resume: bool, overwrite: bool) -> dict:
        t = self.cfg["train"]
        start = self._on_rank0(lambda: self._prepare(resume, overwrite))
        if start is not None:
            self._load_checkpoint(self.out / "checkpoints" / start)
        if self.rank == 0:
            self._trim_metrics()
            self._open_tensorboard()
        device = next(p.device for p in self.model.adapter.parameters())
        if t["eval_every"] and self.step == 0:
            self.evaluate()  # the starting point of the held-out curve
        bar = tqdm(total=t["steps"], initial=self.step, desc="train", unit="step",
                   disable=self.rank != 0)
        window = {"loss": 0.0, "kl": 0.0, "ce": 0.0, "tokens": 0, "n": 0, "data_wait": 0.0,
                  "skipped": 0}
        t_window = time.perf_counter()
        last = {}
        batches = iter(self.train_loader(device))
        try:
            while self.step < t["steps"]:
                ratio = self.schedule(self.step)
                for _ in range(t["grad_accum"]):
                    t_wait = time.perf_counter()
                    batch = next(batches)
                    if "error" in batch:  # built by a worker or here: the same one-line error
                        raise ValueError(f"step {self.step + 1}: {batch['error']}")
                    kwargs = {"mels": [m.to(device, non_blocking=True) for m in batch["mels"]]}
                    if "teacher_hidden" in batch:
                        kwargs["teacher_hidden"] = batch["teacher_hidden"].to(device, non_blocking=True)
                    else:
                        kwargs["teacher"] = batch["teacher"]
                    waited = time.perf_counter() - t_wait
                    window["data_wait"] += waited
                    self.data_wait_s += waited
                    for message in batch["skipped_audio"]:
                        tqdm.write(f"step {self.step + 1}: skipped {message}")
                    window["skipped"] += len(batch["skipped_audio"])
                    self.skipped_audio += len(batch["skipped_audio"])
                    out = self.engine(batch["student"], **kwargs)
                    if self.ds_config:
                        self.engine.backward(out["loss"])
                        self.engine.step()
                    else:
                        (out["loss"] / t["grad_accum"]).backward()
                    for key in ("loss", "kl", "ce"):
                        window[key] += float(out[key].detach()) / t["grad_accum"]
                    window["tokens"] += batch["student"].n_tokens
                if not self.ds_config:
                    if t["clip_grad"] is not None:
                        torch.nn.utils.clip_grad_norm_(
                            [p for p in self.model.parameters() if p.requires_grad], t["clip_grad"])
                    self.optimizer.step()
                    self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                window["n"] += 1
                self.step += 1
                bar.update(1)
                if self.step % t["log_every"] == 0 or self.step == t["steps"]:
                    last = self._log(window, time.perf_counter() - t_window, ratio)
                    bar.set_postfix(loss=f"{last['loss']:.4f}", kl=f"{last['kl']:.4f}",
                                    tok_s=f"{last['tokens_per_s']:.0f}", lr=f"{last['lr']:.2e}",
                                    data_wait=f"{last['data_wait_share']:.0%}")
                    window = {k: 0 if k in ("tokens", "n", "skipped") else 0.0 for k in window}
                    t_window = time.perf_counter()
                if t["eval_every"] and (self.step % t["eval_every"] == 0 or self.step == t["steps"]):
                    self.evaluate()
                if t["save_every"] and self.step % t["save_every"] == 0:
                    self.save_checkpoint()
        finally:
            del batches  # stops the loader's workers now, also when the loop raises
            bar.close()  # (an error message then starts on a line of its own)
        self.export(self.out / "final")
        if self.tb is not None:
            self.tb.close()
        return last

    def train_loader(self, device: torch.device) -> torch.utils.data.DataLoader:
        """This rank's micro-batches from the current step to the last, built ahead by
        ``data.num_workers`` worker processes (CPU only: the encoder, the adapter and the online
        teacher run in this process). One pass over it is the whole run, so its workers start
        once and live as long as the run."""
        d, t = self.cfg["data"], self.cfg["train"]
        items = MicroBatches(self.data, self.schedule, self.cfg["packing"]["examples_per_step"],
                             t["grad_accum"], self.world, self.rank)
        workers = d["num_workers"]
        return torch.utils.data.DataLoader(
            items, batch_size=None, sampler=range(self.step * t["grad_accum"], t["steps"] * t["grad_accum"]),
            num_workers=workers, prefetch_factor=d["prefetch_factor"] if workers else None,
            pin_memory=device.type == "cuda",  # pinned pages: asynchronous copies to the GPU
            # the loader draws its workers' base seed from this generator, not from the global
            # RNG, whose state the checkpoints save: a resumed run's RNG state then equals an
            # uninterrupted run's (the batches never depend on it)
            generator=torch.Generator().manual_seed(t["seed"]))

    def _log(self, window, seconds, ratio) -> dict:
        seconds = max(seconds, 1e-9)
        vals = torch.tensor([window["loss"], window["kl"], window["ce"], float(window["tokens"]),
                             window["data_wait"], window["data_wait"] / seconds,
                             float(window["skipped"])])
        if self.world > 1:
            torch.distributed.all_reduce(vals)
            vals[[0, 1, 2, 4, 5]] /= self.world  # means over ranks; tokens and skips are summed
        n = max(window["n"], 1)
        row = {"step": self.step, "loss": vals[0].item() / n, "kl": vals[1].item() / n,
               "ce": vals[2].item() / n, "tokens_per_s": vals[3].item() / seconds,
               "lr": self.scheduler.get_last_lr()[0], "ratio": ratio,
               "data_wait_s": vals[4].item(), "data_wait_share": vals[5].item(),
               "skipped_audio": int(vals[6].item()), "time": time.time()}
        if self.rank == 0:
            self._write_metrics(row)
        return row

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Held-out imitation KL at ratio 0 (pure speech) on fixed eval examples."""
        if self.eval_data is None:
            return None
        n = min(self.cfg["train"]["eval_examples"], len(self.eval_data))
        idx = list(range(n))[self.rank::self.world]
        kl, count = torch.zeros(2), 0
        device = next(p.device for p in self.model.adapter.parameters())
        for start in range(0, len(idx), self.cfg["packing"]["examples_per_step"]):
            chunk = idx[start:start + self.cfg["packing"]["examples_per_step"]]
            batch = self.eval_data.batch(chunk, 0.0, salt=0)
            out = self.engine(batch["student"], mels=[m.to(device) for m in batch["mels"]],
                              teacher=batch["teacher"])
            rows = batch["student"].target_ids.numel()
            kl += torch.tensor([float(out["kl"].detach()) * rows, rows])
            count += rows
        if self.world > 1:
            torch.distributed.all_reduce(kl)
        value = (kl[0] / kl[1].clamp(min=1)).item()
        if self.rank == 0:
            self._write_metrics({"step": self.step, "eval_kl": value, "time": time.time()})
        return value

    # -- start: resume or begin ------------------------------------------------------------

    def _prepare(self, resume: bool, overwrite: bool) -> str | None:
        """Rank 0, holding the lock: decide how the run starts and record it. Returns the
        checkpoint to resume (its folder name) or None. Refusals are user errors."""
        self.fingerprint = data_fingerprint(self.cfg)
        root = self.out / "checkpoints"
        ckpt = None
        if not resume:
            previous = sorted(p.name for p in self.out.iterdir()
                              if p.name != LOCK_NAME and not p.name.startswith(WRITE_PROBE))
            if previous and not overwrite:
                raise ValueError(
                    f"--no-resume: {self.out} already holds a run ({', '.join(previous[:5])}"
                    f"{', ...' if len(previous) > 5 else ''}); resume it (without --no-resume), use "
                    f"another output_dir, or add --overwrite to move it aside to "
                    f"{self.out.name}.replaced-<time>")
            if previous:
                moved = move_aside(self.out)
                print(f"moved the previous run in {self.out} to {moved}")
        else:
            for partial in root.glob(".step-*.tmp") if root.is_dir() else ():
                shutil.rmtree(partial, ignore_errors=True)  # a save cut short: never resumed
            done = complete_checkpoints(root)
            if done:
                ckpt = done[-1]
                record = ckpt / "run.json"
                if not record.is_file():
                    raise ValueError(f"cannot resume from {ckpt}: it has no run.json (written by an "
                                     "older mtbi-fast, or not a checkpoint of this trainer); start "
                                     "clean with --no-resume --overwrite, or use another output_dir")
                self._check_same_run(_read_json(record), f"from {ckpt}")
                check_pickles(ckpt)
            elif (self.out / "run.json").is_file():  # a run that stopped before its first checkpoint
                self._check_same_run(_read_json(self.out / "run.json"), f"the run in {self.out}")
        atomic_write_text(self.out / "config.yaml", yaml.safe_dump(self.cfg, sort_keys=False))
        started = {k: v for k, v in self._run_record().items() if k != "step"}
        atomic_write_text(self.out / "run.json", json.dumps(started, indent=1) + "\n")
        return ckpt.name if ckpt is not None else None

    def _check_same_run(self, recorded: dict, what: str):
        diffs = run_differences(recorded, self.cfg, self.fingerprint)
        if diffs:
            raise ValueError(
                f"cannot resume {what}: {'; '.join(diffs)}. Only {', '.join(sorted(RESUME_MAY_CHANGE))}"
                f" may change on resume (docs/resume.md); start clean with --no-resume --overwrite "
                f"(the old run is moved aside to {self.out.name}.replaced-<time>), or use another "
                "output_dir")

    def _run_record(self) -> dict:
        return {"format": 1, "step": self.step, "config": _jsonable(self.cfg),
                "data": self.fingerprint}

    # -- checkpoints -------------------------------------------------------------------------

    def save_checkpoint(self):
        """``checkpoints/step-NNNNNN``: written whole under a temporary name (DeepSpeed's files or
        the trainer state, the exported model, run.json, COMPLETE), renamed, and only then named
        by ``checkpoints/latest``: a kill at any point leaves the previous checkpoint current."""
        root = self.out / "checkpoints"
        name = f"step-{self.step:06d}"
        tmp = root / f".{name}.tmp"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self._barrier()
        if self.ds_config:
            self.engine.save_checkpoint(str(root), tag=tmp.name, client_state={"step": self.step},
                                        save_latest=False)
        elif self.rank == 0:
            self._save_trainer_state(tmp)
        self._barrier()
        self.export(tmp / "model")
        if self.rank == 0:
            atomic_write_text(tmp / "run.json", json.dumps(self._run_record(), indent=1) + "\n")
            (tmp / "COMPLETE").write_text(str(self.step))
            shutil.rmtree(root / name, ignore_errors=True)
            tmp.rename(root / name)
            atomic_write_text(root / "latest", name)  # DeepSpeed's tag file; ours too
            for old in complete_checkpoints(root)[:-self.cfg["train"]["keep_last"]]:
                shutil.rmtree(old, ignore_errors=True)
        self._barrier()

    def _save_trainer_state(self, folder: Path):
        """The plain (non-DeepSpeed) trainer state without pickle: tensors (trained weights,
        optimizer state, RNG states) in ``trainer.safetensors``, the rest in ``trainer.json``."""
        from safetensors.torch import save_file

        tensors = {f"model.{k}": v.detach().cpu().contiguous()
                   for k, v in self.model.trainable_state_dict().items()}
        opt = self.optimizer.state_dict()
        state = {}
        for idx, entry in opt["state"].items():
            state[str(idx)] = {"tensors": [], "values": {}}
            for k, v in entry.items():
                if isinstance(v, torch.Tensor):
                    tensors[f"optimizer.{idx}.{k}"] = v.detach().cpu().contiguous()
                    state[str(idx)]["tensors"].append(k)
                else:
                    state[str(idx)]["values"][k] = v
        tensors["rng.cpu"] = torch.get_rng_state()
        if torch.cuda.is_available():
            for i, rng in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda.{i}"] = rng
        save_file(tensors, str(folder / "trainer.safetensors"))
        meta = {"format": 1, "step": self.step,
                "optimizer": {"param_groups": opt["param_groups"], "state": state},
                "scheduler": self.scheduler.state_dict()}
        atomic_write_text(folder / "trainer.json", json.dumps(meta) + "\n")

    def _load_checkpoint(self, folder: Path):
        """Every rank: the checkpoint ``_prepare`` chose and checked."""
        step = int(_read_json(folder / "run.json")["step"])
        if self.ds_config:
            with _weights_only_deepspeed_loads(self.engine):
                path, _ = self.engine.load_checkpoint(str(folder.parent), tag=folder.name)
            if path is None:
                raise ValueError(f"cannot resume from {folder}: DeepSpeed found no checkpoint there")
        else:
            self._load_trainer_state(folder)
        self.step = step
        if self.rank == 0:
            print(f"resumed from {folder} at step {self.step}")

    def _load_trainer_state(self, folder: Path):
        from safetensors.torch import load_file

        files = (folder / "trainer.safetensors", folder / "trainer.json")
        try:
            tensors = load_file(str(files[0]))
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise ValueError(f"cannot resume: {files[0]} is not a readable safetensors file "
                             f"({exc})") from None
        meta = _read_json(files[1])
        trained = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        expected = set(self.model.trainable_state_dict())
        if set(trained) != expected:
            raise ValueError(f"cannot resume: {files[0]} holds other trained weights than this model "
                             f"(missing {sorted(expected - set(trained))[:3]}, unexpected "
                             f"{sorted(set(trained) - expected)[:3]})")
        self.model.load_state_dict(trained, strict=False)
        state = {int(i): {**e["values"], **{k: tensors[f"optimizer.{i}.{k}"] for k in e["tensors"]}}
                 for i, e in meta["optimizer"]["state"].items()}
        self.optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
        self.scheduler.load_state_dict(meta["scheduler"])
        torch.set_rng_state(tensors["rng.cpu"])
        cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)

    def export(self, directory: Path):
        """save_pretrained of the trained parts (gathered from ZeRO-3 partitions when needed)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.ds_config and any(hasattr(p, "ds_id") for p in params):
            import deepspeed

            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                if self.rank == 0:
                    self.model.save_pretrained(directory)
        elif self.rank == 0:
            self.model.save_pretrained(directory)
        self._barrier()

    # -- metrics -----------------------------------------------------------------------------

    def _write_metrics(self, row: dict):
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k not in ("step", "time"):
                    self.tb.add_scalar(k, v, row["step"])

    def _trim_metrics(self):
        """Drop the rows that this run writes again: those after the resumed checkpoint, or all
        of them when it starts at step 0 (the step-0 evaluation included). A row cut short by a
        kill is dropped too."""
        path = self.out / "metrics.jsonl"
        if not path.exists():
            return
        rows = []
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if self.step > 0 and isinstance(row, dict) and row.get("step", math.inf) <= self.step:
                rows.append(line)
        atomic_write_text(path, "".join(r + "\n" for r in rows))

    def _open_tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return
        try:
            self.tb = SummaryWriter(str(self.out / "tensorboard"))
        except Exception:  # noqa: BLE001 - tensorboard missing or broken: metrics.jsonl suffices
            self.tb = None

    def _barrier(self):
        if self.world > 1:
            torch.distributed.barrier()


# ---------------------------------------------------------------------------------------------
# run folders: checks, identity, checkpoints


def check_output_dir(out: Path) -> None:
    """``out`` exists (created if missing) and this process can write in it."""
    probe = out / f"{WRITE_PROBE}{socket.gethostname()}-{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ValueError(f"output_dir {out} is not a writable folder ({exc.strerror or exc})") from None


def read_deepspeed_config(path: str) -> dict:
    """The DeepSpeed JSON, checked to exist and parse (errors name the file)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"DeepSpeed config not found: {p} (the deepspeed key)")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{p}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{p}: cannot read the DeepSpeed config ({exc})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{p}: a DeepSpeed config must be a JSON object, got {type(cfg).__name__}")
    if not isinstance(cfg.get("zero_optimization", {}), dict):
        raise ValueError(f"{p}: zero_optimization must be an object")
    return cfg


def data_fingerprint(cfg: dict) -> dict[str, str]:
    """sha256 of the bytes the trainer reads, per data key: each manifest, and each behaviors
    folder's ``shard-*.jsonl`` records (plus its ``shard-*.safetensors`` teacher states when
    ``data.teacher_cache`` reads them). Contents, not paths or times: a folder that moved, or a
    file rewritten with the same bytes, is the same data. Audio files are known by their
    manifest lines (path, duration), not read."""
    d = cfg["data"]
    files = {"data.train_manifest": [Path(d["train_manifest"])],
             "data.behaviors": _behavior_files(d["behaviors"], d["teacher_cache"])}
    if d["eval_manifest"] and d["eval_behaviors"]:
        files["data.eval_manifest"] = [Path(d["eval_manifest"])]
        files["data.eval_behaviors"] = _behavior_files(d["eval_behaviors"], False)
    return {key: _sha256(paths, names=len(paths) > 1 or key.endswith("behaviors"))
            for key, paths in files.items()}


def run_differences(recorded: dict, cfg: dict, fingerprint: dict) -> list[str]:
    """What differs between a recorded run (``run.json``) and this config and data, other than
    the keys in ``RESUME_MAY_CHANGE``: "key (old -> new)" items."""
    old, new = _flatten(recorded.get("config", {})), _flatten(_jsonable(cfg))
    diffs = []
    for key in sorted(set(old) | set(new)):
        if key in RESUME_MAY_CHANGE or key in DATA_KEYS:
            continue
        if old.get(key, _MISSING) != new.get(key, _MISSING):
            diffs.append(f"{key} ({_short(old.get(key, _MISSING))} -> {_short(new.get(key, _MISSING))})")
    was = recorded.get("data") or {}
    for key in sorted(set(was) | set(fingerprint)):
        if was.get(key) != fingerprint.get(key):
            state = "not used" if key not in fingerprint else "not used before" if key not in was \
                else "other contents"
            diffs.append(f"{key} ({state})")
    return diffs


def complete_checkpoints(root: Path) -> list[Path]:
    """The complete ``step-N`` folders under ``root``, oldest first (a save in progress has a
    temporary name; a folder without COMPLETE, left by an older version, is not one)."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit()
             and (p / "COMPLETE").is_file()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def check_pickles(folder: Path) -> None:
    """Every ``*.pt`` under ``folder`` loads as tensors and plain data (``torch.load`` with
    ``weights_only=True``, DeepSpeed's few state classes allowed, ``DEEPSPEED_SAFE_GLOBALS``),
    so nothing in it runs code when DeepSpeed loads it; otherwise an error naming the file.
    Zip-format files are memory-mapped: the check reads the pickles, not the tensor data."""
    for path in sorted(folder.rglob("*.pt")):
        try:
            with torch.serialization.safe_globals(_deepspeed_safe_globals()):
                torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        except Exception as exc:  # noqa: BLE001 - the unpickler's errors are of many types
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or [type(exc).__name__]
            first = next((ln for ln in lines if "GLOBAL" in ln), lines[0])  # the type it refused
            raise ValueError(f"refusing to resume: {path} does not load as plain tensors and data "
                             f"(torch.load weights_only=True: {first}); it may run code when "
                             "unpickled, so it is not loaded") from None


def move_aside(out: Path) -> Path:
    """Move everything in ``out`` but its lock to a new sibling ``<out>.replaced-<time>`` (the
    checkpoints first, so that a move cut short never leaves them for a later resume)."""
    base = out.parent / f"{out.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
    dest, k = base, 1
    while dest.exists():
        k += 1
        dest = base.with_name(f"{base.name}-{k}")
    dest.mkdir()
    entries = sorted((p for p in out.iterdir() if p.name != LOCK_NAME),
                     key=lambda p: (p.name != "checkpoints", p.name))
    for p in entries:
        try:
            os.rename(p, dest / p.name)
        except OSError as exc:
            raise ValueError(f"cannot move {p} aside to {dest} ({exc.strerror or exc}); move the "
                             f"old run away yourself or use another output_dir") from None
    return dest


DEEPSPEED_SAFE_GLOBALS = ("deepspeed.runtime.fp16.loss_scaler:LossScaler",
                          "deepspeed.runtime.fp16.loss_scaler:DynamicLossScaler",
                          "deepspeed.runtime.zero.config:ZeroStageEnum",
                          "deepspeed.utils.tensor_fragment:fragment_address")
# The only non-torch types DeepSpeed 0.19 pickles into its ZeRO-1/2/3 checkpoint files (seen in
# its optimizer states): two loss-scaler classes (plain attributes: scale, counters, flags), the
# ZeRO-stage enum (an int) and a dataclass of two ints. Allowing them lets the unpickler build
# these and nothing else; it never calls their methods.


def _deepspeed_safe_globals() -> list:
    import importlib

    out = []
    for spec in DEEPSPEED_SAFE_GLOBALS:
        module, name = spec.split(":")
        try:
            out.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # deepspeed absent, or a version without it
            continue
    return out


@contextlib.contextmanager
def _weights_only_deepspeed_loads(engine):
    """While open, the DeepSpeed engine's checkpoint engine loads with ``weights_only=True``
    (and only DeepSpeed's safe state classes): it would otherwise unpickle with
    ``weights_only=False``. Checked files are loaded this way too, so a file swapped after the
    check cannot run code either."""
    ce = engine.checkpoint_engine
    allowed = _deepspeed_safe_globals()

    def load(path, map_location=None):
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)

    ce.load = load
    try:
        yield
    finally:
        del ce.load


_MISSING = "<missing>"
WRITE_PROBE = ".write-test-"


def _behavior_files(folder: str, with_states: bool) -> list[Path]:
    files = sorted(Path(folder).glob("shard-*.jsonl"))
    if with_states:
        files += sorted(Path(folder).glob("shard-*.safetensors"))
    return files


def _sha256(paths: list[Path], names: bool) -> str:
    h = hashlib.sha256()
    for p in paths:
        if names:
            h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def _jsonable(obj):
    return json.loads(json.dumps(obj))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _short(v) -> str:
    text = v if v is _MISSING else json.dumps(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot resume: {path} is not readable JSON ({exc})") from None


@contextlib.contextmanager
def _hf_zero3(ds_config: dict):
    """While open, transformers' from_pretrained builds models under ZeRO-3 (partitioned as the
    weights load). Only the LLM is loaded in it: the Whisper encoder's own initialization does
    not run on partitioned weights."""
    from transformers.integrations import HfDeepSpeedConfig

    hf = HfDeepSpeedConfig(ds_config)  # transformers keeps a weak reference to it
    try:
        yield hf
    finally:
        del hf


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mtbi-fast train",
                                     description="MTBI trainer (see the module docstring)")
    parser.add_argument("--config", required=True, help="run config (YAML)")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("--no-resume", action="store_true",
                        help="start clean; refused when output_dir already holds a run, unless "
                             "--overwrite (docs/resume.md)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start clean even when output_dir holds a run: that run is moved "
                             "aside to <output_dir>.replaced-<time>, never deleted")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of a user error instead of one line")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_intermixed_args(argv)
    return guard(lambda: _run(args), prog="mtbi-fast train", debug=args.debug)


def _run(args) -> int:
    cfg = load_config(args.config, args.overrides)
    trainer = Trainer(cfg)
    t0 = time.time()
    last = trainer.train(resume=not args.no_resume, overwrite=args.overwrite)
    if trainer.rank == 0:
        skipped = f", {trainer.skipped_audio} examples skipped for bad audio" if trainer.skipped_audio else ""
        print(f"done: {trainer.step} steps in {time.time() - t0:.0f} s, final loss "
              f"{last.get('loss', float('nan')):.4f}, {trainer.n_trainable / 1e6:.2f} M trainable "
              f"parameters, {trainer.data_wait_s:.1f} s waiting for data{skipped} -> {trainer.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
