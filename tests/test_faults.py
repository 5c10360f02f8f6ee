"""Fault injection: kill -9 at seeded random points of real CLI runs, then run the same command
again. Every resumed run must end with the same files and metrics as an uninterrupted one.

Ten trials on the tiny config: four of `mtbi-fast train` without DeepSpeed, three through
DeepSpeed ZeRO-3 (a one-process world), three of `mtbi-fast behaviors`. Each kill lands inside
the work, not in the interpreter's start-up: the test waits for the run's first output file, then
sleeps a seeded random fraction of the work time measured on the uninterrupted run.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import CONFIG, ROOT, make_training_corpus

TIMING_KEYS = {"tokens_per_s", "tflops", "mfu", "data_wait_s", "data_wait_share", "time"}  # wall clock, not results
SEED = 20261126


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """8 demo utterances and their behaviors (with cached teacher states) from tiny_train's LLM."""
    return make_training_corpus(tmp_path_factory.mktemp("faults"), n_train=8, n_test=0)


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "mtbi_fast.cli", *map(str, args)]


def run(cmd, ready: Path | None = None, fraction: float | None = None,
        work_seconds: float = 0.0) -> tuple[int, float]:
    """Run ``cmd``; with ``fraction``, SIGKILL it ``fraction * work_seconds`` after ``ready``
    appears. Returns (exit code, seconds from ``ready`` to the end)."""
    # a fresh process, as a user starts it: not the torch.distributed variables that in-process
    # DeepSpeed tests of this session left in os.environ (their port may still be bound here)
    dist = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in dist}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env=env)
    seen = None
    while proc.poll() is None and seen is None:
        if ready is not None and ready.exists():
            seen = time.monotonic()
        else:
            time.sleep(0.005)
    if fraction is not None and proc.poll() is None:
        time.sleep(fraction * work_seconds)
        proc.send_signal(signal.SIGKILL)
    err = proc.communicate(timeout=300)[1]
    if fraction is None:
        assert proc.returncode == 0, err[-3000:]
    return proc.returncode, time.monotonic() - (seen or time.monotonic())


def training_outcome(out: Path) -> dict:
    rows = [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
            for line in (out / "metrics.jsonl").read_text().splitlines()]
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*")
                   if p.is_file() and p.name != ".lock")
    weights = {str(p.relative_to(out)): load_file(p) for p in sorted(out.rglob("*.safetensors"))}
    return dict(rows=rows, files=files, weights=weights,
                latest=(out / "checkpoints" / "latest").read_text())


def assert_same_training(got: dict, want: dict, what: str):
    assert got["rows"] == want["rows"], what
    assert got["files"] == want["files"], what
    assert got["latest"] == want["latest"], what
    assert got["weights"].keys() == want["weights"].keys(), what
    for name, tensors in want["weights"].items():
        for key, t in tensors.items():
            assert torch.equal(got["weights"][name][key], t), f"{what}: {name} {key}"


@pytest.mark.parametrize("deepspeed, trials", [(None, 4), ("configs/ds_zero3.json", 3)],
                         ids=["plain", "zero3"])
def test_training_killed_anywhere_resumes_to_the_same_run(corpus, tmp_path, deepspeed, trials):
    args = ["train", CONFIG, f"data.train_manifest={corpus}/train.jsonl",
            f"data.behaviors={corpus}/beh", "data.teacher_cache=true", "data.eval_manifest=null",
            "data.eval_behaviors=null", "train.steps=30", "interleave.steps=30",
            "train.save_every=3", "train.keep_last=2", "train.eval_every=0",
            f"deepspeed={deepspeed or 'null'}"]
    ref = tmp_path / "ref"
    _, work = run(cli(*args, f"output_dir={ref}"), ready=ref / "metrics.jsonl")
    want = training_outcome(ref)
    rng = random.Random(f"{SEED}-{deepspeed}")
    killed = 0
    for trial in range(trials):
        out = tmp_path / f"killed-{trial}"
        fraction = rng.uniform(0.0, 1.0)
        code, _ = run(cli(*args, f"output_dir={out}"), ready=out / "metrics.jsonl",
                      fraction=fraction, work_seconds=work)
        killed += code == -signal.SIGKILL
        run(cli(*args, f"output_dir={out}"))  # the same command again: resumes
        what = f"trial {trial}: killed {fraction:.2f} into the work (exit {code})"
        assert_same_training(training_outcome(out), want, what)
    assert killed >= trials - 1  # the kills landed in the work (one may come after the end)


def test_behaviors_killed_anywhere_resume_to_the_same_files(corpus, tmp_path):
    args = ["behaviors", "--manifest", corpus / "train.jsonl", "--config", CONFIG,
            "--per-utterance", 4, "--max-new-tokens", 24, "--shard-size", 3, "--batch-size", 2,
            "--cache-hidden"]
    ref = tmp_path / "ref"
    _, work = run(cli(*args, "-o", ref), ready=ref / "plan.json")
    want = {p.name: p.read_bytes() for p in sorted(ref.iterdir()) if p.name != ".lock"}
    assert sum(n.startswith("shard-") for n in want) >= 10
    rng = random.Random(f"{SEED}-behaviors")
    killed = 0
    for trial in range(3):
        out = tmp_path / f"killed-{trial}"
        fraction = rng.uniform(0.0, 1.0)
        code, _ = run(cli(*args, "-o", out), ready=out / "plan.json", fraction=fraction,
                      work_seconds=work)
        killed += code == -signal.SIGKILL
        run(cli(*args, "-o", out))
        got = {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != ".lock"}
        assert got == want, f"trial {trial}: killed {fraction:.2f} into the work (exit {code})"
    assert killed >= 2
