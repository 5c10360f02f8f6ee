"""The data path at corpus scale: the streaming reader (shards) against the in-memory reader.

    python -m pytest benchmarks/bench_data.py                  # 1,000,000 utterances
    MTBI_BENCH_UTTERANCES=100000 python -m pytest benchmarks/bench_data.py

A synthetic corpus is generated in a temporary folder (nothing is committed): 12 demo utterances
with real behaviors from the tiny_train LLM (2 prompts each), repeated under new ids. The
in-memory reader gets a JSONL manifest and behaviors folder of N utterances; the streaming reader
gets a shard folder whose 1,000-cut shards, written by ``mtbi-fast shard``, are repeated (linked)
up to N utterances: the same bytes a real corpus of that size would have per shard.

Measured, each reader in a fresh process (``--measure``) running the real trainer (tiny_train
model, ``data.num_workers=0`` so that all the data work is in the measured process):

- resident memory after start-up (the Trainer built: model, data, checks) and after 1,000
  steps, and the peak; the goal is growth under 200 MB at 1M utterances, against a 1,000-utterance
  corpus read the same way. The in-memory reader is measured at 1M too (about 14 GB and 4 minutes
  to start; ``MTBI_BENCH_MEMORY_UTTERANCES=100000`` measures it at 100,000 instead, for a machine
  with less memory);
- start-up time to the first batch (goal: under 10 s).

And the data pipeline alone (no model step), in examples and cuts per second per worker, with 0,
1 and 2 DataLoader workers. Results: benchmarks/results/data_<device>.json and .md.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import results_table
import torch

ROOT = Path(__file__).resolve().parents[1]
N = int(os.environ.get("MTBI_BENCH_UTTERANCES", 1_000_000))
SMALL = 1_000
STEPS = int(os.environ.get("MTBI_BENCH_STEPS", 1000))
MEMORY_LIMIT = int(os.environ.get("MTBI_BENCH_MEMORY_UTTERANCES", 1_000_000))  # in-memory reader: up to
SHARD = 1000
BASE = 12


# --- the synthetic corpus ---------------------------------------------------------------------------

def base_corpus(d: Path) -> tuple[list[dict], list[dict]]:
    """12 demo utterances (manifest rows, absolute audio paths) and their behaviors from the
    tiny_train LLM."""
    from mtbi_fast.behaviors import BehaviorConfig, generate_behaviors
    from mtbi_fast.behaviors_folder import read_behaviors
    from mtbi_fast.config import load_config
    from mtbi_fast.data import read_manifest
    from mtbi_fast.hub import load_llm
    from mtbi_fast.model import ModelConfig
    from mtbi_fast.tasks import TaskLibrary

    utts = read_manifest(ROOT / "data" / "demo" / "train.jsonl", require_words=True)[:BASE]
    cfg = load_config(ROOT / "configs" / "tiny_train.yaml",
                      ["data.train_manifest=x", "data.behaviors=x", f"output_dir={d}/unused"])
    llm, tok = load_llm(ModelConfig.from_dict(cfg["model"]).llm)
    generate_behaviors(utts, TaskLibrary.load(ROOT / "configs" / "tasks.yaml"), llm, tok, d / "base-beh",
                       BehaviorConfig(per_utterance=2, max_new_tokens=12), progress=False,
                       model_config=cfg["model"])
    rows = [u.to_json() for u in utts]
    return rows, read_behaviors(d / "base-beh")


def write_memory_corpus(d: Path, n: int, rows, records) -> tuple[Path, Path]:
    """A manifest of ``n`` utterances (utterance i is base utterance i % 12 under id u<i>) and
    its behaviors (in plan order: sorted by utterance id)."""
    from mtbi_fast.behaviors_folder import BehaviorsFolder

    by_utt = {}
    for r in records:
        by_utt.setdefault(r["utt_id"], []).append(r)
    man_tpl = [json.dumps({**row, "id": "@ID@"}) + "\n" for row in rows]
    beh_tpl = [[json.dumps({**r, "id": r["id"].replace(row["id"], "@ID@"), "utt_id": "@ID@"}) + "\n"
                for r in by_utt[row["id"]]] for row in rows]
    manifest, beh = d / f"manifest-{n}.jsonl", d / f"beh-{n}"
    beh.mkdir()
    plan = json.loads((d / "base-beh" / "plan.json").read_text())
    plan["jobs"] = n * len(records) // BASE  # the synthetic plan: every record is there
    (beh / "plan.json").write_text(json.dumps(plan))
    with open(manifest, "w") as m, open(BehaviorsFolder(beh).part(0), "w") as b:
        for i in range(n):
            uid = f"u{i:07d}"
            m.write(man_tpl[i % BASE].replace("@ID@", uid))
            b.write("".join(t.replace("@ID@", uid) for t in beh_tpl[i % BASE]))
    return manifest, beh


def write_shard_corpus(d: Path, n: int, rows, records) -> Path:
    """A shard folder of ``n`` utterances: one shard of SHARD cuts written by ``write_shards``,
    linked under every shard number up to n (cut ids repeat across shards; nothing reads them
    as unique)."""
    from mtbi_fast.shards import INDEX, SHAR, write_shards

    base = d / "shards-base"
    if not base.exists():
        manifest, beh = write_memory_corpus(d, SHARD, rows, records)
        write_shards(manifest, beh, base, shard_size=SHARD, progress=False)
    out = d / f"shards-{n}"
    (out / SHAR).mkdir(parents=True)
    index = json.loads((base / INDEX).read_text())
    entry = index["shards"][0]
    shards = []
    for k in range(n // SHARD):
        files = {field: name.replace("000000", f"{k:06d}") for field, name in entry["files"].items()}
        for field, name in files.items():
            os.symlink(base / SHAR / entry["files"][field], out / SHAR / name)
        shards.append({**entry, "files": files})
    index.update(shards=shards, cuts=entry["cuts"] * len(shards), records=entry["records"] * len(shards),
                 tasks={t: c * len(shards) for t, c in index["tasks"].items()})
    (out / INDEX).write_text(json.dumps(index))
    shutil.copy(base / "plan.json", out / "plan.json")
    return out


# --- one measured training process --------------------------------------------------------------

def rss_mb() -> tuple[float, float]:
    """(resident, peak resident) MB of this process."""
    status = Path("/proc/self/status").read_text()
    get = lambda key: int(next(ln for ln in status.splitlines() if ln.startswith(key)).split()[1]) / 1024
    return get("VmRSS:"), get("VmHWM:")


def measure(mode: str, path: str, out: str, steps: int) -> dict:
    """Run the trainer for ``steps`` steps on the corpus (``mode`` memory: manifest,behaviors;
    streaming: a shard folder); returns memory and timing."""
    t0 = time.perf_counter()
    from mtbi_fast.config import load_config
    from mtbi_fast.trainer import Trainer

    data = ([f"data.train_manifest={path.split(',')[0]}", f"data.behaviors={path.split(',')[1]}"]
            if mode == "memory" else ["data.train_manifest=null", "data.behaviors=null",
                                      f"data.train_shards={path}"])
    cfg = load_config(ROOT / "configs" / "tiny_train.yaml", [
        *data, "data.eval_manifest=null", "data.eval_behaviors=null", "data.num_workers=0",
        f"train.steps={steps}", "train.eval_every=0", "train.save_every=0", f"train.log_every={steps}",
        f"interleave.steps={steps}", f"output_dir={out}"])
    imported = rss_mb()[0]
    t_build = time.perf_counter()
    trainer = Trainer(cfg)
    startup_rss = rss_mb()[0]
    first = {}
    real_next = Trainer._next_batch

    def timed_next(self, *a, **k):
        got = real_next(self, *a, **k)
        first.setdefault("t", time.perf_counter())
        return got

    Trainer._next_batch = timed_next
    t_train = time.perf_counter()
    trainer.train(resume=False, overwrite=True)
    t_end = time.perf_counter()
    end_rss, peak = rss_mb()
    return {"rss_imported_mb": imported, "rss_startup_mb": startup_rss, "rss_end_mb": end_rss,
            "rss_peak_mb": peak, "startup_s": first["t"] - t_build, "build_s": t_train - t_build,
            "process_s": t_end - t0, "steps_per_s": steps / (t_end - t_train)}


def run_measure(mode: str, path, out: Path, steps: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--measure", mode, str(path), str(out), str(steps)],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"measure {mode} {path} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- benchmarks ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    rows, records = base_corpus(d)
    return d, rows, records


@pytest.fixture(scope="module")
def data_rows():
    rows: list[dict] = []
    yield rows
    if rows:
        columns = [("case", "case", ""), ("variant", "variant", ""), ("utterances", "utterances", ","),
                   ("rss_startup_mb", "RSS after start-up (MB)", ".0f"),
                   ("rss_end_mb", f"RSS after {STEPS} steps (MB)", ".0f"), ("rss_peak_mb", "peak RSS (MB)", ".0f"),
                   ("growth_mb", "growth vs 1k corpus (MB)", ".0f"), ("startup_s", "to first batch (s)", ".2f"),
                   ("examples_per_s_per_worker", "examples/s per worker", ".1f"),
                   ("cuts_per_s_per_worker", "cuts/s per worker", ".1f")]
        table = results_table.write(
            "data_cpu", "The data path at corpus scale: streaming shards vs the in-memory reader "
            "(`python -m pytest benchmarks/bench_data.py`)", rows, columns, baseline="memory",
            ratios=("startup_s",))
        print("\n" + table)


@pytest.mark.parametrize("variant", ["memory", "streaming"])
def test_memory_and_startup(benchmark, corpus, data_rows, variant, tmp_path):
    d, rows, records = corpus
    results = {}
    sizes = (SMALL, N) if variant == "streaming" else (SMALL, min(N, MEMORY_LIMIT))
    for size in sizes:
        if variant == "memory":
            shutil.copytree(d / "base-beh", tmp_path / "base-beh", dirs_exist_ok=True)
            manifest, beh = write_memory_corpus(tmp_path, size, rows, records)
            path = f"{manifest},{beh}"
        else:
            path = write_shard_corpus(d, size, rows, records)
        if size == sizes[-1]:
            results[size] = benchmark.pedantic(run_measure, args=(variant, path, tmp_path / f"run-{size}", STEPS),
                                               rounds=1, iterations=1)
        else:
            results[size] = run_measure(variant, path, tmp_path / f"run-{size}", STEPS)
        if variant == "memory":
            shutil.rmtree(tmp_path / f"beh-{size}", ignore_errors=True)
            (tmp_path / f"manifest-{size}.jsonl").unlink(missing_ok=True)
    small = results[SMALL]
    for size, r in results.items():
        row = {"case": f"{size:,} utterances", "variant": variant, "utterances": size, **r,
               "growth_mb": r["rss_end_mb"] - small["rss_end_mb"]}
        data_rows.append(row)
    if variant == "streaming":
        big = results[N]
        assert big["rss_end_mb"] - small["rss_end_mb"] < 200, (small, big)
        assert big["startup_s"] < 10, big


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_pipeline_throughput(benchmark, corpus, data_rows, workers):
    """Micro-batches of the streaming reader through a DataLoader, no model step."""
    from mtbi_fast.config import load_config
    from mtbi_fast.dataset import BatchBuilder
    from mtbi_fast.model import ModelConfig, SpeechLLM
    from mtbi_fast.streaming import ShardData, StreamingBatches

    d, rows, records = corpus
    folder = write_shard_corpus(d, 10 * SHARD, rows, records) if not (d / f"shards-{10 * SHARD}").exists() \
        else d / f"shards-{10 * SHARD}"
    cfg = load_config(ROOT / "configs" / "tiny_train.yaml", [f"output_dir={d}/unused"])
    model = SpeechLLM.from_config(ModelConfig.from_dict(cfg["model"]))
    builder = BatchBuilder(model, seed=0, mean_span=3.0, max_tokens=512, overlong="truncate")
    data = ShardData(folder, builder, seed=0, examples=8, shuffle_cuts=128)
    n_batches = 300

    def run():
        items = StreamingBatches(data, lambda step: 0.5, grad_accum=1, workers=workers)
        loader = torch.utils.data.DataLoader(items, batch_size=None, num_workers=workers,
                                             prefetch_factor=2 if workers else None)
        it = iter(loader)
        next(it)  # workers started, first window read
        t0, examples = time.perf_counter(), 0
        for _ in range(n_batches):
            examples += len(next(it)["student"].example_ids)
        seconds = time.perf_counter() - t0
        del it
        return examples, examples * data.index["cuts"] / data.index["records"], seconds

    examples, cuts, seconds = benchmark.pedantic(run, rounds=1, iterations=1)
    per = max(1, workers)
    data_rows.append({"case": "pipeline alone", "variant": f"streaming, {workers} workers",
                      "examples_per_s_per_worker": examples / seconds / per,
                      "cuts_per_s_per_worker": cuts / seconds / per})


if __name__ == "__main__" and sys.argv[1:2] == ["--measure"]:
    mode, path, out, steps = sys.argv[2:6]
    print(json.dumps(measure(mode, path, out, int(steps))))
