"""mtbi_fast/behaviors.py with the tiny config: resume equality, determinism, hidden-state cache."""

import json
from pathlib import Path

import pytest
import torch
import yaml

import mtbi_fast.behaviors as beh
from mtbi_fast.behaviors import BehaviorConfig, generate_behaviors, plan, read_behaviors
from mtbi_fast.data import read_manifest
from mtbi_fast.model import ModelConfig, SpeechLLM
from mtbi_fast.packing import Example, Text, pack
from mtbi_fast.tasks import TaskLibrary

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def setup():
    cfg = ModelConfig.from_dict(yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())["model"])
    model = SpeechLLM.from_config(cfg)
    utts = read_manifest(ROOT / "tests" / "data" / "clips.jsonl")
    return model, utts, TaskLibrary.load(ROOT / "configs" / "tasks.yaml")


def files(d):
    return {p.name: p.read_bytes() for p in sorted(Path(d).glob("shard-*"))}


@pytest.mark.parametrize("sample", [False, True])
def test_resume_after_kill_gives_the_same_files(tmp_path, setup, monkeypatch, sample):
    model, utts, lib = setup
    cfg = BehaviorConfig(per_utterance=5, max_new_tokens=6, batch_size=2, shard_size=4, do_sample=sample)
    generate_behaviors(utts, lib, model.llm, model.tokenizer, tmp_path / "full", cfg, progress=False)

    real, calls = beh._answer, []

    def dying(*a, **k):  # killed during the third shard
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(beh, "_answer", dying)
    with pytest.raises(KeyboardInterrupt):
        generate_behaviors(utts, lib, model.llm, model.tokenizer, tmp_path / "resumed", cfg, progress=False)
    assert len(files(tmp_path / "resumed")) == 2  # two complete shards, nothing half written
    monkeypatch.setattr(beh, "_answer", real)
    summary = generate_behaviors(utts, lib, model.llm, model.tokenizer, tmp_path / "resumed", cfg,
                                 progress=False)
    assert summary["generated"] == 15 - 8
    assert files(tmp_path / "resumed") == files(tmp_path / "full")
    records = read_behaviors(tmp_path / "full")
    assert len(records) == 15 and len({r["id"] for r in records}) == 15


def test_records_use_only_the_training_split(tmp_path, setup):
    model, utts, lib = setup
    cfg = BehaviorConfig(per_utterance=30, max_new_tokens=3, batch_size=16, shard_size=64)
    generate_behaviors(utts, lib, model.llm, model.tokenizer, tmp_path, cfg, progress=False)
    split = json.loads((tmp_path / "split.json").read_text())
    for r in read_behaviors(tmp_path):
        assert r["task"] not in split["heldout_tasks"]
        assert r["wording"] in split["train"][r["task"]]
        assert r["prompt"] == lib.prompt(r["task"], r["wording"], next(u.text for u in utts if u.id == r["utt_id"]))
        assert r["response_ids"] and r["transcript_ids"]
    held = plan(utts, lib.split(), lib, BehaviorConfig(per_utterance=3, split="heldout_task"))
    assert {j["task"] for j in held} <= set(split["heldout_tasks"])


def test_greedy_answer_matches_plain_generation(tmp_path, setup):
    """Left-padded batched generation gives each prompt what it gets alone."""
    model, utts, lib = setup
    cfg = BehaviorConfig(per_utterance=2, max_new_tokens=5, batch_size=6)
    generate_behaviors(utts, lib, model.llm, model.tokenizer, tmp_path, cfg, progress=False)
    for r in read_behaviors(tmp_path)[:3]:
        ids = torch.tensor([r["prefix_ids"] + r["transcript_ids"] + r["suffix_ids"]])
        out = model.llm.generate(ids, max_new_tokens=5, do_sample=False,
                                 pad_token_id=model.tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
        assert r["response_ids"] == out[:len(r["response_ids"])]


def test_hidden_cache_equals_teacher_states(tmp_path, setup):
    from safetensors.torch import load_file

    model, utts, lib = setup
    cfg = BehaviorConfig(per_utterance=2, max_new_tokens=4, cache_hidden=True)
    generate_behaviors(utts, lib, model.llm, model.tokenizer, tmp_path, cfg, progress=False)
    states = load_file(str(tmp_path / "shard-00000.safetensors"))
    records = read_behaviors(tmp_path)
    assert set(states) == {r["id"] for r in records}
    examples = [Example(r["id"], [Text(r["prefix_ids"] + r["transcript_ids"] + r["suffix_ids"])],
                        r["response_ids"]) for r in records]
    expected = model.teacher_states(pack(examples, 512))
    got = torch.cat([states[r["id"]] for r in records]).float()
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)  # bf16 storage


def test_split_mismatch_is_refused(tmp_path, setup):
    model, utts, lib = setup
    cfg = BehaviorConfig(per_utterance=1, max_new_tokens=2)
    generate_behaviors(utts, lib, model.llm, model.tokenizer, tmp_path, cfg, progress=False)
    with pytest.raises(ValueError, match="records a different task split"):
        generate_behaviors(utts, lib, model.llm, model.tokenizer, tmp_path, cfg,
                           split=lib.split(seed=5), progress=False)


def test_bad_plan_options_are_named(setup):
    model, utts, lib = setup
    with pytest.raises(ValueError, match=r"split must be train, heldout_wording or heldout_task, got 'dev'"):
        plan(utts, lib.split(), lib, BehaviorConfig(split="dev"))
    with pytest.raises(ValueError, match=r"no train prompts of tasks \['give_title'\] in the split"):
        plan(utts, lib.split(), lib, BehaviorConfig(tasks=("give_title",)))
