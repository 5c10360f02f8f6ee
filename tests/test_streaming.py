"""The streaming reader (mtbi_fast.streaming) on the shards fixture (conftest.py; writing shards is
tests/test_shards.py's): readers of 2 ranks x 2 workers see every example once per epoch; streamed batches are
the in-memory reader's batches of the same records; a killed run resumes to the same batches;
bad shards are named or skipped and counted."""

import collections
import gzip
import io
import json
import shutil
import tarfile
import zlib
from functools import partial

import pytest
import torch

lhotse = pytest.importorskip("lhotse")

import mtbi_fast.train as train_mod
from mtbi_fast.config import load_config
from mtbi_fast.dataset import BatchBuilder, Item, MTBIData
from mtbi_fast.model import ModelConfig, SpeechLLM
from mtbi_fast.streaming import Position, ShardData, ShardError, StreamingBatches
from mtbi_fast.trainer import Trainer

from helpers import CONFIG, ROOT, metrics, overrides


@pytest.fixture(scope="module")
def model(data):
    cfg = load_config(CONFIG, overrides(data, "/tmp/unused"))
    return SpeechLLM.from_config(ModelConfig.from_dict(cfg["model"]))


def builder(model, **kw):
    return BatchBuilder(model, seed=0, mean_span=3.0, max_tokens=512, overlong="truncate", **kw)


def stream_overrides(data, shards, out, *extra):
    return overrides(data, out, "data.reader=streaming", f"data.train_shards={shards}", *extra)


# --- readers ------------------------------------------------------------------------------------

def test_two_ranks_two_workers_see_every_example_once_per_epoch(data, shards, model):
    d = ShardData(shards, builder(model), seed=3, examples=4, shuffle_cuts=2)
    records = {json.loads(line)["id"] for line in (data / "beh" / "part-00000.jsonl").read_text().splitlines()}
    per_epoch = collections.defaultdict(collections.Counter)
    for rank in (0, 1):
        items = StreamingBatches(d, lambda step: 0.5, grad_accum=1, world=2, rank=rank, workers=2)
        loader = torch.utils.data.DataLoader(items, batch_size=None, num_workers=2)
        reached = set()
        for batch in loader:  # until both readers of the rank are into their third epoch
            s = batch["stream"]
            if s["position"]["epoch"] >= 2:
                reached.add(s["reader"])
                if reached == {0, 1}:
                    break
                continue
            per_epoch[s["position"]["epoch"]].update(batch["student"].example_ids)
    for epoch in (0, 1):
        assert set(per_epoch[epoch]) == records and set(per_epoch[epoch].values()) == {1}, epoch
    # the shards of an epoch: disjoint per reader, all of them together, another order each epoch
    for epoch in (0, 1):
        parts = [d.shards(epoch, q, 4) for q in range(4)]
        assert sorted(k for p in parts for k in p) == [0, 1, 2, 3]
    assert [d.shards(e, 0, 1) for e in range(4)] != [d.shards(0, 0, 1)] * 4
    with pytest.raises(ValueError, match="4 shards, fewer than the 6 readers"):
        StreamingBatches(d, lambda step: 0.5, grad_accum=1, world=3, rank=0, workers=2)


def test_streamed_batches_are_the_in_memory_batches_of_their_records(data, shards, model):
    """Same records, keys and salt: the same mels (decoded from the shard's flac), packed inputs
    and cached teacher states as the in-memory reader gives from the audio files."""
    sa = {"freq_masks": 1, "freq_width": 10, "time_masks": 1, "time_width": 0.2}
    d = ShardData(shards, builder(model, spec_augment=sa), seed=0, examples=4, shuffle_cuts=2,
                  teacher_cache=True)
    memory = MTBIData(data / "train.jsonl", data / "beh", model, 0, 3.0, 512, "truncate",
                      teacher_cache=True, spec_augment=sa)
    index = {r["id"]: i for i, r in enumerate(memory.records)}
    streamed = iter(StreamingBatches(d, lambda step: 0.4, grad_accum=1))
    for micro in range(4):
        got = next(streamed)
        items = []
        for rid in got["student"].example_ids:
            r = memory.records[index[rid]]
            items.append(Item(zlib.crc32(rid.encode()), r, memory.utts[r["utt_id"]],
                              partial(memory.features, r["utt_id"]), memory.cache[rid]))
        want = memory.build(items, 0.4, salt=micro)
        for key in ("source", "position_ids", "cu_seqlens", "loss_positions", "target_ids"):
            assert torch.equal(getattr(got["student"], key), getattr(want["student"], key)), key
            assert torch.equal(getattr(got["teacher"], key), getattr(want["teacher"], key)), key
        assert all(torch.equal(a, b) for a, b in zip(got["features"], want["features"]))
        assert torch.equal(got["teacher_hidden"], want["teacher_hidden"])


