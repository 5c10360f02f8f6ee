"""The MTBI training loop: one run of a checked config (``config.load_config``, read as
``config.RunConfig``) into its ``output_dir``.

Each step takes ``train.grad_accum`` micro-batches (in memory: ``dataset.MicroBatches``, a pure
function of the step; streamed: ``streaming.StreamingBatches``, from the positions the checkpoints
record), built ahead by ``data.num_workers`` DataLoader workers, and minimizes the imitation loss
on the packed student batch against the teacher; under DeepSpeed ZeRO-3 the frozen LLM is
partitioned from the start and only the trained parts are optimized.

A step reads nothing back from the GPU: loss, KL, CE and a count of non-finite losses are summed on
the device and read at the logging interval, before an evaluation and before a checkpoint (a
non-finite loss stops the run there, so no checkpoint holds it). ``metrics.jsonl`` and the
trackers get one row per logged step (MFU from ``flops.step_flops``) and the held-out KL rows; the
run folder's files, checkpoints and resume are ``runfolder``'s. docs/training.md#what-a-run-writes
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import socket
import time
import weakref
from pathlib import Path

import torch
from tqdm import tqdm

from mtbi_fast.provenance import check_teacher
from mtbi_fast.config import RunConfig
from mtbi_fast.dataset import BatchBuilder, MicroBatches, MTBIData
from mtbi_fast.errors import USER_ERRORS
from mtbi_fast.flops import mfu, peak_tflops, step_flops
from mtbi_fast.interleave import RatioSchedule
from mtbi_fast.lock import FolderLock, FolderLockedError
from mtbi_fast.model import SpeechLLM
from mtbi_fast.runfolder import (check_output_dir, checkpoint_step, data_fingerprint, load_trainer_state, prepare_run,
                                 load_stream_positions, publish_checkpoint, read_deepspeed_config,
                                 run_record, save_stream_positions, save_trainer_state,
                                 trim_metrics, weights_only_deepspeed_loads)
from mtbi_fast.streaming import ShardData, StreamingBatches


class Trainer:
    """One training run into ``cfg["output_dir"]``. Construction checks the output folder and the
    DeepSpeed config, takes the folder's lock (rank 0) and builds the model and the data;
    ``train()`` runs (or resumes) the loop and releases the lock."""

    def __init__(self, cfg: dict):
        self.cfg = cfg  # the checked mapping (load_config): config.yaml, run.json, the trackers
        self.run = RunConfig.from_dict(cfg)  # the same, as typed sections: what the trainer reads
        self.out = Path(self.run.output_dir)
        self.ds_config = None
        self.world, self.rank = 1, 0
        self._lock = None
        self.fingerprint = None
        # before anything is built: a folder we cannot write, or a broken DeepSpeed JSON, would
        # otherwise show only after the model has loaded
        check_output_dir(self.out)
        if self.run.data.teacher_cache:  # the cached states must be this run's LLM's
            d = self.run.data  # a shard folder holds the plan.json of the behaviors it was made from
            check_teacher(d.train_shards if d.reader == "streaming" else d.behaviors, cfg["model"])
        ds = self.run.deepspeed
        self.sharding = "plain PyTorch" if not ds else f"DeepSpeed config {ds}"
        if ds == "auto":
            ds_json = self._auto_sharding()
        else:
            ds_json = read_deepspeed_config(ds) if ds else None
        if ds_json is not None:
            self._init_distributed(ds_json)
        self.trackers = None  # opened when the run starts (rank 0)
        self._on_rank0(self._take_lock)
        try:
            torch.manual_seed(self.run.train.seed)
            self.model = self._build_model()
            self.data, self.eval_data = self._build_data()
            self.schedule = RatioSchedule.from_config(self.run.interleave.schedule_args())
            self._build_optimizer()
        except BaseException:
            self.close()
            raise
        self.step = 0
        self.data_wait_s = 0.0  # seconds the loop waited for its batches (this process, this run)
        self.skipped_audio = 0  # examples left out for bad audio (this process, this run)
        self.skipped_cuts = 0  # streaming: cuts of bad shards left out (this process, this run)
        self.stream_positions = {}  # streaming: each reader's position after its last batch used
        self.peak, self.peak_source = peak_tflops(self._device(), self.run.train.peak_tflops)
        self.totals = _Totals()  # this run's steps, seconds, tokens and model FLOPs (this process)

    # -- the run -----------------------------------------------------------------------------

    def train(self, resume: bool = True, overwrite: bool = False) -> dict:
        """Run to ``train.steps``; returns the last logged metrics row. ``resume``: continue from
        the newest complete checkpoint of the same run (refused when the config or the data
        differ, docs/resume.md). ``resume`` False starts clean and refuses a folder that already
        holds a run unless ``overwrite``; ``overwrite`` (also without resume False) moves such a
        run aside, never deletes it."""
        try:
            self._start(resume and not overwrite, overwrite)
            last = self._loop()
            self._finish()
            return last
        finally:
            self.close()

    def _start(self, resume: bool, overwrite: bool):
        """Resume or begin (rank 0 decides and records), open the metrics, evaluate at step 0."""
        start = self._on_rank0(lambda: self._prepare(resume, overwrite))
        if start is not None:
            self._load_checkpoint(self.out / "checkpoints" / start)
        if self.rank == 0:
            trim_metrics(self.out, self.step)
            self._open_trackers()
        if self.run.train.eval_every and self.step == 0:
            self.evaluate()  # the starting point of the held-out curve

    def _loop(self) -> dict:
        """The steps from the current one to ``train.steps``, logging, evaluating and saving as
        configured; returns the last logged row."""
        t = self.run.train
        device = self._device()
        bar = tqdm(total=t.steps, initial=self.step, desc="train", unit="step",
                   disable=self.rank != 0)
        window = _Window()
        last = {}
        batches = iter(self.train_loader(device))
        try:
            while self.step < t.steps:
                ratio = self.schedule(self.step)
                for _ in range(t.grad_accum):
                    self._micro_step(batches, device, window)
                self._optimizer_step()
                window.n += 1
                self.step += 1
                bar.update(1)
                if self.step % t.log_every == 0 or self.step == t.steps:
                    last = self._log(window, ratio)
                    bar.set_postfix(loss=f"{last['loss']:.4f}", kl=f"{last['kl']:.4f}",
                                    tok_s=f"{last['tokens_per_s']:.0f}", tflops=f"{last['tflops']:.1f}",
                                    **({"mfu": f"{last['mfu']:.1%}"} if last["mfu"] is not None else {}),
                                    lr=f"{last['lr']:.2e}", data_wait=f"{last['data_wait_share']:.0%}")
                    window = _Window()
                elif self._evaluates_or_saves():
                    self._check_finite(window)  # nothing a bad window did is evaluated or saved
                self._evaluate_and_save()
        finally:
            del batches  # stops the loader's workers now, also when the loop raises
            bar.close()  # (an error message then starts on a line of its own)
        return last

    def summary(self) -> dict:
        """This run's throughput over its logged windows (this process): steps, seconds,
        tokens_per_s, tflops, mfu (None without a known peak) and where the peak came from."""
        t = self.totals
        tflops, util = mfu(t.flops, t.seconds, self.peak) if t.seconds else (0.0, None)
        return dict(steps=t.steps, seconds=t.seconds, tokens_per_s=t.tokens / t.seconds if t.seconds else 0.0,
                    tflops=tflops, mfu=util, peak_tflops=self.peak, peak_source=self.peak_source,
                    sharding=self.sharding)

    def _finish(self):
        try:
            self.export(self.out / "final")
        except (OSError, *_safetensors_errors()) as exc:
            raise ValueError(f"step {self.step}: cannot write {self.out / 'final'} ({_write_error(exc)}; the "
                             f"disk may be full); the checkpoints are intact: free space and rerun to "
                             f"export it") from None

    def _micro_step(self, batches, device: torch.device, window: _Window):
        """Forward and backward of the next micro-batch (under DeepSpeed also its engine step,
        which applies the optimizer at the accumulation boundary)."""
        grad_accum = self.run.train.grad_accum
        batch, inputs = self._next_batch(batches, device, window)
        out = self.engine(batch["student"], **inputs)
        if self._reads_are_free(device) and not bool(torch.isfinite(out["loss"].detach())):
            raise ValueError(f"step {self.step + 1}: the loss is NaN or inf (non-finite weights or "
                             f"states); stopped before the weights were updated, the last checkpoint "
                             f"is intact")
        if self.ds_config:
            self.engine.backward(out["loss"])
            self.engine.step()
        else:
            (out["loss"] / grad_accum).backward()
        window.add(out, grad_accum)  # on the device: no host sync
        window.tokens += batch["student"].n_tokens
        window.flops += step_flops(self.model, batch["student"], batch.get("teacher"),
                                   [self.model.front.length(f) for f in batch["features"]])["total"]

    def _next_batch(self, batches, device: torch.device, window: _Window) -> tuple[dict, dict]:
        """The next micro-batch and the model's inputs from it on ``device``; the time waited for
        it and the examples it left out for bad audio are counted."""
        t_wait = time.perf_counter()
        batch = next(batches)
        if "error" in batch:  # built by a worker or here: the same one-line error
            raise ValueError(f"step {self.step + 1}: {batch['error']}")
        inputs = {"features": [f.to(device, non_blocking=True) for f in batch["features"]]}
        if "teacher_hidden" in batch:
            inputs["teacher_hidden"] = batch["teacher_hidden"].to(device, non_blocking=True)
        else:
            inputs["teacher"] = batch["teacher"]
        waited = time.perf_counter() - t_wait
        window.data_wait += waited
        self.data_wait_s += waited
        for message in batch["skipped_audio"]:
            tqdm.write(f"step {self.step + 1}: skipped {message}")
        window.skipped += len(batch["skipped_audio"])
        self.skipped_audio += len(batch["skipped_audio"])
        if "stream" in batch:  # streaming: where the batch's reader now is, for the checkpoint
            s = batch["stream"]
            self.stream_positions[str(s["reader"])] = s["position"]
            if s["skipped_cuts"]:
                tqdm.write(f"step {self.step + 1}: skipped {s['skipped_cuts']} bad cut(s) of the shards")
            window.skipped_cuts += s["skipped_cuts"]
            self.skipped_cuts += s["skipped_cuts"]
        return batch, inputs

    @staticmethod
    def _reads_are_free(device: torch.device) -> bool:
        """Whether reading a value back costs nothing here (off a GPU: no synchronization)."""
        return device.type != "cuda"

    def _optimizer_step(self):
        """Clip, step and zero the gradients (plain PyTorch; DeepSpeed's engine does this)."""
        if self.ds_config:
            return
        clip = self.run.train.clip_grad
        if clip is not None:
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _evaluates_or_saves(self) -> bool:
        t = self.run.train
        return bool((t.eval_every and (self.step % t.eval_every == 0 or self.step == t.steps))
                    or (t.save_every and self.step % t.save_every == 0))

    def _check_finite(self, window: _Window):
        """Stop with a one-line error when a loss of the window was NaN or inf (one host read)."""
        bad = window.nonfinite_count()
        if self.world > 1:
            bad = int(self._all_reduce(torch.tensor([bad], dtype=torch.float64)).item())
        if bad:
            first = self.step - window.n + 1
            raise ValueError(
                f"steps {first}-{self.step}: the loss was NaN or inf in {bad} micro-batch(es) "
                f"(non-finite hidden states, teacher states or weights); nothing after step "
                f"{first - 1} was saved; set model.loss.check_finite=true to find the first bad row")

    def _evaluate_and_save(self):
        t = self.run.train
        if t.eval_every and (self.step % t.eval_every == 0 or self.step == t.steps):
            self.evaluate()
        if t.save_every and self.step % t.save_every == 0:
            self.save_checkpoint()

    def train_loader(self, device: torch.device) -> torch.utils.data.DataLoader:
        """This rank's micro-batches from the current step to the last, built ahead by
        ``data.num_workers`` worker processes (CPU only: the encoder, the adapter and the online
        teacher run in this process). One pass over it is the whole run, so its workers start
        once and live as long as the run. The streaming reader's batches go on from the readers'
        positions (``stream_positions``, restored from a checkpoint)."""
        d, t = self.run.data, self.run.train
        workers = d.num_workers
        first = self.step * t.grad_accum
        if isinstance(self.data, ShardData):
            items = StreamingBatches(self.data, self.schedule, t.grad_accum, self.world, self.rank,
                                     workers, start=first, positions=self.stream_positions)
            sampler = None
        else:
            items = MicroBatches(self.data, self.schedule, self.run.packing.examples_per_step,
                                 t.grad_accum, self.world, self.rank)
            sampler = range(first, t.steps * t.grad_accum)
        return torch.utils.data.DataLoader(
            items, batch_size=None, sampler=sampler,
            num_workers=workers, prefetch_factor=d.prefetch_factor if workers else None,
            pin_memory=device.type == "cuda",  # pinned pages: asynchronous copies to the GPU
            # the loader draws its workers' base seed from this generator, not from the global
            # RNG, whose state the checkpoints save: a resumed run's RNG state then equals an
            # uninterrupted run's (the batches never depend on it)
            generator=torch.Generator().manual_seed(t.seed))

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Held-out imitation KL at ratio 0 (pure speech) on fixed eval examples."""
        if self.eval_data is None:
            return None
        n = min(self.run.train.eval_examples, len(self.eval_data))
        idx = list(range(n))[self.rank::self.world]
        kl, count = torch.zeros(2), 0
        device = self._device()
        for start in range(0, len(idx), self.run.packing.examples_per_step):
            chunk = idx[start:start + self.run.packing.examples_per_step]
            batch = self.eval_data.batch(chunk, 0.0, salt=0)
            out = self.engine(batch["student"], features=[f.to(device) for f in batch["features"]],
                              teacher=batch["teacher"])
            rows = batch["student"].target_ids.numel()
            kl += torch.tensor([float(out["kl"].detach()) * rows, rows])
            count += rows
        if self.world > 1:
            kl = self._all_reduce(kl)
        value = (kl[0] / kl[1].clamp(min=1)).item()
        if self.rank == 0:
            self._write_metrics({"step": self.step, "eval_kl": value, "time": time.time()})
        return value

    # -- metrics -----------------------------------------------------------------------------

    def _log(self, window: _Window, ratio: float) -> dict:
        """The metrics row of the steps since the last one (means over ranks), written by rank 0."""
        self._check_finite(window)
        sums = window.device_sums()  # the one read back from the device per window
        seconds = max(time.perf_counter() - window.started, 1e-9)
        self.totals.add(window, seconds)
        vals = torch.tensor([*sums, float(window.tokens),
                             window.data_wait, window.data_wait / seconds, float(window.skipped),
                             float(window.skipped_cuts), float(window.flops)], dtype=torch.float64)
        if self.world > 1:
            vals = self._all_reduce(vals)
            vals[[0, 1, 2, 4, 5, 8]] /= self.world  # means over ranks; tokens and skips are summed
        n = max(window.n, 1)
        tflops, util = mfu(vals[8].item(), seconds, self.peak)
        row = {"step": self.step, "loss": vals[0].item() / n, "kl": vals[1].item() / n,
               "ce": vals[2].item() / n, "tokens_per_s": vals[3].item() / seconds,
               "tflops": tflops, "mfu": util,
               "lr": self.scheduler.get_last_lr()[0], "ratio": ratio,
               "data_wait_s": vals[4].item(), "data_wait_share": vals[5].item(),
               "skipped_audio": int(vals[6].item()), "time": time.time()}
        if isinstance(self.data, ShardData):
            row["skipped_cuts"] = int(vals[7].item())
        if self.rank == 0:
            self._write_metrics(row)
        return row

    def _write_metrics(self, row: dict):
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.trackers is not None:
            self.trackers.log(row)

    def _open_trackers(self):
        from mtbi_fast.tracking import Trackers

        self.trackers = Trackers(self.run.train.report_to, self.out, self.cfg)

    # -- checkpoints -------------------------------------------------------------------------

    def _prepare(self, resume: bool, overwrite: bool) -> str | None:
        """Rank 0, holding the lock: the data fingerprint, then how the run starts
        (``runfolder.prepare_run``): the checkpoint to resume (its folder name) or None."""
        self.fingerprint = data_fingerprint(self.cfg)
        start = prepare_run(self.out, self.cfg, self.fingerprint, resume, overwrite)
        if start is not None and isinstance(self.data, ShardData) and not self.run.data.verify_shards:
            from mtbi_fast.shards import read_index

            read_index(self.data.folder, verify="full", progress=True)  # resume: every byte checked
        return start

    def save_checkpoint(self):
        """``checkpoints/step-NNNNNN``: written whole under a temporary name (DeepSpeed's files or
        the trainer state, the exported model, run.json, COMPLETE), renamed, and only then named
        by ``checkpoints/latest``: a kill at any point leaves the previous checkpoint current. A
        write that fails (a full disk) is one line naming the file, the temporary folder removed
        and the previous checkpoint left current."""
        root = self.out / "checkpoints"
        tmp = root / f".step-{self.step:06d}.tmp"
        try:
            self._write_checkpoint(root, tmp)
        except (OSError, *_safetensors_errors()) as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            latest = root / "latest"
            kept = latest.read_text().strip() if latest.is_file() else None
            raise ValueError(
                f"step {self.step}: cannot write the checkpoint ({_write_error(exc)}; the disk may be "
                f"full); " + (f"the previous checkpoint {root / kept} is intact and a rerun resumes "
                              f"from it" if kept else "no earlier checkpoint: a rerun starts over")) from None

    def _write_checkpoint(self, root: Path, tmp: Path):
        name = tmp.name[1:-len(".tmp")]
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self._barrier()
        if self.ds_config:
            self.engine.save_checkpoint(str(root), tag=tmp.name, client_state={"step": self.step},
                                        save_latest=False)
        elif self.rank == 0:
            save_trainer_state(tmp, self.model, self.optimizer, self.scheduler, self.step)
        if isinstance(self.data, ShardData):  # each rank: where its readers are
            save_stream_positions(tmp, self.rank, self.world, self.run.data.num_workers,
                                  self.stream_positions)
        self._barrier()
        self.export(tmp / "model")
        if self.rank == 0:
            publish_checkpoint(tmp, name, run_record(self.cfg, self.fingerprint, self.step),
                               self.run.train.keep_last)
        self._barrier()

    def _load_checkpoint(self, folder: Path):
        """Every rank: the checkpoint ``_prepare`` chose and checked."""
        step = checkpoint_step(folder, self.run.train.steps)
        if self.ds_config:
            with weights_only_deepspeed_loads(self.engine):
                path, client = self.engine.load_checkpoint(str(folder.parent), tag=folder.name)
            if path is None:
                raise ValueError(f"cannot resume from {folder}: DeepSpeed found no checkpoint there")
            if (client or {}).get("step") != step:
                raise ValueError(f"cannot resume: {folder}: DeepSpeed's client state says step "
                                 f"{(client or {}).get('step')!r}, run.json says {step}")
        else:
            load_trainer_state(folder, self.model, self.optimizer, self.scheduler, expected_step=step)
        if isinstance(self.data, ShardData):
            self.stream_positions = load_stream_positions(folder, self.rank, self.world,
                                                          self.run.data.num_workers)
        self.step = step
        if self.rank == 0:
            print(f"resumed from {folder} at step {self.step}")

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

    # -- setup -------------------------------------------------------------------------------

    def _build_model(self) -> SpeechLLM:
        """The configured model; under ZeRO-3 partitioned from the start."""
        model_cfg = self.run.model
        if not (self.ds_config and self.ds_config.get("zero_optimization", {}).get("stage") == 3):
            model = SpeechLLM.from_config(model_cfg)
            if not self.ds_config and torch.cuda.is_available():  # plain PyTorch on this rank's GPU
                model.to(torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))))
            return self._sync_free(model)
        import deepspeed

        # a pretrained LLM is partitioned as it loads (transformers' from_pretrained reads the
        # ZeRO-3 config from HfDeepSpeedConfig), never whole on one rank; a random tiny LLM is
        # built whole (so that its initialization matches a single-process run) like the
        # encoder and adapter, and everything still whole is partitioned right after
        pretrained = "tiny" not in model_cfg.llm
        context = _hf_zero3(self.ds_config) if pretrained else None
        model = SpeechLLM.from_config(model_cfg, llm_context=context)
        deepspeed.zero.Init(module=model, config_dict_or_path=self.ds_config)
        return self._sync_free(model)

    def _sync_free(self, model: SpeechLLM) -> SpeechLLM:
        """On a GPU the loss reads nothing back (``check_finite`` off: the loop checks the loss
        on the device) unless the config asks for the check."""
        if torch.cuda.is_available() and "check_finite" not in (self.cfg["model"].get("loss") or {}):
            model.loss_fn.check_finite = False
        return model

    def _build_data(self) -> tuple[MTBIData | ShardData, MTBIData | None]:
        """The training data (read into memory, or streamed from shards: ``data.reader``) and,
        when configured, the held-out data."""
        d = self.run.data
        common = dict(seed=self.run.train.seed, mean_span=self.run.interleave.mean_span,
                      max_tokens=self.run.packing.max_tokens, overlong=self.run.packing.overlong,
                      skip_bad_audio=d.skip_bad_audio)
        if d.reader == "streaming":
            builder = BatchBuilder(self.model, spec_augment=d.spec_augment, **common)
            data = ShardData(d.train_shards, builder, seed=self.run.train.seed,
                             examples=self.run.packing.examples_per_step, shuffle_cuts=d.shuffle_cuts,
                             length_buckets=d.length_buckets, token_budget=self.run.packing.token_budget,
                             tasks=d.tasks,
                             teacher_cache=d.teacher_cache, skip_bad_shards=d.skip_bad_shards,
                             max_seconds=self.model.max_seconds, verify="full" if d.verify_shards else "quick")
        else:
            data = MTBIData(d.train_manifest, d.behaviors, self.model,
                            teacher_cache=d.teacher_cache, tasks=d.tasks,
                            spec_augment=d.spec_augment, **common)
        eval_data = None
        if d.eval_manifest and d.eval_behaviors:
            eval_data = MTBIData(d.eval_manifest, d.eval_behaviors, self.model, **common)
        return data, eval_data

    def _build_optimizer(self):
        """AdamW over the trainable parameters with warmup + cosine decay: DeepSpeed's engine, or
        plain PyTorch (``self.engine`` is then the model)."""
        t = self.run.train
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.n_trainable = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in params)
        sched_fn = lr_lambda(t.warmup_steps, t.steps)
        if self.ds_config:
            import deepspeed

            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=self.model, model_parameters=params, config=self.ds_config,
                lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, sched_fn))
        else:
            self.engine = self.model
            self.optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, sched_fn)

    def _auto_sharding(self) -> dict | None:
        """``deepspeed: auto``: no DeepSpeed for one process (the frozen LLM whole on its device);
        for a world of several, ZeRO-2 with the frozen LLM replicated when it fits on every rank's
        device with room to spare, else ZeRO-3 (``mtbi_fast.sharding``: decided from the least free
        memory of any rank, so all ranks agree). The choice and its reason are printed (rank 0)
        and kept in ``self.sharding``."""
        from mtbi_fast.sharding import auto_deepspeed_config, free_memory

        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            ds_json, why = None, ("one process: plain PyTorch, the frozen LLM whole on this device "
                                  "(no DeepSpeed: nothing to shard)")
        else:
            import deepspeed

            on_gpu = torch.cuda.is_available()
            if not on_gpu:
                deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
            deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if on_gpu else None
            free = torch.tensor([free_memory(device)], dtype=torch.int64, device=device)
            torch.distributed.all_reduce(free, op=torch.distributed.ReduceOp.MIN)
            ds_json, why = auto_deepspeed_config(self.cfg["model"], world, device, free_bytes=int(free.item()))
        self.sharding = f"deepspeed=auto: {why}"
        if int(os.environ.get("RANK", "0")) == 0:
            print(self.sharding, flush=True)
        return ds_json

    def _init_distributed(self, cfg: dict):
        """torch.distributed through DeepSpeed (a world of one without a launcher), and the
        DeepSpeed config completed from the run config (batch sizes, clipping, optimizer)."""
        import deepspeed

        t = self.run.train
        on_gpu = torch.cuda.is_available()
        if not on_gpu:
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # else a ~65 s JIT build
        backend = "nccl" if on_gpu else "gloo"
        if any(k in os.environ for k in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")):
            deepspeed.init_distributed(dist_backend=backend)
        else:  # run without a launcher: a world of one (no MPI discovery) on a free local port
            _init_single_process(deepspeed, backend)
        self.world = torch.distributed.get_world_size()
        self.rank = torch.distributed.get_rank()
        if on_gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        for key in ("bf16", "fp16"):
            if cfg.get(key, {}).get("enabled") == "auto":
                cfg[key]["enabled"] = on_gpu and key == "bf16"
        cfg["train_micro_batch_size_per_gpu"] = 1
        cfg["gradient_accumulation_steps"] = t.grad_accum
        cfg["train_batch_size"] = t.grad_accum * self.world
        cfg["gradient_clipping"] = t.clip_grad or 0.0  # DeepSpeed: 0 = no clipping
        opt = cfg.setdefault("optimizer", {"type": "AdamW", "params": {}})
        opt.setdefault("params", {}).update(lr=t.lr, weight_decay=t.weight_decay)
        if not on_gpu:
            opt["params"]["torch_adam"] = True  # no fused-Adam JIT build on CPU
        self.ds_config = cfg

    def _take_lock(self):
        """One training per output folder: rank 0 holds its lock until the run ends (the kernel
        drops it if the process dies); a second training fails here, naming the holder."""
        self._lock = FolderLock(self.out, "training").acquire()
        weakref.finalize(self, self._lock.release)  # a Trainer dropped without train()

    def close(self):
        """Close the trackers and release the output folder (``train()`` does this when it ends)."""
        if self.trackers is not None:
            self.trackers.close()
            self.trackers = None
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

    def _device(self) -> torch.device:
        return next(p.device for p in self.model.adapter.parameters())

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of host tensor ``t`` over the ranks, on the host (NCCL reduces device tensors
        only: the tensor makes the trip through this rank's GPU there)."""
        if torch.distributed.get_backend() == "nccl":
            dev = t.to(self._device())
            torch.distributed.all_reduce(dev)
            return dev.cpu()
        torch.distributed.all_reduce(t)
        return t

    def _barrier(self):
        if self.world > 1:
            torch.distributed.barrier()


def _safetensors_errors() -> tuple:
    try:
        from safetensors import SafetensorError
    except ImportError:
        return ()
    return (SafetensorError,)


def _write_error(exc: Exception) -> str:
    """A failed write in a few words: the file and the reason (errno text), or the message."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return " ".join(str(exc).split())[:200]


def lr_lambda(warmup: int, total: int):
    """The learning-rate factor at a step: linear warmup over ``warmup`` steps, then cosine decay
    to 0 at ``total``."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(warmup, 1)
        progress = (step - warmup) / max(total - warmup, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return f


@dataclasses.dataclass
class _Window:
    """Sums over the steps since the last logged metrics row. The loss, KL, CE and the count of
    non-finite losses stay on the device (``parts``: one [4] tensor) until the row is written."""
    parts: torch.Tensor | None = None
    tokens: int = 0
    flops: int = 0
    n: int = 0
    data_wait: float = 0.0
    skipped: int = 0
    skipped_cuts: int = 0
    started: float = dataclasses.field(default_factory=time.perf_counter)

    def add(self, out: dict, grad_accum: int):
        """A micro-batch's loss, KL and CE (means over its accumulation) and whether its loss was
        finite, added on the device. A non-finite loss adds to the count, not to the sums."""
        loss = out["loss"].detach().float()
        finite = torch.isfinite(loss)
        vals = torch.stack([loss, out["kl"].detach().float(), out["ce"].detach().float()]) / grad_accum
        vals = torch.cat([torch.where(finite, vals, 0.0), (~finite).float()[None]])
        self.parts = vals if self.parts is None else self.parts + vals

    def device_sums(self) -> list[float]:
        """[loss, kl, ce] summed over the window (the host read)."""
        return [0.0, 0.0, 0.0] if self.parts is None else self.parts[:3].double().tolist()

    def nonfinite_count(self) -> int:
        return 0 if self.parts is None else int(self.parts[3].item())


@dataclasses.dataclass
class _Totals:
    """This run's logged windows, for the summary: steps, seconds, tokens, model FLOPs."""
    steps: int = 0
    seconds: float = 0.0
    tokens: int = 0
    flops: int = 0

    def add(self, window: _Window, seconds: float):
        self.steps += window.n
        self.seconds += seconds
        self.tokens += window.tokens
        self.flops += window.flops


def _init_single_process(deepspeed, backend: str, attempts: int = 5):
    """torch.distributed as a one-process world (env:// variables) on a free local port. The port
    is free when picked but another process may take it before the store binds it (several runs
    starting at once): then another port is tried."""
    chosen_port = "MASTER_PORT" not in os.environ
    for attempt in range(attempts):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                           ("LOCAL_WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                           ("MASTER_PORT", str(port))):
            os.environ.setdefault(key, value)
        try:
            deepspeed.init_distributed(dist_backend=backend)
            return
        except torch.distributed.DistNetworkError:
            if not chosen_port or attempt == attempts - 1:
                raise
            os.environ.pop("MASTER_PORT")  # taken meanwhile: pick another


@contextlib.contextmanager
def _hf_zero3(ds_config: dict):
    """While open, transformers' from_pretrained builds models under ZeRO-3 (partitioned as the
    weights load). Only the LLM is loaded in it: the speech encoder's own initialization does
    not run on partitioned weights."""
    from transformers.integrations import HfDeepSpeedConfig

    hf = HfDeepSpeedConfig(ds_config)  # transformers keeps a weak reference to it
    try:
        yield hf
    finally:
        del hf
