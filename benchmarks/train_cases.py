"""One training step of each pipeline variant, for bench_train.py (and its probes).

The full mtbi-fast step (fused loss, packed batches, true-length encoder, cached teacher, frozen
weights in ``model.dtype=auto``: bf16 on a GPU or an AVX512-BF16 CPU) and the reference eager step
(eager loss, padded batches, encoder padded to 30 s, online teacher, float32), plus the fast step
with each optimization switched off alone.

- ``Step``: the CPU case, a plain model and torch AdamW on the demo corpus.
- ``Zero3Step``: the GPU case, the real trainer's DeepSpeed ZeRO-3 engine (``mtbi_fast.trainer.Trainer``,
  a one-process world) on random models of real shapes (configs/model_shapes.yaml) and synthetic
  batches of realistic size (noise audio of 5-15 s with demo transcripts, random prompt and
  response ids); the bf16 of mtbi-fast is DeepSpeed's bf16 mode, eager runs float32.
- ``data_wait``: the real trainer for a few steps on the demo corpus with DataLoader workers,
  reporting the share of wall time spent waiting for batches (``data_wait_share``).
- ``overhead``: the trainer's own micro-step (``Trainer._micro_step`` + ``_optimizer_step``) on
  batches built ahead, with tokens/s, scalar reads back to the host (``aten::_local_scalar_dense``:
  on a GPU each read of a device tensor is a synchronization) and operator calls per step counted
  by ``torch.profiler``. Run against this tree and against ``BEFORE_REF`` (the package as it was
  before the host-overhead work, extracted with ``git archive``) in the same benchmark run.

Run as a script, one case in a fresh process, printing one ``RESULT {json}`` line:

    python benchmarks/train_cases.py tiny eager               # CPU memory probe (peak RSS added)
    python benchmarks/train_cases.py zero3 whisper-tiny+smollm2-135m mtbi-fast
    python benchmarks/train_cases.py data-wait --steps 30 --workers 4
    python benchmarks/train_cases.py overhead demo --steps 3   # PYTHONPATH=<old tree> for "before"
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, os.environ.get("MTBI_PACKAGE_ROOT", str(ROOT)))  # another tree: the overhead probe's "before"

from mtbi_fast.audio import load_audio  # noqa: E402
from mtbi_fast.behaviors_folder import BehaviorsFolder  # noqa: E402
from mtbi_fast.data import Word, read_manifest  # noqa: E402
from mtbi_fast.interleave import example_pair, transcript  # noqa: E402
from mtbi_fast.model import ModelConfig, SpeechLLM  # noqa: E402
from mtbi_fast.packing import pack  # noqa: E402

OPTIMIZATIONS = ("fused_loss", "packing", "true_length", "cached_teacher", "bf16")
VARIANTS = {"mtbi-fast": set(OPTIMIZATIONS), "eager": set()}
VARIANTS.update({f"no-{o}": set(OPTIMIZATIONS) - {o} for o in OPTIMIZATIONS})
# not a variant of bench_train's step table: mtbi-fast plus activation checkpointing of the LLM
CHECKPOINTING = {**VARIANTS, "checkpointing": set(OPTIMIZATIONS) | {"checkpointing"}}
CONFIGS = {"tiny": ROOT / "configs" / "tiny.yaml", "demo": ROOT / "configs" / "demo.yaml"}
EXAMPLES_PER_STEP = 8


class Step:
    """A model, a fixed list of batches from the demo corpus, and one optimizer step per call."""

    def __init__(self, config: str, variant: str, n_batches: int = 3, seed: int = 0):
        on = CHECKPOINTING[variant]
        self.on = on
        cfg = yaml.safe_load(CONFIGS[config].read_text())["model"]
        cfg["loss"] = {**cfg.get("loss", {}), "backend": "auto" if "fused_loss" in on else "eager"}
        # frozen weights in bf16 where its matmuls are native (model.dtype=auto), else float32
        cfg["dtype"] = "auto" if "bf16" in on else "float32"
        cfg["gradient_checkpointing"] = "checkpointing" in on
        torch.manual_seed(seed)
        self.model = SpeechLLM.from_config(ModelConfig.from_dict(cfg))
        if "true_length" not in on:
            _pad_encoder_to_30s(self.model)
        self.opt = torch.optim.AdamW(self.model.adapter.parameters(), lr=1e-4)
        utts = read_manifest(ROOT / "data" / "demo" / "train.jsonl")
        tok = self.model.tokenizer
        enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
        rng = random.Random(seed)
        prefix, suffix = enc("User: Summarize: "), enc("\nAssistant:")
        vocab = self.model.llm.get_input_embeddings().weight.shape[0]
        self.batches = []
        for b in range(n_batches):
            students, teachers, mels = [], [], []
            for u in utts[b * EXAMPLES_PER_STEP:(b + 1) * EXAMPLES_PER_STEP]:
                mel = self.model.features(load_audio(u.audio))
                n_frames = self.model.adapter.n_frames(self.model.front.frames(mel.shape[1]))
                response = [rng.randrange(vocab) for _ in range(rng.randint(10, 100))]
                s, t = example_pair(u.id, u.words, n_frames, self.model.frame_rate, 0.3, prefix,
                                    suffix, response, enc, generator=torch.Generator().manual_seed(b))
                students.append(s)
                teachers.append(t)
                mels.append(mel)
            batch = step_batch(self.model, students, teachers, mels, on)
            self.batches.append(batch)
        self.tokens = [b["student"].n_tokens for b in self.batches]
        self.i = 0

    def __call__(self) -> int:
        batch = self.batches[self.i % len(self.batches)]
        self.i += 1
        kw = {k: v for k, v in batch.items() if k in ("teacher", "teacher_hidden")}
        out = self.model(batch["student"], features=batch["features"], **kw)
        self.opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        self.opt.step()
        return batch["student"].n_tokens


def saved_activation_bytes(step: "Step") -> int:
    """Bytes of the tensors one forward of ``step``'s next batch keeps for backward (autograd's
    saved tensors, each storage once; the frozen weights they include are left out): what
    activation checkpointing saves, free of the allocator's caching."""
    batch = step.batches[step.i % len(step.batches)]
    weights = {p.untyped_storage().data_ptr() for p in step.model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    kw = {k: v for k, v in batch.items() if k in ("teacher", "teacher_hidden")}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = step.model(batch["student"], features=batch["features"], **kw)
    del out
    return sum(seen.values())


def step_batch(model, students, teachers, mels, on) -> dict:
    """One step's batch: packed rows (or one example a row without "packing"), and the teacher's
    cached states (with "cached_teacher") or its packed batch for the online pass."""
    bins = None if "packing" in on else [[i] for i in range(len(students))]
    student = pack(students, 2048, bins=bins)
    teacher = pack(teachers, 2048, bins=bins)
    batch = {"student": student, "features": mels}
    if "cached_teacher" in on:
        batch["teacher_hidden"] = model.teacher_states(teacher)
    else:
        batch["teacher"] = teacher
    return batch


def _pad_encoder_to_30s(model):
    """The reference encoder: transformers' WhisperEncoder on 3000 padded frames, then cut (in
    place of ``packed``, which the model calls)."""
    enc, front = model.encoder.encoder, model.front

    def packed(mels):
        x = torch.stack([torch.nn.functional.pad(m, (0, 3000 - m.shape[1])) for m in mels])
        h = enc(x.to(enc.conv1.weight.dtype)).last_hidden_state
        lengths = [front.frames(m.shape[1]) for m in mels]
        return torch.cat([h[i, :n] for i, n in enumerate(lengths)]), lengths

    model.encoder.packed = packed


# ---------------------------------------------------------------------------------------------
# GPU: the full step through the trainer's DeepSpeed ZeRO-3 engine, random models of real shapes

SHAPES = yaml.safe_load((ROOT / "configs" / "model_shapes.yaml").read_text())
TRAIN_CONFIG = ROOT / "configs" / "tiny_train.yaml"
DEMO_TRAIN = ROOT / "data" / "demo" / "train.jsonl"
DS_ZERO3 = ROOT / "configs" / "ds_zero3.json"
DS_ZERO2 = ROOT / "configs" / "ds_zero2.json"
# name: (encoder, LLM, utterances per step, time limit in s of its process). Sized for the
# 8-minute GPU suite (benchmarks/gpu_suite.sh gives all four processes 150 s): each spends about
# 10-25 s on imports, random init (1.5 B parameters on the CPU) and ZeRO-3 partitioning, then
# ZERO3_WARMUP + ZERO3_STEPS = 5 steps of about 0.3-1 s (mtbi-fast, bf16) or 1-3 s (eager,
# float32 GEMMs). Realistic GPU batches: 64 utterances (~21k tokens) with the 135M LLM; 16 with
# the 1.5B one, because eager float32 on padded rows keeps ~3 MB of activations per token (28
# layers) plus [M, 151936] float32 logits through autograd: ~45 GB at 16 utterances, ~80 GB
# (more than an H100 has) at 32.
GPU_CASES = {
    "whisper-tiny+smollm2-135m": ("whisper-tiny", "smollm2-135m", 64, 60),
    "whisper-base+qwen2.5-1.5b": ("whisper-base", "qwen2.5-1.5b", 16, 90),
}
GPU_VARIANTS = ("mtbi-fast", "eager")
ZERO3_BATCHES = 2   # distinct batches, cycled (shapes seen once in warm-up: compile, autotune)
ZERO3_WARMUP = 2
ZERO3_STEPS = 3
SECONDS = (5.0, 15.0)      # synthetic clip lengths
RESPONSE = (50, 300)       # response tokens
TEXT_RATIO = 0.3           # share of each transcript given as text (the rest as speech)


def model_source(kind: str, name: str) -> dict:
    """A model source from configs/model_shapes.yaml (``kind``: encoders or llms); the name
    ``tiny`` gives the bundled tiny model (CPU smoke runs)."""
    return {"tiny": {}} if name == "tiny" else SHAPES[kind][name]


def synthetic_behaviors(manifest: Path, out_dir: Path, tokenizer, vocab: int, seed: int = 0,
                        response: tuple[int, int] = RESPONSE) -> Path:
    """A behaviors folder for ``manifest`` without running an LLM: per utterance one record with
    random prompt and response ids (RESPONSE tokens) and the transcript's real token ids (what
    the trainer checks against the words). Only shapes matter to the benchmarks."""
    rng = random.Random(seed)
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    lines = []
    for u in _manifest_rows(manifest):
        words = [Word(w["word"], w["start"], w["end"]) for w in u["words"]]
        lines.append(json.dumps({
            "id": f"{u['id']}/synthetic/0", "utt_id": u["id"], "task": "synthetic", "wording": 0,
            "split": "train", "prompt": "", "response": "",
            "prefix_ids": [rng.randrange(vocab) for _ in range(rng.randint(15, 25))],
            "transcript_ids": enc(transcript(words)),
            "suffix_ids": [rng.randrange(vocab) for _ in range(rng.randint(5, 10))],
            "response_ids": [rng.randrange(vocab) for _ in range(rng.randint(*response))]}))
    out_dir.mkdir(parents=True, exist_ok=True)
    BehaviorsFolder(out_dir).part(0).write_text("".join(line + "\n" for line in lines))
    return out_dir


def trainer_config(workdir: Path, encoder: str, llm: str, variant: str = "mtbi-fast",
                   extra: list[str] = (), sharding: str = "zero3") -> dict:
    """The run config of a benchmark: configs/tiny_train.yaml with the given models, the demo
    manifest, synthetic behaviors, DeepSpeed ZeRO-3 or ZeRO-2 (bf16 when the variant has it) or
    none (``sharding``: "zero3", "zero2", "none": plain PyTorch on the GPU, the frozen LLM
    replicated), no eval and no checkpoints; ``extra``: more ``section.key=value`` overrides."""
    from mtbi_fast.hub import tiny_tokenizer
    from mtbi_fast.config import load_config

    on = VARIANTS[variant]
    llm_src = model_source("llms", llm)
    vocab = llm_src["tiny"].get("vocab_size", 512)
    behaviors = synthetic_behaviors(DEMO_TRAIN, workdir / "behaviors", tiny_tokenizer(), vocab)
    ds_arg = "deepspeed=null"
    if sharding != "none":
        ds = json.loads((DS_ZERO3 if sharding == "zero3" else DS_ZERO2).read_text())
        if "bf16" not in on:
            ds["bf16"] = {"enabled": False}
        ds_path = workdir / f"ds_{sharding}.json"
        ds_path.write_text(json.dumps(ds))
        ds_arg = f"deepspeed={ds_path}"
    overrides = [
        f"model.encoder={json.dumps(model_source('encoders', encoder))}",
        f"model.llm={json.dumps(llm_src)}",
        f"model.dtype={'auto' if 'bf16' in on else 'float32'}",
        f"model.loss.backend={'auto' if 'fused_loss' in on else 'eager'}",
        f"data.train_manifest={DEMO_TRAIN}", f"data.behaviors={behaviors}",
        "data.eval_manifest=null", "data.eval_behaviors=null", "data.teacher_cache=false",
        ds_arg, f"output_dir={workdir / 'run'}",
        "train.eval_every=0", "train.save_every=0", *extra]
    return load_config(TRAIN_CONFIG, overrides)


class Zero3Step:
    """The trainer (its DeepSpeed engine, or plain PyTorch on the GPU with ``sharding="none"``)
    and a fixed list of synthetic batches; one call is one step through the trainer's own
    ``_micro_step`` and ``_optimizer_step`` (what ``Trainer.train`` runs per step, metrics
    included). A batch has ``utterances`` clips, or as many as fill ``tokens`` real tokens. The
    models are built directly on the GPU (random weights of real shapes: a 7 B LLM in seconds,
    not minutes of CPU initialization)."""

    def __init__(self, encoder: str, llm: str, variant: str, utterances: int | None, workdir: Path,
                 n_batches: int = ZERO3_BATCHES, seed: int = 0, sharding: str = "zero3",
                 tokens: int | None = None, extra: list[str] = ()):
        from mtbi_fast.trainer import Trainer, _Window

        on = VARIANTS[variant]
        cfg = trainer_config(workdir, encoder, llm, variant, extra, sharding)
        self.trainer = _build_on_gpu(Trainer, cfg)
        self.window = _Window()
        model = self.trainer.model
        if "true_length" not in on:
            _pad_encoder_to_30s(model)
        self.device = next(p.device for p in model.adapter.parameters())
        self.batches = synthetic_batches(model, on, n_batches, utterances, tokens, seed)
        for batch in self.batches:
            if "teacher_hidden" in batch:
                batch["teacher_hidden"] = batch["teacher_hidden"].cpu()  # as a cache arrives
            batch["skipped_audio"] = []
        if self.device.type == "cuda":  # what the trainer's DataLoader (pin_memory) hands over
            self.batches = [torch.utils.data._utils.pin_memory.pin_memory(b) for b in self.batches]
        self.i = 0

    def __call__(self) -> int:
        batch = self.batches[self.i % len(self.batches)]
        self.i += 1
        self.trainer._micro_step(iter([batch]), self.device, self.window)
        self.trainer._optimizer_step()
        return batch["student"].n_tokens

    def flops(self) -> float:
        """Mean model FLOPs of the batches' steps (``mtbi_fast.flops``)."""
        from mtbi_fast.flops import step_flops

        return statistics.mean(step_flops(self.trainer.model, b["student"], b.get("teacher"),
                                          [m.shape[-1] for m in b["features"]])["total"] for b in self.batches)

    def measure(self, warmup: int = ZERO3_WARMUP, steps: int = ZERO3_STEPS, profile: bool = False) -> dict:
        """Median s/step, mean real tokens per step, model TFLOP/s and MFU, (CUDA) the peak memory
        of timed steps, and with ``profile`` the GPU-busy share of 2 more steps' wall time."""
        from mtbi_fast.flops import mfu, peak_tflops

        cuda = self.device.type == "cuda"
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        for _ in range(warmup):
            self()
        sync()
        out = {}
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            out["resident_mib"] = torch.cuda.memory_allocated() / 2**20
        times, tokens = [], []
        for _ in range(steps):
            t0 = time.perf_counter()
            tokens.append(self())
            sync()
            times.append(time.perf_counter() - t0)
        if cuda:
            out["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        seconds = statistics.median(times)
        n_tokens = statistics.mean(tokens)
        peak, source = peak_tflops(self.device, None)
        flops = self.flops()
        tflops, util = mfu(flops, seconds, peak)
        students = [b["student"] for b in self.batches]
        out.update(seconds=seconds, tokens=n_tokens, tokens_per_s=n_tokens / seconds,
                   model_tflop=flops / 1e12, tflops=tflops, mfu=util, peak_tflops=peak, peak_source=source,
                   loss_rows=statistics.mean(s.target_ids.numel() for s in students),
                   slots=statistics.mean(s.source.numel() for s in students),
                   sharding=self.trainer.ds_config.get("zero_optimization", {}).get("stage")
                   if self.trainer.ds_config else "none",
                   fused_ops=getattr(self.trainer.model, "fused_ops", None),
                   step_times=[round(t, 4) for t in times])
        if profile and cuda:
            out.update(gpu_busy(self, 2))
        return out


def synthetic_batches(model, on: set, n_batches: int, utterances: int | None, tokens: int | None = None,
                      seed: int = 0) -> list[dict]:
    """``n_batches`` step batches of synthetic utterances (noise audio of SECONDS, the demo
    transcripts stretched to it, random prompt and RESPONSE ids): ``utterances`` a batch, or as
    many as reach ``tokens`` real tokens. Deterministic in ``seed``."""
    tok = model.tokenizer
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    vocab = model.llm.config.vocab_size
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    rows = _manifest_rows(DEMO_TRAIN)
    batches, j = [], 0
    for b in range(n_batches):
        students, teachers, mels, total, k = [], [], [], 0, 0
        while (k < utterances) if tokens is None else (total < tokens):
            u = rows[j % len(rows)]
            seconds = rng.uniform(*SECONDS)
            scale = seconds / u["duration"]  # the demo transcript, stretched to the clip
            words = [Word(w["word"], w["start"] * scale, w["end"] * scale) for w in u["words"]]
            mel = model.features(0.1 * torch.randn(int(seconds * 16000), generator=g))
            n_frames = model.adapter.n_frames(model.front.frames(mel.shape[1]))
            prefix = [rng.randrange(vocab) for _ in range(rng.randint(15, 25))]
            suffix = [rng.randrange(vocab) for _ in range(rng.randint(5, 10))]
            response = [rng.randrange(vocab) for _ in range(rng.randint(*RESPONSE))]
            s, t = example_pair(f"{u['id']}-{b}-{k}", words, n_frames, model.frame_rate, TEXT_RATIO,
                                prefix, suffix, response, enc, duration=seconds,
                                generator=torch.Generator().manual_seed(b * 100_003 + k))
            students.append(s)
            teachers.append(t)
            mels.append(mel)
            total += len(s)
            j += 1
            k += 1
        batches.append(step_batch(model, students, teachers, mels, on))
    return batches


def count_flops(case: str, utterances: int | None = None, tokens: int | None = None) -> dict:
    """The model FLOPs per step of a GPU case's synthetic batches (the mtbi-fast variant: cached
    teacher), counted on the CPU with the models built on the meta device (no weights, no
    compute): MFU for a measured s/step without a GPU."""
    from mtbi_fast.flops import step_flops

    encoder, llm, n_utts, _ = GPU_CASES[case] if case in GPU_CASES else (*case.split("+"), 4, 0)
    cfg = ModelConfig.from_dict({"encoder": model_source("encoders", encoder), "llm": model_source("llms", llm),
                                 "dtype": "bfloat16", "fused_ops": "none"})
    with torch.device("meta"):
        model = SpeechLLM.from_config(cfg)
    on = VARIANTS["mtbi-fast"] - {"cached_teacher"}  # pack the teacher, do not run it
    batches = synthetic_batches(model, on, ZERO3_BATCHES, None if tokens else (utterances or n_utts), tokens)
    parts = [step_flops(model, b["student"], None, [m.shape[-1] for m in b["features"]]) for b in batches]
    mean = {k: statistics.mean(p[k] for p in parts) for k in parts[0]}
    return dict(case=case, utterances=None if tokens else (utterances or n_utts), token_budget=tokens,
                tokens=statistics.mean(b["student"].n_tokens for b in batches),
                model_tflop=mean["total"] / 1e12, parts_tflop={k: v / 1e12 for k, v in mean.items()})


def gpu_busy(step, n: int) -> dict:
    """The share of ``n`` steps' wall time in which the GPU runs a kernel (the union of the
    kernels' intervals in a ``torch.profiler`` trace), and kernel launches per step."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start)
    busy, end = 0.0, float("-inf")
    for a, b in spans:  # union of intervals, microseconds
        if b > end:
            busy += b - max(a, end)
            end = b
    launches = sum(1 for e in prof.events() if e.name in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    return dict(gpu_busy_share=busy / 1e6 / wall, kernels_per_step=len(spans) / n, launches_per_step=launches / n)


def _build_on_gpu(trainer_cls, cfg: dict):
    """The trainer with its models built directly on this rank's GPU (random init there), the
    data still on the host."""
    if not torch.cuda.is_available():
        return trainer_cls(cfg)
    real = trainer_cls._build_model
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))

    def on_gpu(self):
        with device:
            return real(self)

    trainer_cls._build_model = on_gpu
    try:
        return trainer_cls(cfg)
    finally:
        trainer_cls._build_model = real


def run_zero3(case: str, variant: str, utterances: int | None = None, sharding: str = "zero3",
              tokens: int | None = None, extra: list[str] = (), profile: bool = False) -> dict:
    """One GPU case (GPU_CASES, or ENCODER+LLM names) and variant, in this process. An
    out-of-memory error is a result (``oom``: true), not a crash."""
    encoder, llm, n_utts, _ = GPU_CASES[case] if case in GPU_CASES else (*case.split("+"), 4, 0)
    n_utts = utterances or n_utts
    row = dict(case=case, variant=variant, utterances=n_utts if tokens is None else None,
               token_budget=tokens, sharding_asked=sharding, extra=list(extra))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mtbi-zero3-") as tmp:
        try:
            step = Zero3Step(encoder, llm, variant, n_utts, Path(tmp), sharding=sharding,
                             tokens=tokens, extra=extra)
            row["setup_s"] = time.perf_counter() - t0
            row.update(step.measure(profile=profile))
        except torch.cuda.OutOfMemoryError as exc:
            row.update(oom=True, error=str(exc).splitlines()[0][:300])
            if torch.cuda.is_available():
                row["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return row


# ---------------------------------------------------------------------------------------------
# GPU: data wait of the real trainer with DataLoader workers

DATA_WAIT = dict(encoder="whisper-tiny", llm="smollm2-135m", examples=32, steps=30, workers=4,
                 log_every=5)


def data_wait_overrides(workers: int, examples: int, steps: int, log_every: int) -> list[str]:
    return [f"data.num_workers={workers}", f"packing.examples_per_step={examples}",
            "packing.max_tokens=2048", f"train.steps={steps}", f"train.log_every={log_every}",
            f"train.warmup_steps={min(5, steps)}", f"interleave.steps={steps}"]


def data_wait_supported() -> str | None:
    """None when the trainer's config has ``data.num_workers`` and ``data.prefetch_factor``,
    else why not."""
    from mtbi_fast.config import load_config

    try:
        cfg = load_config(TRAIN_CONFIG, ["data.num_workers=4"])
    except ValueError as exc:
        return f"the trainer does not take data.num_workers yet ({exc})"
    if "prefetch_factor" not in cfg["data"]:
        return "the trainer's config has no data.prefetch_factor yet"
    return None


def run_data_wait(encoder=DATA_WAIT["encoder"], llm=DATA_WAIT["llm"], examples=DATA_WAIT["examples"],
                  steps=DATA_WAIT["steps"], workers=DATA_WAIT["workers"],
                  log_every=DATA_WAIT["log_every"]) -> dict:
    """``Trainer.train`` for ``steps`` steps on the demo corpus; the ``data_wait_share`` of its
    logged windows (the first includes starting the workers)."""
    from mtbi_fast.trainer import Trainer

    why = data_wait_supported()
    if why:
        return dict(skipped=why)
    with tempfile.TemporaryDirectory(prefix="mtbi-data-wait-") as tmp:
        cfg = trainer_config(Path(tmp), encoder, llm, "mtbi-fast",
                             data_wait_overrides(workers, examples, steps, log_every))
        t0 = time.perf_counter()
        trainer = Trainer(cfg)
        setup = time.perf_counter() - t0
        trainer.train(resume=False)
        total = time.perf_counter() - t0
        rows = [json.loads(line) for line in (Path(cfg["output_dir"]) / "metrics.jsonl").read_text().splitlines()
                if line.strip()]
    rows = [r for r in rows if "loss" in r]
    if not rows or any("data_wait_share" not in r for r in rows):
        return dict(error="metrics.jsonl training rows have no data_wait_share", rows=rows[:2])
    shares = [r["data_wait_share"] for r in rows]
    steady = shares[1:] or shares
    return dict(case=f"{encoder}+{llm}", variant=f"num_workers={workers}", examples=examples,
                steps=steps, windows=len(rows), setup_s=setup, total_s=total,
                data_wait_share=statistics.mean(shares), data_wait_share_steady=statistics.mean(steady),
                data_wait_shares=[round(x, 4) for x in shares],
                data_wait_s=sum(r.get("data_wait_s", 0.0) for r in rows),
                tokens_per_s=statistics.mean(r["tokens_per_s"] for r in rows[1:] or rows))


# ---------------------------------------------------------------------------------------------
# CPU and GPU: the host overhead of the trainer's step

# main before the host-overhead work (issue 24): float() of loss, KL and CE on every micro-step,
# the adapter once per clip, the encoder's dense padding mask, the loss's host reads
BEFORE_REF = "46c431a"
OVERHEAD_MODELS = ("tiny", "demo")


def overhead_config(workdir: Path, models: str) -> dict:
    """The probe's run config: configs/tiny_train.yaml with ``models`` ("tiny": the random tiny
    models; "demo": configs/demo.yaml's Whisper tiny.en + SmolLM2-135M-Instruct), the demo
    corpus with synthetic behaviors (random prompt and response ids, the transcript through the
    LLM's own tokenizer), the online teacher, no evaluation, no checkpoints, batches built in this
    process; no DeepSpeed on a CPU, and on a GPU DeepSpeed ZeRO-3 in a world of one (the only way
    the trainer before BEFORE_REF ran on a GPU: both sides then take the same path). Only keys
    that every version of the trainer knows are set."""
    from mtbi_fast.config import load_config
    from mtbi_fast.hub import load_llm

    model = yaml.safe_load((CONFIGS[models]).read_text())["model"]
    if models == "tiny":
        model = {**model, **yaml.safe_load(TRAIN_CONFIG.read_text())["model"]}
    llm, tokenizer = load_llm(model["llm"], seed=model.get("init_seed", 0))
    vocab = llm.get_input_embeddings().weight.shape[0]
    del llm
    # responses of the demo's behaviors' length (Step's 10-100 tokens), not the GPU cases' 50-300
    behaviors = synthetic_behaviors(DEMO_TRAIN, workdir / "behaviors", tokenizer, vocab, response=(10, 100))
    overrides = [f"model={json.dumps(model)}", f"data.train_manifest={DEMO_TRAIN}",
                 f"data.behaviors={behaviors}", "data.eval_manifest=null", "data.eval_behaviors=null",
                 "data.teacher_cache=false", "data.num_workers=0",
                 f"deepspeed={DS_ZERO3 if torch.cuda.is_available() else 'null'}",
                 f"output_dir={workdir / 'run'}", "train.eval_every=0", "train.save_every=0",
                 "train.steps=1000", "train.log_every=1000", f"packing.examples_per_step={EXAMPLES_PER_STEP}",
                 "packing.max_tokens=2048"]
    return load_config(TRAIN_CONFIG, overrides)


def run_overhead(models: str = "demo", steps: int = 3, warmup: int = 1) -> dict:
    """``steps`` timed micro-steps (median s/step), then ``steps`` more under ``torch.profiler``
    (operator calls and host scalar reads per step), of the trainer's own step on batches built
    ahead (so the figures are the step's, not the batch building's)."""
    import mtbi_fast
    import mtbi_fast.trainer as trainer_module
    from torch.profiler import ProfilerActivity, profile

    with tempfile.TemporaryDirectory(prefix="mtbi-overhead-") as tmp:
        trainer = trainer_module.Trainer(overhead_config(Path(tmp), models))
        try:
            device = trainer._device()
            loader = iter(trainer.train_loader(device))
            batches = [next(loader) for _ in range(warmup + 2 * steps + 1)]
            del loader
            feed = iter(batches)
            window = trainer_module._Window()

            def step():
                trainer._micro_step(feed, device, window)
                trainer._optimizer_step()
                if device.type == "cuda":  # the step's time, not its launch time
                    torch.cuda.synchronize()

            for _ in range(warmup):
                step()
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(steps):
                    step()
            events = prof.events()
            ops = sum(1 for e in events if e.name.startswith("aten::"))
            reads = sum(1 for e in events if e.name == "aten::_local_scalar_dense")
            sites = _scalar_read_sites(step)
        finally:
            trainer.close()
    tokens = statistics.mean(b["student"].n_tokens for b in batches[warmup:])
    seconds = statistics.median(times)
    return dict(case=models, package=str(Path(mtbi_fast.__file__).parent), seconds=seconds,
                tokens=tokens, tokens_per_s=tokens / seconds, ops_per_step=ops / steps,
                scalar_reads_per_step=reads / steps, scalar_read_sites=sites,
                step_times=[round(t, 4) for t in times])


def _scalar_read_sites(step) -> dict[str, int]:
    """Where one call of ``step`` reads a scalar back (``aten::_local_scalar_dense``): the
    innermost mtbi_fast frame of each read (else the innermost frame), with its count."""
    import collections
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode

    sites = collections.Counter()

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                stack = traceback.extract_stack()[:-1]
                own = [f for f in stack if f"{os.sep}mtbi_fast{os.sep}" in f.filename]
                f = (own or stack)[-1]
                sites[f"{Path(f.filename).name}:{f.lineno} {(f.line or '').strip()[:80]}"] += 1
            return func(*args, **(kwargs or {}))

    with Spy():
        step()
    return dict(sites.most_common())


def _manifest_rows(path: Path) -> list[dict]:
    """A manifest's rows as plain JSON (no audio is opened: no soundfile needed)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# command line: one case in this process, the result as one "RESULT {json}" line


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "zero3":
        p = argparse.ArgumentParser(prog="train_cases.py zero3")
        p.add_argument("case", help=f"one of {sorted(GPU_CASES)}, or ENCODER+LLM names "
                       "(configs/model_shapes.yaml, or tiny)")
        p.add_argument("variant", choices=sorted(VARIANTS))
        p.add_argument("--utterances", type=int, help="per step (default: the case's)")
        p.add_argument("--tokens", type=int, help="per step instead of --utterances (a token budget)")
        p.add_argument("--sharding", choices=("zero3", "zero2", "none"), default="zero3",
                       help="DeepSpeed ZeRO-3, ZeRO-2, or none (plain PyTorch on the GPU)")
        p.add_argument("--profile", action="store_true", help="GPU-busy share of 2 profiled steps")
        p.add_argument("overrides", nargs="*", help="section.key=value (e.g. model.gradient_checkpointing=true)")
        a = p.parse_intermixed_args(argv[1:])
        return _result(run_zero3(a.case, a.variant, a.utterances, a.sharding, a.tokens, a.overrides,
                                 a.profile))
    if argv and argv[0] == "flops":
        p = argparse.ArgumentParser(prog="train_cases.py flops")
        p.add_argument("case")
        p.add_argument("--utterances", type=int)
        p.add_argument("--tokens", type=int)
        a = p.parse_args(argv[1:])
        return _result(count_flops(a.case, a.utterances, a.tokens))
    if argv and argv[0] == "overhead":
        p = argparse.ArgumentParser(prog="train_cases.py overhead")
        p.add_argument("models", choices=OVERHEAD_MODELS)
        p.add_argument("--steps", type=int, default=3)
        a = p.parse_args(argv[1:])
        return _result(run_overhead(a.models, a.steps))
    if argv and argv[0] == "data-wait":
        p = argparse.ArgumentParser(prog="train_cases.py data-wait")
        for key, value in DATA_WAIT.items():
            p.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value)
        a = p.parse_args(argv[1:])
        return _result(run_data_wait(**vars(a)))
    return memory_probe(argv)


def _result(row: dict) -> int:
    """Print the result and leave at once: no teardown of the one-process NCCL world, the
    DataLoader workers' queues or the CUDA context to wait for (or hang in)."""
    print("RESULT " + json.dumps(row), flush=True)
    sys.stderr.flush()
    os._exit(0)


def memory_probe(argv) -> int:
    """The CPU memory probe: peak resident memory the steps of one variant add."""
    from loss_cases import reset_peak_rss, rss_bytes

    p = argparse.ArgumentParser()
    p.add_argument("config", choices=sorted(CONFIGS))
    p.add_argument("variant", choices=sorted(CHECKPOINTING))
    p.add_argument("--steps", type=int, default=3)
    a = p.parse_args(argv)
    step = Step(a.config, a.variant)
    step()  # warm up (allocator, lazy inits)
    reset_peak_rss()
    before = rss_bytes()
    for _ in range(a.steps):
        step()
    print("RESULT " + json.dumps({"extra_bytes": max(rss_bytes("VmHWM") - before, 0)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