def test_length_buckets_group_similar_examples(shards, model):
    """Bucketed micro-batches hold examples of similar length: the spread of lengths inside a
    micro-batch is smaller than without buckets, over the same examples."""
    spreads = {}
    for buckets in (False, True):
        d = ShardData(shards, builder(model), seed=1, examples=3, shuffle_cuts=3, length_buckets=buckets)
        seen, spread = set(), []
        for items, after, _ in d.batches(0, 1, Position()):
            if after.epoch > 0:
                break
            lengths = [d._length(it) for it in items]
            spread.append(max(lengths) - min(lengths))
            seen.update(it.record["id"] for it in items)
        spreads[buckets] = sum(spread) / len(spread)
        assert len(seen) == d.index["records"]
    assert spreads[True] < spreads[False], spreads


def test_token_budget_fills_micro_batches_up_to_it(shards, model):
    d = ShardData(shards, builder(model), seed=1, examples=3, shuffle_cuts=3, token_budget=600)
    seen, sizes = [], []
    for items, after, _ in d.batches(0, 1, Position()):
        if after.epoch > 0:
            break
        lengths = [d._length(it) for it in items]
        assert sum(lengths) <= 600 or len(items) == 1
        sizes.append(len(items))
        seen += [it.record["id"] for it in items]
    assert sorted(seen) == sorted(set(seen)) and len(seen) == d.index["records"]
    assert len(set(sizes)) > 1 and max(sizes) > 3  # as many as fit, not a fixed count


def test_resume_from_a_position_gives_the_same_stream(shards, model):
    d = ShardData(shards, builder(model), seed=2, examples=3, shuffle_cuts=2)
    stream = d.batches(1, 2, Position())
    full = [next(stream) for _ in range(12)]
    for k in (0, 1, 4, 7, 10):  # resumed after batch k
        again = d.batches(1, 2, Position(**vars(full[k][1])))
        for want in full[k + 1:]:
            items, after, _ = next(again)
            assert [it.record["id"] for it in items] == [it.record["id"] for it in want[0]]
            assert after == want[1]


# --- training -----------------------------------------------------------------------------------

@pytest.mark.parametrize("workers", [0, 2])
def test_kill_and_resume_streaming_gives_the_same_curve(data, shards, tmp_path, monkeypatch, workers):
    args = ["train.steps=10", "train.save_every=4", "train.eval_every=0", f"data.num_workers={workers}",
            "data.shuffle_cuts=2", "data.teacher_cache=true",
            f"packing.token_budget={600 if workers else 'null'}"]  # with workers: dynamic batches
    full = tmp_path / "full"
    assert train_mod.main(["--config", str(CONFIG), *stream_overrides(data, shards, full, *args)]) == 0
    killed = tmp_path / "killed"
    real_log = Trainer._log

    def dying_log(self, *a, **k):
        row = real_log(self, *a, **k)
        if self.step == 6:  # killed after step 6, the last checkpoint at step 4
            raise KeyboardInterrupt
        return row

    monkeypatch.setattr(Trainer, "_log", dying_log)
    with pytest.raises(KeyboardInterrupt):
        train_mod.main(["--config", str(CONFIG), *stream_overrides(data, shards, killed, *args)])
    monkeypatch.setattr(Trainer, "_log", real_log)
    saved = json.loads((killed / "checkpoints" / "step-000004" / "data-rank-0.json").read_text())
    assert saved["num_workers"] == workers and len(saved["positions"]) == max(1, workers)
    assert train_mod.main(["--config", str(CONFIG), *stream_overrides(data, shards, killed, *args)]) == 0
    a, b = metrics(full), metrics(killed)
    assert [r["step"] for r in b] == list(range(1, 11))
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-6), (x, y)
        assert x["skipped_cuts"] == 0
    # other readers cannot continue these positions
    other = [*args[:3], f"data.num_workers={2 if workers == 0 else 1}", *args[4:], "train.steps=12"]
    assert train_mod.main(["--config", str(CONFIG), *stream_overrides(data, shards, killed, *other)]) == 2
    if workers == 0:  # 1 worker: the same single reader
        same = [*args[:3], "data.num_workers=1", *args[4:], "train.steps=11"]
        assert train_mod.main(["--config", str(CONFIG), *stream_overrides(data, shards, killed, *same)]) == 0
        assert [r["step"] for r in metrics(killed)][-1] == 11


