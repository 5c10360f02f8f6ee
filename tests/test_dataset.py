"""The in-memory reader (mtbi_fast/dataset.py): batches built by DataLoader workers equal those
built in the training process from their definition, over-long examples are cut the same way for
student and teacher or refused before step 0, the feature cache is bounded, and a Lhotse CutSet
reads like its JSONL manifest."""

import json
import pickle
import re

import pytest
import torch

import mtbi_fast.dataset as dataset_mod
from mtbi_fast.cli import main as cli
from mtbi_fast.config import load_config
from mtbi_fast.data import read_manifest
from mtbi_fast.dataset import MicroBatches
from mtbi_fast.model import ModelConfig, SpeechLLM
from mtbi_fast.trainer import Trainer

from helpers import CONFIG, assert_same_batch, metrics, overrides


def test_workers_build_the_in_process_batches(data, tmp_path):
    """Two workers give, tensor for tensor and from a resumed run's first step on, the batches
    built in this process from their definition: the records of micro-batch
    (step * grad_accum + k) * world + rank at the step's scheduled ratio, salted by the
    micro-batch (SpecAugment on, cached teacher states)."""
    settings = {"freq_masks": 1, "freq_width": 10, "time_masks": 1, "time_width": 0.2}
    cfg = load_config(CONFIG, overrides(data, tmp_path / "w", "train.steps=6", "train.grad_accum=2",
                                        "data.teacher_cache=true", "data.num_workers=2",
                                        "data.spec_augment=" + json.dumps(settings)))
    trainer = Trainer(cfg)
    d, n, ratio = trainer.data, cfg["packing"]["examples_per_step"], trainer.schedule

    def built_here(step, k, world=1, rank=0):
        micro = (step * cfg["train"]["grad_accum"] + k) * world + rank
        return d.batch(d.record_indices(micro, n), ratio(step), salt=micro)

    trainer.step = 3  # as after resuming from the step-3 checkpoint
    loader = trainer.train_loader(torch.device("cpu"))
    assert (loader.num_workers, loader.prefetch_factor, loader.pin_memory) == (2, 2, False)
    assert trainer.train_loader(torch.device("cuda")).pin_memory
    got = list(loader)
    assert len(got) == 6 and len({ratio(s) for s in (3, 4, 5)}) == 3
    for batch, (step, k) in zip(got, [(s, k) for s in (3, 4, 5) for k in (0, 1)]):
        assert_same_batch(batch, built_here(step, k))
    # rank 1 of 2 takes every other micro-batch; the dataset pickles without the model
    items = MicroBatches(d, ratio, n, grad_accum=2, world=2, rank=1)
    for j in (0, 3, 7):
        assert_same_batch(items[j], built_here(*divmod(j, 2), world=2, rank=1))
    blob = pickle.dumps(items)
    assert b"SpeechLLM" not in blob and b"torch.nn" not in blob
    assert_same_batch(pickle.loads(blob)[5], items[5])


def test_truncated_responses_keep_student_and_online_teacher_aligned(data, tmp_path):
    """At packing.max_tokens=135 responses are cut: the student (a speech prompt, longer than the
    teacher's text one) and the teacher keep the same response tokens, online or cached."""
    cfg = load_config(CONFIG, overrides(data, tmp_path / "t", "packing.max_tokens=135"))
    trainer = Trainer(cfg)
    d = trainer.data
    idx = list(range(len(d)))
    batch = d.batch(idx, 0.0, salt=1)
    full = sum(len(d.records[i]["response_ids"]) for i in idx)
    assert batch["student"].target_ids.numel() < full  # some responses were cut
    assert torch.equal(batch["student"].target_ids, batch["teacher"].target_ids)
    assert torch.equal(batch["student"].loss_example, batch["teacher"].loss_example)
    with torch.no_grad():
        out = trainer.model(batch["student"], features=batch["features"], teacher=batch["teacher"])
    assert torch.isfinite(out["loss"])
    # the cached teacher states are cut the same way
    cached = load_config(CONFIG, overrides(data, tmp_path / "c", "packing.max_tokens=135",
                                           "data.teacher_cache=true"))
    b2 = Trainer(cached).data.batch(idx, 0.0, salt=1)
    assert b2["teacher_hidden"].shape[0] == batch["student"].target_ids.numel()


