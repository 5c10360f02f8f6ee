"""The shard folder (mtbi_fast/shards.py, ``mtbi-fast shard``): Lhotse reads the shards as they
are, with the behaviors and the teacher's cached states; a killed run finishes to the same bytes,
any number of workers writes the same bytes, a changed run is refused and bad inputs are named.
Reading the shards is tests/test_streaming.py's."""

import collections
import json
import shutil

import pytest
import torch

lhotse = pytest.importorskip("lhotse")

from mtbi_fast.config import load_config
from mtbi_fast.dataset import BatchBuilder
from mtbi_fast.model import ModelConfig, SpeechLLM
from mtbi_fast.shards import SETTINGS, read_index, write_shards
from mtbi_fast.streaming import ShardData

from helpers import CONFIG, SHARD_SIZE, overrides


def test_shards_are_lhotse_shar_with_the_behaviors(data, shards):
    index = read_index(shards)
    records = [json.loads(line) for line in (data / "beh" / "part-00000.jsonl").read_text().splitlines()]
    assert (index["cuts"], index["records"], len(index["shards"])) == (12, len(records), 4)
    assert [s["cuts"] for s in index["shards"]] == [3, 3, 3, 3]
    assert index["teacher_hidden"] and sum(index["tasks"].values()) == len(records)

    from safetensors.torch import load_file
    states = load_file(str(data / "beh" / "part-00000.safetensors"))
    cuts = list(lhotse.CutSet.from_shar(in_dir=shards / "shar"))  # Lhotse alone reads it
    assert [c.id for c in cuts] == sorted({r["utt_id"] for r in records})
    by_utt = collections.defaultdict(list)
    for r in records:
        by_utt[r["utt_id"]].append(r)
    manifest = {json.loads(line)["id"]: json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()}
    import soundfile as sf
    for cut in cuts:
        assert cut.behaviors == by_utt[cut.id]
        want = torch.cat([states[r["id"]] for r in by_utt[cut.id]])
        got = torch.from_numpy(cut.load_teacher_hidden().view("int16")).view(torch.bfloat16)
        assert torch.equal(got, want.to(torch.bfloat16))
        words = [(a.symbol, round(a.start, 3)) for a in cut.supervisions[0].alignment["word"]]
        assert words == [(w["word"], round(w["start"], 3)) for w in manifest[cut.id]["words"]]
        audio, _ = sf.read(data / manifest[cut.id]["audio"], dtype="float32", always_2d=True)
        assert torch.equal(torch.from_numpy(cut.load_audio()), torch.from_numpy(audio.T))  # lossless


def test_a_killed_shard_run_finishes_and_a_changed_one_is_refused(data, shards, tmp_path):
    out = tmp_path / "s"
    shutil.copytree(shards, out)
    want = (out / "shards.json").read_text()
    # killed while writing shard 2: its cuts file (renamed last) is missing, a temporary folder is left
    (out / "shar" / "cuts.000002.jsonl.gz").unlink()
    (out / "shards.json").unlink()
    (out / ".tmp" / "000002").mkdir(parents=True)
    (out / ".tmp" / "000002" / "recording.000002.tar").write_bytes(b"partial")
    with pytest.raises(FileNotFoundError, match="unfinished shard folder"):
        read_index(out)
    index = write_shards(data / "train.jsonl", data / "beh", out, shard_size=SHARD_SIZE, teacher_hidden=True,
                         progress=False)
    assert (out / "shards.json").read_text() == want and index["cuts"] == 12
    assert not (out / ".tmp").exists()
    with pytest.raises(ValueError, match=r"other inputs or settings: shard_size \(3 -> 5\)"):
        write_shards(data / "train.jsonl", data / "beh", out, shard_size=5, progress=False)
    index = write_shards(data / "train.jsonl", data / "beh", out, shard_size=5, overwrite=True, progress=False)
    assert len(index["shards"]) == 3 and json.loads((out / SETTINGS).read_text())["shard_size"] == 5
    aside = list(tmp_path.glob("s.replaced-*"))
    assert len(aside) == 1 and (aside[0] / "shards.json").read_text() == want  # nothing lost


def test_shards_are_the_same_bytes_for_any_number_of_workers(data, shards, tmp_path):
    """Two worker processes write the files one process wrote (no times in the gzip headers), at
    another time: the index with its checksums is the same."""
    import time

    time.sleep(1.1)  # a gzip header with a time would now differ
    index = write_shards(data / "train.jsonl", data / "beh", tmp_path / "w2", shard_size=SHARD_SIZE,
                         teacher_hidden=True, workers=2, progress=False)
    assert index == read_index(shards)
    for f in (shards / "shar").iterdir():
        assert (tmp_path / "w2" / "shar" / f.name).read_bytes() == f.read_bytes(), f.name


@pytest.mark.parametrize("kw, message", [(dict(shard_size=0), "shard_size must be >= 1, got 0"),
                                         (dict(workers=0), "workers must be >= 1, got 0")])
def test_shard_refuses_bad_sizes(data, tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        write_shards(data / "train.jsonl", data / "beh", tmp_path / "out", progress=False, **kw)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_shard_refuses_unfinished_behaviors(data, tmp_path):
    beh = tmp_path / "beh"
    shutil.copytree(data / "beh", beh)
    lines = (beh / "part-00000.jsonl").read_text().splitlines(True)
    (beh / "part-00000.jsonl").write_text("".join(lines[:-3]))
    (beh / "index.json").unlink(missing_ok=True)
    with pytest.raises(ValueError, match=rf"holds {len(lines) - 3} of the {len(lines)} behaviors its plan.json"):
        write_shards(data / "train.jsonl", beh, tmp_path / "out", progress=False)


def test_shard_refuses_behaviors_of_unknown_utterances(data, tmp_path):
    lines = (data / "train.jsonl").read_text().splitlines(True)
    (tmp_path / "few.jsonl").write_text("".join(lines[:5]))
    with pytest.raises(ValueError, match=r"part-00000\.jsonl:\d+: behavior .* refers to utterance .* not in"):
        write_shards(tmp_path / "few.jsonl", data / "beh", tmp_path / "out", progress=False)


def test_a_deleted_shard_file_is_written_again_by_a_rerun(data, shards, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(shards, out)
    want = {p.name: p.read_bytes() for p in (out / "shar").iterdir()}
    (out / "shar" / "behaviors.000002.jsonl.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"behaviors\.000002\.jsonl\.gz: missing .*rerun `mtbi-fast shard`"):
        ShardData(out, BatchBuilder(SpeechLLM.from_config(ModelConfig.from_dict(
            load_config(CONFIG, overrides(data, "/tmp/unused"))["model"])), seed=0, mean_span=3.0,
            max_tokens=512, overlong="truncate"), seed=0, examples=4)
    write_shards(data / "train.jsonl", data / "beh", out, shard_size=SHARD_SIZE, teacher_hidden=True,
                 progress=False)
    assert {p.name: p.read_bytes() for p in (out / "shar").iterdir()} == want