def test_reader_key_follows_the_data_given(data, shards, tmp_path):
    base = overrides(data, tmp_path / "o")
    assert load_config(CONFIG, base)["data"]["reader"] == "memory"
    cfg = load_config(CONFIG, [*base, "data.train_manifest=null", "data.behaviors=null",
                               f"data.train_shards={shards}"])
    assert cfg["data"]["reader"] == "streaming"
    with pytest.raises(ValueError, match="both set; set data.reader"):
        load_config(CONFIG, [*base, f"data.train_shards={shards}"])
    assert load_config(CONFIG, [*base, f"data.train_shards={shards}", "data.reader=memory"])["data"]["reader"] == "memory"
    with pytest.raises(ValueError, match="data.reader is 'streaming' but data.train_shards is not set"):
        load_config(CONFIG, [*base, "data.reader=streaming"])
    with pytest.raises(ValueError, match="no training data"):
        load_config(CONFIG, [*base, "data.train_manifest=null"])
    with pytest.raises(ValueError, match="packing.token_budget sizes the streaming reader"):
        load_config(CONFIG, [*base, "packing.token_budget=2048"])


# --- bad shards ---------------------------------------------------------------------------------

def _copy(shards, tmp_path):
    out = tmp_path / "bad"
    shutil.copytree(shards, out)
    return out


def _rewrite_cuts(path, edit):
    with gzip.open(path, "rt") as f:
        lines = [json.loads(line) for line in f]
    with gzip.open(path, "wt") as f:
        for c in lines:
            f.write(json.dumps(edit(c)) + "\n")
    return lines


def _epoch(d, reader=0, readers=1):
    ids, skipped = [], 0
    for items, after, sk in d.batches(reader, readers, Position()):
        if after.epoch > 0:
            break
        ids += [it.record["id"] for it in items]
        skipped += sk
    return ids, skipped


def test_a_truncated_tar_names_the_shard_and_the_cut_or_is_skipped(shards, model, tmp_path):
    bad = _copy(shards, tmp_path)
    tar = bad / "shar" / "recording.000001.tar"
    data = tar.read_bytes()
    with tarfile.open(tar) as t:
        flac = [m for m in t.getmembers() if m.name.endswith(".flac")][1]
    tar.write_bytes(data[:flac.offset_data + 100])  # cut through the second cut's audio
    with pytest.raises(ValueError, match=r"recording\.000001\.tar: \d+ bytes, .*shards\.json lists \d+"):
        ShardData(bad, builder(model), seed=0, examples=4, shuffle_cuts=100)  # refused when opened
    # damage after the start (a disk going bad) is found where the reader meets it
    d = ShardData(bad, builder(model), seed=0, examples=4, shuffle_cuts=100, verify="none")
    with pytest.raises(ShardError, match=r"shard .*cuts\.000001\.jsonl\.gz: cannot be read at cut "
                                         r"'demo-train-004' \(number 2 of the shard\).*skip_bad_shards: true"):
        _epoch(d)
    d = ShardData(bad, builder(model), seed=0, examples=4, shuffle_cuts=100, skip_bad_shards=True)
    ids, skipped = _epoch(d)
    assert skipped >= 2 and len({i.split("/")[0] for i in ids}) == 12 - skipped


