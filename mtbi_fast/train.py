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
data_wait_share; evaluation rows, from step 0 on: step, eval_kl),
TensorBoard events when tensorboard is installed, ``checkpoints/step-NNNNNN/`` (DeepSpeed's own
format or ``trainer.pt``, plus ``model/``, an exported ``save_pretrained`` folder; the last
``keep_last`` are kept) and ``final/`` (the exported model after the last step).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script (deepspeed mtbi_fast/train.py): import the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import yaml
from tqdm import tqdm

from mtbi_fast.audio import encoder_frames, log_mel, load_audio, spec_augment
from mtbi_fast.behaviors import read_behaviors
from mtbi_fast.data import read_manifest
from mtbi_fast.interleave import RatioSchedule, example_pair, transcript
from mtbi_fast.io import atomic_write_text
from mtbi_fast.model import ModelConfig, SpeechLLM
from mtbi_fast.packing import pack

# ---------------------------------------------------------------------------------------------
# configuration

SCHEMA = {
    "model": dict,
    "data": {"train_manifest": str, "behaviors": str, "eval_manifest": (str, type(None)),
             "eval_behaviors": (str, type(None)), "teacher_cache": bool, "tasks": (list, type(None)),
             "spec_augment": (dict, type(None)), "num_workers": int, "prefetch_factor": int},
    "interleave": {"schedule": str, "start": (int, float), "end": (int, float), "steps": int,
                   "mean_span": (int, float)},
    "packing": {"max_tokens": int, "examples_per_step": int, "overlong": str},
    "train": {"steps": int, "lr": (int, float), "weight_decay": (int, float),
              "warmup_steps": int, "grad_accum": int, "clip_grad": (int, float), "seed": int,
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
             "spec_augment": None, "num_workers": 2, "prefetch_factor": 2},
    "interleave": {"schedule": "cosine", "start": 0.8, "end": 0.0, "steps": 1000, "mean_span": 3.0},
    "packing": {"max_tokens": 1024, "examples_per_step": 8, "overlong": "truncate"},
    "train": {"steps": 1000, "lr": 1e-3, "weight_decay": 0.0, "warmup_steps": 50, "grad_accum": 1,
              "clip_grad": 1.0, "seed": 0, "log_every": 10, "eval_every": 0, "eval_examples": 16,
              "save_every": 0, "keep_last": 2},
    "deepspeed": None,
}


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
    for section, key, low in (("train", "steps", 1), ("train", "grad_accum", 1),
                              ("data", "num_workers", 0), ("data", "prefetch_factor", 1)):
        if cfg[section][key] < low:
            raise ValueError(f"{path}: {section}.{key} must be an int >= {low}, got "
                             f"{cfg[section][key]!r}")
    base = path.parent
    for key in ("train_manifest", "behaviors", "eval_manifest", "eval_behaviors"):
        v = cfg["data"].get(key)
        if v is not None and not os.path.isabs(v) and not Path(v).exists() and (base / v).exists():
            cfg["data"][key] = str(base / v)
    return cfg


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