def test_mel_cache_is_bounded(data, tmp_path, monkeypatch):
    """Each process (a DataLoader worker included) keeps only the last FEATURE_CACHE_CLIPS log-mels."""
    monkeypatch.setattr(dataset_mod, "FEATURE_CACHE_CLIPS", 3)
    trainer = Trainer(load_config(CONFIG, overrides(data, tmp_path / "m", "train.steps=1")))
    ids = list(trainer.data.utts)[:5]
    first = trainer.data.features(ids[0]).clone()
    for u in ids[1:]:
        trainer.data.features(u)
    assert list(trainer.data._features) == ids[2:]
    assert torch.equal(trainer.data.features(ids[0]), first)  # recomputed, the same
    assert list(trainer.data._features) == ids[3:] + ids[:1]
    trainer.close()


def test_training_reads_a_lhotse_cutset_like_its_manifest(data, tmp_path):
    """data.train_manifest may be a Lhotse CutSet (the speech community's manifests): the same
    utterances as the JSONL manifest give the same training run."""
    pytest.importorskip("lhotse")
    from mtbi_fast.lhotse_io import manifest_to_cutset

    manifest_to_cutset(read_manifest(data / "train.jsonl")).to_file(tmp_path / "cuts.jsonl.gz")
    runs = {}
    for name, manifest in (("jsonl", data / "train.jsonl"), ("cuts", tmp_path / "cuts.jsonl.gz")):
        out = tmp_path / name
        cfg = load_config(CONFIG, overrides(data, out, "train.steps=3", "train.eval_every=0",
                                            f"data.train_manifest={manifest}"))
        Trainer(cfg).train()
        runs[name] = [{k: r[k] for k in ("step", "loss", "kl")} for r in metrics(out) if "loss" in r]
    assert len(runs["jsonl"]) == 3 and runs["cuts"] == runs["jsonl"]


def test_examples_that_can_never_fit_are_refused_before_step_0(data, tmp_path):
    """A record whose prompt alone (as speech or as text) leaves no room in packing.max_tokens is
    refused when the data is read, naming it, not at the step that meets it; a run may resume with
    a larger packing.max_tokens."""
    from mtbi_fast.behaviors_folder import read_behaviors
    from mtbi_fast.data import read_manifest

    utts = {u.id: u for u in read_manifest(data / "train.jsonl")}
    records = read_behaviors(data / "beh")
    cfg = load_config(CONFIG, overrides(data, tmp_path / "small", "packing.max_tokens=60"))
    model = SpeechLLM.from_config(ModelConfig.from_dict(cfg["model"]))
    longest = max(records, key=lambda r: len(r["prefix_ids"]) + len(r["suffix_ids"]) + max(
        model.n_frames(round(utts[r["utt_id"]].duration * 16000)), len(r["transcript_ids"])))
    with pytest.raises(ValueError, match=rf"behavior record\(s\) can never fit packing.max_tokens=60 "
                                         rf"\(overlong: truncate\): .*{re.escape(longest['id'])} \(prompt \d+ tokens as "
                                         r"speech, \d+ as text, response \d+\).*Raise packing.max_tokens"):
        Trainer(cfg)
    out = tmp_path / "run"
    assert cli(["train", str(CONFIG), *overrides(data, out, "train.steps=2", "train.save_every=1",
                                                 "train.eval_every=0")]) == 0
    assert cli(["train", str(CONFIG), *overrides(data, out, "train.steps=3", "train.save_every=1",
                                                 "train.eval_every=0", "packing.max_tokens=1024")]) == 0
    assert [r["step"] for r in metrics(out) if "loss" in r] == [1, 2, 3]