def test_a_cut_without_alignment_or_audio_is_named(shards, model, tmp_path):
    bad = _copy(shards, tmp_path)

    def drop_alignment(c):
        if c["id"] == "demo-train-004":
            c["supervisions"][0].pop("alignment", None)
        return c

    _rewrite_cuts(bad / "shar" / "cuts.000001.jsonl.gz", drop_alignment)
    with pytest.raises(ValueError, match=r"cuts\.000001\.jsonl\.gz: "):
        ShardData(bad, builder(model), seed=0, examples=4, shuffle_cuts=100)  # changed since written
    ids, skipped = _epoch(ShardData(bad, builder(model), seed=0, examples=4, shuffle_cuts=100,
                                    skip_bad_shards=True))  # the changed shard left out whole
    assert skipped == 3 and not any(i.split("/")[0] in ("demo-train-003", "demo-train-004", "demo-train-005")
                                    for i in ids)
    # read without the start check, the cut itself is named, and skipped alone
    d = ShardData(bad, builder(model), seed=0, examples=4, shuffle_cuts=100, verify="none")
    with pytest.raises(ShardError, match=r"cuts\.000001\.jsonl\.gz: cut 'demo-train-004': no word alignment"):
        _epoch(d)
    ids, skipped = _epoch(ShardData(bad, builder(model), seed=0, examples=4, shuffle_cuts=100,
                                    skip_bad_shards=True, verify="none"))
    assert skipped == 1 and not any(i.startswith("demo-train-004/") for i in ids) and len(ids) == 22

    # a missing audio file in the tar: the last one
    bad2 = _copy(shards, tmp_path / "2")
    tar = bad2 / "shar" / "recording.000002.tar"
    with tarfile.open(tar) as t:
        members = [(m, t.extractfile(m).read()) for m in t.getmembers()]
    with tarfile.open(tar, "w") as t:
        for m, payload in members[:-2]:  # the last cut's flac and its JSON
            t.addfile(m, io.BytesIO(payload))
    d = ShardData(bad2, builder(model), seed=0, examples=4, shuffle_cuts=100, verify="none")
    with pytest.raises(ShardError, match=r"shard .*cuts\.000002\.jsonl\.gz: 3 cuts in the index, 2 read"):
        _epoch(d)


# --- DeepSpeed ZeRO-3, 2 CPU ranks over gloo, streaming ---------------------------------------------

def _zero_stream_worker(rank, world, port, data, shards, out, steps):
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    cfg = load_config(CONFIG, stream_overrides(data, shards, out, "deepspeed=" + str(ROOT / "configs" / "ds_zero3.json"),
                                               f"train.steps={steps}", "train.save_every=3",
                                               "train.eval_every=0", "data.shuffle_cuts=2"))
    Trainer(cfg).train()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    os._exit(0)  # skip interpreter teardown, where gloo threads can abort the process


def _spawn(*args):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_zero_stream_worker, args=(2, port, *map(str, args[:3]), args[3]), nprocs=2)


def test_zero3_two_ranks_stream_and_resume_exactly(data, shards, tmp_path):
    """Each rank saves its readers' positions; a run resumed from step 3 continues the streams of
    both ranks: the same losses as the uninterrupted run."""
    pytest.importorskip("deepspeed")
    full = tmp_path / "full"
    _spawn(data, shards, full, 6)
    ckpt = full / "checkpoints" / "step-000003"
    assert sorted(p.name for p in ckpt.glob("data-rank-*.json")) == ["data-rank-0.json", "data-rank-1.json"]
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed, ignore=shutil.ignore_patterns("step-000006", "final", ".lock"))
    (resumed / "checkpoints" / "latest").write_text("step-000003")
    _spawn(data, shards, resumed, 6)
    a, b = metrics(full), metrics(resumed)
    assert [r["step"] for r in b] == list(range(1, 7))
    assert [r["time"] for r in b[:3]] == [r["time"] for r in a[:3]]  # resumed: steps 1-3 not rerun
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-6), (x, y)