class MTBIData:
    """Behavior records joined with their utterances; deterministic micro-batches. Holds what the
    batches need from the model as plain values (tokenizer, mel bins, adapter stride, frame rate),
    never the model: it goes to DataLoader worker processes."""

    def __init__(self, manifest: str, behaviors: str, model: SpeechLLM, seed: int, mean_span: float,
                 max_tokens: int, overlong: str, teacher_cache: bool = False,
                 tasks: list[str] | None = None, spec_augment: dict | None = None):
        self.utts = {u.id: u for u in read_manifest(manifest, require_words=True)}
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
        self._mels: dict[str, torch.Tensor] = {}
        self.spec_augment = spec_augment  # SpecAugment's settings for training inputs, or None
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
        if utt_id not in self._mels:
            self._mels[utt_id] = log_mel(load_audio(self.utts[utt_id].audio), self.n_mels)
        return self._mels[utt_id]

    def batch(self, indices: list[int], ratio: float, salt: int) -> dict:
        students, teachers, mels, ids = [], [], [], []
        for i in indices:
            r = self.records[i]
            u = self.utts[r["utt_id"]]
            mel = self.mel(u.id)
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
            students.append(s)
            teachers.append(t)
            mels.append(mel)
            ids.append(r["id"])
        out = {"student": pack(students, self.max_tokens, overlong=self.overlong),
               "teacher": pack(teachers, self.max_tokens, overlong=self.overlong), "mels": mels}
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
        micro = j * self.world + self.rank  # = (step * grad_accum + k) * world + rank
        indices = self.data.record_indices(micro, self.examples)
        return self.data.batch(indices, self.schedule(j // self.grad_accum), salt=micro)


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
    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.out = Path(cfg["output_dir"])
        t = cfg["train"]
        self.ds_config = None
        self.world, self.rank = 1, 0
        if cfg["deepspeed"]:
            self._init_distributed()
        torch.manual_seed(t["seed"])
        model_cfg = ModelConfig.from_dict(cfg["model"])
        if self.ds_config and self.ds_config["zero_optimization"].get("stage") == 3:
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
                      max_tokens=cfg["packing"]["max_tokens"], overlong=cfg["packing"]["overlong"])
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
        self.tb = None

    # -- setup -------------------------------------------------------------------------------

    def _init_distributed(self):
        import deepspeed

        t = self.cfg["train"]
        cfg = json.loads(Path(self.cfg["deepspeed"]).read_text())
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
        cfg["gradient_clipping"] = t["clip_grad"]
        opt = cfg.setdefault("optimizer", {"type": "AdamW", "params": {}})
        opt.setdefault("params", {}).update(lr=t["lr"], weight_decay=t["weight_decay"])
        if not on_gpu:
            opt["params"]["torch_adam"] = True  # no fused-Adam JIT build on CPU
        self.ds_config = cfg

    # -- loop --------------------------------------------------------------------------------

    def train(self, resume: bool = True) -> dict:
        t = self.cfg["train"]
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out / "config.yaml", yaml.safe_dump(self.cfg, sort_keys=False))
        if resume:
            self._resume()
        if self.rank == 0:
            self._trim_metrics()
            self._open_tensorboard()
        device = next(p.device for p in self.model.adapter.parameters())
        if t["eval_every"] and self.step == 0:
            self.evaluate()  # the starting point of the held-out curve
        bar = tqdm(total=t["steps"], initial=self.step, desc="train", unit="step",
                   disable=self.rank != 0)
        window = {"loss": 0.0, "kl": 0.0, "ce": 0.0, "tokens": 0, "n": 0, "data_wait": 0.0}
        t_window = time.perf_counter()
        last = {}
        batches = iter(self.train_loader(device))
        try:
            while self.step < t["steps"]:
                ratio = self.schedule(self.step)
                for _ in range(t["grad_accum"]):
                    t_wait = time.perf_counter()
                    batch = next(batches)
                    kwargs = {"mels": [m.to(device, non_blocking=True) for m in batch["mels"]]}
                    if "teacher_hidden" in batch:
                        kwargs["teacher_hidden"] = batch["teacher_hidden"].to(device, non_blocking=True)
                    else:
                        kwargs["teacher"] = batch["teacher"]
                    waited = time.perf_counter() - t_wait
                    window["data_wait"] += waited
                    self.data_wait_s += waited
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
                    window = {k: 0 if k in ("tokens", "n") else 0.0 for k in window}
                    t_window = time.perf_counter()
                if t["eval_every"] and (self.step % t["eval_every"] == 0 or self.step == t["steps"]):
                    self.evaluate()
                if t["save_every"] and self.step % t["save_every"] == 0:
                    self.save_checkpoint()
        finally:
            del batches  # stops the loader's workers now, also when the loop raises
        bar.close()
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
            pin_memory=device.type == "cuda")  # pinned pages: asynchronous copies to the GPU

    def _log(self, window, seconds, ratio) -> dict:
        seconds = max(seconds, 1e-9)
        vals = torch.tensor([window["loss"], window["kl"], window["ce"], float(window["tokens"]),
                             window["data_wait"], window["data_wait"] / seconds])
        if self.world > 1:
            torch.distributed.all_reduce(vals)
            vals[[0, 1, 2, 4, 5]] /= self.world  # means over ranks; tokens are summed
        n = max(window["n"], 1)
        row = {"step": self.step, "loss": vals[0].item() / n, "kl": vals[1].item() / n,
               "ce": vals[2].item() / n, "tokens_per_s": vals[3].item() / seconds,
               "lr": self.scheduler.get_last_lr()[0], "ratio": ratio,
               "data_wait_s": vals[4].item(), "data_wait_share": vals[5].item(), "time": time.time()}
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

    # -- checkpoints -------------------------------------------------------------------------

    def save_checkpoint(self):
        root = self.out / "checkpoints"
        name = f"step-{self.step:06d}"
        if self.ds_config:
            tmp_tag = f".{name}.tmp"
            self.engine.save_checkpoint(str(root), tag=tmp_tag, client_state={"step": self.step})
            self._barrier()
            if self.rank == 0:
                shutil.rmtree(root / name, ignore_errors=True)
                (root / tmp_tag).rename(root / name)
                atomic_write_text(root / "latest", name)  # DeepSpeed's pointer, to the final name
        elif self.rank == 0:
            tmp = root / f".{name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            torch.save({"step": self.step, "trainable": self.model.trainable_state_dict(),
                        "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict()}, tmp / "trainer.pt")
            shutil.rmtree(root / name, ignore_errors=True)
            tmp.rename(root / name)
        self._barrier()
        self.export(root / name / "model")
        if self.rank == 0:
            (root / name / "COMPLETE").write_text(str(self.step))
            done = sorted(p for p in root.glob("step-*") if (p / "COMPLETE").exists())
            for old in done[:-self.cfg["train"]["keep_last"]]:
                shutil.rmtree(old, ignore_errors=True)
        self._barrier()

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

    def _resume(self):
        root = self.out / "checkpoints"
        done = sorted(p for p in root.glob("step-*") if (p / "COMPLETE").exists()) if root.exists() else []
        if not done:
            return
        ckpt = done[-1]
        if self.ds_config:
            _, client = self.engine.load_checkpoint(str(root), tag=ckpt.name)
            self.step = int(client["step"])
        else:
            state = torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=False)
            self.model.load_state_dict(state["trainable"], strict=False)
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.step = int(state["step"])
        if self.rank == 0:
            print(f"resumed from {ckpt} at step {self.step}")

    # -- metrics -----------------------------------------------------------------------------

    def _write_metrics(self, row: dict):
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k not in ("step", "time"):
                    self.tb.add_scalar(k, v, row["step"])

    def _trim_metrics(self):
        """On resume, drop rows logged after the checkpoint (they will be logged again)."""
        path = self.out / "metrics.jsonl"
        if not path.exists():
            return
        rows = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= self.step]
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
    parser = argparse.ArgumentParser(description="MTBI trainer (see the module docstring)")
    parser.add_argument("--config", required=True, help="run config (YAML)")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides)
    trainer = Trainer(cfg)
    t0 = time.time()
    last = trainer.train(resume=not args.no_resume)
    if trainer.rank == 0:
        print(f"done: {trainer.step} steps in {time.time() - t0:.0f} s, final loss "
              f"{last.get('loss', float('nan')):.4f}, {trainer.n_trainable / 1e6:.2f} M trainable "
              f"parameters, {trainer.data_wait_s:.1f} s waiting for data -> {trainer.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
