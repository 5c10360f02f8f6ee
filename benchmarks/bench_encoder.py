"""Speech encoder at the true length vs padded to 30 s (what transformers' WhisperEncoder
insists on), for 5 s and 12 s clips, same run.

    python -m pytest benchmarks/bench_encoder.py

Uses the real Whisper tiny.en (``mtbi-fast models fetch whisper-tiny.en``, fetched here if
missing) with a batch of 4 clips. Results: benchmarks/results/encoder_<device>.json and .md.
"""

from __future__ import annotations

import pytest
import results_table
import torch

from mtbi_fast.audio import log_mel
from mtbi_fast.encoders import load_encoder
from mtbi_fast.fetch import fetch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BATCH = 4


@pytest.fixture(scope="module")
def encoder():
    path = fetch("whisper-tiny.en", quiet=True)
    return load_encoder({"path": str(path)}).to(DEVICE).eval()


@pytest.fixture(scope="module")
def encoder_rows():
    rows: list[dict] = []
    yield rows
    if rows:
        columns = [("case", "clip", ""), ("variant", "encoder input", ""),
                   ("seconds", "time per batch (s)", ".3f"), ("seconds_vs_padded-30s", "time / padded", ".2f"),
                   ("speedup", "speedup", ".1f")]
        for r in rows:
            base = next(b for b in rows if b["case"] == r["case"] and b["variant"] == "padded-30s")
            r["speedup"] = base["seconds"] / r["seconds"]
        print("\n" + results_table.write(
            f"encoder_{DEVICE}", f"Whisper tiny.en encoder, batch of {BATCH} clips "
            "(`python -m pytest benchmarks/bench_encoder.py`)", rows, columns,
            baseline="padded-30s", ratios=("seconds",)))


@pytest.mark.parametrize("seconds", [5, 12])
@pytest.mark.parametrize("variant", ["padded-30s", "true-length"])
def test_encoder_time(benchmark, encoder, encoder_rows, seconds, variant):
    g = torch.Generator().manual_seed(seconds)
    mels = [log_mel(0.1 * torch.randn(seconds * 16000, generator=g)).to(DEVICE) for _ in range(BATCH)]
    true_length = encoder  # a SpeechEncoder; encoder.encoder is transformers' WhisperEncoder
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)

    if variant == "padded-30s":
        padded = torch.stack([torch.nn.functional.pad(m, (0, 3000 - m.shape[1])) for m in mels])

        def run():
            with torch.no_grad():
                encoder.encoder(padded)
            sync()
    else:
        def run():
            with torch.no_grad():
                true_length(mels)
            sync()

    benchmark.pedantic(run, rounds=5, warmup_rounds=1, iterations=1)
    encoder_rows.append(dict(case=f"{seconds} s", variant=variant, device=DEVICE,
                             seconds=benchmark.stats.stats.median))
