"""One training step of each pipeline variant, for bench_train.py (and its memory probe).

The full mtbi-fast step (fused loss, packed batches, true-length encoder, cached teacher, frozen
weights in ``model.dtype=auto``: bf16 on a GPU or an AVX512-BF16 CPU) and the reference eager step
(eager loss, padded batches, encoder padded to 30 s, online teacher, float32), plus the fast step
with each optimization switched off alone. Run as a script it is the memory probe: one variant
in a fresh process, printing the peak resident memory the steps add (JSON).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mtbi_fast.audio import load_audio, log_mel  # noqa: E402
from mtbi_fast.data import read_manifest  # noqa: E402
from mtbi_fast.interleave import example_pair  # noqa: E402
from mtbi_fast.model import ModelConfig, SpeechLLM  # noqa: E402
from mtbi_fast.packing import pack  # noqa: E402

OPTIMIZATIONS = ("fused_loss", "packing", "true_length", "cached_teacher", "bf16")
VARIANTS = {"mtbi-fast": set(OPTIMIZATIONS), "eager": set()}
VARIANTS.update({f"no-{o}": set(OPTIMIZATIONS) - {o} for o in OPTIMIZATIONS})
CONFIGS = {"tiny": ROOT / "configs" / "tiny.yaml", "demo": ROOT / "configs" / "demo.yaml"}
EXAMPLES_PER_STEP = 8


class Step:
    """A model, a fixed list of batches from the demo corpus, and one optimizer step per call."""

    def __init__(self, config: str, variant: str, n_batches: int = 3, seed: int = 0):
        on = VARIANTS[variant]
        self.on = on
        cfg = yaml.safe_load(CONFIGS[config].read_text())["model"]
        cfg["loss"] = {**cfg.get("loss", {}), "backend": "auto" if "fused_loss" in on else "eager"}
        # frozen weights in bf16 where its matmuls are native (model.dtype=auto), else float32
        cfg["dtype"] = "auto" if "bf16" in on else "float32"
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
                mel = log_mel(load_audio(u.audio), self.model.encoder.num_mel_bins)
                n_frames = self.model.adapter.n_frames(math.ceil(mel.shape[1] / 2))
                response = [rng.randrange(vocab) for _ in range(rng.randint(10, 100))]
                s, t = example_pair(u.id, u.words, n_frames, self.model.frame_rate, 0.3, prefix,
                                    suffix, response, enc, generator=torch.Generator().manual_seed(b))
                students.append(s)
                teachers.append(t)
                mels.append(mel)
            bins = None if "packing" in on else [[i] for i in range(len(students))]
            student = pack(students, 2048, bins=bins)
            teacher = pack(teachers, 2048, bins=bins)
            batch = {"student": student, "mels": mels}
            if "cached_teacher" in on:
                batch["teacher_hidden"] = self.model.teacher_states(teacher)
            else:
                batch["teacher"] = teacher
            self.batches.append(batch)
        self.tokens = [b["student"].n_tokens for b in self.batches]
        self.i = 0

    def __call__(self) -> int:
        batch = self.batches[self.i % len(self.batches)]
        self.i += 1
        kw = {k: v for k, v in batch.items() if k in ("teacher", "teacher_hidden")}
        out = self.model(batch["student"], mels=batch["mels"], **kw)
        self.opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        self.opt.step()
        return batch["student"].n_tokens


def _pad_encoder_to_30s(model):
    """The reference encoder: transformers' WhisperEncoder on 3000 padded frames, then cut."""
    enc = model.encoder.encoder

    def forward(mels):
        x = torch.stack([torch.nn.functional.pad(m, (0, 3000 - m.shape[1])) for m in mels])
        h = enc(x.to(enc.conv1.weight.dtype)).last_hidden_state
        return [h[i, :math.ceil(m.shape[1] / 2)] for i, m in enumerate(mels)]

    model.encoder.forward = forward


def main(argv=None) -> int:
    from loss_cases import reset_peak_rss, rss_bytes

    p = argparse.ArgumentParser()
    p.add_argument("config", choices=sorted(CONFIGS))
    p.add_argument("variant", choices=sorted(VARIANTS))
    p.add_argument("--steps", type=int, default=3)
    a = p.parse_args(argv)
    step = Step(a.config, a.variant)
    step()  # warm up (allocator, lazy inits)
    reset_peak_rss()
    before = rss_bytes()
    for _ in range(a.steps):
        step()
    json.dump({"extra_bytes": max(rss_bytes("VmHWM") - before, 0)}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
