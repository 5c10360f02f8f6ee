"""A full MTBI training step: mtbi-fast against the reference eager pipeline, same data, same run.

    python -m pytest benchmarks/bench_train.py

Variants (benchmarks/train_cases.py): ``mtbi-fast`` (fused loss, packed batches, true-length
encoder, cached teacher, frozen weights in bf16 where native), ``eager`` (eager loss, padded
batches, encoder padded to 30 s, online teacher, float32), and ``no-<optimization>``: mtbi-fast
with that one optimization off. Configs: ``tiny`` (random tiny models) and ``demo`` (Whisper
tiny.en + SmolLM2-135M-Instruct, fetched if missing). Each step: forward, backward and an AdamW
step over 8 demo utterances with 10-100 token responses.
Results: benchmarks/results/train_<device>.json and .md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import results_table
import torch
from train_cases import VARIANTS, Step

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PROBE = Path(__file__).with_name("train_cases.py")


@pytest.fixture(scope="module")
def train_rows():
    rows: list[dict] = []
    yield rows
    if rows:
        columns = [("case", "config", ""), ("variant", "variant", ""), ("seconds", "s/step", ".3f"),
                   ("tokens_per_s", "tokens/s", ".0f"), ("tokens_per_s_vs_eager", "tokens/s vs eager", ".2f"),
                   ("peak_extra_mib", "peak extra (MiB)", ".0f"),
                   ("peak_extra_mib_vs_eager", "memory vs eager", ".2f")]
        print("\n" + results_table.write(
            f"train_{DEVICE}", "MTBI training step, forward + backward + AdamW "
            "(`python -m pytest benchmarks/bench_train.py`)", rows, columns, baseline="eager",
            ratios=("tokens_per_s", "peak_extra_mib")))


@pytest.mark.parametrize("config", ["tiny", "demo"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_train_step(benchmark, train_rows, config, variant):
    if config == "demo":
        from mtbi_fast.fetch import fetch

        fetch("whisper-tiny.en", quiet=True)
        fetch("smollm2-135m-instruct", quiet=True)
    step = Step(config, variant)
    step()  # warm up
    benchmark.pedantic(step, rounds=3 if config == "demo" else 6, warmup_rounds=0, iterations=1)
    seconds = benchmark.stats.stats.median
    tokens = sum(step.tokens) / len(step.tokens)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    probe = subprocess.run([sys.executable, str(PROBE), config, variant], capture_output=True,
                           text=True, env=env)
    if probe.returncode != 0:
        raise RuntimeError(f"memory probe failed:\n{probe.stderr[-3000:]}")
    extra = json.loads(probe.stdout.strip().splitlines()[-1])["extra_bytes"]
    train_rows.append(dict(case=config, variant=variant, device=DEVICE, seconds=seconds,
                           tokens_per_s=tokens / seconds, peak_extra_mib=extra / 2**20))