def test_token_ids_outside_the_vocabulary_are_refused_by_both_readers(data, shards, model, tmp_path):
    """A negative id (it would be read as a speech-frame reference) or one past the vocabulary is
    refused when the records are read, naming the file and line (in-memory reader) or the shard
    and cut (streaming), never found mid-step."""
    from mtbi_fast.dataset import MTBIData

    beh = tmp_path / "beh"
    shutil.copytree(data / "beh", beh)
    first = sorted(beh.glob("part-*.jsonl"))[0]
    lines = first.read_text().splitlines()
    for field, bad in (("response_ids", -3), ("prefix_ids", 512)):
        record = json.loads(lines[1])
        record[field][0] = bad
        first.write_text("\n".join([lines[0], json.dumps(record), *lines[2:]]) + "\n")
        with pytest.raises(ValueError, match=rf"{first}:2: record '{record['id']}': {field}\[0\] = {bad} "
                                             r"is not a token id of the LLM's vocabulary \[0, 512\)"):
            MTBIData(str(data / "train.jsonl"), str(beh), model, seed=0, mean_span=3.0, max_tokens=512,
                     overlong="truncate")

    bad_shards = _copy(shards, tmp_path)

    def negative(c):  # the Shar field file of the behaviors: {"cut_id", "behaviors"} a line
        if c["cut_id"] == "demo-train-004":
            c["behaviors"][0]["response_ids"][0] = -3
        return c

    _rewrite_cuts(bad_shards / "shar" / "behaviors.000001.jsonl.gz", negative)
    d = ShardData(bad_shards, builder(model), seed=0, examples=4, shuffle_cuts=100, verify="none")
    with pytest.raises(ShardError, match=r"cuts\.000001\.jsonl\.gz: cut 'demo-train-004': record "
                                         r"'demo-train-004/.*': response_ids\[0\] = -3 is not a token id"):
        _epoch(d)


def test_a_streamed_example_too_long_for_the_budget_names_its_cut(shards, model):
    """The streaming reader sees a cut's records only when it reads them: an example too long
    for the budget is a ShardError naming the shard and the cut (skippable like any bad cut)."""
    small = BatchBuilder(model, seed=0, mean_span=3.0, max_tokens=40, overlong="truncate")
    d = ShardData(shards, small, seed=0, examples=4, shuffle_cuts=100)
    with pytest.raises(ShardError, match=r"shard .*cuts\.00000\d\.jsonl\.gz: cut 'demo-train-\d+': 1 behavior "
                                         r"record\(s\) can never fit packing.max_tokens=40 .*skip_bad_shards"):
        _epoch(d)


def test_a_shard_folder_may_move_but_not_change(shards, model, tmp_path):
    """Every kind of edit to a shard folder is refused by name when it is opened (quick check:
    sizes, 128 KiB fingerprints, the index against the entries written with each shard) or, for
    a change in the middle of a file, by the full sums (on resume, or data.verify_shards)."""
    from mtbi_fast.shards import read_index

    def fresh(name):
        return _copy(shards, tmp_path / name)

    # a cuts file edited by hand, still valid gzip
    bad = fresh("cuts")
    _rewrite_cuts(bad / "shar" / "cuts.000001.jsonl.gz", lambda c: {**c, "duration": c["duration"] * 0.5})
    with pytest.raises(ValueError, match=r"cuts\.000001\.jsonl\.gz: .*(bytes, .* lists|quick fingerprint)"):
        ShardData(bad, builder(model), seed=0, examples=4)
    # shards.json with its sums zeroed, or a lowered cut count
    for edit, message in ((lambda sh: sh["sha256"].update(cuts="0" * 64), r"the entry of shard 0 differs"),
                          (lambda sh: sh.update(cuts=sh["cuts"] - 1), r"cut count does not add up")):
        bad = fresh(f"index-{message[:5]}")
        index = json.loads((bad / "shards.json").read_text())
        edit(index["shards"][0])
        (bad / "shards.json").write_text(json.dumps(index))
        with pytest.raises(ValueError, match=rf"shards\.json: .*{message}"):
            ShardData(bad, builder(model), seed=0, examples=4)
    # one byte in the middle of a recording tar: same size, same ends
    bad = fresh("middle")
    tar = bad / "shar" / "recording.000002.tar"
    blob = bytearray(tar.read_bytes())
    assert len(blob) > 3 * (1 << 16)
    blob[len(blob) // 2] ^= 0xFF
    tar.write_bytes(bytes(blob))
    ShardData(bad, builder(model), seed=0, examples=4)  # the quick check cannot see it
    with pytest.raises(ValueError, match=r"recording\.000002\.tar: its sha256 differs"):
        read_index(bad, verify="full")
    with pytest.raises(ValueError, match=r"recording\.000002\.tar: its sha256 differs"):
        ShardData(bad, builder(model), seed=0, examples=4, verify="full")
    assert read_index(shards, verify="full")["cuts"] == 12  # the untouched folder passes


