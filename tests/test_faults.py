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
    # TensorBoard writes one event file per process start, named by its time and pid
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*")
                   if p.is_file() and p.name != ".lock" and p.relative_to(out).parts[0] != "tensorboard")
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
            "--per-utterance", 4, "--max-new-tokens", 24, "--part-size", 3, "--batch-size", 2,
            "--cache-hidden"]
    ref = tmp_path / "ref"
    _, work = run(cli(*args, "-o", ref), ready=ref / "plan.json")
    want = {p.name: p.read_bytes() for p in sorted(ref.iterdir()) if p.name != ".lock"}
    assert sum(n.startswith("part-") for n in want) >= 10
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


def _children(pid: int) -> set[int]:
    """Every live descendant of process ``pid`` (from /proc; no psutil needed)."""
    parents = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":  # a zombie is dead, only not yet reaped
                parents[int(d.name)] = int(fields[1])
    out, frontier = set(), {pid}
    while frontier:
        frontier = {c for c, p in parents.items() if p in frontier} - out
        out |= frontier
    return out


def _wait_gone(pids: set[int], seconds: float = 10.0) -> set[int]:
    deadline = time.monotonic() + seconds
    while pids and time.monotonic() < deadline:
        pids = {p for p in pids if Path(f"/proc/{p}").exists()
                and (Path(f"/proc/{p}") / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"}
        time.sleep(0.05)
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_pool_workers_die_with_their_parent(tmp_path):
    """The initializer every worker pool uses (shard, corpus build, align): after kill -9 of the
    parent no worker lives on to write into the folder."""
    script = tmp_path / "parent.py"
    script.write_text(
        "import os, time\n"
        "from concurrent.futures import ProcessPoolExecutor\n"
        "from multiprocessing import get_context\n"
        "from mtbi_fast.procs import pool_initializer\n"
        "def work(i):\n"
        "    time.sleep(0.2)\n"
        "    return os.getpid()\n"
        "if __name__ == '__main__':\n"
        "    pool = ProcessPoolExecutor(2, mp_context=get_context('spawn'), initializer=pool_initializer,\n"
        "                               initargs=(os.getpid(),))\n"
        "    print(sorted(set(pool.map(work, range(8)))), flush=True)\n"
        "    pool.submit(time.sleep, 600)\n"
        "    time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=tmp_path,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    workers = set(json.loads(proc.stdout.readline()))
    assert len(workers) == 2 and workers <= _children(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert _wait_gone(workers) == set()


def test_shard_workers_killed_with_the_run_and_the_rerun_is_identical(corpus, tmp_path):
    """kill -9 of `mtbi-fast shard --workers 2` mid-work: no process of the killed run survives,
    and the rerun's files equal an uninterrupted run's."""
    args = ["shard", corpus / "train.jsonl", corpus / "beh", "--shard-size", 2, "--workers", 2,
            "--teacher-hidden"]
    ref = tmp_path / "ref"
    _, work = run(cli(*args, "-o", ref), ready=ref / "shard_settings.json")
    want = {str(p.relative_to(ref)): p.read_bytes() for p in sorted(ref.rglob("*")) if p.is_file() and p.name != ".lock"}
    rng = random.Random(f"{SEED}-shard")
    out = tmp_path / "killed"
    env = {k: v for k, v in os.environ.items() if k not in {"RANK", "LOCAL_RANK", "WORLD_SIZE"}}
    proc = subprocess.Popen(cli(*args, "-o", out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=ROOT, env=env)
    while proc.poll() is None and not (out / "shard_settings.json").exists():
        time.sleep(0.005)
    time.sleep(rng.uniform(0.3, 0.8) * work)
    family = _children(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert _wait_gone(family) == set(), "processes of the killed run live on"
    run(cli(*args, "-o", out))
    got = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.name != ".lock"}
    assert got.keys() == want.keys()
    for name in want:
        if name != "shards.json":  # (it records the time each run took)
            assert got[name] == want[name], name


def test_corpus_build_workers_killed_with_the_run(tmp_path):
    """kill -9 of `mtbi-fast corpus build --workers 2` while its workers synthesize: none of its
    processes lives on; the rerun finishes with the utterances an uninterrupted build plans (Piper's
    audio is not seeded, so the texts, speakers and synthesizers are compared, not the samples)."""
    pytest.importorskip("piper")
    args = ["corpus", "build", "--train", 6, "--test", 2, "--workers", 2]
    out = tmp_path / "nat"
    env = {k: v for k, v in os.environ.items() if k not in {"RANK", "LOCAL_RANK", "WORLD_SIZE"}}
    proc = subprocess.Popen(cli(*args, "-o", out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=ROOT, env=env)
    plan = Path(f"{out}.partial") / "plan.json"
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:  # until its two workers run
        if plan.exists() and len(_children(proc.pid)) >= 2:
            break
        time.sleep(0.05)
    time.sleep(1.0)
    family = _children(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert family and _wait_gone(family) == set(), "processes of the killed build live on"
    run(cli(*args, "-o", out))
    ref = tmp_path / "ref"
    run(cli(*args, "-o", ref))

    def rows(folder):
        return [{k: r[k] for k in ("id", "text", "speaker", "synth")}  # (a manifest's extra fields are top-level)
                for split in ("train", "test")
                for r in map(json.loads, (folder / f"{split}.jsonl").read_text().splitlines())]

    assert rows(out) == rows(ref) and len(rows(out)) == 8
