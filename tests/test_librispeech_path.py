"""The LibriSpeech path of docs/librispeech.md, command for command, on a stand-in: demo clips laid
out as a LibriSpeech part (flac + trans.txt + the word alignments Lhotse's recipe reads). Lhotse's
recipe and `lhotse cut simple`, `mtbi-fast behaviors` on 2 ranks (torchrun), `mtbi-fast shard`,
`mtbi-fast train` streaming from the shards; the CutSet also converts to a manifest and back."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

lhotse = pytest.importorskip("lhotse")

from mtbi_fast.data import read_manifest
from mtbi_fast.lhotse_io import read_utterances

from helpers import CONFIG, ROOT, metrics

BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    """A console script of this environment (the venv's bin may not be on PATH)."""
    path = BIN / name
    return str(path) if path.exists() else shutil.which(name) or pytest.skip(f"{name} not installed")


def sh(*cmd, env=None):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=600)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def fake_librispeech(root: Path, n: int = 6) -> list:
    """``n`` demo clips as LibriSpeech dev-clean speaker 19, chapter 198 (upper-case transcripts,
    and alignment.txt with a leading silence, as the LibriSpeech alignments have)."""
    utts = read_manifest(ROOT / "data" / "demo" / "train.jsonl", require_words=True)[:n]
    chapter = root / "dev-clean" / "19" / "198"
    chapter.mkdir(parents=True)
    trans, align = [], []
    for k, u in enumerate(utts):
        uid = f"19-198-{k:04d}"
        shutil.copy(u.audio, chapter / f"{uid}.flac")
        words = [w.word.upper().strip(".,!?;:") for w in u.words]
        trans.append(f"{uid} {' '.join(words)}\n")
        first = max(u.words[0].start, 0.01)
        ends = [first] + [w.end for w in u.words]
        align.append(f'{uid} ",{",".join(words)}" "{",".join(f"{t:.3f}" for t in ends)}"\n')
    (chapter / "19-198.trans.txt").write_text("".join(trans))
    (chapter / "19-198.alignment.txt").write_text("".join(align))
    return utts


def test_librispeech_path_end_to_end(tmp_path):
    corpus, data = tmp_path / "LibriSpeech", tmp_path / "data"
    fake_librispeech(corpus)
    # 1. Lhotse's recipe and cuts
    sh(tool("lhotse"), "prepare", "librispeech", corpus, data / "manifests", "-p", "dev-clean")
    sh(tool("lhotse"), "cut", "simple", "-r", data / "manifests" / "librispeech_recordings_dev-clean.jsonl.gz",
       "-s", data / "manifests" / "librispeech_supervisions_dev-clean.jsonl.gz", data / "cuts.jsonl.gz")
    utts = read_utterances(data / "cuts.jsonl.gz", require_words=True)  # the silences left out
    assert len(utts) == 6 and all(w.word for u in utts for w in u.words)
    assert all(" ".join(w.word for w in u.words) == u.text for u in utts)
    # both ways: a project manifest and back
    sh(sys.executable, "-m", "mtbi_fast.cli", "manifest", "convert", data / "cuts.jsonl.gz", "-o", data / "train.jsonl")
    sh(sys.executable, "-m", "mtbi_fast.cli", "manifest", "convert", data / "train.jsonl", "-o", data / "back.jsonl.gz")
    assert [u.id for u in read_utterances(data / "back.jsonl.gz", require_words=True)] == [u.id for u in utts]

    # 2. behaviors on 2 ranks (CPU here; cuda:LOCAL_RANK on GPUs)
    beh = tmp_path / "beh"
    sh(tool("torchrun"), "--nproc_per_node", "2", "-m", "mtbi_fast.cli", "behaviors", "--manifest",
       data / "cuts.jsonl.gz", "--config", CONFIG, "-o", beh, "--per-utterance", "2", "--max-new-tokens", "8",
       "--part-size", "4", "--cache-hidden")
    assert (beh / "index.json").is_file() and len(list(beh.glob("part-*.jsonl"))) == 3

    # 3. shards, 4. training streamed from them
    shards = tmp_path / "shards"
    sh(sys.executable, "-m", "mtbi_fast.cli", "shard", data / "cuts.jsonl.gz", beh, "-o", shards,
       "--shard-size", "2", "--teacher-hidden")
    index = json.loads((shards / "shards.json").read_text())
    assert (index["cuts"], index["records"], len(index["shards"])) == (6, 12, 3)
    out = tmp_path / "run"
    sh(sys.executable, "-m", "mtbi_fast.cli", "train", CONFIG, "data.reader=streaming",
       f"data.train_shards={shards}", "data.teacher_cache=true", "data.eval_manifest=null",
       "data.eval_behaviors=null", "train.steps=3", "train.eval_every=0", "train.save_every=0",
       f"output_dir={out}")
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["loss"] > 0 for r in rows)
    assert (out / "final").is_dir()
